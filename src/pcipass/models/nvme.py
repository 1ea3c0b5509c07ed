"""A small NVMe controller, written from the specification's side (NVMe 1.4).

It parses submission entries by byte offset, walks PRPs and PRP lists the way
a controller does, posts completions with phase tags and raises MSI-X vectors,
independently of pcipass.drivers.nvme: the driver's tests run against it, so
mistakes in PRPs, doorbells, phases or queue setup show up as wrong data or
error statuses, not as echoed values. It reaches memory only through the
ModelContext (what the client mapped), like every model.

The knobs are for tests: `fail_next` answers a command with an error status
once, `log` records every command and register write, `deliver_interrupts`
False loses every interrupt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pcipass.device import IrqKind
from pcipass.models import Model, ModelRegion

PAGE = 4096
NVME_VENDOR = 0x1B36  # QEMU's NVMe controller (hw/nvme): Red Hat's vendor ID
NVME_DEVICE = 0x0010
NVME_CLASS = 0x010802  # mass storage, non-volatile memory, NVM Express
BAR0_SIZE = 0x4000
# Controller registers (NVMe 1.4, 3.1)
REG_CAP, REG_VS, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = 0x00, 0x08, 0x14, 0x1C, 0x24, 0x28, 0x30
DOORBELLS = 0x1000


def _put(data: bytearray, offset: int, value: int, size: int) -> None:
    data[offset : offset + size] = value.to_bytes(size, "little")


def identify_controller_bytes(serial: str, model: str, firmware: str, mdts: int, nn: int = 1) -> bytes:
    data = bytearray(4096)
    _put(data, 0, NVME_VENDOR, 2)  # VID
    _put(data, 2, 0x1AF4, 2)  # SSVID
    data[4:24] = serial.encode().ljust(20)
    data[24:64] = model.encode().ljust(40)
    data[64:72] = firmware.encode().ljust(8)
    data[77] = mdts
    _put(data, 80, 0x00010400, 4)  # VER
    data[512], data[513] = 0x66, 0x44  # SQES, CQES
    _put(data, 516, nn, 4)
    return bytes(data)


def identify_namespace_bytes(nsze: int, lbads: int) -> bytes:
    data = bytearray(4096)
    for off in (0, 8, 16):  # NSZE, NCAP, NUSE
        _put(data, off, nsze, 8)
    data[25] = 1  # NLBAF: two formats
    data[26] = 1  # FLBAS: the second one in use
    _put(data, 128, 9 << 16, 4)  # 512-byte blocks
    _put(data, 132, lbads << 16, 4)
    return bytes(data)


@dataclass
class CQueue:
    base: int
    size: int
    vector: int | None
    tail: int = 0
    head: int = 0
    phase: int = 1


@dataclass
class SQueue:
    base: int
    size: int
    cqid: int
    head: int = 0


@dataclass
class Log:
    # (qid, opcode, cdw10) of every command; (offset, width, value) of every register write.
    commands: list[tuple[int, int, int]] = field(default_factory=list)
    register_writes: list[tuple[int, int, int]] = field(default_factory=list)


class Nvme(Model):
    """An NVMe controller with `blocks` of `block_size` bytes in namespace 1, BAR0 its registers."""

    name = "nvme"

    def __init__(
        self,
        *,
        blocks: int = 256,
        block_size: int = 4096,
        dstrd: int = 0,
        mdts: int = 0,
        msix_vectors: int = 4,
        deliver_interrupts: bool = True,
        serial: str = "PCIPASS-NVME",
        model: str = "pcipass NVMe model",
        firmware: str = "1.0",
    ) -> None:
        super().__init__()
        self.config.header(vendor=NVME_VENDOR, device=NVME_DEVICE, revision=2, class_code=NVME_CLASS,
                           subsystem_vendor=0x1AF4, subsystem=0x1100)
        self.config.bar(0, BAR0_SIZE, bits64=True)
        self.regions = {0: ModelRegion(0, BAR0_SIZE, read=self.reg_read, write=self.reg_write)}
        self.irqs = {IrqKind.MSIX: msix_vectors} if msix_vectors else {}
        self.block_size = block_size
        self.storage = bytearray(blocks * block_size)
        self.nsze = blocks
        self.dstrd = dstrd
        self.msix_vectors = msix_vectors
        self.deliver_interrupts = deliver_interrupts
        self.id_ctrl = identify_controller_bytes(serial, model, firmware, mdts)
        self.id_ns = identify_namespace_bytes(blocks, block_size.bit_length() - 1)
        self.fail_next: dict[int, int] = {}  # opcode -> status field to answer once
        self.log = Log()
        self.cap = (
            2047  # MQES: 2048 entries
            | 1 << 16  # CQR
            | 2 << 24  # TO: 1 s
            | dstrd << 32
            | 1 << 37  # CSS: NVM
            | 0 << 48  # MPSMIN 4 KiB
            | 4 << 52  # MPSMAX 64 KiB
        )
        self.regs = {REG_CC: 0, REG_CSTS: 0, REG_AQA: 0, 0x28: 0, 0x2C: 0, 0x30: 0, 0x34: 0}
        self._reset_queues()

    def reset(self) -> None:
        """A function-level reset: the queues go, the media stays."""
        super().reset()
        self._reset_queues()

    # DMA as the controller sees it: only what the client mapped.

    def dma_read(self, iova: int, length: int) -> bytes:
        return self.ctx.dma_read(iova, length)

    def dma_write(self, iova: int, data: bytes) -> None:
        self.ctx.dma_write(iova, data)

    def prp_ranges(self, prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
        """(iova, length) pieces of a transfer, walking PRP1, PRP2 and PRP lists."""
        first = min(length, PAGE - prp1 % PAGE)
        ranges = [(prp1, first)]
        left = length - first
        if not left:
            return ranges
        if left <= PAGE:
            if prp2 % PAGE:
                raise ValueError("PRP2 data pointer not page aligned")
            return ranges + [(prp2, left)]
        entry_addr = prp2
        while left:
            entry = int.from_bytes(self.dma_read(entry_addr, 8), "little")
            last_slot = (entry_addr + 8) % PAGE == 0
            if last_slot and left > PAGE:
                entry_addr = entry  # chained to the next list page
                continue
            if entry % PAGE:
                raise ValueError("PRP list entry not page aligned")
            piece = min(left, PAGE)
            ranges.append((entry, piece))
            left -= piece
            entry_addr += 8
        return ranges

    # Registers.

    def _reset_queues(self) -> None:
        self.sqs: dict[int, SQueue] = {}
        self.cqs: dict[int, CQueue] = {}

    def reg_read(self, offset: int, width: int) -> int:
        if offset == REG_CAP and width == 8:
            return self.cap
        if offset in (0x00, 0x04) and width == 4:
            return (self.cap >> (8 * offset)) & 0xFFFFFFFF
        if offset == REG_VS:
            return 0x00010400
        return self.regs.get(offset, 0)

    def reg_write(self, offset: int, width: int, value: int) -> None:
        self.log.register_writes.append((offset, width, value))
        if width != 4:
            return  # this controller takes 32-bit register writes only (the log shows the others)
        if offset >= DOORBELLS:
            self._doorbell(offset, value)
            return
        old = self.regs.get(offset, 0)
        self.regs[offset] = value
        if offset == REG_CC:
            self._cc_changed(old, value)

    def _cc_changed(self, old: int, new: int) -> None:
        if new & 1 and not old & 1:
            aqa = self.regs[REG_AQA]
            self.sqs[0] = SQueue(self.regs[REG_ASQ] | self.regs[REG_ASQ + 4] << 32, (aqa & 0xFFF) + 1, 0)
            self.cqs[0] = CQueue(self.regs[REG_ACQ] | self.regs[REG_ACQ + 4] << 32, ((aqa >> 16) & 0xFFF) + 1, 0)
            if (new >> 16) & 0xF != 6 or (new >> 20) & 0xF != 4:
                self.regs[REG_CSTS] = 0b10  # IOSQES/IOCQES not set: controller fatal status
                return
            self.regs[REG_CSTS] = 1  # RDY
        elif old & 1 and not new & 1:
            self._reset_queues()
            self.regs[REG_CSTS] = 0
        if (new >> 14) & 3:
            self.regs[REG_CSTS] = (self.regs[REG_CSTS] & ~0xC) | 0b10 << 2  # SHST: complete

    def _doorbell(self, offset: int, value: int) -> None:
        stride = 4 << self.dstrd
        index, misaligned = divmod(offset - DOORBELLS, stride)
        if misaligned:
            return  # between doorbells: nothing there (the log shows the write)
        qid, is_cq = divmod(index, 2)
        if is_cq:
            if qid in self.cqs:
                self.cqs[qid].head = value
            return
        sq = self.sqs.get(qid)
        if sq is None:
            return
        while sq.head != value:
            entry = self.dma_read(sq.base + sq.head * 64, 64)
            sq.head = (sq.head + 1) % sq.size
            self._execute(qid, sq, entry)

    def _execute(self, qid: int, sq: SQueue, entry: bytes) -> None:
        opcode = entry[0]
        cid = int.from_bytes(entry[2:4], "little")
        nsid = int.from_bytes(entry[4:8], "little")
        prp1 = int.from_bytes(entry[24:32], "little")
        prp2 = int.from_bytes(entry[32:40], "little")
        cdw = [int.from_bytes(entry[4 * i : 4 * i + 4], "little") for i in range(16)]
        self.log.commands.append((qid, opcode, cdw[10]))
        result, status = 0, self.fail_next.pop(opcode, 0)
        if not status:
            try:
                if qid == 0:
                    result, status = self._admin(opcode, nsid, prp1, cdw)
                else:
                    status = self._nvm(opcode, nsid, prp1, prp2, cdw)
            except PermissionError:
                status = 0x04  # data transfer error: memory the client did not map
            except ValueError:
                status = 0x13  # PRP offset invalid
        self._complete(sq.cqid, qid, sq.head, cid, result, status)

    def _admin(self, opcode: int, nsid: int, prp1: int, cdw: list[int]) -> tuple[int, int]:
        if opcode == 0x06:  # Identify
            cns = cdw[10] & 0xFF
            if cns == 1:
                self.dma_write(prp1, self.id_ctrl)
            elif cns == 0:
                self.dma_write(prp1, self.id_ns if nsid == 1 else bytes(4096))
            else:
                return 0, 0x02
            return 0, 0
        if opcode == 0x09 and cdw[10] & 0xFF == 0x07:  # Set Features: Number of Queues
            return (min(cdw[11] >> 16, 7) << 16) | min(cdw[11] & 0xFFFF, 7), 0
        if opcode == 0x05:  # Create I/O CQ
            qid, size = cdw[10] & 0xFFFF, (cdw[10] >> 16) + 1
            vector = cdw[11] >> 16 if cdw[11] & 2 else None
            if vector is not None and vector >= self.msix_vectors:
                return 0, 1 << 8 | 0x08  # invalid interrupt vector
            self.cqs[qid] = CQueue(prp1, size, vector)
            return 0, 0
        if opcode == 0x01:  # Create I/O SQ
            qid, size, cqid = cdw[10] & 0xFFFF, (cdw[10] >> 16) + 1, cdw[11] >> 16
            if cqid not in self.cqs:
                return 0, 1 << 8 | 0x00  # completion queue invalid
            self.sqs[qid] = SQueue(prp1, size, cqid)
            return 0, 0
        if opcode == 0x00:  # Delete I/O SQ
            return 0, 0 if self.sqs.pop(cdw[10] & 0xFFFF, None) else 1 << 8 | 0x01
        if opcode == 0x04:  # Delete I/O CQ
            return 0, 0 if self.cqs.pop(cdw[10] & 0xFFFF, None) else 1 << 8 | 0x01
        return 0, 0x01  # invalid opcode

    def _nvm(self, opcode: int, nsid: int, prp1: int, prp2: int, cdw: list[int]) -> int:
        if nsid != 1:
            return 0x0B
        slba = cdw[10] | cdw[11] << 32
        nlb = (cdw[12] & 0xFFFF) + 1
        if slba + nlb > self.nsze:
            return 0x80  # LBA out of range
        if opcode not in (0x01, 0x02):
            return 0x01
        start, length = slba * self.block_size, nlb * self.block_size
        for iova, piece in self.prp_ranges(prp1, prp2, length):
            if opcode == 0x01:  # Write
                self.storage[start : start + piece] = self.dma_read(iova, piece)
            else:  # Read
                self.dma_write(iova, bytes(self.storage[start : start + piece]))
            start += piece
        return 0

    def _complete(self, cqid: int, sqid: int, sq_head: int, cid: int, result: int, status: int) -> None:
        cq = self.cqs[cqid]
        entry = bytearray(16)
        _put(entry, 0, result, 4)
        _put(entry, 8, sq_head, 2)
        _put(entry, 10, sqid, 2)
        _put(entry, 12, cid, 2)
        _put(entry, 14, status << 1 | cq.phase, 2)
        self.dma_write(cq.base + cq.tail * 16, bytes(entry))
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail, cq.phase = 0, cq.phase ^ 1
        vector = cq.vector if cqid else 0
        if self.deliver_interrupts and vector is not None:
            self.ctx.msix(vector)
