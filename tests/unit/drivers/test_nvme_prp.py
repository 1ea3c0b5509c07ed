"""PRP construction: PRP1, PRP2 as data or list pointer, lists chained across pages."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcipass.drivers.nvme_prp import build_prps, list_pages_needed, prp_entries

PAGE = 4096
LIST = 0x9000_0000


def entries_of(page: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(page) // 8}Q", page))


def walk(
    iova: int, length: int, prp1: int, prp2: int, pages: tuple[bytes, ...]
) -> list[tuple[int, int]]:
    """What a controller reads: (address, length) pieces, following the list as laid out."""
    memory = {LIST + n * PAGE: page for n, page in enumerate(pages)}
    first = min(length, PAGE - prp1 % PAGE)
    pieces, left = [(prp1, first)], length - first
    if left and left <= PAGE:
        return pieces + [(prp2, left)]
    slot = prp2
    while left:
        base = slot - slot % PAGE
        entry = entries_of(memory[base])[(slot - base) // 8]
        if (slot + 8) % PAGE == 0 and left > PAGE:
            slot = entry
            continue
        assert entry % PAGE == 0
        pieces.append((entry, min(left, PAGE)))
        left -= min(left, PAGE)
        slot += 8
    return pieces


def test_one_page_needs_only_prp1() -> None:
    prps = build_prps(0x10000, PAGE, PAGE, LIST)
    assert (prps.prp1, prps.prp2, prps.list_pages) == (0x10000, 0, ())


def test_offset_transfer_within_one_page() -> None:
    prps = build_prps(0x10100, 0x200, PAGE)
    assert (prps.prp1, prps.prp2) == (0x10100, 0)


def test_two_pages_put_the_second_in_prp2() -> None:
    prps = build_prps(0x10000, 2 * PAGE, PAGE, LIST)
    assert (prps.prp1, prps.prp2, prps.list_pages) == (0x10000, 0x11000, ())
    # Starting mid-page, 4 KiB still touches two pages.
    prps = build_prps(0x10800, PAGE, PAGE, LIST)
    assert (prps.prp1, prps.prp2) == (0x10800, 0x11000)


def test_three_pages_use_a_list() -> None:
    prps = build_prps(0x10000, 3 * PAGE, PAGE, LIST)
    assert prps.prp1 == 0x10000 and prps.prp2 == LIST
    assert [entries_of(p) for p in prps.list_pages] == [[0x11000, 0x12000]]


def test_list_longer_than_a_page_is_chained() -> None:
    pages = 1 + 512 + 1  # PRP1, a full list page worth, and one more
    prps = build_prps(0x100000, pages * PAGE, PAGE, LIST)
    first, second = (entries_of(p) for p in prps.list_pages)
    assert len(first) == 512 and first[-1] == LIST + PAGE  # last slot chains
    assert first[:3] == [0x101000, 0x102000, 0x103000]
    assert second == [0x100000 + 512 * PAGE, 0x100000 + 513 * PAGE]
    # Exactly 512 entries fit in one page without chaining.
    prps = build_prps(0x100000, 513 * PAGE, PAGE, LIST)
    assert len(prps.list_pages) == 1 and entries_of(prps.list_pages[0])[-1] == 0x100000 + 512 * PAGE


@pytest.mark.parametrize(
    "iova, length, list_iova, message",
    [
        (0x1000, 0, LIST, "must be positive"),
        (0x1002, 512, LIST, "dword aligned"),
        (0x1000, 3 * PAGE, 0, "page-aligned"),
        (0x1000, 3 * PAGE, LIST + 8, "page-aligned"),
    ],
)
def test_bad_arguments(iova: int, length: int, list_iova: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_prps(iova, length, PAGE, list_iova)


@settings(deadline=None)  # timing varies on a shared machine; the property does not
@given(
    page=st.integers(0x10, 0x1000).map(lambda n: n * PAGE),
    offset=st.integers(0, PAGE // 4 - 1).map(lambda n: n * 4),
    length=st.integers(1, 1300 * PAGE),
)
def test_walk_covers_exactly_the_buffer(page: int, offset: int, length: int) -> None:
    iova = page + offset
    prps = build_prps(iova, length, PAGE, LIST)
    pieces = walk(iova, length, prps.prp1, prps.prp2, prps.list_pages)
    # The pieces, in order, are the buffer's bytes with no gap and no overlap.
    position = iova
    for address, size in pieces:
        assert address == position
        position += size
    assert position == iova + length
    assert len(pieces) == len(prp_entries(iova, length, PAGE))
    assert len(prps.list_pages) <= list_pages_needed(length, PAGE)


def test_list_pages_needed() -> None:
    assert list_pages_needed(PAGE, PAGE) == 0  # two pages at worst: PRP2 is data
    # Starting at a page's last dword, PAGE + 4 bytes touch two pages, PAGE + 5 three.
    assert list_pages_needed(PAGE + 4, PAGE) == 0
    assert list_pages_needed(PAGE + 5, PAGE) == 1
    assert list_pages_needed(512 * PAGE, PAGE) == 1  # 513 touched: 512 in the list
    assert list_pages_needed(513 * PAGE, PAGE) == 2
