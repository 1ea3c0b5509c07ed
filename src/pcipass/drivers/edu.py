"""A driver for QEMU's `edu` teaching device, written only against pcipass.device.Device.

Register facts are from QEMU's docs/specs/edu.rst and hw/misc/edu.c: BAR0
holds 32-bit registers below 0x80 (any other access width reads all ones and
is ignored on write) and 64-bit-capable DMA registers from 0x80; the device
sees only the low 28 bits of a DMA address; its DMA buffer is 4 KiB at
0x40000; it raises interrupt status 0x01 after a factorial and 0x100 after a
DMA, through MSI when enabled, else INTx.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from pcipass.device import Device, EventFd, IrqKind, set_command
from pcipass.errors import PcipassError
from pcipass.pci import PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_DEVICE_ID, PCI_VENDOR_ID

VENDOR_ID, DEVICE_ID = 0x1234, 0x11E8

# BAR0 registers
EDU_ID = 0x00  # 0xRRrr00ed: major, minor, 0x00, 0xed
EDU_LIVENESS = 0x04  # reads back the bitwise inverse of what was written
EDU_FACTORIAL = 0x08
EDU_STATUS = 0x20
EDU_STATUS_COMPUTING = 0x01
EDU_STATUS_IRQFACT = 0x80
EDU_IRQ_STATUS = 0x24
EDU_IRQ_RAISE = 0x60
EDU_IRQ_ACK = 0x64
EDU_DMA_SRC = 0x80
EDU_DMA_DST = 0x88
EDU_DMA_COUNT = 0x90
EDU_DMA_CMD = 0x98
EDU_DMA_CMD_START = 0x01
EDU_DMA_CMD_TO_RAM = 0x02  # direction: 0 RAM -> edu, 1 edu -> RAM
EDU_DMA_CMD_IRQ = 0x04

IRQ_FACTORIAL = 0x001
IRQ_DMA = 0x100

DMA_BUFFER = 0x40000  # the device's own 4 KiB buffer, in its address space
DMA_BUFFER_SIZE = 4096
# QEMU up to 7.2 stops the whole VM (hw_error) on a transfer that ends exactly at the
# end of the buffer (an off-by-one in edu_check_range, QEMU issue #1254, fixed in 8.0):
# so one transfer never reaches the last byte, and bigger ones go in chunks.
DMA_CHUNK = 2048
DMA_MASK_BITS = 28
BAR0 = 0

_FACT_MAX = 12  # 13! does not fit the 32-bit register


# QEMU's edu has no reset handler: a PCI reset (it has none of its own anyway) leaves BAR0's
# registers as the last driver left them. What a write can set back to its power-on value:
# liveness (power-on 0, so write its inverse), the factorial-interrupt enable, the interrupt
# status, the DMA addresses and count. The factorial (a write starts a computation) and the
# DMA command's direction and IRQ bits (a write without START is ignored) cannot be.
POWER_ON = {EDU_LIVENESS: 0, EDU_STATUS: 0, EDU_IRQ_STATUS: 0, EDU_DMA_SRC: 0, EDU_DMA_DST: 0, EDU_DMA_COUNT: 0}


class Registers(Protocol):
    def read(self, offset: int, width: int) -> int: ...

    def write(self, offset: int, width: int, value: int) -> None: ...


def restore_registers(bar: Registers, timeout: float = 2.0) -> None:
    """Set an edu's registers back to their power-on values where a write can (see POWER_ON):
    what a function reset would do if edu had one. First waits (up to `timeout`) for a
    factorial or DMA in flight to finish, so that its completion interrupt comes before the
    acknowledgement rather than after it. Bus mastering should be off already: a DMA still
    running then reaches nothing."""
    deadline = time.monotonic() + timeout
    while (bar.read(EDU_STATUS, 4) & EDU_STATUS_COMPUTING or bar.read(EDU_DMA_CMD, 8) & EDU_DMA_CMD_START) \
            and time.monotonic() < deadline:
        time.sleep(0.001)
    bar.write(EDU_STATUS, 4, 0)
    bar.write(EDU_IRQ_ACK, 4, 0xFFFFFFFF)
    bar.write(EDU_LIVENESS, 4, 0xFFFFFFFF)  # it holds the inverse of what is written
    for reg in (EDU_DMA_SRC, EDU_DMA_DST, EDU_DMA_COUNT):
        bar.write(reg, 8, 0)


@dataclass(frozen=True)
class Ident:
    major: int
    minor: int
    raw: int


class Edu:
    """Drive an edu device. `irq` picks MSI (default when present) or INTx for completions."""

    def __init__(self, dev: Device, *, irq: IrqKind | None = None, timeout: float = 10.0) -> None:
        self.dev = dev
        self.bar = dev.region(BAR0)
        self.timeout = timeout
        vendor, device = dev.config_read(PCI_VENDOR_ID, 2), dev.config_read(PCI_DEVICE_ID, 2)
        if (vendor, device) != (VENDOR_ID, DEVICE_ID):
            raise PcipassError(f"{dev.name} is {vendor:04x}:{device:04x}, not an edu ({VENDOR_ID:04x}:{DEVICE_ID:04x})",
                               hint="point the edu driver at QEMU's edu device (`pcipass list`)", code="edu-wrong-device")
        if irq is None:
            irq = IrqKind.MSI if dev.irq_count(IrqKind.MSI) else IrqKind.INTX
        self.irq_kind = irq
        self._irq: EventFd | None = None
        # Memory decoding for the registers, bus mastering for DMA.
        set_command(dev, on=PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    # ---- identification and liveness
    def ident(self) -> Ident:
        raw = self.bar.read(EDU_ID, 4)
        if raw & 0xFF != 0xED:
            raise PcipassError(f"{self.dev.name}: edu identification register reads {raw:#010x}, not 0xRRrr00ed",
                               hint="the device is not answering; reset it or check the binding", code="edu-ident")
        return Ident(raw >> 24, (raw >> 16) & 0xFF, raw)

    def liveness(self, value: int = 0x12345678) -> bool:
        """The device inverts what is written to the liveness register."""
        self.bar.write(EDU_LIVENESS, 4, value)
        return self.bar.read(EDU_LIVENESS, 4) == (~value & 0xFFFFFFFF)

    # ---- interrupts
    def enable_irq(self) -> EventFd:
        if self._irq is None:
            self._irq = self.dev.irq_enable(self.irq_kind, 1)[0]
        return self._irq

    def disable_irq(self) -> None:
        if self._irq is not None:
            self.dev.irq_disable(self.irq_kind)
            self._irq = None

    def wait_irq(self, expect: int) -> int:
        """Wait for the completion interrupt carrying `expect`, acknowledge it; returns the status."""
        assert self._irq is not None
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._irq.wait(left):
                raise PcipassError(f"{self.dev.name}: no {self.irq_kind.name} interrupt within {self.timeout} s",
                                   hint="check that interrupts reach the device's eventfd (dmesg)",
                                   code="edu-irq-timeout")
            status = self.bar.read(EDU_IRQ_STATUS, 4)
            if status:
                self.bar.write(EDU_IRQ_ACK, 4, status)
            if self.irq_kind == IrqKind.INTX:
                self.dev.irq_unmask(IrqKind.INTX)  # level-triggered: the kernel masked it
            if status & expect:
                return status

    def raise_irq(self, value: int = 0x8000) -> None:
        """Ask the device to raise an interrupt with `value` in its status (for tests and benches)."""
        self.bar.write(EDU_IRQ_RAISE, 4, value)

    # ---- factorial
    def factorial(self, n: int, *, use_irq: bool = False) -> int:
        if not 0 <= n <= _FACT_MAX:
            raise PcipassError(f"edu computes factorials of 0..{_FACT_MAX} in 32 bits, not {n}",
                               hint=f"ask for n <= {_FACT_MAX}", code="edu-factorial-range")
        self._wait_idle()
        if use_irq:
            self.enable_irq()
            self.bar.write(EDU_STATUS, 4, EDU_STATUS_IRQFACT)
            self.bar.write(EDU_FACTORIAL, 4, n)
            self.wait_irq(IRQ_FACTORIAL)
        else:
            self.bar.write(EDU_STATUS, 4, 0)
            self.bar.write(EDU_FACTORIAL, 4, n)
            self._wait_idle()
        return self.bar.read(EDU_FACTORIAL, 4)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.timeout
        while self.bar.read(EDU_STATUS, 4) & EDU_STATUS_COMPUTING:
            if time.monotonic() > deadline:
                raise PcipassError(f"{self.dev.name}: factorial still computing after {self.timeout} s",
                                   hint="reset the device", code="edu-busy")
            time.sleep(0.0005)

    # ---- DMA between host memory and the device's buffer
    def _dma(self, iova: int, size: int, to_ram: bool, offset: int = 0) -> None:
        if size <= 0 or offset < 0 or offset + size >= DMA_BUFFER_SIZE:
            raise PcipassError(f"edu DMA of {size} bytes at buffer offset {offset} does not fit before the last byte "
                               f"of its {DMA_BUFFER_SIZE}-byte buffer", hint=f"split the transfer (at most "
                               f"{DMA_BUFFER_SIZE - 1 - offset} bytes from there; see DMA_CHUNK)",
                               code="edu-dma-size")
        if iova >> DMA_MASK_BITS:
            raise PcipassError(f"IOVA {iova:#x} is beyond edu's {DMA_MASK_BITS}-bit DMA mask",
                               hint=f"allocate with dma_alloc(size, dma_mask_bits={DMA_MASK_BITS})",
                               code="edu-dma-mask")
        self.enable_irq()
        src, dst = (DMA_BUFFER + offset, iova) if to_ram else (iova, DMA_BUFFER + offset)
        self.bar.write(EDU_DMA_SRC, 8, src)
        self.bar.write(EDU_DMA_DST, 8, dst)
        self.bar.write(EDU_DMA_COUNT, 8, size)
        cmd = EDU_DMA_CMD_START | EDU_DMA_CMD_IRQ | (EDU_DMA_CMD_TO_RAM if to_ram else 0)
        self.bar.write(EDU_DMA_CMD, 8, cmd)
        self.wait_irq(IRQ_DMA)
        if self.bar.read(EDU_DMA_CMD, 8) & EDU_DMA_CMD_START:
            raise PcipassError(f"{self.dev.name}: DMA still running after its interrupt", hint="reset the device",
                               code="edu-dma-busy")

    def dma_to_device(self, iova: int, size: int, offset: int = 0) -> None:
        """RAM at `iova` -> the device buffer at `offset`; waits for the completion interrupt."""
        self._dma(iova, size, to_ram=False, offset=offset)

    def dma_from_device(self, iova: int, size: int, offset: int = 0) -> None:
        """The device buffer at `offset` -> RAM at `iova`; waits for the completion interrupt."""
        self._dma(iova, size, to_ram=True, offset=offset)

    def dma_roundtrip(self, data: bytes) -> bytes:
        """Send `data` through the device buffer, chunk by chunk, into a second host buffer."""
        size = max(len(data), 1)
        pages = (size + 4095) // 4096 * 4096
        out = self.dev.dma_alloc(pages, dma_mask_bits=DMA_MASK_BITS)
        back = self.dev.dma_alloc(pages, dma_mask_bits=DMA_MASK_BITS)
        try:
            out.window.bytes[: len(data)] = data
            for start in range(0, len(data), DMA_CHUNK):
                n = min(DMA_CHUNK, len(data) - start)
                self.dma_to_device(out.iova + start, n)
                self.dma_from_device(back.iova + start, n)
            return bytes(back.window.bytes[: len(data)])
        finally:
            self.dev.dma_free(out)
            self.dev.dma_free(back)

    def close(self) -> None:
        self.disable_irq()


# ---------------------------------------------------------------- `pcipass drive edu BDF`
def run_all(dev: Device, *, irq: IrqKind | None = None, say=print) -> bool:  # type: ignore[no-untyped-def]
    """Every check in turn, saying what happened; True when all passed."""
    import os

    edu = Edu(dev, irq=irq)
    ok = True
    try:
        ident = edu.ident()
        say(f"ident      {ident.raw:#010x} (edu version {ident.major}.{ident.minor})")
        alive = edu.liveness()
        ok &= alive
        say(f"liveness   {'ok: the device inverted what was written' if alive else 'FAILED'}")
        polled = edu.factorial(12)
        ok &= polled == 479001600
        say(f"factorial  12! = {polled} (polled)")
        irq_result = edu.factorial(12, use_irq=True)
        ok &= irq_result == 479001600
        say(f"factorial  12! = {irq_result} (completion interrupt via {edu.irq_kind.name})")
        data = os.urandom(DMA_BUFFER_SIZE)
        back = edu.dma_roundtrip(data)
        ok &= back == data
        say(f"dma        {len(data)} random bytes to the device and back: "
            f"{'equal' if back == data else 'DIFFERENT'} (interrupt via {edu.irq_kind.name})")
    finally:
        edu.close()
    return ok


def main(argv: list[str] | None = None) -> int:
    import argparse

    import pcipass.vfio

    parser = argparse.ArgumentParser(prog="pcipass drive edu",
                                     description="Drive QEMU's edu device: ident, liveness, factorial, DMA.")
    parser.add_argument("bdf", nargs="?", help="the edu device's PCI address, bound to vfio-pci")
    parser.add_argument("--socket", metavar="PATH", help="drive the edu a vfio-user backend serves (pcipass serve)")
    parser.add_argument("--irq", choices=("auto", "msi", "intx"), default="auto",
                        help="completion interrupts through MSI or INTx (default: MSI when present)")
    args = parser.parse_args(argv)
    irq = {"auto": None, "msi": IrqKind.MSI, "intx": IrqKind.INTX}[args.irq]
    if (args.bdf is None) == (args.socket is None):
        parser.error("give the edu's BDF or --socket PATH")
    if args.socket:
        from pcipass.domain import connect

        dev = connect(args.socket)
    else:
        dev = pcipass.vfio.open_device(args.bdf)
    try:
        ok = run_all(dev, irq=irq)
    finally:
        dev.close()
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1
