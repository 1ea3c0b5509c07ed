"""Names from the pci.ids database (Debian's `pci.ids` package), read without lspci.

The file is read once; a vendor's block is found with one search when a name
in it is first asked for, and only then are its devices and subsystems parsed.
The class section is parsed on the first class lookup.

Format (from the file's own header): `vendor  name`, then `\\tdevice  name`,
then `\\t\\tsubvendor subdevice  name`; after them `C class  name`,
`\\tsubclass  name`, `\\t\\tprog-if  name`.
"""

from __future__ import annotations

import gzip
import os
import re
from functools import lru_cache

SEARCH_PATH = (
    "/usr/share/misc/pci.ids",
    "/usr/share/hwdata/pci.ids",
    "/usr/share/pci.ids",
    "/usr/share/misc/pci.ids.gz",
)

_TOP = re.compile(rb"^[0-9a-fA-FC]", re.MULTILINE)  # a vendor or class line: the end of a block


class PciIds:
    """Lookups into one pci.ids file; every lookup returns None for an unknown ID."""

    def __init__(self, path: str | None = None, *, data: bytes | None = None) -> None:
        if data is None:
            path = path or next((p for p in SEARCH_PATH if os.path.exists(p)), None)
            data = b""
            if path:
                try:
                    opener = gzip.open if path.endswith(".gz") else open
                    with opener(path, "rb") as f:
                        data = f.read()
                except OSError:
                    data = b""
        self.path = path
        # A leading newline lets every vendor and class line be found as "\nXXXX  ", the first one too.
        self._data = b"\n" + data if data else b""
        self._spans: dict[int, tuple[int, int] | None] = {}
        class_at = self._data.find(b"\nC ")
        self._class_at = class_at + 1 if class_at >= 0 else -1
        self._devices: dict[int, dict[int, tuple[str, dict[tuple[int, int], str]]]] = {}
        self._classes: dict[int, tuple[str, dict[int, tuple[str, dict[int, str]]]]] | None = None

    @property
    def available(self) -> bool:
        return bool(self._data)

    def _span(self, vendor: int) -> tuple[int, int] | None:
        """Where vendor's block is: (start of its line, start of the next top-level line).

        The vendor lines are unique, so one bytes.find (in C) beats indexing all of them.
        """
        if vendor not in self._spans:
            at = self._data.find(b"\n%04x  " % vendor)
            if at < 0 or (self._class_at >= 0 and at > self._class_at):
                self._spans[vendor] = None
            else:
                nxt = _TOP.search(self._data, at + 2)
                self._spans[vendor] = (at + 1, nxt.start() if nxt else len(self._data))
        return self._spans[vendor]

    def _vendor_block(self, vendor: int) -> dict[int, tuple[str, dict[tuple[int, int], str]]] | None:
        if vendor in self._devices:
            return self._devices[vendor]
        span = self._span(vendor)
        if span is None:
            return None
        devices: dict[int, tuple[str, dict[tuple[int, int], str]]] = {}
        current: dict[tuple[int, int], str] | None = None
        lines = self._data[span[0] : span[1]].decode("utf-8", "replace").splitlines()
        for line in lines[1:]:
            if not line or line.startswith("#"):
                continue
            if line.startswith("\t\t"):
                parts = line[2:].split(None, 2)
                if current is not None and len(parts) == 3:
                    current[(int(parts[0], 16), int(parts[1], 16))] = parts[2].strip()
            elif line.startswith("\t"):
                did, _, name = line[1:].partition("  ")
                current = {}
                devices[int(did, 16)] = (name.strip(), current)
        self._devices[vendor] = devices
        return devices

    def vendor(self, vendor: int) -> str | None:
        span = self._span(vendor)
        if span is None:
            return None
        end = self._data.find(b"\n", span[0], span[1])
        return self._data[span[0] + 6 : end if end >= 0 else span[1]].decode("utf-8", "replace").strip()

    def device(self, vendor: int, device: int) -> str | None:
        block = self._vendor_block(vendor)
        entry = block.get(device) if block else None
        return entry[0] if entry else None

    def subsystem(self, vendor: int, device: int, subvendor: int, subdevice: int) -> str | None:
        block = self._vendor_block(vendor)
        entry = block.get(device) if block else None
        return entry[1].get((subvendor, subdevice)) if entry else None

    def _class_table(self) -> dict[int, tuple[str, dict[int, tuple[str, dict[int, str]]]]]:
        if self._classes is None:
            self._classes = {}
            if self._class_at >= 0:
                sub: dict[int, tuple[str, dict[int, str]]] | None = None
                progs: dict[int, str] | None = None
                for line in self._data[self._class_at :].decode("utf-8", "replace").splitlines():
                    if not line or line.startswith("#"):
                        continue
                    if line.startswith("C "):
                        cid, _, name = line[2:].partition("  ")
                        sub = {}
                        self._classes[int(cid, 16)] = (name.strip(), sub)
                    elif line.startswith("\t\t") and progs is not None:
                        pid, _, name = line[2:].partition("  ")
                        progs[int(pid, 16)] = name.strip()
                    elif line.startswith("\t") and sub is not None:
                        sid, _, name = line[1:].partition("  ")
                        progs = {}
                        sub[int(sid, 16)] = (name.strip(), progs)
                    else:
                        break  # past the class section
        return self._classes

    def pci_class(self, code: int) -> tuple[str | None, str | None, str | None]:
        """(class, subclass, prog-if) names of a 24-bit class code."""
        base, subc, prog = code >> 16, (code >> 8) & 0xFF, code & 0xFF
        entry = self._class_table().get(base)
        if entry is None:
            return None, None, None
        sub = entry[1].get(subc)
        if sub is None:
            return entry[0], None, None
        return entry[0], sub[0], sub[1].get(prog)

    def class_name(self, code: int) -> str | None:
        """The most specific name: the subclass's (e.g. "Non-Volatile memory controller"), else the class's."""
        base, sub, _ = self.pci_class(code)
        return sub or base


@lru_cache(maxsize=4)
def load(path: str | None = None) -> PciIds:
    """The database at `path` (default: the system's), read once per process."""
    return PciIds(path)
