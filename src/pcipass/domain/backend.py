"""What the vfio-user server serves: a device model, or a real device through VFIO.

`Backend` is the server's view of a device: regions, raw configuration space
(the policy sits above it), interrupts, client memory (DMA) and reset. Two
kinds exist: `ModelBackend` (a `pcipass.models.Model`) and `VfioBackend`
(pcipass.vfio). The pieces both need live here once: `ClientMemory` (the client's
mapped memory, with the spec's checks) and `IrqRouting` (the client's
eventfds, INTx masking).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, Protocol

from pcipass import pci
from pcipass.device import IrqKind
from pcipass.domain import protocol as p
from pcipass.models import Model

PAGE = mmap.PAGESIZE


def _ignore(value: int) -> None:
    """A write to a region of a model with nowhere to put it."""


class BackendError(Exception):
    """A request the device refuses: carries the errno for the reply."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class RegionDesc:
    index: int
    size: int
    flags: int  # VFIO_REGION_INFO_FLAG_*
    fd: int | None = None  # what the client mmaps
    fd_offset: int = 0
    sparse: list[tuple[int, int]] | None = None  # mappable parts, when not the whole region


@dataclass
class ClientMapping:
    """One DMA_MAP of the client: its addresses, not an IOMMU's (that is pcipass.vfio.DmaMapping)."""

    address: int
    size: int
    prot: int
    fd: int | None
    offset: int
    map: mmap.mmap | None = None
    view: memoryview | None = None
    handle: object = None  # what the backend keeps per mapping (e.g. a VFIO IOMMU mapping)

    @property
    def end(self) -> int:
        return self.address + self.size


class RemoteMemory(Protocol):
    """Client memory the server cannot map (mapped without an fd), reached by DMA_READ and
    DMA_WRITE messages to the client: the server's side of them."""

    def remote_read(self, address: int, size: int) -> bytes: ...

    def remote_write(self, address: int, data: bytes) -> None: ...


class ClientMemory:
    """The client's memory as the device may reach it: only what the client mapped.

    Mappings with an fd are mmapped here; the rest are reached through the client's
    `RemoteMemory`. `on_map`/`on_unmap` let the owner (the backend) follow each mapping.
    """

    def __init__(self, on_map: Callable[[ClientMapping], None] | None = None,
                 on_unmap: Callable[[ClientMapping], None] | None = None) -> None:
        self.maps: list[ClientMapping] = []  # sorted by address
        self.on_map = on_map
        self.on_unmap = on_unmap
        self.start()

    def start(self, max_maps: int = p.DEFAULT_MAX_DMA_MAPS, pgsizes: int = p.DEFAULT_PGSIZES,
              remote: RemoteMemory | None = None) -> None:
        """A client's terms: the limits agreed in VERSION, and how to reach what it maps without an fd."""
        self.max_maps = max_maps
        self.pgsize = pgsizes & -pgsizes or PAGE  # the smallest page size agreed
        self.remote = remote

    def end(self) -> None:
        """The client went: every mapping released, the terms back to the spec's defaults."""
        self.unmap_all()
        self.start()

    def map(self, address: int, size: int, prot: int, fd: int | None, offset: int) -> None:
        """Add a mapping; takes ownership of `fd` (closed on failure too)."""
        try:
            self._check_new(address, size, prot, offset, fd)
            m = ClientMapping(address, size, prot, fd, offset)
            if fd is not None:
                access = (mmap.PROT_READ if prot & p.VFIO_DMA_MAP_FLAG_READ else 0) | (
                    mmap.PROT_WRITE if prot & p.VFIO_DMA_MAP_FLAG_WRITE else 0)
                try:
                    m.map = mmap.mmap(fd, size, mmap.MAP_SHARED, access or mmap.PROT_READ, offset=offset)
                except (OSError, ValueError, OverflowError) as exc:
                    raise BackendError(errno.EINVAL, f"cannot map the client's fd: {exc}") from None
                m.view = memoryview(m.map)
            if self.on_map:
                self.on_map(m)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self.maps.append(m)
        self.maps.sort(key=lambda x: x.address)

    def _check_new(self, address: int, size: int, prot: int, offset: int, fd: int | None) -> None:
        if size == 0:
            raise BackendError(errno.EINVAL, "DMA map of size 0")
        if address + size > 1 << 64:
            raise BackendError(errno.EINVAL, f"DMA map {address:#x}+{size:#x} wraps around the address space")
        if address % self.pgsize or size % self.pgsize or (fd is not None and offset % PAGE):
            raise BackendError(errno.EINVAL, f"DMA map {address:#x}+{size:#x} (offset {offset:#x}) is not "
                               f"aligned to the page size {self.pgsize:#x}")
        if prot & ~(p.VFIO_DMA_MAP_FLAG_READ | p.VFIO_DMA_MAP_FLAG_WRITE):
            raise BackendError(errno.EINVAL, f"DMA map flags {prot:#x} has unknown bits")
        if len(self.maps) >= self.max_maps:
            raise BackendError(errno.ENOSPC, f"already {len(self.maps)} DMA maps, the agreed maximum")
        for m in self.maps:
            if address < m.end and m.address < address + size:
                raise BackendError(errno.EEXIST, f"DMA map {address:#x}+{size:#x} overlaps {m.address:#x}+{m.size:#x}")

    def unmap(self, address: int, size: int) -> None:
        for m in self.maps:
            if m.address == address and m.size == size:
                self.maps.remove(m)
                self._release(m)
                return
        raise BackendError(errno.ENOENT, f"no DMA map is exactly {address:#x}+{size:#x}")

    def unmap_all(self) -> None:
        while self.maps:
            self._release(self.maps.pop())

    def _release(self, m: ClientMapping) -> None:
        if self.on_unmap:
            self.on_unmap(m)
        if m.view is not None:
            m.view.release()
        if m.map is not None:
            m.map.close()
        if m.fd is not None:
            os.close(m.fd)

    def _pieces(self, address: int, size: int, need: int) -> list[tuple[ClientMapping, int, int]]:
        """(mapping, offset in it, length) covering [address, address+size), or PermissionError."""
        out = []
        at, left = address, size
        for m in self.maps:
            if left == 0:
                break
            if m.address <= at < m.end:
                if not m.prot & need:
                    raise PermissionError(f"DMA at {at:#x}: the client mapped it without "
                                          f"{'read' if need == p.VFIO_DMA_MAP_FLAG_READ else 'write'} access")
                n = min(left, m.end - at)
                out.append((m, at - m.address, n))
                at += n
                left -= n
        if left:
            raise PermissionError(f"DMA at {at:#x} ({left} bytes) is outside what the client mapped")
        return out

    def read(self, address: int, size: int) -> bytes:
        chunks = []
        for m, off, n in self._pieces(address, size, p.VFIO_DMA_MAP_FLAG_READ):
            if m.view is not None:
                chunks.append(bytes(m.view[off : off + n]))
            elif self.remote is not None:
                chunks.append(self.remote.remote_read(m.address + off, n))
            else:
                raise PermissionError("no way to reach that client memory")
        return b"".join(chunks)

    def write(self, address: int, data: bytes) -> None:
        pos = 0
        for m, off, n in self._pieces(address, len(data), p.VFIO_DMA_MAP_FLAG_WRITE):
            if m.view is not None:
                m.view[off : off + n] = data[pos : pos + n]
            elif self.remote is not None:
                self.remote.remote_write(m.address + off, data[pos : pos + n])
            else:
                raise PermissionError("no way to reach that client memory")
            pos += n


def set_irqs_kind(flags: int) -> tuple[int, int]:
    """A SET_IRQS request's (action, data type), the key of the handler tables."""
    return flags & p.VFIO_IRQ_SET_ACTION_TYPE_MASK, flags & p.VFIO_IRQ_SET_DATA_TYPE_MASK


@dataclass
class IrqRouting:
    """The client's eventfds per interrupt index, and INTx's automasking (as vfio-pci)."""

    counts: dict[int, int]
    triggers: dict[int, list[int | None]] = field(default_factory=dict)
    intx_masked: bool = False
    intx_level: bool = False
    # INTx: an eventfd the client signals to unmask (QEMU under KVM passes its irqfd's resample
    # eventfd, so the guest's EOI unmasks without a message); the server's loop watches it.
    unmask_fd: int | None = None

    def info(self, index: int) -> tuple[int, int]:
        count = self.counts.get(index, 0)
        flags = p.VFIO_IRQ_INFO_EVENTFD
        if index == IrqKind.INTX:
            flags |= p.VFIO_IRQ_INFO_MASKABLE | p.VFIO_IRQ_INFO_AUTOMASKED
        else:
            flags |= p.VFIO_IRQ_INFO_NORESIZE
        return flags, count

    def set(self, req: p.IrqSet, fds: list[int]) -> str:
        """Apply a SET_IRQS request. Returns what changed: 'enabled', 'disabled' or ''.

        The checks every request passes, then the handler for its (action, data type) from
        ACTIONS, as vfio-pci's vfio_pci_set_irqs_ioctl picks one from its table."""
        action, data = set_irqs_kind(req.flags)
        if req.flags & ~(p.VFIO_IRQ_SET_DATA_TYPE_MASK | p.VFIO_IRQ_SET_ACTION_TYPE_MASK):
            raise BackendError(errno.EINVAL, f"SET_IRQS flags {req.flags:#x} has unknown bits")
        if data.bit_count() != 1 or action.bit_count() != 1:
            raise BackendError(errno.EINVAL, "SET_IRQS needs exactly one data type and one action")
        count = self.counts.get(req.index, 0)
        if count == 0:
            raise BackendError(errno.EINVAL, f"the device has no interrupts of index {req.index}")
        if data != p.VFIO_IRQ_SET_DATA_EVENTFD and fds:
            raise BackendError(errno.EINVAL, "file descriptors sent without VFIO_IRQ_SET_DATA_EVENTFD")
        if data == p.VFIO_IRQ_SET_DATA_NONE and action == p.VFIO_IRQ_SET_ACTION_TRIGGER and req.count == 0:
            self.disable(req.index)
            return "disabled"
        if req.start + req.count > count or req.count == 0:
            raise BackendError(errno.EINVAL, f"vectors {req.start}..{req.start + req.count} of index "
                               f"{req.index}: it has {count}")
        if data == p.VFIO_IRQ_SET_DATA_BOOL and len(req.data) < req.count:
            raise BackendError(errno.EINVAL, f"{req.count} booleans promised, {len(req.data)} sent")
        handler, intx_only = self.ACTIONS[action, data]
        if intx_only and req.index != IrqKind.INTX:
            raise BackendError(errno.EINVAL, "only INTx can be masked and unmasked")
        chosen = [bool(req.data[i]) if data == p.VFIO_IRQ_SET_DATA_BOOL else True for i in range(req.count)]
        return handler(self, req, fds, chosen)

    # --- the handlers: (request, its eventfds, the vectors it picks) -> what changed

    def _set_triggers(self, req: p.IrqSet, fds: list[int], chosen: list[bool]) -> str:
        """The client's eventfds for these vectors (none: those vectors off)."""
        if fds and len(fds) != req.count:
            raise BackendError(errno.EINVAL, f"{req.count} vectors but {len(fds)} eventfds")
        vectors = self.triggers.setdefault(req.index, [None] * self.counts[req.index])
        for i in range(req.count):
            old = vectors[req.start + i]
            if old is not None:
                os.close(old)
            vectors[req.start + i] = fds[i] if fds else None
        if not any(v is not None for v in vectors):
            del self.triggers[req.index]
            return "disabled"
        if req.index == IrqKind.INTX:
            self.intx_masked = False
        return "enabled"

    def _trigger(self, req: p.IrqSet, fds: list[int], chosen: list[bool]) -> str:
        """The client triggers the interrupt itself."""
        for i, yes in enumerate(chosen):
            if yes:
                self.signal(req.index, req.start + i)
        return ""

    def _mask(self, req: p.IrqSet, fds: list[int], chosen: list[bool]) -> str:
        if chosen[0]:
            self.intx_masked = True
        return ""

    def _unmask(self, req: p.IrqSet, fds: list[int], chosen: list[bool]) -> str:
        if chosen[0]:
            self.unmask_intx()
        return ""

    def _unmask_by_eventfd(self, req: p.IrqSet, fds: list[int], chosen: list[bool]) -> str:
        """An eventfd the client signals to unmask INTx (kept; none: dropped)."""
        if len(fds) > 1:
            raise BackendError(errno.EINVAL, "INTx takes one eventfd to unmask, none to mask")
        self._set_unmask_fd(fds[0] if fds else None)
        fds.clear()
        return ""

    def _mask_by_eventfd(self, req: p.IrqSet, fds: list[int], chosen: list[bool]) -> str:
        raise BackendError(errno.EINVAL, "INTx takes one eventfd to unmask, none to mask")

    # (action, data type) -> (handler, INTx only)
    ACTIONS: ClassVar[dict[tuple[int, int], tuple[Callable[..., str], bool]]] = {
        (p.VFIO_IRQ_SET_ACTION_TRIGGER, p.VFIO_IRQ_SET_DATA_EVENTFD): (_set_triggers, False),
        (p.VFIO_IRQ_SET_ACTION_TRIGGER, p.VFIO_IRQ_SET_DATA_NONE): (_trigger, False),
        (p.VFIO_IRQ_SET_ACTION_TRIGGER, p.VFIO_IRQ_SET_DATA_BOOL): (_trigger, False),
        (p.VFIO_IRQ_SET_ACTION_MASK, p.VFIO_IRQ_SET_DATA_NONE): (_mask, True),
        (p.VFIO_IRQ_SET_ACTION_MASK, p.VFIO_IRQ_SET_DATA_BOOL): (_mask, True),
        (p.VFIO_IRQ_SET_ACTION_MASK, p.VFIO_IRQ_SET_DATA_EVENTFD): (_mask_by_eventfd, True),
        (p.VFIO_IRQ_SET_ACTION_UNMASK, p.VFIO_IRQ_SET_DATA_NONE): (_unmask, True),
        (p.VFIO_IRQ_SET_ACTION_UNMASK, p.VFIO_IRQ_SET_DATA_BOOL): (_unmask, True),
        (p.VFIO_IRQ_SET_ACTION_UNMASK, p.VFIO_IRQ_SET_DATA_EVENTFD): (_unmask_by_eventfd, True),
    }

    def _set_unmask_fd(self, fd: int | None) -> None:
        if self.unmask_fd is not None:
            os.close(self.unmask_fd)
        self.unmask_fd = fd

    def unmask_intx(self) -> None:
        self.intx_masked = False
        self.set_intx(self.intx_level)  # still asserted: fires again

    def unmask_signalled(self) -> None:
        """The client signalled the unmask eventfd."""
        assert self.unmask_fd is not None
        try:
            os.eventfd_read(self.unmask_fd)  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return
        self.unmask_intx()

    def signal(self, index: int, vector: int) -> None:
        fds = self.triggers.get(index)
        if fds and vector < len(fds) and fds[vector] is not None:
            try:
                os.eventfd_write(fds[vector], 1)  # type: ignore[arg-type]
            except OSError:
                pass

    def set_intx(self, level: bool) -> None:
        """INTx is level-triggered: while asserted and unmasked it fires once, then masks itself."""
        self.intx_level = level
        if level and not self.intx_masked and IrqKind.INTX in self.triggers:
            self.intx_masked = True
            self.signal(IrqKind.INTX, 0)

    def disable(self, index: int) -> None:
        for fd in self.triggers.pop(index, []):
            if fd is not None:
                os.close(fd)

    def disable_all(self) -> None:
        for index in list(self.triggers):
            self.disable(index)
        self._set_unmask_fd(None)
        self.intx_masked = False


def vfio_pci_err_req(read: Callable[[int, int], int]) -> dict[int, int]:
    """ERR and REQ as vfio-pci counts them (vfio_pci_get_irq_count): REQ is 1 on every device,
    ERR is 1 on a PCIe device (one with the PCI Express capability) and absent otherwise."""
    counts = {int(IrqKind.REQ): 1}
    if pci.find_capability(read, pci.PCI_CAP_ID_EXP) is not None:
        counts[int(IrqKind.ERR)] = 1
    return counts


class Backend:
    """The interface the server uses (a base with the shared bookkeeping)."""

    name = "device"
    config_size = 256
    device_flags = p.VFIO_DEVICE_FLAGS_PCI | p.VFIO_DEVICE_FLAGS_RESET
    without_fd = "reached with DMA_READ/DMA_WRITE"  # what becomes of client memory mapped without an fd

    def __init__(self) -> None:
        self.dma = ClientMemory(on_map=self.dma_mapped, on_unmap=self.dma_unmapped)
        # (when, order, callback), a heap; the server's fast path peeks at it (empty: no timer)
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    # regions
    def regions(self) -> dict[int, RegionDesc]:
        raise NotImplementedError

    def num_regions(self) -> int:
        return p.VFIO_PCI_NUM_REGIONS

    def config_read(self, offset: int, width: int) -> int:
        raise NotImplementedError

    def config_write(self, offset: int, width: int, value: int) -> None:
        raise NotImplementedError

    def region_read(self, index: int, offset: int, width: int) -> int:
        raise NotImplementedError

    def region_write(self, index: int, offset: int, width: int, value: int) -> None:
        raise NotImplementedError

    # The same accesses prepared for the server's fast table, once the server has checked one of
    # them (in range, aligned, a valid width): a backend may drop its own checks and lookups.
    def config_reader(self, offset: int, width: int) -> Callable[[], int]:
        return partial(self.config_read, offset, width)

    def config_view(self, offset: int, width: int) -> memoryview | None:
        """The access's bytes as they are, if config space is memory here (the server then sends
        them as they are, with no read per request); None: read it with config_reader."""
        return None

    def region_reader(self, index: int, offset: int, width: int) -> Callable[[], int]:
        return partial(self.region_read, index, offset, width)

    def region_writer(self, index: int, offset: int, width: int) -> Callable[[int], None]:
        return partial(self.region_write, index, offset, width)

    # interrupts
    def num_irqs(self) -> int:
        return p.VFIO_PCI_NUM_IRQS

    def irq_info(self, index: int) -> tuple[int, int]:
        raise NotImplementedError

    def set_irqs(self, req: p.IrqSet, fds: list[int]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def watched_fds(self) -> dict[int, Callable[[], None]]:
        """Fds the server's loop must watch besides the socket, with what to do when one is readable."""
        return {}

    # the client
    def client_joined(self, caps: p.Capabilities, remote: RemoteMemory | None) -> None:
        """A client agreed `caps` in VERSION; what it maps without an fd is reached through `remote`."""
        self.dma.start(caps.max_dma_maps, caps.pgsizes, remote)

    def client_gone(self) -> None:
        """Forget everything of the client that left, and reset the device for the next."""
        raise NotImplementedError

    def dma_mapped(self, m: ClientMapping) -> None:
        """The client mapped `m` (before it is added; raising BackendError refuses it)."""

    def dma_unmapped(self, m: ClientMapping) -> None:
        """`m` is going (before its memory is unmapped here)."""

    def close(self) -> None:
        pass

    # deferred work (a model's timers)
    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self._seq), callback))

    def next_deadline(self) -> float | None:
        return self.timers[0][0] if self.timers else None

    def run_due(self) -> None:
        if not self.timers:
            return
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, callback = heapq.heappop(self.timers)
            callback()


class ModelBackend(Backend):
    """Serves a `pcipass.models.Model`; it is also the model's `ModelContext`."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model
        self.name = f"model {model.name}"
        self.config_size = model.config.size
        self.irqs = IrqRouting({int(k): n for k, n in model.irqs.items()} | vfio_pci_err_req(model.config.read))
        model.attach(self)

    def regions(self) -> dict[int, RegionDesc]:
        out = {}
        rw = p.VFIO_REGION_INFO_FLAG_READ | p.VFIO_REGION_INFO_FLAG_WRITE
        for i in range(p.VFIO_PCI_NUM_REGIONS):
            if i == p.VFIO_PCI_CONFIG_REGION_INDEX:
                out[i] = RegionDesc(i, self.config_size, rw)
                continue
            r = self.model.regions.get(i)
            if r is None:
                out[i] = RegionDesc(i, 0, 0)
            elif r.memory is not None and r.mmap_areas:
                whole = r.mmap_areas == [(0, r.size)]
                out[i] = RegionDesc(i, r.size, rw | p.VFIO_REGION_INFO_FLAG_MMAP, r.memory.fd, 0,
                                    None if whole else list(r.mmap_areas))
            else:
                out[i] = RegionDesc(i, r.size, rw)
        return out

    # Config space goes straight to the model's (the policy in front of it decides what reaches it).
    def config_read(self, offset: int, width: int) -> int:
        return self.model.config.read(offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.model.config_write(offset, width, value)

    def region_read(self, index: int, offset: int, width: int) -> int:
        return self.model.regions[index].do_read(offset, width)

    def region_write(self, index: int, offset: int, width: int, value: int) -> None:
        self.model.regions[index].do_write(offset, width, value)

    def config_reader(self, offset: int, width: int) -> Callable[[], int]:
        # int.from_bytes over a view of the model's config bytes: no Python frame per read
        return partial(int.from_bytes, memoryview(self.model.config.data)[offset : offset + width], "little")

    def config_view(self, offset: int, width: int) -> memoryview | None:
        return memoryview(self.model.config.data)[offset : offset + width]

    # What ModelRegion.do_read/do_write would call for this access, without their checks.
    def region_reader(self, index: int, offset: int, width: int) -> Callable[[], int]:
        r = self.model.regions[index]
        if r.memory is not None and (r.read is None or r.mapped(offset, width)):
            return partial(r.memory.window.read, offset, width)
        if r.read is None:
            return partial(int, (1 << (8 * width)) - 1)
        prepared = r.reader(offset, width) if r.reader is not None else None
        return prepared or partial(r.read, offset, width)

    def region_writer(self, index: int, offset: int, width: int) -> Callable[[int], None]:
        r = self.model.regions[index]
        if r.memory is not None and (r.write is None or r.mapped(offset, width)):
            return partial(r.memory.window.write, offset, width)
        return partial(r.write, offset, width) if r.write is not None else _ignore

    def irq_info(self, index: int) -> tuple[int, int]:
        return self.irqs.info(index)

    def set_irqs(self, req: p.IrqSet, fds: list[int]) -> None:
        change = self.irqs.set(req, fds)
        if req.index == IrqKind.MSI and change:
            # What vfio-pci does in the kernel: MSI enable follows SET_IRQS, never a config write.
            vectors = len(self.irqs.triggers.get(IrqKind.MSI, []))
            self.model.set_msi_enabled(change == "enabled", max(1, vectors))

    def reset(self) -> None:
        self.timers.clear()
        self.model.reset()

    def watched_fds(self) -> dict[int, Callable[[], None]]:
        fd = self.irqs.unmask_fd
        return {} if fd is None else {fd: self.irqs.unmask_signalled}

    def client_gone(self) -> None:
        self.irqs.disable_all()
        self.dma.end()
        self.reset()

    def close(self) -> None:
        self.client_gone()
        self.model.detach()

    # ModelContext
    def dma_read(self, address: int, size: int) -> bytes:
        return self.dma.read(address, size)

    def dma_write(self, address: int, data: bytes) -> None:
        self.dma.write(address, data)

    def set_intx(self, level: bool) -> None:
        self.irqs.set_intx(level)  # the model has applied its INTx disable bit

    def msi(self, vector: int) -> None:
        self.irqs.signal(IrqKind.MSI, vector)

    def msix(self, vector: int) -> None:
        self.irqs.signal(IrqKind.MSIX, vector)
