"""claim / release / recover on a copy of the lab's own sysfs (tests/data/lab-snapshot)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pcipass.errors import PcipassError
from pcipass.host.transaction import claim as c
from pcipass.host.transaction.writer import SysfsWriter

SNAPSHOT = Path(__file__).resolve().parents[2] / "data" / "lab-snapshot"


@pytest.fixture
def lab(tmp_path, monkeypatch):
    if not SNAPSHOT.is_dir():
        pytest.skip("tests/data/lab-snapshot is missing")
    monkeypatch.delenv("PCIPASS_STATE_DIR", raising=False)
    root = tmp_path / "lab"
    shutil.copytree(SNAPSHOT, root, symlinks=True)
    # git keeps no empty directories, so a clone lacks the drivers' directories the
    # devices' `driver` links point at; a live sysfs has them.
    devices = root / "sys/bus/pci/devices"
    for name in os.listdir(devices):
        link = devices / name / "driver"
        if link.is_symlink():  # dangling in a clone: glob would not even list it
            link.resolve().mkdir(parents=True, exist_ok=True)
    return str(root)


def find(root: str, ids: str) -> list[str]:
    out = []
    for p in sorted(Path(root, "sys/bus/pci/devices").iterdir()):
        vendor, device = ((p / n).read_text().strip()[2:] for n in ("vendor", "device"))
        if f"{vendor}:{device}" == ids:
            out.append(p.name)
    return out


def bindings(root: str) -> dict[str, tuple[str | None, str | None]]:
    w = SysfsWriter(root)
    return {n: (w.driver(n), w.override(n)) for n in sorted(os.listdir(Path(root, "sys/bus/pci/devices")))}


def test_the_lab_layout_claims_and_gives_back(lab):
    before = bindings(lab)
    edus = [b for b in find(lab, "1234:11e8") if b.endswith((":0d.0", ":0d.1"))]
    [nvme] = find(lab, "1b36:0010")
    [nic] = find(lab, "8086:10d3")
    plan = c.claim(c.Context(lab), edus[0])
    taken = sorted(d.bdf for d in plan.record.devices if d.taken)
    bridges = [d.bdf for d in plan.record.devices if d.is_bridge]
    assert taken == edus and len(bridges) == 1
    c.claim(c.Context(lab), nvme)
    c.claim(c.Context(lab), nic)
    now = bindings(lab)
    assert all(now[b][0] == "vfio-pci" for b in [*edus, nvme, nic])
    assert now[bridges[0]] == before[bridges[0]]
    c.release(c.Context(lab))
    assert bindings(lab) == before
    assert before[nvme] == ("nvme", None) and before[nic] == ("e1000e", None)


def test_virtio_and_root_ports_are_refused(lab):
    before = bindings(lab)
    w = SysfsWriter(lab)
    for bdf, driver in before.items():
        if driver[0] == "pcieport":
            with pytest.raises(PcipassError) as e:
                c.claim(c.Context(lab), bdf)
            assert e.value.code == "is-bridge"
            break
    else:
        pytest.fail("no root port in the snapshot")
    assert bindings(lab) == before and w.driver(bdf) == "pcieport"


def test_killed_claim_of_the_lab_nvme_is_rolled_back(lab):
    [nvme] = find(lab, "1b36:0010")
    before = bindings(lab)

    class Killed(BaseException):
        pass

    def hook(i: int) -> None:
        if i == 2:
            raise Killed

    with pytest.raises(Killed):
        c.claim(c.Context(lab, crash=hook), nvme)
    assert bindings(lab) != before
    assert [r.action for r in c.recover(c.Context(lab))] == ["rolled back claim"]
    assert bindings(lab) == before
