"""`pcipass serve BDF` on the real edu, client after client (the lab, as root).

One server for the whole module. A first client runs the edu driver and disconnects
cleanly, a second is killed (SIGKILL) with a DMA of the device's running, a third starts
after it; then 20 more in a row. Between clients the server is checked from its side
(/proc/PID/fd and /proc/PID/maps: the client's memfd mappings gone, the fds and the
BAR mappings as they were before the first client came) and from the kernel's and the
device's (no vfio interrupt left in /proc/interrupts, bus mastering and MSI off in
config space, the edu registers at their power-on values), and a DMA to an address the
killed client had mapped faults in the IOMMU.

QEMU's edu has no reset of its own (no FLR, no reset handler): the server sets its
registers back itself (pcipass.drivers.edu.restore_registers, through the backend's
table of register resets). The factorial register and the DMA command's direction and
IRQ bits cannot be written back; of those the test checks only that nothing is running.

The server logs "client gone" only after everything of the client is released and the
device is reset, and before it closes the connection: the test waits for that line
(bounded), then for the client's connection to close, which the server does just after the
line (bounded too), and then reads /proc once, without retrying.

The module runs twice (the `iommu_mode` fixture): through the container on Debian's kernel,
and through cdev + IOMMUFD on the lab kernel `iommufd`, where the clients' memfds are mapped
into the server's IOAS with IOMMU_IOAS_MAP.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from guest_pci import iommu_mode_fixture
from test_domain import Backend, as_nobody
from test_vfio import edu_bdf  # noqa: F401 (the module's fixture: the standalone edu on vfio-pci)

from pcipass import pci
from pcipass.domain import connect
from pcipass.drivers import edu as e

pytestmark = pytest.mark.lab
iommu_mode = iommu_mode_fixture("debian-container", "iommufd-iommufd")

# Each client prints "key value" lines; "regs" is the edu's registers as it found them.
FRONTEND = r"""
import os, sys, time
from pcipass import pci
from pcipass.domain import connect
from pcipass.drivers import edu as e

path, what = sys.argv[1], sys.argv[2:]
dev = connect(path)
bar = dev.region(0)
regs = {name: bar.read(off, 8 if off >= e.EDU_DMA_SRC else 4) for name, off in (
    ("liveness", e.EDU_LIVENESS), ("status", e.EDU_STATUS), ("irq-status", e.EDU_IRQ_STATUS),
    ("dma-src", e.EDU_DMA_SRC), ("dma-dst", e.EDU_DMA_DST), ("dma-count", e.EDU_DMA_COUNT),
    ("dma-cmd", e.EDU_DMA_CMD))}
print("regs", ",".join(f"{k}={v:#x}" for k, v in regs.items()), flush=True)
print("command", hex(dev.config_read(pci.PCI_COMMAND, 2)), flush=True)
if what[0] == "drive":
    edu = e.Edu(dev, timeout=30)
    print("factorial", edu.factorial(10, use_irq=True), flush=True)
    data = os.urandom(2048)
    print("dma", edu.dma_roundtrip(data) == data, flush=True)
    dev.close()
elif what[0] == "die-mid-dma":
    edu = e.Edu(dev, timeout=30)
    edu.enable_irq()
    buf = dev.dma_alloc(4096, dma_mask_bits=e.DMA_MASK_BITS)
    print("iova", hex(buf.iova), flush=True)
    edu.bar.write(e.EDU_DMA_SRC, 8, buf.iova)
    edu.bar.write(e.EDU_DMA_DST, 8, e.DMA_BUFFER)
    edu.bar.write(e.EDU_DMA_COUNT, 8, e.DMA_CHUNK)
    edu.bar.write(e.EDU_DMA_CMD, 8, e.EDU_DMA_CMD_START | e.EDU_DMA_CMD_IRQ)
    print("dma-started", flush=True)
    time.sleep(600)
elif what[0] == "stale-dma":  # a DMA from where the killed client's buffer was
    edu = e.Edu(dev, timeout=30)
    edu.dma_to_device(int(what[1], 16), 256)  # completes (edu raises its interrupt) with nothing read
    print("stale-dma done", flush=True)
    dev.close()
"""

POWER_ON_REGS = "liveness=0x0,status=0x0,irq-status=0x0,dma-src=0x0,dma-dst=0x0,dma-count=0x0"
MORE_CLIENTS = 20
WARM_UP = 5  # clients after which the server's memory must not grow any more
GONE_TIMEOUT = 60


@dataclass
class ServerState:
    """What the server process holds, from /proc."""

    fds: list[str]  # readlink of every fd, sorted
    memfd_maps: list[str]  # mappings of a client's memory
    bar_maps: list[str]  # mappings of a sysfs resource file or of the VFIO device
    map_count: int
    vm_size_kb: int
    vm_rss_kb: int

    @classmethod
    def read(cls, pid: int) -> ServerState:
        fds = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except FileNotFoundError:  # closed between listdir and readlink
                pass
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return cls(sorted(fds), [m for m in maps if "memfd:" in m],
                   [m for m in maps if re.search(r"/resource\d|/dev/vfio|vfio-device", m)], len(maps),
                   int(status["VmSize"].split()[0]), int(status["VmRSS"].split()[0]))


def config_space(bdf: str) -> bytes:
    return Path(f"/sys/bus/pci/devices/{bdf}/config").read_bytes()


def msi_control(config: bytes) -> int:
    read = lambda off, width: int.from_bytes(config[off : off + width], "little")  # noqa: E731
    cap = pci.find_capability(read, pci.PCI_CAP_ID_MSI)
    assert cap is not None, "edu has an MSI capability"
    return read(cap.offset + pci.PCI_MSI_FLAGS, 2)


def vfio_interrupts(bdf: str) -> list[str]:
    return [line for line in Path("/proc/interrupts").read_text().splitlines() if "vfio" in line and bdf in line]


def iommu_faults() -> list[str]:
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    return [line for line in log.splitlines() if "DMAR" in line and "fault addr" in line]


@dataclass
class Served:
    bdf: str
    backend: Backend
    workdir: Path
    idle: ServerState
    idle_config: bytes
    said: int = 0  # "client gone" lines in the server's log when the current client started

    @property
    def pid(self) -> int:
        return self.backend.proc.pid

    def client_starts(self) -> None:
        self.said = self.backend.text().count("client gone")

    def wait_gone(self) -> ServerState:
        """Wait (bounded) for the server's "client gone" line for the current client; its state right then."""
        deadline = time.monotonic() + GONE_TIMEOUT
        while self.backend.text().count("client gone") <= self.said:
            assert self.backend.proc.poll() is None, f"the server died:\n{self.backend.text()[-3000:]}"
            assert time.monotonic() < deadline, f"the client is not gone:\n{self.backend.text()[-3000:]}"
            time.sleep(0.05)
        # The line comes just before the server closes the client's connection (server.py says
        # so): wait, bounded, for that socket to go, then read /proc once for the rest.
        sockets = sum(fd.startswith("socket:") for fd in self.idle.fds)
        while sum(fd.startswith("socket:") for fd in ServerState.read(self.pid).fds) > sockets:
            if time.monotonic() > deadline:
                break  # check_idle names the socket left open
            time.sleep(0.05)
        return ServerState.read(self.pid)

    def check_idle(self, state: ServerState, who: str) -> None:
        """The server holds what it held before the first client; the device is quiet."""
        assert state.memfd_maps == [], f"after {who}: client memory still mapped: {state.memfd_maps}"
        assert state.fds == self.idle.fds, f"after {who}: fds {state.fds}, idle {self.idle.fds}"
        assert state.bar_maps == self.idle.bar_maps, f"after {who}: {state.bar_maps}, idle {self.idle.bar_maps}"
        assert vfio_interrupts(self.bdf) == [], f"after {who}: {vfio_interrupts(self.bdf)}"
        config = config_space(self.bdf)
        command = int.from_bytes(config[pci.PCI_COMMAND : pci.PCI_COMMAND + 2], "little")
        idle_command = int.from_bytes(self.idle_config[pci.PCI_COMMAND : pci.PCI_COMMAND + 2], "little")
        assert not command & pci.PCI_COMMAND_MASTER, f"after {who}: bus mastering left on ({command:#x})"
        assert command == idle_command, f"after {who}: command {command:#x}, idle {idle_command:#x}"
        assert not msi_control(config) & pci.PCI_MSI_FLAGS_ENABLE, f"after {who}: MSI left enabled"


def run_client(s: Served, *what: str, timeout: float = 300) -> dict[str, str]:
    s.client_starts()
    proc = as_nobody(str(s.workdir / "frontend.py"), str(s.backend.sock), *what)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"client {what} failed:\n{out}\n{err}\nserver:\n{s.backend.text()[-3000:]}"
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def check_power_on(got: dict[str, str], who: str) -> None:
    """What a client found: the edu's registers as at power-on, nothing running, no DMA."""
    regs = dict(kv.split("=") for kv in got["regs"].split(","))
    assert got["regs"].startswith(POWER_ON_REGS), f"{who} found {got['regs']}"
    assert not int(regs["dma-cmd"], 16) & e.EDU_DMA_CMD_START, f"{who} found a DMA running: {got['regs']}"
    assert not int(got["command"], 16) & pci.PCI_COMMAND_MASTER, f"{who} found bus mastering on"


@pytest.fixture(scope="module")
def served(edu_bdf, iommu_mode):  # noqa: F811 (the imported fixture)
    workdir = Path(tempfile.mkdtemp(prefix="pcipass-clients-"))
    os.chmod(workdir, 0o755)  # nobody must reach the socket inside
    script = workdir / "frontend.py"
    script.write_text(FRONTEND)
    os.chmod(script, 0o644)
    backend = Backend(edu_bdf, workdir / "edu.sock")
    try:
        # "serving ... (VFIO backend KIND)" comes just after the socket is bound
        deadline = time.monotonic() + 30
        while "pcipass: serving" not in backend.text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"(VFIO backend {iommu_mode})" in backend.text(), backend.text()[-2000:]
        yield Served(edu_bdf, backend, workdir, ServerState.read(backend.proc.pid), config_space(edu_bdf))
    finally:
        backend.stop()


def test_first_client_drives_the_edu_and_disconnects_cleanly(served, iommu_mode):
    # the server's address space: /dev/iommu (an IOAS) or the container /dev/vfio/vfio
    node = {"iommufd": "/dev/iommu", "container": "/dev/vfio/vfio"}[iommu_mode]
    assert node in served.idle.fds, served.idle.fds
    got = run_client(served, "drive")
    check_power_on(got, "the first client")
    assert got["factorial"] == "3628800" and got["dma"] == "True"
    served.check_idle(served.wait_gone(), "the first client")
    assert "DMA_MAP" in served.backend.text() and "SET_IRQS index 1" in served.backend.text()


def test_second_client_killed_mid_dma_and_the_third_finds_the_device_reset(served):
    served.client_starts()
    proc = as_nobody(str(served.workdir / "frontend.py"), str(served.backend.sock), "die-mid-dma")
    seen = ""
    try:
        deadline = time.monotonic() + 300
        while "dma-started" not in seen:  # never block without a deadline
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, f"client: {seen}\nserver: {served.backend.text()[-2000:]}"
            # os.read, not readline: a buffered readline may take several lines in and leave
            # select nothing to wake on
            if select.select([proc.stdout], [], [], min(left, 5))[0]:
                seen += os.read(proc.stdout.fileno(), 4096).decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    got = dict(line.split(" ", 1) for line in seen.splitlines() if " " in line)
    check_power_on(got, "the second client")
    served.check_idle(served.wait_gone(), "the killed client")

    faults_before = iommu_faults()
    third = run_client(served, "stale-dma", got["iova"])
    check_power_on(third, "the third client")
    assert third["stale-dma"] == "done"
    served.check_idle(served.wait_gone(), "the third client")
    # The killed client's mapping is out of the IOMMU: the device's read of it faulted.
    page = int(got["iova"], 16) & ~0xFFF
    new = iommu_faults()[len(faults_before):]
    assert any(f"fault addr {page:#x}" in line or f"fault addr {page:x}" in line for line in new), (new, page)


def test_twenty_clients_in_a_row_leave_the_server_as_it_was(served):
    """In this process (no interpreter start per client): each maps DMA memory and its BAR,
    takes MSI, runs a factorial and a DMA, keeps one DMA buffer mapped, and disconnects: half
    close (unmapping and disabling first), half just drop the connection."""
    states = []
    for n in range(MORE_CLIENTS):
        served.client_starts()
        dev = connect(served.backend.sock)
        regs = dev.region(0)
        assert (regs.read(e.EDU_IRQ_STATUS, 4), regs.read(e.EDU_LIVENESS, 4)) == (0, 0), f"client {n}"
        edu = e.Edu(dev, timeout=30)
        assert edu.factorial(5, use_irq=True) == 120
        data = os.urandom(512)
        assert edu.dma_roundtrip(data) == data
        dev.dma_alloc(4096, dma_mask_bits=e.DMA_MASK_BITS)  # still mapped when the client goes
        if n % 2:
            dev.close()
        else:  # gone without a word: the connection ends, its memory and eventfds stay with it
            dev._sock.shutdown(socket.SHUT_RDWR)  # noqa: SLF001 (the connection alone, as a crash would)
        state = served.wait_gone()
        served.check_idle(state, f"client {n + 4}")
        states.append(state)
        if not n % 2:
            dev.close()  # now the rest of it, after the server has let go
    warm = states[WARM_UP - 1]
    for n, st in enumerate(states[WARM_UP:], WARM_UP):
        where = f"client {n + 4}: {st.map_count} maps, VmSize {st.vm_size_kb} kB, VmRSS {st.vm_rss_kb} kB; " \
                f"after the warm-up {warm.map_count}, {warm.vm_size_kb} kB, {warm.vm_rss_kb} kB"
        assert st.map_count <= warm.map_count and st.vm_size_kb <= warm.vm_size_kb, where
        assert st.vm_rss_kb <= warm.vm_rss_kb + 256, where  # a few pages of Python's heap come and go
    print("server after each client (maps, VmSize kB, VmRSS kB):",
          [(st.map_count, st.vm_size_kb, st.vm_rss_kb) for st in states])
