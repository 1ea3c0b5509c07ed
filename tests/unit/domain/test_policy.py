"""The configuration-space policy: a table decides, the trace says why."""

from __future__ import annotations

import pytest

from pcipass import pci
from pcipass.domain.policy import ConfigPolicy, Kind, load_quirks
from pcipass.errors import UsageError
from pcipass.models import ConfigSpace


class Raw:
    """A device's config space where every byte is writable, so we see what reaches it."""

    def __init__(self, size=4096):
        self.cfg = ConfigSpace(size)
        self.cfg.header(vendor=0x8086, device=0x10D3, revision=1, class_code=0x020000, interrupt_pin=1)
        self.cfg.bar(0, 0x20000)
        self.cfg.bar(2, 0x4000, bits64=True, prefetch=True)
        self.cfg.bar(4, 0x20, io=True)
        self.pm = self.cfg.add_capability(pci.PCI_CAP_ID_PM, b"\x03\x00\x00\x00\x00\x00")
        self.msi = self.cfg.add_msi(vectors=4)
        self.vpd = self.cfg.add_capability(pci.PCI_CAP_ID_VPD, b"\0" * 6)
        self.msix = self.cfg.add_capability(pci.PCI_CAP_ID_MSIX, b"\x04\x00" + (3).to_bytes(4, "little") + (0x2003).to_bytes(4, "little"))
        self.vndr = self.cfg.add_capability(pci.PCI_CAP_ID_VNDR, b"\x08\0\0\0\0\0")
        # extended: AER at 0x100 -> ACS (hidden) at 0x140 -> DSN at 0x180
        self.cfg.set(0x100, 4, 0x01 | (1 << 16) | (0x140 << 20))
        self.cfg.set(0x140, 4, 0x0D | (1 << 16) | (0x180 << 20))
        self.cfg.set(0x180, 4, 0x03 | (1 << 16))
        self.cfg.set(0x184, 4, 0xDEADBEEF)
        self.cfg.set(0x144, 4, 0x1F)
        self.cfg.wmask[:] = b"\xff" * size
        self.cfg.data[6] |= 0  # keep
        self.writes = []

    def read(self, offset, width):
        return self.cfg.get(offset, width)

    def write(self, offset, width, value):
        self.writes.append((offset, width, value))
        self.cfg.data[offset:offset + width] = value.to_bytes(width, "little")


@pytest.fixture
def raw():
    return Raw()


def make(raw, **kw):
    lines = []
    pol = ConfigPolicy(raw, {0: 0x20000, 2: 0x4000, 4: 0x20}, size=4096, trace=lines.append, **kw)
    return pol, lines


def test_ids_are_read_only_and_the_trace_says_so(raw):
    pol, lines = make(raw)
    pol.write(0, 4, 0xFFFFFFFF)
    assert raw.writes == [] and pol.read(0, 4) == 0x10D38086
    assert "vendor ID [filtered]: dropped: identity: read-only" in lines[0]


def test_command_cannot_turn_off_memory_decode(raw):
    pol, lines = make(raw)
    pol.write(4, 2, 0x0006)  # memory + bus master on
    assert raw.read(4, 2) == 0x0006
    pol.write(4, 2, 0x0000)  # XSA-120: try to turn decode off
    assert raw.read(4, 2) == 0x0002  # bus master off, memory decode stays
    assert "REFUSED turning off memory decode" in lines[-1] and "XSA-120" in lines[-1]
    pol.write(4, 1, 0x01)  # I/O on with a one-byte write; memory stays
    assert raw.read(4, 2) == 0x0003
    pol.write(4, 2, 0x0002)
    assert raw.read(4, 2) == 0x0003 and "I/O" in lines[-1]


def test_command_bits_that_are_not_the_clients_stay(raw):
    pol, lines = make(raw)
    pol.write(4, 2, 0x0200)  # fast back-to-back: not in the mask
    assert raw.read(4, 2) == 0
    assert "not the client's to change" in lines[-1]


def test_status_errors_are_write_one_to_clear_only(raw):
    raw.cfg.data[6:8] = (0x8000 | 0x0010).to_bytes(2, "little")
    pol, _ = make(raw)
    pol.write(6, 2, 0x8000)
    assert raw.writes[-1] == (6, 2, 0x8000)  # only the error bit, never the current bits written back
    pol.write(4, 2, 0x0002)  # a command write must not touch status
    assert all(w[0] != 6 or w == (6, 2, 0x8000) for w in raw.writes)


@pytest.mark.parametrize("bar, size, flags", [(0x10, 0x20000, 0x0), (0x18, 0x4000, 0xC), (0x20, 0x20, 0x1)])
def test_bar_sizing_works_and_relocation_never_reaches_the_device(raw, bar, size, flags):
    before = raw.read(bar, 4)
    pol, lines = make(raw)
    pol.write(bar, 4, 0xFFFFFFFF)
    mask = 0xFFFFFFFC if flags & 1 else 0xFFFFFFF0
    assert pol.read(bar, 4) == (~(size - 1) & mask) | flags
    pol.write(bar, 4, 0xFE000000)
    assert pol.read(bar, 4) == 0xFE000000 | flags
    assert raw.read(bar, 4) == before and raw.writes == []
    assert "[virtualised]" in lines[-2] and "never reaches the device" in lines[-2]


def test_upper_half_of_a_64_bit_bar_and_absent_bars(raw):
    pol, _ = make(raw)
    pol.write(0x1C, 4, 0xFFFFFFFF)
    assert pol.read(0x1C, 4) == 0xFFFFFFFF  # 16 KiB BAR: all upper bits are address
    pol.write(0x24, 4, 0xFFFFFFFF)
    assert pol.read(0x24, 4) == 0  # BAR5 absent
    pol.write(0x30, 4, 0xFFFFFFFF)
    assert pol.read(0x30, 4) == 0  # no ROM


def test_capability_headers_are_read_only(raw):
    pol, lines = make(raw)
    for cap in (raw.pm, raw.msi, raw.msix, raw.vndr):
        pol.write(cap, 2, 0)
    assert raw.writes == []
    assert all("capability headers are read-only" in line for line in lines)
    assert pol.read(0x34, 1) == raw.pm


def test_msi_and_msix_enable_only_through_set_irqs(raw):
    pol, lines = make(raw)
    pol.write(raw.msi + 2, 2, 0x0071)
    pol.write(raw.msi + 4, 4, 0xFEE00000)
    pol.write(raw.msix + 2, 2, 0xC000)
    assert raw.writes == []
    assert "SET_IRQS" in lines[0] and "SET_IRQS" in lines[2]


def test_pm_and_vpd_are_filtered(raw):
    pol, lines = make(raw)
    pol.write(raw.pm + 4, 2, 0x0003)  # D3hot
    pol.write(raw.vpd + 2, 2, 0x8000)
    assert raw.writes == []
    assert "power management [filtered]" in lines[0] and "VPD [filtered]" in lines[1]


def test_unlisted_bytes_read_through_and_writes_pass_only_when_permissive(raw):
    pol, lines = make(raw)
    pol.write(raw.vndr + 4, 4, 0x11223344)
    assert raw.writes == [] and "--permissive" in lines[-1]
    pol, lines = make(raw, permissive=True)
    pol.write(raw.vndr + 4, 4, 0x11223344)
    assert raw.writes == [(raw.vndr + 4, 4, 0x11223344)]
    assert pol.read(raw.vndr + 4, 4) == 0x11223344


def test_extended_space_shows_only_listed_capabilities(raw):
    pol, _ = make(raw)
    found = [(c.id, c.offset) for c in pci.extended_capabilities(pol.read)]
    assert found == [(pci.PCI_EXT_CAP_ID_ERR, 0x100), (pci.PCI_EXT_CAP_ID_DSN, 0x180)]
    assert pol.read(0x144, 4) == 0  # ACS hidden
    assert pol.read(0x184, 4) == 0xDEADBEEF
    pol.write(0x144, 4, 0)
    pol.write(0x184, 4, 0)
    assert raw.writes == []
    pol.write(0x104, 4, 0x10)  # AER uncorrectable status: write-1-to-clear passes
    assert raw.writes == [(0x104, 4, 0x10)]


def test_hidden_first_extended_capability_becomes_an_empty_head():
    raw = Raw()
    raw.cfg.set(0x100, 4, 0x0D | (1 << 16) | (0x180 << 20))  # ACS first, then DSN
    pol, _ = make(raw)
    assert [(c.id, c.offset) for c in pci.extended_capabilities(pol.read)] == [(0, 0x100), (3, 0x180)]


def test_quirks_pass_a_field_through_for_that_device_only(raw, tmp_path):
    q = tmp_path / "quirks"
    q.write_text("# extra fields\n8086:10d3 0x%x 4 0x0000ffff\n1234:11e8 0xa0 4\n" % (raw.vndr + 4))
    quirks = load_quirks(q)
    assert len(quirks) == 2
    pol, lines = make(raw, quirks=quirks)
    pol.write(raw.vndr + 4, 4, 0xAAAABBBB)
    assert raw.read(raw.vndr + 4, 4) == 0x0000BBBB
    assert "quirks file" in lines[-1]


@pytest.mark.parametrize("text, words", [("8086:10d3 0x41 4", "unaligned"), ("nonsense", "cannot parse"),
                                         ("8086:10d3 0x40 1 0x1ff", "wider"), ("8086:10d3 0x10 4", "header")])
def test_bad_quirks_are_refused_with_a_hint(tmp_path, text, words):
    q = tmp_path / "quirks"
    q.write_text(text + "\n")
    with pytest.raises(UsageError, match=words) as exc:
        load_quirks(q)
    assert exc.value.hint


def test_missing_quirks_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read quirks"):
        load_quirks(tmp_path / "none")


def test_bad_accesses_change_nothing(raw):
    pol, _ = make(raw)
    for offset, width in ((1, 2), (0, 3), (4094, 4), (-1, 1)):
        with pytest.raises(Exception, match="aligned"):
            pol.write(offset, width, 0)
    assert raw.writes == []


def test_every_header_byte_is_in_the_table(raw):
    pol, _ = make(raw)
    assert all(pol._byte[b] >= 0 for b in range(0x40))
    kinds = {f.kind for f in pol.fields}
    assert kinds == {Kind.VIRTUAL, Kind.FILTERED, Kind.PASS}
