"""claim --reset-method on synthetic trees: the device's reset_method written as a journaled
step, and the original put back by release and by recover."""

from __future__ import annotations

import pytest

from pcipass.cli import main
from pcipass.errors import PcipassError
from pcipass.host.fixtures import synthetic
from pcipass.host.transaction import claim as c
from pcipass.host.transaction.simulated import SimulatedKernel

NVME = "0000:03:00.0"  # reset_method "flr bus"


@pytest.fixture
def tree(tmp_path):
    return synthetic.seed_layout(str(tmp_path / "seed"))


def state(root: str, bdf: str) -> tuple[str | None, str | None, str | None]:
    w = SimulatedKernel(root)
    return w.driver(bdf), w.override(bdf), w.reset_method_now(bdf)


def test_claim_writes_it_and_release_puts_it_back(tree):
    plan = c.claim(c.Context(root=tree.root), NVME, reset_method="bus,flr")
    assert plan.record.steps[-1].describe() == f"reset-method {NVME} = 'bus flr'"
    assert state(tree.root, NVME) == ("vfio-pci", "vfio-pci", "bus flr")
    [r] = c.Context(root=tree.root).journal.records()
    assert r.devices[0].original_reset_method == "flr bus"
    c.release(c.Context(root=tree.root), NVME)
    assert state(tree.root, NVME) == ("nvme", None, "flr bus")


@pytest.mark.parametrize("asked,says", [("nope", "unknown nope"), ("flr,flr", "once"), ("pm", "has no pm reset"),
                                        ("", "once")])
def test_bad_methods_are_refused_with_nothing_changed(tree, asked, says):
    before = state(tree.root, NVME)
    with pytest.raises(PcipassError) as e:
        c.claim(c.Context(root=tree.root), NVME, reset_method=asked)
    assert e.value.code == "bad-reset-method" and says in e.value.message and e.value.hint
    assert state(tree.root, NVME) == before and c.Context(root=tree.root).journal.records() == []


def test_a_device_already_on_vfio_pci_gets_only_its_reset_method_back(tree):
    w = SimulatedKernel(tree.root)
    w.modprobe(None, "vfio-pci")
    w.override_set("0000:00:0a.0", "vfio-pci")
    w.probe("0000:00:0a.0")
    w.write(w.dev_path("0000:00:0a.0") / "reset_method", "bus pm")
    before = state(tree.root, "0000:00:0a.0")
    plan = c.claim(c.Context(root=tree.root), "0000:00:0a.0", reset_method="pm")
    assert [s.action for s in plan.record.steps] == ["reset-method"]
    assert state(tree.root, "0000:00:0a.0") == ("vfio-pci", "vfio-pci", "pm")
    c.release(c.Context(root=tree.root), "0000:00:0a.0")
    assert state(tree.root, "0000:00:0a.0") == before  # its override stays: the claim did not set it


class Killed(BaseException):
    pass


def test_killed_at_every_step_recover_puts_the_original_back(tmp_path):
    n = 0
    while True:
        tree = synthetic.seed_layout(str(tmp_path / f"t{n}"))
        before = state(tree.root, NVME)

        def crash(i, n=n):
            if i == n:
                raise Killed

        try:
            c.claim(c.Context(root=tree.root, crash=crash), NVME, reset_method="bus")
        except Killed:
            assert [r.action for r in c.recover(c.Context(root=tree.root))] == ["rolled back claim"]
            assert state(tree.root, NVME) == before, n
            n += 1
            continue
        assert n >= 5 and state(tree.root, NVME)[2] == "bus"
        break


def test_cli_flag_and_dry_run(tree, capsys):
    assert main(["claim", NVME, "--reset-method", "bus", "--dry-run", "--sysfs", tree.root]) == 0
    assert f"reset-method {NVME} = 'bus'" in capsys.readouterr().out
    assert state(tree.root, NVME)[2] == "flr bus"
    assert main(["claim", NVME, "--reset-method", "warm", "--sysfs", tree.root]) == 2
    assert "unknown warm" in capsys.readouterr().err
