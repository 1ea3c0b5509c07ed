"""Tiny initramfs images for guests the lab boots directly (no virtme-ng): busybox and an /init.

The kernel unpacks a newc cpio archive (Documentation/driver-api/early-userspace);
writing it here takes a few lines and no cpio binary.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Sequence
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: no libraries needed in the guest

DIR = stat.S_IFDIR | 0o755
FILE = stat.S_IFREG | 0o644
EXECUTABLE = stat.S_IFREG | 0o755

# The start of a busybox guest's /init: the applets, /proc, /sys and /dev, and `say NAME
# VALUE`, which prints the `RESULT name value` lines the lab reads from the console.
INIT_START = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
say() { echo "RESULT $1 $2"; }
"""

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


def _module_name(name: str) -> str:
    return name.removesuffix(".ko").replace("-", "_")  # the kernel treats - and _ alike


def _module_files(modules: Path) -> dict[str, Path]:
    """Module name -> file, from modules.order (every module's path, one a line, shipped with
    the kernel) when there is one: walking the tree's 4000 files costs minutes over 9p in the
    lab's Xen dom0 under TCG."""
    order = modules / "modules.order"
    if order.is_file():
        paths = [modules / line.strip() for line in order.read_text().splitlines() if line.strip()]
    else:
        paths = list(modules.rglob("*.ko"))
    return {_module_name(p.name): p for p in paths}


def kernel_modules(modules: Path, names: Sequence[str]) -> list[Entry]:
    """The kernel modules `names` and all they depend on, as files at the image's root, in an
    order `insmod` can load them (each after its dependencies). Dependencies come from each
    module's own `.modinfo` record (`depends=a,b`), so no modules.dep is needed."""
    files = _module_files(modules)
    ordered: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name not in files:
            raise FileNotFoundError(f"kernel module {name} ({' <- '.join(chain) or 'asked for'}) "
                                    f"is not under {modules}")
        found = re.search(rb"\0depends=([^\0]*)\0", files[name].read_bytes())
        for dep in filter(None, (found.group(1).decode() if found else "").split(",")):
            visit(_module_name(dep), (name, *chain))
        ordered.append(name)

    for name in names:
        visit(_module_name(name), ())
    return [(files[n].name, FILE, files[n].read_bytes(), 0) for n in ordered]
