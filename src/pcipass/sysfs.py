"""What the kernel's PCI sysfs means, said once for the host model (pcipass.host.model.sysfs)
and the vfio library (pcipass.vfio.sysfs), which read it each in its own way.

Standard library and pcipass.pci only: the vfio library works where nothing else of
pcipass is used, and `pcipass list` pays for every module it imports.
"""

from __future__ import annotations

from pcipass import pci

# The drivers that hold a device for pass-through. They take a device only when told to
# (driver_override, or a bind by name), never by its IDs. xen-pciback's driver is named
# pciback in sysfs; the module's name is kept for the trees that spell it so.
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
