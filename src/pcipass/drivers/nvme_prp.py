"""Physical Region Page entries: how a command tells the controller where its data is.

PRP1 is the first data address (it may start inside a page, dword aligned).
If the transfer touches a second page, PRP2 is that page; if it touches more,
PRP2 points to a PRP list of the remaining page addresses, 8 bytes each. A
list that does not fit in one memory page ends with a pointer to the next
list page instead of a data page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Prps:
    prp1: int
    prp2: int
    list_pages: tuple[bytes, ...]  # contents of the PRP list pages, to copy to list_iova onwards


def prp_entries(iova: int, length: int, page_size: int) -> list[int]:
    """The address of every memory page the transfer touches, first one with its offset."""
    if length <= 0:
        raise ValueError(f"PRP transfer length {length} must be positive")
    if iova % 4:
        raise ValueError(f"PRP data address {iova:#x} must be dword aligned")
    end = iova + length
    entries = [iova]
    page = (iova // page_size + 1) * page_size
    while page < end:
        entries.append(page)
        page += page_size
    return entries


def _list_chunks(count: int, per_page: int) -> list[int]:
    """How many data entries each list page holds, when `count` entries need a list."""
    chunks = []
    while count > per_page:
        chunks.append(per_page - 1)  # the last slot chains to the next list page
        count -= per_page - 1
    chunks.append(count)
    return chunks


def list_pages_needed(length: int, page_size: int) -> int:
    """PRP list pages a transfer of `length` bytes needs at worst (when it starts mid-page)."""
    # The worst start is the last dword of a page.
    touched = (page_size - 4 + length - 1) // page_size + 1
    if touched <= 2:
        return 0
    return len(_list_chunks(touched - 1, page_size // 8))


def build_prps(iova: int, length: int, page_size: int, list_iova: int = 0) -> Prps:
    """PRP1, PRP2 and the list pages for a transfer of `length` bytes at `iova`.

    `list_iova` is where the caller will place the list (page aligned, enough
    contiguous pages: `list_pages_needed`); it is only used when a list is needed.
    """
    entries = prp_entries(iova, length, page_size)
    if len(entries) <= 2:
        return Prps(entries[0], entries[1] if len(entries) == 2 else 0, ())
    if list_iova % page_size or not list_iova:
        raise ValueError(f"PRP list address {list_iova:#x} must be a non-zero page-aligned IOVA")
    rest = entries[1:]
    pages = []
    chunks = _list_chunks(len(rest), page_size // 8)
    for n, size in enumerate(chunks):
        chunk, rest = rest[:size], rest[size:]
        if n + 1 < len(chunks):
            chunk.append(list_iova + (n + 1) * page_size)
        pages.append(struct.pack(f"<{len(chunk)}Q", *chunk))
    return Prps(entries[0], list_iova, tuple(pages))
