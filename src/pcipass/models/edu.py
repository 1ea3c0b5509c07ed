"""QEMU's edu device in Python (facts from QEMU docs/specs/edu.rst and hw/misc/edu.c).

BAR0 (1 MiB, MMIO): 0x00 ID 0x010000ed; 0x04 liveness (reads back ~value);
0x08 factorial; 0x20 status (bit 0 computing, bit 7 raise an interrupt when
the factorial is done); 0x24 interrupt status; 0x60 raise; 0x64 acknowledge;
0x80/0x88/0x90/0x98 DMA source, destination, count, command (bit 0 start,
bit 1 direction: 1 = buffer to RAM, bit 2 interrupt when done). The DMA
buffer is 4 KiB at device address 0x40000; RAM addresses are clamped to the
28-bit DMA mask. Accesses below 0x80 that are not 4 bytes wide read all ones
and are ignored on write; from 0x80 on, 4 and 8 bytes are valid.
The factorial and DMA complete later (QEMU: a thread and a 100 ms timer), so
a driver must wait on the status bits or the interrupt, as on the real device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from itertools import repeat
from operator import attrgetter

from pcipass.device import IrqKind
from pcipass.models import Model, ModelRegion

log = logging.getLogger(__name__)

EDU_VENDOR = 0x1234
EDU_DEVICE = 0x11E8
EDU_REVISION = 0x10
EDU_CLASS = 0x00FF00  # unclassified device (PCI_CLASS_OTHERS), prog-if 0
EDU_ID = 0x010000ED
BAR0_SIZE = 1 << 20

REG_ID = 0x00
REG_LIVENESS = 0x04
REG_FACTORIAL = 0x08
REG_STATUS = 0x20
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

# The registers that are one attribute each (mmio_reader).
REGISTERS = {REG_LIVENESS: "liveness", REG_FACTORIAL: "fact", REG_STATUS: "status", REG_IRQ_STATUS: "irq_status"}

STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
FACT_IRQ = 0x001
DMA_IRQ = 0x100
DMA_RUN = 0x1
DMA_TO_RAM = 0x2  # direction bit: 0 = RAM -> buffer, 1 = buffer -> RAM
DMA_IRQ_ON_DONE = 0x4
DMA_START = 0x40000
DMA_SIZE = 4096
DMA_MASK = (1 << 28) - 1
# How long a DMA takes (QEMU: 100 ms of virtual time). Short, but not zero:
# a driver that does not wait for completion sees the run bit still set.
DMA_DELAY = 0.002


class Edu(Model):
    name = "edu"

    def __init__(self) -> None:
        super().__init__()
        cfg = self.config
        cfg.header(vendor=EDU_VENDOR, device=EDU_DEVICE, revision=EDU_REVISION, class_code=EDU_CLASS,
                   subsystem_vendor=0x1AF4, subsystem=0x1100, interrupt_pin=1)
        cfg.bar(0, BAR0_SIZE)
        self.msi_cap = cfg.add_msi(vectors=1, bits64=True)
        self.regions = {0: ModelRegion(0, BAR0_SIZE, read=self.mmio_read, write=self.mmio_write, reader=self.mmio_reader)}
        self.irqs = {IrqKind.INTX: 1, IrqKind.MSI: 1}
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.liveness = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma = {REG_DMA_SRC: 0, REG_DMA_DST: 0, REG_DMA_COUNT: 0, REG_DMA_CMD: 0}
        self.buffer = bytearray(DMA_SIZE)
        self._generation = getattr(self, "_generation", 0) + 1  # cancels work scheduled before a reset

    def reset(self) -> None:
        super().reset()
        self._reset_registers()

    # --- interrupts (edu_raise_irq / edu_lower_irq) ---
    def raise_irq(self, bits: int) -> None:
        self.irq_status |= bits
        if self.irq_status:
            if self.msi_enabled():
                self.ctx.msi(0)
            else:
                self.set_intx(True)

    def lower_irq(self, bits: int) -> None:
        self.irq_status &= ~bits
        if not self.irq_status and not self.msi_enabled():
            self.set_intx(False)

    # --- BAR0 ---
    def mmio_read(self, offset: int, width: int) -> int:
        ones = (1 << (8 * width)) - 1
        if (offset < 0x80 and width != 4) or (offset >= 0x80 and width not in (4, 8)):
            return ones
        if offset == REG_ID:
            return EDU_ID
        if offset == REG_LIVENESS:
            return self.liveness
        if offset == REG_FACTORIAL:
            return self.fact
        if offset == REG_STATUS:
            return self.status
        if offset == REG_IRQ_STATUS:
            return self.irq_status
        if offset in self.dma:
            return self.dma[offset] & ones
        return ones

    def mmio_reader(self, offset: int, width: int) -> Callable[[], int] | None:
        """mmio_read(offset, width) prepared (ModelRegion.reader): no Python frame per read."""
        if (offset < 0x80 and width != 4) or (offset >= 0x80 and width not in (4, 8)):
            return repeat((1 << (8 * width)) - 1).__next__
        if offset == REG_ID:
            return repeat(EDU_ID).__next__
        name = REGISTERS.get(offset)
        if name is not None:
            return partial(attrgetter(name), self)
        return None  # the DMA registers (a dict a reset replaces) and the rest: mmio_read

    def mmio_write(self, offset: int, width: int, value: int) -> None:
        if (offset < 0x80 and width != 4) or (offset >= 0x80 and width not in (4, 8)):
            return
        if offset == REG_LIVENESS:
            self.liveness = ~value & 0xFFFFFFFF
        elif offset == REG_FACTORIAL:
            if self.status & STATUS_COMPUTING:
                return
            self.fact = value
            self.status |= STATUS_COMPUTING
            gen = self._generation
            self.ctx.schedule(0, lambda: self._factorial_done(gen))
        elif offset == REG_STATUS:
            if value & STATUS_IRQFACT:
                self.status |= STATUS_IRQFACT
            else:
                self.status &= ~STATUS_IRQFACT
        elif offset == REG_IRQ_RAISE:
            self.raise_irq(value)
        elif offset == REG_IRQ_ACK:
            self.lower_irq(value)
        elif offset in self.dma:
            if self.dma[REG_DMA_CMD] & DMA_RUN:
                return  # registers are locked while a transfer runs
            if offset == REG_DMA_CMD:
                if not value & DMA_RUN:
                    return
                gen = self._generation
                self.ctx.schedule(DMA_DELAY, lambda: self._dma_done(gen))
            self.dma[offset] = value

    def _factorial_done(self, gen: int) -> None:
        if gen != self._generation:
            return
        n, result = self.fact, 1
        while n > 0:
            result = (result * n) & 0xFFFFFFFF
            n -= 1
        self.fact = result
        self.status &= ~STATUS_COMPUTING
        if self.status & STATUS_IRQFACT:
            self.raise_irq(FACT_IRQ)

    def _dma_done(self, gen: int) -> None:
        if gen != self._generation or not self.dma[REG_DMA_CMD] & DMA_RUN:
            return
        cmd, count = self.dma[REG_DMA_CMD], self.dma[REG_DMA_COUNT]
        to_ram = bool(cmd & DMA_TO_RAM)
        dev_addr = self.dma[REG_DMA_SRC] if to_ram else self.dma[REG_DMA_DST]
        ram_addr = (self.dma[REG_DMA_DST] if to_ram else self.dma[REG_DMA_SRC]) & DMA_MASK
        if not (DMA_START <= dev_addr and dev_addr + count <= DMA_START + DMA_SIZE):
            # QEMU logs a guest error; we refuse the transfer rather than overrun the buffer.
            log.warning("edu: DMA of %d bytes at device address %#x is outside the buffer", count, dev_addr)
        else:
            at = dev_addr - DMA_START
            try:
                if to_ram:
                    self.ctx.dma_write(ram_addr, bytes(self.buffer[at : at + count]))
                else:
                    self.buffer[at : at + count] = self.ctx.dma_read(ram_addr, count)
            except PermissionError as exc:
                # An IOMMU fault, in effect: the client did not map that address.
                log.warning("edu: DMA at %#x blocked: %s", ram_addr, exc)
        self.dma[REG_DMA_CMD] = cmd & ~DMA_RUN
        if cmd & DMA_IRQ_ON_DONE:
            self.raise_irq(DMA_IRQ)
