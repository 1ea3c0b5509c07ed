"""A claimed group held by a consumer, on the real kernel (the lab, as root): release,
release --all and a second claim refuse at once naming the holder and change nothing;
status names it; once it exits, release gives the device back to its driver. QEMU 7.2
with vfio-pci and `pcipass serve BDF` are named as holders too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from guest_pci import PCI, SRC, claim_state, driver, find, pcipass, wait_for  # noqa: F401 (claim_state: autouse)

from pcipass.errors import PcipassError
from pcipass.host.transaction import claim as c
from pcipass.lab.topology import E1000E, EDU

pytestmark = pytest.mark.lab

# Holds a device through pcipass.vfio, as a userspace driver does, until killed.
HOLDER = """
import sys, time
from pcipass.vfio import open_device
dev = open_device(sys.argv[1])
print("id", hex(dev.region(0).read(0, 4)), flush=True)
if len(sys.argv) > 2:  # map DMA memory, which counts against RLIMIT_MEMLOCK
    buf = dev.dma_alloc(int(sys.argv[2]))
    print("dma", hex(buf.iova), flush=True)
print("ready", flush=True)
if len(sys.argv) <= 3:
    time.sleep(3600)
"""


def fd_targets(pid: int) -> set[str]:
    """What a process's fds point at; an fd it closes while we look is left out."""
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return targets


class Holder:
    """A process holding `bdf` open through VFIO (root, or argv from unprivileged.command)."""

    def __init__(self, script: Path, bdf: str, *extra: str, argv: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        cmd = argv or [sys.executable]
        self.proc = subprocess.Popen([*cmd, str(script), bdf, *extra], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=env or {**os.environ, "PYTHONPATH": SRC})
        self.lines: list[str] = []
        while True:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"the holder died: {self.proc.wait()} {self.proc.stderr.read()}")  # type: ignore[union-attr]
            self.lines.append(line.strip())
            if line.strip() == "ready":
                break

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)


@pytest.fixture(scope="module")
def script():
    d = Path(tempfile.mkdtemp(prefix="pcipass-holders-"))
    os.chmod(d, 0o755)  # the unprivileged user runs it too
    path = d / "holder.py"
    path.write_text(HOLDER)
    os.chmod(path, 0o644)
    return path


def journal_bytes() -> dict[str, bytes]:
    d = Path(os.environ["PCIPASS_STATE_DIR"])
    return {p.name: p.read_bytes() for p in sorted(d.glob("group-*.json"))}


def test_refusals_name_the_holder_and_change_nothing_then_release_after_it_exits(script):
    [nic] = find(E1000E)
    [edu] = find(EDU, alone=True)
    assert driver(nic) == "e1000e"
    for bdf in (nic, edu):
        p = pcipass("claim", bdf)
        assert p.returncode == 0, p.stderr
    holder = Holder(script, nic)
    try:
        journal = journal_bytes()
        bound = {b: driver(b) for b in (nic, edu)}
        for argv in (["release", nic], ["release", "--all"], ["claim", nic]):
            t0 = time.monotonic()
            p = pcipass(*argv, timeout=300)
            took = time.monotonic() - t0
            assert p.returncode == 1, (argv, p.stdout, p.stderr)
            assert f"pid {holder.pid} (" in p.stderr and "holder.py" in p.stderr, p.stderr
            assert "open" in p.stderr and "hint: stop" in p.stderr, p.stderr
            assert {b: driver(b) for b in (nic, edu)} == bound, argv
            assert journal_bytes() == journal, argv  # not a byte of the journal changed
            print(f"pcipass {' '.join(argv)}: refused in {took:.1f} s")
        p = pcipass("status")
        assert p.returncode == 0
        assert f"held by pid {holder.pid} (" in p.stdout and "/dev/vfio/" in p.stdout, p.stdout
    finally:
        holder.stop()
    p = pcipass("release", "--all")
    assert p.returncode == 0, p.stderr
    assert driver(nic) == "e1000e" and driver(edu) is None
    assert journal_bytes() == {}


def test_qemu_and_pcipass_serve_are_named_as_holders(script, tmp_path):
    [edu] = find(EDU, alone=True)
    assert pcipass("claim", edu).returncode == 0
    qemu = subprocess.Popen(["qemu-system-x86_64", "-M", "q35", "-m", "32", "-S", "-display", "none",
                             "-nodefaults", "-monitor", "none", "-serial", "none",
                             "-device", f"vfio-pci,host={edu}"], stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: "anon_inode:[vfio-device]" in fd_targets(qemu.pid), 300), qemu.poll()
        with pytest.raises(PcipassError) as e:
            c.release(c.Context("/"), edu)
        assert e.value.code == "held-by-process"
        assert f"pid {qemu.pid} (qemu-system-x86_64 -M q35" in e.value.message and "VFIO device fd" in e.value.message
    finally:
        qemu.terminate()
        qemu.wait(120)
    sock = tmp_path / "edu.sock"
    serve = subprocess.Popen([sys.executable, "-m", "pcipass", "serve", edu, "--socket", str(sock)],
                             env={**os.environ, "PYTHONPATH": SRC}, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: sock.exists(), 300)
        [g] = c.status(c.Context("/"))["groups"]
        [h] = g["holders"]
        assert h["pid"] == serve.pid and f"pcipass serve {edu}" in h["command"], h
        assert f"{edu} resource0 mapped" in h["uses"], h  # serve maps BAR0 from sysfs
    finally:
        serve.terminate()
        serve.wait(120)
    assert [r.key for r in c.release(c.Context("/"), edu)]
