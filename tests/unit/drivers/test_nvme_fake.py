"""A small NVMe controller simulated in Python, behind the Device interface.

It is written from the specification's side, independently of the driver: it
parses submission entries by byte offset, walks PRPs and PRP lists the way a
controller does, posts completions with phase tags and raises MSI-X vectors.
The driver's tests run against it, so mistakes in PRPs, doorbells, phases or
queue setup show up as wrong data or error statuses, not as echoed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pcipass.device import EventFd, IrqKind, MappedWindow, RegionInfo, check_access

PAGE = 4096


class DmaFault(Exception):
    pass


class FakeBuffer:
    def __init__(self, iova: int, size: int) -> None:
        self.iova = iova
        self.size = size
        self.mem = bytearray(size)
        self.window = MappedWindow(memoryview(self.mem), f"dma@{iova:#x}")


def _put(data: bytearray, offset: int, value: int, size: int) -> None:
    data[offset : offset + size] = value.to_bytes(size, "little")


def identify_controller_bytes(
    serial: str, model: str, firmware: str, mdts: int, nn: int = 1
) -> bytes:
    data = bytearray(4096)
    _put(data, 0, 0x1B36, 2)  # VID
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


class FakeNvme:
    """Device + controller. `blocks` of `block_size` bytes of storage in namespace 1."""

    def __init__(
        self,
        *,
        blocks: int = 256,
        block_size: int = 4096,
        dstrd: int = 0,
        mdts: int = 0,
        msix_vectors: int = 4,
        deliver_interrupts: bool = True,
        serial: str = "FAKE0001",
        model: str = "Fake NVMe Ctrl",
        firmware: str = "1.0",
    ) -> None:
        self.name = "fake-nvme"
        self.block_size = block_size
        self.storage = bytearray(blocks * block_size)
        self.nsze = blocks
        self.dstrd = dstrd
        self.msix_vectors = msix_vectors
        self.deliver_interrupts = deliver_interrupts
        self.id_ctrl = identify_controller_bytes(serial, model, firmware, mdts)
        self.id_ns = identify_namespace_bytes(blocks, block_size.bit_length() - 1)
        self.config = bytearray(256)
        self.buffers: dict[int, FakeBuffer] = {}
        self.next_iova = 0x1000_0000
        self.irqs: list[EventFd] = []
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
        self.regs = {0x14: 0, 0x1C: 0, 0x24: 0, 0x28: 0, 0x2C: 0, 0x30: 0, 0x34: 0}
        self._reset_queues()

    # Device interface.

    def config_read(self, offset: int, width: int) -> int:
        check_access(offset, width, len(self.config), "config")
        return int.from_bytes(self.config[offset : offset + width], "little")

    def config_write(self, offset: int, width: int, value: int) -> None:
        check_access(offset, width, len(self.config), "config")
        self.config[offset : offset + width] = value.to_bytes(width, "little")

    def region(self, index: int) -> FakeBar:
        assert index == 0
        return FakeBar(self)

    def dma_alloc(self, size: int, *, dma_mask_bits: int = 64) -> FakeBuffer:
        assert size % PAGE == 0
        buffer = FakeBuffer(self.next_iova, size)
        self.buffers[buffer.iova] = buffer
        self.next_iova += size + PAGE  # a hole after each buffer catches overruns
        return buffer

    def dma_free(self, buffer: FakeBuffer) -> None:
        del self.buffers[buffer.iova]
        buffer.window.release()

    def irq_count(self, kind: IrqKind) -> int:
        return self.msix_vectors if kind == IrqKind.MSIX else 0

    def irq_enable(self, kind: IrqKind, count: int = 1) -> list[EventFd]:
        assert kind == IrqKind.MSIX and count <= self.msix_vectors
        self.irqs = [EventFd() for _ in range(count)]
        return list(self.irqs)

    def irq_disable(self, kind: IrqKind) -> None:
        for fd in self.irqs:
            fd.close()
        self.irqs = []

    def irq_unmask(self, kind: IrqKind = IrqKind.INTX, vector: int = 0) -> None:
        pass

    def reset(self) -> None:
        self._reset_queues()

    def close(self) -> None:
        pass

    # DMA as the controller sees it.

    def dma(self, iova: int, length: int) -> memoryview:
        for buffer in self.buffers.values():
            if buffer.iova <= iova and iova + length <= buffer.iova + buffer.size:
                start = iova - buffer.iova
                return memoryview(buffer.mem)[start : start + length]
        raise DmaFault(f"DMA to unmapped IOVA {iova:#x}+{length}")

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
            entry = int.from_bytes(self.dma(entry_addr, 8), "little")
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
        if offset == 0x00 and width == 8:
            return self.cap
        if offset in (0x00, 0x04) and width == 4:
            return (self.cap >> (8 * offset)) & 0xFFFFFFFF
        if offset == 0x08:
            return 0x00010400
        return self.regs.get(offset, 0)

    def reg_write(self, offset: int, width: int, value: int) -> None:
        self.log.register_writes.append((offset, width, value))
        assert width == 4, "this controller takes 32-bit register writes"
        if offset >= 0x1000:
            self._doorbell(offset, value)
            return
        old = self.regs.get(offset, 0)
        self.regs[offset] = value
        if offset == 0x14:
            self._cc_changed(old, value)

    def _cc_changed(self, old: int, new: int) -> None:
        if new & 1 and not old & 1:
            aqa = self.regs[0x24]
            self.sqs[0] = SQueue(self.regs[0x28] | self.regs[0x2C] << 32, (aqa & 0xFFF) + 1, 0)
            self.cqs[0] = CQueue(
                self.regs[0x30] | self.regs[0x34] << 32, ((aqa >> 16) & 0xFFF) + 1, 0
            )
            assert (new >> 16) & 0xF == 6 and (new >> 20) & 0xF == 4, "IOSQES/IOCQES not set"
            self.regs[0x1C] = 1  # RDY
        elif old & 1 and not new & 1:
            self._reset_queues()
            self.regs[0x1C] = 0
        if (new >> 14) & 3:
            self.regs[0x1C] = (self.regs[0x1C] & ~0xC) | 0b10 << 2  # SHST: complete

    def _doorbell(self, offset: int, value: int) -> None:
        stride = 4 << self.dstrd
        index, misaligned = divmod(offset - 0x1000, stride)
        assert not misaligned, f"doorbell write at {offset:#x} ignores the stride {stride}"
        qid, is_cq = divmod(index, 2)
        if is_cq:
            self.cqs[qid].head = value
            return
        sq = self.sqs[qid]
        while sq.head != value:
            entry = bytes(self.dma(sq.base + sq.head * 64, 64))
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
            except DmaFault:
                status = 0x04  # data transfer error
            except ValueError:
                status = 0x13  # PRP offset invalid
        self._complete(sq.cqid, qid, sq.head, cid, result, status)

    def _admin(self, opcode: int, nsid: int, prp1: int, cdw: list[int]) -> tuple[int, int]:
        if opcode == 0x06:  # Identify
            cns = cdw[10] & 0xFF
            if cns == 1:
                self.dma(prp1, 4096)[:] = self.id_ctrl
            elif cns == 0:
                self.dma(prp1, 4096)[:] = self.id_ns if nsid == 1 else bytes(4096)
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
        start, length = slba * self.block_size, nlb * self.block_size
        for iova, piece in self.prp_ranges(prp1, prp2, length):
            if opcode == 0x01:
                self.storage[start : start + piece] = self.dma(iova, piece)
            elif opcode == 0x02:
                self.dma(iova, piece)[:] = self.storage[start : start + piece]
            else:
                return 0x01
            start += piece
        return 0

    def _complete(
        self, cqid: int, sqid: int, sq_head: int, cid: int, result: int, status: int
    ) -> None:
        cq = self.cqs[cqid]
        entry = bytearray(16)
        _put(entry, 0, result, 4)
        _put(entry, 8, sq_head, 2)
        _put(entry, 10, sqid, 2)
        _put(entry, 12, cid, 2)
        _put(entry, 14, status << 1 | cq.phase, 2)
        self.dma(cq.base + cq.tail * 16, 16)[:] = entry
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail, cq.phase = 0, cq.phase ^ 1
        vector = cq.vector if cqid else 0
        if self.deliver_interrupts and vector is not None and vector < len(self.irqs):
            self.irqs[vector].signal()


class FakeBar:
    def __init__(self, ctrl: FakeNvme) -> None:
        self.ctrl = ctrl
        self.info = RegionInfo(0, 0x4000, True, True, True)

    def read(self, offset: int, width: int) -> int:
        check_access(offset, width, self.info.size, "BAR0")
        return self.ctrl.reg_read(offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        check_access(offset, width, self.info.size, "BAR0")
        self.ctrl.reg_write(offset, width, value)
