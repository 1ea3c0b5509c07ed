"""A submission queue and its completion queue, in DMA memory, with their doorbells.

The driver owns the submission queue's tail and the completion queue's head;
the controller owns the other ends. A completion entry is new when its phase
tag matches the phase the driver expects; the expected phase flips each time
the head wraps to 0, so the queue memory never has to be cleared again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pcipass.device import DmaBuffer, EventFd, Region
from pcipass.drivers.nvme_cmd import CQE_SIZE, SQE_SIZE, Command, Completion
from pcipass.drivers.nvme_regs import cq_head_doorbell, sq_tail_doorbell
from pcipass.errors import PcipassError

# With interrupts, how long to sleep on the eventfd before looking at the
# completion queue anyway (a lost interrupt costs this much, not a hang).
IRQ_SLICE_S = 0.1
# Without interrupts, how often to look at the completion queue.
POLL_INTERVAL_S = 0.0002


@dataclass
class QueueStats:
    submitted: int = 0
    completed: int = 0
    by_interrupt: int = 0  # completions found right after the eventfd fired
    by_polling: int = 0  # completions found without an interrupt


class QueuePair:
    def __init__(
        self,
        qid: int,
        entries: int,
        sq: DmaBuffer,
        cq: DmaBuffer,
        bar: Region,
        dstrd: int,
        irq: EventFd | None = None,
    ) -> None:
        if entries < 2:
            raise ValueError(f"queue {qid}: {entries} entries; a queue needs at least 2")
        if sq.size < entries * SQE_SIZE or cq.size < entries * CQE_SIZE:
            raise ValueError(f"queue {qid}: buffers too small for {entries} entries")
        self.qid = qid
        self.entries = entries
        self.sq, self.cq = sq, cq
        self.bar = bar
        self.irq = irq
        self.sq_doorbell = sq_tail_doorbell(qid, dstrd)
        self.cq_doorbell = cq_head_doorbell(qid, dstrd)
        self.sq_tail = 0
        self.sq_head = 0  # as last reported by the controller in a completion
        self.cq_head = 0
        self.phase = 1  # the controller writes phase 1 on its first pass
        self.stats = QueueStats()
        self._next_cid = 0
        self._done: dict[int, Completion] = {}
        # A new queue's completion memory must read as phase 0 everywhere.
        cq.window.bytes[: entries * CQE_SIZE] = bytes(entries * CQE_SIZE)

    @property
    def free_slots(self) -> int:
        # One slot stays empty: head == tail means empty, not full.
        return (self.sq_head - self.sq_tail - 1) % self.entries

    def submit(self, command: Command) -> int:
        """Place `command` at the tail, ring the doorbell, return its command ID."""
        if not self.free_slots:
            raise PcipassError(
                f"NVMe queue {self.qid} is full ({self.entries - 1} commands outstanding)",
                hint="wait for completions before submitting more",
                code="nvme-queue-full",
            )
        cid = self._next_cid
        self._next_cid = (cid + 1) & 0xFFFF
        offset = self.sq_tail * SQE_SIZE
        self.sq.window.bytes[offset : offset + SQE_SIZE] = command.pack(cid)
        self.sq_tail = (self.sq_tail + 1) % self.entries
        self.bar.write(self.sq_doorbell, 4, self.sq_tail)
        self.stats.submitted += 1
        return cid

    def reap(self) -> int:
        """Collect every new completion, then tell the controller how far we got."""
        count = 0
        while True:
            offset = self.cq_head * CQE_SIZE
            # Dword 3 holds the phase tag: one load decides whether the entry is new.
            if (self.cq.window.read(offset + 12, 4) >> 16) & 1 != self.phase:
                break
            completion = Completion.unpack(bytes(self.cq.window.bytes[offset : offset + CQE_SIZE]))
            self.sq_head = completion.sq_head
            self._done[completion.cid] = completion
            self.cq_head += 1
            if self.cq_head == self.entries:
                self.cq_head = 0
                self.phase ^= 1
            count += 1
        if count:
            self.bar.write(self.cq_doorbell, 4, self.cq_head)
            self.stats.completed += count
        return count

    def take(self, cid: int) -> Completion | None:
        return self._done.pop(cid, None)

    def wait(self, cid: int, timeout: float) -> Completion | None:
        """The completion of `cid`, by interrupt when there is one; None after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            completion = self.take(cid)
            if completion is not None:
                return completion
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.irq is not None:
                fired = self.irq.wait(min(left, IRQ_SLICE_S))
                found = self.reap()
                if fired:
                    self.stats.by_interrupt += found
                else:
                    self.stats.by_polling += found
            else:
                found = self.reap()
                self.stats.by_polling += found
                if not found:
                    time.sleep(POLL_INTERVAL_S)
