"""The IOVA allocator: first fit inside the ranges the IOMMU accepts (the vfio library's
DmaSpace and the vfio-user client's DMA buffers both take their addresses from it).

Pure bookkeeping over integers, so it is tested on its own. Ranges are
inclusive (start, last) as the kernel reports them. Page 0 is never handed
out, so a device told to use address 0 faults instead of hitting a buffer.
"""

from __future__ import annotations

import bisect

from pcipass.errors import PcipassError


class IovaAllocator:
    def __init__(self, ranges: list[tuple[int, int]], page_size: int = 4096) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.page_size = page_size
        self.ranges = sorted(ranges)
        self._used: list[tuple[int, int]] = []  # sorted (start, size)

    def _align_up(self, value: int, align: int) -> int:
        return (value + align - 1) // align * align

    def alloc(self, size: int, *, limit_bits: int = 64, align: int | None = None) -> int:
        """An IOVA for `size` bytes, entirely below 2**limit_bits."""
        align = max(align or self.page_size, self.page_size)
        size = self._align_up(size, self.page_size)
        limit = (1 << limit_bits) - 1
        for start, last in self.ranges:
            last = min(last, limit)
            candidate = self._align_up(max(start, self.page_size), align)
            i = bisect.bisect_left(self._used, (candidate, 0))
            if i and self._used[i - 1][0] + self._used[i - 1][1] > candidate:
                candidate = self._align_up(self._used[i - 1][0] + self._used[i - 1][1], align)
            while candidate + size - 1 <= last:
                nxt = self._used[i] if i < len(self._used) else None
                if nxt is None or candidate + size <= nxt[0]:
                    bisect.insort(self._used, (candidate, size))
                    return candidate
                candidate = self._align_up(nxt[0] + nxt[1], align)
                i += 1
        raise PcipassError(
            f"no room for {size:#x} bytes of DMA: no free IOVA range below 2**{limit_bits} "
            f"(usable ranges {[(hex(a), hex(b)) for a, b in self.ranges]})",
            hint="free DMA buffers you no longer need, or allocate smaller ones",
            code="vfio-iova-exhausted",
        )

    def reserve(self, iova: int, size: int) -> None:
        """Claim a caller-chosen range (vfio-user clients choose their own IOVAs)."""
        if iova % self.page_size or size <= 0 or size % self.page_size:
            raise PcipassError(f"IOVA {iova:#x}+{size:#x} is not aligned to the IOMMU page size {self.page_size:#x}",
                               hint="align both the address and the size to the page size", code="vfio-iova-align")
        for start, last in self.ranges:  # a loop, not any(): this is on the per-mapping path
            if start <= iova and iova + size - 1 <= last:
                break
        else:
            raise PcipassError(f"IOVA {iova:#x}+{size:#x} is outside the IOMMU's ranges "
                               f"{[(hex(a), hex(b)) for a, b in self.ranges]}",
                               hint="choose an address inside one of those ranges", code="vfio-iova-range")
        i = bisect.bisect_left(self._used, (iova, 0))
        prev = self._used[i - 1] if i else None
        nxt = self._used[i] if i < len(self._used) else None
        if (prev and prev[0] + prev[1] > iova) or (nxt and iova + size > nxt[0]):
            raise PcipassError(f"IOVA {iova:#x}+{size:#x} overlaps a mapping already made",
                               hint="unmap the old range first", code="vfio-iova-overlap")
        self._used.insert(i, (iova, size))

    def free(self, iova: int) -> int:
        """Release the range starting at `iova`; returns its size."""
        i = bisect.bisect_left(self._used, (iova, 0))
        if i == len(self._used) or self._used[i][0] != iova:
            raise PcipassError(f"IOVA {iova:#x} was not allocated", hint="free only what you allocated",
                               code="vfio-iova-unknown")
        return self._used.pop(i)[1]

    def used(self) -> list[tuple[int, int]]:
        return list(self._used)
