"""Tiny initramfs images for guests the lab boots directly (no virtme-ng): busybox and an /init.

The kernel unpacks a newc cpio archive (Documentation/driver-api/early-userspace);
writing it here takes a few lines and no cpio binary.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: no libraries needed in the guest

DIR = stat.S_IFDIR | 0o755
FILE = stat.S_IFREG | 0o644
EXECUTABLE = stat.S_IFREG | 0o755

# (name, mode, data, rdev) with rdev = major << 8 | minor.
Entry = tuple[str, int, bytes, int]


def cpio(entries: list[Entry]) -> bytes:
    """A newc cpio archive of `entries`, in order, with its trailer."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def busybox_image(init: str, extra: Sequence[Entry] = ()) -> bytes:
    """An archive with busybox, a console device, the usual mount points and `init` as /init."""
    return cpio([
        ("bin", DIR, b"", 0), ("dev", DIR, b"", 0), ("proc", DIR, b"", 0), ("sys", DIR, b"", 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", 5 << 8 | 1),
        ("bin/busybox", EXECUTABLE, BUSYBOX.read_bytes(), 0),
        *extra,
        ("init", EXECUTABLE, init.encode(), 0),
    ])
