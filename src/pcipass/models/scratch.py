"""A small device with RAM in a BAR: for tests and benchmarks of mapped BAR access.

BAR0 (16 KiB): the first page is registers, trapped (a scratch register at
0x0 and a write counter at 0x8); the next three pages are memory the client
maps (a sparse mmap area). BAR2 (4 KiB) is memory, mappable whole.
"""

from __future__ import annotations

from pcipass.device import IrqKind, SharedMemory
from pcipass.models import Model, ModelRegion

SCRATCH_VENDOR = 0x1B36  # Red Hat / QEMU's range, a device ID nobody uses
SCRATCH_DEVICE = 0x00FE
BAR0_SIZE = 4 * 4096
BAR2_SIZE = 4096
REG_SCRATCH = 0x0
REG_WRITES = 0x8


class Scratch(Model):
    name = "scratch"

    def __init__(self) -> None:
        super().__init__()
        self.config.header(vendor=SCRATCH_VENDOR, device=SCRATCH_DEVICE, revision=1, class_code=0xFF0000)
        self.config.bar(0, BAR0_SIZE)
        self.config.bar(2, BAR2_SIZE, prefetch=True)
        self.scratch = 0
        self.writes = 0
        self.regions = {
            0: ModelRegion(0, BAR0_SIZE, read=self._read, write=self._write,
                            memory=SharedMemory(BAR0_SIZE, "scratch-bar0"), mmap_areas=[(4096, 3 * 4096)]),
            2: ModelRegion(2, BAR2_SIZE, memory=SharedMemory(BAR2_SIZE, "scratch-bar2")),
        }
        self.irqs = {IrqKind.INTX: 1}

    def _read(self, offset: int, width: int) -> int:
        if offset == REG_SCRATCH and width in (4, 8):
            return self.scratch & ((1 << (8 * width)) - 1)
        if offset == REG_WRITES and width in (4, 8):
            return self.writes
        return 0

    def _write(self, offset: int, width: int, value: int) -> None:
        self.writes += 1
        if offset == REG_SCRATCH:
            self.scratch = value

    def reset(self) -> None:
        super().reset()
        self.scratch = 0
        self.writes = 0
