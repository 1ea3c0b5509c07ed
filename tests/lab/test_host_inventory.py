"""Inventory and verdicts on the real kernel (the lab, as root): groups, check, snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pcipass import pci
from pcipass.host.sysfs import Host
from pcipass.host.verdict import judge

EDU = (0x1234, 0x11E8)


def pcipass(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src)
    return subprocess.run([sys.executable, "-m", "pcipass", *argv], capture_output=True, text=True, env=env)


def _edus(host: Host):
    return [d for d in host.devices() if (d.vendor, d.device) == EDU]


@pytest.mark.lab
def test_groups_on_the_real_kernel() -> None:
    host = Host("/")
    assert host.iommu.enabled, host.iommu
    edus = _edus(host)
    behind = [d for d in edus if d.parent is not None and d.parent.express_type == pci.PCI_EXP_TYPE_PCI_BRIDGE]
    alone = [d for d in edus if d.parent is None]
    assert len(behind) == 2 and len(alone) == 1, edus
    bridge = behind[0].parent
    assert {d.name for d in behind[0].group.devices} == {bridge.name, *(d.name for d in behind)}
    assert [d.name for d in alone[0].group.devices] == [alone[0].name]
    # As root, config space is complete: the root ports' ACS bits are read.
    ports = [d for d in host.devices() if d.express_type == pci.PCI_EXP_TYPE_ROOT_PORT]
    assert ports and all(p.config_complete and p.acs is not None for p in ports)


@pytest.mark.lab
def test_check_names_the_bridge() -> None:
    host = Host("/")
    edu = next(d for d in _edus(host) if d.parent is not None)
    v = judge(host, edu.name)
    assert any(r.code == "behind-pcie-to-pci-bridge" and r.device == edu.parent.name for r in v.reasons), v.codes()
    res = pcipass("check", edu.name, "--json")
    doc = json.loads(res.stdout)
    assert doc["schema"] == "pcipass/check/1" and doc["verdict"]["iommu_group"] == edu.iommu_group
    bridge_reasons = [r for r in doc["verdict"]["reasons"] if r["code"] == "behind-pcie-to-pci-bridge"]
    assert bridge_reasons and bridge_reasons[0]["device"] == edu.parent.name
    text = pcipass("check", edu.name).stdout
    assert edu.parent.name in text and "behind-pcie-to-pci-bridge" in text


@pytest.mark.lab
def test_snapshot_lists_like_the_live_host(tmp_path) -> None:
    out = str(tmp_path / "snap")
    res = pcipass("snapshot", out, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["root"] is True
    for verb in ("list", "groups"):
        live = json.loads(pcipass(verb, "--json").stdout)
        snap = json.loads(pcipass(verb, "--json", "--sysfs", out).stdout)
        live.pop("sysfs_root"), snap.pop("sysfs_root")
        assert snap == live, verb
    for dev in Host("/").devices():
        live = json.loads(pcipass("check", dev.name, "--json").stdout)["verdict"]
        snap = json.loads(pcipass("check", dev.name, "--json", "--sysfs", out).stdout)["verdict"]
        assert snap == live, dev.name


@pytest.mark.lab
def test_without_root_capabilities_are_unknown_not_absent() -> None:
    """Read-only commands need no root: as nobody, config space stops at 64 bytes and check says so."""
    edu = next(d for d in _edus(Host("/")) if d.parent is not None)
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "pcipass",
         "check", edu.name, "--json"],
        capture_output=True, text=True,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                 PYTHONPATH=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))),
        cwd="/",
    )
    assert res.returncode == 0, res.stderr
    codes = [r["code"] for r in json.loads(res.stdout)["verdict"]["reasons"]]
    assert "acs-unknown" in codes and "behind-pcie-to-pci-bridge" in codes
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                          "pcipass", "list", "--json"], capture_output=True, text=True, cwd="/",
                         env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                                  PYTHONPATH=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..",
                                                                          "src"))))
    assert res.returncode == 0, res.stderr
    assert all(d["capabilities"] is None for d in json.loads(res.stdout)["devices"])
