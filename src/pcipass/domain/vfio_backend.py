"""Serving a real device: the vfio-user backend over pcipass.vfio.

- DMA: the client's memfds are mapped into the device's IOMMU domain at the
  client's addresses, so the device reaches exactly what the client mapped.
  A map without an fd (QEMU sends its ROMs that way, and refuses to start
  when one is refused) is accepted but left out of the IOMMU: the device
  cannot reach it, a DMA there faults as one to unmapped memory would.
- Interrupts: the client's eventfds go straight to VFIO_DEVICE_SET_IRQS, so
  a real MSI signals the frontend's eventfd with nothing copied in between.
- BARs: a memory BAR the kernel lets us mmap whole is offered to the client
  as the fd of its sysfs `resourceN` file (it maps that BAR and nothing else;
  never the VFIO device fd, which would let the client bypass the policy).
  The server reaches such a BAR through its own mapping of the same file,
  never through the VFIO fd: vfio-pci claims a BAR (request_mem_region) the
  first time it is accessed through VFIO, and on a kernel with
  CONFIG_IO_STRICT_DEVMEM (Debian's) the claim revokes every mapping of its
  `resourceN`, so the client's next access would be a SIGBUS (QEMU 11.1 died
  of it: on INTx it traps BAR accesses for a while, which came here by
  message). Everything else goes by messages through VFIO.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

from pcipass.device import IrqKind, MappedWindow, bus_master
from pcipass.domain import protocol as p
from pcipass.domain.backend import Backend, BackendError, ClientMapping, RegionDesc, set_irqs_kind
from pcipass.drivers import edu
from pcipass.errors import PcipassError

# Devices with no function reset whose BAR registers the server sets back itself between
# clients, as Linux's pci_dev_reset_methods table does for devices whose reset is missing:
# (vendor, device) -> what is done with BAR0.
REGISTER_RESETS: dict[tuple[int, int], Callable[[edu.Registers], None]] = {
    (edu.VENDOR_ID, edu.DEVICE_ID): edu.restore_registers,
}


class VfioBackend(Backend):
    without_fd = "not in the IOMMU: the device cannot reach it"

    def __init__(self, bdf: str, *, map_bars: bool = True, sysfs: str = "/sys") -> None:
        super().__init__()
        from pcipass import vfio

        self.dev = vfio.open_device(bdf)
        self.name = self.dev.name
        self.device_flags = self.dev.info.flags & (p.VFIO_DEVICE_FLAGS_PCI | p.VFIO_DEVICE_FLAGS_RESET)
        self._irqs_set: set[int] = set()
        self._resource_fds: dict[int, int] = {}
        self._bar_maps: dict[int, tuple[mmap.mmap, MappedWindow]] = {}  # the BARs offered by resource fd
        self._regions = self._describe_regions(Path(sysfs) / "bus/pci/devices" / self.dev.name, map_bars)
        self.config_size = self._regions[p.VFIO_PCI_CONFIG_REGION_INDEX].size
        ids = (self.dev.config_read(0, 2), self.dev.config_read(2, 2))
        self._restore_registers = REGISTER_RESETS.get(ids) if not self.dev.info.can_reset else None
        if self._restore_registers is not None:  # the first client too gets it as the next ones will
            self._stop_dma()
            self._restore_registers(self._bar0())

    def _describe_regions(self, sysdir: Path, map_bars: bool) -> dict[int, RegionDesc]:
        out = {}
        for i in range(max(self.dev.info.num_regions, p.VFIO_PCI_NUM_REGIONS)):
            try:
                info = self.dev.region_info(i)
            except PcipassError:
                out[i] = RegionDesc(i, 0, 0)
                continue
            flags = info.flags & (p.VFIO_REGION_INFO_FLAG_READ | p.VFIO_REGION_INFO_FLAG_WRITE)
            desc = RegionDesc(i, info.size, flags)
            whole = info.mmap_areas() == [(0, info.size)] and info.size >= mmap.PAGESIZE
            if map_bars and i < p.VFIO_PCI_ROM_REGION_INDEX and whole:
                opened = self._resource_fd(sysdir / f"resource{i}", info.size)
                if opened is not None:
                    fd, bar = opened
                    self._resource_fds[i] = fd
                    self._bar_maps[i] = bar, MappedWindow(bar, f"{self.name} BAR{i}")
                    desc = RegionDesc(i, info.size, flags | p.VFIO_REGION_INFO_FLAG_MMAP, fd, 0)
            out[i] = desc
        return out

    @staticmethod
    def _resource_fd(path: Path, size: int) -> tuple[int, mmap.mmap] | None:
        """An fd the client can mmap the BAR through, and the server's own mapping of it,
        if the kernel allows mapping it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < size:
                raise OSError(errno.EINVAL, "resource file smaller than the region")
            return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            os.close(fd)
            return None

    def regions(self) -> dict[int, RegionDesc]:
        return dict(self._regions)

    def config_read(self, offset: int, width: int) -> int:
        return self.dev.config_read(offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.dev.config_write(offset, width, value)

    def region_read(self, index: int, offset: int, width: int) -> int:
        bar = self._bar_maps.get(index)
        return bar[1].read(offset, width) if bar else self.dev.region(index).read(offset, width)

    def region_write(self, index: int, offset: int, width: int, value: int) -> None:
        bar = self._bar_maps.get(index)
        if bar:
            bar[1].write(offset, width, value)
        else:
            self.dev.region(index).write(offset, width, value)

    # --- DMA into the IOMMU domain ---
    def dma_mapped(self, m: ClientMapping) -> None:
        if m.fd is None:
            return  # nothing to give the IOMMU: kept out of the device's reach (handle stays None)
        try:
            m.handle = self.dev.map_dma(m.fd, m.offset, m.size, m.address,
                                        readable=bool(m.prot & p.VFIO_DMA_MAP_FLAG_READ),
                                        writable=bool(m.prot & p.VFIO_DMA_MAP_FLAG_WRITE))
        except PcipassError as exc:
            raise BackendError(errno.EINVAL, f"IOMMU map failed: {exc.message}") from None

    def dma_unmapped(self, m: ClientMapping) -> None:
        if m.handle is not None:
            self.dev.unmap_dma(m.address, m.size)

    # --- interrupts: the kernel signals the client's eventfds itself ---
    def irq_info(self, index: int) -> tuple[int, int]:
        if index >= self.dev.info.num_irqs:
            return 0, 0
        try:
            info = self.dev.irq_info(index)
        except PcipassError:
            return 0, 0
        return info.flags, info.count

    def set_irqs(self, req: p.IrqSet, fds: list[int]) -> None:
        """What vfio-pci takes by ioctl, from ACTIONS by (action, data type); the rest ENOTSUP."""
        try:
            served = self.ACTIONS.get(set_irqs_kind(req.flags))
            if served is None or not served[1](req.count):
                raise BackendError(errno.ENOTSUP, f"SET_IRQS flags {req.flags:#x} are not served for a real device")
            served[0](self, req, fds)
        except PcipassError as exc:
            raise BackendError(errno.EINVAL, exc.message) from None
        finally:
            for fd in fds:  # the kernel holds its own reference to each eventfd
                os.close(fd)
            fds.clear()

    def _set_triggers(self, req: p.IrqSet, fds: list[int]) -> None:
        if fds and len(fds) != req.count:
            raise BackendError(errno.EINVAL, f"{req.count} vectors but {len(fds)} eventfds")
        self.dev.set_irqs(req.index, req.start, list(fds) if fds else [None] * req.count)
        self._irqs_set.add(req.index)

    def _disable(self, req: p.IrqSet, fds: list[int]) -> None:
        self.dev.irq_disable(IrqKind(req.index))
        self._irqs_set.discard(req.index)

    def _unmask(self, req: p.IrqSet, fds: list[int]) -> None:
        self.dev.irq_unmask(IrqKind(req.index), req.start)

    # (action, data type) -> (handler, the vector counts it takes)
    ACTIONS: ClassVar[dict[tuple[int, int], tuple[Callable[..., None], Callable[[int], bool]]]] = {
        (p.VFIO_IRQ_SET_ACTION_TRIGGER, p.VFIO_IRQ_SET_DATA_EVENTFD): (_set_triggers, lambda count: True),
        (p.VFIO_IRQ_SET_ACTION_TRIGGER, p.VFIO_IRQ_SET_DATA_NONE): (_disable, lambda count: count == 0),
        (p.VFIO_IRQ_SET_ACTION_UNMASK, p.VFIO_IRQ_SET_DATA_NONE): (_unmask, lambda count: count == 1),
    }

    def reset(self) -> None:
        if self.dev.info.can_reset:
            self.dev.reset()
            return
        # No function reset: at least stop the device from mastering the bus, and set back the
        # registers of a device we know.
        self._stop_dma()
        if self._restore_registers is not None:
            self._restore_registers(self._bar0())

    def _bar0(self) -> SimpleNamespace:
        """BAR0's registers as the server reaches them (its own mapping, or VFIO)."""
        return SimpleNamespace(read=partial(self.region_read, 0), write=partial(self.region_write, 0))

    def client_gone(self) -> None:
        for index in sorted(self._irqs_set):
            try:
                self.dev.irq_disable(IrqKind(index))
            except PcipassError:
                pass
        self._irqs_set.clear()
        self._stop_dma()
        self.dma.end()
        self.reset()

    def _stop_dma(self) -> None:
        """Bus mastering off before the memory goes: nothing in flight lands after unmap."""
        bus_master(self.dev, False)

    def close(self) -> None:
        try:
            self.client_gone()
        finally:
            for bar, window in self._bar_maps.values():
                window.release()
                bar.close()
            self._bar_maps.clear()
            for fd in self._resource_fds.values():
                os.close(fd)
            self._resource_fds.clear()
            self.dev.close()
