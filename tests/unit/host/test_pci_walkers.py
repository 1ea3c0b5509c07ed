"""Config-space capability walkers over bytes and over read(offset, width) callables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcipass import pci
from pcipass.host.fixtures import synthetic


def _cfg(**kw):
    return synthetic.config_space(0x8086, 0x1234, 0x020000, **kw)


def test_standard_and_extended_lists():
    cfg = _cfg(express=pci.PCI_EXP_TYPE_ENDPOINT, msi=True, acs=(0x7F, 0x1D), sriov=True)
    assert [c.name for c in pci.capabilities(cfg)] == ["pm", "msi", "exp"]
    ext = list(pci.extended_capabilities(cfg))
    assert [(c.name, c.offset, c.version) for c in ext] == [("acs", 0x100, 1), ("sriov", 0x140, 1)]
    assert pci.express_type(cfg) == pci.PCI_EXP_TYPE_ENDPOINT


def test_same_walk_over_a_read_callable():
    cfg = _cfg(express=pci.PCI_EXP_TYPE_ROOT_PORT, acs=(0x5F, 0x1D))
    calls = []

    def read(offset, width):
        calls.append((offset, width))
        return int.from_bytes(cfg[offset : offset + width], "little")

    assert pci.find_capability(read, pci.PCI_CAP_ID_EXP).offset == 0x50
    a = pci.acs(read)
    assert a.supported == ["SV", "TB", "RR", "CR", "UF", "DT"]
    assert a.enabled == ["SV", "RR", "CR", "UF"]
    assert a.missing() == []
    assert calls  # it went through the callable


def test_acs_missing_bits_and_absent_acs():
    a = pci.Acs(cap=pci.PCI_ACS_SV | pci.PCI_ACS_UF | pci.PCI_ACS_RR, ctrl=pci.PCI_ACS_SV | pci.PCI_ACS_RR)
    assert a.missing() == ["CR", "UF"]
    assert pci.acs(_cfg(express=pci.PCI_EXP_TYPE_DOWNSTREAM)) is None


def test_no_capability_list_bit():
    cfg = bytearray(_cfg(express=pci.PCI_EXP_TYPE_ENDPOINT))
    cfg[pci.PCI_STATUS] = 0
    assert list(pci.capabilities(bytes(cfg))) == []


def test_conventional_function_has_no_extended_space():
    cfg = _cfg() + b"\xff" * (4096 - 256)
    assert list(pci.extended_capabilities(cfg)) == []


def test_loops_end():
    cfg = bytearray(256)
    cfg[pci.PCI_STATUS] = pci.PCI_STATUS_CAP_LIST
    cfg[pci.PCI_CAPABILITY_LIST] = 0x40
    cfg[0x40:0x42] = bytes([pci.PCI_CAP_ID_PM, 0x50])
    cfg[0x50:0x52] = bytes([pci.PCI_CAP_ID_MSI, 0x40])  # back to the first
    assert [c.offset for c in pci.capabilities(bytes(cfg))] == [0x40, 0x50]
    ext = bytearray(4096)
    ext[0x100:0x104] = (pci.PCI_EXT_CAP_ID_ERR | (1 << 16) | (0x100 << 20)).to_bytes(4, "little")
    assert len(list(pci.extended_capabilities(bytes(ext)))) == 1


def test_short_config_raises():
    with pytest.raises(pci.ConfigUnreadable):
        list(pci.capabilities(_cfg(express=0)[:64]))


def test_unknown_ids_get_a_name():
    assert pci.Capability(0x3F, 0x40).name == "cap-0x3f"
    assert pci.Capability(0x7F, 0x100, extended=True).name == "ext-cap-0x7f"


@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=200))
def test_walkers_never_loop_or_crash_on_garbage(pokes):
    data = bytearray(4096)
    data[pci.PCI_STATUS] = pci.PCI_STATUS_CAP_LIST
    for offset, value in pokes:
        data[offset] = value
    std = list(pci.capabilities(bytes(data)))
    ext = list(pci.extended_capabilities(bytes(data)))
    assert len(std) <= 48 and len(ext) <= (4096 - 256) // 8
    assert all(c.offset >= 0x40 for c in std) and all(c.offset >= 0x100 for c in ext)
