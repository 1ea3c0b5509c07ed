"""The edu driver on the real kernel (the lab, as root) through pcipass.vfio, once per VFIO
backend the kernel has (the `iommu_mode` fixture, as in test_vfio.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from guest_pci import iommu_mode_fixture
from test_vfio import EDU, edu_bdf, find, open_fds, vfio_bound, vfio_maps  # noqa: F401 (edu_bdf: the shared fixture)

from pcipass.device import IrqKind
from pcipass.drivers import edu as e
from pcipass.vfio import open_device

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("iommu_mode")]
iommu_mode = iommu_mode_fixture()


@pytest.fixture
def dev(edu_bdf, iommu_mode):
    with open_device(edu_bdf) as d:
        assert d.container.kind == iommu_mode
        yield d


def test_ident_and_liveness(dev):
    edu = e.Edu(dev)
    assert edu.ident().raw & 0xFF == 0xED
    assert edu.liveness(0x12345678) and edu.liveness(0)


@pytest.mark.parametrize("use_irq", [False, True], ids=["polled", "irq"])
def test_factorial_12(dev, use_irq):
    edu = e.Edu(dev)
    try:
        assert edu.factorial(12, use_irq=use_irq) == 479001600
        assert edu.factorial(5, use_irq=use_irq) == 120
    finally:
        edu.close()


@pytest.mark.parametrize("irq", [IrqKind.MSI, IrqKind.INTX], ids=lambda k: k.name)
def test_dma_roundtrip_4k_random_with_completion_interrupt(dev, irq):
    edu = e.Edu(dev, irq=irq)
    try:
        data = os.urandom(4096)
        assert edu.dma_roundtrip(data) == data
    finally:
        edu.close()


def test_completion_interrupt_arrives_on_its_eventfd(dev):
    edu = e.Edu(dev, irq=IrqKind.MSI)
    efd = edu.enable_irq()
    buf = dev.dma_alloc(4096, dma_mask_bits=e.DMA_MASK_BITS)
    try:
        edu.bar.write(e.EDU_DMA_SRC, 8, buf.iova)
        edu.bar.write(e.EDU_DMA_DST, 8, e.DMA_BUFFER)
        edu.bar.write(e.EDU_DMA_COUNT, 8, 64)
        edu.bar.write(e.EDU_DMA_CMD, 8, e.EDU_DMA_CMD_START | e.EDU_DMA_CMD_IRQ)
        assert efd.wait(10.0) >= 1
        assert edu.bar.read(e.EDU_IRQ_STATUS, 4) & e.IRQ_DMA
        edu.bar.write(e.EDU_IRQ_ACK, 4, e.IRQ_DMA)
    finally:
        dev.dma_free(buf)
        edu.close()


def _dmesg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


def test_dma_to_unmapped_iova_is_blocked_by_the_iommu(dev):
    edu = e.Edu(dev, irq=IrqKind.MSI)
    target = 0x0FFF_0000  # below the 28-bit mask, never mapped
    assert not any(m.iova <= target < m.iova + m.size for m in dev.container.dma.mappings.values())
    edu.bar.write(0x40, 4, 0)
    before = set(_dmesg())  # the fault must be this test's, not an earlier backend's (lines carry a time)
    try:
        edu.dma_from_device(target, e.DMA_CHUNK)  # edu -> RAM: the write must not land anywhere
    finally:
        edu.close()
    new = [line for line in _dmesg() if line not in before]
    assert any("DMAR" in line and f"fault addr {target:#x}" in line for line in new), new[-20:]
    # the host and the device carry on: a mapped DMA still works
    edu = e.Edu(dev, irq=IrqKind.MSI)
    try:
        data = os.urandom(4096)
        assert edu.dma_roundtrip(data) == data
    finally:
        edu.close()


def test_driver_leaves_nothing_behind(edu_bdf, iommu_mode):
    fds, maps = open_fds(), vfio_maps()
    with open_device(edu_bdf) as d:
        assert d.container.kind == iommu_mode
        edu = e.Edu(d)
        assert edu.dma_roundtrip(b"\xa5" * 4096) == b"\xa5" * 4096
        edu.factorial(10, use_irq=True)
        edu.close()
        assert not d.container.dma.mappings
    assert open_fds() == fds and vfio_maps() == maps


def test_pcipass_drive_edu(edu_bdf):
    out = subprocess.run([sys.executable, "-m", "pcipass", "drive", "edu", edu_bdf], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "479001600" in out.stdout and "equal" in out.stdout and "all checks passed" in out.stdout
