"""VfioBackend without a kernel: a stand-in for pcipass.vfio's VfioDevice, a file as `resource0`.

What QEMU 11.1 found against the lab's real edu, kept here: a BAR offered to the
client as its sysfs `resource` fd is reached by the server through the same
file, never through VFIO (vfio-pci would claim the BAR and, with
CONFIG_IO_STRICT_DEVMEM, revoke the client's mapping: SIGBUS); a DMA_MAP
without an fd is accepted and kept out of the IOMMU.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import pytest

from pcipass import pci, vfio
from pcipass.domain import protocol as p
from pcipass.domain.vfio_backend import VfioBackend
from pcipass.drivers import edu
from pcipass.vfio.region import VfioRegionInfo

BDF = "0000:00:10.0"
BAR0_SIZE = 0x4000
READ_WRITE_MMAP = (p.VFIO_REGION_INFO_FLAG_READ | p.VFIO_REGION_INFO_FLAG_WRITE
                   | p.VFIO_REGION_INFO_FLAG_MMAP)


@dataclass
class FakeRegion:
    index: int
    accesses: list[tuple[int, str, int, int]]

    def read(self, offset: int, width: int) -> int:
        self.accesses.append((self.index, "read", offset, width))
        return 0x5A

    def write(self, offset: int, width: int, value: int) -> None:
        self.accesses.append((self.index, "write", offset, width))


@dataclass
class FakeInfo:
    flags: int = p.VFIO_DEVICE_FLAGS_PCI
    num_regions: int = p.VFIO_PCI_NUM_REGIONS
    num_irqs: int = 5
    can_reset: bool = False


@dataclass
class FakeDevice:
    """The parts of pcipass.vfio.VfioDevice the backend uses."""

    name: str = BDF
    info: FakeInfo = field(default_factory=FakeInfo)
    accesses: list[tuple[int, str, int, int]] = field(default_factory=list)
    dma: list[tuple[int, int]] = field(default_factory=list)
    config: bytearray = field(default_factory=lambda: bytearray(256))

    def region_info(self, index: int) -> VfioRegionInfo:
        sizes = {0: BAR0_SIZE, 2: 0x1000, p.VFIO_PCI_CONFIG_REGION_INDEX: 256}
        size = sizes.get(index, 0)
        flags = READ_WRITE_MMAP if index in (0, 2) else p.VFIO_REGION_INFO_FLAG_READ
        return VfioRegionInfo(index, size, True, True, index in (0, 2), flags)

    def region(self, index: int) -> FakeRegion:
        return FakeRegion(index, self.accesses)

    def config_read(self, offset: int, width: int) -> int:
        return int.from_bytes(self.config[offset:offset + width], "little")

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.config[offset:offset + width] = value.to_bytes(width, "little")

    def map_dma(self, fd: int, offset: int, size: int, iova: int, readable: bool = True,
                writable: bool = True) -> object:
        self.dma.append((iova, size))
        return object()

    def unmap_dma(self, iova: int, size: int) -> None:
        self.dma.remove((iova, size))

    def close(self) -> None:
        pass


@pytest.fixture
def backend(tmp_path, monkeypatch):
    device = FakeDevice()
    monkeypatch.setattr(vfio, "open_device", lambda bdf: device)
    sysdir = tmp_path / "bus/pci/devices" / BDF
    sysdir.mkdir(parents=True)
    (sysdir / "resource0").write_bytes(bytes(BAR0_SIZE))  # BAR2 has no resource file: not offered
    b = VfioBackend(BDF, sysfs=str(tmp_path))
    yield b, device, sysdir / "resource0"
    b.close()


def test_a_bar_offered_by_resource_fd_is_reached_through_it_never_through_vfio(backend):
    b, device, resource = backend
    regions = b.regions()
    assert regions[0].fd is not None and regions[0].flags & p.VFIO_REGION_INFO_FLAG_MMAP
    assert regions[2].fd is None and not regions[2].flags & p.VFIO_REGION_INFO_FLAG_MMAP
    b.region_write(0, 8, 4, 0x12345678)
    with open(resource, "rb") as f:  # the file the client maps saw the write
        assert f.read(12)[8:] == (0x12345678).to_bytes(4, "little")
    assert b.region_read(0, 8, 4) == 0x12345678
    client = mmap.mmap(regions[0].fd, BAR0_SIZE)  # what the client maps: the same bytes
    assert int.from_bytes(client[8:12], "little") == 0x12345678
    client.close()
    # BAR2 is not offered: by VFIO. BAR0 never was.
    assert b.region_read(2, 0, 4) == 0x5A
    assert device.accesses == [(2, "read", 0, 4)]


def test_a_dma_map_without_an_fd_is_accepted_and_kept_out_of_the_iommu(backend):
    b, device, _ = backend
    memfd = os.memfd_create("ram")
    os.ftruncate(memfd, 0x2000)
    b.dma.map(0xFFFC0000, 0x40000, p.VFIO_DMA_MAP_FLAG_READ, None, 0)  # a ROM, as QEMU sends it
    b.dma.map(0x0, 0x2000, p.VFIO_DMA_MAP_FLAG_READ | p.VFIO_DMA_MAP_FLAG_WRITE, memfd, 0)
    assert device.dma == [(0x0, 0x2000)]
    assert [(m.address, m.fd is None) for m in b.dma.maps] == [(0x0, False), (0xFFFC0000, True)]
    b.dma.unmap(0xFFFC0000, 0x40000)
    b.dma.unmap(0x0, 0x2000)
    assert device.dma == []
    assert "cannot reach" in b.without_fd


def _edu_backend(tmp_path, monkeypatch, ids: tuple[int, int]) -> tuple[VfioBackend, FakeDevice, bytes]:
    device = FakeDevice()
    device.config[0:4] = ids[0].to_bytes(2, "little") + ids[1].to_bytes(2, "little")
    device.config[pci.PCI_COMMAND] = pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER
    monkeypatch.setattr(vfio, "open_device", lambda bdf: device)
    sysdir = tmp_path / "bus/pci/devices" / BDF
    sysdir.mkdir(parents=True)
    left = bytearray(BAR0_SIZE)  # what the last driver left in the registers
    for reg, width in ((edu.EDU_LIVENESS, 4), (edu.EDU_STATUS, 4), (edu.EDU_DMA_SRC, 8), (edu.EDU_DMA_DST, 8),
                       (edu.EDU_DMA_COUNT, 8)):
        left[reg : reg + width] = (0x80 if reg == edu.EDU_STATUS else 0x1234).to_bytes(width, "little")
    (sysdir / "resource0").write_bytes(left)
    return VfioBackend(BDF, sysfs=str(tmp_path)), device, sysdir / "resource0"


def test_an_edu_without_a_function_reset_gets_its_registers_written_back_at_open_and_after_each_client(
        tmp_path, monkeypatch):
    b, device, resource = _edu_backend(tmp_path, monkeypatch, (edu.VENDOR_ID, edu.DEVICE_ID))
    try:
        def regs() -> dict[int, int]:
            data = resource.read_bytes()  # a plain file keeps what was written, as written
            return {reg: int.from_bytes(data[reg : reg + width], "little") for reg, width in (
                (edu.EDU_LIVENESS, 4), (edu.EDU_STATUS, 4), (edu.EDU_IRQ_ACK, 4), (edu.EDU_DMA_SRC, 8),
                (edu.EDU_DMA_DST, 8), (edu.EDU_DMA_COUNT, 8))}

        written_back = {edu.EDU_LIVENESS: 0xFFFFFFFF, edu.EDU_STATUS: 0, edu.EDU_IRQ_ACK: 0xFFFFFFFF,
                        edu.EDU_DMA_SRC: 0, edu.EDU_DMA_DST: 0, edu.EDU_DMA_COUNT: 0}
        assert regs() == written_back  # at open: the first client finds it as the next ones will
        assert not device.config[pci.PCI_COMMAND] & pci.PCI_COMMAND_MASTER
        b.region_write(0, edu.EDU_LIVENESS, 4, 0x55)
        b.region_write(0, edu.EDU_STATUS, 4, edu.EDU_STATUS_IRQFACT)
        device.config[pci.PCI_COMMAND] |= pci.PCI_COMMAND_MASTER
        b.client_gone()
        assert regs() == written_back
        assert not device.config[pci.PCI_COMMAND] & pci.PCI_COMMAND_MASTER
        assert device.accesses == []  # all through the BAR's own mapping, none through VFIO
    finally:
        b.close()


def test_a_device_the_backend_does_not_know_keeps_its_registers(tmp_path, monkeypatch):
    b, device, resource = _edu_backend(tmp_path, monkeypatch, (0x1234, 0x5678))
    try:
        before = resource.read_bytes()
        b.client_gone()
        assert resource.read_bytes() == before
        assert not device.config[pci.PCI_COMMAND] & pci.PCI_COMMAND_MASTER  # still: no bus mastering
    finally:
        b.close()
