"""Synthetic sysfs trees: the layouts the lab can't make, for tests and benchmarks.

`Tree(root)` writes files where the kernel would put them (devices under
sys/devices/pciDDDD:BB/..., with the bus, driver and iommu_group symlinks
relative, as sysfs makes them), so `Host(root)` and `lspci -A linux-sysfs`
both read it. `config_space()` builds config space with the capabilities asked
for. The ready-made layouts at the bottom are the ones the tests and the
benchmark use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pcipass import pci
from pcipass.host.sysfs import Bdf, parse_bdf


def config_space(
    vendor: int,
    device: int,
    pci_class: int,
    *,
    revision: int = 0,
    subsystem: tuple[int, int] = (0, 0),
    header_type: int | None = None,
    multifunction: bool = False,
    express: int | None = None,
    flr: bool = False,
    pm: bool = True,
    pm_no_soft_reset: bool = False,
    msi: bool = False,
    acs: tuple[int, int] | None = None,
    sriov: bool = False,
    secondary_bus: int = 0,
) -> bytes:
    """Config space with a PM/MSI/PCIe capability chain and ACS/SR-IOV extended capabilities.

    `express` is a PCI_EXP_TYPE_* (None: conventional PCI, 256 bytes);
    `acs` is (capability bits, control bits).
    """
    size = pci.PCI_CFG_SPACE_EXP_SIZE if express is not None else pci.PCI_CFG_SPACE_SIZE
    cfg = bytearray(size)

    def put(offset: int, width: int, value: int) -> None:
        cfg[offset : offset + width] = value.to_bytes(width, "little")

    if header_type is None:
        header_type = pci.PCI_HEADER_TYPE_BRIDGE if pci_class >> 8 == 0x0604 else 0
    put(pci.PCI_VENDOR_ID, 2, vendor)
    put(pci.PCI_DEVICE_ID, 2, device)
    put(pci.PCI_REVISION_ID, 1, revision)
    put(pci.PCI_CLASS_PROG, 1, pci_class & 0xFF)
    put(pci.PCI_CLASS_DEVICE, 2, pci_class >> 8)
    put(pci.PCI_HEADER_TYPE, 1, header_type | (pci.PCI_HEADER_TYPE_MFD if multifunction else 0))
    if header_type == pci.PCI_HEADER_TYPE_NORMAL:
        put(pci.PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem[0])
        put(pci.PCI_SUBSYSTEM_ID, 2, subsystem[1])
    elif header_type == pci.PCI_HEADER_TYPE_BRIDGE:
        put(pci.PCI_SECONDARY_BUS, 1, secondary_bus)
        put(pci.PCI_SUBORDINATE_BUS, 1, secondary_bus)

    # Standard capabilities, linked from 0x34, each 0x10 apart from 0x40.
    caps: list[tuple[int, dict[int, tuple[int, int]]]] = []
    if pm:
        caps.append((pci.PCI_CAP_ID_PM, {pci.PCI_PM_CTRL: (2, pci.PCI_PM_CTRL_NO_SOFT_RESET if pm_no_soft_reset else 0)}))
    if msi:
        caps.append((pci.PCI_CAP_ID_MSI, {}))
    if express is not None:
        fields = {pci.PCI_EXP_FLAGS: (2, (express << 4) | 2)}
        if flr:
            fields[pci.PCI_EXP_DEVCAP] = (4, pci.PCI_EXP_DEVCAP_FLR)
        caps.append((pci.PCI_CAP_ID_EXP, fields))
    if caps:
        put(pci.PCI_STATUS, 2, pci.PCI_STATUS_CAP_LIST)
        put(pci.PCI_CAPABILITY_LIST, 1, 0x40)
    for i, (cap_id, fields) in enumerate(caps):
        at = 0x40 + 0x10 * i
        put(at, 1, cap_id)
        put(at + 1, 1, at + 0x10 if i + 1 < len(caps) else 0)
        for off, (width, value) in fields.items():
            put(at + off, width, value)

    # Extended capabilities, from 0x100, 0x40 apart.
    ext: list[tuple[int, dict[int, tuple[int, int]]]] = []
    if acs is not None:
        ext.append((pci.PCI_EXT_CAP_ID_ACS, {pci.PCI_ACS_CAP: (2, acs[0]), pci.PCI_ACS_CTRL: (2, acs[1])}))
    if sriov:
        ext.append((pci.PCI_EXT_CAP_ID_SRIOV, {}))
    if express is not None and ext:
        for i, (cap_id, fields) in enumerate(ext):
            at = 0x100 + 0x40 * i
            nxt = at + 0x40 if i + 1 < len(ext) else 0
            put(at, 4, cap_id | (1 << 16) | (nxt << 20))
            for off, (width, value) in fields.items():
                put(at + off, width, value)
    return bytes(cfg)


ACS_ALL = sum(pci.ACS_BITS.values())
ACS_FULL = (ACS_ALL, pci.PCI_ACS_SV | pci.PCI_ACS_RR | pci.PCI_ACS_CR | pci.PCI_ACS_UF)


@dataclass
class Device:
    """What `Tree.add` wrote, for tests to refer to."""

    bdf: Bdf
    path: str  # ROOT/sys/devices/... directory
    attrs: dict[str, str] = field(default_factory=dict)


class Tree:
    """Writes a sysfs-like tree under `root`."""

    def __init__(self, root: str, *, iommu: bool = True, cmdline: str = "root=/dev/sda1 ro quiet") -> None:
        self.root = os.path.abspath(root)
        self.devices: dict[str, Device] = {}
        for d in ("sys/bus/pci/devices", "sys/bus/pci/drivers", "sys/kernel/iommu_groups",
                  "sys/class/iommu", "sys/class/net", "sys/block", "proc/net"):
            os.makedirs(self.p(d), exist_ok=True)
        self.write("proc/cmdline", cmdline + "\n")
        self.write("proc/mounts", "sysfs /sys sysfs rw 0 0\nproc /proc proc rw 0 0\n")
        self.write("proc/swaps", "Filename\tType\tSize\tUsed\tPriority\n")
        if iommu:
            self.add_iommu_unit("dmar0")

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def write(self, rel: str, text: str | bytes) -> None:
        path = self.p(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)

    def append(self, rel: str, text: str) -> None:
        with open(self.p(rel), "a") as f:
            f.write(text)

    def link(self, link_rel: str, target_abs: str) -> None:
        """A relative symlink at ROOT/link_rel pointing at the absolute `target_abs`."""
        link = self.p(link_rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.relpath(target_abs, os.path.dirname(link)), link)

    def xen_dom0(self) -> None:
        """Make the tree a Xen control domain's (Linux sees no IOMMU there)."""
        self.write("proc/xen/capabilities", "control_d\n")
        self.write("sys/hypervisor/type", "xen\n")

    def add_iommu_unit(self, name: str) -> None:
        os.makedirs(self.p(f"sys/devices/virtual/iommu/{name}"), exist_ok=True)
        self.link(f"sys/class/iommu/{name}", self.p(f"sys/devices/virtual/iommu/{name}"))

    def add(
        self,
        bdf: str,
        vendor: int,
        device: int,
        pci_class: int,
        *,
        parent: str | None = None,
        driver: str | None = None,
        group: int | None = None,
        subsystem: tuple[int, int] = (0, 0),
        revision: int = 0,
        numa_node: int = -1,
        driver_override: str | None = None,
        reset_method: str | None = "flr bus",
        boot_vga: bool | None = None,
        physfn: str | None = None,
        config: bytes | None = None,
        **config_kw: object,
    ) -> Device:
        """Add one function. `parent` is the upstream bridge's BDF (None: a root bus)."""
        b = parse_bdf(bdf)
        name = str(b)
        if parent is None:
            base = self.p(f"sys/devices/pci{b.domain:04x}:{b.bus:02x}")
        else:
            base = self.devices[str(parse_bdf(parent))].path
        path = os.path.join(base, name)
        os.makedirs(path, exist_ok=True)
        if config is None:
            config = config_space(vendor, device, pci_class, revision=revision, subsystem=subsystem, **config_kw)  # type: ignore[arg-type]
        attrs = {
            "vendor": f"0x{vendor:04x}",
            "device": f"0x{device:04x}",
            "subsystem_vendor": f"0x{subsystem[0]:04x}",
            "subsystem_device": f"0x{subsystem[1]:04x}",
            "class": f"0x{pci_class:06x}",
            "revision": f"0x{revision:02x}",
            "numa_node": str(numa_node),
            "driver_override": driver_override or "(null)",
            "enable": "1" if driver else "0",
            "irq": "0",
            "resource": "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 13,
            "modalias": f"pci:v{vendor:08X}d{device:08X}sv{subsystem[0]:08X}sd{subsystem[1]:08X}"
            f"bc{pci_class >> 16:02X}sc{(pci_class >> 8) & 0xFF:02X}i{pci_class & 0xFF:02X}",
        }
        if reset_method is not None:
            attrs["reset_method"] = reset_method
        if config_kw.get("express") is not None:
            attrs["max_link_speed"] = "8.0 GT/s PCIe"  # the kernel shows link attributes on PCIe only
        if boot_vga is not None:
            attrs["boot_vga"] = "1" if boot_vga else "0"
        for key, value in attrs.items():
            with open(os.path.join(path, key), "w") as f:
                f.write(value if value.endswith("\n") else value + "\n")
        if physfn is not None:
            config = b"\xff\xff\xff\xff" + config[4:]  # a VF's own vendor/device registers read FFFFh
        with open(os.path.join(path, "config"), "wb") as f:
            f.write(config)
        rel = os.path.relpath(path, self.root)
        self.link(f"sys/bus/pci/devices/{name}", path)
        if driver:
            self.bind(name, driver)
        if group is not None:
            os.makedirs(self.p(f"sys/kernel/iommu_groups/{group}/devices"), exist_ok=True)
            self.link(f"sys/kernel/iommu_groups/{group}/devices/{name}", path)
            self.link(f"{rel}/iommu_group", self.p(f"sys/kernel/iommu_groups/{group}"))
        if physfn is not None:
            pf = self.devices[str(parse_bdf(physfn))]
            self.link(f"{rel}/physfn", pf.path)
            index = sum(1 for n in os.listdir(pf.path) if n.startswith("virtfn"))
            self.link(f"{os.path.relpath(pf.path, self.root)}/virtfn{index}", path)
            self.write(f"{os.path.relpath(pf.path, self.root)}/sriov_numvfs", f"{index + 1}\n")
        dev = Device(b, path, attrs)
        self.devices[name] = dev
        return dev

    def bind(self, bdf: str, driver: str) -> None:
        dev_path = self.p(f"sys/bus/pci/devices/{parse_bdf(bdf)}")
        os.makedirs(self.p(f"sys/bus/pci/drivers/{driver}"), exist_ok=True)
        real = os.path.realpath(dev_path)
        self.link(os.path.relpath(os.path.join(real, "driver"), self.root), self.p(f"sys/bus/pci/drivers/{driver}"))
        self.link(f"sys/bus/pci/drivers/{driver}/{parse_bdf(bdf)}", real)

    def add_block(self, name: str, bdf: str, *, partitions: tuple[str, ...] = (), holders: tuple[str, ...] = ()) -> None:
        """A disk on the PCI device `bdf` (e.g. nvme0n1 on an NVMe controller)."""
        pdev = self.devices[str(parse_bdf(bdf))].path
        disk = os.path.join(pdev, "host0", "block", name)
        os.makedirs(os.path.join(disk, "holders"), exist_ok=True)
        self.link(f"sys/block/{name}", disk)
        self.link(os.path.relpath(os.path.join(disk, "device"), self.root), os.path.join(pdev, "host0"))
        for part in partitions:
            os.makedirs(os.path.join(disk, part, "holders"), exist_ok=True)
            with open(os.path.join(disk, part, "partition"), "w") as f:
                f.write("1\n")
        for h in holders:
            os.makedirs(self.p(f"sys/devices/virtual/block/{h}"), exist_ok=True)
            self.link(os.path.relpath(os.path.join(disk, "holders", h), self.root), self.p(f"sys/devices/virtual/block/{h}"))

    def mount(self, dev: str, where: str, fstype: str = "ext4") -> None:
        self.append("proc/mounts", f"{dev} {where} {fstype} rw,relatime 0 0\n")

    def swap(self, dev: str) -> None:
        self.append("proc/swaps", f"{dev}\tpartition\t1048572\t0\t-2\n")

    def add_net(self, name: str, bdf: str, *, up: bool = False, ipv4_route: bool = False,
                ipv6_addr: bool = False) -> None:
        """A network interface on `bdf`; `up` sets operstate and IFF_UP."""
        pdev = self.devices[str(parse_bdf(bdf))].path
        ndir = os.path.join(pdev, "net", name)
        os.makedirs(ndir, exist_ok=True)
        with open(os.path.join(ndir, "operstate"), "w") as f:
            f.write("up\n" if up else "down\n")
        with open(os.path.join(ndir, "flags"), "w") as f:
            f.write("0x1003\n" if up else "0x1002\n")
        self.link(f"sys/class/net/{name}", ndir)
        self.link(os.path.relpath(os.path.join(ndir, "device"), self.root), pdev)
        if not os.path.exists(self.p("proc/net/route")):
            self.write("proc/net/route", "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n")
        if ipv4_route:
            self.append("proc/net/route", f"{name}\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
        if ipv6_addr:
            self.append("proc/net/if_inet6", f"20010db8000000000000000000000001 02 40 00 80 {name}\n")


# --- ready-made layouts ---------------------------------------------------------

EDU = (0x1234, 0x11E8, 0x00FF00)
NVME = (0x1B36, 0x0010, 0x010802)
E1000E = (0x8086, 0x10D3, 0x020000)
ROOT_PORT = (0x1B36, 0x000C, 0x060400)
PCI_BRIDGE = (0x1B36, 0x000E, 0x060400)
HOST_BRIDGE = (0x8086, 0x29C0, 0x060000)
VGA = (0x1234, 0x1111, 0x030000)


def seed_layout(root: str, *, iommu: bool = True) -> Tree:
    """The lab's layout: edu alone; a PCIe-to-PCI bridge with two edu functions; NVMe; e1000e.

    Groups as the kernel makes them on q35 with intel-iommu.
    """
    t = Tree(root, iommu=iommu, cmdline="intel_iommu=on quiet" if iommu else "quiet")
    g = (lambda n: n) if iommu else (lambda n: None)
    t.add("0000:00:00.0", *HOST_BRIDGE, group=g(0), reset_method=None)
    t.add("0000:00:02.0", *VGA, group=g(1), boot_vga=True, reset_method=None)
    t.add("0000:00:09.0", *ROOT_PORT, driver="pcieport", group=g(6), express=pci.PCI_EXP_TYPE_ROOT_PORT,
          acs=ACS_FULL, secondary_bus=1, reset_method=None)
    t.add("0000:00:0a.0", *EDU, group=g(3), express=pci.PCI_EXP_TYPE_ENDPOINT, reset_method="bus")
    t.add("0000:00:0b.0", *ROOT_PORT, driver="pcieport", group=g(7), express=pci.PCI_EXP_TYPE_ROOT_PORT,
          acs=ACS_FULL, secondary_bus=3, reset_method=None)
    t.add("0000:00:0c.0", *ROOT_PORT, driver="pcieport", group=g(8), express=pci.PCI_EXP_TYPE_ROOT_PORT,
          acs=ACS_FULL, secondary_bus=4, reset_method=None)
    t.add("0000:01:00.0", *PCI_BRIDGE, parent="0000:00:09.0", group=g(2), express=pci.PCI_EXP_TYPE_PCI_BRIDGE,
          secondary_bus=2, reset_method=None)
    t.add("0000:02:0d.0", *EDU, parent="0000:01:00.0", group=g(2), multifunction=True, reset_method="bus")
    t.add("0000:02:0d.1", *EDU, parent="0000:01:00.0", group=g(2), reset_method="bus")
    t.add("0000:03:00.0", *NVME, parent="0000:00:0b.0", driver="nvme", group=g(4), subsystem=(0x1AF4, 0x1100),
          express=pci.PCI_EXP_TYPE_ENDPOINT, flr=True, msi=True)
    t.add("0000:04:00.0", *E1000E, parent="0000:00:0c.0", driver="e1000e", group=g(5), subsystem=(0x8086, 0x0000),
          express=pci.PCI_EXP_TYPE_ENDPOINT, flr=True, msi=True)
    t.add_block("nvme0n1", "0000:03:00.0")
    t.add_net("enp4s0", "0000:04:00.0")
    return t


def switch_without_acs(root: str, *, missing: int = pci.PCI_ACS_RR | pci.PCI_ACS_CR) -> Tree:
    """A root port, a PCIe switch whose downstream ports lack ACS bits, two NICs below.

    The two NICs share a group because peer-to-peer traffic between them is not
    forced up to the IOMMU.
    """
    t = Tree(root, cmdline="intel_iommu=on")
    t.add("0000:00:00.0", *HOST_BRIDGE, group=0, reset_method=None)
    t.add("0000:00:01.0", *ROOT_PORT, driver="pcieport", group=1, express=pci.PCI_EXP_TYPE_ROOT_PORT,
          acs=ACS_FULL, secondary_bus=1, reset_method=None)
    weak = (ACS_FULL[0] & ~missing, ACS_FULL[1] & ~missing)
    t.add("0000:01:00.0", 0x10B5, 0x8747, 0x060400, parent="0000:00:01.0", driver="pcieport", group=2,
          express=pci.PCI_EXP_TYPE_UPSTREAM, secondary_bus=2, reset_method=None)
    t.add("0000:02:08.0", 0x10B5, 0x8747, 0x060400, parent="0000:01:00.0", driver="pcieport", group=2,
          express=pci.PCI_EXP_TYPE_DOWNSTREAM, acs=weak, secondary_bus=3, reset_method=None)
    t.add("0000:02:10.0", 0x10B5, 0x8747, 0x060400, parent="0000:01:00.0", driver="pcieport", group=2,
          express=pci.PCI_EXP_TYPE_DOWNSTREAM, acs=weak, secondary_bus=4, reset_method=None)
    t.add("0000:03:00.0", *E1000E, parent="0000:02:08.0", driver="e1000e", group=2, express=pci.PCI_EXP_TYPE_ENDPOINT,
          flr=True)
    t.add("0000:04:00.0", *E1000E, parent="0000:02:10.0", driver="vfio-pci", group=2, express=pci.PCI_EXP_TYPE_ENDPOINT,
          flr=True)
    return t


def multifunction_without_acs(root: str) -> Tree:
    """A two-function PCIe card with no ACS: both functions in one group."""
    t = Tree(root, cmdline="iommu=pt")
    t.add("0000:00:01.0", *ROOT_PORT, driver="pcieport", group=0, express=pci.PCI_EXP_TYPE_ROOT_PORT,
          acs=ACS_FULL, secondary_bus=1, reset_method=None)
    t.add("0000:01:00.0", 0x8086, 0x1521, 0x020000, parent="0000:00:01.0", driver="igb", group=1,
          express=pci.PCI_EXP_TYPE_ENDPOINT, multifunction=True, flr=True)
    t.add("0000:01:00.1", 0x8086, 0x1521, 0x020000, parent="0000:00:01.0", driver="igb", group=1,
          express=pci.PCI_EXP_TYPE_ENDPOINT, flr=True)
    return t


def sriov(root: str, vfs: int = 2) -> Tree:
    """A physical function with `vfs` virtual functions, each VF in its own group."""
    t = Tree(root, cmdline="intel_iommu=on iommu=pt")
    t.add("0000:00:01.0", *ROOT_PORT, driver="pcieport", group=0, express=pci.PCI_EXP_TYPE_ROOT_PORT,
          acs=ACS_FULL, secondary_bus=1, reset_method=None)
    t.add("0000:01:00.0", 0x8086, 0x1572, 0x020000, parent="0000:00:01.0", driver="i40e", group=1,
          express=pci.PCI_EXP_TYPE_ENDPOINT, flr=True, sriov=True, acs=ACS_FULL)
    t.write(os.path.relpath(t.devices["0000:01:00.0"].path, t.root) + "/sriov_totalvfs", "64\n")
    for i in range(vfs):
        t.add(f"0000:01:02.{i}", 0x8086, 0x154C, 0x020000, parent="0000:00:01.0", driver="iavf", group=2 + i,
              express=pci.PCI_EXP_TYPE_ENDPOINT, flr=True, physfn="0000:01:00.0", reset_method="flr")
    return t


def many(root: str, n: int) -> Tree:
    """`n` functions in all: root ports with ACS, each with 7 endpoints behind it, one group each.

    For benchmarks: 128 ports per PCI domain keeps bus numbers in range.
    """
    t = Tree(root, cmdline="intel_iommu=on")
    group = 0
    for p in range((n + 7) // 8):
        domain, index = divmod(p, 128)
        bus = index + 1
        port = f"{domain:04x}:00:{index // 8:02x}.{index % 8}"
        t.add(port, *ROOT_PORT, driver="pcieport", group=group, express=pci.PCI_EXP_TYPE_ROOT_PORT,
              acs=ACS_FULL, secondary_bus=bus, reset_method=None, multifunction=index % 8 == 0)
        group += 1
        for f in range(min(7, n - p * 8 - 1)):
            t.add(f"{domain:04x}:{bus:02x}:00.{f}", *NVME, parent=port, driver="nvme", group=group,
                  express=pci.PCI_EXP_TYPE_ENDPOINT, flr=True, multifunction=f == 0, acs=ACS_FULL)
            group += 1
    return t
