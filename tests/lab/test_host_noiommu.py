"""A host without an IOMMU, on the real kernel: the lab booted with intel_iommu=off after
the lab's own intel_iommu=on (the last one wins), with QEMU's VT-d still described by the
firmware's DMAR table. Debian's kernel builds vfio without CONFIG_VFIO_NOIOMMU.

check says iommu-off and names intel_iommu=on; claim refuses and changes nothing; claim
--unsafe-noiommu refuses before any change since vfio has no no-IOMMU mode, and where it
could not know that beforehand it undoes what it did. Each test leaves the edu and the
vfio modules as it found them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_host_claim import PCI, pcipass, state

from pcipass.errors import PcipassError
from pcipass.host.transaction import claim as c
from pcipass.host.transaction.writer import SysfsWriter
from pcipass.lab.topology import STANDALONE_EDU

pytestmark = pytest.mark.lab(append=("intel_iommu=off",))
# In the order they can be unloaded (each after what holds it).
VFIO_MODULES = ("vfio_pci", "vfio_pci_core", "vfio_iommu_type1", "vfio", "irqbypass")


def loaded_modules() -> set[str]:
    return {m for m in VFIO_MODULES if Path("/sys/module", m, "initstate").exists()}


def journal_empty() -> bool:
    return c.status(c.Context("/"))["groups"] == []


@pytest.fixture(autouse=True)
def as_found(tmp_path, monkeypatch):
    """The edu's driver and override, the vfio modules and the journal, put back after."""
    monkeypatch.setenv("PCIPASS_STATE_DIR", str(tmp_path / "state"))
    before, modules = state([STANDALONE_EDU]), loaded_modules()
    yield before, modules
    c.recover(c.Context("/"))
    w = SysfsWriter("/")
    driver, override = before[STANDALONE_EDU]
    w.override_set(STANDALONE_EDU, override)
    if w.driver(STANDALONE_EDU) != driver:
        w.unbind(STANDALONE_EDU)
        w.bind(STANDALONE_EDU, driver)
    for m in VFIO_MODULES:
        if m in loaded_modules() - modules:
            subprocess.run(["rmmod", m], check=True, capture_output=True)
    assert state([STANDALONE_EDU]) == before and loaded_modules() == modules


def test_the_kernel_has_no_iommu_and_vfio_no_noiommu_mode():
    assert not any(Path("/sys/class/iommu").glob("*"))
    assert not any(Path("/sys/kernel/iommu_groups").glob("*"))
    assert not (PCI / STANDALONE_EDU / "iommu_group").exists()
    assert Path("/sys/firmware/acpi/tables/DMAR").exists()  # the VT-d is there, just off
    parms = subprocess.run(["modinfo", "-F", "parm", "vfio"], capture_output=True, text=True, check=True)
    assert "enable_unsafe_noiommu_mode" not in parms.stdout
    assert SysfsWriter("/").noiommu_supported() is False


def test_vfio_pci_itself_refuses_a_device_without_a_group(as_found):
    """What a claim would run into: vfio-pci's probe fails (EINVAL) and the device stays unbound."""
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    w = SysfsWriter("/")
    w.override_set(STANDALONE_EDU, "vfio-pci")
    w.probe(STANDALONE_EDU)
    assert w.driver(STANDALONE_EDU) is None
    assert not (Path("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode")).exists()


def test_check_says_the_iommu_is_off_and_how_to_turn_it_on():
    p = pcipass("check", STANDALONE_EDU, "--json")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert doc["iommu"]["enabled"] is False and doc["iommu"]["units"] == [] and doc["iommu"]["groups"] == 0
    [off] = [r for r in doc["verdict"]["reasons"] if r["code"] == "iommu-off"]
    assert off["severity"] == "blocking"
    # The firmware's DMAR table decides, though TCG's CPU says AuthenticAMD.
    assert off["details"]["kernel_arg"] == "intel_iommu=on" and "intel_iommu=on" in off["hint"]
    assert "intel_iommu=off" in off["message"]
    p = pcipass("check", STANDALONE_EDU)
    assert p.returncode == 1 and "[iommu-off]" in p.stdout and "intel_iommu=on" in p.stdout


def test_claim_refuses_and_changes_nothing(as_found):
    before, modules = as_found
    p = pcipass("claim", STANDALONE_EDU)
    assert p.returncode == 1
    assert "the IOMMU is off" in p.stderr and "intel_iommu=on" in p.stderr and "--unsafe-noiommu" in p.stderr
    with pytest.raises(PcipassError) as e:
        c.claim(c.Context("/"), STANDALONE_EDU)
    assert e.value.code == "iommu-off"
    assert state([STANDALONE_EDU]) == before and loaded_modules() == modules and journal_empty()


@pytest.mark.parametrize("vfio_loaded", [False, True])
def test_unsafe_noiommu_refuses_before_any_change_without_the_kernels_mode(as_found, vfio_loaded):
    """Known beforehand: from modinfo (vfio not loaded) or from sysfs (loaded, no parameter)."""
    if vfio_loaded:
        subprocess.run(["modprobe", "vfio"], check=True)
    before, modules = state([STANDALONE_EDU]), loaded_modules()
    for dry_run in ((), ("--dry-run",)):
        p = pcipass("claim", STANDALONE_EDU, "--unsafe-noiommu", *dry_run)
        assert p.returncode == 1
        assert "CONFIG_VFIO_NOIOMMU" in p.stderr and p.stdout == "", p.stderr  # not even a plan
    with pytest.raises(PcipassError) as e:
        c.claim(c.Context("/"), STANDALONE_EDU, unsafe_noiommu=True)
    assert e.value.code == "noiommu-unsupported" and "CONFIG_VFIO_NOIOMMU=y" in (e.value.hint or "")
    assert state([STANDALONE_EDU]) == before and loaded_modules() == modules and journal_empty()


def test_unsafe_noiommu_undoes_itself_when_it_finds_out_on_the_way(as_found, tmp_path):
    """No modinfo on PATH, vfio not loaded: nothing says beforehand that the mode is missing.
    The claim's first step finds it out; it is undone (only vfio's modules stay loaded)."""
    before, _ = as_found
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(subprocess.run(["sh", "-c", "command -v modprobe"], capture_output=True, text=True,
                              check=True).stdout.strip(), bin_dir / "modprobe")
    p = pcipass("claim", STANDALONE_EDU, "--unsafe-noiommu", env=dict(os.environ, PATH=str(bin_dir)))
    assert p.returncode == 1
    assert "CONFIG_VFIO_NOIOMMU" in p.stderr and "every change was undone" in p.stderr, p.stderr
    assert state([STANDALONE_EDU]) == before and journal_empty()
