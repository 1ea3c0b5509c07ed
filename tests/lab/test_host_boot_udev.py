"""`pcipass boot apply`'s udev rule on the real kernel and udevd (the lab, as root).

The standalone edu (0000:00:10.0) is hidden by address, since the two edu functions
behind the bridge share its vendor:device ID and stay with the host. The rule is
installed where the guest's udevd reads runtime rules, the device is removed and
found again by a rescan, and it must come back on vfio-pci while its twins do not.
Each test leaves every edu, the rule and the modules exactly as it found them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_host_claim import PCI, find, pcipass, state

from pcipass.host.transaction import boot
from pcipass.host.transaction.writer import SysfsWriter
from pcipass.lab.topology import EDU, STANDALONE_EDU

pytestmark = pytest.mark.lab
RULES = Path("/run/udev/rules.d") / Path(boot.UDEV).name
PCI_STUB = PCI.parent / "drivers/pci-stub"


def run(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, f"{' '.join(cmd)}: {p.stderr}"


def loaded(driver: str) -> bool:
    return (PCI.parent / "drivers" / driver).is_dir()


def bound_to(driver: str) -> list[str]:
    return sorted(p.name for p in (PCI.parent / "drivers" / driver).glob("0000:*"))


def remove_and_rescan(bdf: str) -> None:
    (PCI / bdf / "remove").write_text("1")
    assert not (PCI / bdf).exists()
    (PCI.parent / "rescan").write_text("1")
    run("udevadm", "settle", "--timeout=60")
    assert (PCI / bdf).exists()


def put_back(bdfs: list[str], before: dict[str, tuple[str | None, str | None]]) -> None:
    """Every device to the driver and override it had (pcipass's own idempotent steps)."""
    w = SysfsWriter("/")
    for bdf in bdfs:
        driver, override = before[bdf]
        w.override_set(bdf, override)
        if w.driver(bdf) != driver:
            w.unbind(bdf)
            w.bind(bdf, driver)


@pytest.fixture
def edus(tmp_path):
    """(the hidden edu, its twins) with the rule from `boot apply` installed; undone after."""
    twins = [b for b in find(EDU) if b != STANDALONE_EDU]
    assert len(twins) == 2, find(EDU)
    everyone = [STANDALONE_EDU, *twins]
    before = state(everyone)
    had = {d: loaded(d) for d in ("vfio-pci", "pci-stub")}
    run("udevadm", "control", "--ping")  # the lab's init runs udevd
    root = tmp_path / "root"
    (root / "etc/pcipass").mkdir(parents=True)
    (root / boot.POLICY).write_text(f"hide {STANDALONE_EDU}\n")
    p = pcipass("boot", "apply", "--root", str(root))
    assert p.returncode == 0, p.stderr
    rules = (root / boot.UDEV).read_text()
    assert f'KERNEL=="{STANDALONE_EDU}"' in rules and not any(t in rules for t in twins)
    assert "1234:11e8" not in (root / boot.GRUB_DEFAULT).read_text()  # not by ID: the twins stay
    RULES.parent.mkdir(parents=True, exist_ok=True)
    RULES.write_text(rules)
    run("udevadm", "control", "--reload")
    yield STANDALONE_EDU, twins, before
    RULES.unlink(missing_ok=True)
    run("udevadm", "control", "--reload")
    if loaded("pci-stub"):
        (PCI_STUB / "remove_id").write_text(EDU.replace(":", " "))
    put_back(everyone, before)
    for driver, was in had.items():
        if loaded(driver) and not was:
            run("modprobe", "-r", driver)
        elif was and not loaded(driver):
            run("modprobe", driver)
    assert state(everyone) == before
    assert {d: loaded(d) for d in had} == had


def test_udev_rule_takes_the_device_at_add_when_vfio_pci_is_not_loaded(edus):
    """As at boot: nothing else loads vfio-pci for a device without a driver of its own."""
    hidden, twins, before = edus
    if loaded("vfio-pci"):
        assert bound_to("vfio-pci") == [], "a device is still on vfio-pci"
        run("modprobe", "-r", "vfio-pci")
    remove_and_rescan(hidden)
    assert state([hidden])[hidden] == ("vfio-pci", "vfio-pci")
    assert state(twins) == {t: before[t] for t in twins}


def test_udev_rule_takes_the_device_from_a_driver_that_probed_it_first(edus):
    """A hot add with vfio-pci loaded, and the edus having a driver of their own (pci-stub
    given edu's ID stands in for one): the kernel may probe the device before udevd sets its
    override, so the rule has to take it from that driver; the twins keep theirs."""
    hidden, twins, _ = edus
    run("modprobe", "vfio-pci")
    run("modprobe", "pci-stub")
    (PCI_STUB / "new_id").write_text(EDU.replace(":", " "))
    assert state(twins) == {t: ("pci-stub", None) for t in twins}
    remove_and_rescan(hidden)
    assert state([hidden])[hidden] == ("vfio-pci", "vfio-pci")
    assert state(twins) == {t: ("pci-stub", None) for t in twins}
