"""claim / release / recover / status on synthetic trees, the kernel played by SimulatedKernel."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pcipass.cli import main
from pcipass.errors import NeedsRoot, PcipassError
from pcipass.host.fixtures import synthetic
from pcipass.host.transaction import claim as c
from pcipass.host.transaction import plan
from pcipass.host.transaction.journal import CLAIM, DONE, IN_PROGRESS, RELEASE
from pcipass.host.transaction.plan import require_root
from pcipass.host.transaction.simulated import SimulatedKernel
from pcipass.host.transaction.writer import SysfsWriter

EDU_GROUP = ["0000:01:00.0", "0000:02:0d.0", "0000:02:0d.1"]
HAVE_VERDICT = importlib.util.find_spec("pcipass.host.verdict.judge") is not None


@pytest.fixture(autouse=True)
def _state(tmp_path, monkeypatch):
    if not HAVE_VERDICT:  # until host-inventory's verdict lands, claims skip the in-use check
        monkeypatch.setattr(plan, "refuse_by_verdict", lambda host, dev, unsafe: None)


@pytest.fixture
def tree(tmp_path):
    return synthetic.seed_layout(str(tmp_path / "seed"))


def bindings(root: str) -> dict[str, tuple[str | None, str | None]]:
    """Every device's (driver, driver_override), as the kernel shows them."""
    w = SysfsWriter(root)
    names = sorted(os.listdir(os.path.join(root, "sys/bus/pci/devices")))
    return {n: (w.driver(n), w.override(n)) for n in names}


def ctx(root: str, **kw) -> c.Context:
    return c.Context(root=root, **kw)


def test_dry_run_prints_the_plan_and_changes_nothing(tree):
    before = bindings(tree.root)
    plan = c.claim(ctx(tree.root), "02:0d.1", dry_run=True)
    r = plan.record
    assert r.key == "2" and r.target == "vfio"
    assert [d.bdf for d in r.devices] == EDU_GROUP
    assert [d.bdf for d in r.devices if d.is_bridge] == ["0000:01:00.0"]
    assert r.steps[0].action == "modprobe" and r.steps[0].value == "vfio-pci"
    assert not any(s.bdf == "0000:01:00.0" for s in r.steps)  # the bridge is left alone
    text = "\n".join(plan.lines())
    assert "bridge, left alone" in text and "override-set 0000:02:0d.0 = 'vfio-pci'" in text
    assert bindings(tree.root) == before
    assert not os.path.exists(os.path.join(tree.root, "run/pcipass"))


def test_claim_and_release_the_group_behind_the_bridge(tree):
    before = bindings(tree.root)
    c.claim(ctx(tree.root), "0000:02:0d.0")
    now = bindings(tree.root)
    assert now["0000:02:0d.0"] == ("vfio-pci", "vfio-pci")
    assert now["0000:02:0d.1"] == ("vfio-pci", "vfio-pci")
    assert now["0000:01:00.0"] == before["0000:01:00.0"]
    st = c.status(ctx(tree.root))
    [g] = st["groups"]
    assert g["group"] == "2" and g["state"] == "claimed" and g["for"] == "vfio"
    released = c.release(ctx(tree.root), "02:0d.1")
    assert [r.key for r in released] == ["2"]
    assert bindings(tree.root) == before  # no driver, no override left
    assert c.status(ctx(tree.root))["groups"] == []


def test_claim_and_release_nvme_goes_back_to_nvme(tree):
    c.claim(ctx(tree.root), "0000:03:00.0")
    assert bindings(tree.root)["0000:03:00.0"] == ("vfio-pci", "vfio-pci")
    c.release(ctx(tree.root), "0000:03:00.0")
    assert bindings(tree.root)["0000:03:00.0"] == ("nvme", None)


def test_release_all(tree):
    before = bindings(tree.root)
    c.claim(ctx(tree.root), "0000:03:00.0")
    c.claim(ctx(tree.root), "0000:04:00.0")
    assert {r.key for r in c.release(ctx(tree.root))} == {"4", "5"}
    assert bindings(tree.root) == before


@pytest.mark.parametrize("bdf,code", [("0000:09:00.0", "unknown-bdf"), ("zz:1", "bad-bdf"),
                                      ("0000:01:00.0", "is-bridge")])
def test_refusals_change_nothing(tree, bdf, code):
    before = bindings(tree.root)
    with pytest.raises(PcipassError) as e:
        c.claim(ctx(tree.root), bdf)
    assert e.value.code == code and e.value.hint
    assert bindings(tree.root) == before


def test_no_iommu_is_refused_unless_unsafe_noiommu(tmp_path):
    tree = synthetic.seed_layout(str(tmp_path / "t"), iommu=False)
    before = bindings(tree.root)
    with pytest.raises(PcipassError) as e:
        c.claim(ctx(tree.root), "0000:00:0a.0")
    assert e.value.code == "iommu-off" and "intel_iommu=on" in e.value.hint
    assert bindings(tree.root) == before
    w = SimulatedKernel(tree.root)
    c.claim(ctx(tree.root, writer=w), "0000:00:0a.0", unsafe_noiommu=True)
    assert w.noiommu_mode() == "Y"
    assert bindings(tree.root)["0000:00:0a.0"] == ("vfio-pci", "vfio-pci")
    assert c.status(ctx(tree.root))["groups"][0]["group"] == "noiommu-0000:00:0a.0"
    c.release(ctx(tree.root), "0000:00:0a.0")
    assert w.noiommu_mode() == "N"
    assert bindings(tree.root) == before


def test_unsafe_noiommu_claim_names_the_noiommu_node_and_the_taint(tmp_path, capsys):
    """vfio-pci makes the device a vfio-noiommu group as it takes it (as the lab kernel showed):
    the claim prints /dev/vfio/noiommu-N and warns of the taint; the release takes the group away."""
    tree = synthetic.seed_layout(str(tmp_path / "t"), iommu=False)
    bdf = "0000:00:0a.0"
    before = bindings(tree.root)
    assert main(["claim", bdf, "--unsafe-noiommu", "--sysfs", tree.root]) == 0
    out, err = capsys.readouterr()
    group = Path(tree.root, "sys/bus/pci/devices", bdf, "iommu_group").resolve()
    assert (group / "name").read_text() == "vfio-noiommu\n"
    assert f"  /dev/vfio/noiommu-{group.name}\n" in out, out
    assert Path(tree.root, f"dev/vfio/noiommu-{group.name}").exists()
    assert "all of host memory" in err and "TAINT_USER" in err, err
    assert main(["release", bdf, "--sysfs", tree.root]) == 0
    assert not group.exists() and not Path(tree.root, "sys/bus/pci/devices", bdf, "iommu_group").exists()
    assert not Path(tree.root, f"dev/vfio/noiommu-{group.name}").exists()
    assert bindings(tree.root) == before and SysfsWriter(tree.root).noiommu_mode() == "N"


def test_unsafe_noiommu_on_a_kernel_without_the_mode_is_refused_before_any_change(tmp_path):
    """Debian's kernel: vfio built without CONFIG_VFIO_NOIOMMU (the lab showed vfio-pci's probe
    then fails with EINVAL). Refused up front, with vfio loaded or not."""
    tree = synthetic.seed_layout(str(tmp_path / "t"), iommu=False)
    before = bindings(tree.root)
    for vfio_loaded in (False, True):
        w = SimulatedKernel(tree.root, noiommu=False)
        if vfio_loaded:
            w.modprobe(None, "vfio")
        for dry_run in (True, False):
            with pytest.raises(PcipassError) as e:
                c.claim(ctx(tree.root, writer=w), "0000:00:0a.0", unsafe_noiommu=True, dry_run=dry_run)
            assert e.value.code == "noiommu-unsupported"
            assert "CONFIG_VFIO_NOIOMMU" in e.value.message and "CONFIG_VFIO_NOIOMMU=y" in e.value.hint
        assert bindings(tree.root) == before
        assert os.path.isdir(os.path.join(tree.root, "sys/module/vfio")) == vfio_loaded
        assert c.status(ctx(tree.root))["groups"] == []


def test_unsafe_noiommu_when_the_mode_turns_out_missing_rolls_back_cleanly(tmp_path, monkeypatch):
    """Where it could not be known beforehand (no modinfo), the noiommu step fails and the
    undo does not trip over the same missing parameter."""
    tree = synthetic.seed_layout(str(tmp_path / "t"), iommu=False)
    before = bindings(tree.root)
    w = SimulatedKernel(tree.root, noiommu=False)
    monkeypatch.setattr(w, "_vfio_module_has_noiommu", lambda: None)
    with pytest.raises(PcipassError) as e:
        c.claim(ctx(tree.root, writer=w), "0000:00:0a.0", unsafe_noiommu=True)
    assert e.value.code == "claim-failed" and "CONFIG_VFIO_NOIOMMU" in e.value.message
    assert bindings(tree.root) == before
    assert c.status(ctx(tree.root))["groups"] == []


@pytest.mark.parametrize("modinfo,expected", [
    ("echo 'enable_unsafe_noiommu_mode:Enable UNSAFE, no-IOMMU mode. (bool)'", True),
    ("echo 'some_other:thing (int)'", False),
    ("echo 'modinfo: ERROR: Module vfio not found.' >&2; exit 1", None),
])
def test_noiommu_support_of_an_unloaded_vfio_comes_from_modinfo(tmp_path, monkeypatch, modinfo, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "modinfo").write_text(f"#!/bin/sh\n{modinfo}\n")
    (bin_dir / "modinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert SysfsWriter(str(tmp_path)).noiommu_supported() is expected
    (tmp_path / "sys/module/vfio").mkdir(parents=True)  # loaded: sysfs says, modinfo is not asked
    assert SysfsWriter(str(tmp_path)).noiommu_supported() is False


def test_a_failed_step_undoes_every_change(tree):
    before = bindings(tree.root)
    def fail_second_probe(path, value):
        return path.name == "drivers_probe" and value == "0000:02:0d.1"

    w = SimulatedKernel(tree.root, fail=fail_second_probe)
    with pytest.raises(PcipassError) as e:
        c.claim(ctx(tree.root, writer=w), "0000:02:0d.0")
    assert e.value.code == "claim-failed" and "undone" in e.value.message
    assert "probe 0000:02:0d.1" in e.value.message
    assert bindings(tree.root) == before
    assert c.status(ctx(tree.root))["groups"] == []


def test_sigterm_mid_claim_undoes_it_at_once(tree):
    before = bindings(tree.root)

    fired = []

    def term_at_3(i: int) -> None:  # once: the undo runs through the same hook
        if i == 3 and not fired:
            fired.append(i)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(PcipassError) as e:
        c.claim(ctx(tree.root, crash=term_at_3), "0000:02:0d.0")
    assert e.value.code == "claim-failed" and "SIGTERM" in e.value.message
    assert bindings(tree.root) == before
    assert c.status(ctx(tree.root))["groups"] == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


def test_second_claim_of_a_claimed_group_is_refused(tree):
    c.claim(ctx(tree.root), "0000:02:0d.0")
    with pytest.raises(PcipassError) as e:
        c.claim(ctx(tree.root), "0000:02:0d.1")
    assert e.value.code == "already-claimed"


def test_claim_racing_on_a_locked_group_is_refused(tree):
    before = bindings(tree.root)
    context = ctx(tree.root)
    with context.lock("2"), pytest.raises(PcipassError) as e:
        c.claim(ctx(tree.root), "0000:02:0d.1")
    assert e.value.code == "group-locked" and f"pid {os.getpid()}" in e.value.message
    assert bindings(tree.root) == before


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing catches it, so no rollback runs."""


def crash_at(n: int):
    def hook(i: int) -> None:
        if i == n:
            raise Killed
    return hook


def steps_of_claim(root: str, bdf: str) -> int:
    return len(c.claim(ctx(root), bdf, dry_run=True).record.steps)


@pytest.mark.parametrize("bdf", ["0000:02:0d.0", "0000:03:00.0"])
def test_claim_killed_at_every_step_is_rolled_back_by_recover(tmp_path, bdf):
    n_steps = steps_of_claim(synthetic.seed_layout(str(tmp_path / "probe")).root, bdf)
    assert n_steps >= 5
    for n in range(n_steps + 1):
        tree = synthetic.seed_layout(str(tmp_path / f"t{n}"))
        before = bindings(tree.root)
        with pytest.raises(Killed):
            c.claim(ctx(tree.root, crash=crash_at(n)), bdf)
        [g] = c.status(ctx(tree.root))["groups"]
        assert g["state"] == "interrupted claim"
        with pytest.raises(PcipassError) as e:  # release refuses: recover first
            c.release(ctx(tree.root), bdf)
        assert e.value.code == "needs-recover"
        done = c.recover(ctx(tree.root))
        assert [(r.action) for r in done] == ["rolled back claim"], n
        assert bindings(tree.root) == before, n
        assert c.status(ctx(tree.root))["groups"] == []


@pytest.mark.parametrize("bdf", ["0000:02:0d.0", "0000:03:00.0"])
def test_release_killed_at_every_step_is_completed_by_recover(tmp_path, bdf):
    n = 0
    while True:
        tree = synthetic.seed_layout(str(tmp_path / f"t{n}"))
        before = bindings(tree.root)
        c.claim(ctx(tree.root), bdf)
        try:
            c.release(ctx(tree.root, crash=crash_at(n)), bdf)
        except Killed:
            rec = c.Context(root=tree.root).journal.records()[0]
            assert (rec.op, rec.state) == (RELEASE, IN_PROGRESS)
            assert [r.action for r in c.recover(ctx(tree.root))] == ["completed release"]
            assert bindings(tree.root) == before, n
            n += 1
            continue
        assert n >= 4  # the release ran to its end without the hook firing: every step was tried
        assert bindings(tree.root) == before
        break


def test_recover_leaves_completed_claims_alone(tree):
    c.claim(ctx(tree.root), "0000:03:00.0")
    assert c.recover(ctx(tree.root)) == []
    rec = c.Context(root=tree.root).journal.records()[0]
    assert (rec.op, rec.state) == (CLAIM, DONE)


def _xen(tree) -> None:
    tree.write("proc/xen/capabilities", "control_d\n")
    for f in ("bind", "unbind", "new_slot", "remove_slot", "permissive", "quirks"):
        tree.write(f"sys/bus/pci/drivers/pciback/{f}", "")


def test_xen_dom0_claims_for_pciback_and_gives_back(tree):
    _xen(tree)
    before = bindings(tree.root)
    plan = c.claim(ctx(tree.root), "0000:03:00.0", permissive=True, quirks=("e0:2:ff",))
    assert plan.record.target == "xen"
    assert bindings(tree.root)["0000:03:00.0"] == ("pciback", "pciback")
    drv = Path(tree.root, "sys/bus/pci/drivers/pciback")
    assert (drv / "new_slot").read_text() == "0000:03:00.0\n"
    assert (drv / "permissive").read_text() == "0000:03:00.0\n"
    assert (drv / "quirks").read_text() == "0000:03:00.0-e0:2:ff\n"
    c.release(ctx(tree.root), "0000:03:00.0")
    assert (drv / "remove_slot").read_text() == "0000:03:00.0\n"
    assert bindings(tree.root) == before


def test_xen_dom0_without_linux_iommu_groups_claims_the_device_alone(tmp_path):
    tree = synthetic.seed_layout(str(tmp_path / "dom0"), iommu=False)
    _xen(tree)
    before = bindings(tree.root)
    plan = c.claim(ctx(tree.root), "0000:02:0d.0")
    assert plan.record.key == "xen-0000:02:0d.0" and plan.record.noiommu_original is None
    assert bindings(tree.root)["0000:02:0d.0"] == ("pciback", "pciback")
    c.release(ctx(tree.root), "0000:02:0d.0")
    assert bindings(tree.root) == before


def test_xen_release_removes_the_slot_before_probing(tree):
    _xen(tree)
    c.claim(ctx(tree.root), "0000:03:00.0")
    w = SimulatedKernel(tree.root)
    c.release(ctx(tree.root, writer=w), "0000:03:00.0")
    names = [p.split("/")[-1] for p, _ in w.writes]
    assert names.index("remove_slot") < names.index("drivers_probe")


def test_bad_quirks_are_refused(tree):
    _xen(tree)
    for bad, target in (("e0:3:ff", None), ("zz", None), ("e0:2:ff", "vfio")):
        with pytest.raises(PcipassError) as e:
            c.claim(ctx(tree.root), "0000:03:00.0", target, quirks=(bad,))
        assert e.value.code == "bad-quirk"


def test_for_vfio_overrides_xen_detection(tree):
    _xen(tree)
    assert c.claim(ctx(tree.root), "0000:03:00.0", "vfio", dry_run=True).record.target == "vfio"


def test_changes_need_root_on_the_real_host(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NeedsRoot):
        require_root("pcipass claim", "/")
    require_root("pcipass claim", "/tmp/some-synthetic-tree")  # synthetic: allowed


@pytest.mark.skipif(not HAVE_VERDICT, reason="needs host-inventory's pcipass.host.verdict.judge")
def test_device_the_host_uses_is_refused(tmp_path):
    tree = synthetic.seed_layout(str(tmp_path / "t"))
    tree.mount("/dev/nvme0n1", "/srv")
    before = bindings(tree.root)
    with pytest.raises(PcipassError) as e:
        c.claim(ctx(tree.root), "0000:03:00.0")
    assert e.value.code == "block-device-in-use" and e.value.hint
    assert bindings(tree.root) == before


def test_cli_dry_run_status_json_and_release(tree, capsys):
    assert main(["claim", "02:0d.0", "--dry-run", "--sysfs", tree.root]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "unbind" not in out and "probe 0000:02:0d.1" in out
    assert main(["claim", "02:0d.0", "--sysfs", tree.root]) == 0
    assert "/dev/vfio/2" in capsys.readouterr().out
    assert main(["status", "--json", "--sysfs", tree.root]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "pcipass/status/1" and data["groups"][0]["group"] == "2"
    assert main(["release", "--all", "--sysfs", tree.root]) == 0
    assert "released IOMMU group 2" in capsys.readouterr().out
    assert main(["release", "--sysfs", tree.root]) == 2  # neither a BDF nor --all


@pytest.mark.skipif(not HAVE_VERDICT, reason="needs host-inventory's pcipass.host.verdict.judge")
def test_real_sigkill_mid_claim_then_recover_from_the_cli(tree):
    before = bindings(tree.root)
    env = dict(os.environ, PCIPASS_CRASH_AT_STEP="3", PYTHONPATH=os.pathsep.join(sys.path))
    def run(*a):
        return subprocess.run([sys.executable, "-m", "pcipass", *a, "--sysfs", tree.root],
                              env=env, capture_output=True, text=True, check=False)

    p = run("claim", "0000:03:00.0")
    assert p.returncode == -9, p.stderr
    assert bindings(tree.root)["0000:03:00.0"] != before["0000:03:00.0"]
    env.pop("PCIPASS_CRASH_AT_STEP")
    p = run("recover")
    assert p.returncode == 0 and "rolled back claim" in p.stdout, p.stderr
    assert bindings(tree.root) == before


def test_read_only_verbs_need_no_root(tree, monkeypatch, capsys, tmp_path):
    c.claim(ctx(tree.root), "0000:03:00.0")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["status", "--sysfs", tree.root]) == 0
    assert "group 4: claimed for vfio" in capsys.readouterr().out
    assert main(["claim", "00:0a.0", "--dry-run", "--sysfs", tree.root]) == 0
    monkeypatch.setenv("PCIPASS_STATE_DIR", str(tmp_path / "empty"))
    assert main(["status"]) == 0 and "nothing is claimed" in capsys.readouterr().out
    assert main(["recover"]) == 0  # nothing to recover: no root needed to find that out


def test_a_member_already_on_vfio_is_left_as_it_was(tree):
    tree.write("sys/bus/pci/devices/0000:02:0d.1/driver_override", "vfio-pci\n")
    tree.bind("0000:02:0d.1", "vfio-pci")
    before = bindings(tree.root)
    plan = c.claim(ctx(tree.root), "0000:02:0d.0")
    assert not any(s.bdf == "0000:02:0d.1" for s in plan.record.steps)
    c.release(ctx(tree.root), "0000:02:0d.0")
    assert bindings(tree.root) == before  # its override, set by someone else, is kept


def test_removing_a_pciback_slot_it_does_not_hold_is_nothing_to_do(tmp_path):
    # The real kernel answers ENOENT for a slot pciback does not hold (a claim killed
    # before new_slot); with pciback not loaded the file itself is missing.
    w = SysfsWriter(str(tmp_path))
    w.pciback_remove_slot("0000:00:10.0")  # no pciback directory at all: no error
    with pytest.raises(FileNotFoundError):
        w.pciback_new_slot("0000:00:10.0")  # other steps still fail loudly
