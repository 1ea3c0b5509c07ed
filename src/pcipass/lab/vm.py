"""Boot the lab: a real kernel under QEMU through virtme-ng, with the host's root shared read-only.

virtme-ng exports / over 9p with writable overlays on /etc, /tmp, /var, /usr...,
so the same Python and the same checkout run inside, as root. We add the q35
machine with an emulated VT-d, the topology's devices, `intel_iommu=on`, and
wrap the command in `pcipass.lab.guest`, which reports the boot time and passes
the command's exit status back out.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pcipass
from pcipass.errors import PcipassError
from pcipass.lab import kernel as lab_kernel
from pcipass.lab import xen as lab_xen
from pcipass.lab.topology import PEER_QEMU, Topology, machine_args
from pcipass.unwind import signals_as_interrupt

QEMU = "qemu-system-x86_64"
GUEST_MEMORY = "2G"
KERNEL_ARGS = "intel_iommu=on"
# How long the KVM probe waits for a kernel to reach its "no root" panic.
KVM_PROBE_SECONDS = 20


def _say(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def _tool(name: str, hint: str) -> str:
    here = Path(sys.executable).parent / name  # a venv's scripts sit beside its python
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = str(here) if here.exists() else shutil.which(name, path=search)
    if path is None:
        raise PcipassError(f"{name} is not installed", hint=hint, code="lab-missing-tool")
    return path


def check_tools() -> dict[str, str]:
    """Every host tool the lab needs, or an error that says how to install the missing one."""
    return {
        "qemu": _tool(QEMU, "apt-get install qemu-system-x86"),
        "vng": _tool("vng", "pip install virtme-ng (or pip install -e '.[lab]')"),
        "depmod": _tool("depmod", "apt-get install kmod"),  # virtme-ng indexes the modules
    }


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str


def _probe_kvm(qemu: str, kernel: lab_kernel.Kernel) -> Accel:
    """Boot the kernel with KVM and no root: a working KVM reaches the VFS panic in seconds."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "no usable /dev/kvm")
    cmd = [
        qemu, "-accel", "kvm", "-M", "q35", "-cpu", "host", "-m", "256", "-nodefaults",
        "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel.image), "-append", "console=ttyS0 panic=-1",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                             timeout=KVM_PROBE_SECONDS, stdin=subprocess.DEVNULL)
        text = out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
    if "Kernel panic" in text and "VFS" in text:
        return Accel("kvm", "KVM works")
    lines = [line.strip() for line in text.splitlines() if line.strip()] or ["no output"]
    telling = next((line for line in lines if "error" in line or "failure" in line), lines[-1])
    return Accel("tcg", f"KVM is present but a guest dies under it: {telling[:100]}")


def accel(qemu: str, kernel: lab_kernel.Kernel) -> Accel:
    """KVM where it really works, TCG otherwise; probed once per host boot and kernel."""
    forced = os.environ.get("PCIPASS_LAB_ACCEL")
    if forced in ("kvm", "tcg"):
        return Accel(forced, "PCIPASS_LAB_ACCEL")
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    memo = lab_kernel.cache_dir() / "accel.json"
    key = f"{boot_id}/{kernel.release}"
    try:
        seen = json.loads(memo.read_text())
        if seen.get("key") == key:
            return Accel(seen["name"], seen["reason"])
    except (OSError, ValueError, KeyError):
        pass
    found = _probe_kvm(qemu, kernel)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"key": key, "name": found.name, "reason": found.reason}))
    return found


def guest_command(command: list[str], topology: Topology, xen: bool = False,
                  kernel: str | None = None) -> str:
    """The shell line the guest runs: our wrapper, with this very pcipass on its path."""
    src = Path(pcipass.__file__).resolve().parent.parent
    if xen:  # dom0 first starts Xen's services (pcipass.lab.xen)
        command = [sys.executable, "-m", "pcipass.lab.xen", "dom0", "--", *command]
    wrapper = [
        sys.executable, "-m", "pcipass.lab.guest",
        "--topology", topology.name, "--kernel", kernel or lab_kernel.DEBIAN,
        "--host-start", f"{time.time():.3f}", "--", *command,
    ]
    return f"PYTHONPATH={shlex.quote(str(src))} {shlex.join(wrapper)}"


def vng_command(topology: Topology, workdir: Path, *, command: list[str] | None,
                rwdirs: tuple[Path, ...] = (), xen: bool = False,
                append: tuple[str, ...] = (), kernel_name: str | None = None) -> tuple[list[str], Accel]:
    tools = check_tools()
    kernel = lab_kernel.require(kernel_name)
    mode = accel(tools["qemu"], kernel)
    qemu_opts = shlex.join(machine_args() + topology.qemu_args(workdir))
    kernel_args = " ".join((KERNEL_ARGS, *append))
    cmd = [
        tools["vng"], "--run", str(kernel.image), "--disable-microvm", "--user", "root",
        "-m", GUEST_MEMORY, f"--append={kernel_args}", f"--qemu-opts={qemu_opts}",
    ]
    qemu = tools["qemu"]
    if topology.qemu == PEER_QEMU:  # a device Debian's QEMU lacks: the peer QEMU boots it
        from pcipass.lab import peer_qemu

        qemu = str(peer_qemu.require().wrapper(workdir))
        if not xen:
            cmd.append(f"--qemu={qemu}")
    if xen:  # vng boots Xen, with this kernel as dom0, through our QEMU (pcipass.lab.xen)
        image = lab_xen.require(lab_kernel.cache_dir())
        cmd.append(f"--qemu={lab_xen.qemu_wrapper(workdir, qemu, image)}")
    if mode.name == "tcg":
        cmd.append("--disable-kvm")
    for directory in rwdirs:
        cmd.append(f"--rwdir={directory}")
    if command is not None:
        line = guest_command(command, topology, xen, kernel_name)
        if xen:  # Xen cuts dom0's command line (virtme-ng carries the command there) at 1 KiB
            script = workdir / "guest.sh"  # the guest sees the host's root, so it reads this
            script.write_text(f"{line}\n")
            line = f"sh {shlex.quote(str(script))}"
        cmd += ["--", line]
    return cmd, mode


def run(command: list[str] | None, topology: Topology, *, rwdirs: tuple[Path, ...] = (),
        timeout: float | None = None, log: Path | None = None, cwd: Path | None = None,
        xen: bool = False, append: tuple[str, ...] = (), kernel: str | None = None) -> int:
    """Boot, run `command` as root inside (None: an interactive shell), shut down.

    Output streams to ours (or to `log`); returns the command's exit status.
    `xen`: boot Xen with the kernel as its dom0; `append`: more kernel arguments;
    `kernel`: a lab kernel of the project's own (pcipass.lab.kbuild) instead of Debian's.
    """
    runs = lab_kernel.cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=runs, prefix="run-") as workdir:
        cmd, mode = vng_command(topology, Path(workdir), command=command, rwdirs=rwdirs,
                                xen=xen, append=append, kernel_name=kernel)
        what = f"Linux {lab_kernel.require(kernel).release}"
        if xen:
            what = f"Xen {lab_xen.VERSION} dom0 ({what}, PV)"
        _say(f"booting {what} with QEMU "
             f"{'KVM' if mode.name == 'kvm' else 'TCG'} ({mode.reason}); topology {topology.name}"
             + (f"; kernel arguments {' '.join(append)}" if append else ""))
        out = open(log, "ab") if log else None
        # vng's QEMU opens /proc/self/fd/1 and 2 as files and truncates them, so it
        # gets pipes, copied through to ours (or to the log) by two threads.
        piped = command is not None
        # vng starts virtme-run by name: the directory vng came from (a venv's bin, which need
        # not be activated) goes first on its PATH.
        env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(cmd[0]), os.environ.get("PATH", "")]))
        proc = subprocess.Popen(
            cmd, cwd=cwd or os.getcwd(), start_new_session=True, env=env,
            stdin=subprocess.DEVNULL if piped else None,
            stdout=subprocess.PIPE if piped else None,
            stderr=subprocess.PIPE if piped else None,
        )
        copiers = []
        if piped:
            sinks = (out or sys.stdout.buffer, out or sys.stderr.buffer)
            copiers = [threading.Thread(target=_copy, args=(src, dst), daemon=True)
                       for src, dst in zip((proc.stdout, proc.stderr), sinks)]
            for copier in copiers:
                copier.start()
        try:
            with signals_as_interrupt():
                status = proc.wait(timeout=timeout)
            if xen and status == 255:  # vng's "no status came back": Xen or dom0 died
                _say("the guest stopped without the command's status; the end of Xen's "
                     f"serial log:\n{lab_xen.serial_tail(Path(workdir))}")
            return status
        except subprocess.TimeoutExpired:
            _say(f"the guest ran over {timeout:.0f} s: stopping it")
            return 124
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for copier in copiers:
                copier.join(timeout=5)
            if out:
                out.close()


def _copy(source: IO[bytes], sink: IO[bytes]) -> None:
    while chunk := os.read(source.fileno(), 65536):
        sink.write(chunk)
        sink.flush()
