"""Configuration-space policy as data, the way xen-pciback's conf_space does it.

Every configuration register a client may touch is a `Field` in a table: its
offset and size, its kind (virtualised: the backend keeps the value and the
device never sees the write; filtered: read from the device, writes dropped;
passed through: written to the device, but only the bits in `mask`), and why.
The header has one table; each capability found by walking the list has its
own, at the capability's offset. Bytes no table lists are read from the device
and their writes are dropped, unless `permissive` (as pciback's permissive
mode). Extended space (0x100 on) is hidden except for the capabilities listed
in EXT_TABLES, whose chain is re-linked so the client walks only those.

`--trace` prints one line per access: what was asked, what each field decided,
and why.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Protocol

from pcipass import pci
from pcipass.errors import PcipassError, UsageError
from pcipass.pci import PCI_BASE_ADDRESS_0, PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PCI_ROM_ADDRESS


class Kind(enum.Enum):
    VIRTUAL = "virtualised"
    FILTERED = "filtered"
    PASS = "passed through"


@dataclass(frozen=True)
class Field:
    offset: int  # relative to its table's base (0 for the header, the capability's offset)
    size: int
    kind: Kind
    name: str
    why: str
    mask: int = 0  # PASS: the bits a client may change; the others keep the device's value
    keep_set: int = 0  # PASS: bits a client may set but never clear
    w1c: bool = False  # PASS: write-1-to-clear (bytes the client did not write count as 0)


V, F, P = Kind.VIRTUAL, Kind.FILTERED, Kind.PASS
RO_ID = "identity: read-only"

HEADER = [
    Field(0x00, 2, F, "vendor ID", RO_ID),
    Field(0x02, 2, F, "device ID", RO_ID),
    Field(0x04, 2, P, "command", "a guest may change bus mastering, SERR, parity, INTx disable and "
          "turn decode on, never off", mask=0x0547, keep_set=PCI_COMMAND_IO | PCI_COMMAND_MEMORY),
    Field(0x06, 2, P, "status", "error bits are write-1-to-clear, the rest read-only", mask=0xF900, w1c=True),
    Field(0x08, 1, F, "revision ID", RO_ID),
    Field(0x09, 3, F, "class code", RO_ID),
    Field(0x0C, 1, P, "cache line size", "harmless to the host", mask=0xFF),
    Field(0x0D, 1, P, "latency timer", "harmless to the host", mask=0xFF),
    Field(0x0E, 1, F, "header type", RO_ID),
    Field(0x0F, 1, F, "BIST", "a self-test could wedge the device: never started by a client"),
    *[Field(PCI_BASE_ADDRESS_0 + 4 * i, 4, V, f"BAR{i}",
            "addresses are the backend's: sizing works, relocation never reaches the device") for i in range(6)],
    Field(0x28, 4, F, "CardBus CIS pointer", RO_ID),
    Field(0x2C, 2, F, "subsystem vendor ID", RO_ID),
    Field(0x2E, 2, F, "subsystem ID", RO_ID),
    Field(PCI_ROM_ADDRESS, 4, V, "expansion ROM BAR", "the ROM is read through its region; the address is the backend's"),
    Field(0x34, 1, F, "capability pointer", "capability headers are read-only"),
    Field(0x35, 7, F, "reserved", "reserved"),
    Field(0x3C, 1, V, "interrupt line", "routing is the backend's; the value is kept for the client"),
    Field(0x3D, 1, F, "interrupt pin", RO_ID),
    Field(0x3E, 1, F, "min grant", RO_ID),
    Field(0x3F, 1, F, "max latency", RO_ID),
]

CAP_HEADER = [
    Field(0, 1, F, "capability ID", "capability headers are read-only"),
    Field(1, 1, F, "next capability", "capability headers are read-only"),
]
_MSI_WHY = "MSI is enabled, sized and programmed only through SET_IRQS"
_MSIX_WHY = "MSI-X is enabled and masked only through SET_IRQS"

# Per capability ID: its fields after the 2-byte header (a size of 0 means "to the next capability").
CAP_TABLES: dict[int, list[Field]] = {
    pci.PCI_CAP_ID_PM: [Field(2, 0, F, "power management", "power state changes could lose device state: filtered")],
    pci.PCI_CAP_ID_VPD: [Field(2, 0, F, "VPD", "VPD access can hang some devices: filtered")],
    pci.PCI_CAP_ID_MSI: [Field(2, 2, F, "MSI control", _MSI_WHY), Field(4, 0, F, "MSI address/data", _MSI_WHY)],
    pci.PCI_CAP_ID_MSIX: [Field(2, 2, F, "MSI-X control", _MSIX_WHY),
                          Field(4, 8, F, "MSI-X table/PBA", "table and PBA locations are read-only")],
}

# Extended capabilities a client sees; every other one is hidden (reads 0).
EXT_TABLES: dict[int, list[Field]] = {
    pci.PCI_EXT_CAP_ID_ERR: [
        Field(0x04, 4, P, "AER uncorrectable status", "write-1-to-clear", mask=0xFFFFFFFF, w1c=True),
        Field(0x08, 4, P, "AER uncorrectable mask", "the driver's to choose", mask=0xFFFFFFFF),
        Field(0x0C, 4, F, "AER uncorrectable severity", "the host's choice"),
        Field(0x10, 4, P, "AER correctable status", "write-1-to-clear", mask=0xFFFFFFFF, w1c=True),
        Field(0x14, 4, P, "AER correctable mask", "the driver's to choose", mask=0xFFFFFFFF),
        Field(0x18, 0, F, "AER log", "read-only"),
    ],
    pci.PCI_EXT_CAP_ID_DSN: [Field(0x04, 8, F, "device serial number", RO_ID)],
}


class RawConfig(Protocol):
    """The device's real configuration space (exact-width accesses)."""

    def read(self, offset: int, width: int) -> int: ...

    def write(self, offset: int, width: int, value: int) -> None: ...


@dataclass(frozen=True)
class Quirk:
    vendor: int
    device: int
    offset: int
    size: int
    mask: int


_QUIRK_LINE = re.compile(
    r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})\s+(0x[0-9a-fA-F]+|\d+)\s+([124])(?:\s+(0x[0-9a-fA-F]+|\d+))?$"
)


def load_quirks(path: str | Path) -> list[Quirk]:
    """Read a quirks file: `VENDOR:DEVICE OFFSET SIZE [MASK]` per line, '#' comments.

    Each line passes one more field through for that device (writable bits
    `MASK`, default all), as pciback's quirks add fields for a device.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read quirks file {path}: {exc.strerror}",
                         hint="give --quirks a readable file") from None
    quirks = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _QUIRK_LINE.match(line)
        if not m:
            raise UsageError(f"{path}:{n}: cannot parse {line!r}",
                             hint="each line is VENDOR:DEVICE OFFSET SIZE [MASK], e.g. '8086:10d3 0x40 4 0xffff'")
        size = int(m[4])
        offset = int(m[3], 0)
        mask = int(m[5], 0) if m[5] else (1 << (8 * size)) - 1
        if offset % size or offset + size > pci.PCI_CFG_SPACE_EXP_SIZE or offset < pci.PCI_STD_HEADER_SIZEOF:
            raise UsageError(f"{path}:{n}: field {offset:#x}/{size} is unaligned, in the header or past 4 KiB",
                             hint="quirks may open device-specific registers at 0x40 and above, aligned to their size")
        if mask >> (8 * size):
            raise UsageError(f"{path}:{n}: mask {mask:#x} is wider than {size} bytes", hint="fix the mask")
        quirks.append(Quirk(int(m[1], 16), int(m[2], 16), offset, size, mask))
    return quirks


@dataclass
class Decision:
    field: str
    kind: str
    action: str


class ConfigPolicy:
    """The client's view of a device's configuration space."""

    def __init__(self, raw: RawConfig, bar_sizes: dict[int, int], *, size: int = pci.PCI_CFG_SPACE_SIZE,
                 permissive: bool = False, quirks: Sequence[Quirk] = (), trace: Callable[[str], None] | None = None) -> None:
        self.raw = raw
        self.size = size
        self.permissive = permissive
        self.trace = trace
        self._virtual: dict[int, int] = {}  # field index -> the backend's value
        self._bar_masks: dict[int, tuple[int, int]] = {}  # field index -> (writable mask, type bits)
        self.caps: list[tuple[int, int]] = []  # (capability ID, offset)
        self.fields: list[Field] = []
        self._read_plans: dict[tuple[int, int], tuple[bool, list[tuple[int, int, int]]]] = {}
        self._byte: list[int] = [-1] * size  # byte -> index into fields
        for f in HEADER:
            self._add(f)
        self._setup_bars(bar_sizes)
        self._virtual[self._byte[0x3C]] = raw.read(0x3C, 1)
        self.caps = [(c.id, c.offset) for c in pci.capabilities(self._raw_read)]
        for cap_id, at in self.caps:
            length = self._cap_length(cap_id, at)
            for f in CAP_HEADER + CAP_TABLES.get(cap_id, []):
                size_ = f.size or length - f.offset
                if size_ > 0:
                    self._add(replace(f, offset=at + f.offset, size=size_))
        if size > pci.PCI_CFG_SPACE_SIZE:
            self._setup_ext()
        vendor, device = raw.read(0, 2), raw.read(2, 2)
        for q in quirks:
            if (q.vendor, q.device) == (vendor, device) and q.offset + q.size <= size:
                self._add(Field(q.offset, q.size, P, f"quirk {q.offset:#x}", "listed in the quirks file", mask=q.mask),
                          override=True)

    def _raw_read(self, offset: int, width: int) -> int:
        return self.raw.read(offset, width)

    def _cap_length(self, cap_id: int, at: int) -> int:
        """How many bytes a capability spans (PCI spec layouts), bounded by the next one."""
        if cap_id in (pci.PCI_CAP_ID_PM, pci.PCI_CAP_ID_VPD):
            length = 8
        elif cap_id == pci.PCI_CAP_ID_MSI:
            ctrl = self.raw.read(at + 2, 2)
            length = (0x0E if ctrl & 0x80 else 0x0A) + (0x0A if ctrl & 0x100 else 0)
        elif cap_id == pci.PCI_CAP_ID_MSIX:
            length = 12
        else:
            length = 2
        later = [o for _, o in self.caps if o > at]
        return min([length, pci.PCI_CFG_SPACE_SIZE - at] + [o - at for o in later])

    def _add(self, f: Field, override: bool = False) -> int:
        index = len(self.fields)
        self.fields.append(f)
        for b in range(max(0, f.offset), min(self.size, f.offset + f.size)):
            if override or self._byte[b] < 0:
                self._byte[b] = index
        return index

    def _setup_bars(self, bar_sizes: dict[int, int]) -> None:
        i = 0
        while i < 6:
            at = PCI_BASE_ADDRESS_0 + 4 * i
            raw = self.raw.read(at, 4)
            size = bar_sizes.get(i, 0)
            if raw & 1:  # I/O
                flags, mask = raw & 0x3, ~(size - 1) & 0xFFFFFFFC if size else 0
            else:
                flags, mask = raw & 0xF, ~(size - 1) & 0xFFFFFFF0 if size else 0
            self._bar(at, raw if size else 0, mask, flags if size else 0)
            if not raw & 1 and raw & 0x6 == 0x4 and i < 5:  # 64-bit: the next BAR is the upper half
                upper = self.raw.read(at + 4, 4)
                self._bar(at + 4, upper if size else 0, (~(size - 1) >> 32) & 0xFFFFFFFF if size else 0, 0)
                i += 1
            i += 1
        rom = bar_sizes.get(6, 0)
        self._bar(PCI_ROM_ADDRESS, self.raw.read(PCI_ROM_ADDRESS, 4) if rom else 0,
                  (~(rom - 1) & 0xFFFFF800) | 1 if rom else 0, 0)

    def _bar(self, at: int, initial: int, mask: int, flags: int) -> None:
        index = self._byte[at]
        self._virtual[index] = (initial & mask) | flags
        self._bar_masks[index] = (mask, flags)

    def _setup_ext(self) -> None:
        found = list(pci.extended_capabilities(self._raw_read))
        listed = [c for c in found if c.id in EXT_TABLES]
        base = pci.PCI_CFG_SPACE_SIZE
        # Everything from 0x100 on reads 0 unless a listed capability covers it.
        self._virtual[self._add(Field(base, self.size - base, V, "extended space", "not listed: hidden from the client"))] = 0
        for n, cap in enumerate(listed):
            header = self.raw.read(cap.offset, 4)
            nxt = listed[n + 1].offset if n + 1 < len(listed) else 0
            index = self._add(Field(cap.offset, 4, V, f"{cap.name} header", "re-linked to skip hidden capabilities"),
                              override=True)
            self._virtual[index] = (header & 0xFFFFF) | (nxt << 20)
            ends = sorted(o.offset for o in found if o.offset > cap.offset) + [self.size]
            for f in EXT_TABLES[cap.id]:
                size_ = f.size or ends[0] - cap.offset - f.offset
                if size_ > 0:
                    self._add(replace(f, offset=cap.offset + f.offset, size=size_), override=True)
        if listed and listed[0].offset != base:
            index = self._add(Field(base, 4, V, "extended list head",
                                    "an empty capability pointing at the first listed one"), override=True)
            self._virtual[index] = listed[0].offset << 20

    # --- the client's accesses ---

    def _spans(self, offset: int, width: int) -> list[tuple[int | None, int, int]]:
        """(field index or None, first byte, end byte) runs covering the access."""
        runs: list[tuple[int | None, int, int]] = []
        for b in range(offset, offset + width):
            idx = self._byte[b] if self._byte[b] >= 0 else None
            if runs and runs[-1][0] == idx:
                runs[-1] = (idx, runs[-1][1], b + 1)
            else:
                runs.append((idx, b, b + 1))
        return runs

    def reader(self, offset: int, width: int, device: Callable[[], int] | None = None) -> Callable[[], int]:
        """`read(offset, width)` as a function of nothing, for the server's fast table: the
        device's read itself when the access has a plan and the plan overlays nothing.
        `device`: that read prepared by the backend (default: the raw read with its checks)."""
        if self.passes_through(offset, width):
            return device or partial(self.raw.read, offset, width)
        return partial(self.read, offset, width)

    def passes_through(self, offset: int, width: int) -> bool:
        """Whether `read(offset, width)` is the device's read and nothing else (no field of it
        virtualised, nothing traced), by the plan an earlier identical read made; False without one."""
        return self.trace is None and self._read_plans.get((offset, width)) == (True, [])

    def read(self, offset: int, width: int) -> int:
        if self.trace is None:
            plan = self._read_plans.get((offset, width))
            if plan is not None:  # the hot path: a plan made by an earlier identical read
                needs_device, overlays = plan
                value = self.raw.read(offset, width) if needs_device else 0
                for k, shift, fshift in overlays:
                    value = (value & ~(0xFF << shift)) | (((self._virtual.get(k, 0) >> fshift) & 0xFF) << shift)
                return value
        self._check(offset, width)
        runs = self._spans(offset, width)
        needs_device = any(i is None or self.fields[i].kind is not V for i, _, _ in runs)
        overlays = [(j, 8 * (b - offset), 8 * (b - self.fields[j].offset))
                    for j, lo, hi in runs if j is not None and self.fields[j].kind is V for b in range(lo, hi)]
        self._read_plans[(offset, width)] = (needs_device, overlays)
        value = self.raw.read(offset, width) if needs_device else 0
        decisions = []
        for i, lo, hi in runs:
            if i is None:
                decisions.append(Decision("unlisted", "passed through", "read from the device"))
                continue
            f = self.fields[i]
            if f.kind is V:
                fv = self._virtual.get(i, 0)
                for b in range(lo, hi):
                    byte = (fv >> (8 * (b - f.offset))) & 0xFF
                    shift = 8 * (b - offset)
                    value = (value & ~(0xFF << shift)) | (byte << shift)
                decisions.append(Decision(f.name, f.kind.value, f"the backend's value ({f.why})"))
            else:
                decisions.append(Decision(f.name, f.kind.value, "read from the device"))
        self._trace("read", offset, width, value, decisions)
        return value

    def write(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width)
        decisions = []
        for i, lo, hi in self._spans(offset, width):
            part = (value >> (8 * (lo - offset))) & ((1 << (8 * (hi - lo))) - 1)
            if i is None:
                if self.permissive:
                    self._raw_write_bytes(lo, hi, part)
                    decisions.append(Decision("unlisted", "passed through", "written to the device (--permissive)"))
                else:
                    decisions.append(Decision("unlisted", "filtered",
                                              "dropped: no field lists these bytes (--permissive or a quirk would pass it)"))
                continue
            f = self.fields[i]
            decisions.append(self._write_field(i, f, lo, hi, part))
        self._trace("write", offset, width, value, decisions)

    def _write_field(self, i: int, f: Field, lo: int, hi: int, part: int) -> Decision:
        shift = 8 * (lo - f.offset)
        touched = ((1 << (8 * (hi - lo))) - 1) << shift
        if f.kind is F:
            return Decision(f.name, f.kind.value, f"dropped: {f.why}")
        if f.kind is V:
            if i in self._bar_masks:
                mask, flags = self._bar_masks[i]
                new = (self._virtual[i] & ~touched) | (part << shift)
                self._virtual[i] = (new & mask) | flags
                return Decision(f.name, f.kind.value, f"kept here as {self._virtual[i]:#010x}: {f.why}")
            if f.offset >= pci.PCI_CFG_SPACE_SIZE:
                return Decision(f.name, f.kind.value, f"dropped: {f.why}")
            self._virtual[i] = (self._virtual.get(i, 0) & ~touched) | (part << shift)
            return Decision(f.name, f.kind.value, f"kept here: {f.why}")
        # PASS: merge with the device's current value, only `mask` bits change.
        current = self.raw.read(f.offset, f.size)
        new = (part << shift) if f.w1c else (current & ~touched) | (part << shift)
        out = (new & f.mask) if f.w1c else (current & ~f.mask) | (new & f.mask)
        notes = []
        refused = f.keep_set & current & ~out
        if refused:
            out |= refused
            names = " and ".join(n for bit, n in ((PCI_COMMAND_IO, "I/O"), (PCI_COMMAND_MEMORY, "memory"))
                                 if refused & bit)
            notes.append(f"REFUSED turning off {names} decode: a client may not turn off memory or I/O "
                         "decode (XSA-120), the bit stays set")
        dropped = (new ^ current) & ~f.mask & touched & ((1 << (8 * f.size)) - 1)
        if dropped and not f.w1c:
            notes.append(f"bits {dropped:#x} are not the client's to change")
        self.raw.write(f.offset, f.size, out)
        notes.append(f"device gets {out:#0{2 + 2 * f.size}x} ({f.why})")
        return Decision(f.name, f.kind.value, "; ".join(notes))

    def _raw_write_bytes(self, lo: int, hi: int, part: int) -> None:
        n = hi - lo
        if n in (1, 2, 4) and lo % n == 0:
            self.raw.write(lo, n, part)
            return
        for b in range(lo, hi):
            self.raw.write(b, 1, (part >> (8 * (b - lo))) & 0xFF)

    def _check(self, offset: int, width: int) -> None:
        if width not in (1, 2, 4) or offset < 0 or offset + width > self.size or offset % width:
            raise PcipassError(f"config access at {offset:#x}/{width} is not an aligned 1, 2 or 4 byte access "
                               f"inside {self.size:#x} bytes", hint="split it into aligned accesses",
                               code="bad-config-access")

    def _trace(self, op: str, offset: int, width: int, value: int, decisions: list[Decision]) -> None:
        if self.trace is None:
            return
        what = "; ".join(f"{d.field} [{d.kind}]: {d.action}" for d in decisions)
        arrow = "->" if op == "read" else "<-"
        self.trace(f"config {op} {offset:#05x}/{width} {arrow} {value:#0{2 + 2 * width}x}: {what}")
