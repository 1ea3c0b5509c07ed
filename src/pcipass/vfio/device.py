"""An open VFIO device: pcipass.device.Device over the kernel's vfio-pci."""

from __future__ import annotations

import ctypes
import errno
import mmap
import uuid
from dataclasses import dataclass
from typing import Any

from pcipass import device, pci
from pcipass.device import EventFd, IrqKind
from pcipass.errors import PcipassError
from pcipass.vfio import uapi
from pcipass.vfio.container import Container, parse_vf_token
from pcipass.vfio.dma import DmaMapping
from pcipass.vfio.region import VfioRegion, VfioRegionInfo, parse_region_info
from pcipass.vfio.syscalls import call, ioctl_error


@dataclass(frozen=True)
class VfioDeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & uapi.VFIO_DEVICE_FLAGS_RESET)


@dataclass(frozen=True)
class VfioIrqInfo:
    index: int
    count: int
    flags: int

    @property
    def eventfd(self) -> bool:
        return bool(self.flags & uapi.VFIO_IRQ_INFO_EVENTFD)

    @property
    def maskable(self) -> bool:
        return bool(self.flags & uapi.VFIO_IRQ_INFO_MASKABLE)

    @property
    def automasked(self) -> bool:
        return bool(self.flags & uapi.VFIO_IRQ_INFO_AUTOMASKED)


@dataclass(frozen=True)
class DependentDevice:
    """A device that a hot reset of this one would reset too.

    The kernel names it by its IOMMU group (`group_id`) for a device opened through its
    group, and by its IOMMUFD device id for one opened through its cdev
    (VFIO_PCI_HOT_RESET_FLAG_DEV_ID): then `group_id` is None and `devid` is the id
    VFIO_DEVICE_BIND_IOMMUFD gave it, VFIO_PCI_DEVID_OWNED (0: not bound here, but in a
    group this IOMMUFD holds) or VFIO_PCI_DEVID_NOT_OWNED (-1)."""

    group_id: int | None
    segment: int
    bus: int
    devfn: int
    devid: int | None = None

    @property
    def bdf(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"


class VfioDevice:
    """A PCI device opened through the kernel's VFIO. Use `pcipass.vfio.open_device(bdf)`."""

    def __init__(self, name: str, fd: int, container: Container, token: Any, *, use_mmap: bool = True,
                 owns_container: bool = False) -> None:
        self.name = name
        self.fd = fd
        self.container = container
        self.kernel = container.kernel
        self.use_mmap = use_mmap
        self._token = token
        self._owns_container = owns_container
        self._regions: dict[int, VfioRegion] = {}
        self._irqs: dict[IrqKind, list[EventFd]] = {}
        self._closed = False
        container.devices.add(self)
        info = uapi.vfio_device_info.new()
        self._call(uapi.VFIO_DEVICE_GET_INFO, "VFIO_DEVICE_GET_INFO", info)
        self.info = VfioDeviceInfo(int(info.flags), int(info.num_regions), int(info.num_irqs))
        if not self.info.flags & uapi.VFIO_DEVICE_FLAGS_PCI:
            raise PcipassError(f"{name} is not a vfio-pci device", hint="pcipass drives PCI devices only",
                               code="vfio-not-pci")
        self._config = VfioRegion(fd, self.region_info(uapi.VFIO_PCI_CONFIG_REGION_INDEX), f"{name} config",
                                  use_mmap=False, kernel=self.kernel)

    def __repr__(self) -> str:
        return f"<VfioDevice {self.name} via {self.container.kind}>"

    def _call(self, request: int, name: str, arg: Any = 0) -> int:
        return call(self.kernel, self.fd, request, name, self.name, arg)

    # ---- config space
    def config_read(self, offset: int, width: int) -> int:
        return self._config.read(offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self._config.write(offset, width, value)

    def capabilities(self) -> list[pci.Capability]:
        """The standard then the extended capabilities, walked and named (pcipass.pci)."""
        caps = list(pci.capabilities(self.config_read))
        if self._config.info.size > pci.PCI_CFG_SPACE_SIZE:
            caps += list(pci.extended_capabilities(self.config_read))
        return caps

    def bus_master(self, on: bool = True) -> None:
        device.bus_master(self, on)

    # ---- regions
    def region_info(self, index: int) -> VfioRegionInfo:
        """VFIO_DEVICE_GET_REGION_INFO with its capability chain (asked again if it did not fit)."""
        size = ctypes.sizeof(uapi.vfio_region_info)
        for _ in range(2):
            buf = bytearray(size)
            head = uapi.vfio_region_info.new(index=index)
            head.argsz = size
            buf[: ctypes.sizeof(head)] = bytes(head)
            try:
                self.kernel.ioctl(self.fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
            except OSError as err:
                raise ioctl_error("VFIO_DEVICE_GET_REGION_INFO", f"{self.name} region {index}", err) from None
            needed = uapi.decode_u32(buf)
            if needed <= size:
                break
            size = needed
        return parse_region_info(buf)

    def region(self, index: int) -> VfioRegion:
        region = self._regions.get(index)
        if region is None:
            if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
                return self._config
            info = self.region_info(index)
            if not info.size:
                raise PcipassError(f"{self.name} has no region {index} (BAR not implemented)",
                                   hint="see `device.region_info(i)` for each region", code="vfio-no-region")
            region = self._regions[index] = VfioRegion(self.fd, info, f"{self.name} region {index}",
                                                       use_mmap=self.use_mmap, kernel=self.kernel)
        return region

    def mmap_region(self, index: int, offset: int, size: int) -> mmap.mmap:
        """A fresh mmap of an mmap-able area of a region (the caller closes it)."""
        return self.region(index).mmap_area(offset, size)

    # ---- DMA
    def dma_alloc(self, size: int, *, dma_mask_bits: int = 64) -> device.SharedDmaBuffer:
        return self.container.dma_alloc(size, dma_mask_bits=dma_mask_bits, owner=self)

    def dma_free(self, buffer: device.DmaBuffer) -> None:
        self.container.dma_free(buffer)

    def map_dma(self, fd_or_mmap: int | mmap.mmap, offset: int, size: int, iova: int, readable: bool = True,
                writable: bool = True) -> DmaMapping:
        return self.container.map_dma(fd_or_mmap, offset, size, iova, readable, writable, owner=self)

    def unmap_dma(self, iova: int, size: int) -> None:
        self.container.unmap_dma(iova, size)

    # ---- interrupts
    def irq_info(self, kind: IrqKind | int) -> VfioIrqInfo:
        info = uapi.vfio_irq_info.new(index=int(kind))
        self._call(uapi.VFIO_DEVICE_GET_IRQ_INFO, "VFIO_DEVICE_GET_IRQ_INFO", info)
        return VfioIrqInfo(int(info.index), int(info.count), int(info.flags))

    def irq_count(self, kind: IrqKind) -> int:
        if int(kind) >= self.info.num_irqs:
            return 0
        try:
            return self.irq_info(kind).count
        except PcipassError as exc:
            if exc.code == "vfio-einval":  # vfio-pci: this index does not apply (ERR on conventional PCI)
                return 0
            raise

    def set_irqs(self, kind: IrqKind | int, start: int, eventfds: list[EventFd | int | None]) -> None:
        """Route vectors start.. of `kind` to these eventfds (None or -1: stop routing that one)."""
        fds = [-1 if e is None else e if isinstance(e, int) else e.fileno() for e in eventfds]
        buf = uapi.pack_irq_set(uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, int(kind),
                                start, len(fds), fds)
        self._call(uapi.VFIO_DEVICE_SET_IRQS, f"VFIO_DEVICE_SET_IRQS({IrqKind(kind).name})", buf)

    def irq_enable(self, kind: IrqKind, count: int = 1) -> list[EventFd]:
        available = self.irq_count(kind)
        if count < 1 or count > available:
            raise PcipassError(f"{self.name} has {available} {IrqKind(kind).name} vector(s), not {count}",
                               hint="ask for at most irq_count(kind) vectors", code="vfio-irq-count")
        if kind in self._irqs:
            self.irq_disable(kind)
        efds = device.new_eventfds(count, lambda efds: self.set_irqs(kind, 0, list(efds)))
        self._irqs[kind] = efds
        return efds

    def irq_disable(self, kind: IrqKind) -> None:
        buf = uapi.pack_irq_set(uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, int(kind), 0, 0)
        try:
            self._call(uapi.VFIO_DEVICE_SET_IRQS, f"VFIO_DEVICE_SET_IRQS({IrqKind(kind).name} off)", buf)
        finally:
            for e in self._irqs.pop(kind, []):
                e.close()

    def irq_unmask(self, kind: IrqKind = IrqKind.INTX, vector: int = 0) -> None:
        buf = uapi.pack_irq_set(uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK, int(kind), vector, 1)
        self._call(uapi.VFIO_DEVICE_SET_IRQS, f"VFIO_DEVICE_SET_IRQS({IrqKind(kind).name} unmask)", buf)

    # ---- SR-IOV
    def set_vf_token(self, token: uuid.UUID | str) -> None:
        """Set this PF's VF token (VFIO_DEVICE_FEATURE_PCI_VF_TOKEN): each of its VFs is then
        opened with it (open_device(vf, vf_token=...)). The kernel never tells it back."""
        value = parse_vf_token(token)
        head = uapi.vfio_device_feature(argsz=ctypes.sizeof(uapi.vfio_device_feature) + 16,
                                        flags=uapi.VFIO_DEVICE_FEATURE_SET | uapi.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN)
        buf = bytearray(bytes(head) + value.bytes)
        try:
            self._call(uapi.VFIO_DEVICE_FEATURE, "VFIO_DEVICE_FEATURE(PCI_VF_TOKEN)", buf)
        except PcipassError as exc:
            if exc.code != "vfio-enotty":
                raise
            raise PcipassError(f"{self.name} has no VF token to set: it is not an SR-IOV physical function "
                               "(or the kernel is older than 5.7)", code="vfio-vf-token-not-pf",
                               hint="set the token on the PF, on vfio-pci, whose VFs will be opened") from None

    # ---- reset
    def reset(self) -> None:
        if not self.info.can_reset:
            raise PcipassError(f"{self.name} offers no reset (no FLR, PM or bus reset the kernel can use)",
                               hint="reinitialise the device through its registers instead, or see "
                               "hot_reset_info() for a bus reset", code="vfio-no-reset")
        self._call(uapi.VFIO_DEVICE_RESET, "VFIO_DEVICE_RESET")

    def hot_reset_info(self) -> list[DependentDevice]:
        """The devices a bus (hot) reset would affect; [] when the device has none."""
        size = ctypes.sizeof(uapi.vfio_pci_hot_reset_info)
        for _ in range(2):
            buf = bytearray(size)
            head = bytes(uapi.vfio_pci_hot_reset_info(argsz=size))
            buf[: len(head)] = head
            try:
                self.kernel.ioctl(self.fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
                break
            except OSError as err:
                if err.errno == errno.ENOSPC:  # count tells how many there are
                    count = uapi.vfio_pci_hot_reset_info.from_buffer_copy(buf).count
                    size = len(head) + count * ctypes.sizeof(uapi.vfio_pci_dependent_device)
                    continue
                if err.errno == errno.ENODEV:  # no bus reset possible
                    return []
                raise ioctl_error("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", self.name, err) from None
        if not uapi.hot_reset_flags(buf) & uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID:
            return [DependentDevice(int(d.group_id), int(d.segment), int(d.bus), int(d.devfn))
                    for d in uapi.parse_dependent_devices(buf)]
        # the union's devid, a __u32 holding VFIO_PCI_DEVID_NOT_OWNED (-1) as 0xffffffff
        return [DependentDevice(None, int(d.segment), int(d.bus), int(d.devfn),
                                devid=ctypes.c_int32(d.group_id).value)
                for d in uapi.parse_dependent_devices(buf)]

    # ---- close: interrupts off, DMA unmapped, maps and fds closed
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for kind in list(self._irqs):
            try:
                self.irq_disable(kind)
            except PcipassError as exc:
                errors.append(exc)
        try:
            self.container.dma.release(self)
        except PcipassError as exc:
            errors.append(exc)
        for region in self._regions.values():
            region.close()
        self._regions.clear()
        self.container.devices.discard(self)
        self.container.close_fd(self.fd, self._token)
        self.fd = -1
        if self._owns_container and not self.container.devices:
            self.container.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> VfioDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
