"""pcipass sriov on the real kernel: QEMU's igb (an 82576, on the peer QEMU 11.1), whose VFs
igbvf drives. Create 2 VFs; claim one for vfio-pci and drive it (its registers, its FLR);
release it; remove the VFs with the PF still on igb; SIGKILL half way, then recover."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from guest_pci import PCI, claim_state, driver, find, group_members, pcipass, wait_for  # noqa: F401 (claim_state: autouse)

from pcipass import pci
from pcipass.host.transaction.crash import CRASH_ENV
from pcipass.lab.topology import IGB, IGBVF

pytestmark = pytest.mark.lab(topology="sriov")

# igbvf's registers (Intel 82576 datasheet, 8.27 "Virtual Function Registers"): Device Status.
VF_STATUS = 0x0008


def the_pf() -> str:
    [pf] = find(IGB)
    return pf


def virtfns(pf: str) -> list[str]:
    links = sorted((p for p in (PCI / pf).iterdir() if p.name.startswith("virtfn")), key=lambda p: int(p.name[6:]))
    return [os.path.basename(os.readlink(p)) for p in links]


def numvfs(pf: str) -> int:
    return int((PCI / pf / "sriov_numvfs").read_text())


def group(bdf: str) -> int:
    return int((PCI / bdf / "iommu_group").resolve().name)


@pytest.fixture
def pf():
    pf = the_pf()
    assert wait_for(lambda: driver(pf) == "igb", 30), driver(pf)
    assert numvfs(pf) == 0
    yield pf
    if numvfs(pf):  # leave the guest as the test found it
        (PCI / pf / "sriov_numvfs").write_text("0")


def create_two(pf: str) -> list[str]:
    p = pcipass("sriov", pf, "--vfs", "2")
    assert p.returncode == 0, p.stderr
    vfs = virtfns(pf)
    assert len(vfs) == 2 and numvfs(pf) == 2
    assert wait_for(lambda: all(driver(v) == "igbvf" for v in vfs), 60), [driver(v) for v in vfs]
    return vfs


def test_create_two_vfs_that_igbvf_drives_each_in_its_own_group(pf):
    assert int((PCI / pf / "sriov_totalvfs").read_text()) >= 2
    vfs = create_two(pf)
    for vf in vfs:
        assert (PCI / vf / "physfn").resolve().name == pf
        assert f"{(PCI / vf / 'vendor').read_text().strip()[2:]}:{(PCI / vf / 'device').read_text().strip()[2:]}" == IGBVF
        assert group_members(vf) == [vf], group_members(vf)
    assert len({group(pf), *map(group, vfs)}) == 3
    p = pcipass("list", "--json")
    devs = {d["bdf"]: d for d in json.loads(p.stdout)["devices"]}
    assert devs[pf]["sriov"]["virtfns"] == vfs and devs[pf]["sriov"]["vf_groups"] == [group(v) for v in vfs]
    assert devs[vfs[1]]["sriov"]["physfn"] == pf and devs[vfs[1]]["driver"] == "igbvf"
    p = pcipass("check", vfs[1], "--json")
    v = json.loads(p.stdout)["verdict"]
    assert p.returncode == 0, p.stdout
    assert [m["bdf"] for m in v["members"]] == [vfs[1]] and v["iommu_group"] == group(vfs[1])
    assert v["sriov"]["physfn"] == {"bdf": pf, "driver": "igb", "iommu_group": group(pf)}
    assert "flr" in v["reset_methods"]
    p = pcipass("check", pf)
    assert "SR-IOV: 2 virtual functions:" in p.stdout, p.stdout
    # Asking for the same count again changes nothing; more than sriov_totalvfs is refused.
    p = pcipass("sriov", pf, "--vfs", "2")
    assert p.returncode == 0 and "no change" in p.stdout
    total = int((PCI / pf / "sriov_totalvfs").read_text())
    p = pcipass("sriov", pf, "--vfs", str(total + 1))
    assert p.returncode == 1 and f"has at most {total} VFs" in p.stderr, p.stderr
    assert virtfns(pf) == vfs


def test_claim_a_vf_drive_it_release_it_then_remove_the_vfs(pf):
    from pcipass.vfio import open_device

    vfs = create_two(pf)
    vf = vfs[1]
    p = pcipass("claim", vf)
    assert p.returncode == 0, p.stderr
    assert driver(vf) == "vfio-pci" and driver(vfs[0]) == "igbvf" and driver(pf) == "igb"
    dev = open_device(vf)
    try:
        # vfio-pci gives a VF the vendor and device IDs its own header reads as FFFFh.
        assert (dev.config_read(pci.PCI_VENDOR_ID, 2), dev.config_read(pci.PCI_DEVICE_ID, 2)) == (0x8086, 0x10CA)
        dev.config_write(pci.PCI_COMMAND, 2, dev.config_read(pci.PCI_COMMAND, 2) | pci.PCI_COMMAND_MEMORY)
        status = dev.region(0).read(VF_STATUS, 4)
        assert status != 0xFFFFFFFF, "BAR0 does not decode"  # all ones: nothing answered
        assert dev.info.can_reset
        dev.reset()  # the VF's FLR
        assert dev.config_read(pci.PCI_VENDOR_ID, 2) == 0x8086
        dev.config_write(pci.PCI_COMMAND, 2, dev.config_read(pci.PCI_COMMAND, 2) | pci.PCI_COMMAND_MEMORY)
        assert dev.region(0).read(VF_STATUS, 4) != 0xFFFFFFFF
        # While a VF is claimed (and open), removing the VFs is refused, nothing changed.
        p = pcipass("sriov", pf, "--vfs", "0")
        assert p.returncode == 1 and f"{vf} is claimed by pcipass" in p.stderr, p.stderr
        assert virtfns(pf) == vfs and driver(vf) == "vfio-pci"
    finally:
        dev.close()
    p = pcipass("release", vf)
    assert p.returncode == 0, p.stderr
    assert wait_for(lambda: driver(vf) == "igbvf", 30), driver(vf)
    p = pcipass("sriov", pf, "--vfs", "0")
    assert p.returncode == 0, p.stderr
    assert virtfns(pf) == [] and numvfs(pf) == 0
    assert not any((PCI / v).exists() for v in vfs)
    assert driver(pf) == "igb" and any((PCI / pf / "net").iterdir())


def test_a_vf_on_no_driver_with_autoprobe_off(pf):
    p = pcipass("sriov", pf, "--vfs", "1", "--autoprobe", "off")
    assert p.returncode == 0, p.stderr
    [vf] = virtfns(pf)
    assert driver(vf) is None and (PCI / pf / "sriov_drivers_autoprobe").read_text().strip() == "0"
    p = pcipass("sriov", pf, "--vfs", "0", "--autoprobe", "on")
    assert p.returncode == 0, p.stderr
    assert virtfns(pf) == [] and (PCI / pf / "sriov_drivers_autoprobe").read_text().strip() == "1"


@pytest.mark.parametrize("start,want", [(0, 2), (2, 1)])
def test_sigkill_half_way_then_recover_rolls_back(pf, start, want):
    if start:
        create_two(pf)
    before = virtfns(pf)
    steps = json.loads(pcipass("sriov", pf, "--vfs", str(want), "--dry-run", "--json").stdout)["steps"]
    for n in range(1, len(steps) + 1):
        p = pcipass("sriov", pf, "--vfs", str(want), env=dict(os.environ, **{CRASH_ENV: str(n)}))
        assert p.returncode == -9, (n, p.stderr)
        p = pcipass("status", "--json")
        [ch] = json.loads(p.stdout)["sriov"]
        assert ch["state"] == "interrupted sriov" and ch["numvfs_before"] == start, ch
        p = pcipass("recover")
        assert p.returncode == 0 and "rolled back sriov change" in p.stdout, (n, p.stdout, p.stderr)
        assert numvfs(pf) == start and len(virtfns(pf)) == len(before), n
        assert wait_for(lambda: all(driver(v) == "igbvf" for v in virtfns(pf)), 60)
        assert json.loads(pcipass("status", "--json").stdout)["sriov"] == []
    assert driver(pf) == "igb" and Path(PCI / pf / "net").is_dir()


@pytest.fixture
def vfio_enable_sriov():
    """vfio-pci creates VFs only with enable_sriov (a writable module parameter); put it back."""
    import subprocess

    subprocess.run(["modprobe", "vfio-pci"], check=True)
    param = Path("/sys/module/vfio_pci/parameters/enable_sriov")
    before = param.read_text().strip()
    param.write_text("Y")
    yield
    param.write_text(before)


def test_the_vf_token_flow_with_the_pf_on_vfio_pci(pf, vfio_enable_sriov):
    import uuid

    from pcipass.errors import PcipassError
    from pcipass.vfio import open_device

    p = pcipass("claim", pf)
    assert p.returncode == 0, p.stderr
    token = uuid.uuid4()
    pf_dev = open_device(pf)
    try:
        pf_dev.set_vf_token(token)
        p = pcipass("sriov", pf, "--vfs", "2")
        assert p.returncode == 0, p.stderr
        vfs = virtfns(pf)
        assert len(vfs) == 2 and wait_for(lambda: all(driver(v) == "vfio-pci" for v in vfs), 30)
        p = pcipass("check", vfs[0], "--json")
        [r] = [r for r in json.loads(p.stdout)["verdict"]["reasons"] if r["code"] == "sriov-vf"]
        assert r["details"]["vf_token"] is True
        with pytest.raises(PcipassError) as e:
            open_device(vfs[0])
        assert e.value.code == "vfio-vf-token-required" and "vf_token=" in e.value.hint, e.value
        with pytest.raises(PcipassError) as e:
            open_device(vfs[0], vf_token=uuid.uuid4())
        assert e.value.code == "vfio-vf-token-wrong", e.value
        vf_dev = open_device(vfs[0], vf_token=str(token))
        try:
            assert (vf_dev.config_read(pci.PCI_VENDOR_ID, 2), vf_dev.config_read(pci.PCI_DEVICE_ID, 2)) == (0x8086, 0x10CA)
            vf_dev.config_write(pci.PCI_COMMAND, 2, vf_dev.config_read(pci.PCI_COMMAND, 2) | pci.PCI_COMMAND_MEMORY)
            assert vf_dev.region(0).read(VF_STATUS, 4) != 0xFFFFFFFF
        finally:
            vf_dev.close()
        p = pcipass("config", "qemu", vfs[0], "--vf-token", str(token))
        assert p.returncode == 0 and f"vf-token={token}" in p.stdout, (p.stdout, p.stderr)
        p = pcipass("config", "qemu", vfs[0])
        assert "vf-token" not in p.stdout and "--vf-token UUID" in p.stderr, p.stderr
        p = pcipass("sriov", pf, "--vfs", "0")
        assert p.returncode == 0, p.stderr
        assert virtfns(pf) == []
    finally:
        pf_dev.close()
    p = pcipass("release", pf)
    assert p.returncode == 0, p.stderr
    assert wait_for(lambda: driver(pf) == "igb", 30), driver(pf)


def test_claim_with_reset_method_and_release_puts_it_back(pf):
    from pcipass.vfio import open_device

    before = (PCI / pf / "reset_method").read_text().strip()
    assert before.split()[:2] == ["flr", "pm"], before
    p = pcipass("claim", pf, "--reset-method", "pm,flr")
    assert p.returncode == 0, p.stderr
    assert (PCI / pf / "reset_method").read_text().strip() == "pm flr" and driver(pf) == "vfio-pci"
    dev = open_device(pf)
    try:
        assert dev.info.can_reset
        dev.reset()  # VFIO_DEVICE_RESET, through the methods as written: pm first
        assert dev.config_read(pci.PCI_VENDOR_ID, 2) == 0x8086
    finally:
        dev.close()
    p = pcipass("claim", pf, "--reset-method", "acpi")
    assert p.returncode == 2 and "has no acpi reset" in p.stderr, p.stderr
    p = pcipass("release", pf)
    assert p.returncode == 0, p.stderr
    assert (PCI / pf / "reset_method").read_text().strip() == before
    assert wait_for(lambda: driver(pf) == "igb", 30), driver(pf)
