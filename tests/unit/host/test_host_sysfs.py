"""The host model over synthetic sysfs trees."""

from __future__ import annotations

import os

import pytest

from pcipass import pci
from pcipass.errors import PcipassError, UsageError
from pcipass.host.fixtures import synthetic
from pcipass.host.model.sysfs import Bdf, Host, parse_bdf


@pytest.mark.parametrize(
    "text, want",
    [
        ("02:0d.0", "0000:02:0d.0"),
        ("0000:02:0d.1", "0000:02:0d.1"),
        ("1:2:3.4", "0001:02:03.4"),
        ("  00:1F.7 ", "0000:00:1f.7"),
    ],
)
def test_parse_bdf_accepts_with_and_without_domain(text, want):
    assert str(parse_bdf(text)) == want


@pytest.mark.parametrize("text", ["", "02:0d", "02:0d.8", "02:20.0", "00000:00:00.0", "zz:00.0", "0000:02:0d.0.1"])
def test_parse_bdf_rejects_with_a_hint(text):
    with pytest.raises(UsageError) as e:
        parse_bdf(text)
    assert e.value.code == "bad-bdf"
    assert "pcipass list" in e.value.hint


def test_bdf_orders_and_prints_like_the_kernel():
    assert sorted([parse_bdf("01:00.0"), parse_bdf("00:1f.3")]) == [Bdf(0, 0, 0x1F, 3), Bdf(0, 1, 0, 0)]
    assert parse_bdf("02:0d.1").slot == "0000:02:0d"


def test_ids_driver_group_numa(seed_host):
    nvme = seed_host.device("03:00.0")
    assert (nvme.vendor, nvme.device) == (0x1B36, 0x0010)
    assert (nvme.subsystem_vendor, nvme.subsystem_device) == (0x1AF4, 0x1100)
    assert nvme.pci_class == 0x010802
    assert nvme.revision == 0
    assert nvme.driver == "nvme"
    assert nvme.driver_override is None
    assert nvme.iommu_group == 4
    assert nvme.numa_node is None
    edu = seed_host.device("0000:00:0a.0")
    assert edu.driver is None


def test_unknown_bdf_says_how_to_list(seed_host):
    with pytest.raises(PcipassError) as e:
        seed_host.device("05:00.0")
    assert e.value.code == "unknown-bdf"
    assert "pcipass list" in e.value.hint


def test_missing_tree_is_a_clear_error(tmp_path):
    with pytest.raises(PcipassError) as e:
        Host(str(tmp_path)).devices()
    assert e.value.code == "no-sysfs"


def test_bridge_chain_and_children(seed_host):
    edu = seed_host.device("02:0d.1")
    assert [str(d.bdf) for d in edu.upstream] == ["0000:01:00.0", "0000:00:09.0"]
    bridge = seed_host.device("01:00.0")
    assert bridge.is_bridge and bridge.header_type == pci.PCI_HEADER_TYPE_BRIDGE
    assert bridge.express_type == pci.PCI_EXP_TYPE_PCI_BRIDGE
    assert [d.name for d in bridge.children] == ["0000:02:0d.0", "0000:02:0d.1"]
    assert seed_host.device("00:09.0").parent is None
    assert not edu.is_bridge and not edu.is_pcie


def test_multifunction_from_header_or_sibling(seed_host):
    assert seed_host.device("02:0d.0").is_multifunction
    assert seed_host.device("02:0d.1").is_multifunction  # its sibling shares the slot
    assert not seed_host.device("03:00.0").is_multifunction


def test_groups_and_members(seed_host):
    groups = {g.number: [d.name for d in g.devices] for g in seed_host.groups()}
    assert groups[2] == ["0000:01:00.0", "0000:02:0d.0", "0000:02:0d.1"]
    assert groups[3] == ["0000:00:0a.0"]
    assert seed_host.device("02:0d.0").group == seed_host.group(2)
    assert seed_host.group(2).dev_path == "/dev/vfio/2"


def test_iommu_state(tmp_path):
    on = Host(synthetic.seed_layout(str(tmp_path / "on")).root).iommu
    assert on.enabled and on.units == ("dmar0",) and on.cmdline == ("intel_iommu=on",)
    off = Host(synthetic.seed_layout(str(tmp_path / "off"), iommu=False).root).iommu
    assert not off.enabled and off.units == () and off.groups == 0


def test_reset_methods_from_sysfs_and_fallback(seed_tree, seed_host):
    assert seed_host.device("03:00.0").reset_methods == ["flr", "bus"]
    assert seed_host.device("01:00.0").reset_methods == []
    # An older kernel: no reset_method, only `reset`; config space says FLR, a parent gives bus.
    path = seed_tree.devices["0000:03:00.0"].path
    os.unlink(os.path.join(path, "reset_method"))
    open(os.path.join(path, "reset"), "w").close()
    assert Host(seed_tree.root).device("03:00.0").reset_methods == ["flr", "pm", "bus"]


def test_driver_override_and_boot_vga(tmp_path):
    t = synthetic.Tree(str(tmp_path))
    t.add("00:02.0", *synthetic.VGA, group=0, boot_vga=True, driver_override="vfio-pci")
    dev = Host(t.root).device("00:02.0")
    assert dev.boot_vga and dev.driver_override == "vfio-pci"


def test_sriov_links(tmp_path):
    h = Host(synthetic.sriov(str(tmp_path), vfs=3).root)
    pf = h.device("01:00.0")
    assert [v.name for v in pf.virtfns] == ["0000:01:02.0", "0000:01:02.1", "0000:01:02.2"]
    assert pf.sriov_totalvfs == 64 and pf.sriov_numvfs == 3
    assert h.device("01:02.1").physfn == pf
    assert pf.physfn is None


def test_acs_read_from_config(tmp_path):
    h = Host(synthetic.switch_without_acs(str(tmp_path)).root)
    down = h.device("02:08.0")
    assert down.express_type == pci.PCI_EXP_TYPE_DOWNSTREAM
    assert down.acs is not None and down.acs.missing() == ["RR", "CR"]
    assert h.device("00:01.0").acs.missing() == []


def test_short_config_means_capabilities_unknown(tmp_path):
    """Without root, sysfs gives 64 bytes of config: no capability list, not an empty one."""
    t = synthetic.Tree(str(tmp_path))
    cfg = synthetic.config_space(*synthetic.NVME, express=pci.PCI_EXP_TYPE_ENDPOINT)
    t.add("00:03.0", *synthetic.NVME, group=0, config=cfg[:64])
    dev = Host(t.root).device("00:03.0")
    assert dev.capabilities is None and dev.acs is None and not dev.config_complete
    assert dev.header_type == 0


def test_virtual_function_ids_come_from_sysfs_not_config(tmp_path):
    """A VF's vendor/device registers read FFFFh; the kernel's attributes carry the real IDs."""
    t = synthetic.sriov(str(tmp_path), vfs=1)
    vf = Host(t.root).device("01:02.0")
    assert vf.config[:2] == b"\xff\xff"
    assert (vf.vendor, vf.device) == (0x8086, 0x154C)
