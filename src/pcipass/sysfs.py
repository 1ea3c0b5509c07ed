"""The PCI sysfs basics said once for the host model (pcipass.host.model.sysfs) and the vfio
library (pcipass.vfio.sysfs), which each read sysfs in their own way: a PCI address (Bdf,
parse_bdf), an attribute's text, a link's name, and which drivers may share a VFIO group.

Standard library, pcipass.pci and pcipass.errors only: the vfio library works where nothing
else of pcipass is used, and `pcipass list` pays for every module it imports.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from pcipass import pci
from pcipass.errors import UsageError

_BDF = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)


class Bdf(NamedTuple):
    """A PCI address; `str()` is the kernel's form, 0000:02:0d.0."""

    domain: int
    bus: int
    device: int
    function: int

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"

    @property
    def slot(self) -> str:
        """The device's slot, without the function: 0000:02:0d."""
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}"


def parse_bdf(text: str | Bdf) -> Bdf:
    """Parse `02:0d.0` or `0000:02:0d.0` (the domain defaults to 0000)."""
    if isinstance(text, Bdf):
        return text
    m = _BDF.match(text.strip()) if isinstance(text, str) else None
    if m is None or int(m["dev"], 16) > 0x1F:
        raise UsageError(
            f"{text!r} is not a PCI address",
            hint="write it as [DOMAIN:]BUS:DEVICE.FUNCTION in hex, e.g. 0000:02:0d.0 or 02:0d.0 "
            "(see `pcipass list`)",
            code="bad-bdf",
        )
    return Bdf(int(m["domain"] or "0", 16), int(m["bus"], 16), int(m["dev"], 16), int(m["fn"]))


def is_bdf(name: str) -> bool:
    """True for a directory name that is a full PCI address (as in sysfs)."""
    return len(name) == 12 and _BDF.match(name) is not None


def read_attr(path: str) -> str | None:
    """A sysfs (or proc) attribute's text, stripped; None where it cannot be read."""
    # os.open/os.read: sysfs attributes are one small read, and a listing reads thousands.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_int(text: str | None, base: int = 16) -> int | None:
    """An attribute's number (hex unless told); None for no text or not a number."""
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def link_name(path: str) -> str | None:
    """The name a symlink points at (a device's driver, its iommu_group); None without one."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


# The drivers that hold a device for pass-through. They take a device only when told to
# (driver_override, or a bind by name), never by its IDs. xen-pciback is the module, whose
# driver sysfs names pciback; both names count.
VFIO_DRIVERS = frozenset({"vfio-pci"})
STUB_DRIVERS = frozenset({"pci-stub", "pciback", "xen-pciback"})
PASS_THROUGH_DRIVERS = VFIO_DRIVERS | STUB_DRIVERS
# A port's own drivers: the kernel lets bridges stay on them in a group used through VFIO.
BRIDGE_DRIVERS = frozenset({"pcieport", "shpchp"})
# Class codes (class >> 8) of bridges whose devices behind them are in their group.
BRIDGE_CLASSES = (pci.PCI_CLASS_BRIDGE_PCI, pci.PCI_CLASS_BRIDGE_PCI_SEMI, pci.PCI_CLASS_BRIDGE_CARDBUS)


def is_bridge_class(pci_class: int | None) -> bool:
    """A PCI-to-PCI or CardBus bridge by its 24-bit class code."""
    return pci_class is not None and pci_class >> 8 in BRIDGE_CLASSES


def may_share_group(driver: str | None, is_bridge: bool) -> bool:
    """The VFIO viability rule for one member of a group: it lets the group be used through
    VFIO when it has no driver, a pass-through driver, or is a bridge (or on a port driver).

    The host's verdict and the vfio library's naming of a group's blockers both ask this."""
    return driver is None or driver in PASS_THROUGH_DRIVERS or driver in BRIDGE_DRIVERS or is_bridge
