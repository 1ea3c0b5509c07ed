"""The edu driver against pcipass's Python edu model, over each Device implementation.

The driver sees only pcipass.device.Device: the `serve` fixture (conftest) runs
each test over the kernel's VFIO (the fake kernel, both IOMMU backends) and over
vfio-user, the same code path the lab tests drive on QEMU's edu.
"""

from __future__ import annotations

import os

import pytest

import pcipass.vfio
from pcipass import models
from pcipass.device import IrqKind
from pcipass.drivers import edu as e
from pcipass.errors import PcipassError


@pytest.fixture
def dev(serve):
    return serve(models.create("edu")).open()


def test_ident_and_liveness(dev):
    edu = e.Edu(dev, timeout=5)
    ident = edu.ident()
    assert (ident.major, ident.minor, ident.raw) == (1, 0, 0x010000ED)
    assert edu.liveness(0xCAFEF00D) and edu.liveness(0)
    assert dev.config_read(4, 2) & 0x6 == 0x6  # memory and bus master on


@pytest.mark.parametrize("use_irq", [False, True])
def test_factorial(dev, use_irq):
    edu = e.Edu(dev, timeout=5)
    try:
        assert edu.factorial(12, use_irq=use_irq) == 479001600
        assert edu.factorial(0, use_irq=use_irq) == 1
    finally:
        edu.close()
    with pytest.raises(PcipassError) as exc:
        edu.factorial(13)
    assert exc.value.code == "edu-factorial-range"


@pytest.mark.parametrize("irq", [IrqKind.MSI, IrqKind.INTX])
def test_dma_roundtrip_in_chunks(dev, irq):
    edu = e.Edu(dev, irq=irq, timeout=5)
    try:
        data = os.urandom(4096)
        assert edu.dma_roundtrip(data) == data
        assert edu.irq_kind == irq
    finally:
        edu.close()


def test_dma_guards(dev):
    edu = e.Edu(dev, timeout=5)
    with pytest.raises(PcipassError) as exc:
        edu.dma_to_device(0x1000, e.DMA_BUFFER_SIZE)  # would end at the buffer's last byte: QEMU 7.2 dies
    assert exc.value.code == "edu-dma-size" and exc.value.hint
    with pytest.raises(PcipassError) as exc:
        edu.dma_to_device(1 << 28, 16)
    assert exc.value.code == "edu-dma-mask"


def test_run_all_says_what_happened(dev):
    lines: list[str] = []
    assert e.run_all(dev, say=lines.append)
    text = "\n".join(lines)
    assert "479001600" in text and "equal" in text and "0x010000ed" in text


def test_not_an_edu_is_refused(dev, monkeypatch):
    monkeypatch.setattr(dev, "config_read", lambda off, w: 0x8086 if off == 0 else 0x10D3)
    with pytest.raises(PcipassError) as exc:
        e.Edu(dev)
    assert exc.value.code == "edu-wrong-device" and "8086:10d3" in exc.value.message


def test_pcipass_drive_edu(dev, monkeypatch, capsys):
    monkeypatch.setattr(pcipass.vfio, "open_device", lambda bdf, **kw: dev)
    monkeypatch.setattr(dev, "close", lambda: None)
    from pcipass.cli import main

    assert main(["drive", "edu", "0000:00:0a.0", "--irq", "intx"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "INTX" in out
