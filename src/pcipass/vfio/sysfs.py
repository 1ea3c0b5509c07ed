"""The little sysfs the library needs: a device's IOMMU group, its members and drivers, its cdev.

Note: the host part (`pcipass.host`) owns the full inventory and verdict;
this reads only what opening a device needs, so the library works on a host
where nothing else of pcipass is used.
"""

from __future__ import annotations

import os
import re

from pcipass.errors import PcipassError, UsageError
from pcipass.sysfs import is_bridge_class, may_share_group

_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")


def normalize_bdf(bdf: str) -> str:
    m = _BDF.match(bdf.strip())
    if m is None:
        raise UsageError(f"{bdf!r} is not a PCI address",
                         hint="write it as [DOMAIN:]BUS:DEVICE.FUNCTION in hex, e.g. 0000:00:0a.0",
                         code="bad-bdf")
    return f"{(m[1] or '0000').lower()}:{m[2].lower()}:{m[3].lower()}.{m[4]}"


def device_path(sysfs: str, bdf: str) -> str:
    return os.path.join(sysfs, "bus", "pci", "devices", bdf)


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def driver(sysfs: str, bdf: str) -> str | None:
    return _link_name(os.path.join(device_path(sysfs, bdf), "driver"))


def iommu_group(sysfs: str, bdf: str) -> int:
    path = device_path(sysfs, bdf)
    if not os.path.isdir(path):
        raise PcipassError(f"no PCI device {bdf}", hint="`pcipass list` shows every device and its address",
                           code="unknown-bdf")
    name = _link_name(os.path.join(path, "iommu_group"))
    if name is None:
        raise PcipassError(f"{bdf} is in no IOMMU group: the IOMMU is off",
                           hint="turn the IOMMU on (intel_iommu=on for VT-d; AMD-Vi is on unless "
                           f"amd_iommu=off) and check `pcipass check {bdf}`",
                           code="no-iommu-group")
    return int(name)


def group_members(sysfs: str, group: int) -> list[tuple[str, str | None]]:
    """(bdf, driver) of every device in the group."""
    path = os.path.join(sysfs, "kernel", "iommu_groups", str(group), "devices")
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    return [(n, driver(sysfs, n)) for n in names]


def blockers(sysfs: str, group: int) -> list[tuple[str, str]]:
    """Members whose driver keeps the group from being viable."""
    return [(bdf, drv) for bdf, drv in group_members(sysfs, group)
            if not may_share_group(drv, is_bridge_class(_class(sysfs, bdf)))]


def _class(sysfs: str, bdf: str) -> int | None:
    try:
        with open(os.path.join(device_path(sysfs, bdf), "class")) as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return None


def vfio_cdev(sysfs: str, bdf: str) -> str | None:
    """The device's VFIO cdev name (vfioX) when the kernel offers one."""
    try:
        names = [n for n in os.listdir(os.path.join(device_path(sysfs, bdf), "vfio-dev")) if n.startswith("vfio")]
    except OSError:
        return None
    return names[0] if names else None
