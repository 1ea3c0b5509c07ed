"""claim --owner USER[:GROUP] on fake trees: the group node given to the user (journaled
before the change), given back by release and by recover, the memlock advice."""

from __future__ import annotations

import grp
import json
import os
import pwd
from pathlib import Path

import pytest

from pcipass.cli import main
from pcipass.errors import PcipassError, UsageError
from pcipass.host.fixtures import synthetic
from pcipass.host.transaction import claim as c
from pcipass.host.transaction import owner as o
from pcipass.host.transaction.journal import Step
from pcipass.host.transaction.simulated import SimulatedKernel
from pcipass.host.transaction.writer import SysfsWriter

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name


@pytest.fixture
def tree(tmp_path):
    t = synthetic.seed_layout(str(tmp_path / "seed"))
    Path(t.root, "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    Path(t.root, "proc/sys/kernel/osrelease").write_text("6.1.0-57-amd64\n")
    return t


def node(root: str, group: int) -> tuple[int, int, int] | None:
    return SimulatedKernel(root).node_state(Path(root, "dev/vfio", str(group)))


def test_claim_owner_gives_the_group_node_and_release_gives_it_back(tree, capsys):
    assert main(["claim", "02:0d.0", "--owner", "nobody", "--sysfs", tree.root]) == 0
    out = capsys.readouterr().out
    assert "/dev/vfio/2 (given to nobody)" in out
    assert "nobody must be allowed to lock as much memory as it maps for DMA" in out
    assert node(tree.root, 2) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o600)
    [r] = c.Context(tree.root).journal.records()
    assert r.owner == "nobody"
    assert [(n.path, n.uid, n.gid, n.mode) for n in r.nodes] == [("/dev/vfio/2", 0, 0, 0o600)]
    assert main(["status", "--json", "--sysfs", tree.root]) == 0
    [g] = json.loads(capsys.readouterr().out)["groups"]
    assert g["owner"] == "nobody" and g["nodes"] == [{"path": "/dev/vfio/2"}]
    assert main(["release", "02:0d.1", "--sysfs", tree.root]) == 0
    assert node(tree.root, 2) is None  # the group left vfio-pci: the kernel removed the node


def test_a_group_already_on_vfio_keeps_its_node_and_gets_it_back(tree):
    w = SimulatedKernel(tree.root)
    for step in (Step("modprobe", None, "vfio-pci"), Step("override-set", "0000:00:0a.0", "vfio-pci"),
                 Step("probe", "0000:00:0a.0")):
        w.apply(step)
    assert node(tree.root, 3) == (0, 0, 0o600)
    plan = c.claim(c.Context(tree.root), "00:0a.0", owner=f"nobody:{NOGROUP}")
    assert [s.action for s in plan.record.steps] == ["node-owner", "node-owner"]  # the group node, the cdev
    assert node(tree.root, 3) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o660)  # a group given: group rw too
    c.release(c.Context(tree.root), "00:0a.0")
    assert node(tree.root, 3) == (0, 0, 0o600)  # still there, as it was
    assert w.driver("0000:00:0a.0") == "vfio-pci"


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the claim catches it."""


def test_recover_gives_the_node_back_after_a_kill_at_any_step(tree):
    before = SysfsWriter(tree.root)
    original = {b: (before.driver(b), before.override(b)) for b in ("0000:02:0d.0", "0000:02:0d.1")}
    at = 0
    while True:  # killed after step 0, 1, ... until a claim runs to its end
        def crash(n: int, at: int = at) -> None:
            if n == at:
                raise Killed
        try:
            c.claim(c.Context(tree.root, crash=crash), "02:0d.0", owner="nobody")
        except Killed:
            [r] = c.Context(tree.root).journal.records()
            given = node(tree.root, 2)
            if given is not None and given[0] == NOBODY.pw_uid:
                # The node was given away: its original owner was journaled before that.
                assert [(n.path, n.uid, n.mode) for n in r.nodes] == [("/dev/vfio/2", 0, 0o600)], at
            [done] = c.recover(c.Context(tree.root))
            assert done.action == "rolled back claim", at
            assert node(tree.root, 2) is None, at
            assert {b: (before.driver(b), before.override(b)) for b in original} == original, at
            at += 1
            continue
        break
    steps = c.Context(tree.root).journal.records()[0].steps
    assert at == len(steps) + 1 and [s.action for s in steps][-3:] == ["node-owner"] * 3


def test_owner_refusals_change_nothing(tree):
    for kw, code in ((dict(owner="no-such-user-here"), "bad-owner"),
                     (dict(owner="nobody:no-such-group-here"), "bad-owner"),
                     (dict(memlock="1G"), "bad-owner"),
                     (dict(owner="nobody", memlock="lots"), "bad-size")):
        with pytest.raises(UsageError) as e:
            c.claim(c.Context(tree.root), "02:0d.0", **kw)
        assert e.value.code == code, kw
    with pytest.raises(UsageError) as e:
        c.claim(c.Context(tree.root), "02:0d.0", "xen", owner="nobody")
    assert e.value.code == "bad-owner" and "--for xen" in e.value.hint
    assert c.Context(tree.root).journal.records() == []


def test_memlock_from_limits_conf_user_beats_group_beats_star(tree, capsys):
    d = Path(tree.root, "etc/security/limits.d")
    d.mkdir(parents=True)
    Path(tree.root, "etc/security/limits.conf").write_text("*   soft  memlock  65536\n")
    owner = o.parse_owner(f"nobody:{NOGROUP}")
    assert o.login_memlock(tree.root, owner).soft == 64 << 20
    (d / "50-group.conf").write_text(f"@{NOGROUP}  -  memlock  131072\n")
    assert o.login_memlock(tree.root, owner).soft == 128 << 20
    (d / "90-user.conf").write_text("nobody  hard  memlock  unlimited\nnobody  soft  memlock  1048576  # 1 GiB\n")
    limit = o.login_memlock(tree.root, owner)
    assert limit.soft == 1 << 30 and limit.where == "etc/security/limits.d/90-user.conf:2"
    notes, too_small = o.memlock_notes(tree.root, owner, 2 << 30)
    assert too_small and "1 GiB is less than the 2 GiB asked for with --memlock" in notes[1]
    assert "nobody soft memlock 2097152" in notes[1] and "LimitMEMLOCK=" in notes[1] and "ulimit -l" in notes[1]
    assert main(["claim", "02:0d.0", "--owner", "nobody", "--memlock", "2G", "--sysfs", tree.root]) == 0
    assert "warning: nobody must be allowed" in capsys.readouterr().err
    notes, too_small = o.memlock_notes(tree.root, owner, 512 << 20)
    assert not too_small


def test_memlock_without_a_limits_line_states_the_kernel_default(tree):
    notes, too_small = o.memlock_notes(tree.root, o.parse_owner("nobody"), 64 << 20)
    assert too_small and "the kernel's default 8 MiB" in notes[0]
    Path(tree.root, "proc/sys/kernel/osrelease").write_text("5.10.0-30-amd64\n")
    assert o.kernel_default(tree.root) == 64 << 10


def test_sizes():
    assert [o.parse_size(t) for t in ("2G", "512M", "65536K", "4096", "1GiB")] == [
        2 << 30, 512 << 20, 64 << 20, 4096, 1 << 30]
    with pytest.raises(PcipassError):
        o.parse_size("x")


def test_the_node_step_waits_for_the_node_and_fails_when_it_never_comes(tree):
    w = SimulatedKernel(tree.root)
    with pytest.raises(OSError):
        w.wait_node(None, "/dev/vfio/99", timeout=0.2)
    assert w.wait_node("0000:00:0a.0", "cdev", timeout=0.2) is None  # no vfio-dev: no cdev on this kernel
    assert os.path.exists(tree.root)


def test_a_vfio_dev_class_device_without_a_device_number_has_no_cdev(tree):
    """Linux 6.1 to 6.5 make vfio-dev/vfioX for a vfio-pci device but no char device (no `dev`
    file, no /dev/vfio/devices node): claim --owner must not wait for one (the lab's kernel)."""
    w = SimulatedKernel(tree.root)
    vfio_dev = Path(tree.root, "sys/bus/pci/devices/0000:00:0a.0/vfio-dev/vfio0")
    vfio_dev.mkdir(parents=True)
    assert w.wait_node("0000:00:0a.0", "cdev", timeout=0.2) is None
    (vfio_dev / "dev").write_text("511:0\n")  # 6.6 on: a device number, and the node comes
    with pytest.raises(OSError):
        w.wait_node("0000:00:0a.0", "cdev", timeout=0.2)
