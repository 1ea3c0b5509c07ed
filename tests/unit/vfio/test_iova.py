"""The IOVA allocator: inside the IOMMU's ranges, below the DMA mask, aligned, never overlapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcipass.errors import PcipassError
from pcipass.vfio.iova import IovaAllocator

PAGE = 4096
X86_RANGES = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]  # VT-d: the MSI window is reserved


def test_first_fit_skips_page_zero_and_honours_the_mask():
    a = IovaAllocator(X86_RANGES)
    first = a.alloc(PAGE, limit_bits=28)
    assert first == PAGE
    assert a.alloc(3 * PAGE, limit_bits=28) == 2 * PAGE
    a.free(first)
    assert a.alloc(PAGE) == PAGE


def test_mask_too_small_for_the_ranges_is_a_clear_error():
    a = IovaAllocator([(0x10000000, 0x1FFFFFFF)])
    with pytest.raises(PcipassError) as exc:
        a.alloc(PAGE, limit_bits=28)
    assert exc.value.code == "vfio-iova-exhausted" and exc.value.hint


def test_allocation_skips_the_reserved_hole():
    a = IovaAllocator([(0, 0x2FFF), (0x8000, 0xFFFF)])
    assert a.alloc(PAGE) == 0x1000
    assert a.alloc(PAGE) == 0x2000
    assert a.alloc(PAGE) == 0x8000
    assert a.alloc(2 * PAGE) == 0x9000


def test_reserve_checks_alignment_range_and_overlap():
    a = IovaAllocator(X86_RANGES)
    a.reserve(0x100000, 2 * PAGE)
    for iova, size, code in ((0x100800, PAGE, "vfio-iova-align"), (0x101000, PAGE, "vfio-iova-overlap"),
                             (0xFEE00000, PAGE, "vfio-iova-range"), (0xFF000, 2 * PAGE, "vfio-iova-overlap")):
        with pytest.raises(PcipassError) as exc:
            a.reserve(iova, size)
        assert exc.value.code == code
    assert a.used() == [(0x100000, 2 * PAGE)]  # refused requests changed nothing
    with pytest.raises(PcipassError):
        a.free(0x200000)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(12, 40), st.booleans()), min_size=1, max_size=40))
def test_allocations_never_overlap_and_stay_in_bounds(ops):
    a = IovaAllocator([(0, 0xFFFFF), (0x200000, 0x2FFFFF)])
    live: dict[int, int] = {}
    for pages, bits, free_one in ops:
        if free_one and live:
            iova = min(live)
            assert a.free(iova) == live.pop(iova)
            continue
        try:
            iova = a.alloc(pages * PAGE, limit_bits=bits)
        except PcipassError:
            continue
        size = pages * PAGE
        assert iova % PAGE == 0 and iova >= PAGE
        assert iova + size <= 1 << bits
        assert any(s <= iova and iova + size - 1 <= e for s, e in a.ranges)
        assert all(iova + size <= o or o + s <= iova for o, s in live.items())
        live[iova] = size
    assert sorted(a.used()) == sorted(live.items())
