"""The one Device interface that drivers are written against.

`pcipass.vfio.VfioDevice` (the kernel's VFIO) and the vfio-user client
(`pcipass.domain.connect`) both implement it; a driver never knows which one
it has. Widths are in bytes (1, 2, 4 or 8) and every access is one load or one
store of exactly that width: devices such as QEMU's edu answer differently to a
4-byte read than to four 1-byte reads.

The pieces every implementation shares live here too, so there is one of each:
`EventFd` (an interrupt), `SharedMemory` (memfd-backed memory another process
can map) and `MappedWindow` (exact-width access to mapped memory).
"""

from __future__ import annotations

import asyncio
import enum
import math
import mmap
import os
import select
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pcipass.pci import PCI_COMMAND, PCI_COMMAND_MASTER

WIDTHS = (1, 2, 4, 8)
# struct/memoryview format for each access width: native byte order, unsigned.
_FORMAT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def check_access(offset: int, width: int, size: int, what: str) -> None:
    """Raise ValueError unless [offset, offset+width) is an aligned access inside `size`."""
    if width not in WIDTHS:
        raise ValueError(f"{what}: width {width} is not one of {WIDTHS}")
    if offset < 0 or offset + width > size:
        raise ValueError(f"{what}: access at {offset:#x}+{width} is outside 0..{size:#x}")
    if offset % width:
        raise ValueError(f"{what}: access at {offset:#x} is not aligned to its width {width}")


def set_command(dev: Device, *, on: int = 0, off: int = 0) -> int:
    """Turn bits of the command register on and off (PCI_COMMAND_MEMORY, _MASTER...);
    returns what it held before, for putting it back."""
    before = dev.config_read(PCI_COMMAND, 2)
    dev.config_write(PCI_COMMAND, 2, (before | on) & ~off)
    return before


def bus_master(dev: Device, on: bool) -> int:
    """Bus mastering on or off (off: the device's DMA stops, so its memory can go);
    returns the command register as it was."""
    return set_command(dev, on=PCI_COMMAND_MASTER if on else 0, off=0 if on else PCI_COMMAND_MASTER)


class IrqKind(enum.IntEnum):
    """Interrupt index, numbered as VFIO_PCI_*_IRQ_INDEX (and vfio-user)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class EventFd:
    """An eventfd: how an interrupt reaches a driver.

    The kernel (or a vfio-user backend) signals it; `wait` blocks until it has
    been signalled and returns how many times, and `wait_async` does the same
    inside asyncio.
    """

    def __init__(self, fd: int | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if fd is None else fd
        # Made once: wait() is an interrupt handler's hot path, and read(), or poll()
        # then read(), is all it should cost (the syscalls a C driver makes). So one thread waits
        # on an EventFd at a time, as one handler serves one interrupt.
        self._poller = select.poll()
        self._poller.register(self.fd, select.POLLIN)

    def fileno(self) -> int:
        return self.fd

    def wait(self, timeout: float | None = None) -> int:
        """Block until signalled (or `timeout` seconds pass: returns 0). Returns the count."""
        try:  # signalled already (the interrupt was taken on this CPU): no poll() needed
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        if not self._poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))):
            return 0
        return self.consume()

    def consume(self) -> int:
        """Read and clear the counter without blocking; 0 if it was not signalled."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def signal(self, count: int = 1) -> None:
        os.eventfd_write(self.fd, count)

    async def wait_async(self) -> int:
        loop = asyncio.get_running_loop()
        while True:
            count = self.consume()
            if count:
                return count
            ready = loop.create_future()
            loop.add_reader(self.fd, _settle, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            self._poller.unregister(self.fd)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_eventfds(count: int, hand_over: Callable[[list[EventFd]], object]) -> list[EventFd]:
    """`count` new eventfds handed to a device (`hand_over`, its SET_IRQS); closed again if it refuses."""
    fds = [EventFd() for _ in range(count)]
    try:
        hand_over(fds)
    except BaseException:
        for e in fds:
            e.close()
        raise
    return fds


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MappedWindow:
    """Exact-width loads and stores on mapped memory (a BAR's mmap, a DMA buffer).

    `read(offset, width) -> int` and `write(offset, width, value)`: each access
    is a single native load or store through a memoryview cast to the access
    width, never a byte-wise copy. A value too wide for the access is cut to
    its low `width` bytes, as a store of that width would.
    """

    read: Callable[[int, int], int]
    write: Callable[[int, int, int], None]

    def __init__(self, buffer: mmap.mmap | memoryview, what: str = "window") -> None:
        self._view = memoryview(buffer).cast("B")
        self.size = len(self._view)
        self.what = what
        self._typed = {w: self._view[: self.size - self.size % w].cast(f) for w, f in _FORMAT.items()}  # type: ignore[call-overload]
        self.read, self.write = self._accessors()

    def _accessors(self) -> tuple[Callable[[int, int], int], Callable[[int, int, int], None]]:
        # Register access is the hot path of every driver, and under the lab's TCG
        # each bytecode counts: plain closures (no bound method, no attribute
        # lookups), and the checks left to what the view does anyway. An index
        # past the end raises IndexError and an unknown width KeyError; only the
        # sign and the alignment need testing here. Any miss goes to check_access
        # for the message.
        typed, size, what = self._typed, self.size, self.what

        def refuse(offset: int, width: int) -> ValueError:
            check_access(offset, width, size, what)
            return ValueError(f"{what}: access at {offset!r}+{width!r} refused")

        def read(offset: int, width: int) -> int:
            try:
                if offset >= 0 and not offset % width:
                    return typed[width][offset // width]  # type: ignore[no-any-return]
            except (KeyError, IndexError, ZeroDivisionError):
                pass
            raise refuse(offset, width)

        def write(offset: int, width: int, value: int) -> None:
            try:
                if offset >= 0 and not offset % width:
                    view = typed[width]
                    try:
                        view[offset // width] = value
                    except ValueError:  # out of the width's range (a negative value, say): cut it
                        view[offset // width] = value & ((1 << (8 * width)) - 1)
                    return
            except (KeyError, IndexError, ZeroDivisionError):
                pass
            raise refuse(offset, width)

        return read, write

    @property
    def bytes(self) -> memoryview:
        """The whole window as bytes (for bulk data such as a DMA buffer, not for registers)."""
        return self._view

    def release(self) -> None:
        for typed in self._typed.values():
            typed.release()
        self._view.release()


class SharedMemory:
    """Anonymous memory in a memfd, so that another process can map the same pages.

    DMA buffers are made of it: the vfio library maps it through the IOMMU and
    the vfio-user client sends its fd to the backend.
    """

    def __init__(self, size: int, name: str = "pcipass-dma") -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"shared memory size {size} must be a positive multiple of {mmap.PAGESIZE}")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.window = MappedWindow(self.map, name)

    def close(self) -> None:
        if self.fd >= 0:
            self.window.release()
            self.map.close()
            os.close(self.fd)
            self.fd = -1


@dataclass
class SharedDmaBuffer:
    """A DMA buffer (DmaBuffer) of SharedMemory, as both implementations make them: give the
    device `iova`, use `window` yourself; `fd` is the memfd, so another process (a vfio-user
    peer) can map the same pages."""

    iova: int
    size: int
    window: MappedWindow
    memory: SharedMemory = field(repr=False)

    @property
    def fd(self) -> int:
        return self.memory.fd


@dataclass(frozen=True)
class RegionInfo:
    index: int
    size: int
    readable: bool
    writable: bool
    mappable: bool


@runtime_checkable
class Region(Protocol):
    """A device region (a BAR, the ROM, config space) with exact-width access."""

    @property
    def info(self) -> RegionInfo: ...  # read-only here, so an implementation may hold a subclass

    def read(self, offset: int, width: int) -> int: ...

    def write(self, offset: int, width: int, value: int) -> None: ...


@runtime_checkable
class DmaBuffer(Protocol):
    """Memory the device can reach: `iova` is the address to give the device."""

    iova: int
    size: int
    window: MappedWindow  # the CPU's view of the same memory


@runtime_checkable
class Device(Protocol):
    """What a driver may do with a PCI device, wherever the device is."""

    name: str

    def config_read(self, offset: int, width: int) -> int: ...

    def config_write(self, offset: int, width: int, value: int) -> None: ...

    def region(self, index: int) -> Region: ...

    def dma_alloc(self, size: int, *, dma_mask_bits: int = 64) -> DmaBuffer:
        """Allocate memory and map it for the device at an IOVA below 2**dma_mask_bits."""
        ...

    def dma_free(self, buffer: DmaBuffer) -> None: ...

    def irq_count(self, kind: IrqKind) -> int:
        """How many vectors of this kind the device has (0: none)."""
        ...

    def irq_enable(self, kind: IrqKind, count: int = 1) -> list[EventFd]:
        """Route `count` vectors of `kind` to new eventfds and return them."""
        ...

    def irq_disable(self, kind: IrqKind) -> None: ...

    def irq_unmask(self, kind: IrqKind = IrqKind.INTX, vector: int = 0) -> None:
        """Unmask a level-triggered interrupt (INTx) after the driver has handled it."""
        ...

    def reset(self) -> None: ...

    def close(self) -> None: ...
