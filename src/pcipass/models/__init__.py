"""Devices emulated in Python, served by the vfio-user backend.

A model is declared the way libvfio-user devices are: its configuration space
(with the bits a driver may write and the capabilities it carries), its
regions (BARs) with read and write callbacks or with memory the client may
map, and its interrupts. The backend does the protocol; the model reaches
client memory only through `ModelContext.dma_read/dma_write` (what the client
mapped) and raises interrupts through `ModelContext`, which signals the
client's eventfds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pcipass import pci
from pcipass.device import IrqKind, SharedMemory, check_access
from pcipass.pci import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_SERR,
    PCI_MSI_FLAGS,
    PCI_MSI_FLAGS_64BIT,
    PCI_MSI_FLAGS_ENABLE,
    PCI_MSI_FLAGS_QSIZE,
    PCI_STATUS_ERRORS,
    PCI_STATUS_INTERRUPT,
)

ReadFn = Callable[[int, int], int]
WriteFn = Callable[[int, int, int], None]


class ModelContext(Protocol):
    """What the backend gives a model: client memory, interrupts, time."""

    def dma_read(self, address: int, size: int) -> bytes: ...

    def dma_write(self, address: int, data: bytes) -> None: ...

    def set_intx(self, level: bool) -> None: ...

    def msi(self, vector: int) -> None: ...

    def msix(self, vector: int) -> None: ...

    def schedule(self, delay: float, callback: Callable[[], None]) -> None: ...


class DetachedContext:
    """A model before a backend holds it: no memory, interrupts go nowhere."""

    def dma_read(self, address: int, size: int) -> bytes:
        raise PermissionError("no client memory is mapped")

    def dma_write(self, address: int, data: bytes) -> None:
        raise PermissionError("no client memory is mapped")

    def set_intx(self, level: bool) -> None:
        pass

    def msi(self, vector: int) -> None:
        pass

    def msix(self, vector: int) -> None:
        pass

    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        callback()


class ConfigSpace:
    """Emulated configuration space: bytes, the bits a driver may write, and W1C bits.

    BAR sizing needs no code: a BAR's writable mask is ~(size-1), so writing
    all ones reads back the size mask with the type bits, as on hardware.
    """

    def __init__(self, size: int = pci.PCI_CFG_SPACE_SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self._caps_end = pci.PCI_STD_HEADER_SIZEOF
        self._last_cap = 0

    def get(self, offset: int, width: int) -> int:
        return int.from_bytes(self.data[offset : offset + width], "little")

    def set(self, offset: int, width: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        self.data[offset : offset + width] = value.to_bytes(width, "little")
        self.wmask[offset : offset + width] = wmask.to_bytes(width, "little")
        self.w1cmask[offset : offset + width] = w1c.to_bytes(width, "little")

    def read(self, offset: int, width: int) -> int:
        check_access(offset, width, self.size, "config space")
        return self.get(offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        check_access(offset, width, self.size, "config space")
        for i in range(width):
            b = (value >> (8 * i)) & 0xFF
            at = offset + i
            keep = self.data[at] & ~self.wmask[at] & 0xFF
            self.data[at] = (keep | (b & self.wmask[at])) & ~(b & self.w1cmask[at]) & 0xFF

    def header(self, *, vendor: int, device: int, revision: int, class_code: int,
               subsystem_vendor: int = 0, subsystem: int = 0, interrupt_pin: int = 0) -> None:
        """A type 0 header with the usual writable bits (as QEMU's pci.c sets them)."""
        self.set(pci.PCI_VENDOR_ID, 2, vendor)
        self.set(pci.PCI_DEVICE_ID, 2, device)
        cmd_w = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE
        self.set(pci.PCI_COMMAND, 2, 0, wmask=cmd_w)
        self.set(pci.PCI_STATUS, 2, 0, w1c=PCI_STATUS_ERRORS)
        self.set(pci.PCI_REVISION_ID, 1, revision)
        self.set(pci.PCI_CLASS_PROG, 3, class_code)
        self.set(0x0C, 1, 0, wmask=0xFF)  # cache line size
        self.set(pci.PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self.set(pci.PCI_SUBSYSTEM_ID, 2, subsystem)
        self.set(pci.PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self.set(pci.PCI_INTERRUPT_PIN, 1, interrupt_pin)

    def bar(self, index: int, size: int, *, io: bool = False, bits64: bool = False,
            prefetch: bool = False) -> None:
        if size & (size - 1) or size < (4 if io else 16):
            raise ValueError(f"BAR{index}: size {size:#x} is not a power of two of at least 16")
        at = PCI_BASE_ADDRESS_0 + 4 * index
        if io:
            self.set(at, 4, PCI_BASE_ADDRESS_SPACE_IO, wmask=~(size - 1) & 0xFFFFFFFC)
            return
        kind = (PCI_BASE_ADDRESS_MEM_TYPE_64 if bits64 else 0) | (PCI_BASE_ADDRESS_MEM_PREFETCH if prefetch else 0)
        self.set(at, 4, kind, wmask=~(size - 1) & 0xFFFFFFF0)
        if bits64:
            self.set(at + 4, 4, 0, wmask=(~(size - 1) >> 32) & 0xFFFFFFFF)

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"") -> int:
        """Append a capability (`body` without its 2-byte header) and link it in."""
        at = self._caps_end
        total = 2 + len(body)
        if at + total > pci.PCI_CFG_SPACE_SIZE:
            raise ValueError(f"capability {cap_id:#x} does not fit in config space")
        self.data[at] = cap_id
        self.data[at + 2 : at + total] = body
        self.wmask[at + 2 : at + 2 + len(wmask)] = wmask
        if self._last_cap:
            self.data[self._last_cap + 1] = at
        else:
            self.data[pci.PCI_CAPABILITY_LIST] = at
            self.data[pci.PCI_STATUS] |= pci.PCI_STATUS_CAP_LIST
        self._last_cap = at
        self._caps_end = (at + total + 3) & ~3
        return at

    def add_msi(self, vectors: int = 1, bits64: bool = True) -> int:
        """An MSI capability without per-vector masking (as QEMU's msi_init(..., false))."""
        mmc = (vectors - 1).bit_length()
        ctrl = (mmc << 1) | (PCI_MSI_FLAGS_64BIT if bits64 else 0)
        body = bytearray(12 if bits64 else 8)
        body[0:2] = ctrl.to_bytes(2, "little")
        wm = bytearray(len(body))
        wm[0] = PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE
        wm[2:6] = (0xFFFFFFFC).to_bytes(4, "little")  # address (low)
        if bits64:
            wm[6:10] = b"\xff" * 4
        wm[-2:] = b"\xff\xff"  # data
        return self.add_capability(pci.PCI_CAP_ID_MSI, bytes(body), bytes(wm))


@dataclass
class ModelRegion:
    """A BAR (or other region): callbacks for trapped access, `memory` for mappable RAM.

    `mmap_areas` lists (offset, size) parts of `memory` the client may map
    (default: all of it when there is memory); the rest goes through the
    callbacks, so a register page and a RAM area can share one BAR.
    `reader`, optional: for one (offset, width), a function of nothing that gives what
    `read(offset, width)` would, made once (a register's value without the decoding), or None
    where the model has none; the server prepares a register its client polls with it.
    """

    index: int
    size: int
    read: ReadFn | None = None
    write: WriteFn | None = None
    memory: SharedMemory | None = None
    mmap_areas: list[tuple[int, int]] = field(default_factory=list)
    reader: Callable[[int, int], Callable[[], int] | None] | None = None

    def __post_init__(self) -> None:
        if self.memory is not None and not self.mmap_areas:
            self.mmap_areas = [(0, self.size)]

    def mapped(self, offset: int, width: int) -> bool:
        return any(o <= offset and offset + width <= o + s for o, s in self.mmap_areas)

    def do_read(self, offset: int, width: int) -> int:
        check_access(offset, width, self.size, f"region {self.index}")
        if self.memory is not None and (self.read is None or self.mapped(offset, width)):
            return self.memory.window.read(offset, width)
        if self.read is None:
            return (1 << (8 * width)) - 1
        return self.read(offset, width)

    def do_write(self, offset: int, width: int, value: int) -> None:
        check_access(offset, width, self.size, f"region {self.index}")
        if self.memory is not None and (self.write is None or self.mapped(offset, width)):
            self.memory.window.write(offset, width, value)
        elif self.write is not None:
            self.write(offset, width, value)


class Model:
    """The base of a device model. Subclasses fill in `config`, `regions`, `irqs`."""

    name = "model"

    def __init__(self) -> None:
        self.config = ConfigSpace()
        self.regions: dict[int, ModelRegion] = {}
        self.irqs: dict[IrqKind, int] = {}
        self.ctx: ModelContext = DetachedContext()
        self.msi_cap = 0
        self.intx_level = False  # the device's INTx pin, before the command register's disable bit

    def attach(self, ctx: ModelContext) -> None:
        self.ctx = ctx

    def detach(self) -> None:
        self.ctx = DetachedContext()

    def reset(self) -> None:
        """Back to power-on state (subclasses reset their registers and call this)."""
        cmd = pci.PCI_COMMAND
        self.config.data[cmd : cmd + 2] = b"\0\0"
        if self.msi_cap:
            self.set_msi_enabled(False)
        self.set_intx(False)

    # INTx as QEMU's PCI core does it: the status register shows the pin, and the command
    # register's INTx disable keeps it from the interrupt controller (uio_pci_generic and
    # vfio-pci's INTx masking rely on both).
    def set_intx(self, level: bool) -> None:
        self.intx_level = level
        status = self.config.data[pci.PCI_STATUS] & ~PCI_STATUS_INTERRUPT
        self.config.data[pci.PCI_STATUS] = status | (PCI_STATUS_INTERRUPT if level else 0)
        self.ctx.set_intx(level and not self.intx_disabled())

    def config_write(self, offset: int, width: int, value: int) -> None:
        """A configuration write; turning INTx disable on or off moves the line at once."""
        disabled = self.intx_disabled()
        self.config.write(offset, width, value)
        if self.intx_disabled() != disabled and self.intx_level:
            self.ctx.set_intx(not self.intx_disabled())

    # MSI enable is driven by the backend (SET_IRQS), never by a client's config write.
    def set_msi_enabled(self, enabled: bool, vectors: int = 1) -> None:
        at = self.msi_cap + PCI_MSI_FLAGS
        ctrl = self.config.get(at, 2) & ~(PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        if enabled:
            ctrl |= PCI_MSI_FLAGS_ENABLE | (((vectors - 1).bit_length()) << 4)
        self.config.data[at : at + 2] = ctrl.to_bytes(2, "little")

    def msi_enabled(self) -> bool:
        return bool(self.msi_cap and self.config.get(self.msi_cap + PCI_MSI_FLAGS, 2) & PCI_MSI_FLAGS_ENABLE)

    def intx_disabled(self) -> bool:
        return bool(self.config.get(pci.PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE)

    def close(self) -> None:
        for region in self.regions.values():
            if region.memory is not None:
                region.memory.close()


def create(name: str) -> Model:
    """A model by name (`pcipass serve --model NAME`)."""
    from pcipass.models import edu, nvme, scratch

    known = {"edu": edu.Edu, "nvme": nvme.Nvme, "scratch": scratch.Scratch}
    if name not in known:
        from pcipass.errors import UsageError

        raise UsageError(f"no model named {name!r}", hint=f"models: {', '.join(sorted(known))}")
    return known[name]()
