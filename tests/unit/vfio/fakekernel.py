"""A fake kernel for pcipass.vfio: answers VFIO and IOMMUFD ioctls as linux/vfio.h and
linux/iommufd.h describe them, and records every exchange (call, fields sent, result).

Device fds are memfds: config space at offset 0 (region 7), BAR0 at BAR0_OFFSET,
so pread/pwrite and mmap work on them as on a vfio-pci device fd.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, field

from pcipass.vfio import uapi
from pcipass.vfio.syscalls import Kernel

NAMES = {v: k for k, v in vars(uapi).items() if k.startswith(("VFIO_", "IOMMU_")) and isinstance(v, int)
         and v > 0x3B00}
BAR0_OFFSET = 0x10000
BAR0_SIZE = 0x4000
CONFIG_SIZE = 256


@dataclass
class Exchange:
    call: str
    fields: dict
    result: int | str


@dataclass
class FakeKernel:
    root: str  # a directory for the fake sysfs
    group: int = 5
    bdf: str = "0000:00:0a.0"
    cdev: bool = False  # offer /dev/iommu and vfio-dev/vfio0
    viable: bool = True
    dma_avail: int = 65535
    iova_ranges: list = field(default_factory=lambda: [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)])
    fail: dict = field(default_factory=dict)  # call name -> errno to fail with
    log: list = field(default_factory=list)
    fds: dict = field(default_factory=dict)  # fd -> kind
    mappings: dict = field(default_factory=dict)  # iova -> (vaddr, size, flags)
    irqs: dict = field(default_factory=dict)  # index -> list of fds
    sparse: list | None = None  # sparse mmap areas for BAR0
    # SR-IOV: the device is a VF of a PF on vfio-pci whose VF token is this UUID (str); and the
    # token a VFIO_DEVICE_FEATURE(PCI_VF_TOKEN) set last on this device, as a PF.
    pf_token: str | None = None
    token_set: str | None = None

    def __post_init__(self) -> None:
        dev = os.path.join(self.root, "sys", "bus", "pci", "devices", self.bdf)
        os.makedirs(dev)
        grp = os.path.join(self.root, "sys", "kernel", "iommu_groups", str(self.group), "devices")
        os.makedirs(grp)
        os.symlink(dev, os.path.join(grp, self.bdf))
        os.symlink(os.path.dirname(grp), os.path.join(dev, "iommu_group"))
        drv = os.path.join(self.root, "sys", "bus", "pci", "drivers", "vfio-pci")
        os.makedirs(drv)
        os.symlink(drv, os.path.join(dev, "driver"))
        if self.cdev:
            os.makedirs(os.path.join(dev, "vfio-dev", "vfio0"))
        if self.pf_token is not None:  # the PF, on vfio-pci, beside its VF
            pf = os.path.join(self.root, "sys", "bus", "pci", "devices", "0000:00:09.0")
            os.makedirs(pf)
            os.symlink(drv, os.path.join(pf, "driver"))
            os.symlink(pf, os.path.join(dev, "physfn"))
        self.kernel = Kernel(ioctl=self.ioctl, open=self.open, close=self.close, exists=self.exists,
                             pread=self.pread, pwrite=self.pwrite,
                             sysfs=os.path.join(self.root, "sys"), dev=os.path.join(self.root, "dev"))

    # A device fd's region accesses: the memfd's bytes here, a model's registers in ModelKernel.
    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    # ---- the seam
    def exists(self, path: str) -> bool:
        return path == os.path.join(self.kernel.dev, "iommu") and self.cdev

    def open(self, path: str, flags: int) -> int:
        rel = os.path.relpath(path, self.kernel.dev)
        kinds = {"vfio/vfio": "container", f"vfio/{self.group}": "group", "iommu": "iommufd",
                 f"vfio/noiommu-{self.group}": "group",
                 "vfio/devices/vfio0": "device"}
        kind = kinds.get(rel)
        if kind is None or (kind in ("iommufd", "device") and not self.cdev):
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        if f"open:{kind}" in self.fail:
            raise OSError(self.fail[f"open:{kind}"], os.strerror(self.fail[f"open:{kind}"]))
        fd = self._device_fd() if kind == "device" else os.open(os.devnull, os.O_RDWR)
        self.fds[fd] = kind
        self.log.append(Exchange("open", {"path": rel}, fd))
        return fd

    def close(self, fd: int) -> None:
        kind = self.fds.pop(fd)
        self.log.append(Exchange("close", {"kind": kind}, 0))
        os.close(fd)

    def _device_fd(self) -> int:
        fd = os.memfd_create("fake-vfio-device")
        os.ftruncate(fd, BAR0_OFFSET + BAR0_SIZE)
        config = bytearray(CONFIG_SIZE)
        config[0:4] = (0x11E81234).to_bytes(4, "little")
        config[6:8] = (0x10).to_bytes(2, "little")  # status: capability list
        config[0x34] = 0x40
        config[0x40:0x42] = bytes([0x05, 0x00])  # MSI, end of list
        os.pwrite(fd, bytes(config), 0)
        os.pwrite(fd, (0x010000ED).to_bytes(4, "little"), BAR0_OFFSET)
        return fd

    def ioctl(self, fd: int, request: int, arg: bytearray | int) -> int:
        name = NAMES.get(request, hex(request))
        kind = self.fds.get(fd, "?")
        # VFIO_IOMMU_GET_INFO and the device's hot-reset info share a number: the fd decides.
        if kind == "device" and request == uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO:
            name = "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"
        if kind == "container" and request in (uapi.VFIO_IOMMU_GET_INFO, uapi.VFIO_IOMMU_MAP_DMA,
                                               uapi.VFIO_IOMMU_UNMAP_DMA):
            name = {uapi.VFIO_IOMMU_GET_INFO: "VFIO_IOMMU_GET_INFO", uapi.VFIO_IOMMU_MAP_DMA: "VFIO_IOMMU_MAP_DMA",
                    uapi.VFIO_IOMMU_UNMAP_DMA: "VFIO_IOMMU_UNMAP_DMA"}[request]
        if name in self.fail:
            code = self.fail[name]
            self.log.append(Exchange(name, {}, errno.errorcode[code]))
            raise OSError(code, os.strerror(code))
        handler = getattr(self, "do_" + name, None)
        if handler is None:
            raise OSError(errno.ENOTTY, f"fake kernel: {name} on {kind}")
        fields, result = handler(fd, arg)
        self.log.append(Exchange(name, fields, result))
        return result

    def calls(self) -> list[str]:
        return [x.call for x in self.log]

    # ---- container
    def do_VFIO_GET_API_VERSION(self, fd, arg):
        return {}, uapi.VFIO_API_VERSION

    def do_VFIO_CHECK_EXTENSION(self, fd, arg):
        return {"ext": arg}, int(arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU))

    def do_VFIO_SET_IOMMU(self, fd, arg):
        return {"type": arg}, 0

    def do_VFIO_IOMMU_GET_INFO(self, fd, buf):
        info = uapi.vfio_iommu_type1_info.from_buffer(buf)
        caps = bytearray()
        base = ctypes.sizeof(info)
        rng = uapi.vfio_iommu_type1_info_cap_iova_range(nr_iovas=len(self.iova_ranges))
        rng.header.id, rng.header.version = uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1
        body = bytes(rng) + b"".join(bytes(uapi.vfio_iova_range(start=a, end=b)) for a, b in self.iova_ranges)
        # The kernel's DMA_AVAIL: entries left under dma_entry_limit (self.dma_avail) now.
        avail = uapi.vfio_iommu_type1_info_dma_avail(avail=self.dma_avail - len(self.mappings))
        avail.header.id, avail.header.version = uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1
        rng.header.next = base + len(body)
        body = bytes(rng) + body[ctypes.sizeof(rng):]
        caps += body + bytes(avail)
        needed = base + len(caps)
        argsz = info.argsz
        info.flags = uapi.VFIO_IOMMU_INFO_PGSIZES | uapi.VFIO_IOMMU_INFO_CAPS
        info.iova_pgsizes = 0x40201000
        del info
        if argsz < needed:
            uapi.vfio_iommu_type1_info.from_buffer(buf).argsz = needed
            uapi.vfio_iommu_type1_info.from_buffer(buf).cap_offset = 0
        else:
            uapi.vfio_iommu_type1_info.from_buffer(buf).cap_offset = base
            buf[base:needed] = caps
        return {"argsz": argsz}, 0

    def _mapped_overlaps(self, iova, size):
        return any(i < iova + size and iova < i + s for i, (_, s, _) in self.mappings.items())

    def do_VFIO_IOMMU_MAP_DMA(self, fd, buf):
        m = uapi.vfio_iommu_type1_dma_map.from_buffer_copy(buf)
        if self._mapped_overlaps(m.iova, m.size):
            raise OSError(errno.EEXIST, "exists")
        if len(self.mappings) >= self.dma_avail:
            raise OSError(errno.ENOSPC, "no space")
        self.mappings[m.iova] = (m.vaddr, m.size, m.flags)
        return {"iova": m.iova, "size": m.size, "flags": m.flags}, 0

    def do_VFIO_IOMMU_UNMAP_DMA(self, fd, buf):
        m = uapi.vfio_iommu_type1_dma_unmap.from_buffer_copy(buf)
        if m.iova not in self.mappings or self.mappings[m.iova][1] != m.size:
            raise OSError(errno.EINVAL, "bad unmap")
        del self.mappings[m.iova]
        return {"iova": m.iova, "size": m.size}, 0

    # ---- group
    def do_VFIO_GROUP_GET_STATUS(self, fd, buf):
        st = uapi.vfio_group_status.from_buffer(buf)
        st.flags = uapi.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0
        return {}, 0

    def do_VFIO_GROUP_SET_CONTAINER(self, fd, buf):
        return {"container": uapi.decode_u32(buf)}, 0

    def do_VFIO_GROUP_UNSET_CONTAINER(self, fd, arg):
        return {}, 0

    def do_VFIO_GROUP_GET_DEVICE_FD(self, fd, buf):
        name, _, option = bytes(buf).rstrip(b"\0").decode().partition(" ")
        if name != self.bdf:
            raise OSError(errno.ENODEV, "no device")
        token = option.removeprefix("vf_token=") if option else None  # as vfio_pci_validate_vf_token
        if self.pf_token is None and token is not None:
            raise OSError(errno.EINVAL, "VF token incorrectly provided, PF not bound to vfio-pci")
        if self.pf_token is not None and token != self.pf_token:
            raise OSError(errno.EACCES, "VF token required" if token is None else "Incorrect VF token")
        dfd = self._device_fd()
        self.fds[dfd] = "device"
        return ({"name": name} if token is None else {"name": name, "vf_token": token}), dfd

    # ---- device
    def do_VFIO_DEVICE_GET_INFO(self, fd, buf):
        info = uapi.vfio_device_info.from_buffer(buf)
        info.flags = uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET
        info.num_regions, info.num_irqs = uapi.VFIO_PCI_NUM_REGIONS, uapi.VFIO_PCI_NUM_IRQS
        return {}, 0

    def do_VFIO_DEVICE_GET_REGION_INFO(self, fd, buf):
        info = uapi.vfio_region_info.from_buffer(buf)
        index, argsz = info.index, info.argsz
        rw = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            info.size, info.offset, info.flags = CONFIG_SIZE, 0, rw
        elif index == 0:
            info.size, info.offset, info.flags = BAR0_SIZE, BAR0_OFFSET, rw | uapi.VFIO_REGION_INFO_FLAG_MMAP
            if self.sparse is not None:
                info.flags |= uapi.VFIO_REGION_INFO_FLAG_CAPS
                cap = uapi.vfio_region_info_cap_sparse_mmap(nr_areas=len(self.sparse))
                cap.header.id, cap.header.version = uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1
                body = bytes(cap) + b"".join(bytes(uapi.vfio_region_sparse_mmap_area(offset=o, size=s))
                                            for o, s in self.sparse)
                base = ctypes.sizeof(info)
                if argsz < base + len(body):
                    info.argsz = base + len(body)
                else:
                    info.cap_offset = base
                    del info
                    buf[base:base + len(body)] = body
        else:
            info.size, info.offset, info.flags = 0, 0, 0
        return {"index": index, "argsz": argsz}, 0

    def do_VFIO_DEVICE_GET_IRQ_INFO(self, fd, buf):
        info = uapi.vfio_irq_info.from_buffer(buf)
        if info.index == uapi.VFIO_PCI_ERR_IRQ_INDEX:
            raise OSError(errno.EINVAL, "not PCIe")
        info.count = {0: 1, 1: 1, 2: 0, 4: 1}[info.index]
        info.flags = uapi.VFIO_IRQ_INFO_EVENTFD | (uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
                                                   if info.index == 0 else uapi.VFIO_IRQ_INFO_NORESIZE)
        return {"index": info.index}, 0

    @staticmethod
    def irq_set(buf) -> tuple[uapi.vfio_irq_set, list[int]]:
        """A VFIO_DEVICE_SET_IRQS argument: its head, and its eventfds when it carries them."""
        head = uapi.vfio_irq_set.from_buffer_copy(buf)
        if not head.flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            return head, []
        return head, list((ctypes.c_int32 * head.count).from_buffer_copy(buf, ctypes.sizeof(head)))

    def do_VFIO_DEVICE_SET_IRQS(self, fd, buf):
        head, fds = self.irq_set(buf)
        if head.flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            self.irqs[head.index] = fds
        elif head.flags & uapi.VFIO_IRQ_SET_ACTION_TRIGGER and head.count == 0:
            self.irqs.pop(head.index, None)
        return {"flags": head.flags, "index": head.index, "start": head.start, "count": head.count,
                "fds": fds}, 0

    def do_VFIO_DEVICE_FEATURE(self, fd, buf):
        head = uapi.vfio_device_feature.from_buffer(buf)
        if head.flags != uapi.VFIO_DEVICE_FEATURE_SET | uapi.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN or head.argsz != 24:
            raise OSError(errno.EINVAL, "fake kernel: only SET of PCI_VF_TOKEN")
        import uuid

        self.token_set = str(uuid.UUID(bytes=bytes(buf[8:24])))
        return {"flags": head.flags, "uuid": self.token_set}, 0

    def do_VFIO_DEVICE_RESET(self, fd, arg):
        return {}, 0

    def do_VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(self, fd, buf):
        info = uapi.vfio_pci_hot_reset_info.from_buffer(buf)
        if self.cdev:  # opened through the cdev: devids (3, as BIND gave), and -1 for one not ours
            info.flags = uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID
            deps = [uapi.vfio_pci_dependent_device(group_id=3, segment=0, bus=0, devfn=0x50),
                    uapi.vfio_pci_dependent_device(group_id=0xFFFFFFFF, segment=0, bus=0, devfn=0x51)]
        else:
            deps = [uapi.vfio_pci_dependent_device(group_id=self.group, segment=0, bus=0, devfn=0x50)]
        need = ctypes.sizeof(info) + len(deps) * ctypes.sizeof(uapi.vfio_pci_dependent_device)
        info.count = len(deps)
        if info.argsz < need:
            raise OSError(errno.ENOSPC, "too small")
        del info
        buf[12:need] = b"".join(bytes(d) for d in deps)
        return {}, 0

    def do_VFIO_DEVICE_BIND_IOMMUFD(self, fd, buf):
        b = uapi.vfio_device_bind_iommufd.from_buffer(buf)
        if self.fds.get(b.iommufd) != "iommufd":
            raise OSError(errno.EBADF, "not an iommufd")
        b.out_devid = 3
        return {"iommufd": "iommufd"}, 0

    def do_VFIO_DEVICE_ATTACH_IOMMUFD_PT(self, fd, buf):
        a = uapi.vfio_device_attach_iommufd_pt.from_buffer(buf)
        return {"pt_id": a.pt_id}, 0

    # ---- iommufd
    def do_IOMMU_IOAS_ALLOC(self, fd, buf):
        uapi.iommu_ioas_alloc.from_buffer(buf).out_ioas_id = 7
        return {}, 0

    def do_IOMMU_IOAS_IOVA_RANGES(self, fd, buf):
        r = uapi.iommu_ioas_iova_ranges.from_buffer(buf)
        asked = r.num_iovas
        r.num_iovas = len(self.iova_ranges)
        if asked < len(self.iova_ranges):
            raise OSError(errno.EMSGSIZE, "too small")
        out = (uapi.iommu_iova_range * asked).from_address(r.allowed_iovas)
        for i, (a, b) in enumerate(self.iova_ranges):
            out[i].start, out[i].last = a, b
        r.out_iova_alignment = 4096
        return {"ioas_id": r.ioas_id, "asked": asked}, 0

    def do_IOMMU_IOAS_MAP(self, fd, buf):
        m = uapi.iommu_ioas_map.from_buffer_copy(buf)
        if self._mapped_overlaps(m.iova, m.length):
            raise OSError(errno.EEXIST, "exists")
        self.mappings[m.iova] = (m.user_va, m.length, m.flags)
        return {"ioas_id": m.ioas_id, "iova": m.iova, "length": m.length, "flags": m.flags}, 0

    def do_IOMMU_IOAS_UNMAP(self, fd, buf):
        m = uapi.iommu_ioas_unmap.from_buffer_copy(buf)
        if m.iova not in self.mappings:
            raise OSError(errno.ENOENT, "no mapping")
        del self.mappings[m.iova]
        return {"ioas_id": m.ioas_id, "iova": m.iova, "length": m.length}, 0

    def do_IOMMU_DESTROY(self, fd, buf):
        return {"id": uapi.iommu_destroy.from_buffer_copy(buf).id}, 0


class ModelKernel(FakeKernel):
    """The fake kernel with a pcipass model as its device, served by the vfio-user server's own
    ModelBackend: region accesses through the device fd reach the model (VFIO_PCI_INDEX_TO_OFFSET:
    the region index in the offset's top bits), the model's DMA goes through the IOMMU mappings
    to this process's memory, its interrupts to the eventfds SET_IRQS gave. So a driver runs on
    pcipass.vfio over the same device model it meets over vfio-user.

    The model's timers run in a thread; every access to the model holds `lock`.
    """

    INDEX_SHIFT = 40

    def __init__(self, root: str, backend, **kw) -> None:  # type: ignore[no-untyped-def]
        import threading

        from pcipass.domain import protocol as p

        self.backend = backend
        self.lock = threading.RLock()
        super().__init__(root, **kw)
        backend.client_joined(p.Capabilities(), self)  # memory it reaches: remote_read/remote_write below
        self._wake = threading.Event()
        self._stopping = False
        self._timers = threading.Thread(target=self._run_timers, daemon=True)
        self._timers.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._timers.join(10)
        with self.lock:
            self.backend.close()

    def _run_timers(self) -> None:
        import time

        while not self._stopping:
            self._wake.clear()
            with self.lock:
                self.backend.run_due()
                deadline = self.backend.next_deadline()
            self._wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # ---- regions
    def _where(self, fd: int, offset: int) -> tuple[int, int]:
        assert self.fds.get(fd) == "device", "a region access on a fd that is no device"
        return offset >> self.INDEX_SHIFT, offset & ((1 << self.INDEX_SHIFT) - 1)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        index, at = self._where(fd, offset)
        with self.lock:
            if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
                value = self.backend.config_read(at, size)
            else:
                value = self.backend.region_read(index, at, size)
        return value.to_bytes(size, "little")

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        index, at = self._where(fd, offset)
        value = int.from_bytes(data, "little")
        with self.lock:
            if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
                self.backend.config_write(at, len(data), value)
            else:
                self.backend.region_write(index, at, len(data), value)
        self._wake.set()  # the write may have scheduled work
        return len(data)

    def do_VFIO_DEVICE_GET_INFO(self, fd, buf):
        info = uapi.vfio_device_info.from_buffer(buf)
        info.flags = self.backend.device_flags
        info.num_regions, info.num_irqs = self.backend.num_regions(), self.backend.num_irqs()
        return {}, 0

    def do_VFIO_DEVICE_GET_REGION_INFO(self, fd, buf):
        info = uapi.vfio_region_info.from_buffer(buf)
        desc = self.backend.regions().get(info.index)
        if desc is None:
            raise OSError(errno.EINVAL, "no such region")
        info.size, info.offset = desc.size, info.index << self.INDEX_SHIFT
        info.flags = desc.flags & ~uapi.VFIO_REGION_INFO_FLAG_MMAP  # the model's memory is not this fd's
        return {"index": info.index, "argsz": info.argsz}, 0

    def do_VFIO_DEVICE_GET_IRQ_INFO(self, fd, buf):
        info = uapi.vfio_irq_info.from_buffer(buf)
        with self.lock:
            info.flags, info.count = self.backend.irq_info(info.index)
        return {"index": info.index}, 0

    def do_VFIO_DEVICE_SET_IRQS(self, fd, buf):
        from pcipass.domain import protocol as p

        head, given = self.irq_set(buf)
        if -1 in given:
            raise OSError(errno.EINVAL, "ModelKernel: a vector left out (-1) is not modelled")
        fds = [os.dup(f) for f in given]  # the kernel takes its own reference to each eventfd
        data = bytes(buf[ctypes.sizeof(head):]) if head.flags & uapi.VFIO_IRQ_SET_DATA_BOOL else b""
        req = p.IrqSet(head.argsz, head.flags, head.index, head.start, head.count, data)
        with self.lock:
            try:
                self.backend.set_irqs(req, fds)
            except Exception as exc:
                for f in fds:
                    os.close(f)
                raise OSError(getattr(exc, "errno", errno.EINVAL), str(exc)) from None
        return {"flags": head.flags, "index": head.index, "start": head.start, "count": head.count}, 0

    def do_VFIO_DEVICE_RESET(self, fd, arg):
        with self.lock:
            self.backend.reset()
        return {}, 0

    # ---- DMA: the IOMMU's mappings are the model's client memory
    def _dma_map(self, iova: int, size: int, readable: bool, writable: bool) -> None:
        from pcipass.domain import protocol as p

        prot = (p.VFIO_DMA_MAP_FLAG_READ if readable else 0) | (p.VFIO_DMA_MAP_FLAG_WRITE if writable else 0)
        with self.lock:
            self.backend.dma.map(iova, size, prot, None, 0)

    def do_VFIO_IOMMU_MAP_DMA(self, fd, buf):
        fields, result = super().do_VFIO_IOMMU_MAP_DMA(fd, buf)
        m = uapi.vfio_iommu_type1_dma_map.from_buffer_copy(buf)
        self._dma_map(m.iova, m.size, bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_READ),
                      bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_WRITE))
        return fields, result

    def do_IOMMU_IOAS_MAP(self, fd, buf):
        fields, result = super().do_IOMMU_IOAS_MAP(fd, buf)
        m = uapi.iommu_ioas_map.from_buffer_copy(buf)
        self._dma_map(m.iova, m.length, bool(m.flags & uapi.IOMMU_IOAS_MAP_READABLE),
                      bool(m.flags & uapi.IOMMU_IOAS_MAP_WRITEABLE))
        return fields, result

    def do_VFIO_IOMMU_UNMAP_DMA(self, fd, buf):
        m = uapi.vfio_iommu_type1_dma_unmap.from_buffer_copy(buf)
        with self.lock:
            self.backend.dma.unmap(m.iova, m.size)
        return super().do_VFIO_IOMMU_UNMAP_DMA(fd, buf)

    def do_IOMMU_IOAS_UNMAP(self, fd, buf):
        m = uapi.iommu_ioas_unmap.from_buffer_copy(buf)
        with self.lock:
            self.backend.dma.unmap(m.iova, self.mappings[m.iova][1] if m.iova in self.mappings else m.length)
        return super().do_IOMMU_IOAS_UNMAP(fd, buf)

    def _process_address(self, iova: int, size: int) -> int:
        for base, (vaddr, length, _) in self.mappings.items():
            if base <= iova and iova + size <= base + length:
                return vaddr + iova - base
        raise PermissionError(f"IOMMU fault: {iova:#x}+{size} is not mapped")

    # RemoteMemory (domain.backend): what ClientMemory calls for memory it has no fd of
    def remote_read(self, address: int, size: int) -> bytes:
        return ctypes.string_at(self._process_address(address, size), size)

    def remote_write(self, address: int, data: bytes) -> None:
        ctypes.memmove(self._process_address(address, len(data)), data, len(data))
