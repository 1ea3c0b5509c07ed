"""DMA: memory the device can reach through the IOMMU, over either backend.

A `DmaSpace` is one IO address space (a container or an IOAS). It hands out
IOVAs (honouring the kernel's IOVA ranges, the caller's DMA mask and the
IOMMU page size), counts the DMA_AVAIL budget and the locked-memory limit
before the kernel does, and remembers every mapping so that `close()` leaves
nothing mapped.
"""

from __future__ import annotations

import math
import mmap
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pcipass import device
from pcipass.device import SharedDmaBuffer, SharedMemory
from pcipass.errors import PcipassError
from pcipass.vfio import uapi
from pcipass.vfio.iova import IovaAllocator

_CAP_IPC_LOCK = 14


def memlock_limit() -> int | None:
    """Bytes this process may lock for DMA, or None when unlimited (root, CAP_IPC_LOCK)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:") and int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1:
                    return None
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


@dataclass(slots=True)
class DmaMapping:
    """One IOMMU mapping: `iova`..`iova+size` -> the process memory at `vaddr`."""

    iova: int
    size: int
    vaddr: int
    readable: bool
    writable: bool
    owner: object = None  # who made it (a VfioDevice), so its close() can undo it
    keep: list[Any] = field(default_factory=list)  # mmaps/memory kept alive while mapped


class DmaSpace:
    def __init__(self, backend: Any, *, memlock: Callable[[], int | None] = memlock_limit) -> None:
        self.backend = backend
        self.memlock = memlock
        self.mappings: dict[int, DmaMapping] = {}
        self.locked = 0
        self._allocator: IovaAllocator | None = None
        self._memlock_limit: tuple[int | None] | None = None  # asked once: /proc is slow to read
        self._max_mappings: float = math.inf
        self._max_locked: float = math.inf

    # The IOVA ranges and the entry budget change as devices join: refreshed then.
    def refresh(self) -> IovaAllocator:
        allocator = IovaAllocator(self.backend.iova_ranges(), self.backend.page_size)
        for m in self.mappings.values():
            allocator.reserve(m.iova, m.size)
        self._allocator = allocator
        if self._memlock_limit is None:
            self._memlock_limit = (self.memlock(),)
        # The budgets as plain numbers, so that map_vaddr tests both in one expression.
        # DMA_AVAIL counts the entries left when asked, after the mappings already made.
        avail = self.backend.dma_avail
        self._max_mappings = math.inf if avail is None else len(self.mappings) + avail
        self._max_locked = math.inf if self._memlock_limit[0] is None else self._memlock_limit[0]
        return allocator

    @property
    def allocator(self) -> IovaAllocator:
        return self.refresh() if self._allocator is None else self._allocator

    def _refuse_over_budget(self, size: int) -> PcipassError:
        if len(self.mappings) >= self._max_mappings:
            if hasattr(self.backend, "over_budget"):  # a no-IOMMU container: it says why
                return self.backend.over_budget()
            return PcipassError(
                f"{self.backend.what}: the IOMMU allows {self._max_mappings} DMA mappings and all are in use",
                hint="free DMA buffers, map fewer larger ones, or raise vfio_iommu_type1's dma_entry_limit",
                code="vfio-enospc")
        return PcipassError(
            f"mapping {size} more bytes for DMA would lock {self.locked + size} bytes, over "
            f"RLIMIT_MEMLOCK ({self._max_locked} bytes)",
            hint="raise the locked-memory limit (ulimit -l, LimitMEMLOCK= for a systemd unit, "
            "memlock in /etc/security/limits.conf) or run with CAP_IPC_LOCK",
            code="vfio-memlock")

    # map_vaddr and unmap are a driver's per-I/O path (bench/vfio_bench.py measures
    # them): each check is one expression, and nothing is looked up twice.
    def map_vaddr(self, vaddr: int, iova: int | None, size: int, *, readable: bool = True,
                  writable: bool = True, limit_bits: int = 64, owner: object = None,
                  keep: list[Any] | None = None) -> DmaMapping:
        """Map process memory at `vaddr`; at `iova`, or at one we choose below 2**limit_bits."""
        allocator = self.refresh() if self._allocator is None else self._allocator
        if size <= 0 or size % allocator.page_size or vaddr % mmap.PAGESIZE:
            raise PcipassError(f"DMA mapping of {size:#x} bytes at {vaddr:#x} is not page aligned "
                               f"({allocator.page_size:#x})", hint="map whole pages", code="vfio-dma-align")
        if len(self.mappings) >= self._max_mappings or self.locked + size > self._max_locked:
            raise self._refuse_over_budget(size)
        if iova is None:
            iova = allocator.alloc(size, limit_bits=limit_bits)
        else:
            allocator.reserve(iova, size)
        try:
            self.backend.map(vaddr, iova, size, readable, writable)
        except BaseException:
            allocator.free(iova)
            raise
        mapping = self.mappings[iova] = DmaMapping(iova, size, vaddr, readable, writable, owner,
                                                   [] if keep is None else keep)
        self.locked += size
        return mapping

    def unmap(self, iova: int, size: int | None = None) -> None:
        mapping = self.mappings.get(iova)
        if mapping is None or (size is not None and size != mapping.size):
            raise PcipassError(f"no DMA mapping at IOVA {iova:#x}" + (f" of {size:#x} bytes" if size else ""),
                               hint="unmap exactly what was mapped", code="vfio-dma-unknown")
        self.backend.unmap(iova, mapping.size)
        del self.mappings[iova]
        self.allocator.free(iova)
        self.locked -= mapping.size
        for obj in mapping.keep:
            obj.close()

    # --- what the vfio-user backend needs: map a client's memory at its IOVA
    def map_dma(self, fd_or_mmap: int | mmap.mmap, offset: int, size: int, iova: int, *,
                readable: bool = True, writable: bool = True, owner: object = None) -> DmaMapping:
        """Map `size` bytes at `offset` of a file descriptor (we mmap it) or of an mmap, at `iova`."""
        keep: list[Any] = []
        if isinstance(fd_or_mmap, int):
            # Mapped read/write for the CPU whatever the device may do: the IOMMU
            # permissions are what protect the memory, and ctypes needs a writable buffer.
            try:
                mem = mmap.mmap(fd_or_mmap, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            except (OSError, ValueError) as err:
                raise PcipassError(f"cannot mmap {size:#x} bytes at {offset:#x} of fd {fd_or_mmap} for DMA: {err}",
                                   hint="pass a shared memory fd (memfd) at least offset+size long, "
                                   "opened read/write", code="vfio-dma-fd") from None
            keep.append(mem)
            vaddr = uapi.address_of(mem)
        else:
            if offset + size > len(fd_or_mmap):
                raise PcipassError(f"DMA mapping {offset:#x}+{size:#x} is beyond the {len(fd_or_mmap):#x}-byte mmap",
                                   hint="map a range inside the memory you were given", code="vfio-dma-range")
            vaddr = uapi.address_of(fd_or_mmap) + offset
        try:
            return self.map_vaddr(vaddr, iova, size, readable=readable, writable=writable, owner=owner, keep=keep)
        except BaseException:
            for obj in keep:
                obj.close()
            raise

    def alloc(self, size: int, *, dma_mask_bits: int = 64, owner: object = None) -> SharedDmaBuffer:
        """A new memfd buffer mapped read/write for the device below 2**dma_mask_bits."""
        page = max(self.backend.page_size, mmap.PAGESIZE)
        size = max(page, (size + page - 1) // page * page)
        memory = SharedMemory(size)
        try:
            mapping = self.map_vaddr(uapi.address_of(memory.map), None, size, limit_bits=dma_mask_bits,
                                     owner=owner)
        except BaseException:
            memory.close()
            raise
        mapping.keep.append(memory)
        return SharedDmaBuffer(mapping.iova, size, memory.window, memory)

    def free(self, buffer: device.DmaBuffer) -> None:
        """Unmap and close a buffer from alloc (any other SharedDmaBuffer is refused, not guessed at)."""
        mapping = self.mappings.get(buffer.iova)
        if not isinstance(buffer, SharedDmaBuffer) or mapping is None or buffer.memory not in mapping.keep:
            raise PcipassError(f"the DMA buffer at IOVA {buffer.iova:#x} was not allocated here",
                               hint="free a buffer through the device that allocated it", code="vfio-dma-unknown")
        self.unmap(buffer.iova, buffer.size)

    def release(self, owner: object) -> None:
        """Unmap everything `owner` mapped (a device closing)."""
        for iova in [i for i, m in self.mappings.items() if m.owner is owner]:
            self.unmap(iova)

    def close(self) -> None:
        for iova in list(self.mappings):
            self.unmap(iova)
