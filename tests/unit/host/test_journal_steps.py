"""The journal's step vocabulary: every step name a pcipass ever wrote still replays.

The names below are the record of what is on disk (spelled out here, not taken from the
code): a name pcipass stops writing stays, and renaming a method must not lose one.
"""

from __future__ import annotations

import json

from pcipass.errors import PcipassError
from pcipass.host.fixtures import synthetic
from pcipass.host.transaction.journal import SCHEMA, STEP_ACTIONS, Journal
from pcipass.host.transaction.journaled import Transaction
from pcipass.host.transaction.simulated import SimulatedKernel
from pcipass.host.transaction.writer import SysfsWriter

EVER_WRITTEN = {
    "pcipass/journal/1": [
        "modprobe", "noiommu", "override-set", "unbind", "probe", "bind", "expect",
        "pciback-new-slot", "pciback-remove-slot", "pciback-permissive", "pciback-quirk",
        "node-owner", "node-restore",
        "sriov-autoprobe", "sriov-numvfs",  # replayed in test_host_sriov.py
        "reset-method",
    ],
}
# Replayed elsewhere, on a tree with an SR-IOV PF: test_host_sriov.test_a_journal_of_sriov_steps_replays_from_disk.
REPLAYED_ELSEWHERE = {"sriov-autoprobe", "sriov-numvfs"}

EDU, NVME = "0000:00:0a.0", "0000:03:00.0"
# One journal that holds every step name: the edu to vfio-pci in no-IOMMU mode with its node
# given to uid 1000 and back, then the NVMe to pciback with a quirk and back to nvme.
STEPS = [
    ["modprobe", None, "vfio-pci"],
    ["noiommu", None, "Y"],
    ["override-set", EDU, "vfio-pci"],
    ["probe", EDU, None],
    ["expect", EDU, "vfio-pci"],
    ["node-owner", None, "/dev/vfio/3 1000:1000 600"],
    ["node-restore", None, "/dev/vfio/3 0:0 600"],
    ["override-set", EDU, None],
    ["unbind", EDU, "vfio-pci"],
    ["expect", EDU, None],
    ["noiommu", None, "N"],
    ["modprobe", None, "xen-pciback"],
    ["pciback-new-slot", NVME, None],
    ["override-set", NVME, "pciback"],
    ["unbind", NVME, "nvme"],
    ["bind", NVME, "pciback"],
    ["pciback-permissive", NVME, None],
    ["pciback-quirk", NVME, "e0:2:ff"],
    ["expect", NVME, "pciback"],
    ["override-set", NVME, None],
    ["unbind", NVME, "pciback"],
    ["pciback-remove-slot", NVME, None],
    ["probe", NVME, None],
    ["bind", NVME, "nvme"],
    ["expect", NVME, "nvme"],
    ["reset-method", NVME, "bus"],
    ["reset-method", NVME, "flr bus"],
]


def _journal_text() -> str:
    """A record as pcipass/journal/1 writes it, field by field."""
    return json.dumps({
        "key": "3", "group": 3, "target": "vfio", "op": "claim", "state": "in-progress",
        "devices": [{"bdf": EDU, "original_driver": None, "original_override": None, "is_bridge": False,
                     "pciback_slot_added": False, "taken": True}],
        "steps": [{"action": a, "bdf": b, "value": v} for a, b, v in STEPS],
        "done": 0, "since": 1700000000.0, "pid": 1, "command": "pcipass claim 00:0a.0",
        "noiommu_original": None, "owner": None, "nodes": [], "schema": "pcipass/journal/1",
    })


def test_the_table_holds_every_name_ever_written_and_each_has_its_operation():
    for schema, names in EVER_WRITTEN.items():
        assert set(names) <= STEP_ACTIONS[schema], schema
    assert set(SysfsWriter.STEPS) == STEP_ACTIONS[SCHEMA]
    for action, method in SysfsWriter.STEPS.items():
        assert callable(getattr(SysfsWriter, method)), action
    assert {a for a, _, _ in STEPS} | REPLAYED_ELSEWHERE == set(EVER_WRITTEN[SCHEMA])


def test_a_journal_with_every_step_name_replays_from_disk(tmp_path):
    tree = synthetic.seed_layout(str(tmp_path / "root"))
    journal = Journal(tmp_path / "state")
    journal.ensure_dir()
    journal.path("3").write_text(_journal_text())
    record = journal.read("3")
    writer = SimulatedKernel(tree.root)
    Transaction(journal, writer, crash=lambda n: None).run(record)
    assert journal.read("3").done == len(STEPS)
    assert writer.driver(EDU) is None and writer.driver(NVME) == "nvme"
    assert ("dev/vfio/3", "1000:1000 600") in writer.writes and ("dev/vfio/3", "0:0 600") in writer.writes
    assert ("drivers/pciback/quirks", f"{NVME}-e0:2:ff") in writer.writes
    assert ("drivers/pciback/permissive", NVME) in writer.writes
    assert writer.noiommu_mode() == "N"
    assert ("devices/0000:03:00.0/reset_method", "bus") in writer.writes and writer.reset_method_now(NVME) == "flr bus"


def test_a_step_name_no_pcipass_wrote_is_a_damaged_journal(tmp_path):
    journal = Journal(tmp_path / "state")
    journal.ensure_dir()
    journal.path("3").write_text(_journal_text().replace('"probe"', '"probe-harder"'))
    try:
        journal.read("3")
    except PcipassError as e:
        assert e.code == "journal-damaged" and "probe-harder" in e.message
    else:
        raise AssertionError("an unknown step was read")
