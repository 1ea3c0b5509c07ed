"""Device regions (BARs, ROM, config space): mmap where allowed, the device fd otherwise.

Every access is one load or store of exactly the asked width: a MappedWindow
over the mmap, or one pread/pwrite of exactly `width` bytes on the fd (which
vfio-pci turns into one access of that width).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

from pcipass.device import MappedWindow, RegionInfo, check_access
from pcipass.errors import PcipassError
from pcipass.vfio import uapi
from pcipass.vfio.syscalls import KERNEL, Kernel


@dataclass(frozen=True)
class VfioRegionInfo(RegionInfo):
    """RegionInfo plus what VFIO_DEVICE_GET_REGION_INFO says beyond it."""

    flags: int = 0
    offset: int = 0  # where the region starts in the device fd
    sparse: tuple[tuple[int, int], ...] | None = None  # mmap-able (offset, size) areas, if limited
    type: tuple[int, int] | None = None  # (type, subtype) of a device-specific region
    msix_mappable: bool = False

    def mmap_areas(self) -> list[tuple[int, int]]:
        """(offset, size) of what may be mmapped: the sparse areas, or the whole region."""
        if not self.mappable or not self.size:
            return []
        if self.sparse is not None:
            return [a for a in self.sparse if a[1]]
        return [(0, self.size)]


def parse_region_info(buf: bytes | bytearray) -> VfioRegionInfo:
    info = uapi.vfio_region_info.from_buffer_copy(buf)
    sparse, rtype, msix = None, None, False
    if info.flags & uapi.VFIO_REGION_INFO_FLAG_CAPS:
        for cap in uapi.parse_caps(buf, info.cap_offset):
            if cap.id == uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                sparse = tuple(uapi.parse_sparse_areas(buf, cap))
            elif cap.id == uapi.VFIO_REGION_INFO_CAP_TYPE:
                rtype = uapi.parse_region_type(buf, cap)
            elif cap.id == uapi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                msix = True
    return VfioRegionInfo(
        index=int(info.index), size=int(info.size),
        readable=bool(info.flags & uapi.VFIO_REGION_INFO_FLAG_READ),
        writable=bool(info.flags & uapi.VFIO_REGION_INFO_FLAG_WRITE),
        mappable=bool(info.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP),
        flags=int(info.flags), offset=int(info.offset), sparse=sparse, type=rtype, msix_mappable=msix)


@dataclass
class _Area:
    start: int
    end: int
    map: mmap.mmap
    window: MappedWindow


class VfioRegion:
    """One region of an open device (pcipass.device.Region): `read(offset, width)`, `write(offset, width, value)`."""

    read: Callable[[int, int], int]
    write: Callable[[int, int, int], None]

    def __init__(self, fd: int, info: VfioRegionInfo, what: str, *, use_mmap: bool = True,
                 kernel: Kernel = KERNEL) -> None:
        self.fd = fd
        self._pread, self._pwrite = kernel.pread, kernel.pwrite
        self.info = info
        self.what = what
        self._areas: list[_Area] = []
        if use_mmap:
            for off, size in info.mmap_areas():
                self._areas.append(self._map(off, size))
        # The common case (a whole BAR mapped): accesses go straight to the window.
        if len(self._areas) == 1 and self._areas[0].start == 0 and self._areas[0].end == info.size:
            self.read, self.write = self._areas[0].window.read, self._areas[0].window.write
        else:
            self.read, self.write = self._read_areas_or_fd, self._write_areas_or_fd

    def _map(self, off: int, size: int) -> _Area:
        prot = (mmap.PROT_READ if self.info.readable else 0) | (mmap.PROT_WRITE if self.info.writable else 0)
        try:
            m = mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot, offset=self.info.offset + off)
        except OSError as err:
            raise PcipassError(f"cannot mmap {self.what} at {off:#x}+{size:#x}: {os.strerror(err.errno or 0)}",
                               hint="the region may not allow it here; open it with use_mmap=False",
                               code="vfio-mmap") from None
        return _Area(off, off + size, m, MappedWindow(m, self.what))

    def mmap_area(self, offset: int, size: int) -> mmap.mmap:
        """A new mmap of part of the region (for a vfio-user server handing it on); caller closes it."""
        if not any(a <= offset and offset + size <= a + s for a, s in self.info.mmap_areas()):
            raise PcipassError(f"{self.what}: {offset:#x}+{size:#x} is not inside an mmap-able area "
                               f"{self.info.mmap_areas()}", hint="mmap only the sparse areas the kernel lists",
                               code="vfio-mmap-area")
        return self._map(offset, size).map

    def _read_areas_or_fd(self, offset: int, width: int) -> int:
        for a in self._areas:
            if a.start <= offset < a.end:
                return a.window.read(offset - a.start, width)
        check_access(offset, width, self.info.size, self.what)
        try:
            data = self._pread(self.fd, width, self.info.offset + offset)
        except OSError as err:
            raise _io_error("read", self.what, offset, width, err) from None
        if len(data) != width:
            raise PcipassError(f"{self.what}: short read at {offset:#x} ({len(data)} of {width} bytes)",
                               hint="the region may not be readable there", code="vfio-short-read")
        return int.from_bytes(data, "little")

    def _write_areas_or_fd(self, offset: int, width: int, value: int) -> None:
        for a in self._areas:
            if a.start <= offset < a.end:
                return a.window.write(offset - a.start, width, value)
        check_access(offset, width, self.info.size, self.what)
        data = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        try:
            done = self._pwrite(self.fd, data, self.info.offset + offset)
        except OSError as err:
            raise _io_error("write", self.what, offset, width, err) from None
        if done != width:
            raise PcipassError(f"{self.what}: short write at {offset:#x}", hint="the region may not be writable there",
                               code="vfio-short-write")

    def close(self) -> None:
        for a in self._areas:
            a.window.release()
            a.map.close()
        self._areas.clear()


def _io_error(op: str, what: str, offset: int, width: int, err: OSError) -> PcipassError:
    return PcipassError(f"{what}: {width}-byte {op} at {offset:#x} failed: {os.strerror(err.errno or 0)}",
                        hint="check the offset against the region size and that the device is still bound",
                        code="vfio-region-io")
