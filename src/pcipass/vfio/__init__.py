"""A userspace driver library over the kernel's VFIO (container/group and cdev+iommufd).

    from pcipass.vfio import open_device
    with open_device("0000:00:0a.0") as dev:
        bar0 = dev.region(0)
        print(hex(bar0.read(0, 4)))

`open_device` picks the backend (IOMMUFD where /dev/iommu and the device's
cdev exist, else the Type1 container) and shares one container between the
devices it opens, so several groups can DMA into the same address space.
"""

from __future__ import annotations

from pcipass.sysfs import parse_bdf
from pcipass.vfio import sysfs
from pcipass.vfio.container import Container
from pcipass.vfio.device import Device, DeviceInfo, IrqInfo
from pcipass.vfio.dma import DmaBuffer, DmaMapping
from pcipass.vfio.region import VfioRegion, VfioRegionInfo
from pcipass.vfio.syscalls import KERNEL, Kernel

__all__ = [
    "Container",
    "Device",
    "DeviceInfo",
    "DmaBuffer",
    "DmaMapping",
    "IrqInfo",
    "Kernel",
    "VfioRegion",
    "VfioRegionInfo",
    "choose_backend",
    "open_device",
]

# The container devices share when the caller gives none, one per backend kind.
_shared: dict[str, Container] = {}


def choose_backend(bdf: str, kernel: Kernel = KERNEL) -> str:
    """'iommufd' where /dev/iommu and the device's cdev exist, else 'container'."""
    import os

    if kernel.exists(os.path.join(kernel.dev, "iommu")) and sysfs.vfio_cdev(kernel.sysfs, bdf):
        return "iommufd"
    return "container"


def open_device(bdf: str, *, container: Container | None = None, iommu: str = "auto",
                kernel: Kernel = KERNEL, use_mmap: bool = True) -> Device:
    """Open a PCI device bound to vfio-pci.

    `container`: an address space to join (default: one shared per process,
    closed when its last device closes). `iommu`: auto, container or iommufd.
    `use_mmap=False` does every BAR access through the device fd.
    """
    bdf = str(parse_bdf(bdf))
    sysfs.iommu_group(kernel.sysfs, bdf)  # no such device, or no IOMMU: say so before opening anything
    owns = container is None
    if container is None:
        kind = choose_backend(bdf, kernel) if iommu == "auto" else iommu
        container = _shared.get(kind)
        if container is None or container.kernel is not kernel or container.backend.fd < 0:
            container = _shared[kind] = Container(kind, kernel=kernel)
    try:
        fd, token = container.open_fd(bdf)
        try:
            return Device(bdf, fd, container, token, use_mmap=use_mmap, owns_container=owns)
        except BaseException:
            container.devices = {d for d in container.devices if d.fd != fd}
            container.close_fd(fd, token)
            raise
    except BaseException:
        if owns and not container.devices:
            container.close()
        raise
