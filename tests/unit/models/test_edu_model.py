"""The edu model on its own: registers as hw/misc/edu.c has them, DMA only through the context."""

from __future__ import annotations

import pytest

from pcipass import pci
from pcipass.device import IrqKind
from pcipass.models import ConfigSpace, ModelRegion, create
from pcipass.models import edu as e
from pcipass.pci import PCI_COMMAND_INTX_DISABLE, PCI_STATUS_INTERRUPT


class Ctx:
    """A backend stand-in: one mapped window of client memory, recorded interrupts, timers run on demand."""

    def __init__(self, base=0x100000, size=0x2000):
        self.base, self.mem = base, bytearray(size)
        self.intx, self.msis, self.timers = [], [], []

    def dma_read(self, address, size):
        if not (self.base <= address and address + size <= self.base + len(self.mem)):
            raise PermissionError("unmapped")
        return bytes(self.mem[address - self.base : address - self.base + size])

    def dma_write(self, address, data):
        if not (self.base <= address and address + len(data) <= self.base + len(self.mem)):
            raise PermissionError("unmapped")
        self.mem[address - self.base : address - self.base + len(data)] = data

    def set_intx(self, level):
        self.intx.append(level)

    def msi(self, vector):
        self.msis.append(vector)

    def schedule(self, delay, cb):
        self.timers.append(cb)

    def run(self):
        while self.timers:
            self.timers.pop(0)()


@pytest.fixture
def edu():
    model = create("edu")
    ctx = Ctx()
    model.attach(ctx)
    yield model, ctx
    model.close()


def test_config_space_is_qemus_edu(edu):
    model, _ = edu
    cfg = model.config
    assert cfg.read(0, 4) == 0x11E81234
    assert cfg.read(8, 4) == 0x00FF0010  # class 00ff, revision 0x10
    assert cfg.read(pci.PCI_INTERRUPT_PIN, 1) == 1
    caps = list(pci.capabilities(cfg.read))
    assert [(c.id, c.offset) for c in caps] == [(pci.PCI_CAP_ID_MSI, 0x40)]
    assert cfg.read(0x42, 2) & 0x80  # 64-bit MSI, one vector


def test_bar0_sizing_reads_back_the_size_mask(edu):
    cfg = edu[0].config
    cfg.write(0x10, 4, 0xFFFFFFFF)
    assert cfg.read(0x10, 4) == 0xFFF00000  # 1 MiB, 32-bit memory
    cfg.write(0x14, 4, 0xFFFFFFFF)
    assert cfg.read(0x14, 4) == 0  # no BAR1


def test_id_liveness_and_width_rules(edu):
    bar = edu[0].regions[0]
    assert bar.do_read(e.REG_ID, 4) == 0x010000ED
    assert bar.do_read(e.REG_ID, 2) == 0xFFFF  # below 0x80 only 4-byte accesses answer
    assert bar.do_read(e.REG_ID, 1) == 0xFF
    bar.do_write(e.REG_LIVENESS, 4, 0x12345678)
    assert bar.do_read(e.REG_LIVENESS, 4) == 0xEDCBA987
    bar.do_write(e.REG_LIVENESS, 2, 0)  # ignored
    assert bar.do_read(e.REG_LIVENESS, 4) == 0xEDCBA987
    bar.do_write(e.REG_DMA_SRC, 8, 0x1234_5678_9ABC)
    assert bar.do_read(e.REG_DMA_SRC, 8) == 0x1234_5678_9ABC
    assert bar.do_read(e.REG_DMA_SRC, 4) == 0x5678_9ABC
    assert bar.do_read(e.REG_DMA_SRC, 2) == 0xFFFF


def test_factorial_is_busy_until_done_and_raises_its_interrupt(edu):
    model, ctx = edu
    bar = model.regions[0]
    bar.do_write(e.REG_STATUS, 4, e.STATUS_IRQFACT)
    bar.do_write(e.REG_FACTORIAL, 4, 12)
    assert bar.do_read(e.REG_STATUS, 4) & e.STATUS_COMPUTING
    bar.do_write(e.REG_FACTORIAL, 4, 3)  # ignored while computing
    ctx.run()
    assert bar.do_read(e.REG_FACTORIAL, 4) == 479001600
    assert not bar.do_read(e.REG_STATUS, 4) & e.STATUS_COMPUTING
    assert bar.do_read(e.REG_IRQ_STATUS, 4) == e.FACT_IRQ and ctx.intx == [True]
    bar.do_write(e.REG_IRQ_ACK, 4, e.FACT_IRQ)
    assert ctx.intx == [True, False]
    bar.do_write(e.REG_FACTORIAL, 4, 13)  # wraps in 32 bits, as the C device
    ctx.run()
    assert bar.do_read(e.REG_FACTORIAL, 4) == 6227020800 & 0xFFFFFFFF


def test_intx_shows_in_status_and_the_disable_bit_holds_the_line(edu):
    # As QEMU's PCI core: uio_pci_generic (seen with QEMU 11.1's vfio-user client) reads the
    # status bit to know the interrupt is its own and masks with the command register's bit.
    model, ctx = edu
    status = lambda: model.config.read(pci.PCI_STATUS, 2) & PCI_STATUS_INTERRUPT  # noqa: E731
    model.regions[0].do_write(e.REG_IRQ_RAISE, 4, 1)
    assert status() and ctx.intx == [True]
    model.config_write(pci.PCI_COMMAND, 2, PCI_COMMAND_INTX_DISABLE)
    assert status() and ctx.intx == [True, False]  # still pending, no longer on the line
    model.regions[0].do_write(e.REG_IRQ_RAISE, 4, 2)
    assert ctx.intx == [True, False, False]
    model.config_write(pci.PCI_COMMAND, 2, 0)
    assert ctx.intx[-1] is True  # unmasked while pending: on the line again
    model.regions[0].do_write(e.REG_IRQ_ACK, 4, 3)
    assert not status() and ctx.intx[-1] is False


def test_msi_replaces_intx_once_enabled(edu):
    model, ctx = edu
    model.set_msi_enabled(True)
    model.regions[0].do_write(e.REG_IRQ_RAISE, 4, 0x8000)
    assert ctx.msis == [0] and ctx.intx == []


def test_dma_round_trip_masks_to_28_bits_and_raises_dma_irq(edu):
    model, ctx = edu
    bar = model.regions[0]
    ctx.mem[:4] = b"edu!"

    def dma(src, dst, count, cmd):
        bar.do_write(e.REG_DMA_SRC, 8, src)
        bar.do_write(e.REG_DMA_DST, 8, dst)
        bar.do_write(e.REG_DMA_COUNT, 8, count)
        bar.do_write(e.REG_DMA_CMD, 8, cmd)

    # RAM -> buffer, RAM address given with bits above the mask: the device drops them
    dma(0xF000_0000 | ctx.base, e.DMA_START, 4, e.DMA_RUN)
    assert bar.do_read(e.REG_DMA_CMD, 8) & e.DMA_RUN
    bar.do_write(e.REG_DMA_COUNT, 8, 99)  # locked while running
    ctx.run()
    assert bytes(model.buffer[:4]) == b"edu!"
    assert bar.do_read(e.REG_DMA_COUNT, 8) == 4
    # buffer -> RAM, with the interrupt
    dma(e.DMA_START, ctx.base + 0x100, 4, e.DMA_RUN | e.DMA_TO_RAM | e.DMA_IRQ_ON_DONE)
    ctx.run()
    assert ctx.mem[0x100:0x104] == b"edu!"
    assert bar.do_read(e.REG_IRQ_STATUS, 4) == e.DMA_IRQ
    assert not bar.do_read(e.REG_DMA_CMD, 8) & e.DMA_RUN


def test_dma_outside_client_memory_or_the_buffer_reaches_nothing(edu):
    model, ctx = edu
    bar = model.regions[0]
    model.buffer[:4] = b"keep"
    for src, dst in ((e.DMA_START, 0x5000), (e.DMA_START + 4095, ctx.base)):
        bar.do_write(e.REG_DMA_SRC, 8, src)
        bar.do_write(e.REG_DMA_DST, 8, dst)
        bar.do_write(e.REG_DMA_COUNT, 8, 4)
        bar.do_write(e.REG_DMA_CMD, 8, e.DMA_RUN | e.DMA_TO_RAM)
        ctx.run()
        assert not bar.do_read(e.REG_DMA_CMD, 8) & e.DMA_RUN
    assert ctx.mem == bytearray(len(ctx.mem))


def test_reset_clears_registers_and_cancels_pending_work(edu):
    model, ctx = edu
    bar = model.regions[0]
    bar.do_write(e.REG_FACTORIAL, 4, 5)
    model.config.write(4, 2, 0x6)
    model.reset()
    ctx.run()  # the factorial scheduled before the reset must not land
    assert bar.do_read(e.REG_FACTORIAL, 4) == 0
    assert bar.do_read(e.REG_STATUS, 4) == 0
    assert model.config.read(4, 2) == 0


def test_config_space_write_masks_and_w1c():
    cfg = ConfigSpace()
    cfg.header(vendor=1, device=2, revision=0, class_code=0)
    cfg.write(0, 4, 0)
    assert cfg.read(0, 4) == 0x00020001  # IDs are read-only
    cfg.data[6:8] = (0x8000 | 0x10).to_bytes(2, "little")
    cfg.write(6, 2, 0x8010)
    assert cfg.read(6, 2) == 0x10  # error bit cleared by writing 1, cap-list bit stays


def test_region_mixes_trapped_registers_and_memory():
    model = create("scratch")
    try:
        bar = model.regions[0]
        bar.do_write(0, 4, 7)
        assert bar.do_read(0, 4) == 7 and bar.do_read(8, 4) == 1
        bar.do_write(4096, 8, 0x1122334455667788)
        assert model.regions[0].memory.window.read(4096, 8) == 0x1122334455667788
        assert ModelRegion(9, 16).do_read(0, 4) == 0xFFFFFFFF  # no callbacks, no memory: all ones
    finally:
        model.close()


def test_unknown_model_name_is_a_usage_error():
    from pcipass.errors import UsageError

    with pytest.raises(UsageError) as exc:
        create("nope")
    assert "edu" in exc.value.hint


def test_declared_interrupts():
    model = create("edu")
    assert model.irqs == {IrqKind.INTX: 1, IrqKind.MSI: 1}


def test_prepared_register_readers_read_what_mmio_read_does():
    m = create("edu")
    m.attach(Ctx())
    readers = {(o, w): m.mmio_reader(o, w) for o in range(0, 0xA0, 2) for w in (1, 2, 4, 8)}
    assert readers[(e.REG_ID, 4)] is not None and readers[(e.REG_STATUS, 4)] is not None
    for step in range(3):  # the same before and after the registers change, and after a reset
        for (o, w), read in readers.items():
            assert (read or (lambda: m.mmio_read(o, w)))() == m.mmio_read(o, w), (step, hex(o), w)
        if step == 0:
            m.mmio_write(e.REG_LIVENESS, 4, 0x1234)
            m.mmio_write(e.REG_STATUS, 4, e.STATUS_IRQFACT)
            m.mmio_write(e.REG_IRQ_RAISE, 4, 0x8)
            m.mmio_write(e.REG_FACTORIAL, 4, 5)
        else:
            m.reset()
    m.detach()
