"""The model and the verdict on a snapshot of the lab (tests/data/lab-snapshot, taken by
`pcipass snapshot` as root inside the lab VM: Linux 6.1, q35, intel-iommu)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from pcipass import pci
from pcipass.cli import main
from pcipass.host.model.sysfs import Host
from pcipass.host.model.usage import HostUse
from pcipass.host.verdict.judge import judge, judge_group

SNAP = os.path.join(os.path.dirname(__file__), "..", "..", "data", "lab-snapshot")
EDU = (0x1234, 0x11E8)


@pytest.fixture(scope="module")
def lab():
    return Host(SNAP)


def _edus(host):
    return [d for d in host.devices() if (d.vendor, d.device) == EDU]


def test_manifest_says_root_and_kernel():
    with open(os.path.join(SNAP, "pcipass-snapshot.json")) as f:
        m = json.load(f)
    assert m["schema"] == "pcipass/snapshot/1" and m["root"] is True and m["kernel"].startswith("6.1")


def test_iommu_on(lab):
    assert lab.iommu.enabled and lab.iommu.units == ("dmar0",) and "intel_iommu=on" in lab.iommu.cmdline


def test_bridge_group_and_standalone_edu(lab):
    edus = _edus(lab)
    behind = [d for d in edus if d.parent is not None]
    alone = [d for d in edus if d.parent is None]
    assert len(behind) == 2 and len(alone) == 1
    bridge = behind[0].parent
    assert bridge.express_type == pci.PCI_EXP_TYPE_PCI_BRIDGE and bridge.is_bridge
    assert behind[0].group == behind[1].group
    assert set(behind[0].group.devices) == {bridge, *behind}
    assert alone[0].group.devices == [alone[0]]


def test_check_on_edu_behind_bridge_names_the_bridge(lab):
    edu = next(d for d in _edus(lab) if d.parent is not None)
    v = judge(lab, edu.name)
    r = next(r for r in v.reasons if r.code == "behind-pcie-to-pci-bridge")
    assert r.device == edu.parent.name and edu.parent.name in r.message
    assert v.ok  # nothing on the host uses the edu functions
    assert {m.role for m in v.members} == {"target", "endpoint", "bridge"}
    g = judge_group(lab, edu.iommu_group)
    assert any(r.code == "behind-pcie-to-pci-bridge" and r.device == edu.parent.name for r in g.reasons)


def test_root_ports_have_acs_read_from_config(lab):
    ports = [d for d in lab.devices() if d.express_type == pci.PCI_EXP_TYPE_ROOT_PORT]
    assert len(ports) == 3
    for p in ports:
        assert p.acs is not None and p.acs.missing() == []  # which is why each port is its own group


def test_ich9_functions_share_a_group_as_multifunction_without_acs(lab):
    sata = next(d for d in lab.devices() if d.pci_class >> 8 == 0x0106)
    v = judge(lab, sata.name)
    assert "multifunction-without-acs" in v.codes()
    assert "group-member-bound-to-host-driver" in v.codes()


def test_disk_and_nic_found_and_idle(lab):
    use = HostUse(lab)
    nvme = next(d for d in lab.devices() if (d.vendor, d.device) == (0x1B36, 0x0010))
    nic = next(d for d in lab.devices() if (d.vendor, d.device) == (0x8086, 0x10D3))
    assert [b.disk for b in use.block[nvme.name]] == ["nvme0n1"] and not use.block[nvme.name][0].in_use
    assert [n.name for n in use.net[nic.name]] == ["enp4s0"] and not use.net[nic.name][0].up
    for d in (nvme, nic):
        v = judge(lab, d.name)
        assert v.ok and v.codes() == ["bound-to-host-driver"]
    assert nvme.reset_methods == ["flr", "bus"]


def test_list_json_on_the_snapshot(capsys):
    assert main(["list", "--sysfs", SNAP, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["devices"]) == 21
    drivers = {(d["vendor_id"], d["device_id"]): d["driver"] for d in doc["devices"]}
    assert drivers[("1b36", "0010")] == "nvme" and drivers[("8086", "10d3")] == "e1000e"


@pytest.mark.skipif(not shutil.which("lspci"), reason="pciutils (lspci) is not installed")
def test_lspci_sees_the_same_devices(lab):
    out = subprocess.run(["lspci", "-n", "-D", "-A", "linux-sysfs", "-O", f"sysfs.path={SNAP}/sys/bus/pci"],
                         capture_output=True, text=True, check=True).stdout
    assert sorted(line.split()[0] for line in out.splitlines()) == [d.name for d in lab.devices()]


def test_chipset_functions_are_system_devices_not_worth_passing_through(lab, capsys):
    host_bridge, lpc, smbus, ahci = "0000:00:00.0", "0000:00:1f.0", "0000:00:1f.3", "0000:00:1f.2"
    for bdf, kind in ((host_bridge, "a host bridge"), (lpc, "an ISA bridge (LPC)"), (smbus, "an SMBus controller")):
        v = judge(lab, bdf)
        r = next(r for r in v.reasons if r.code == "system-device")
        assert not v.ok and r.details["kind"] == kind and r.severity == "blocking"
    # The SATA controller shares the ICH9's group with the LPC bridge and SMBus: claim would take them too.
    v = judge(lab, ahci)
    assert not v.ok and {r.device for r in v.blocking if r.code == "group-member-system-device"} == {lpc, smbus}
    assert main(["check", host_bridge, "--sysfs", SNAP]) == 1
    out = capsys.readouterr().out
    assert "not worth passing through" in out and "can be passed through" not in out


def test_groups_prints_one_line_a_group_on_the_lab(capsys):
    # Before: 86 lines on this tree, mostly the same no-reset warning. After: a header and 17 groups.
    assert main(["groups", "--sysfs", SNAP]) == 0
    lines = capsys.readouterr().out.splitlines()
    groups = sorted(os.listdir(os.path.join(SNAP, "sys/kernel/iommu_groups")), key=int)
    assert [line.split()[0] for line in lines[1:]] == groups
    verdict = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert verdict["0"] == verdict["13"] == "system"  # host bridge; LPC, SATA and SMBus together
    assert verdict["9"] == "blocked" and verdict["15"] == verdict["16"] == "ok"  # a root port; NVMe, e1000e
    assert "[system-device]" in lines[1] and "[is-bridge]" in lines[10] and "below it: 0000:01:00.0" in lines[10]
    assert main(["groups", "-v", "--sysfs", SNAP]) == 0
    verbose = capsys.readouterr().out
    every = sum(len(judge_group(Host(SNAP), int(g)).reasons) for g in groups)
    said = [line for line in verbose.splitlines() if line.lstrip().startswith(("blocking:", "warning:", "info:"))]
    assert len(said) == verbose.count("what to do:") == every > len(lines)
