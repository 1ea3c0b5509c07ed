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
from pcipass.host.sysfs import Host
from pcipass.host.usage import HostUse
from pcipass.host.verdict import judge, judge_group

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
