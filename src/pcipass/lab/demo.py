"""`pcipass lab demo`: the main job end to end, narrated for a newcomer. Runs inside the lab.

Each step runs the real `pcipass` command and shows it with its output. A step
whose verb has not been built yet is named, with what it will do, and skipped.
The demo ends by checking that every device is back on the driver it had.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
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
        "hand the NVMe controller to a VM, and give everything back.")
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
    if nvmes and failure is None and step("config", f"8. A VM gets the NVMe controller {nvmes[0]}: the host "
                                          "writes a block through its nvme driver; pcipass claims the "
                                          "controller; QEMU, with the arguments `pcipass config qemu` "
                                          "prints, boots a small Linux "
                                          "whose own nvme driver reads the block and writes one back; the VM "
                                          "exits, and `pcipass release` gives the controller back to nvme, "
                                          "where the host reads the guest's block."):
        try:
            nvme_to_a_vm(nvmes[0])
        except SystemExit as exc:
            failure = exc
    after = drivers()
    changed = {bdf: (before[bdf], after.get(bdf)) for bdf in before if before[bdf] != after.get(bdf)}
    say("9. Every device is back on its original driver." if not changed else
        f"9. Devices NOT back on their drivers: {changed}")
    if failure is not None:
        print(failure, file=sys.stderr)
    return 1 if changed or failure is not None else 0


def nvme_to_a_vm(bdf: str) -> None:
    from pcipass.lab import kernel as lab_kernel
    from pcipass.lab import nested

    kernel = lab_kernel.require()
    exchange = nested.NvmeExchange.new()
    dev = exchange.write_host_block(bdf)
    print(f"\n$ # 4 KiB of random bytes written to {dev} at {nested.HOST_BLOCK_OFFSET:#x} (O_DIRECT), "
          f"SHA-256 {nested.sha256(exchange.host_block)[:16]}...", flush=True)
    pcipass("claim", bdf)
    try:
        printed = pcipass("config", "qemu", bdf).stdout.strip()
        shell, files = exchange.checks(kernel)
        workdir = Path(tempfile.mkdtemp(prefix="pcipass-demo-vm-"))
        command = nested.command(workdir, kernel, shlex.split(printed), nested.init_script(shell), files)
        shown = [*command[: command.index("-append") + 2], "$(pcipass config qemu " + bdf + ")"]
        print(f"\n$ {shlex.join(shown)}", flush=True)
        run = nested.boot(workdir, kernel, shlex.split(printed), nested.init_script(shell), files,
                          echo=lambda line: print(f"  | {line}", flush=True))
        print(f"  (the VM ran {run.seconds:.0f} s, TCG inside TCG)", flush=True)
        wrong = exchange.mismatches(run.results)
        if run.qemu_stderr is None or wrong:
            raise SystemExit(f"demo: the VM did not read and write the blocks: {wrong or 'QEMU timed out'}")
        shutil.rmtree(workdir)
        print(f"  the VM's nvme driver read the host's block (SHA-256 {run.results['nvme-read'][:16]}...) "
              "and wrote its own", flush=True)
    finally:
        pcipass("release", bdf)
    host_block, guest_block = exchange.read_back(bdf)
    if (host_block, guest_block) != (exchange.host_block, exchange.guest_block):
        raise SystemExit("demo: the blocks read back on the host are not the ones written")
    print(f"\n$ # back on nvme: {dev} holds the host's block and the VM's block "
          f"(SHA-256 {nested.sha256(guest_block)[:16]}...), both as written", flush=True)


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
