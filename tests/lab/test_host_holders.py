"""A claimed group held by a consumer, on the real kernel (the lab, as root): release,
release --all and a second claim refuse at once naming the holder and change nothing;
status names it; once it exits, release gives the device back to its driver. QEMU 7.2
with vfio-pci and `pcipass serve BDF` are named as holders too."""

from __future__ import annotations

import json
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


# Opens the device, then keeps only an in-flight copy of its fd (sent over a socketpair and
# never received): the kernel still counts the device open, but no process has it in its fd
# table or maps, so pcipass cannot name a holder and the unbind blocks for real.
HIDDEN_HOLDER = """
import array, os, socket, sys
from pcipass.vfio import open_device
dev = open_device(sys.argv[1])
keep, drop = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
keep.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dev.fd]))])
# The group, the container and our own device fd go (raw: the kernel refuses to detach a
# group whose device is open, as VfioDevice.close would); the fd in flight stays.
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if target.startswith("/dev/vfio/") or target == "anon_inode:[vfio-device]":
        os.close(int(fd))
print("ready", flush=True)
sys.stdin.readline()  # until the test says so; exiting drops the socket and the fd in flight
os._exit(0)
"""


def test_a_release_the_kernel_blocks_ends_on_the_driver_once_the_hidden_holder_lets_go(tmp_path):
    [nic] = find(E1000E)
    assert driver(nic) == "e1000e"
    assert pcipass("claim", nic).returncode == 0
    script = tmp_path / "hidden.py"
    script.write_text(HIDDEN_HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), nic], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        assert not [t for t in fd_targets(holder.pid) if "vfio" in t], fd_targets(holder.pid)
        t0 = time.monotonic()
        p = pcipass("release", nic, env={**os.environ, c.UNBIND_TIMEOUT_ENV: "5"}, timeout=300)
        took = time.monotonic() - t0
        assert p.returncode == 1, (p.stdout, p.stderr)
        assert f"the kernel still holds the unbind of {nic} after 5 s" in p.stderr, p.stderr
        finisher = int(p.stderr.split("pcipass pid ")[1].split()[0])
        assert os.path.exists(f"/proc/{finisher}"), "the finisher waits for the kernel"
        print(f"release: unbind-blocked after {took:.1f} s; finisher pid {finisher}")
        # The kernel takes the driver link away before it calls vfio-pci's remove, which is
        # what waits; the journal still holds the release.
        assert driver(nic) is None and journal_bytes(), "nothing is given back yet"
        t0 = time.monotonic()
        # While the kernel holds the unbind, status answers and says the release is under way
        # (a read that waits on the device would hang it: Popen, so the test can still let go).
        status, listing = (subprocess.Popen([sys.executable, "-m", "pcipass", verb, "--json"],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            env={**os.environ, "PYTHONPATH": SRC})
                           for verb in ("status", "list"))
        answered = wait_for(lambda: status.poll() is not None and listing.poll() is not None, 120)
        print(f"status and list during the blocked unbind: answered={answered} in {time.monotonic() - t0:.1f} s")
        # A second release or a recover does not fight the finisher for the group.
        refusals = {}
        if answered:
            for argv in (["release", nic], ["recover"]):
                q = pcipass(*argv, timeout=120)
                refusals[argv[0]] = (q.returncode, q.stderr)
    finally:
        holder.communicate("go\n", timeout=120)
    out, err = status.communicate(timeout=300)
    listed, list_err = listing.communicate(timeout=300)
    assert answered, "status or list waited for the blocked unbind"
    assert status.returncode == 0, err
    [g] = json.loads(out)["groups"]
    assert g["state"] == "release in progress", g
    assert listing.returncode == 0, list_err
    [d] = [d for d in json.loads(listed)["devices"] if d["bdf"] == nic]
    assert d["at_work"].startswith(f"pid {finisher}:") and d["driver_override"] is None, d
    for verb, (code, stderr) in refusals.items():
        assert code == 1 and f"pid {finisher}" in stderr and "in progress" in stderr, (verb, stderr)
    assert wait_for(lambda: not os.path.exists(f"/proc/{finisher}"), 120)
    assert wait_for(lambda: driver(nic) == "e1000e", 60), driver(nic)
    assert journal_bytes() == {}, "the finisher completed the release"
    assert json.loads(pcipass("status", "--json").stdout)["groups"] == []
