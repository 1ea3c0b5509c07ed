"""pcipass.vfio over a fake kernel that answers as linux/vfio.h and linux/iommufd.h say.

Every test body runs in both IOMMU modes (the Type1 container and IOMMUFD),
as the kernel's VFIO selftests do. The IOMMUFD path is proven only here:
Debian's kernels do not enable IOMMUFD (docs/vfio.md).
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest
from fakekernel import BAR0_OFFSET, FakeKernel

from pcipass.device import Device as DeviceProtocol
from pcipass.device import IrqKind
from pcipass.errors import PcipassError
from pcipass.vfio import Container, choose_backend, open_device, uapi


@pytest.fixture(params=["container", "iommufd"])
def fake(request, tmp_path):
    return FakeKernel(str(tmp_path), cdev=request.param == "iommufd")


def open_fake(fake, **kw):
    return open_device(fake.bdf, kernel=fake.kernel, **kw)


def test_open_picks_the_backend_and_follows_the_uapi_order(fake):
    with open_fake(fake) as dev:
        assert isinstance(dev, DeviceProtocol)
        assert dev.container.kind == ("iommufd" if fake.cdev else "container")
        assert choose_backend(fake.bdf, fake.kernel) == dev.container.kind
    calls = [c for c in fake.calls() if c not in ("VFIO_DEVICE_GET_REGION_INFO",)]
    if fake.cdev:
        assert calls[:6] == ["open", "IOMMU_IOAS_ALLOC", "open", "VFIO_DEVICE_BIND_IOMMUFD",
                             "VFIO_DEVICE_ATTACH_IOMMUFD_PT", "IOMMU_IOAS_IOVA_RANGES"]
        assert calls[-3:] == ["close", "IOMMU_DESTROY", "close"]
    else:
        assert calls[:8] == ["open", "VFIO_GET_API_VERSION", "open", "VFIO_GROUP_GET_STATUS",
                             "VFIO_GROUP_SET_CONTAINER", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU",
                             "VFIO_IOMMU_GET_INFO"]
        set_iommu = next(x for x in fake.log if x.call == "VFIO_SET_IOMMU")
        assert set_iommu.fields == {"type": uapi.VFIO_TYPE1v2_IOMMU}
        assert calls[-4:] == ["close", "VFIO_GROUP_UNSET_CONTAINER", "close", "close"]
    assert not fake.fds  # every fd closed


def test_config_space_and_capabilities(fake):
    with open_fake(fake) as dev:
        assert dev.config_read(0, 4) == 0x11E81234
        assert dev.config_read(2, 2) == 0x11E8
        dev.config_write(4, 2, 0x6)
        assert dev.config_read(4, 2) == 0x6
        assert [c.name for c in dev.capabilities()] == ["msi"]
        dev.bus_master(False)
        assert dev.config_read(4, 2) == 0x2
        with pytest.raises(ValueError):
            dev.config_read(3, 2)  # unaligned


@pytest.mark.parametrize("use_mmap", [True, False])
def test_bar_access_through_mmap_or_fd(fake, use_mmap):
    with open_fake(fake, use_mmap=use_mmap) as dev:
        bar = dev.region(0)
        assert bar.info.offset == BAR0_OFFSET and bar.info.mappable
        assert bar.read(0, 4) == 0x010000ED
        bar.write(8, 8, 0x1122334455667788)
        assert bar.read(8, 8) == 0x1122334455667788 and bar.read(12, 4) == 0x11223344
        with pytest.raises(PcipassError):
            dev.region(3)  # unimplemented BAR


def test_sparse_areas_are_honoured(tmp_path):
    fake = FakeKernel(str(tmp_path), sparse=[(0, 0x1000), (0x3000, 0x1000)])
    with open_fake(fake) as dev:
        info = dev.region_info(0)
        assert info.sparse == ((0, 0x1000), (0x3000, 0x1000))
        bar = dev.region(0)
        assert bar.read(0, 4) == 0x010000ED  # mmapped area
        bar.write(0x2000, 4, 0xCAFE)  # between areas: through the fd
        assert os.pread(dev.fd, 4, BAR0_OFFSET + 0x2000) == (0xCAFE).to_bytes(4, "little")
        bar.write(0x3004, 4, 0xBEEF)  # second area: mmapped
        assert bar.read(0x3004, 4) == 0xBEEF
        m = dev.mmap_region(0, 0x3000, 0x1000)
        assert int.from_bytes(m[4:8], "little") == 0xBEEF
        m.close()
        with pytest.raises(PcipassError):
            dev.mmap_region(0, 0x1000, 0x1000)
    # the region info was asked twice: once to learn the size of the capability chain
    sizes = [x.fields["argsz"] for x in fake.log if x.call == "VFIO_DEVICE_GET_REGION_INFO" and x.fields["index"] == 0]
    assert sizes[0] == 32 and sizes[1] > 32


def test_dma_alloc_maps_below_the_mask_and_close_unmaps_everything(fake):
    with open_fake(fake) as dev:
        bufs = [dev.dma_alloc(4096, dma_mask_bits=28) for _ in range(3)] + [dev.dma_alloc(10000)]
        assert len(fake.mappings) == 4 and bufs[3].size == 12288
        for b in bufs:
            assert b.iova + b.size <= 1 << 28 and b.iova >= 4096
            vaddr, size, _ = fake.mappings[b.iova]
            assert size == b.size and vaddr == uapi.address_of(b.memory.map)
        b = bufs[0]
        b.window.write(0, 4, 0xA5A5A5A5)
        with mmap.mmap(b.fd, b.size) as other:  # the memfd: another process would see the same pages
            assert other[:4] == b"\xa5" * 4
        dev.dma_free(bufs.pop())
        assert len(fake.mappings) == 3
    assert fake.mappings == {}
    assert not fake.fds


def test_map_dma_of_a_client_memfd_at_its_iova(fake):
    with open_fake(fake) as dev:
        memfd = os.memfd_create("client")
        os.ftruncate(memfd, 3 * 4096)
        m = dev.map_dma(memfd, 4096, 8192, 0x100000, readable=True, writable=False)
        os.close(memfd)
        _, size, flags = fake.mappings[0x100000]
        assert size == 8192
        read_flag = uapi.IOMMU_IOAS_MAP_READABLE if fake.cdev else uapi.VFIO_DMA_MAP_FLAG_READ
        write_flag = uapi.IOMMU_IOAS_MAP_WRITEABLE if fake.cdev else uapi.VFIO_DMA_MAP_FLAG_WRITE
        assert flags & read_flag and not flags & write_flag
        if fake.cdev:
            assert flags & uapi.IOMMU_IOAS_MAP_FIXED_IOVA
        other = os.memfd_create("x")
        with pytest.raises(PcipassError) as exc:
            dev.map_dma(other, 0, 4096, 0x101000)
        assert exc.value.code == "vfio-dma-fd"  # too short
        os.ftruncate(other, 4096)
        with pytest.raises(PcipassError) as exc:
            dev.map_dma(other, 0, 4096, 0x101000)
        assert exc.value.code == "vfio-iova-overlap"
        os.close(other)
        with pytest.raises(PcipassError):
            dev.unmap_dma(0x100000, 4096)  # not what was mapped
        dev.unmap_dma(m.iova, m.size)
        assert fake.mappings == {}


def test_dma_avail_budget_is_checked_before_the_kernel(tmp_path):
    fake = FakeKernel(str(tmp_path), dma_avail=2)
    with open_fake(fake) as dev:
        dev.dma_alloc(4096)
        dev.dma_alloc(4096)
        with pytest.raises(PcipassError) as exc:
            dev.dma_alloc(4096)
        assert exc.value.code == "vfio-enospc" and "dma_entry_limit" in exc.value.hint
        assert len(fake.mappings) == 2


def test_memlock_limit_is_named_with_the_fix(fake):
    container = Container("iommufd" if fake.cdev else "container", kernel=fake.kernel, memlock=lambda: 8192)
    with open_device(fake.bdf, kernel=fake.kernel, container=container) as dev:
        dev.dma_alloc(8192)
        with pytest.raises(PcipassError) as exc:
            dev.dma_alloc(4096)
        assert "RLIMIT_MEMLOCK" in str(exc.value) and "ulimit -l" in exc.value.hint
    container.close()
    assert not fake.fds


@pytest.mark.parametrize("code, words", [(errno.ENOMEM, "RLIMIT_MEMLOCK"), (errno.ENOSPC, "dma_entry_limit"),
                                         (errno.EPERM, "root"), (errno.EBUSY, "else holds")])
def test_failing_map_names_call_device_and_fix(fake, code, words):
    fake.fail["IOMMU_IOAS_MAP" if fake.cdev else "VFIO_IOMMU_MAP_DMA"] = code
    with open_fake(fake) as dev:
        with pytest.raises(PcipassError) as exc:
            dev.dma_alloc(4096)
        assert ("IOMMU_IOAS_MAP" if fake.cdev else "VFIO_IOMMU_MAP_DMA") in exc.value.message
        assert errno.errorcode[code] in exc.value.message and words in exc.value.hint
        assert not dev.container.dma.mappings and dev.container.dma.locked == 0  # nothing half-done
    assert not fake.fds


def test_irqs_route_to_eventfds_and_close_turns_them_off(fake):
    with open_fake(fake) as dev:
        assert dev.irq_count(IrqKind.MSI) == 1 and dev.irq_count(IrqKind.MSIX) == 0
        assert dev.irq_count(IrqKind.ERR) == 0  # EINVAL from vfio-pci: not PCIe
        assert dev.irq_info(IrqKind.INTX).maskable
        (efd,) = dev.irq_enable(IrqKind.MSI)
        assert fake.irqs[IrqKind.MSI] == [efd.fileno()]
        efd.signal()
        assert efd.wait(0) == 1
        dev.irq_unmask(IrqKind.INTX)
        unmask = [x for x in fake.log if x.call == "VFIO_DEVICE_SET_IRQS"][-1].fields
        assert unmask["flags"] == uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK
        dev.set_irqs(IrqKind.REQ, 0, [efd.fileno()])
        with pytest.raises(PcipassError):
            dev.irq_enable(IrqKind.MSI, 2)
    assert IrqKind.MSI not in fake.irqs  # disabled at close
    assert efd.fd == -1


def test_reset_and_hot_reset_info(fake):
    with open_fake(fake) as dev:
        dev.reset()
        deps = dev.hot_reset_info()
        if fake.cdev:  # by IOMMUFD device id, as linux/vfio.h says for a cdev-opened device
            assert [(d.group_id, d.devid, d.bdf) for d in deps] == [
                (None, 3, "0000:00:0a.0"), (None, uapi.VFIO_PCI_DEVID_NOT_OWNED, "0000:00:0a.1")]
        else:
            (dep,) = deps
            assert dep.group_id == fake.group and dep.devid is None and dep.bdf == "0000:00:0a.0"
        assert "VFIO_DEVICE_RESET" in fake.calls()


def test_non_viable_group_names_blocking_members(tmp_path):
    fake = FakeKernel(str(tmp_path), viable=False)
    other = "0000:00:0a.1"
    sys = fake.kernel.sysfs
    os.makedirs(f"{sys}/bus/pci/devices/{other}")
    os.makedirs(f"{sys}/bus/pci/drivers/e1000e")
    os.symlink(f"{sys}/bus/pci/drivers/e1000e", f"{sys}/bus/pci/devices/{other}/driver")
    os.symlink(f"{sys}/bus/pci/devices/{other}", f"{sys}/kernel/iommu_groups/{fake.group}/devices/{other}")
    with pytest.raises(PcipassError) as exc:
        open_fake(fake)
    assert exc.value.code == "vfio-group-not-viable"
    assert other in exc.value.message and "e1000e" in exc.value.message and "pcipass claim" in exc.value.hint
    assert not fake.fds


def test_group_busy_and_missing_nodes_are_explained(fake):
    fake.fail["open:group"] = errno.EBUSY
    fake.fail["open:device"] = errno.EBUSY
    with pytest.raises(PcipassError) as exc:
        open_fake(fake)
    assert exc.value.code == "vfio-ebusy" and exc.value.hint
    assert not fake.fds


def test_unknown_device_and_bad_bdf(fake):
    with pytest.raises(PcipassError) as exc:
        open_device("0000:00:1f.7", kernel=fake.kernel)
    assert exc.value.code == "unknown-bdf"
    with pytest.raises(PcipassError):
        open_device("not-a-bdf", kernel=fake.kernel)
    assert not fake.fds


def test_devices_share_the_default_container(fake):
    a = open_fake(fake)
    b = open_fake(fake)
    assert a.container is b.container
    if not fake.cdev:
        assert fake.calls().count("VFIO_GROUP_SET_CONTAINER") == 1  # the group is shared
    a.close()
    assert fake.fds  # b still holds its fds
    b.close()
    assert not fake.fds


def test_dma_free_refuses_a_buffer_it_did_not_allocate(fake):
    from pcipass.device import SharedDmaBuffer, SharedMemory

    with open_fake(fake) as dev:
        ours = dev.dma_alloc(4096)
        other = SharedMemory(4096)
        stranger = SharedDmaBuffer(ours.iova, ours.size, other.window, other)  # same IOVA, other memory
        with pytest.raises(PcipassError) as exc:
            dev.dma_free(stranger)
        assert exc.value.code == "vfio-dma-unknown" and ours.iova in fake.mappings
        other.close()
        dev.dma_free(ours)
        assert not fake.mappings


def test_dma_avail_read_after_mappings_counts_them_as_used():
    # The kernel's DMA_AVAIL is what is left when it is asked: when a second group joins a
    # container that already has mappings, the budget is those mappings plus what is left.
    from pcipass.vfio.dma import DmaSpace

    class Type1:
        what, page_size, limit = "container", 4096, 3

        def __init__(self):
            self.mapped = {}

        @property
        def dma_avail(self):
            return self.limit - len(self.mapped)

        def iova_ranges(self):
            return [(0, 2**39 - 1)]

        def map(self, vaddr, iova, size, readable, writable):
            assert len(self.mapped) < self.limit, "the kernel would say ENOSPC"
            self.mapped[iova] = size

        def unmap(self, iova, size):
            del self.mapped[iova]

    backend = Type1()
    space = DmaSpace(backend, memlock=lambda: None)
    space.map_vaddr(0x10000, None, 4096)
    space.refresh()  # as when another group joins
    space.map_vaddr(0x20000, None, 4096)
    space.map_vaddr(0x30000, None, 4096)
    with pytest.raises(PcipassError) as exc:
        space.map_vaddr(0x40000, None, 4096)
    assert exc.value.code == "vfio-enospc" and len(backend.mapped) == 3
    space.unmap(next(iter(space.mappings)))
    space.map_vaddr(0x40000, None, 4096)  # an entry given back can be used again


def _block_group(fake, other="0000:00:0a.1", drv="uio_pci_generic"):
    sys = fake.kernel.sysfs
    os.makedirs(f"{sys}/bus/pci/devices/{other}")
    os.makedirs(f"{sys}/bus/pci/drivers/{drv}")
    os.symlink(f"{sys}/bus/pci/drivers/{drv}", f"{sys}/bus/pci/devices/{other}/driver")
    os.symlink(f"{sys}/bus/pci/devices/{other}", f"{sys}/kernel/iommu_groups/{fake.group}/devices/{other}")


def test_cdev_bind_busy_on_a_non_viable_group_names_the_blocking_member(tmp_path):
    """The cdev path has no GET_STATUS: the kernel's DMA-ownership EBUSY at BIND is named as the
    group path names a non-viable group."""
    fake = FakeKernel(str(tmp_path), cdev=True)
    _block_group(fake)
    for code in (errno.EPERM, errno.EBUSY):
        fake.fail["VFIO_DEVICE_BIND_IOMMUFD"] = code
        with pytest.raises(PcipassError) as exc:
            open_fake(fake)
        assert exc.value.code == "vfio-group-not-viable"
        assert "0000:00:0a.1 (driver uio_pci_generic)" in exc.value.message
        assert not fake.fds


def test_cdev_bound_elsewhere_is_busy_with_a_hint(tmp_path):
    fake = FakeKernel(str(tmp_path), cdev=True)
    fake.fail["VFIO_DEVICE_BIND_IOMMUFD"] = errno.EINVAL  # what 6.12 answers a second opener
    with pytest.raises(PcipassError) as exc:
        open_fake(fake)
    assert exc.value.code == "vfio-ebusy" and "already open" in exc.value.message and exc.value.hint
    assert not fake.fds


def test_backend_env_forces_either_and_says_why(tmp_path, monkeypatch, caplog):
    import logging

    from pcipass.vfio import BACKEND_ENV, backend_reason

    fake = FakeKernel(str(tmp_path), cdev=True)
    assert backend_reason(fake.bdf, fake.kernel)[0] == "iommufd"
    monkeypatch.setenv(BACKEND_ENV, "container")
    assert backend_reason(fake.bdf, fake.kernel) == ("container", f"{BACKEND_ENV}=container")
    with caplog.at_level(logging.INFO, logger="pcipass.vfio"), open_fake(fake) as dev:
        assert dev.container.kind == "container"
    assert f"{fake.bdf}: VFIO backend container ({BACKEND_ENV}=container)" in caplog.text
    monkeypatch.setenv(BACKEND_ENV, "nope")
    with pytest.raises(PcipassError) as exc:
        open_fake(fake)
    assert exc.value.code == "vfio-backend"


def test_a_no_iommu_group_is_opened_through_its_own_node(tmp_path):
    from pcipass.vfio import backend_reason

    fake = FakeKernel(str(tmp_path), cdev=True)
    with open(f"{fake.kernel.sysfs}/kernel/iommu_groups/{fake.group}/name", "w") as f:
        f.write("vfio-noiommu\n")
    kind, why = backend_reason(fake.bdf, fake.kernel)
    assert kind == "noiommu" and f"/dev/vfio/noiommu-{fake.group}" in why
    with pytest.raises(PcipassError) as exc:
        open_fake(fake, container=Container("container", kernel=fake.kernel))
    assert exc.value.code == "vfio-backend-mismatch"


def test_a_no_iommu_device_runs_and_its_dma_is_refused_by_name(tmp_path):
    """As on the lab kernel in no-IOMMU mode: the device opens through /dev/vfio/noiommu-N
    with VFIO_NOIOMMU_IOMMU, and a DMA buffer is refused as no-IOMMU DMA (it read as an
    exhausted IOVA space: there are no IOVA ranges to allocate from)."""
    fake = FakeKernel(str(tmp_path))
    with open(f"{fake.kernel.sysfs}/kernel/iommu_groups/{fake.group}/name", "w") as f:
        f.write("vfio-noiommu\n")
    with open_fake(fake) as dev:
        assert dev.container.kind == "noiommu" and dev.container.iova_ranges() == []
        assert dev.config_read(0, 2) == 0x1234
        memfd = os.memfd_create("client")
        os.ftruncate(memfd, 4096)
        for attempt in (lambda: dev.dma_alloc(4096), lambda: dev.map_dma(memfd, 0, 4096, 0x10000)):
            with pytest.raises(PcipassError) as exc:
                attempt()
            assert exc.value.code == "vfio-noiommu-dma" and "intel_iommu=on" in exc.value.hint
        os.close(memfd)
        assert not dev.container.dma.mappings
    assert [x.fields for x in fake.log if x.call == "VFIO_SET_IOMMU"] == [{"type": uapi.VFIO_NOIOMMU_IOMMU}]


def test_a_refused_set_irqs_leaves_no_eventfd_open(fake):
    with open_fake(fake) as dev:
        fake.fail["VFIO_DEVICE_SET_IRQS"] = errno.EINVAL
        before = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(PcipassError):
            dev.irq_enable(IrqKind.MSI)
        assert sorted(os.listdir("/proc/self/fd")) == before
        del fake.fail["VFIO_DEVICE_SET_IRQS"]
        assert len(dev.irq_enable(IrqKind.MSI)) == 1
