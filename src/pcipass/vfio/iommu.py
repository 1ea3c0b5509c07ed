"""The two IOMMU backends behind one set of operations (as rust-vmm's vfio-ioctls).

`Type1Container`: the legacy container (/dev/vfio/vfio) that groups join,
with the Type1v2 IOMMU. `Iommufd`: /dev/iommu with one IOAS that device
cdevs (/dev/vfio/devices/vfioX) bind and attach to. Both offer:

    map(vaddr, iova, size, readable, writable)   unmap(iova, size)
    iova_ranges() -> [(start, last)]             page_size, dma_avail
    close()

`pcipass.vfio.dma.DmaSpace` builds buffers, IOVA allocation and accounting
on top, so it never knows which backend it has.
"""

from __future__ import annotations

import ctypes
import errno
import os

from pcipass.errors import PcipassError
from pcipass.vfio import uapi
from pcipass.vfio.syscalls import KERNEL, Kernel, call, ioctl_error, open_node


def _min_page(pgsizes: int) -> int:
    return pgsizes & -pgsizes if pgsizes else 4096


class Type1Container:
    """A VFIO container: groups join it, and it holds the IOMMU mappings for all of them."""

    kind = "container"

    def __init__(self, kernel: Kernel = KERNEL) -> None:
        self.kernel = kernel
        self.path = os.path.join(kernel.dev, "vfio", "vfio")
        self.what = self.path
        self.fd = open_node(kernel, self.path, "the VFIO container")
        self.iommu_type: int | None = None
        self.page_size = 4096
        self.dma_avail: int | None = None
        self._ranges: list[tuple[int, int]] = [(0, (1 << 64) - 1)]
        self._map_arg, self._fill_map = uapi.prepared(uapi.vfio_iommu_type1_dma_map)
        self._unmap_arg, self._fill_unmap = uapi.prepared(uapi.vfio_iommu_type1_dma_unmap)
        try:
            version = call(kernel, self.fd, uapi.VFIO_GET_API_VERSION, "VFIO_GET_API_VERSION", self.what)
            if version != uapi.VFIO_API_VERSION:
                raise PcipassError(f"{self.path} speaks VFIO API version {version}, not {uapi.VFIO_API_VERSION}",
                                   hint="use a kernel whose VFIO this pcipass knows", code="vfio-api-version")
        except BaseException:
            self.close()
            raise

    def check_extension(self, ext: int) -> bool:
        return call(self.kernel, self.fd, uapi.VFIO_CHECK_EXTENSION, "VFIO_CHECK_EXTENSION", self.what, ext) > 0

    def attach_group(self, group_fd: int, group_what: str) -> None:
        """VFIO_GROUP_SET_CONTAINER, then (first group only) VFIO_SET_IOMMU."""
        arg = bytearray(ctypes.c_int32(self.fd))
        call(self.kernel, group_fd, uapi.VFIO_GROUP_SET_CONTAINER, "VFIO_GROUP_SET_CONTAINER", group_what, arg)
        if self.iommu_type is None:
            # Type1v2 unmaps exactly what was mapped and reports IOVA ranges; v1 is the fallback.
            for kind in (uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_IOMMU):
                if self.check_extension(kind):
                    call(self.kernel, self.fd, uapi.VFIO_SET_IOMMU, "VFIO_SET_IOMMU", self.what, kind)
                    self.iommu_type = kind
                    break
            else:
                raise PcipassError(f"the VFIO container {self.path} offers no Type1 IOMMU",
                                   hint="turn the IOMMU on (intel_iommu=on for VT-d; AMD-Vi is on unless amd_iommu=off) and load "
                                   "vfio_iommu_type1", code="vfio-no-type1")
        self.refresh_info()

    def detach_group(self, group_fd: int, group_what: str) -> None:
        call(self.kernel, group_fd, uapi.VFIO_GROUP_UNSET_CONTAINER, "VFIO_GROUP_UNSET_CONTAINER", group_what)

    def refresh_info(self) -> None:
        """VFIO_IOMMU_GET_INFO: page sizes, IOVA ranges, DMA_AVAIL (asked again if the caps overflow)."""
        info = uapi.vfio_iommu_type1_info.new()
        buf = bytearray(info)
        for _ in range(2):
            try:
                self.kernel.ioctl(self.fd, uapi.VFIO_IOMMU_GET_INFO, buf)
            except OSError as err:
                raise ioctl_error("VFIO_IOMMU_GET_INFO", self.what, err) from None
            info = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
            if info.argsz <= len(buf):
                break
            size = info.argsz
            buf = bytearray(size)
            buf[: ctypes.sizeof(info)] = bytes(uapi.vfio_iommu_type1_info.new())
            uapi.vfio_iommu_type1_info.from_buffer(buf).argsz = size
        if info.flags & uapi.VFIO_IOMMU_INFO_PGSIZES:
            self.page_size = max(_min_page(info.iova_pgsizes), 4096)
        if info.flags & uapi.VFIO_IOMMU_INFO_CAPS:
            for cap in uapi.parse_caps(buf, info.cap_offset):
                if cap.id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                    self._ranges = uapi.parse_iova_ranges(buf, cap)
                elif cap.id == uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
                    self.dma_avail = uapi.parse_dma_avail(buf, cap)

    def iova_ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    # map and unmap are a driver's per-I/O path: their arguments are packed into
    # buffers made once (uapi.prepared), so a container serves one thread at a time.
    def map(self, vaddr: int, iova: int, size: int, readable: bool = True, writable: bool = True) -> None:
        self._fill_map((uapi.VFIO_DMA_MAP_FLAG_READ if readable else 0)
                       | (uapi.VFIO_DMA_MAP_FLAG_WRITE if writable else 0), vaddr, iova, size)
        call(self.kernel, self.fd, uapi.VFIO_IOMMU_MAP_DMA, "VFIO_IOMMU_MAP_DMA", self.what, self._map_arg)

    def unmap(self, iova: int, size: int) -> None:
        self._fill_unmap(0, iova, size)
        call(self.kernel, self.fd, uapi.VFIO_IOMMU_UNMAP_DMA, "VFIO_IOMMU_UNMAP_DMA", self.what, self._unmap_arg)

    def close(self) -> None:
        if self.fd >= 0:
            self.kernel.close(self.fd)
            self.fd = -1


class NoIommuContainer(Type1Container):
    """A container for vfio's no-IOMMU groups (/dev/vfio/noiommu-N): the device works, its
    DMA is not translated, so pcipass maps nothing (a DMA address would be a physical one)."""

    kind = "noiommu"

    def __init__(self, kernel: Kernel = KERNEL) -> None:
        super().__init__(kernel)
        self.dma_avail = 0  # no mapping can be made: DmaSpace refuses before it allocates an IOVA

    def over_budget(self) -> PcipassError:
        """What DmaSpace says when it finds the budget of 0 mappings used up."""
        return PcipassError(f"{self.what} is a no-IOMMU container: no DMA mapping can be made",
                            hint="without an IOMMU the device would reach physical memory; turn the "
                            "IOMMU on (intel_iommu=on) for DMA through pcipass.vfio",
                            code="vfio-noiommu-dma")

    def attach_group(self, group_fd: int, group_what: str) -> None:
        arg = bytearray(ctypes.c_int32(self.fd))
        call(self.kernel, group_fd, uapi.VFIO_GROUP_SET_CONTAINER, "VFIO_GROUP_SET_CONTAINER", group_what, arg)
        if self.iommu_type is None:
            call(self.kernel, self.fd, uapi.VFIO_SET_IOMMU, "VFIO_SET_IOMMU", self.what, uapi.VFIO_NOIOMMU_IOMMU)
            self.iommu_type = uapi.VFIO_NOIOMMU_IOMMU

    def refresh_info(self) -> None:  # no IOMMU, no GET_INFO
        pass

    def iova_ranges(self) -> list[tuple[int, int]]:
        return []

    def map(self, vaddr: int, iova: int, size: int, readable: bool = True, writable: bool = True) -> None:
        raise self.over_budget()

    def unmap(self, iova: int, size: int) -> None:
        self.map(0, iova, size)


class Iommufd:
    """/dev/iommu with one IO address space (IOAS) shared by the devices bound to it."""

    kind = "iommufd"

    def __init__(self, kernel: Kernel = KERNEL) -> None:
        self.kernel = kernel
        self.path = os.path.join(kernel.dev, "iommu")
        self.fd = open_node(kernel, self.path, "IOMMUFD")
        self.what = self.path
        self.page_size = 4096
        self.dma_avail: int | None = None  # iommufd has no per-container entry budget
        self._map_arg, self._fill_map = uapi.prepared(uapi.iommu_ioas_map)
        self._unmap_arg, self._fill_unmap = uapi.prepared(uapi.iommu_ioas_unmap)
        try:
            alloc = uapi.iommu_ioas_alloc.new()
            call(kernel, self.fd, uapi.IOMMU_IOAS_ALLOC, "IOMMU_IOAS_ALLOC", self.what, alloc)
            self.ioas_id = int(alloc.out_ioas_id)
            self.what = f"{self.path} (IOAS {self.ioas_id})"
        except BaseException:
            self.kernel.close(self.fd)
            raise

    def attach_device(self, device_fd: int, device_what: str) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD then VFIO_DEVICE_ATTACH_IOMMUFD_PT to our IOAS; returns the devid."""
        bind = uapi.vfio_device_bind_iommufd.new(iommufd=self.fd)
        call(self.kernel, device_fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, "VFIO_DEVICE_BIND_IOMMUFD", device_what, bind)
        attach = uapi.vfio_device_attach_iommufd_pt.new(pt_id=self.ioas_id)
        call(self.kernel, device_fd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
             device_what, attach)
        return int(bind.out_devid)

    def detach_device(self, device_fd: int, device_what: str) -> None:
        arg = uapi.vfio_device_detach_iommufd_pt.new()
        call(self.kernel, device_fd, uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, "VFIO_DEVICE_DETACH_IOMMUFD_PT",
             device_what, arg)

    def iova_ranges(self) -> list[tuple[int, int]]:
        """IOMMU_IOAS_IOVA_RANGES, growing the array when the kernel says EMSGSIZE."""
        count = 4
        for _ in range(4):
            out = uapi.iova_range_array(count)
            arg = uapi.iommu_ioas_iova_ranges.new(ioas_id=self.ioas_id, num_iovas=count,
                                                 allowed_iovas=uapi.address_of(out))
            buf = bytearray(arg)
            try:
                self.kernel.ioctl(self.fd, uapi.IOMMU_IOAS_IOVA_RANGES, buf)
            except OSError as err:
                if err.errno == errno.EMSGSIZE:
                    count = uapi.iommu_ioas_iova_ranges.from_buffer_copy(buf).num_iovas
                    continue
                raise ioctl_error("IOMMU_IOAS_IOVA_RANGES", self.what, err) from None
            reply = uapi.iommu_ioas_iova_ranges.from_buffer_copy(buf)
            if reply.out_iova_alignment:
                self.page_size = max(int(reply.out_iova_alignment), 4096)
            return [(int(out[i].start), int(out[i].last)) for i in range(min(reply.num_iovas, count))]
        raise PcipassError(f"IOMMU_IOAS_IOVA_RANGES on {self.what} kept growing",
                           hint="try again; the IOAS is changing under us", code="vfio-iova-ranges")

    # As Type1Container's: arguments packed into buffers made once.
    def map(self, vaddr: int, iova: int, size: int, readable: bool = True, writable: bool = True) -> None:
        flags = (uapi.IOMMU_IOAS_MAP_FIXED_IOVA | (uapi.IOMMU_IOAS_MAP_READABLE if readable else 0)
                 | (uapi.IOMMU_IOAS_MAP_WRITEABLE if writable else 0))
        self._fill_map(flags, self.ioas_id, 0, vaddr, size, iova)
        call(self.kernel, self.fd, uapi.IOMMU_IOAS_MAP, "IOMMU_IOAS_MAP", self.what, self._map_arg)

    def unmap(self, iova: int, size: int) -> None:
        self._fill_unmap(self.ioas_id, iova, size)
        call(self.kernel, self.fd, uapi.IOMMU_IOAS_UNMAP, "IOMMU_IOAS_UNMAP", self.what, self._unmap_arg)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                arg = uapi.iommu_destroy.new(id=self.ioas_id)
                call(self.kernel, self.fd, uapi.IOMMU_DESTROY, "IOMMU_DESTROY", self.what, arg)
            finally:
                self.kernel.close(self.fd)
                self.fd = -1
