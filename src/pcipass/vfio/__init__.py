"""A userspace driver library over the kernel's VFIO (container/group and cdev+iommufd).

    from pcipass.vfio import open_device
    with open_device("0000:00:0a.0") as dev:
        bar0 = dev.region(0)
        print(hex(bar0.read(0, 4)))

`open_device` picks the backend (IOMMUFD where /dev/iommu and the device's
cdev exist, else the Type1 container; PCIPASS_VFIO_IOMMU=container or iommufd
forces one), says which on the `pcipass.vfio` logger, and shares one container
between the devices it opens, so several groups can DMA into the same address space.
"""

from __future__ import annotations

import logging
import os
import uuid

from pcipass.errors import UsageError
from pcipass.sysfs import parse_bdf
from pcipass.vfio import sysfs
from pcipass.vfio.container import Container, parse_vf_token
from pcipass.vfio.device import VfioDevice, VfioDeviceInfo, VfioIrqInfo
from pcipass.vfio.dma import DmaMapping
from pcipass.vfio.region import VfioRegion, VfioRegionInfo
from pcipass.vfio.syscalls import KERNEL, Kernel

__all__ = [
    "Container",
    "VfioDevice",
    "VfioDeviceInfo",
    "DmaMapping",
    "VfioIrqInfo",
    "Kernel",
    "VfioRegion",
    "VfioRegionInfo",
    "choose_backend",
    "open_device",
]

# The container devices share when the caller gives none, one per backend kind.
_shared: dict[str, Container] = {}
# Forces open_device's choice of backend where the caller leaves it to auto.
BACKEND_ENV = "PCIPASS_VFIO_IOMMU"
BACKENDS = ("container", "iommufd")
log = logging.getLogger("pcipass.vfio")


def backend_reason(bdf: str, kernel: Kernel = KERNEL) -> tuple[str, str]:
    """The backend open_device's auto takes for `bdf`, and why."""
    group = sysfs.iommu_group(kernel.sysfs, bdf)
    if sysfs.noiommu_group(kernel.sysfs, group):  # opened only this way, whatever is forced
        return "noiommu", f"IOMMU group {group} is a no-IOMMU group (/dev/vfio/noiommu-{group})"
    forced = os.environ.get(BACKEND_ENV, "auto")
    if forced in BACKENDS:
        return forced, f"{BACKEND_ENV}={forced}"
    if forced != "auto":
        raise UsageError(f"{BACKEND_ENV}={forced} is no VFIO backend",
                         hint=f"set it to one of {', '.join(BACKENDS)} or auto, or unset it",
                         code="vfio-backend")
    if not kernel.exists(os.path.join(kernel.dev, "iommu")):
        return "container", "the kernel has no /dev/iommu (no CONFIG_IOMMUFD)"
    cdev = sysfs.vfio_cdev(kernel.sysfs, bdf)
    if not cdev:
        return "container", f"{bdf} has no VFIO cdev (no CONFIG_VFIO_DEVICE_CDEV)"
    return "iommufd", f"/dev/iommu and {bdf}'s cdev /dev/vfio/devices/{cdev} exist"


def choose_backend(bdf: str, kernel: Kernel = KERNEL) -> str:
    """'iommufd' where /dev/iommu and the device's cdev exist, else 'container'
    (PCIPASS_VFIO_IOMMU forces either)."""
    return backend_reason(bdf, kernel)[0]


def open_device(bdf: str, *, container: Container | None = None, iommu: str = "auto",
                kernel: Kernel = KERNEL, use_mmap: bool = True,
                vf_token: uuid.UUID | str | None = None) -> VfioDevice:
    """Open a PCI device bound to vfio-pci.

    `container`: an address space to join (default: one shared per process,
    closed when its last device closes). `iommu`: auto (see choose_backend),
    container or iommufd; the choice is logged and is `device.container.kind`.
    `use_mmap=False` does every BAR access through the device fd.
    `vf_token`: the SR-IOV VF token (a UUID) to open a VF whose PF is on vfio-pci (and such
    a PF while its VFs are open) with: the one the PF's user set (VfioDevice.set_vf_token).
    It goes with the group's VFIO_GROUP_GET_DEVICE_FD, so `auto` picks the container then.
    """
    bdf = str(parse_bdf(bdf))
    sysfs.iommu_group(kernel.sysfs, bdf)  # no such device, or no IOMMU: say so before opening anything
    token = None if vf_token is None else str(parse_vf_token(vf_token))
    owns = container is None
    if container is None:
        kind, why = backend_reason(bdf, kernel) if iommu == "auto" else (iommu, "asked for")
        if token is not None and iommu == "auto" and kind == "iommufd":
            kind, why = "container", "a VF token goes with the group's VFIO_GROUP_GET_DEVICE_FD"
        log.info("%s: VFIO backend %s (%s)", bdf, kind, why)
        container = _shared.get(kind)
        if container is None or container.kernel is not kernel or container.backend.fd < 0:
            container = _shared[kind] = Container(kind, kernel=kernel)
    try:
        fd, held = container.open_fd(bdf, token)
        try:
            return VfioDevice(bdf, fd, container, held, use_mmap=use_mmap, owns_container=owns)
        except BaseException:
            container.devices = {d for d in container.devices if d.fd != fd}
            container.close_fd(fd, held)
            raise
    except BaseException:
        if owns and not container.devices:
            container.close()
        raise
