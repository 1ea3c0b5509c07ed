"""Every verdict code, each on the smallest tree that makes it."""

from __future__ import annotations

import os

import pytest

from pcipass import pci
from pcipass.errors import PcipassError, UsageError
from pcipass.host.fixtures import synthetic
from pcipass.host.model.sysfs import Host
from pcipass.host.verdict.judge import BLOCKING, INFO, REASONS, WARNING, judge, judge_group


def _seed(root):
    return synthetic.seed_layout(root)


def _no_iommu(root):
    return synthetic.seed_layout(root, iommu=False)


def _no_group(root):
    t = synthetic.seed_layout(root)
    os.unlink(os.path.join(t.devices["0000:00:0a.0"].path, "iommu_group"))
    return t


def _nvme_mounted(root):
    t = synthetic.Tree(root)
    t.add("00:01.0", *synthetic.ROOT_PORT, driver="pcieport", group=0, express=pci.PCI_EXP_TYPE_ROOT_PORT,
          acs=synthetic.ACS_FULL, reset_method=None)
    t.add("01:00.0", *synthetic.NVME, parent="00:01.0", driver="nvme", group=1, express=0, flr=True)
    t.add_block("nvme0n1", "01:00.0", partitions=("nvme0n1p1", "nvme0n1p2"))
    t.mount("/dev/nvme0n1p2", "/srv")
    return t


def _nic_up(root, **kw):
    t = synthetic.seed_layout(root)
    os.unlink(t.p("sys/class/net/enp4s0"))
    t.add_net("enp4s0", "04:00.0", up=True, **kw)
    return t


def _switch_member_busy(root):
    t = synthetic.switch_without_acs(root)
    t.add_net("eth0", "03:00.0", up=True, ipv4_route=True)
    return t


def _no_reset(root):
    t = synthetic.Tree(root)
    t.add("00:03.0", *synthetic.EDU, group=0, reset_method="")
    return t


def _short_config(root):
    t = synthetic.seed_layout(root)
    for name in ("0000:02:0d.0", "0000:01:00.0", "0000:00:09.0"):
        path = os.path.join(t.devices[name].path, "config")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:64])
    return t


def _vfio_bound(root):
    t = synthetic.switch_without_acs(root)
    return t


def _held(root, libvirt=False, unreadable=False):
    """The seed's standalone edu on vfio-pci with a process holding its group (a libvirt domain's
    QEMU, with the status XML libvirtd keeps, when `libvirt`; one whose fds cannot be read)."""
    from test_holders import add_process, write_libvirt_status

    from pcipass.host.transaction import claim as c

    t = synthetic.seed_layout(root)
    c.claim(c.Context(root), "00:0a.0")
    if unreadable:
        proc = add_process(root, 50, ["someone's"])
        (proc / "fd").rmdir()
        (proc / "fd").write_text("")  # listing it fails, as another user's does without root
        return t
    add_process(root, 50, ["qemu-system-x86_64"], fds={4: "/dev/vfio/3", 5: "anon_inode:[vfio-device]"})
    if libvirt:
        write_libvirt_status(root, "vm1", 50, [("0000:00:0a.0", "yes")])
    return t


def _xen_dom0(root):
    t = synthetic.seed_layout(root, iommu=False)
    t.xen_dom0()
    return t


def _xen_dom0_iommu(root, said):
    t = _xen_dom0(root)
    t.write("var/log/xen/console/hypervisor.log", f"(XEN) Intel VT-d iommu 0\n(XEN) I/O virtualisation {said}\n")
    return t


# code -> (tree builder, device to judge, the device the reason names)
def _chipset(root):
    """An ICH9-like chipset in one group: the LPC bridge and SMBus beside a SATA controller."""
    t = synthetic.Tree(root)
    t.add("00:00.0", 0x8086, 0x29C0, 0x060000, group=0, reset_method="")
    t.add("00:1f.0", 0x8086, 0x2918, 0x060100, driver="lpc_ich", group=1, multifunction=True, reset_method="")
    t.add("00:1f.2", 0x8086, 0x2922, 0x010601, driver="ahci", group=1, reset_method="")
    t.add("00:1f.3", 0x8086, 0x2930, 0x0C0500, driver="i801_smbus", group=1, reset_method="")
    return t


SCENARIOS = {
    "unknown-bdf": (_seed, "05:00.0", "0000:05:00.0"),
    "iommu-off": (_no_iommu, "00:0a.0", None),
    "xen-iommu-not-visible": (_xen_dom0, "03:00.0", None),
    "xen-iommu-on": (lambda r: _xen_dom0_iommu(r, "enabled"), "03:00.0", None),
    "xen-iommu-off": (lambda r: _xen_dom0_iommu(r, "disabled"), "03:00.0", None),
    "no-iommu-group": (_no_group, "00:0a.0", "0000:00:0a.0"),
    "system-device": (_chipset, "00:00.0", "0000:00:00.0"),
    "group-member-system-device": (_chipset, "00:1f.2", "0000:00:1f.0"),
    "is-bridge": (_seed, "01:00.0", "0000:01:00.0"),
    "group-member-bound-to-host-driver": (synthetic.switch_without_acs, "04:00.0", "0000:03:00.0"),
    "group-member-in-use": (_switch_member_busy, "04:00.0", "0000:03:00.0"),
    "behind-pcie-to-pci-bridge": (_seed, "02:0d.1", "0000:01:00.0"),
    "upstream-port-without-acs": (synthetic.switch_without_acs, "03:00.0", "0000:02:08.0"),
    "multifunction-without-acs": (synthetic.multifunction_without_acs, "01:00.1", "0000:01:00.1"),
    "acs-unknown": (_short_config, "02:0d.0", "0000:02:0d.0"),
    "block-device-in-use": (_nvme_mounted, "01:00.0", "0000:01:00.0"),
    "netdev-up": (lambda r: _nic_up(r, ipv6_addr=True), "04:00.0", "0000:04:00.0"),
    "netdev-up-no-address": (_nic_up, "04:00.0", "0000:04:00.0"),
    "boot-vga": (_seed, "00:02.0", "0000:00:02.0"),
    "no-reset": (_no_reset, "00:03.0", "0000:00:03.0"),
    "bus-reset-affects-others": (_seed, "02:0d.0", "0000:02:0d.0"),
    "sriov-vf": (synthetic.sriov, "01:02.1", "0000:01:02.1"),
    "sriov-pf-with-vfs": (synthetic.sriov, "01:00.0", "0000:01:00.0"),
    "bound-to-vfio": (_vfio_bound, "04:00.0", "0000:04:00.0"),
    "held-by-process": (_held, "00:0a.0", "0000:00:0a.0"),
    "held-by-libvirt": (lambda r: _held(r, libvirt=True), "00:0a.0", "0000:00:0a.0"),
    "holders-unknown": (lambda r: _held(r, unreadable=True), "00:0a.0", None),
    "bound-to-host-driver": (_seed, "03:00.0", "0000:03:00.0"),
}


def test_every_code_has_a_scenario():
    assert set(SCENARIOS) == set(REASONS)


@pytest.mark.parametrize("code", sorted(SCENARIOS))
def test_code(tmp_path, code):
    build, bdf, about = SCENARIOS[code]
    host = Host(build(str(tmp_path / "t")).root)
    verdict = judge(host, bdf)
    found = [r for r in verdict.reasons if r.code == code]
    assert found, f"{code} not in {verdict.codes()}"
    r = found[0]
    assert r.device == about
    assert r.severity in (BLOCKING, WARNING, INFO)
    assert r.hint and "{" not in r.hint, r.hint  # every placeholder filled
    assert verdict.ok == (not any(x.severity == BLOCKING for x in verdict.reasons))
    doc = r.to_json()
    assert doc["code"] == code and doc["severity"] == REASONS[code][0]


def test_clean_devices_pass(seed_host):
    assert judge(seed_host, "00:0a.0").reasons == []
    assert judge(seed_host, "03:00.0").ok


def test_iommu_off_names_the_argument_and_the_risk(tmp_path):
    v = judge(Host(_no_iommu(str(tmp_path)).root), "00:0a.0")
    r = v.reasons[0]
    assert "intel_iommu=on" in r.hint and "DMA" in r.message
    with pytest.raises(PcipassError) as e:
        v.refuse()
    assert e.value.code == "iommu-off"


def test_amd_host_is_told_amd_vi_needs_no_argument(tmp_path):
    # amd_iommu= has no `on`: Linux turns AMD-Vi on by itself when the firmware describes it.
    t = _no_iommu(str(tmp_path))
    t.write("proc/cpuinfo", "processor\t: 0\nvendor_id\t: AuthenticAMD\n")
    r = judge(Host(t.root), "00:0a.0").reasons[0]
    assert r.details["kernel_arg"] is None and "amd_iommu=on" not in r.hint
    assert "AMD-Vi" in r.hint and "amd_iommu=off" in r.hint


def test_the_firmwares_iommu_table_decides_the_argument_over_the_cpu_vendor(tmp_path):
    # The lab: QEMU's emulated VT-d (a DMAR table) with TCG's CPU saying AuthenticAMD.
    t = _no_iommu(str(tmp_path))
    t.write("proc/cpuinfo", "processor\t: 0\nvendor_id\t: AuthenticAMD\n")
    t.write("sys/firmware/acpi/tables/DMAR", "")
    r = judge(Host(t.root), "00:0a.0").reasons[0]
    assert r.details["kernel_arg"] == "intel_iommu=on" and "intel_iommu=on" in r.hint
    os.unlink(os.path.join(t.root, "sys/firmware/acpi/tables/DMAR"))
    t.write("sys/firmware/acpi/tables/IVRS", "")
    t.write("proc/cpuinfo", "processor\t: 0\nvendor_id\t: GenuineIntel\n")
    r = judge(Host(t.root), "00:0a.0").reasons[0]
    assert r.details["kernel_arg"] is None and "AMD-Vi" in r.hint


def test_acs_reason_names_the_missing_bits(tmp_path):
    t = synthetic.switch_without_acs(str(tmp_path), missing=pci.PCI_ACS_UF | pci.PCI_ACS_SV)
    r = next(r for r in judge(Host(t.root), "03:00.0").reasons if r.code == "upstream-port-without-acs")
    assert r.details["missing"] == "SV UF" and r.details["shared_with"] == ["0000:04:00.0"]
    assert "SV UF" in r.hint


def test_group_members_and_whether_they_block(tmp_path):
    h = Host(synthetic.switch_without_acs(str(tmp_path)).root)
    members = {m.bdf: (m.role, m.blocks) for m in judge(h, "04:00.0").members}
    assert members == {
        "0000:01:00.0": ("bridge", False),
        "0000:02:08.0": ("bridge", False),
        "0000:02:10.0": ("bridge", False),
        "0000:03:00.0": ("endpoint", True),  # e1000e: a host driver
        "0000:04:00.0": ("target", False),
    }


def test_mounted_partition_and_holders(tmp_path):
    t = _nvme_mounted(str(tmp_path))
    r = next(r for r in judge(Host(t.root), "01:00.0").reasons if r.code == "block-device-in-use")
    assert r.details["mounts"] == [("/dev/nvme0n1p2", "/srv")]
    t2 = synthetic.Tree(str(tmp_path / "h"))
    t2.add("00:04.0", *synthetic.NVME, driver="nvme", group=0)
    t2.add_block("nvme0n1", "00:04.0", holders=("dm-0",))
    assert "block-device-in-use" in judge(Host(t2.root), "00:04.0").codes()


def test_swap_counts_as_in_use(tmp_path):
    t = synthetic.Tree(str(tmp_path))
    t.add("00:04.0", *synthetic.NVME, driver="nvme", group=0)
    t.add_block("nvme0n1", "00:04.0")
    t.swap("/dev/nvme0n1")
    assert "block-device-in-use" in judge(Host(t.root), "00:04.0").codes()


def test_unmounted_disk_and_down_nic_do_not_block(seed_host):
    assert judge(seed_host, "03:00.0").ok and judge(seed_host, "04:00.0").ok


def test_netdev_route_only_blocks(tmp_path):
    t = _nic_up(str(tmp_path), ipv4_route=True)
    r = next(r for r in judge(Host(t.root), "04:00.0").reasons if r.code == "netdev-up")
    assert r.details["routes"] == ["192.168.0.0/24"] and "enp4s0" in r.hint


def test_bad_address_is_a_usage_error(seed_host):
    with pytest.raises(UsageError):
        judge(seed_host, "nonsense")


def test_group_verdict_names_the_bridge(seed_host):
    v = judge_group(seed_host, 2)
    assert [m.bdf for m in v.members] == ["0000:01:00.0", "0000:02:0d.0", "0000:02:0d.1"]
    bridge = [r for r in v.reasons if r.code == "behind-pcie-to-pci-bridge"]
    assert len(bridge) == 1 and bridge[0].device == "0000:01:00.0"


def test_group_verdict_blocks_when_a_member_is_busy(tmp_path):
    h = Host(_switch_member_busy(str(tmp_path)).root)
    v = judge_group(h, 2)
    assert not v.ok and "netdev-up" in v.codes()


def test_without_root_the_bridge_is_still_named(tmp_path):
    """64 bytes of config (no root): the step from conventional PCI up to PCIe names the bridge."""
    h = Host(_short_config(str(tmp_path)).root)
    v = judge(h, "02:0d.0")
    r = next(r for r in v.reasons if r.code == "behind-pcie-to-pci-bridge")
    assert r.device == "0000:01:00.0"
    assert "multifunction-without-acs" not in v.codes()  # unknown, not absent


def test_xen_dom0_is_not_refused_for_the_iommu_linux_cannot_see(tmp_path):
    v = judge(Host(_xen_dom0(str(tmp_path)).root), "02:0d.0")
    assert v.ok and "iommu-off" not in v.codes() and "xen-iommu-not-visible" in v.codes()


def test_bus_reset_reach_is_reported_even_when_flr_comes_first(tmp_path):
    t = synthetic.multifunction_without_acs(str(tmp_path))
    v = judge(Host(t.root), "01:00.0")
    assert v.reset_methods == ["flr", "bus"] and v.bus_reset_affects == ["0000:01:00.1"]
    assert "bus-reset-affects-others" not in v.codes()  # FLR is tried first
    assert v.to_json()["bus_reset_affects"] == ["0000:01:00.1"]
