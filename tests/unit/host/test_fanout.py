"""Listing in forked processes: the same results, in order, and a failed part done again here."""

from __future__ import annotations

import json
import os

import pytest

from pcipass.cli import main
from pcipass.host.fixtures import synthetic
from pcipass.host.model.pciids import load
from pcipass.host.model.sysfs import Host
from pcipass.host.present import inventory
from pcipass.host.speed import fanout


def squares(part):
    return [{"n": n, "square": n * n, "pid": os.getpid()} for n in part]


@pytest.mark.parametrize("processes", [1, 2, 3, 7])
def test_results_come_back_whole_and_in_order(processes):
    out = fanout.fan_out(squares, list(range(100)), processes)
    assert [r["square"] for r in out] == [n * n for n in range(100)]
    # Each part really ran in a process of its own.
    assert len({r["pid"] for r in out}) == min(processes, 100)


def test_a_part_whose_process_fails_is_done_again_here():
    parent = os.getpid()

    def fails_in_children(part):
        if os.getpid() != parent:
            raise RuntimeError("a child's failure")
        return [n + 1 for n in part]

    assert fanout.fan_out(fails_in_children, list(range(10)), 3) == list(range(1, 11))


def test_a_part_that_fails_everywhere_raises_here():
    def always_fails(part):
        raise ValueError(f"cannot do {len(part)}")

    with pytest.raises(ValueError, match="cannot do"):
        fanout.fan_out(always_fails, list(range(10)), 2)


def test_results_marshal_cannot_carry_are_refused_in_the_child_and_redone_here():
    parent = os.getpid()

    def objects(part):
        return [object() if os.getpid() != parent else n for n in part]

    assert fanout.fan_out(objects, list(range(6)), 2) == list(range(6))


def test_how_many_processes():
    assert fanout.processes_for(100, cpus=8) == 1  # too few devices to be worth a fork
    assert fanout.processes_for(2 * fanout.MIN_PER_PROCESS, cpus=8) == 2
    assert fanout.processes_for(100 * fanout.MIN_PER_PROCESS, cpus=8) == 8
    assert fanout.processes_for(100 * fanout.MIN_PER_PROCESS, cpus=1) == 1


def test_a_listing_in_processes_equals_one_in_this_process(tmp_path):
    tree = synthetic.many(str(tmp_path), 64)
    ids = load(None)
    one = inventory.list_doc(Host(tree.root), ids, processes=1)
    three = inventory.list_doc(Host(tree.root), ids, processes=3)
    assert len(one["devices"]) == 64 and one == three


def test_list_jobs_gives_the_same_output(tmp_path, capsys):
    tree = synthetic.many(str(tmp_path), 40)
    outputs = []
    for jobs in ("1", "4"):
        assert main(["list", "--json", "--sysfs", tree.root, "--jobs", jobs]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and len(outputs[0]["devices"]) == 40
