"""`pcipass lab demo`: the main job end to end, narrated for a newcomer. Runs inside the lab.

Each step runs the real `pcipass` command and shows it with its output. A step
whose verb has not been built yet is named, with what it will do, and skipped.
The demo ends by checking that every device is back on the driver it had.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from pcipass.lab import unprivileged
from pcipass.lab.topology import E1000E, EDU, QEMU_NVME

PCI = Path("/sys/bus/pci/devices")
# Under TCG on a busy machine, Python and the VFIO set-up can take a while.
BACKEND_START_SECONDS = 120


def say(text: str) -> None:
    print("\n" + textwrap.fill(text, 88), flush=True)


def available_verbs() -> set[str]:
    from pcipass.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # the subcommand action lists every registered verb
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return set(action.choices)
    return set()


def pcipass(*args: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    shown = "pcipass " + shlex.join(args)
    print(f"\n{'$' if user is None else user + ' $'} {shown}", flush=True)
    if user is None:
        done = subprocess.run([sys.executable, "-m", "pcipass", *args], text=True, capture_output=True)
    else:
        done = subprocess.run(unprivileged.command(user, "-m", "pcipass", *args), text=True,
                              capture_output=True, env=unprivileged.environment())
    print(textwrap.indent((done.stdout + done.stderr).rstrip(), "  "), flush=True)
    if check and done.returncode != 0:
        raise SystemExit(f"demo: `{shown}` failed with status {done.returncode}")
    return done


def ids(dev: Path) -> str:
    return f"{(dev / 'vendor').read_text()[2:6]}:{(dev / 'device').read_text()[2:6]}"


def drivers() -> dict[str, str | None]:
    """BDF -> the driver bound now (None: no driver)."""
    return {d.name: (d / "driver").resolve().name if (d / "driver").exists() else None
            for d in sorted(PCI.iterdir())}


def find(vendor_device: str) -> list[str]:
    return sorted(d.name for d in PCI.iterdir() if ids(d) == vendor_device)


def main() -> int:
    verbs = available_verbs()
    before = drivers()
    edus, nvmes, nics = find(EDU), find(QEMU_NVME), find(E1000E)
    standalone = next((b for b in edus if not b.endswith(("0d.0", "0d.1"))), None)

    def step(verb: str, text: str) -> bool:
        say(text)
        if verb not in verbs:
            print(f"  (not built yet: `pcipass {verb}` comes with a later issue)")
            return False
        return True

    say("Welcome to the pcipass lab: a real Linux kernel under QEMU with an emulated Intel "
        "IOMMU (VT-d). pcipass will look at every PCI device, judge which can be passed "
        "through, claim one, drive it from userspace, serve it to an unprivileged process, "
        "and give everything back.")
    if step("list", "1. Inventory: every PCI device, its IDs and names, its driver and IOMMU group."):
        pcipass("list")
    if step("groups", "2. IOMMU groups: the unit of isolation. The bridge and the two edu functions "
            "behind it share one group: they can only be passed through together."):
        pcipass("groups")
    if step("check", "3. Verdicts: can each device be passed through, and if not, why?"):
        for bdf in edus + nvmes + nics:
            pcipass("check", bdf, check=False)
    if standalone is None:
        raise SystemExit("demo: the lab has no standalone edu device (topology without it?)")
    claimed = False
    if step("claim", f"4. Claim the standalone edu {standalone}: its whole group goes to vfio-pci, "
            "recorded in a journal first so that a crash can be undone."):
        pcipass("claim", standalone)
        claimed = True
    failure = None
    try:
        if claimed:
            pcipass("status")
            drive_and_serve(standalone, step)
    except SystemExit as exc:  # a failed step: still give everything back below
        failure = exc
    if claimed and step("release", "7. Release: every device goes back to the driver it had."):
        pcipass("release", "--all")
    after = drivers()
    changed = {bdf: (before[bdf], after.get(bdf)) for bdf in before if before[bdf] != after.get(bdf)}
    say("8. Every device is back on its original driver." if not changed else
        f"8. Devices NOT back on their drivers: {changed}")
    say("What comes next: Xen's pciback in a real dom0 (pcipass lab run --xen -- ...).")
    if failure is not None:
        print(failure, file=sys.stderr)
    return 1 if changed or failure is not None else 0


def drive_and_serve(bdf: str, step: Callable[[str, str], bool]) -> None:
    if step("drive", "5. Drive it from userspace through VFIO: ID, liveness, "
            "factorial, DMA through the IOMMU, the completion interrupt."):
        pcipass("drive", "edu", bdf)
    if not step("serve", "6. A driver domain: a privileged backend serves the device over "
                "vfio-user, and the same edu driver runs as user nobody in another process, "
                "with no access to VFIO itself."):
        return
    socket = "/tmp/pcipass-demo-edu.sock"
    print(f"\n$ pcipass serve {bdf} --socket {socket} --owner nobody &", flush=True)
    backend = subprocess.Popen([sys.executable, "-m", "pcipass", "serve", bdf,
                                "--socket", socket, "--owner", "nobody"])
    try:
        deadline = time.monotonic() + BACKEND_START_SECONDS
        while not os.path.exists(socket):  # it appears only when ready to serve
            if backend.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: the backend did not start (see its messages above)")
            time.sleep(0.1)
        pcipass("drive", "edu", "--socket", socket, user="nobody")
    finally:
        backend.terminate()
        backend.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
