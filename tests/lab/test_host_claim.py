"""claim / release / recover on the real kernel (the lab, as root): vfio-pci binding,
drivers coming back, SIGKILL at every step of the journal, the group lock."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from guest_pci import PCI, claim_state, find, group_members, pcipass, wait_for  # noqa: F401 (claim_state: autouse)

from pcipass.host.transaction import claim as c
from pcipass.host.transaction.crash import CRASH_ENV
from pcipass.host.transaction.journal import GroupLock
from pcipass.host.transaction.plan import give_back_steps
from pcipass.host.transaction.writer import SysfsWriter
from pcipass.lab.topology import E1000E, EDU, QEMU_NVME

pytestmark = pytest.mark.lab


def state(bdfs: list[str]) -> dict[str, tuple[str | None, str | None]]:
    w = SysfsWriter("/")
    return {b: (w.driver(b), w.override(b)) for b in bdfs}


def nvme_namespace_present(bdf: str) -> bool:
    return any(p.name.startswith("nvme") and (p / "device").resolve().name == bdf
               for p in Path("/sys/class/nvme").glob("nvme*")) and any(Path("/sys/block").glob("nvme*n1"))


@pytest.fixture
def edu_group():
    behind = [b for b in find(EDU) if b.endswith((":0d.0", ":0d.1"))]
    assert len(behind) == 2, find(EDU)
    members = group_members(behind[0])
    bridge = [m for m in members if m not in behind]
    assert len(bridge) == 1
    return behind, bridge[0], members


def test_claim_and_release_edu_group_behind_the_bridge(edu_group):
    behind, bridge, members = edu_group
    before = state(members)
    p = pcipass("claim", behind[1])
    assert p.returncode == 0, p.stderr
    now = state(members)
    assert now[behind[0]][0] == "vfio-pci" and now[behind[1]][0] == "vfio-pci"
    assert now[bridge] == before[bridge]  # the bridge is left alone
    number = (PCI / behind[0] / "iommu_group").resolve().name
    assert wait_for(lambda: Path(f"/dev/vfio/{number}").exists(), 10)
    p = pcipass("status")
    assert p.returncode == 0 and f"group {number}: claimed for vfio" in p.stdout
    p = pcipass("release", behind[0])
    assert p.returncode == 0, p.stderr
    assert state(members) == before
    assert all(o is None for _, o in state(members).values())


def test_claim_and_release_nvme_comes_back_with_its_namespace():
    [bdf] = find(QEMU_NVME)
    assert state([bdf])[bdf] == ("nvme", None)
    assert wait_for(lambda: nvme_namespace_present(bdf))
    p = pcipass("claim", bdf)
    assert p.returncode == 0, p.stderr
    assert state([bdf])[bdf] == ("vfio-pci", "vfio-pci")
    assert not nvme_namespace_present(bdf)
    p = pcipass("release", bdf)
    assert p.returncode == 0, p.stderr
    assert state([bdf])[bdf] == ("nvme", None)
    assert wait_for(lambda: nvme_namespace_present(bdf)), "the namespace block device did not come back"


def test_claim_and_release_e1000e():
    [bdf] = find(E1000E)
    assert state([bdf])[bdf] == ("e1000e", None)
    assert pcipass("claim", bdf).returncode == 0
    assert state([bdf])[bdf] == ("vfio-pci", "vfio-pci")
    assert pcipass("release", "--all").returncode == 0
    assert state([bdf])[bdf] == ("e1000e", None)
    assert wait_for(lambda: any((PCI / bdf / "net").iterdir()), 30)


def _killed_child(fn, step: int) -> int:
    """Run fn in a forked child with the crash hook armed at `step`; it must die by SIGKILL."""
    pid = os.fork()
    if pid == 0:
        os.environ[CRASH_ENV] = str(step)
        try:
            fn()
        finally:
            os._exit(0)  # the hook did not fire: the parent sees exit status 0
    _, status = os.waitpid(pid, 0)
    return status


def _crash_every_step(bdf: str, members: list[str], release: bool) -> None:
    """SIGKILL a claim (or a release) at every step, recover each time, until one runs to its end."""
    before = state(members)
    if release:
        c.claim(c.Context("/"), bdf)
        steps = len(give_back_steps(c.Context("/").journal.records()[0], SysfsWriter("/"), []))
        c.release(c.Context("/"), bdf)
    else:
        steps = len(c.claim(c.Context("/"), bdf, dry_run=True).record.steps)
    assert steps >= 3
    step = 0
    while True:
        if release:
            c.claim(c.Context("/"), bdf)
            fn = lambda: c.release(c.Context("/"), bdf)  # noqa: E731
        else:
            fn = lambda: c.claim(c.Context("/"), bdf)  # noqa: E731
        status = _killed_child(fn, step)
        if os.WIFEXITED(status):  # ran to the end: every step has been tried
            assert os.WEXITSTATUS(status) == 0
            if not release:
                c.release(c.Context("/"), bdf)
            assert state(members) == before
            assert step == steps + 1  # killed after each of steps 0..N, then a clean run
            return
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        [g] = c.status(c.Context("/"))["groups"]
        assert g["state"] == ("interrupted release" if release else "interrupted claim"), step
        done = c.recover(c.Context("/"))
        assert [r.action for r in done] == [
            "completed release" if release else "rolled back claim"], step
        assert state(members) == before, f"after SIGKILL at step {step} and recover"
        assert c.status(c.Context("/"))["groups"] == []
        step += 1


def test_claim_killed_at_every_step_is_rolled_back(edu_group):
    behind, _, members = edu_group
    _crash_every_step(behind[0], members, release=False)


def test_release_killed_at_every_step_is_completed(edu_group):
    behind, _, members = edu_group
    _crash_every_step(behind[0], members, release=True)


def test_nvme_claim_and_release_killed_at_every_step():
    [bdf] = find(QEMU_NVME)
    _crash_every_step(bdf, [bdf], release=False)
    _crash_every_step(bdf, [bdf], release=True)
    assert wait_for(lambda: nvme_namespace_present(bdf))


def test_cli_claim_sigkilled_then_recover(edu_group):
    behind, _, members = edu_group
    before = state(members)
    p = pcipass("claim", behind[0], env=dict(os.environ, **{CRASH_ENV: "4"}))
    assert p.returncode == -signal.SIGKILL
    assert state(members) != before
    p = pcipass("recover")
    assert p.returncode == 0 and "rolled back claim" in p.stdout, p.stderr
    assert state(members) == before


def test_second_claim_racing_on_the_group_is_refused(edu_group):
    behind, _, members = edu_group
    before = state(members)
    key = (PCI / behind[0] / "iommu_group").resolve().name
    with GroupLock(os.environ["PCIPASS_STATE_DIR"], key):
        p = pcipass("claim", behind[1])
    assert p.returncode == 1
    assert f"locked by pid {os.getpid()}" in p.stderr
    assert state(members) == before


def test_claim_of_a_mounted_nvme_is_refused_and_changes_nothing(tmp_path):
    [bdf] = find(QEMU_NVME)
    assert wait_for(lambda: nvme_namespace_present(bdf))
    disk = next(p.name for p in Path("/sys/block").glob("nvme*n1"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", f"/dev/{disk}"], check=True, capture_output=True)
    subprocess.run(["mount", f"/dev/{disk}", str(mnt)], check=True, capture_output=True)
    try:
        p = pcipass("claim", bdf)
        assert p.returncode == 1, p.stderr
        assert f"cannot claim {bdf}" in p.stderr and disk in p.stderr, p.stderr
        assert "hint: unmount" in p.stderr, p.stderr
        assert state([bdf])[bdf] == ("nvme", None)
        assert c.status(c.Context("/"))["groups"] == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_boot_apply_and_check_against_the_real_devices(tmp_path):
    from pcipass.host.transaction import boot

    [nvme] = find(QEMU_NVME)
    behind = [b for b in find(EDU) if b.endswith((":0d.0", ":0d.1"))]
    root = tmp_path / "root"
    (root / "etc/pcipass").mkdir(parents=True)
    (root / "etc/pcipass/boot.conf").write_text("".join(f"hide {b}\n" for b in [nvme, *behind]))
    p = pcipass("boot", "apply", "--root", str(root))
    assert p.returncode == 0 and "update-grub" in p.stdout, p.stderr
    assert 'GRUB_CMDLINE_LINUX="vfio-pci.ids=1b36:0010"' in (root / boot.GRUB_DEFAULT).read_text()
    assert "softdep nvme pre: vfio-pci" in (root / boot.MODPROBE).read_text()
    rules = (root / boot.UDEV).read_text()  # the standalone edu is a twin the host keeps
    assert all(f'KERNEL=="{b}"' in rules for b in behind)
    data = boot.check(str(root), "/")
    assert data["ok"], data["findings"]
    nxt = {d["bdf"]: (d["now"], d["next_boot"]) for d in data["devices"]}
    assert nxt[nvme] == ("nvme", "vfio-pci") and nxt[behind[0]] == (None, "vfio-pci")
