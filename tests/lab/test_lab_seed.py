"""The lab itself, proven on the real kernel: the seed topology's IOMMU groups."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from guest_pci import PCI, find, group_members, ids

from pcipass.lab.topology import EDU


@pytest.mark.lab(topology="seed")
def test_seed_topology_groups_bridge_with_both_functions() -> None:
    assert os.environ.get("PCIPASS_LAB_GUEST") == "1" and os.geteuid() == 0
    assert "intel_iommu=on" in Path("/proc/cmdline").read_text()
    assert any(Path("/sys/class/iommu").iterdir()), "the emulated VT-d is not active"
    edus = find(EDU)
    behind = [b for b in edus if b.endswith((":0d.0", ":0d.1"))]
    standalone = [b for b in edus if b not in behind]
    assert len(behind) == 2 and len(standalone) == 1, edus

    # Both functions behind the bridge share one group with the bridge, and nothing else.
    bridge = (PCI / behind[0]).resolve().parent.name
    assert (PCI / bridge / "class").read_text().startswith("0x0604")
    assert set(group_members(behind[0])) == {bridge, *behind}
    assert set(group_members(behind[1])) == {bridge, *behind}
    # The edu on the root bus is alone in its own group.
    assert group_members(standalone[0]) == [standalone[0]]


@pytest.mark.lab
def test_default_topology_has_devices_with_real_drivers() -> None:
    drivers = {}
    for dev in PCI.iterdir():
        driver = dev / "driver"
        drivers[ids(dev.name)] = driver.resolve().name if driver.exists() else None
    assert drivers.get("1b36:0010") == "nvme"
    assert drivers.get("8086:10d3") == "e1000e"
    assert EDU in drivers
