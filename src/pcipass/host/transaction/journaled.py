"""Transaction: runs a journal record's steps through the writer, writing the journal after
each (write-ahead: the record is on disk before the first change), and gives a group back.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pcipass.host.transaction.crash import crash_at_step
from pcipass.host.transaction.journal import (
    CLAIM,
    DONE,
    IN_PROGRESS,
    Journal,
    NodeRecord,
    Record,
    Step,
)
from pcipass.host.transaction.plan import give_back_steps
from pcipass.host.transaction.writer import SysfsWriter


class Transaction:
    """Runs a record's steps, journaling each; the crash hook is injectable for tests."""

    def __init__(self, journal: Journal, writer: SysfsWriter,
                 crash: Callable[[int], None] = crash_at_step) -> None:
        self.journal = journal
        self.writer = writer
        self.crash = crash

    def run(self, record: Record) -> None:
        self.journal.write(record)
        self.crash(0)
        # What the child that waits out a blocked unbind does once it goes through.
        self.writer.finish = lambda: self.finish(record.key)
        for i in range(record.done, len(record.steps)):
            step = record.steps[i]
            if step.action == "node-owner":
                self._remember_node(record, step)
            self.writer.apply(step)
            self.crash(i + 1)
            record.done = i + 1
            self.journal.write(record)

    def _remember_node(self, record: Record, step: Step) -> None:
        """Write-ahead for a node: how it was, in the journal, before it is given away."""
        path = self.writer.wait_node(step.bdf, str(step.value).split()[0])
        if path is None:
            return
        name = "/" + os.path.relpath(path, self.writer.root)
        if any(n.path == name for n in record.nodes):
            return
        state = self.writer.node_state(path)
        if state is not None:
            record.nodes.append(NodeRecord(name, *state))
            self.journal.write(record)

    def give_back(self, record: Record, op: str) -> None:
        """Drive every device back to its original state; the journal goes when it is done."""
        others = self.journal.records()
        record.op, record.state, record.done = op, IN_PROGRESS, 0
        record.steps = give_back_steps(record, self.writer, others)
        self.run(record)
        self.journal.remove(record.key)

    def finish(self, key: str) -> None:
        """As recover would: roll back an interrupted claim, complete an interrupted release."""
        record = self.journal.read(key)
        if record is None or (record.op == CLAIM and record.state == DONE):
            return
        Transaction(self.journal, self.writer, crash=lambda n: None).give_back(record, record.op)
