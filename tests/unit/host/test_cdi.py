"""CDI specs of claimed groups (pcipass.host.present.cdi) on synthetic trees: claim writes,
release removes before giving back, crashes and stale files are put right by recover/sync."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from pcipass.cli import main
from pcipass.errors import PcipassError
from pcipass.host.fixtures import synthetic
from pcipass.host.present import cdi
from pcipass.host.transaction import claim as c
from pcipass.host.transaction import plan
from pcipass.host.transaction.crash import CRASH_ENV

EDU_GROUP = ["0000:02:0d.0", "0000:02:0d.1"]

# --- the CDI spec's rules (SPEC.md of the container-device-interface project), as a checker ---
VERSIONS = ["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0"]
SPEC_KEYS = {"cdiVersion", "kind", "annotations", "devices", "containerEdits"}
DEVICE_KEYS = {"name", "annotations", "containerEdits"}
EDIT_KEYS = {"env", "deviceNodes", "mounts", "hooks", "additionalGIDs", "intelRdt", "netDevices"}
NODE_KEYS = {"path", "hostPath", "type", "major", "minor", "fileMode", "permissions", "uid", "gid"}
DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
NAME = re.compile(r"[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$")


def check_cdi_spec(spec: dict) -> None:
    """Raise AssertionError where `spec` breaks the CDI spec (as far as pcipass uses it)."""
    assert set(spec) <= SPEC_KEYS, set(spec) - SPEC_KEYS
    assert spec["cdiVersion"] in VERSIONS
    vendor, _, klass = spec["kind"].partition("/")
    assert re.fullmatch(rf"{DNS_LABEL}(\.{DNS_LABEL})*", vendor) and len(vendor) <= 253, spec["kind"]
    assert NAME.match(klass) and len(klass) <= 63 and "/" not in klass, spec["kind"]
    if "." in klass:
        assert VERSIONS.index(spec["cdiVersion"]) >= VERSIONS.index("0.6.0")
    assert spec["devices"], "a spec needs one device at least"
    names = [d["name"] for d in spec["devices"]]
    assert len(set(names)) == len(names)
    for d in spec["devices"]:
        assert set(d) <= DEVICE_KEYS
        assert NAME.match(d["name"]), d["name"]
        if d["name"][0].isdigit() or any("hostPath" in n for n in d["containerEdits"].get("deviceNodes", [])):
            assert VERSIONS.index(spec["cdiVersion"]) >= VERSIONS.index("0.5.0")
        edits = d["containerEdits"]
        assert set(edits) <= EDIT_KEYS
        for e in edits.get("env", []):
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e), e
        for n in edits.get("deviceNodes", []):
            assert set(n) <= NODE_KEYS and n["path"].startswith("/")
            assert n.get("type", "c") in ("b", "c", "u", "p")
            assert set(n.get("permissions", "")) <= set("rwm")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for name in ("PCIPASS_STATE_DIR", CRASH_ENV, cdi.DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(plan, "refuse_by_verdict", lambda host, dev, unsafe: None)


@pytest.fixture
def tree(tmp_path):
    return synthetic.seed_layout(str(tmp_path / "seed"))


def ctx(root: str, **kw) -> c.Context:
    return c.Context(root=root, **kw)


def spec_path(root: str, key: str = "2") -> Path:
    return Path(root) / "var/run/cdi" / f"pcipass.io-vfio_group-{key}.json"


def test_claim_writes_the_groups_spec_and_release_removes_it(tree):
    c.claim(ctx(tree.root), "0000:02:0d.1")
    spec = json.loads(spec_path(tree.root).read_text())
    check_cdi_spec(spec)
    assert spec["kind"] == "pcipass.io/vfio" and spec["cdiVersion"] == "0.3.0"
    [dev] = spec["devices"]
    assert dev["name"] == "group-2"
    edits = dev["containerEdits"]
    assert [n["path"] for n in edits["deviceNodes"]] == ["/dev/vfio/vfio", "/dev/vfio/2"]
    assert edits["env"] == ["PCIPASS_GROUP_2=" + ",".join(EDU_GROUP)]  # endpoints, not the bridge
    assert cdi.qualified_name("2") == "pcipass.io/vfio=group-2"
    c.release(ctx(tree.root), "0000:02:0d.0")
    assert not spec_path(tree.root).exists()
    assert list((Path(tree.root) / "var/run/cdi").iterdir()) == []  # no temporary left either


def test_cdev_nodes_and_dev_iommu_where_the_kernel_made_cdevs(tree):
    for i, bdf in enumerate(EDU_GROUP):
        tree.write(f"sys/bus/pci/devices/{bdf}/vfio-dev/vfio{i}/dev", f"511:{i}\n")
    tree.write("sys/bus/pci/devices/0000:03:00.0/vfio-dev/vfio9/uevent", "")  # 6.1-6.5: no dev, no node
    c.claim(ctx(tree.root), "0000:02:0d.0")
    c.claim(ctx(tree.root), "0000:03:00.0")
    paths = [n["path"] for n in json.loads(spec_path(tree.root).read_text())["devices"][0]["containerEdits"]["deviceNodes"]]
    assert paths == ["/dev/vfio/vfio", "/dev/vfio/2", "/dev/iommu", "/dev/vfio/devices/vfio0",
                     "/dev/vfio/devices/vfio1"]
    nvme = json.loads(spec_path(tree.root, "4").read_text())
    check_cdi_spec(nvme)
    assert [n["path"] for n in nvme["devices"][0]["containerEdits"]["deviceNodes"]] == ["/dev/vfio/vfio", "/dev/vfio/4"]


def test_a_claim_killed_before_done_leaves_no_spec_and_recover_writes_none(tree):
    class Killed(BaseException):
        pass

    def at_4(i):
        if i == 4:
            raise Killed
    with pytest.raises(Killed):
        c.claim(ctx(tree.root, crash=at_4), "0000:02:0d.0")
    assert not spec_path(tree.root).exists()
    assert [r.action for r in c.recover(ctx(tree.root))] == ["rolled back claim"]
    assert not spec_path(tree.root).exists()


def test_a_claim_killed_between_its_journal_and_its_spec_gets_the_spec_from_recover(tree, monkeypatch):
    monkeypatch.setattr(cdi, "after_claim", lambda root, record: None)  # as if killed right there
    c.claim(ctx(tree.root), "0000:02:0d.0")
    monkeypatch.undo()
    assert not spec_path(tree.root).exists()
    assert [r.action for r in c.recover(ctx(tree.root))] == [f"wrote CDI spec {spec_path(tree.root)}"]
    check_cdi_spec(json.loads(spec_path(tree.root).read_text()))
    assert c.recover(ctx(tree.root)) == []  # in step now: nothing more


def test_a_release_killed_at_any_step_has_already_removed_the_spec(tmp_path):
    for n in range(0, 4):
        tree = synthetic.seed_layout(str(tmp_path / f"t{n}"))
        c.claim(ctx(tree.root), "0000:02:0d.0")
        assert spec_path(tree.root).exists()

        class Killed(BaseException):
            pass

        def hook(i, n=n):
            if i == n:
                raise Killed
        with pytest.raises(Killed):
            c.release(ctx(tree.root, crash=hook), "0000:02:0d.0")
        assert not spec_path(tree.root).exists(), n  # the spec went before any device
        assert [r.action for r in c.recover(ctx(tree.root))] == ["completed release"]
        assert not spec_path(tree.root).exists(), n


def test_a_spec_that_cannot_be_removed_stops_the_release_with_nothing_given_back(tree):
    c.claim(ctx(tree.root), "0000:02:0d.0")
    etc = Path(tree.root) / "etc/cdi" / spec_path(tree.root).name
    etc.mkdir(parents=True)  # a directory where the file would be: unlink fails (EISDIR/EPERM)
    (etc / "x").write_text("")
    with pytest.raises(PcipassError) as e:
        c.release(ctx(tree.root), "0000:02:0d.0")
    assert e.value.code == "cdi-unwritable" and "nothing was given back" in e.value.message
    [g] = c.status(ctx(tree.root))["groups"]
    assert g["state"] == "claimed" and {d["driver"] for d in g["devices"] if not d["bridge"]} == {"vfio-pci"}


def test_sync_removes_a_stale_spec_and_rewrites_a_changed_one(tree, capsys):
    stale = spec_path(tree.root, "7")
    stale.parent.mkdir(parents=True)
    stale.write_text('{"cdiVersion": "0.3.0", "kind": "pcipass.io/vfio", "devices": []}\n')
    other = stale.parent / "vendor.com-gpu.json"  # not pcipass's: left alone
    other.write_text("{}")
    c.claim(ctx(tree.root), "0000:02:0d.0")
    spec_path(tree.root).write_text("{}")
    assert main(["cdi", "show", "--sysfs", tree.root, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [s["device"] for s in shown["specs"]] == ["pcipass.io/vfio=group-2"]
    assert shown["specs"][0]["written"] is False and shown["stale"] == [str(stale)]
    assert main(["cdi", "sync", "--sysfs", tree.root]) == 0
    out = capsys.readouterr().out
    assert f"group 2: wrote {spec_path(tree.root)}" in out and f"group 7: removed {stale}" in out
    assert not stale.exists() and other.exists()
    check_cdi_spec(json.loads(spec_path(tree.root).read_text()))
    assert main(["cdi", "sync", "--sysfs", tree.root]) == 0
    assert "in step" in capsys.readouterr().out
    assert main(["cdi", "remove", "--sysfs", tree.root]) == 0
    assert not spec_path(tree.root).exists() and other.exists()


def test_sync_skips_a_group_another_pcipass_is_working_on(tree):
    c.claim(ctx(tree.root), "0000:02:0d.0")
    spec_path(tree.root).unlink()
    with ctx(tree.root).lock("2"):
        [change] = cdi.sync(ctx(tree.root))
    assert change.action.startswith("skipped: IOMMU group 2 is locked")
    assert not spec_path(tree.root).exists()


def test_an_empty_cdi_dir_turns_the_specs_off(tree, monkeypatch):
    monkeypatch.setenv(cdi.DIR_ENV, "")
    c.claim(ctx(tree.root), "0000:02:0d.0")
    assert not (Path(tree.root) / "var/run/cdi").exists()
    with pytest.raises(PcipassError) as e:
        cdi.sync(ctx(tree.root))
    assert e.value.code == "cdi-off"
    c.release(ctx(tree.root), "0000:02:0d.0")


def test_an_unwritable_spec_dir_is_a_warning_on_a_claim_that_stands(tree, monkeypatch, capsys):
    blocker = Path(tree.root) / "blocked"
    blocker.write_text("")  # a file: the directory under it cannot be made
    monkeypatch.setenv(cdi.DIR_ENV, str(blocker / "cdi"))
    assert main(["claim", "0000:02:0d.0", "--sysfs", tree.root]) == 0
    err = capsys.readouterr().err
    assert "warning: cannot write the CDI spec" in err and "pcipass cdi sync" in err
    assert c.status(ctx(tree.root))["groups"][0]["state"] == "claimed"


def test_xen_claims_have_no_spec(tree):
    tree.write("proc/xen/capabilities", "control_d\n")
    for f in ("bind", "unbind", "new_slot", "remove_slot", "permissive", "quirks"):
        tree.write(f"sys/bus/pci/drivers/pciback/{f}", "")
    c.claim(ctx(tree.root), "0000:03:00.0", "xen")
    assert not (Path(tree.root) / "var/run/cdi").exists() or not os.listdir(Path(tree.root) / "var/run/cdi")


def test_the_checker_catches_what_the_spec_forbids():
    good = {"cdiVersion": "0.3.0", "kind": "pcipass.io/vfio",
            "devices": [{"name": "group-2", "containerEdits": {"deviceNodes": [{"path": "/dev/vfio/2"}]}}]}
    check_cdi_spec(good)
    for bad in ({**good, "kind": "vfio"}, {**good, "devices": []}, {**good, "cdiVersion": "0.2.0"},
                {**good, "extra": 1},
                {**good, "devices": [{"name": "2", "containerEdits": {}}]},  # a digit first: 0.5.0
                {**good, "devices": [{"name": "g", "containerEdits": {"deviceNodes": [{"path": "dev/x"}]}}]}):
        with pytest.raises(AssertionError):
            check_cdi_spec(bad)
