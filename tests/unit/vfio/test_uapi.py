"""The uAPI module against linux/vfio.h and linux/iommufd.h: sizes, numbers, capability chains."""

from __future__ import annotations

import ctypes

import pytest

from pcipass.vfio import uapi


@pytest.mark.parametrize("struct, size", [
    (uapi.vfio_info_cap_header, 8), (uapi.vfio_group_status, 8), (uapi.vfio_device_info, 24),
    (uapi.vfio_region_info, 32), (uapi.vfio_region_sparse_mmap_area, 16), (uapi.vfio_irq_info, 16),
    (uapi.vfio_irq_set, 20), (uapi.vfio_pci_dependent_device, 8), (uapi.vfio_pci_hot_reset_info, 12),
    (uapi.vfio_iommu_type1_info, 24), (uapi.vfio_iommu_type1_dma_map, 32), (uapi.vfio_iommu_type1_dma_unmap, 24),
    (uapi.vfio_iommu_type1_info_cap_iova_range, 16), (uapi.vfio_iova_range, 16),
    (uapi.vfio_device_bind_iommufd, 16), (uapi.vfio_device_attach_iommufd_pt, 12),
    (uapi.iommu_destroy, 8), (uapi.iommu_ioas_alloc, 12), (uapi.iommu_ioas_iova_ranges, 32),
    (uapi.iommu_ioas_map, 40), (uapi.iommu_ioas_unmap, 24), (uapi.iommu_iova_range, 16),
])
def test_structure_sizes_match_the_headers(struct, size):
    assert ctypes.sizeof(struct) == size


def test_ioctl_numbers():
    # _IO(';', 100 + n): ';' is 0x3b
    assert uapi.VFIO_GET_API_VERSION == 0x3B64
    assert uapi.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert uapi.VFIO_DEVICE_SET_IRQS == 0x3B6E
    assert uapi.VFIO_IOMMU_GET_INFO == uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO == 0x3B70
    assert uapi.VFIO_IOMMU_MAP_DMA == 0x3B71 and uapi.VFIO_IOMMU_UNMAP_DMA == 0x3B72
    assert uapi.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76 and uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT == 0x3B77
    assert uapi.IOMMU_DESTROY == 0x3B80 and uapi.IOMMU_IOAS_ALLOC == 0x3B81
    assert uapi.IOMMU_IOAS_IOVA_RANGES == 0x3B84 and uapi.IOMMU_IOAS_MAP == 0x3B85
    assert uapi.IOMMU_IOAS_UNMAP == 0x3B86


def test_new_fills_the_size_field():
    assert uapi.vfio_region_info.new(index=3).argsz == 32
    assert uapi.iommu_ioas_map.new().size == 40


def _cap(cap_id: int, nxt: int, body: bytes = b"") -> bytes:
    return bytes(uapi.vfio_info_cap_header(id=cap_id, version=1, next=nxt)) + body


def test_capability_chain_is_walked_and_parsed():
    head = bytes(uapi.vfio_region_info(argsz=0, flags=uapi.VFIO_REGION_INFO_FLAG_CAPS, index=0, cap_offset=32))
    sparse = _cap(uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 32 + 48,
                  bytes(ctypes.c_uint32(2)) + bytes(4) + bytes(uapi.vfio_region_sparse_mmap_area(offset=0, size=0x1000))
                  + bytes(uapi.vfio_region_sparse_mmap_area(offset=0x3000, size=0x1000)))
    rtype = _cap(uapi.VFIO_REGION_INFO_CAP_TYPE, 32 + 48 + 16, bytes(ctypes.c_uint32(1)) + bytes(ctypes.c_uint32(2)))
    msix = _cap(uapi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 0)
    buf = head + sparse + rtype + msix
    caps = uapi.parse_caps(buf, 32)
    assert [c.id for c in caps] == [1, 2, 3]
    assert uapi.parse_sparse_areas(buf, caps[0]) == [(0, 0x1000), (0x3000, 0x1000)]
    assert uapi.parse_region_type(buf, caps[1]) == (1, 2)


def test_capability_chain_loop_and_truncation_stop():
    loop = bytes(8) + _cap(1, 8)
    assert len(uapi.parse_caps(loop, 8)) == 1
    assert uapi.parse_caps(bytes(12), 8) == []  # header does not fit
    assert uapi.parse_caps(bytes(64), 0) == []  # no chain


def test_truncated_array_is_cut_not_overread():
    buf = bytes(uapi.vfio_pci_hot_reset_info(argsz=20, count=5)) + bytes(uapi.vfio_pci_dependent_device(group_id=9))
    deps = uapi.parse_dependent_devices(buf)
    assert len(deps) == 1 and deps[0].group_id == 9


def test_pack_irq_set():
    buf = uapi.pack_irq_set(uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, 1, 0, 2, [5, -1])
    head = uapi.vfio_irq_set.from_buffer_copy(buf)
    assert head.argsz == len(buf) == 28 and head.count == 2 and head.index == 1
    assert list((ctypes.c_int32 * 2).from_buffer_copy(buf, 20)) == [5, -1]
    assert len(uapi.pack_irq_set(uapi.VFIO_IRQ_SET_DATA_NONE, 0, 0, 0)) == 20


def test_address_of_releases_the_buffer():
    import mmap

    m = mmap.mmap(-1, 4096)
    assert uapi.address_of(m) > 0
    m.close()  # would raise BufferError if an export were still held


@pytest.mark.parametrize("struct, fields", [
    (uapi.vfio_iommu_type1_dma_map, dict(flags=3, vaddr=0x7F0000001000, iova=0x100000, size=0x2000)),
    (uapi.vfio_iommu_type1_dma_unmap, dict(flags=0, iova=0x100000, size=0x2000)),
    (uapi.iommu_ioas_map, {"flags": 7, "ioas_id": 2, "__reserved": 0, "user_va": 0x7F0000001000,
                           "length": 0x1000, "iova": 0x200000}),
    (uapi.iommu_ioas_unmap, dict(ioas_id=2, iova=0x200000, length=0x1000)),
])
def test_prepared_arguments_pack_as_the_structure_does(struct, fields):
    buf, fill = uapi.prepared(struct)
    fill(*fields.values())
    assert bytes(buf) == bytes(struct.new(**fields))


def test_prepared_refuses_a_structure_with_padding():
    class padded(uapi._Struct):
        _fields_ = [("argsz", ctypes.c_uint32), ("value", ctypes.c_uint64)]

    with pytest.raises(TypeError, match="padding"):
        uapi.prepared(padded)
