"""One rule for which drivers may share a VFIO group (pcipass.sysfs.may_share_group): the
host's verdict and the vfio library's naming of a group's blockers agree on every tree,
the lab's snapshot and the synthetic layouts, with the drivers dealt out in every rotation."""

from __future__ import annotations

import os
import shutil

import pytest

from pcipass.host.fixtures import synthetic
from pcipass.host.model.sysfs import Host
from pcipass.host.verdict.judge import judge_group, member_allowed
from pcipass.vfio import sysfs as vfio_sysfs

SNAPSHOT = os.path.join(os.path.dirname(__file__), "..", "data", "lab-snapshot")
LAYOUTS = {
    "seed": synthetic.seed_layout,
    "switch-without-acs": synthetic.switch_without_acs,
    "multifunction-without-acs": synthetic.multifunction_without_acs,
    "sriov": synthetic.sriov,
    "many": lambda root: synthetic.many(root, 20),
}
# None: unbound. The rest: pass-through drivers, port drivers and host drivers.
DRIVERS = (None, "vfio-pci", "pci-stub", "pciback", "pcieport", "shpchp", "nvme", "e1000e")


def _rebind(root: str, bdf: str, driver: str | None) -> None:
    link = os.path.join(root, "sys/bus/pci/devices", bdf, "driver")
    if os.path.lexists(link):
        old = os.path.basename(os.readlink(link))
        os.unlink(link)
        back = os.path.join(root, "sys/bus/pci/drivers", old, bdf)
        if os.path.lexists(back):
            os.unlink(back)
    if driver is None:
        return
    real = os.path.realpath(os.path.join(root, "sys/bus/pci/devices", bdf))
    drivers = os.path.join(root, "sys/bus/pci/drivers", driver)
    os.makedirs(drivers, exist_ok=True)
    os.symlink(os.path.relpath(drivers, real), os.path.join(real, "driver"))
    os.symlink(os.path.relpath(real, drivers), os.path.join(drivers, bdf))


def _agree(root: str) -> int:
    """Asserts the two agree on every group of the tree; returns how many members blocked."""
    host = Host(root)
    blocked = 0
    for group in host.groups():
        by_verdict = {m.name for m in group.devices if not member_allowed(m)}
        members = judge_group(host, group.number).members  # none in a group of bridges only
        assert not members or {m.bdf for m in members if m.blocks} == by_verdict
        by_library = {bdf for bdf, _ in vfio_sysfs.blockers(os.path.join(root, "sys"), group.number)}
        assert by_library == by_verdict, f"group {group.number}"
        blocked += len(by_verdict)
    return blocked


def test_the_lab_snapshot_as_captured():
    _agree(SNAPSHOT)


@pytest.mark.parametrize("rotation", range(len(DRIVERS)))
def test_the_lab_snapshot_with_drivers_dealt(tmp_path, rotation):
    root = str(tmp_path / "lab")
    shutil.copytree(SNAPSHOT, root, symlinks=True)
    names = sorted(os.listdir(os.path.join(root, "sys/bus/pci/devices")))
    for i, bdf in enumerate(names):
        _rebind(root, bdf, DRIVERS[(i + rotation) % len(DRIVERS)])
    _agree(root)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_synthetic_layouts_with_drivers_dealt(tmp_path, layout):
    blocked = _agree(LAYOUTS[layout](str(tmp_path / "as-made")).root)
    for rotation in range(len(DRIVERS)):
        tree = LAYOUTS[layout](str(tmp_path / f"r{rotation}"))
        for i, bdf in enumerate(sorted(tree.devices)):
            _rebind(tree.root, bdf, DRIVERS[(i + rotation) % len(DRIVERS)])
        blocked += _agree(tree.root)
    assert blocked, "some member blocks in some rotation, so the agreement is tested on both sides"


def test_a_bridge_on_its_port_driver_is_no_blocker(tmp_path):
    # The vfio library named a bridge on pcieport as the blocker before the rule was one.
    tree = synthetic.seed_layout(str(tmp_path / "seed"))
    _rebind(tree.root, "0000:01:00.0", "pcieport")
    group = Host(tree.root).device("0000:01:00.0").iommu_group
    assert vfio_sysfs.blockers(os.path.join(tree.root, "sys"), group) == []
