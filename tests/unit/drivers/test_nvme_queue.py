"""One queue pair on its own: tail and head, wrap-around, phase tags, a full queue."""

from __future__ import annotations

import pytest

from pcipass.device import EventFd, MappedWindow, RegionInfo
from pcipass.drivers.nvme_cmd import Command
from pcipass.drivers.nvme_queue import QueuePair
from pcipass.errors import PcipassError


class Buffer:
    def __init__(self, iova: int, size: int) -> None:
        self.iova, self.size = iova, size
        self.mem = bytearray(size)
        self.window = MappedWindow(memoryview(self.mem))


class Doorbells:
    info = RegionInfo(0, 0x2000, True, True, True)

    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def read(self, offset: int, width: int) -> int:
        raise AssertionError("a queue only writes doorbells")

    def write(self, offset: int, width: int, value: int) -> None:
        assert width == 4
        self.writes.append((offset, value))


def post(cq: Buffer, slot: int, cid: int, sq_head: int, phase: int, status: int = 0) -> None:
    """Write a completion entry the way a controller would."""
    entry = bytes(8) + sq_head.to_bytes(2, "little") + (1).to_bytes(2, "little")
    entry += cid.to_bytes(2, "little") + (status << 1 | phase).to_bytes(2, "little")
    cq.mem[slot * 16 : slot * 16 + 16] = entry


def make(
    entries: int = 4, irq: EventFd | None = None
) -> tuple[QueuePair, Buffer, Buffer, Doorbells]:
    sq, cq, bar = Buffer(0x10000, 4096), Buffer(0x20000, 4096), Doorbells()
    cq.mem[:] = b"\xff" * 4096  # stale memory: the queue must clear it
    return QueuePair(1, entries, sq, cq, bar, dstrd=0, irq=irq), sq, cq, bar


def test_submit_writes_the_entry_and_rings_the_tail() -> None:
    queue, sq, _, bar = make()
    cids = [queue.submit(Command(0x02, nsid=1, cdw10=n)) for n in range(3)]
    assert cids == [0, 1, 2]
    assert [sq.mem[n * 64] for n in range(3)] == [0x02] * 3
    cdw10s = [int.from_bytes(sq.mem[n * 64 + 40 : n * 64 + 44], "little") for n in range(3)]
    assert cdw10s == [0, 1, 2]
    assert bar.writes == [(0x1008, 1), (0x1008, 2), (0x1008, 3)]  # SQ 1 tail doorbell


def test_a_full_queue_refuses_and_recovers() -> None:
    queue, _, cq, _ = make(entries=4)
    for _ in range(3):
        queue.submit(Command(0x00))
    assert queue.free_slots == 0
    with pytest.raises(PcipassError, match="queue 1 is full"):
        queue.submit(Command(0x00))
    post(cq, 0, cid=0, sq_head=1, phase=1)
    assert queue.reap() == 1
    assert queue.free_slots == 1
    queue.submit(Command(0x00))


def test_phase_flips_when_the_head_wraps() -> None:
    queue, _, cq, bar = make(entries=3)
    seen = []
    for n in range(7):
        cid = queue.submit(Command(0x00))
        slot, lap = n % 3, n // 3
        phase = 1 - lap % 2  # 1 on the first pass, 0 on the second, ...
        # An entry from the previous lap (the other phase) is not new.
        assert queue.reap() == 0
        post(cq, slot, cid=cid, sq_head=(n + 1) % 3, phase=phase)
        assert queue.reap() == 1
        completion = queue.take(cid)
        assert completion is not None and completion.cid == cid
        seen.append((queue.cq_head, queue.phase))
        assert bar.writes[-1] == (0x100C, queue.cq_head)  # CQ 1 head doorbell
    assert seen == [(1, 1), (2, 1), (0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]


def test_several_completions_are_reaped_with_one_doorbell() -> None:
    queue, _, cq, bar = make(entries=8)
    cids = [queue.submit(Command(0x00)) for _ in range(4)]
    for slot, cid in enumerate(reversed(cids)):  # completions may come out of order
        post(cq, slot, cid=cid, sq_head=slot + 1, phase=1)
    before = len(bar.writes)
    assert queue.reap() == 4
    assert bar.writes[before:] == [(0x100C, 4)]
    assert all(queue.take(cid) is not None for cid in cids)


def test_wait_uses_the_interrupt_and_times_out_without_a_completion() -> None:
    irq = EventFd()
    queue, _, cq, _ = make(irq=irq)
    cid = queue.submit(Command(0x00))
    post(cq, 0, cid=cid, sq_head=1, phase=1)
    irq.signal()
    completion = queue.wait(cid, timeout=1.0)
    assert completion is not None and queue.stats.by_interrupt == 1 and queue.stats.by_polling == 0
    cid = queue.submit(Command(0x00))
    assert queue.wait(cid, timeout=0.05) is None
    irq.close()
