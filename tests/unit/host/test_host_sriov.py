"""pcipass sriov on synthetic trees: SimulatedKernel plays sriov_numvfs creating and removing
the VFs (virtfnN and physfn links, a group each, the VF driver when autoprobe is on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pcipass.cli import main
from pcipass.errors import PcipassError
from pcipass.host.fixtures import synthetic
from pcipass.host.model.sysfs import Host
from pcipass.host.transaction import claim as c
from pcipass.host.transaction.journal import SRIOV, Journal
from pcipass.host.transaction.journaled import Transaction
from pcipass.host.transaction.simulated import SimulatedKernel

PF = "0000:01:00.0"


def tree_state(root: str) -> dict[str, str]:
    """Every file and link of the tree (the journal directory left out): 'nothing changed'."""
    out = {}
    for base, dirs, files in os.walk(root):
        rel = os.path.relpath(base, root)
        if rel.startswith("run"):
            continue
        for name in dirs + files:
            path = os.path.join(base, name)
            key = os.path.join(rel, name)
            if os.path.islink(path):
                out[key] = "-> " + os.readlink(path)
            elif os.path.isfile(path) and name != ".pcipass-sim.json":
                with open(path, "rb") as f:
                    out[key] = f.read().hex()
    return out


def vfs(root: str) -> list[tuple[str, str | None, int | None]]:
    pf = Host(root).device(PF)
    return [(v.name, v.driver, v.iommu_group) for v in pf.virtfns]


def ctx(root: str, **kw) -> c.Context:
    return c.Context(root=root, **kw)


@pytest.fixture
def tree(tmp_path):
    return synthetic.sriov(str(tmp_path / "t"), vfs=0)


def test_create_change_and_remove_vfs(tree):
    plan = c.sriov(ctx(tree.root), PF, 3)
    assert [s.describe() for s in plan.record.steps] == [f"sriov-numvfs {PF} = '3'"]
    assert vfs(tree.root) == [("0000:01:02.0", "iavf", 2), ("0000:01:02.1", "iavf", 3), ("0000:01:02.2", "iavf", 4)]
    vf = Host(tree.root).device("0000:01:02.1")
    assert vf.physfn.name == PF and (vf.vendor, vf.device) == (0x8086, 0x154C)
    # Another count goes through 0 (the kernel refuses one count over another), with autoprobe off first.
    plan = c.sriov(ctx(tree.root), PF, 2, autoprobe="off")
    assert [s.describe() for s in plan.record.steps] == [
        f"sriov-autoprobe {PF} = '0'", f"sriov-numvfs {PF} = '0'", f"sriov-numvfs {PF} = '2'"]
    assert vfs(tree.root) == [("0000:01:02.0", None, 2), ("0000:01:02.1", None, 3)]
    assert c.sriov(ctx(tree.root), PF, 2).record.steps == []  # the same count: nothing to do
    c.sriov(ctx(tree.root), PF, 0)
    assert vfs(tree.root) == [] and Host(tree.root).device(PF).sriov_numvfs == 0
    assert sorted(os.listdir(os.path.join(tree.root, "sys/kernel/iommu_groups"))) == ["0", "1"]
    assert Journal(c.Context(root=tree.root).journal.dir).records() == []


def _refused(root: str, bdf: str, n: int, code: str, **kw) -> PcipassError:
    before = tree_state(root)
    with pytest.raises(PcipassError) as e:
        c.sriov(ctx(root), bdf, n, **kw)
    assert e.value.code == code, e.value
    assert e.value.hint
    assert tree_state(root) == before
    return e.value


def test_refusals_change_nothing(tree, tmp_path):
    c.sriov(ctx(tree.root), PF, 2)
    e = _refused(tree.root, "0000:01:02.0", 1, "sriov-is-vf")
    assert PF in e.message
    e = _refused(tree.root, PF, 65, "too-many-vfs")
    assert "64" in e.message
    _refused(tree.root, PF, -1, "bad-vfs")
    seed = synthetic.seed_layout(str(tmp_path / "seed"))
    _refused(seed.root, "0000:03:00.0", 1, "not-sriov")
    _refused(seed.root, "0000:09:00.0", 1, "unknown-bdf")


def test_a_pf_on_no_driver_or_on_vfio_pci_without_enable_sriov_is_refused(tree):
    w = SimulatedKernel(tree.root)
    w.unbind(PF)
    e = _refused(tree.root, PF, 2, "sriov-no-driver")
    assert "driver" in e.message
    w.override_set(PF, "vfio-pci")
    w.modprobe(None, "vfio-pci")
    w.probe(PF)
    assert w.driver(PF) == "vfio-pci"
    e = _refused(tree.root, PF, 2, "sriov-vfio-disabled")
    assert "enable_sriov=1" in e.hint
    tree.write("sys/module/vfio_pci/parameters/enable_sriov", "Y\n")
    c.sriov(ctx(tree.root), PF, 2)
    # vfio-pci gives its PF's VFs to vfio-pci (driver_override); they are the PF's, not in use.
    assert [d for _, d, _ in vfs(tree.root)] == ["vfio-pci", "vfio-pci"]
    c.sriov(ctx(tree.root), PF, 0)
    assert vfs(tree.root) == []


def test_vfs_in_use_are_not_removed(tree):
    c.sriov(ctx(tree.root), PF, 3)
    c.claim(ctx(tree.root), "0000:01:02.1")
    e = _refused(tree.root, PF, 0, "vf-in-use")
    assert "0000:01:02.1 is claimed by pcipass" in e.message and "pcipass release 0000:01:02.1" in e.hint
    _refused(tree.root, PF, 1, "vf-in-use")  # fewer VFs is removing them too
    c.release(ctx(tree.root), "0000:01:02.1")
    # On vfio-pci by someone else (libvirt's managed hostdev, say): refused too.
    w = SimulatedKernel(tree.root)
    w.unbind("0000:01:02.2")
    w.override_set("0000:01:02.2", "vfio-pci")
    w.probe("0000:01:02.2")
    e = _refused(tree.root, PF, 0, "vf-in-use")
    assert "0000:01:02.2 is on vfio-pci" in e.message
    w.override_set("0000:01:02.2", None)
    w.unbind("0000:01:02.2")
    w.probe("0000:01:02.2")
    # An interface of a VF up with an address: the host uses it.
    tree.devices["0000:01:02.0"] = synthetic.WrittenDevice(synthetic.parse_bdf("0000:01:02.0"),
                                                    os.path.realpath(os.path.join(tree.root, "sys/bus/pci/devices/0000:01:02.0")))
    tree.add_net("enp1s2", "0000:01:02.0", up=True, ipv4_route=True)
    e = _refused(tree.root, PF, 0, "vf-in-use")
    assert "enp1s2" in e.message
    # Adding VFs to none is never refused for use: there are none to use.
    os.unlink(os.path.join(tree.root, "sys/class/net/enp1s2"))
    c.sriov(ctx(tree.root), PF, 0)
    assert vfs(tree.root) == []


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing catches it, so no rollback runs."""


def crash_at(n: int):
    def hook(i: int) -> None:
        if i == n:
            raise Killed
    return hook


@pytest.mark.parametrize("start,want,autoprobe", [(0, 3, None), (3, 2, "off"), (2, 0, None)])
def test_a_change_killed_at_every_step_is_rolled_back_by_recover(tmp_path, start, want, autoprobe):
    n_steps = None
    n = 0
    while n_steps is None or n <= n_steps:
        tree = synthetic.sriov(str(tmp_path / f"t{n}"), vfs=0)
        if start:
            c.sriov(ctx(tree.root), PF, start)
        before = vfs(tree.root)
        autoprobe_before = Host(tree.root).device(PF).attr("sriov_drivers_autoprobe")
        n_steps = len(c.sriov(ctx(tree.root), PF, want, autoprobe=autoprobe, dry_run=True).record.steps)
        with pytest.raises(Killed):
            c.sriov(ctx(tree.root, crash=crash_at(n)), PF, want, autoprobe=autoprobe)
        status = c.status(ctx(tree.root))
        assert status["groups"] == []
        [ch] = status["sriov"]
        assert (ch["pf"], ch["state"], ch["numvfs_before"], ch["numvfs_wanted"]) == (PF, "interrupted sriov", start, want)
        with pytest.raises(PcipassError) as e:
            c.sriov(ctx(tree.root), PF, 1)
        assert e.value.code == "needs-recover"
        assert c.release(ctx(tree.root)) == []  # release --all leaves it to recover
        [r] = c.recover(ctx(tree.root))
        assert r.action.startswith("rolled back sriov change"), r.action
        assert vfs(tree.root) == before, n
        assert Host(tree.root).device(PF).attr("sriov_drivers_autoprobe") == autoprobe_before
        assert c.status(ctx(tree.root))["sriov"] == []
        n += 1
    assert n_steps >= 1


def test_a_failed_write_is_undone(tree):
    c.sriov(ctx(tree.root), PF, 2)
    writes = []

    def fail(rel, value):
        writes.append(value)
        return rel.name == "sriov_numvfs" and value == "4"

    w = SimulatedKernel(tree.root, fail=fail)
    with pytest.raises(PcipassError) as e:
        c.sriov(c.Context(root=tree.root, writer=w), PF, 4)
    assert e.value.code == "sriov-failed" and "it has 2 VFs again" in e.value.message
    assert [n for n, _, _ in vfs(tree.root)] == ["0000:01:02.0", "0000:01:02.1"]
    assert c.Context(root=tree.root).journal.records() == []


def test_the_kernel_errors_say_what_they_mean(tree):
    w = SimulatedKernel(tree.root, fail=lambda rel, value: False)
    w.sriov_numvfs(PF, "1")
    with pytest.raises(OSError) as e:  # one count over another
        w.write(w.dev_path(PF) / "sriov_numvfs", "2")
    assert e.value.errno == 16
    from pcipass.host.transaction.sriov import explain_failure

    assert "wants 0 first" in explain_failure(e.value, PF, "i40e")
    assert "sriov_configure" in explain_failure(OSError(2, "x"), PF, "e1000e")


def test_a_journal_of_sriov_steps_replays_from_disk(tree, tmp_path):
    journal = Journal(tmp_path / "state")
    journal.ensure_dir()
    steps = [["sriov-autoprobe", PF, "0"], ["sriov-numvfs", PF, "2"], ["sriov-numvfs", PF, "0"],
             ["sriov-autoprobe", PF, "1"], ["sriov-numvfs", PF, "1"]]
    journal.path(f"sriov-{PF}").write_text(json.dumps({
        "key": f"sriov-{PF}", "group": 1, "target": SRIOV, "op": SRIOV, "state": "in-progress",
        "devices": [{"bdf": PF, "original_driver": "i40e", "original_override": None, "is_bridge": False,
                     "pciback_slot_added": False, "taken": False}],
        "steps": [{"action": a, "bdf": b, "value": v} for a, b, v in steps],
        "done": 0, "since": 1700000000.0, "pid": 1, "command": "pcipass sriov 01:00.0 --vfs 1",
        "noiommu_original": None, "owner": None, "nodes": [],
        "sriov": {"pf": PF, "numvfs": 0, "autoprobe": "1", "want": 1}, "schema": "pcipass/journal/1",
    }))
    record = journal.read(f"sriov-{PF}")
    Transaction(journal, SimulatedKernel(tree.root), crash=lambda n: None).run(record)
    assert vfs(tree.root) == [("0000:01:02.0", "iavf", 2)]


def test_cli_sriov_json_and_a_real_sigkill_then_recover(tree, capsys):
    assert main(["sriov", PF, "--vfs", "2", "--sysfs", tree.root, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == "pcipass/sriov/1" and out["numvfs"] == 2 and out["numvfs_before"] == 0
    assert [v["bdf"] for v in out["vfs"]] == ["0000:01:02.0", "0000:01:02.1"]
    assert main(["sriov", PF, "--vfs", "0", "--dry-run", "--sysfs", tree.root]) == 0
    assert "sriov-numvfs" in capsys.readouterr().out and len(vfs(tree.root)) == 2
    env = dict(os.environ, PCIPASS_CRASH_AT_STEP="1", PYTHONPATH=os.pathsep.join(sys.path))

    def run(*a):
        return subprocess.run([sys.executable, "-m", "pcipass", *a, "--sysfs", tree.root],
                              env=env, capture_output=True, text=True, check=False)

    p = run("sriov", PF, "--vfs", "0")
    assert p.returncode == -9, p.stderr
    assert vfs(tree.root) == []
    p = run("status")
    assert "interrupted sriov" in p.stdout and "pcipass recover" in p.stdout, p.stdout
    env.pop("PCIPASS_CRASH_AT_STEP")
    p = run("recover")
    assert p.returncode == 0 and "rolled back sriov change" in p.stdout, p.stderr
    assert [(n, d) for n, d, _ in vfs(tree.root)] == [("0000:01:02.0", "iavf"), ("0000:01:02.1", "iavf")]


def test_config_qemu_gives_vf_token_to_a_vf_whose_pf_is_on_vfio_pci(tree, capsys):
    w = SimulatedKernel(tree.root)
    w.unbind(PF)
    w.override_set(PF, "vfio-pci")
    w.modprobe(None, "vfio-pci")
    w.probe(PF)
    tree.write("sys/module/vfio_pci/parameters/enable_sriov", "Y\n")
    c.sriov(ctx(tree.root), PF, 1)
    token = "5b2a8a9e-1c77-4a3c-9d3e-6a1f0b7e2c44"
    assert main(["config", "qemu", "0000:01:02.0", "--vf-token", token, "--sysfs", tree.root]) == 0
    out, err = capsys.readouterr()
    assert f"host=0000:01:02.0,id=hostdev0,bus=pcie.0,addr=0x10.0,vf-token={token}" in out and "vf-token" not in err
    assert main(["config", "qemu", "0000:01:02.0", "--sysfs", tree.root]) == 0
    out, err = capsys.readouterr()
    assert "vf-token" not in out and "add --vf-token UUID" in err
    assert main(["config", "qemu", "0000:01:02.0", "--vf-token", "nope", "--sysfs", tree.root]) == 2
    assert "not a UUID" in capsys.readouterr().err
    c.sriov(ctx(tree.root), PF, 0)
    # A device that needs none: the token is left out, and a warning says so.
    assert main(["config", "qemu", PF, "--vf-token", token, "--sysfs", tree.root]) == 0
    out, err = capsys.readouterr()
    assert "vf-token" not in out and "no named device needs one" in err
