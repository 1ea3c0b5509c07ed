"""The kernel's VFIO and IOMMUFD user API: ioctl numbers, flags and structures.

Mirrors `linux/vfio.h` and `linux/iommufd.h` with the same names, so that a
reader can hold this module next to the headers. It is the only place in
pcipass that packs or unpacks binary structures; everything else asks it.

Variable-length replies (capability chains, arrays after a header) are read
with the `parse_*` functions at the bottom, over the bytes the kernel filled.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------- ioctl numbers
# Every VFIO and IOMMUFD ioctl is _IO(';', nr): no size or direction bits; the
# structure's own argsz/size field says how big it is.
VFIO_TYPE = ord(";")
VFIO_BASE = 100
IOMMUFD_TYPE = ord(";")


def _IO(type_: int, nr: int) -> int:
    return (type_ << 8) | nr


VFIO_API_VERSION = 0

# container (/dev/vfio/vfio)
VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
# group (/dev/vfio/N)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
# device
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_DEVICE_PCI_HOT_RESET = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)
# type1 IOMMU (on the container fd; numbers overlap the device's on purpose)
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)

# VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU arguments
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
VFIO_TYPE1_NESTING_IOMMU = 6
VFIO_SPAPR_TCE_v2_IOMMU = 7
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10

# iommufd (/dev/iommu)
IOMMUFD_CMD_BASE = 0x80
IOMMUFD_CMD_DESTROY = 0x80
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)
IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)
IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)
IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)
IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)

# ---------------------------------------------------------------- flags
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = 0x7
VFIO_IRQ_SET_ACTION_TYPE_MASK = 0x38

VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
# Features (the low 16 bits of vfio_device_feature.flags)
VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0  # SET only: the 16-byte UUID a PF's VFs are opened with

# vfio-pci region and irq indices
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9
# vfio_pci_hot_reset_info.flags: a device opened through its cdev gets devids, not group ids
VFIO_PCI_HOT_RESET_FLAG_DEV_ID = 1 << 0
VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED = 1 << 1
# vfio_pci_dependent_device.devid (a union with group_id) when it is no device id of ours
VFIO_PCI_DEVID_OWNED = 0
VFIO_PCI_DEVID_NOT_OWNED = -1
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1

IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2


# ---------------------------------------------------------------- structures
class _Struct(ctypes.Structure):
    """A uAPI structure; `new()` fills its leading size field (argsz or size)."""

    @classmethod
    def new(cls, **fields: int) -> _Struct:
        first = cls._fields_[0][0]
        return cls(**{first: ctypes.sizeof(cls)}, **fields)


_u32, _s32, _u64, _u16, _u8 = ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint16, ctypes.c_uint8


class vfio_info_cap_header(_Struct):
    _fields_ = [("id", _u16), ("version", _u16), ("next", _u32)]


class vfio_group_status(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32)]


class vfio_device_feature(_Struct):
    """The head of VFIO_DEVICE_FEATURE's argument; the feature's data (data[]) follows it."""

    _fields_ = [("argsz", _u32), ("flags", _u32)]


class vfio_device_info(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("num_regions", _u32), ("num_irqs", _u32),
                ("cap_offset", _u32), ("pad", _u32)]


class vfio_region_info(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("index", _u32), ("cap_offset", _u32),
                ("size", _u64), ("offset", _u64)]


class vfio_region_sparse_mmap_area(_Struct):
    _fields_ = [("offset", _u64), ("size", _u64)]


class vfio_region_info_cap_sparse_mmap(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("nr_areas", _u32), ("reserved", _u32)]


class vfio_region_info_cap_type(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("type", _u32), ("subtype", _u32)]


class vfio_irq_info(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("index", _u32), ("count", _u32)]


class vfio_irq_set(_Struct):
    """Header only: `pack_irq_set` appends the data array."""

    _fields_ = [("argsz", _u32), ("flags", _u32), ("index", _u32), ("start", _u32), ("count", _u32)]


class vfio_pci_dependent_device(_Struct):
    """`group_id` is the union { __u32 group_id; __u32 devid; }: which one the header's flags say."""

    _fields_ = [("group_id", _u32), ("segment", _u16), ("bus", _u8), ("devfn", _u8)]


class vfio_pci_hot_reset_info(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("count", _u32)]


class vfio_iommu_type1_info(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("iova_pgsizes", _u64), ("cap_offset", _u32),
                ("pad", _u32)]


class vfio_iova_range(_Struct):
    _fields_ = [("start", _u64), ("end", _u64)]


class vfio_iommu_type1_info_cap_iova_range(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("nr_iovas", _u32), ("reserved", _u32)]


class vfio_iommu_type1_info_dma_avail(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("avail", _u32)]


class vfio_iommu_type1_dma_map(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("vaddr", _u64), ("iova", _u64), ("size", _u64)]


class vfio_iommu_type1_dma_unmap(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("iova", _u64), ("size", _u64)]


class vfio_device_bind_iommufd(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("iommufd", _s32), ("out_devid", _u32)]


class vfio_device_attach_iommufd_pt(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("pt_id", _u32)]


class vfio_device_detach_iommufd_pt(_Struct):
    _fields_ = [("argsz", _u32), ("flags", _u32)]


class iommu_destroy(_Struct):
    _fields_ = [("size", _u32), ("id", _u32)]


class iommu_ioas_alloc(_Struct):
    _fields_ = [("size", _u32), ("flags", _u32), ("out_ioas_id", _u32)]


class iommu_iova_range(_Struct):
    _fields_ = [("start", _u64), ("last", _u64)]


class iommu_ioas_iova_ranges(_Struct):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("num_iovas", _u32), ("__reserved", _u32),
                ("allowed_iovas", _u64), ("out_iova_alignment", _u64)]


class iommu_ioas_map(_Struct):
    _fields_ = [("size", _u32), ("flags", _u32), ("ioas_id", _u32), ("__reserved", _u32),
                ("user_va", _u64), ("length", _u64), ("iova", _u64)]


class iommu_ioas_unmap(_Struct):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("iova", _u64), ("length", _u64)]


# ---------------------------------------------------------------- variable-length parts
@dataclass(frozen=True)
class Cap:
    """One entry of a capability chain: its id, version and the bytes from its header on."""

    id: int
    version: int
    offset: int


def parse_caps(buf: bytes | bytearray, first: int) -> list[Cap]:
    """Walk a vfio_info_cap_header chain starting at byte `first` (0: no chain)."""
    caps: list[Cap] = []
    offset, seen = first, set()
    hsize = ctypes.sizeof(vfio_info_cap_header)
    while offset and offset + hsize <= len(buf) and offset not in seen:
        seen.add(offset)
        head = vfio_info_cap_header.from_buffer_copy(buf, offset)
        caps.append(Cap(head.id, head.version, offset))
        offset = head.next
    return caps


def parse_sparse_areas(buf: bytes | bytearray, cap: Cap) -> list[tuple[int, int]]:
    """(offset, size) of each mmap-able area of a VFIO_REGION_INFO_CAP_SPARSE_MMAP."""
    head = vfio_region_info_cap_sparse_mmap.from_buffer_copy(buf, cap.offset)
    first = cap.offset + ctypes.sizeof(head)
    size = ctypes.sizeof(vfio_region_sparse_mmap_area)
    areas = []
    for i in range(head.nr_areas):
        if first + (i + 1) * size > len(buf):
            break
        area = vfio_region_sparse_mmap_area.from_buffer_copy(buf, first + i * size)
        areas.append((int(area.offset), int(area.size)))
    return areas


def parse_region_type(buf: bytes | bytearray, cap: Cap) -> tuple[int, int]:
    """(type, subtype) of a VFIO_REGION_INFO_CAP_TYPE."""
    c = vfio_region_info_cap_type.from_buffer_copy(buf, cap.offset)
    return int(c.type), int(c.subtype)


def parse_iova_ranges(buf: bytes | bytearray, cap: Cap) -> list[tuple[int, int]]:
    """(start, last) inclusive ranges of a VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE."""
    head = vfio_iommu_type1_info_cap_iova_range.from_buffer_copy(buf, cap.offset)
    first = cap.offset + ctypes.sizeof(head)
    size = ctypes.sizeof(vfio_iova_range)
    out = []
    for i in range(head.nr_iovas):
        if first + (i + 1) * size > len(buf):
            break
        r = vfio_iova_range.from_buffer_copy(buf, first + i * size)
        out.append((int(r.start), int(r.end)))
    return out


def parse_dma_avail(buf: bytes | bytearray, cap: Cap) -> int:
    return int(vfio_iommu_type1_info_dma_avail.from_buffer_copy(buf, cap.offset).avail)


def parse_dependent_devices(buf: bytes | bytearray) -> list[vfio_pci_dependent_device]:
    """The devices[] after a vfio_pci_hot_reset_info header."""
    head = vfio_pci_hot_reset_info.from_buffer_copy(buf)
    first, size = ctypes.sizeof(head), ctypes.sizeof(vfio_pci_dependent_device)
    count = min(head.count, (len(buf) - first) // size)
    return [vfio_pci_dependent_device.from_buffer_copy(buf, first + i * size) for i in range(count)]


def hot_reset_flags(buf: bytes | bytearray) -> int:
    return int(vfio_pci_hot_reset_info.from_buffer_copy(buf).flags)


def pack_irq_set(flags: int, index: int, start: int, count: int, fds: list[int] | None = None) -> bytearray:
    """A vfio_irq_set with an __s32 eventfd array (DATA_EVENTFD) or no data."""
    data = (ctypes.c_int32 * len(fds))(*fds) if fds else None
    argsz = ctypes.sizeof(vfio_irq_set) + (ctypes.sizeof(data) if data is not None else 0)
    head = vfio_irq_set(argsz=argsz, flags=flags, index=index, start=start, count=count)
    return bytearray(bytes(head) + (bytes(data) if data is not None else b""))


def iova_range_array(count: int) -> ctypes.Array:  # type: ignore[type-arg]
    """An output array for IOMMU_IOAS_IOVA_RANGES (pass its address as allowed_iovas)."""
    return (iommu_iova_range * count)()


_STRUCT_CODES: dict[Any, str] = {_u8: "B", _u16: "H", _u32: "I", _s32: "i", _u64: "Q"}


def prepared(cls: type[_Struct]) -> tuple[bytearray, Callable[..., None]]:
    """A reusable argument for a per-I/O ioctl (DMA map and unmap): a buffer for
    `cls`, and fill(*fields after the size field) packing them into it in one C call.

    Building a ctypes structure per call costs several times the rest of the Python
    side; the layout still comes from `cls`, so it is written once. Flat structures
    without padding only; the buffer belongs to one caller at a time.
    """
    layout = struct.Struct("=" + "".join(_STRUCT_CODES[f[1]] for f in cls._fields_))
    if layout.size != ctypes.sizeof(cls):
        raise TypeError(f"{cls.__name__} has padding, which prepared() does not lay out")
    buf = bytearray(layout.size)
    return buf, functools.partial(layout.pack_into, buf, 0, layout.size)


def decode_u32(buf: bytes | bytearray, offset: int = 0) -> int:
    return int(_u32.from_buffer_copy(buf, offset).value)


def address_of(buffer: object) -> int:
    """The address of a writable buffer (an mmap, a bytearray, a ctypes array).

    The temporary export is dropped at once so the buffer can still be closed.
    """
    if isinstance(buffer, ctypes.Array | ctypes.Structure):
        return ctypes.addressof(buffer)
    view = ctypes.c_char.from_buffer(buffer)  # type: ignore[arg-type]
    try:
        return ctypes.addressof(view)
    finally:
        del view
