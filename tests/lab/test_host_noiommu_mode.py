"""vfio's no-IOMMU mode on the real kernel: the lab kernel `iommufd` (CONFIG_VFIO_NOIOMMU=y,
vfio built in) booted with intel_iommu=off, so no device has an IOMMU group.

`claim --unsafe-noiommu` sets enable_unsafe_noiommu_mode, vfio-pci takes the edu and makes
it a no-IOMMU group (/dev/vfio/noiommu-N), the kernel taints itself and says so, the claim
states both; the edu driver runs through the group's node (its DMA refused: without an
IOMMU there is nothing to map); release gives the device back and puts the mode back.
The refusal on Debian's kernel, which has no such mode, is test_host_noiommu.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from guest_pci import PCI, claim_state, driver, pcipass, wait_for  # noqa: F401 (claim_state: autouse)
from test_host_claim import state

from pcipass.device import IrqKind
from pcipass.drivers import edu as e
from pcipass.errors import PcipassError
from pcipass.host.transaction.writer import NOIOMMU_PARAM, SysfsWriter
from pcipass.lab.topology import STANDALONE_EDU
from pcipass.vfio import open_device

pytestmark = pytest.mark.lab(append=("intel_iommu=off",), kernel="iommufd")
PARAM = Path("/") / NOIOMMU_PARAM
TAINT_USER = 1 << 6  # include/linux/panic.h: TAINT_USER, 'U'


def tainted() -> int:
    return int(Path("/proc/sys/kernel/tainted").read_text())


def dmesg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.fixture
def as_found():
    """The edu's driver and override and the mode's value, put back after."""
    before, mode = state([STANDALONE_EDU]), PARAM.read_text().strip()
    yield before
    pcipass("release", STANDALONE_EDU)
    w = SysfsWriter("/")
    drv, override = before[STANDALONE_EDU]
    w.override_set(STANDALONE_EDU, override)
    if w.driver(STANDALONE_EDU) != drv:
        w.unbind(STANDALONE_EDU)
        w.bind(STANDALONE_EDU, drv)
    PARAM.write_text(mode)
    assert state([STANDALONE_EDU]) == before


def test_the_kernel_has_no_iommu_and_vfio_has_its_no_iommu_mode():
    assert not any(Path("/sys/class/iommu").glob("*"))
    assert not (PCI / STANDALONE_EDU / "iommu_group").exists()
    assert PARAM.read_text().strip() == "N"  # built in, off until asked
    assert SysfsWriter("/").noiommu_supported() is True
    p = pcipass("claim", STANDALONE_EDU)
    assert p.returncode == 1 and "--unsafe-noiommu" in p.stderr, p.stderr


def test_claim_unsafe_noiommu_runs_the_edu_driver_and_release_puts_the_mode_back(as_found):
    seen = set(dmesg())
    p = pcipass("claim", STANDALONE_EDU, "--unsafe-noiommu")
    assert p.returncode == 0, p.stderr
    # the warning, stated by the claim: all of memory, and the taint
    assert "warning: no IOMMU" in p.stderr and "all of host memory" in p.stderr, p.stderr
    assert "TAINT_USER" in p.stderr and "/proc/sys/kernel/tainted" in p.stderr, p.stderr
    assert PARAM.read_text().strip() == "Y"
    assert driver(STANDALONE_EDU) == "vfio-pci"
    group = (PCI / STANDALONE_EDU / "iommu_group").resolve()
    assert (group / "name").read_text().strip() == "vfio-noiommu"
    node = Path(f"/dev/vfio/noiommu-{group.name}")
    assert node.exists() and f"  {node}\n" in p.stdout, p.stdout
    # the kernel's side of it: the taint, and its own warning
    assert tainted() & TAINT_USER
    new = [line for line in dmesg() if line not in seen]
    assert any("Adding kernel taint for vfio-noiommu group on device" in line for line in new), new
    status = json.loads(pcipass("status", "--json").stdout)
    [claimed] = [g for g in status["groups"] if any(d["bdf"] == STANDALONE_EDU for d in g["devices"])]
    assert claimed["noiommu"] is True

    # the edu driver through /dev/vfio/noiommu-N
    with open_device(STANDALONE_EDU) as dev:
        assert dev.container.kind == "noiommu" and dev.container.iova_ranges() == []
        edu = e.Edu(dev, irq=IrqKind.MSI)
        try:
            assert edu.ident().raw & 0xFF == 0xED
            assert edu.liveness(0x12345678)
            assert edu.factorial(12) == 479001600
            assert edu.factorial(10, use_irq=True) == 3628800
            with pytest.raises(PcipassError) as exc:  # no IOMMU: no DMA address to give it
                dev.dma_alloc(4096)
            assert exc.value.code == "vfio-noiommu-dma"
        finally:
            edu.close()
        assert not dev.container.dma.mappings
    new = [line for line in dmesg() if line not in seen]
    assert any("vfio-noiommu device opened by user" in line for line in new), new

    p = pcipass("release", STANDALONE_EDU)
    assert p.returncode == 0, p.stderr
    assert wait_for(lambda: not node.exists(), 10), f"{node} is still there"
    assert PARAM.read_text().strip() == "N"
    assert state([STANDALONE_EDU]) == as_found


def test_the_mode_already_on_is_left_on(as_found):
    """A host that had the mode on before the claim keeps it on after the release."""
    PARAM.write_text("Y")
    p = pcipass("claim", STANDALONE_EDU, "--unsafe-noiommu")
    assert p.returncode == 0, p.stderr
    assert pcipass("release", STANDALONE_EDU).returncode == 0
    assert PARAM.read_text().strip() == "Y" and driver(STANDALONE_EDU) == as_found[STANDALONE_EDU][0]
