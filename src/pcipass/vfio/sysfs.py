"""The little sysfs the library needs: a device's IOMMU group, its members and drivers, its cdev.

Note: the host part (`pcipass.host`) owns the full inventory and verdict;
this reads only what opening a device needs, so the library works on a host
where nothing else of pcipass is used.
"""

from __future__ import annotations

import os

from pcipass.errors import PcipassError
from pcipass.sysfs import is_bridge_class, link_name, may_share_group, parse_int, read_attr


def device_path(sysfs: str, bdf: str) -> str:
    return os.path.join(sysfs, "bus", "pci", "devices", bdf)


def driver(sysfs: str, bdf: str) -> str | None:
    return link_name(os.path.join(device_path(sysfs, bdf), "driver"))


def physfn(sysfs: str, bdf: str) -> str | None:
    """The SR-IOV physical function of a virtual function; None for any other device."""
    return link_name(os.path.join(device_path(sysfs, bdf), "physfn"))


def iommu_group(sysfs: str, bdf: str) -> int:
    path = device_path(sysfs, bdf)
    if not os.path.isdir(path):
        raise PcipassError(f"no PCI device {bdf}", hint="`pcipass list` shows every device and its address",
                           code="unknown-bdf")
    name = link_name(os.path.join(path, "iommu_group"))
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
            if not may_share_group(drv, is_bridge_class(parse_int(read_attr(os.path.join(device_path(sysfs, bdf), "class")))))]



def vfio_cdev(sysfs: str, bdf: str) -> str | None:
    """The device's VFIO cdev name (vfioX) when the kernel offers one."""
    try:
        names = [n for n in os.listdir(os.path.join(device_path(sysfs, bdf), "vfio-dev")) if n.startswith("vfio")]
    except OSError:
        return None
    return names[0] if names else None


# The name vfio gives the IOMMU groups it makes in no-IOMMU mode (/dev/vfio/noiommu-N).
NOIOMMU_GROUP_NAME = "vfio-noiommu"


def noiommu_group(sysfs: str, group: int) -> bool:
    """Whether the group is one of vfio's no-IOMMU groups (enable_unsafe_noiommu_mode)."""
    try:
        with open(os.path.join(sysfs, "kernel", "iommu_groups", str(group), "name")) as f:
            return f.read().strip() == NOIOMMU_GROUP_NAME
    except OSError:
        return False
