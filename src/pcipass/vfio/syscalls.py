"""The seam between the library and the kernel: ioctl, open, close, and error naming.

Everything that talks to /dev/vfio or /dev/iommu goes through a `Kernel`, so
tests can replay recorded ioctl exchanges (see tests/unit/vfio) without a
kernel that has VFIO or IOMMUFD.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pcipass.errors import PcipassError

# ioctl(fd, request, arg) -> int. `arg` is a writable buffer the kernel may fill
# in (a bytearray or a uapi structure), or an int. Raises OSError like fcntl.ioctl.
IoctlFn = Callable[[int, int, "bytearray | ctypes.Structure | int"], int]


@dataclass
class Kernel:
    """System calls the library uses; replace any of them in tests."""

    # fcntl.ioctl itself (its mutate_flag defaults to true: the kernel's replies land
    # in the buffer given), not a wrapper: DMA map/unmap pay for every Python frame.
    ioctl: IoctlFn = fcntl.ioctl  # type: ignore[assignment]  # its overloads, per argument type, are this
    open: Callable[[str, int], int] = field(default=os.open)
    close: Callable[[int], None] = field(default=os.close)
    exists: Callable[[str], bool] = field(default=os.path.exists)
    # A region's accesses through the device fd (where it is not mmapped).
    pread: Callable[[int, int, int], bytes] = field(default=os.pread)
    pwrite: Callable[[int, bytes, int], int] = field(default=os.pwrite)
    sysfs: str = "/sys"
    dev: str = "/dev"


KERNEL = Kernel()

# What to do when a call fails, by errno: data, not a chain of ifs.
_HINTS = {
    errno.EPERM: "run as root, or give your user the group's device node (chown/chmod /dev/vfio/N)",
    errno.EACCES: "run as root, or give your user the group's device node: `pcipass claim BDF --owner USER` "
    "(or chown/chmod /dev/vfio/N)",
    errno.EBUSY: "something else holds it (another process, or this one opened it twice): "
    "close the other user, or share the open Device",
    errno.ENOSPC: "the IOMMU's mapping limit (DMA entries) is used up: free DMA buffers, or raise "
    "vfio_iommu_type1 dma_entry_limit",
    errno.ENOMEM: "locked memory is exhausted: raise RLIMIT_MEMLOCK (ulimit -l, LimitMEMLOCK= in "
    "systemd, memlock in limits.conf) or run as root",
    errno.ENODEV: "the device is gone or not bound to vfio-pci: check `pcipass status`",
    errno.ENOTTY: "this kernel does not know the call: it may be too old, or lack the option",
    errno.EINVAL: "the kernel refused the arguments: this is likely a pcipass bug, please report it",
    errno.EFAULT: "the memory given was not mapped: this is likely a pcipass bug, please report it",
    errno.EEXIST: "that IOVA range is already mapped: unmap it first",
    errno.ENOENT: "no such mapping or object: it was already freed",
}


def ioctl_error(call: str, what: str, err: OSError) -> PcipassError:
    """A PcipassError naming the call, the device or object, and the fix."""
    code = err.errno or 0
    name = errno.errorcode.get(code, str(code))
    hint = _HINTS.get(code, "see the kernel log (dmesg) for the reason")
    return PcipassError(f"{call} on {what} failed: {name} ({os.strerror(code)})", hint=hint,
                        code=f"vfio-{name.lower()}")


def call(kernel: Kernel, fd: int, request: int, name: str, what: str,
         arg: ctypes.Structure | bytearray | int = 0) -> int:
    """ioctl with the structure filled in place; failures become PcipassError."""
    try:
        return kernel.ioctl(fd, request, arg)
    except OSError as err:
        raise ioctl_error(name, what, err) from None


def open_node(kernel: Kernel, path: str, what: str) -> int:
    try:
        return kernel.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        hint = _HINTS.get(err.errno or 0, "check that the path exists and is accessible")
        if err.errno == errno.ENOENT:
            hint = "load the module (modprobe vfio-pci) and bind the device to vfio-pci (pcipass claim BDF)"
        name = errno.errorcode.get(err.errno or 0, "eio").lower()
        raise PcipassError(f"cannot open {path} for {what}: {os.strerror(err.errno or 0)}", hint=hint,
                           code=f"vfio-{name}") from None
