"""An IO address space shared by open devices, and the VFIO groups in it.

`Container` wraps one backend (a Type1 container or an IOMMUFD IOAS) and its
`DmaSpace`. Devices of one group share the group; groups share one
container. `open()` hands out device fds, taking the group or binding the
cdev as the backend needs, and the last device to close closes the rest.
"""

from __future__ import annotations

import mmap
import os
import uuid
from typing import Any

from pcipass import device
from pcipass.device import SharedDmaBuffer
from pcipass.errors import PcipassError
from pcipass.vfio import sysfs, uapi
from pcipass.vfio.dma import DmaMapping, DmaSpace, memlock_limit
from pcipass.vfio.iommu import Iommufd, NoIommuContainer, Type1Container
from pcipass.vfio.syscalls import KERNEL, Kernel, call, open_node


def not_viable(kernel: Kernel, number: int) -> PcipassError:
    """The error for a group some member of which a host driver still has."""
    blocking = sysfs.blockers(kernel.sysfs, number)
    named = ", ".join(f"{bdf} (driver {drv})" for bdf, drv in blocking) or "a member the kernel still uses"
    first = blocking[0][0] if blocking else "the group"
    return PcipassError(
        f"IOMMU group {number} is not viable: {named} still bound to a host driver",
        hint=f"give the whole group to vfio-pci (`pcipass claim {first}`), or unbind those devices",
        code="vfio-group-not-viable")


def parse_vf_token(value: uuid.UUID | str) -> uuid.UUID:
    """A VF token, as the UUID it must be."""
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    except ValueError:
        raise PcipassError(f"bad VF token {value!r}: a VF token is a UUID",
                           hint="e.g. str(uuid.uuid4()), given to the PF's set_vf_token and to each VF's opener",
                           code="vfio-vf-token-bad") from None


def vf_token_error(exc: PcipassError, kernel: Kernel, bdf: str, vf_token: str | None) -> PcipassError:
    """What vfio-pci's refusals of a device name mean for SR-IOV (vfio_pci_validate_vf_token):
    EACCES, a token missing or not the PF's; EINVAL with a token, a PF not on vfio-pci."""
    pf = sysfs.physfn(kernel.sysfs, bdf)
    pf_driver = sysfs.driver(kernel.sysfs, pf) if pf else None
    if exc.code == "vfio-eacces" and vf_token is None:
        whose = f"its PF {pf} is on vfio-pci" if pf else "its VFs are open"
        return PcipassError(f"{bdf} needs a VF token: {whose}, and vfio-pci opens it only with the "
                            "token the PF's user set", code="vfio-vf-token-required",
                            hint="open it with the PF user's token: open_device(bdf, vf_token=UUID) (QEMU: "
                            "-device vfio-pci,host=BDF,vf-token=UUID); the PF's user sets it with "
                            "set_vf_token(UUID) on the PF")
    if exc.code == "vfio-eacces":
        return PcipassError(f"the VF token given for {bdf} is not the one its PF{' ' + pf if pf else ''} has",
                            code="vfio-vf-token-wrong",
                            hint="use the UUID the PF's user set (set_vf_token on the PF); the kernel never "
                            "tells it back")
    if exc.code == "vfio-einval" and vf_token is not None and pf_driver != "vfio-pci":
        where = f"its PF {pf} is on {pf_driver or 'no driver'}" if pf else "it is not a VF"
        return PcipassError(f"a VF token was given for {bdf}, but {where}: vfio-pci takes one only for a "
                            "VF whose PF is on vfio-pci", code="vfio-vf-token-unneeded",
                            hint="open it without vf_token")
    return exc


class Group:
    """/dev/vfio/N, set into a container."""

    def __init__(self, number: int, backend: Type1Container, kernel: Kernel) -> None:
        self.number = number
        self.kernel = kernel
        # vfio's no-IOMMU mode names its groups' nodes noiommu-N
        node = f"noiommu-{number}" if backend.kind == "noiommu" else str(number)
        self.path = os.path.join(kernel.dev, "vfio", node)
        self.what = f"IOMMU group {number} ({self.path})"
        self.users = 0
        self.backend = backend
        self.fd = open_node(kernel, self.path, f"IOMMU group {number}")
        try:
            status = uapi.vfio_group_status.new()
            call(kernel, self.fd, uapi.VFIO_GROUP_GET_STATUS, "VFIO_GROUP_GET_STATUS", self.what, status)
            if not status.flags & uapi.VFIO_GROUP_FLAGS_VIABLE:
                raise self._not_viable()
            backend.attach_group(self.fd, self.what)
        except BaseException:
            kernel.close(self.fd)
            raise

    def _not_viable(self) -> PcipassError:
        return not_viable(self.kernel, self.number)

    def device_fd(self, bdf: str, vf_token: str | None = None) -> int:
        """The device's fd. `vf_token` (a UUID) goes with the name, "BDF vf_token=UUID", as
        vfio-pci wants for a VF whose PF is on vfio-pci (and for such a PF while its VFs are open)."""
        name = bytearray((bdf if vf_token is None else f"{bdf} vf_token={vf_token}").encode() + b"\0")
        try:
            return call(self.kernel, self.fd, uapi.VFIO_GROUP_GET_DEVICE_FD, "VFIO_GROUP_GET_DEVICE_FD",
                        f"{bdf} in {self.what}", name)
        except PcipassError as exc:
            raise vf_token_error(exc, self.kernel, bdf, vf_token) from None

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.backend.detach_group(self.fd, self.what)
            finally:
                self.kernel.close(self.fd)
                self.fd = -1


class Container:
    """One IO address space: the groups or device cdevs in it, and their DMA mappings."""

    def __init__(self, iommu: str = "auto", *, kernel: Kernel = KERNEL, memlock: Any = memlock_limit) -> None:
        if iommu == "auto":
            iommu = "iommufd" if kernel.exists(os.path.join(kernel.dev, "iommu")) else "container"
        backends = {"container": Type1Container, "iommufd": Iommufd, "noiommu": NoIommuContainer}
        if iommu not in backends:
            raise PcipassError(f"unknown IOMMU backend {iommu!r}",
                               hint="use auto, container, iommufd or noiommu", code="vfio-backend")
        self.kernel = kernel
        self.backend: Any = backends[iommu](kernel)
        self.dma = DmaSpace(self.backend, memlock=memlock)
        self.groups: dict[int, Group] = {}
        self.devices: set[Any] = set()

    @property
    def kind(self) -> str:
        return str(self.backend.kind)

    # ---- device fds
    def open_fd(self, bdf: str, vf_token: str | None = None) -> tuple[int, Any]:
        """A device fd for `bdf`, and a token to give back to `close_fd`. `vf_token`: the
        SR-IOV VF token (a UUID) the device is opened with (the group path only)."""
        if self.kind == "iommufd" and vf_token is not None:
            raise PcipassError(f"{bdf}: a VF token goes with VFIO_GROUP_GET_DEVICE_FD, and this container "
                               "uses iommufd", code="vfio-vf-token-iommufd",
                               hint="open it with iommu='container' (PCIPASS_VFIO_IOMMU=container); "
                               "open_device(bdf, vf_token=...) picks it by itself")
        if self.kind == "iommufd":
            cdev = sysfs.vfio_cdev(self.kernel.sysfs, bdf)
            if cdev is None:
                raise PcipassError(f"{bdf} has no VFIO cdev (no vfio-dev/ in sysfs)",
                                   hint="bind it to vfio-pci (`pcipass claim`), or use the container backend",
                                   code="vfio-no-cdev")
            path = os.path.join(self.kernel.dev, "vfio", "devices", cdev)
            fd = open_node(self.kernel, path, bdf)
            try:
                self.backend.attach_device(fd, f"{bdf} ({path})")
            except PcipassError as exc:
                self.kernel.close(fd)
                raise self._bind_error(exc, bdf) from None
            except BaseException:
                self.kernel.close(fd)
                raise
            self.dma.refresh()
            return fd, None
        number = sysfs.iommu_group(self.kernel.sysfs, bdf)
        if sysfs.noiommu_group(self.kernel.sysfs, number) != (self.kind == "noiommu"):
            raise PcipassError(
                f"{bdf}'s IOMMU group {number} is {'' if self.kind != 'noiommu' else 'not '}a "
                f"no-IOMMU group, and this container is {self.kind}",
                hint="open it with open_device(bdf) alone, which picks the backend its group needs",
                code="vfio-backend-mismatch")
        group = self.groups.get(number)
        if group is None:
            group = self.groups[number] = Group(number, self.backend, self.kernel)
            try:
                self.dma.refresh()
            except BaseException:
                self._drop_group(number)
                raise
        try:
            fd = group.device_fd(bdf, vf_token)
        except BaseException:
            if not group.users:
                self._drop_group(number)
            raise
        group.users += 1
        return fd, number

    def _bind_error(self, exc: PcipassError, bdf: str) -> PcipassError:
        """What a failed VFIO_DEVICE_BIND_IOMMUFD means. The group path checks viability
        itself (VFIO_GROUP_GET_STATUS); binding a cdev meets the kernel's DMA ownership
        instead: EPERM (Linux 6.12) or EBUSY where a member of the group is on a host driver.
        A device already bound through another file gives EINVAL: a cdev is opened once."""
        number = sysfs.iommu_group(self.kernel.sysfs, bdf)
        if exc.code in ("vfio-eperm", "vfio-ebusy") and sysfs.blockers(self.kernel.sysfs, number):
            return not_viable(self.kernel, number)
        if exc.code == "vfio-einval" and "VFIO_DEVICE_BIND_IOMMUFD" in exc.message:
            return PcipassError(f"{bdf} is already open through VFIO elsewhere ({exc.message})",
                                hint="a device's VFIO cdev is bound by one file at a time: close the "
                                "other user (`pcipass status` names it), or share the open Device",
                                code="vfio-ebusy")
        return exc

    def close_fd(self, fd: int, token: Any) -> None:
        self.kernel.close(fd)
        if token is not None:
            group = self.groups[token]
            group.users -= 1
            if not group.users:
                self._drop_group(token)

    def _drop_group(self, number: int) -> None:
        self.groups.pop(number).close()

    # ---- DMA (the same operations whichever backend)
    def dma_alloc(self, size: int, *, dma_mask_bits: int = 64, owner: object = None) -> SharedDmaBuffer:
        return self.dma.alloc(size, dma_mask_bits=dma_mask_bits, owner=owner)

    def dma_free(self, buffer: device.DmaBuffer) -> None:
        self.dma.free(buffer)

    def map_dma(self, fd_or_mmap: int | mmap.mmap, offset: int, size: int, iova: int, readable: bool = True,
                writable: bool = True, *, owner: object = None) -> DmaMapping:
        """Map `size` bytes of a memfd (or an mmap) from `offset` at the caller's `iova`."""
        return self.dma.map_dma(fd_or_mmap, offset, size, iova, readable=readable, writable=writable, owner=owner)

    def unmap_dma(self, iova: int, size: int) -> None:
        self.dma.unmap(iova, size)

    def iova_ranges(self) -> list[tuple[int, int]]:
        return self.backend.iova_ranges()

    def close(self) -> None:
        """Unmap everything, leave every group, close the backend."""
        try:
            self.dma.close()
        finally:
            for number in list(self.groups):
                self._drop_group(number)
            self.backend.close()

