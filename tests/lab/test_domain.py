"""Driver domains on the real kernel (the lab, as root): `pcipass serve` on the claimed edu,
the unchanged edu driver run as user `nobody` through the socket.

`nobody` cannot run the host's Python under /root/.pyenv (/root is mode 0700 and
the share is read-only, so no chmod): the frontend runs on Debian's
/usr/bin/python3 (3.11, the standard library is all pcipass needs) with
PYTHONPATH pointing at this checkout's src, through `setpriv`.
"""

from __future__ import annotations

import os
import pwd
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_vfio import EDU, edu_bdf, find, vfio_bound  # noqa: F401 (edu_bdf: the shared fixture)

from pcipass.lab import unprivileged

pytestmark = pytest.mark.lab

SRC = unprivileged.SRC
NOBODY = pwd.getpwnam("nobody")

# What the frontend runs as nobody: the edu driver against pcipass.domain.connect.
FRONTEND = r"""
import os, sys, time
from pcipass.domain import connect
from pcipass.device import IrqKind
from pcipass.drivers import edu as e

path, what = sys.argv[1], sys.argv[2]
dev = connect(path)
print("uid", os.getuid(), flush=True)
if what == "drive":
    for irq in (IrqKind.MSI, IrqKind.INTX):
        edu = e.Edu(dev, irq=irq, timeout=20)
        print("ident", hex(edu.ident().raw), flush=True)
        print("liveness", edu.liveness(0x12345678), flush=True)
        print("factorial", edu.factorial(12), flush=True)
        print("factorial-irq", irq.name, edu.factorial(12, use_irq=True), flush=True)
        data = os.urandom(4096)
        print("dma", irq.name, edu.dma_roundtrip(data) == data, flush=True)
        edu.close()
    print("mapped", dev.region(0).info.mappable, flush=True)
elif what == "decode-off":
    cmd = dev.config_read(4, 2)
    dev.config_write(4, 2, cmd | 0x6)
    dev.config_write(4, 2, 0)
    print("command", hex(dev.config_read(4, 2)), flush=True)
    print("id", hex(dev.region(0).read(0, 4)), flush=True)
    dev.config_write(0x10, 4, 0xFFFFFFFF)
    print("bar0-size-mask", hex(dev.config_read(0x10, 4)), flush=True)
elif what == "die-mid-dma":
    edu = e.Edu(dev, timeout=20)
    edu.enable_irq()
    buf = dev.dma_alloc(4096, dma_mask_bits=e.DMA_MASK_BITS)
    edu.bar.write(e.EDU_DMA_SRC, 8, buf.iova)
    edu.bar.write(e.EDU_DMA_DST, 8, e.DMA_BUFFER)
    edu.bar.write(e.EDU_DMA_COUNT, 8, e.DMA_CHUNK)  # QEMU 7.2 stops the VM on a DMA that reaches the last byte
    edu.bar.write(e.EDU_DMA_CMD, 8, e.EDU_DMA_CMD_START | e.EDU_DMA_CMD_IRQ)
    print("dma-started", flush=True)
    time.sleep(600)
"""


def as_nobody(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(unprivileged.command("nobody", *argv), env=unprivileged.environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def workdir():
    d = tempfile.mkdtemp(prefix="pcipass-domain-")
    os.chmod(d, 0o755)  # nobody must reach the socket inside (pytest's tmp dirs are 0700)
    script = Path(d) / "frontend.py"
    script.write_text(FRONTEND)
    os.chmod(script, 0o644)
    return Path(d)


class Backend:
    def __init__(self, bdf: str, sock: Path) -> None:
        self.sock = sock
        self.log = sock.with_suffix(".log")
        self._log = open(self.log, "w")
        env = {**os.environ, "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "pcipass", "serve", bdf, "--socket", str(sock),
                                      "--owner", "nobody", "--mode", "0600", "--trace"],
                                     env=env, stderr=self._log, stdout=self._log)
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert self.proc.poll() is None, f"the backend died: {self.text()}"
            assert time.monotonic() < deadline, "the backend did not start"
            time.sleep(0.1)

    def text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log.read_text()

    def stop(self) -> None:
        """Stop the backend for good: vfio-pci's unbind waits for every user of the device to close it."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(60)
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def backend(edu_bdf, workdir):
    b = Backend(edu_bdf, workdir / "edu.sock")
    yield b
    b.stop()


def run_frontend(workdir: Path, what: str, timeout: float = 300) -> dict[str, str]:
    proc = as_nobody(str(workdir / "frontend.py"), str(workdir / "edu.sock"), what)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    log = (workdir / "edu.log").read_text()[-3000:]
    assert proc.returncode == 0, f"frontend {what} failed:\n{out}\n{err}\nbackend log:\n{log}"
    # lines are "key value" or "key detail value"
    return {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in out.splitlines() if " " in line}


def test_socket_belongs_to_nobody_and_nobody_cannot_open_the_vfio_group(backend, edu_bdf, workdir):
    st = os.stat(backend.sock)
    assert st.st_uid == NOBODY.pw_uid and st.st_mode & 0o777 == 0o600
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{edu_bdf}/iommu_group"))
    probe = as_nobody("-c", f"open('/dev/vfio/{group}', 'r+b')")
    _, err = probe.communicate(timeout=60)
    assert probe.returncode != 0 and "PermissionError" in err


def test_edu_driver_as_nobody_through_the_socket(backend, workdir):
    got = run_frontend(workdir, "drive")
    assert got["uid"] == str(NOBODY.pw_uid)
    assert got["ident"] == "0x10000ed"
    assert got["liveness"] == "True"
    assert got["factorial"] == "479001600"
    assert got["factorial-irq MSI"] == "479001600" and got["factorial-irq INTX"] == "479001600"
    assert got["dma MSI"] == "True" and got["dma INTX"] == "True"
    assert got["mapped"] == "True"  # BAR0 reached through the sysfs resource fd the backend handed over
    text = backend.text()
    assert "DMA_MAP" in text and "SET_IRQS index 1" in text and "SET_IRQS index 0" in text


def test_killing_the_frontend_mid_dma_leaves_the_backend_serving(backend, workdir):
    proc = as_nobody(str(workdir / "frontend.py"), str(workdir / "edu.sock"), "die-mid-dma")
    try:
        seen = ""
        deadline = time.monotonic() + 300
        while "dma-started" not in seen:  # never block without a deadline
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, f"frontend: {seen}\nbackend: {backend.text()[-2000:]}"
            # os.read, not readline: a buffered readline may take several lines in and leave
            # select nothing to wake on
            if select.select([proc.stdout], [], [], min(left, 5))[0]:
                seen += os.read(proc.stdout.fileno(), 4096).decode()
        proc.kill()
    finally:
        proc.kill()
        proc.wait(30)
    deadline = time.monotonic() + 30
    while "client gone" not in backend.text().rsplit("DMA_MAP", 1)[-1]:
        assert time.monotonic() < deadline, backend.text()[-2000:]
        time.sleep(0.1)
    assert backend.proc.poll() is None
    got = run_frontend(workdir, "drive")  # the next client: the device works
    assert got["factorial-irq MSI"] == "479001600" and got["dma MSI"] == "True"


def test_policy_refuses_turning_off_memory_decode_and_the_trace_says_why(backend, workdir):
    got = run_frontend(workdir, "decode-off")
    assert int(got["command"], 16) & 0x2  # memory decode still on
    assert got["id"] == "0x10000ed"  # and the registers still answer
    assert got["bar0-size-mask"] == "0xfff00000"  # sizing through the virtual BAR
    text = backend.text()
    refused = [line for line in text.splitlines() if "REFUSED turning off" in line]
    assert refused and "memory decode" in refused[0] and "XSA-120" in refused[0], text[-3000:]
