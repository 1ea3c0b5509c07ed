"""The NVMe driver on the real kernel (the lab, as root): QEMU's NVMe controller through vfio-pci.

The controller is claimed with `pcipass claim` and given back with `pcipass
release`; whatever happens, the fixture leaves it on the kernel's nvme driver.
Data written through the driver is checked again through the kernel's own
block device once the controller is back.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_pci import PCI, driver, find, pcipass

from pcipass.drivers import nvme_cmd as cmd
from pcipass.drivers.nvme import NvmeController
from pcipass.drivers.nvme_regs import NVME_REG_CC, NVME_REG_CSTS
from pcipass.drivers.nvme_status import NvmeCommandError
from pcipass.errors import PcipassError
from pcipass.lab.topology import NVME_SERIAL, QEMU_NVME

pytestmark = pytest.mark.lab

QEMU_MODEL = "QEMU NVMe Ctrl"  # hw/nvme/ctrl.c
LAB_DISK_BYTES = 64 << 20  # the lab's backing image (pcipass.lab.topology)


def block_device(bdf: str) -> Path | None:
    """/dev/nvmeXn1 of the kernel's driver on `bdf`, once it has probed the namespace."""
    for ns in sorted((PCI / bdf).glob("nvme/nvme*/nvme*n1")):
        if Path("/dev", ns.name).exists():
            return Path("/dev", ns.name)
    return None


def wait_for(predicate, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            return result
        time.sleep(0.2)
    return result


def msix_interrupts(bdf: str) -> dict[str, int]:
    """vfio-msix lines of /proc/interrupts for `bdf`: name -> count summed over CPUs."""
    counts = {}
    with open("/proc/interrupts") as f:
        cpus = len(f.readline().split())
        for line in f:
            fields = line.split()
            name = fields[-1]
            if name.startswith("vfio-msix") and bdf in name:
                counts[name] = sum(int(x) for x in fields[1 : 1 + cpus])
    return counts


@contextlib.contextmanager
def claimed(bdf: str, state: Path) -> Iterator[None]:
    """`pcipass claim` the controller for vfio; `pcipass release` it, or force it back."""
    env = dict(os.environ, PCIPASS_STATE_DIR=str(state))
    done = pcipass("claim", bdf, env=env)
    assert done.returncode == 0, done.stderr
    try:
        assert driver(bdf) == "vfio-pci"
        yield
    finally:
        done = pcipass("release", bdf, env=env)
        if driver(bdf) != "nvme":  # the safety net: never leave the lab without its disk
            with contextlib.suppress(OSError):
                (PCI / bdf / "driver_override").write_text("\n")
                if driver(bdf):
                    (PCI / bdf / "driver" / "unbind").write_text(bdf)
                Path("/sys/bus/pci/drivers_probe").write_text(bdf)
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def nvme_bdf() -> str:
    found = find(QEMU_NVME)
    if not found:
        pytest.skip("no QEMU NVMe controller (1b36:0010) in this topology")
    bdf = found[0]
    assert wait_for(lambda: block_device(bdf)), (
        "the kernel's nvme driver never showed the namespace"
    )
    return bdf


def test_identify_write_read_back_with_msix_then_the_kernel_sees_the_data(nvme_bdf, tmp_path):
    from pcipass.vfio import open_device

    bdf = nvme_bdf
    data = os.urandom(64 * 4096)  # 256 KiB: 64 pages, so PRP2 points to a PRP list
    small = os.urandom(3 * 512)  # three blocks of 512 bytes, two pages at most
    with claimed(bdf, tmp_path / "state"):
        device = open_device(bdf)
        try:
            before = msix_interrupts(bdf)
            with NvmeController(device) as nvme:
                assert nvme.id_ctrl is not None and nvme.namespace is not None
                assert nvme.id_ctrl.model == QEMU_MODEL
                assert nvme.id_ctrl.serial == NVME_SERIAL
                assert nvme.id_ctrl.vid == 0x1B36
                assert nvme.namespace.size_bytes == LAB_DISK_BYTES
                assert nvme.interrupt_mode == "MSI-X"
                block = nvme.block_size
                lba = (8 << 20) // block  # 8 MiB in: away from any partition table
                nvme.write(lba, data)
                assert nvme.read(lba, len(data) // block) == data
                nvme.write(100, small)
                assert nvme.read(100, 3) == small
                # Every I/O completion came with its MSI-X interrupt, none by polling.
                assert nvme.io is not None
                assert nvme.io.stats.completed == 4
                assert nvme.io.stats.by_interrupt == 4 and nvme.io.stats.by_polling == 0
                after = msix_interrupts(bdf)
                io_vector = next(name for name in after if "msix[1]" in name)
                assert after[io_vector] - before.get(io_vector, 0) >= 4, (before, after)
                bar = nvme.bar
            # After close: shut down and disabled (CSTS.RDY clear, CC.EN clear).
            assert bar.read(NVME_REG_CSTS, 4) & 1 == 0
            assert bar.read(NVME_REG_CC, 4) & 1 == 0
        finally:
            device.close()
    assert driver(bdf) == "nvme"
    disk = wait_for(lambda: block_device(bdf))
    assert disk, "the namespace did not come back on the kernel's nvme driver"
    with open(disk, "rb") as f:
        f.seek(8 << 20)
        assert f.read(len(data)) == data
        f.seek(100 * 512)
        assert f.read(len(small)) == small


def test_errors_from_the_controller_are_decoded(nvme_bdf, tmp_path):
    from pcipass.vfio import open_device

    bdf = nvme_bdf
    with claimed(bdf, tmp_path / "state"):
        device = open_device(bdf)
        try:
            with NvmeController(device, interrupts=False) as nvme:
                assert nvme.namespace is not None and nvme.interrupt_mode.startswith("polling")
                end = nvme.namespace.nsze
                # The driver refuses a range past the end before the controller sees it ...
                with pytest.raises(PcipassError, match="outside namespace 1"):
                    nvme.read(end, 1)
                # ... and when sent anyway, the controller's answer is decoded.
                buffer = device.dma_alloc(4096)
                try:
                    with pytest.raises(NvmeCommandError) as err:
                        nvme.io_command(
                            cmd.read_write(cmd.nvme_cmd_read, 1, end, 1, buffer.iova, 0)
                        )
                finally:
                    device.dma_free(buffer)
                assert err.value.status.sc == 0x80 and "LBA out of range" in err.value.message
                assert nvme.read(0, 1)  # the queue still works afterwards
        finally:
            device.close()
    assert driver(bdf) == "nvme"


def test_drive_nvme_verb_identifies_writes_and_hexdumps(nvme_bdf, tmp_path):
    bdf = nvme_bdf
    env = dict(os.environ, PCIPASS_STATE_DIR=str(tmp_path / "state"))
    payload = tmp_path / "payload"
    payload.write_bytes(b"pcipass nvme lab" * 32 + os.urandom(512))
    with claimed(bdf, tmp_path / "state"):
        done = pcipass("drive", "nvme", bdf, env=env)
        assert done.returncode == 0, done.stderr
        assert QEMU_MODEL in done.stdout and NVME_SERIAL in done.stdout and "MSI-X" in done.stdout
        done = pcipass("drive", "nvme", bdf, "--write", "200", "--data", str(payload), env=env)
        assert done.returncode == 0, done.stderr
        assert "wrote 2 block(s) at LBA 200 (1024 bytes)" in done.stdout
        done = pcipass("drive", "nvme", bdf, "--read", "200", "--count", "2", env=env)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == (
            "00019000  70 63 69 70 61 73 73 20  6e 76 6d 65 20 6c 61 62  |pcipass nvme lab|"
        )
        assert lines[1] == "*" and lines[-1] == "00019400"
        done = pcipass("drive", "nvme", bdf, "--read", "0", "--count", "0", env=env)
        assert done.returncode == 2 and "--count 0 is out of range" in done.stderr
    assert driver(bdf) == "nvme"
