"""Inventory and verdicts on the real kernel (the lab, as root): groups, check, snapshot.

In-process where it can be (a Python start-up costs seconds under TCG); the CLI
is run once per verb that the test is about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pcipass import pci
from pcipass.host.model.pciids import PciIds
from pcipass.host.model.sysfs import Host
from pcipass.host.present import inventory
from pcipass.host.verdict.judge import judge

EDU = (0x1234, 0x11E8)
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))


def pcipass(*argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=SRC)
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    return subprocess.run([*prefix, sys.executable, "-m", "pcipass", *argv], capture_output=True, text=True,
                          env=env, cwd="/")


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
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "pcipass/check/1" and doc["verdict"]["iommu_group"] == edu.iommu_group
    bridge_reasons = [r for r in doc["verdict"]["reasons"] if r["code"] == "behind-pcie-to-pci-bridge"]
    assert bridge_reasons and bridge_reasons[0]["device"] == edu.parent.name


@pytest.mark.lab
def test_snapshot_lists_like_the_live_host(tmp_path) -> None:
    out = str(tmp_path / "snap")
    res = pcipass("snapshot", out, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["root"] is True
    ids = PciIds()
    live, snap = Host("/"), Host(out)
    for make in (lambda h: inventory.list_doc(h, ids), inventory.groups_doc):
        a, b = make(live), make(snap)
        a.pop("sysfs_root"), b.pop("sysfs_root")
        assert a == b
    assert len(live.devices()) > 10
    for dev in live.devices():
        assert judge(snap, dev.name).to_json() == judge(live, dev.name).to_json(), dev.name
    listed = pcipass("list", "--json", "--sysfs", out)
    assert [d["bdf"] for d in json.loads(listed.stdout)["devices"]] == [d.name for d in live.devices()]


@pytest.mark.lab
def test_without_root_capabilities_are_unknown_not_absent() -> None:
    """Read-only commands need no root: as nobody, config space stops at 64 bytes and check says so."""
    edu = next(d for d in _edus(Host("/")) if d.parent is not None)
    res = pcipass("check", edu.name, "--json", user="65534")
    assert res.returncode == 0, res.stderr
    verdict = json.loads(res.stdout)["verdict"]
    codes = [r["code"] for r in verdict["reasons"]]
    assert "acs-unknown" in codes
    bridge = [r for r in verdict["reasons"] if r["code"] == "behind-pcie-to-pci-bridge"]
    assert bridge and bridge[0]["device"] == edu.parent.name  # found from the link attributes
