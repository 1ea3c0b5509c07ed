"""pcipass.vfio on the real kernel (the lab, as root): vfio-pci, the emulated VT-d, the edu device.

Every test runs once per VFIO backend the kernel has (the `iommu_mode` fixture, see
guest_pci.IOMMU_MODES): the container on Debian's kernel; the container and cdev + IOMMUFD
on the lab kernel `iommufd`.

`vfio_bound` binds a device (and the rest of its group) to vfio-pci with
driver_override + drivers_probe and restores every driver afterwards; the
edu lab tests (test_edu_lab.py) use it too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_pci import PCI, driver, find, group_members, iommu_mode_fixture

from pcipass.device import IrqKind
from pcipass.errors import PcipassError
from pcipass.lab.topology import EDU
from pcipass.vfio import open_device, uapi

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("iommu_mode")]
iommu_mode = iommu_mode_fixture()
# The ioctl that maps DMA, by backend.
MAP_CALL = {"container": "VFIO_IOMMU_MAP_DMA", "iommufd": "IOMMU_IOAS_MAP"}

def _write(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(text)


def bind(bdf: str, drv: str | None) -> None:
    """Bind `bdf` to `drv` (None: leave it unbound) through driver_override."""
    if driver(bdf) == drv:
        return
    if driver(bdf):
        _write(PCI / bdf / "driver" / "unbind", bdf)
    _write(PCI / bdf / "driver_override", drv or "\n")
    if drv:
        _write(Path("/sys/bus/pci/drivers_probe"), bdf)


@contextlib.contextmanager
def vfio_bound(bdf: str, also: dict[str, str] | None = None) -> Iterator[str]:
    """Give `bdf`'s whole group to vfio-pci (bridges stay as they are), restore afterwards.

    `also`: other members to bind to another driver instead (to make a group non-viable).
    """
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    members = [b for b in group_members(bdf) if not (PCI / b / "secondary_bus_number").exists()]
    saved = {b: driver(b) for b in members}
    try:
        for b in members:
            bind(b, (also or {}).get(b, "vfio-pci"))
        assert driver(bdf) == "vfio-pci", f"{bdf} did not bind to vfio-pci"
        yield bdf
    finally:
        for b in members:
            _write(PCI / b / "driver_override", "\n")
            if driver(b) != saved[b]:
                if driver(b):
                    _write(PCI / b / "driver" / "unbind", b)
                if saved[b]:
                    _write(Path("/sys/bus/pci/drivers_probe"), b)


@pytest.fixture(scope="module")
def edu_bdf() -> Iterator[str]:
    alone = find(EDU, alone=True)
    if not alone:
        pytest.skip("no standalone edu in this topology")
    with vfio_bound(alone[0]) as bdf:
        yield bdf


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int(minor)


def reserved_regions(bdf: str) -> list[tuple[int, int, str]]:
    """The IOMMU's reserved regions of `bdf`'s group (start, last, type), from sysfs."""
    text = (PCI / bdf / "iommu_group" / "reserved_regions").read_text()
    return [(int(a, 16), int(b, 16), kind) for a, b, kind in (line.split() for line in text.splitlines())]


def vfio_maps() -> list[str]:
    """Lines of /proc/self/maps that point at a VFIO device or a DMA memfd."""
    with open("/proc/self/maps") as f:
        return [line for line in f if "vfio" in line or "pcipass-dma" in line]


# ---------------------------------------------------------------- the tests
def test_open_device_reports_info_regions_and_irqs(edu_bdf, iommu_mode):
    with open_device(edu_bdf) as dev:
        assert dev.container.kind == iommu_mode
        assert dev.info.flags & uapi.VFIO_DEVICE_FLAGS_PCI
        assert dev.info.num_regions >= uapi.VFIO_PCI_NUM_REGIONS
        bar0 = dev.region_info(0)
        assert bar0.size == 1 << 20 and bar0.mappable and bar0.readable and bar0.writable
        assert dev.region_info(uapi.VFIO_PCI_CONFIG_REGION_INDEX).size >= 256
        assert dev.irq_count(IrqKind.MSI) == 1
        assert dev.irq_count(IrqKind.INTX) == 1
        assert dev.irq_info(IrqKind.INTX).maskable


def test_config_space_exact_widths_and_capabilities(edu_bdf):
    with open_device(edu_bdf) as dev:
        assert dev.config_read(0, 2) == 0x1234
        assert dev.config_read(2, 2) == 0x11E8
        assert dev.config_read(0, 4) == 0x11E81234
        assert dev.config_read(0, 1) == 0x34
        names = [c.name for c in dev.capabilities()]
        assert "msi" in names


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "fd"])
def test_bar_access_is_exact_width(edu_bdf, use_mmap):
    """A narrow read of an edu register below 0x80 is one narrow access, never a slice of a wide one.

    edu.c answers all ones to it; QEMU 7.2's memory core (valid.min_access_size = 4)
    rejects it before edu.c sees it and reads 0. Either way, not the bytes of the
    4-byte register that a widened or byte-wise copy would return.
    """
    with open_device(edu_bdf, use_mmap=use_mmap) as dev:
        bar = dev.region(0)
        ident = bar.read(0x00, 4)
        assert ident & 0xFF == 0xED
        for offset, width in ((0, 1), (0, 2), (2, 2), (3, 1)):  # ident bytes ed 00 00 01
            value = bar.read(offset, width)
            ones = (1 << (8 * width)) - 1
            assert value in (0, ones), (offset, width, hex(value))
            assert value != (ident >> (8 * offset)) & ones
        bar.write(0x04, 4, 0x0F0F0000)
        assert bar.read(0x04, 4) == 0xF0F0FFFF
        bar.write(0x04, 2, 0x1234)  # ignored by the device: not 4 bytes wide
        assert bar.read(0x04, 4) == 0xF0F0FFFF
        bar.write(0x80, 8, 0x0123456789ABC000)  # the DMA registers take 64-bit accesses
        if use_mmap or kernel_version() >= (6, 12):
            # the mmap's load is one 8-byte access; so is the fd's on the lab kernel's 6.12.118
            assert bar.read(0x80, 8) == 0x0123456789ABC000
        else:
            # vfio-pci on 6.1 splits an 8-byte fd access into two 4-byte ones: edu keeps
            # the low half at 0x80 and ignores 0x84 (reads all ones there).
            assert bar.read(0x80, 4) == 0x89ABC000
            assert bar.read(0x80, 8) == 0xFFFFFFFF_89ABC000


def test_dma_buffers_respect_mask_ranges_and_nothing_leaks(edu_bdf, iommu_mode):
    fds, maps = open_fds(), vfio_maps()
    with open_device(edu_bdf) as dev:
        assert dev.container.kind == iommu_mode
        space = dev.container.dma
        ranges = dev.container.iova_ranges()
        assert ranges and all(a <= b for a, b in ranges)
        # The kernel leaves the IOMMU's reserved regions (VT-d's MSI window at 0xfee00000) out
        # of the ranges, as sysfs lists them; a relaxable direct mapping may be given up.
        reserved = [r for r in reserved_regions(edu_bdf) if r[2] != "direct-relaxable"]
        assert any(kind == "msi" for _, _, kind in reserved), reserved
        for start, last, kind in reserved:
            assert not any(a <= last and start <= b for a, b in ranges), (kind, hex(start), ranges)
        bufs = [dev.dma_alloc(4096, dma_mask_bits=28) for _ in range(8)]
        assert len({b.iova for b in bufs}) == 8
        for b in bufs:
            assert 0 < b.iova and b.iova + b.size <= 1 << 28
            assert any(a <= b.iova and b.iova + b.size - 1 <= e for a, e in ranges)
        if iommu_mode == "container":  # Type1's DMA_AVAIL budget; IOMMUFD has none
            assert space.backend.dma_avail is not None and space.backend.dma_avail > 8
        else:
            assert space.backend.dma_avail is None
        dev.dma_free(bufs.pop())
        assert len(space.mappings) == 7
        # a vfio-user style mapping of someone else's memfd at a chosen IOVA
        memfd = os.memfd_create("client")
        os.ftruncate(memfd, 8192)
        dev.map_dma(memfd, 0, 8192, 0x0800_0000)
        with pytest.raises(PcipassError):
            dev.map_dma(memfd, 0, 4096, 0x0800_1000)  # overlaps: refused before the kernel sees it
        os.close(memfd)
        assert len(space.mappings) == 8
    assert not space.mappings
    assert open_fds() == fds
    assert vfio_maps() == maps


def test_kernel_refuses_overlapping_map_with_clear_error(edu_bdf, iommu_mode):
    with open_device(edu_bdf) as dev:
        buf = dev.dma_alloc(4096)
        backend = dev.container.dma.backend
        with pytest.raises(PcipassError) as exc:
            backend.map(uapi.address_of(buf.memory.map), buf.iova, 4096)
        assert MAP_CALL[iommu_mode] in str(exc.value) and "EEXIST" in str(exc.value)
        assert exc.value.hint


def test_irqs_route_to_eventfds(edu_bdf):
    with open_device(edu_bdf) as dev:
        bar = dev.region(0)
        cmd = dev.config_read(4, 2)
        dev.config_write(4, 2, cmd | 0x6)
        for kind in (IrqKind.MSI, IrqKind.INTX):
            (efd,) = dev.irq_enable(kind)
            bar.write(0x60, 4, 0x8000)  # edu: raise an interrupt with this status
            assert efd.wait(5.0) >= 1, f"no {kind.name} interrupt"
            assert bar.read(0x24, 4) & 0x8000
            bar.write(0x64, 4, 0x8000)
            if kind == IrqKind.INTX:
                dev.irq_unmask(IrqKind.INTX)
            dev.irq_disable(kind)
        # the ERR and REQ notifications can be routed too
        for kind in (IrqKind.ERR, IrqKind.REQ):
            if dev.irq_count(kind):
                (efd,) = dev.irq_enable(kind)
                assert efd.wait(0) == 0
                dev.irq_disable(kind)


def test_msi_wakes_an_asyncio_waiter(edu_bdf):
    import asyncio

    with open_device(edu_bdf) as dev:
        dev.bus_master(True)  # an MSI is a memory write by the device
        bar = dev.region(0)
        (efd,) = dev.irq_enable(IrqKind.MSI)

        async def main() -> int:
            waiter = asyncio.ensure_future(efd.wait_async())
            await asyncio.sleep(0.05)
            assert not waiter.done()
            bar.write(0x60, 4, 0x4000)
            return await asyncio.wait_for(waiter, 10)

        assert asyncio.run(main()) >= 1
        bar.write(0x64, 4, 0x4000)


def test_reset_and_hot_reset_info(edu_bdf):
    with open_device(edu_bdf) as dev:
        deps = dev.hot_reset_info()
        assert all(d.bdf for d in deps)
        if dev.info.can_reset:
            dev.region(0).write(0x04, 4, 0)
            dev.reset()
            assert dev.region(0).read(0x00, 4) & 0xFF == 0xED
        else:
            with pytest.raises(PcipassError, match="no reset"):
                dev.reset()


def test_hot_reset_info_names_the_bridged_pair_by_group_or_devid(iommu_mode):
    """A bus reset behind the PCIe-to-PCI bridge resets both edu functions. The kernel names them
    by IOMMU group to a device opened through its group, by IOMMUFD device id to one opened
    through its cdev (the other function, not opened, is VFIO_PCI_DEVID_OWNED: its group is ours)."""
    behind = find(EDU, alone=False)
    if len(behind) < 2:
        pytest.skip("no edu pair behind a bridge in this topology")
    group = int(os.path.basename(os.readlink(PCI / behind[0] / "iommu_group")))
    with vfio_bound(behind[0]), open_device(behind[0]) as dev:
        deps = {d.bdf: d for d in dev.hot_reset_info()}
        assert set(behind[:2]) <= set(deps), deps
        if iommu_mode == "container":
            assert all(d.group_id == group and d.devid is None for d in deps.values()), deps
        else:
            assert deps[behind[0]].group_id is None and deps[behind[0]].devid > 0, deps
            assert deps[behind[1]].devid == uapi.VFIO_PCI_DEVID_OWNED, deps


def test_bus_master_on_off(edu_bdf):
    with open_device(edu_bdf) as dev:
        dev.bus_master(True)
        assert dev.config_read(4, 2) & 0x4
        dev.bus_master(False)
        assert not dev.config_read(4, 2) & 0x4


def test_second_open_shares_container_and_group_busy_is_explained(edu_bdf):
    with open_device(edu_bdf) as dev:
        # Another process cannot have the group while we hold it: EBUSY, explained.
        code = ("from pcipass.vfio import open_device\n"
                "from pcipass.errors import PcipassError\n"
                f"try:\n open_device({edu_bdf!r})\nexcept PcipassError as e:\n print(e.code, e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
        assert "vfio-ebusy" in out and "hint" in out, out
        assert dev.region(0).read(0, 4) & 0xFF == 0xED


def test_non_viable_group_names_the_blocking_member():
    behind = find(EDU, alone=False)
    if len(behind) < 2:
        pytest.skip("no edu pair behind a bridge in this topology")
    if subprocess.run(["modprobe", "uio_pci_generic"]).returncode:
        pytest.skip("uio_pci_generic is not available to occupy a group member")
    with vfio_bound(behind[0], also={behind[1]: "uio_pci_generic"}):
        if driver(behind[1]) != "uio_pci_generic":
            pytest.skip(f"uio_pci_generic did not take {behind[1]}")
        with pytest.raises(PcipassError) as exc:
            open_device(behind[0])
        assert exc.value.code == "vfio-group-not-viable"
        assert behind[1] in str(exc.value) and "uio_pci_generic" in str(exc.value)


def test_group_of_three_opens_both_functions_in_one_container():
    behind = find(EDU, alone=False)
    if len(behind) < 2:
        pytest.skip("no edu pair behind a bridge in this topology")
    with vfio_bound(behind[0]):
        with open_device(behind[0]) as a, open_device(behind[1]) as b:
            # the group path takes the group once; IOMMUFD binds each cdev and takes no group
            groups = 1 if a.container.kind == "container" else 0
            assert a.container is b.container and len(a.container.groups) == groups
            assert a.region(0).read(0, 4) & 0xFF == 0xED and b.region(0).read(0, 4) & 0xFF == 0xED


def test_not_bound_is_a_clear_error():
    if not find(EDU, alone=False):
        pytest.skip("no bridged edu")
    bdf = find(EDU, alone=False)[0]
    if driver(bdf) == "vfio-pci":
        pytest.skip("already bound")
    with pytest.raises(PcipassError) as exc:
        open_device(bdf)
    assert exc.value.hint




def test_req_notifies_a_driver_that_its_device_is_being_removed():
    """Unbinding an open device from vfio-pci signals REQ; the unbind finishes once we close."""
    import threading

    behind = find(EDU, alone=False)
    if not behind:
        pytest.skip("no bridged edu")
    with vfio_bound(behind[0]):
        dev = open_device(behind[0])
        (req,) = dev.irq_enable(IrqKind.REQ)
        unbind = threading.Thread(target=_write, args=(PCI / behind[0] / "driver" / "unbind", behind[0]))
        unbind.start()
        try:
            assert req.wait(30.0) >= 1, "no REQ notification"
            assert unbind.is_alive()  # the kernel waits for us to let go
        finally:
            dev.close()
        unbind.join(30)
        assert not unbind.is_alive() and driver(behind[0]) is None


def test_two_groups_share_one_container():
    alone, behind = find(EDU, alone=True), find(EDU, alone=False)
    if not alone or not behind:
        pytest.skip("needs the standalone edu and the bridged pair")
    with vfio_bound(alone[0]), vfio_bound(behind[0]):
        with open_device(alone[0]) as a, open_device(behind[0]) as b:
            groups = 2 if a.container.kind == "container" else 0
            assert a.container is b.container and len(a.container.groups) == groups
            buf = a.dma_alloc(4096, dma_mask_bits=28)  # one address space for both groups
            assert b.container.dma.mappings[buf.iova]


_MEMLOCK_CHILD = """
import os, sys
from pcipass.errors import PcipassError
from pcipass.vfio import BACKEND_ENV, Container, open_device
bdf, mode = sys.argv[1], sys.argv[2]
# mode 'ours': our check before the ioctl; 'kernel': skip it, so the kernel's accounting answers
container = Container(os.environ[BACKEND_ENV], memlock=(lambda: None)) if mode == "kernel" else None
dev = open_device(bdf, container=container)
dev.dma_alloc(4096)
try:
    dev.dma_alloc(1 << 20)
except PcipassError as e:
    print(e.code, e)
"""


@pytest.mark.parametrize("mode", ["ours", "kernel"])
def test_memlock_limit_is_named_with_the_fix(edu_bdf, iommu_mode, mode):
    """Without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK, a 1 MiB DMA buffer is refused, explained."""
    import shutil

    if not shutil.which("setpriv") or not shutil.which("prlimit"):
        pytest.skip("needs setpriv and prlimit (util-linux) to drop CAP_IPC_LOCK")
    cmd = ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "prlimit", "--memlock=65536",
           sys.executable, "-c", _MEMLOCK_CHILD, edu_bdf, mode]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "RLIMIT_MEMLOCK" in out.stdout or "ulimit -l" in out.stdout, (out.stdout, out.stderr)
    if mode == "kernel":
        assert MAP_CALL[iommu_mode] in out.stdout and "ENOMEM" in out.stdout, out.stdout
