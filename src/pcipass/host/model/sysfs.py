"""The host model: PCI devices, IOMMU groups and the IOMMU, read lazily from sysfs.

Names mirror the kernel's sysfs attributes (vendor, device, class,
driver_override, iommu_group, numa_node, reset_method, physfn, virtfnN...).
Every path is read under `sysfs_root` (default "/"), so the same classes work
on this host, on a snapshot (`pcipass snapshot`) and on synthetic test trees.
Nothing is read until asked for, and each attribute is read once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import NamedTuple

from pcipass import pci
from pcipass.errors import PcipassError, UsageError
from pcipass.sysfs import Bdf, is_bdf, is_bridge_class, link_name, parse_bdf, parse_int, read_attr

PCI_DEVICES = "sys/bus/pci/devices"
IOMMU_GROUPS = "sys/kernel/iommu_groups"
CLASS_IOMMU = "sys/class/iommu"
# Xen's console log as xenconsoled writes it (XENCONSOLED_TRACE=hv): `xl dmesg` of a captured tree.
XEN_HYPERVISOR_LOG = "var/log/xen/console/hypervisor.log"
PROC_CMDLINE = "proc/cmdline"
# The firmware's table for each IOMMU kind: it describes the hardware even when the kernel
# did not turn it on (see Host.acpi_iommu_tables).
ACPI_IOMMU_TABLES = {"DMAR": "intel", "IVRS": "amd"}
ACPI_TABLES = "sys/firmware/acpi/tables"

# The chipset's own functions (names from linux/pci_ids.h): the host needs them, a guest has
# no use for them. Not "other system peripheral" (0x0880): DMA engines such as Intel's DSA are
# passed through.
SYSTEM_DEVICE_CLASSES = {
    pci.PCI_CLASS_BRIDGE_HOST: "a host bridge",
    pci.PCI_CLASS_BRIDGE_ISA: "an ISA bridge (LPC)",
    pci.PCI_CLASS_BRIDGE_EISA: "an EISA bridge",
    pci.PCI_CLASS_BRIDGE_MC: "a MicroChannel bridge",
    pci.PCI_CLASS_SYSTEM_PIC: "an interrupt controller",
    pci.PCI_CLASS_SYSTEM_DMA: "a DMA controller",
    pci.PCI_CLASS_SYSTEM_TIMER: "a system timer",
    pci.PCI_CLASS_SYSTEM_RTC: "a real-time clock",
    pci.PCI_CLASS_SYSTEM_IOMMU: "an IOMMU",
    pci.PCI_CLASS_SERIAL_SMBUS: "an SMBus controller",
}


class cached_property:
    """functools.cached_property without its per-access lock (Python 3.11 takes one), which
    dominated a 4096-device listing: computed once, then served from the instance's dict."""

    def __init__(self, func):  # type: ignore[no-untyped-def]
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):  # type: ignore[no-untyped-def]
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


def _read_at(name: str, dir_fd: int, size: int = 65536) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


class PciDevice:
    """One PCI function, as sysfs shows it under ROOT/sys/bus/pci/devices/BDF."""

    def __init__(self, host: Host, bdf: Bdf) -> None:
        self.host = host
        self.bdf = bdf
        self.name = str(bdf)
        self.sys_path = os.path.join(host.root, PCI_DEVICES, self.name)

    def __repr__(self) -> str:
        return f"PciDevice({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PciDevice) and other.host is self.host and other.bdf == self.bdf

    def __hash__(self) -> int:
        return hash(self.bdf)

    # What a listing needs of every device is read and decoded in one pass, `_load`, on the
    # first access of any of these (or for every device at once by Host.preload); other
    # attributes are read one by one when asked for.
    config: bytes  # as the `config` file gives it: 64 bytes only, without root
    vendor: int | None
    device: int | None
    subsystem_vendor: int | None
    subsystem_device: int | None
    pci_class: int | None  # the 24-bit class code: base class, subclass, programming interface
    revision: int | None
    header_type: int | None
    driver: str | None  # the bound driver's name
    iommu_group: int | None
    numa_node: int | None  # None where the kernel says -1 (no affinity)
    _reset_method: str | None  # the text of `reset_method` (Linux 5.15+)
    _physfn: str | None  # the physical function's name, for an SR-IOV virtual function
    _bus_link: str  # where ROOT/sys/bus/pci/devices/BDF points ("" if unreadable)

    _LOADED = frozenset(__annotations__)

    def __getattr__(self, name: str) -> object:
        # Only reached for what the instance does not have yet.
        if name in PciDevice._LOADED:
            self._load()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _load(self, devices_fd: int | None = None) -> None:
        """Read config space, three files and three links through one O_PATH fd on the
        device's directory, and decode them. `devices_fd`, an fd on ROOT/sys/bus/pci/devices,
        saves walking the root's path to each device."""
        where = {} if devices_fd is None else {"dir_fd": devices_fd}
        path = self.sys_path if devices_fd is None else self.name
        config = b""
        text: dict[str, str | None] = dict.fromkeys(("class", "numa_node", "reset_method"))
        links: dict[str, str | None] = dict.fromkeys(("driver", "iommu_group", "physfn"))
        try:
            bus_link = os.readlink(path, **where)
            dfd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, **where)
        except OSError:
            bus_link, dfd = "", -1
        if dfd >= 0:
            try:
                config = _read_at("config", dfd, pci.PCI_CFG_SPACE_EXP_SIZE) or b""
                for name in text:
                    data = _read_at(name, dfd)
                    text[name] = None if data is None else data.decode("ascii", "replace").strip()
                for name in links:
                    try:
                        links[name] = os.path.basename(os.readlink(name, dir_fd=dfd))
                    except OSError:
                        pass
            finally:
                os.close(dfd)

        # IDs come from the sysfs attributes where the kernel may fix them up, and from the
        # header where the two agree by construction (saving a file each).
        header = len(config) >= pci.PCI_STD_HEADER_SIZEOF

        def u16(offset: int) -> int:
            return int.from_bytes(config[offset : offset + 2], "little")

        vendor = u16(pci.PCI_VENDOR_ID) if header else None
        # An SR-IOV virtual function reads FFFFh there; the kernel's attributes have the real IDs.
        from_header = vendor not in (None, 0xFFFF)
        header_type = config[pci.PCI_HEADER_TYPE] & pci.PCI_HEADER_TYPE_MASK if len(config) > pci.PCI_HEADER_TYPE else None
        # Bridges have no subsystem IDs in the header: the kernel reads their SSVID capability.
        subsystem_in_header = header and header_type == pci.PCI_HEADER_TYPE_NORMAL
        node = parse_int(text["numa_node"], 10)
        self.__dict__.update(
            config=config,
            vendor=vendor if from_header else self._hex("vendor"),
            device=u16(pci.PCI_DEVICE_ID) if from_header else self._hex("device"),
            subsystem_vendor=u16(pci.PCI_SUBSYSTEM_VENDOR_ID) if subsystem_in_header else self._hex("subsystem_vendor"),
            subsystem_device=u16(pci.PCI_SUBSYSTEM_ID) if subsystem_in_header else self._hex("subsystem_device"),
            pci_class=parse_int(text["class"]),
            revision=config[pci.PCI_REVISION_ID] if header else self._hex("revision"),
            header_type=header_type,
            driver=links["driver"],
            iommu_group=parse_int(links["iommu_group"], 10),
            numa_node=None if node is None or node < 0 else node,
            _reset_method=text["reset_method"],
            _physfn=links["physfn"],
            _bus_link=bus_link,
        )

    @cached_property
    def driver_override(self) -> str | None:
        """Read on its own, when asked for: Linux reads this file under the device lock, which
        an unbind holds, so while vfio-pci waits for a device's user to let go every reader of
        it waits too (status and release look at groups without it)."""
        value = self.attr("driver_override")
        return None if value in (None, "", "(null)") else value

    def attr(self, name: str) -> str | None:
        """The text of one sysfs attribute, stripped; None if absent or unreadable."""
        return read_attr(os.path.join(self.sys_path, name))

    def _hex(self, name: str) -> int | None:
        return parse_int(self.attr(name))

    @cached_property
    def boot_vga(self) -> bool:
        # The kernel shows boot_vga on display devices only.
        if self.pci_class is not None and self.pci_class >> 16 != pci.PCI_BASE_CLASS_DISPLAY:
            return False
        return self.attr("boot_vga") == "1"

    @cached_property
    def enabled(self) -> bool:
        return self.attr("enable") == "1"

    @cached_property
    def modalias(self) -> str | None:
        return self.attr("modalias")

    # --- config space -------------------------------------------------------

    @cached_property
    def is_multifunction(self) -> bool:
        """The header says multi-function, or another function shares this slot."""
        if len(self.config) > pci.PCI_HEADER_TYPE and self.config[pci.PCI_HEADER_TYPE] & 0x80:
            return True
        return self.host.functions_in_slot(self.bdf) > 1

    @cached_property
    def is_bridge(self) -> bool:
        if self.header_type in (pci.PCI_HEADER_TYPE_BRIDGE, pci.PCI_HEADER_TYPE_CARDBUS):
            return True
        return is_bridge_class(self.pci_class)

    @cached_property
    def system_kind(self) -> str | None:
        """What chipset function this is ("a host bridge", "an SMBus controller"...), None for any other device."""
        return None if self.pci_class is None else SYSTEM_DEVICE_CLASSES.get(self.pci_class >> 8)

    @cached_property
    def config_complete(self) -> bool:
        """Whether the capability lists could be read (root sees 256 bytes or more)."""
        return len(self.config) >= pci.PCI_CFG_SPACE_SIZE

    @cached_property
    def capabilities(self) -> list[pci.Capability] | None:
        """Standard then extended capabilities; None when config space is not readable."""
        if not self.config_complete:
            return None
        caps = list(pci.capabilities(self.config))
        if len(self.config) >= pci.PCI_CFG_SPACE_EXP_SIZE:
            caps += pci.extended_capabilities(self.config)
        return caps

    def capability(self, cap_id: int, extended: bool = False) -> pci.Capability | None:
        for cap in self.capabilities or ():
            if cap.id == cap_id and cap.extended == extended:
                return cap
        return None

    @cached_property
    def express_type(self) -> int | None:
        """PCI_EXP_TYPE_* from the PCIe capability, or None (conventional PCI or unreadable)."""
        cap = self.capability(pci.PCI_CAP_ID_EXP)
        if cap is None:
            return None
        return (pci.reader(self.config)(cap.offset + pci.PCI_EXP_FLAGS, 2) & pci.PCI_EXP_FLAGS_TYPE) >> 4

    @cached_property
    def is_pcie(self) -> bool:
        """A PCI Express function. Without root (64 bytes of config), sysfs's link attributes,
        which the kernel shows for PCIe functions only, tell."""
        if self.config_complete:
            return self.express_type is not None
        return os.path.exists(os.path.join(self.sys_path, "max_link_speed"))

    @cached_property
    def acs(self) -> pci.Acs | None:
        """ACS registers, or None (no ACS capability, or config space unreadable)."""
        cap = self.capability(pci.PCI_EXT_CAP_ID_ACS, extended=True)
        if cap is None:
            return None
        read = pci.reader(self.config)
        return pci.Acs(read(cap.offset + pci.PCI_ACS_CAP, 2), read(cap.offset + pci.PCI_ACS_CTRL, 2))

    # --- reset --------------------------------------------------------------

    @cached_property
    def reset_methods(self) -> list[str]:
        """Reset methods the kernel will use, in its order (e.g. flr, pm, bus).

        From `reset_method` (Linux 5.15+); on older kernels, the `reset` file
        says only that some method exists, and config space says which.
        """
        listed = self._reset_method
        if listed is not None:
            return listed.split()
        if not os.path.exists(os.path.join(self.sys_path, "reset")):
            return []
        methods = []
        read = pci.reader(self.config) if self.config_complete else None
        exp = self.capability(pci.PCI_CAP_ID_EXP)
        if read and exp and read(exp.offset + pci.PCI_EXP_DEVCAP, 4) & pci.PCI_EXP_DEVCAP_FLR:
            methods.append("flr")
        af = self.capability(pci.PCI_CAP_ID_AF)
        if read and af and read(af.offset + pci.PCI_AF_CAP, 1) & pci.PCI_AF_CAP_FLR:
            methods.append("af_flr")
        pm = self.capability(pci.PCI_CAP_ID_PM)
        if read and pm and not read(pm.offset + pci.PCI_PM_CTRL, 2) & pci.PCI_PM_CTRL_NO_SOFT_RESET:
            methods.append("pm")
        if self.parent is not None:
            methods.append("bus")
        return methods or ["unknown"]

    # --- topology -----------------------------------------------------------

    @cached_property
    def real_path(self) -> str:
        """Where the device sits in ROOT/sys/devices (the symlink resolved)."""
        return os.path.realpath(self.sys_path)

    @cached_property
    def parent(self) -> PciDevice | None:
        """The bridge or port directly upstream, or None at a root bus."""
        # The bus link reads ../../../devices/pci0000:00/0000:00:0b.0/0000:03:00.0: its
        # next-to-last part is the parent, without resolving every component.
        parts = self._bus_link.split("/")
        if len(parts) >= 2 and parts[-1] == self.name and (is_bdf(parts[-2]) or parts[-2].startswith("pci")):
            name = parts[-2]
        else:
            name = os.path.basename(os.path.dirname(self.real_path))
        if not is_bdf(name):
            return None
        return self.host.device_or_none(name)

    @cached_property
    def upstream(self) -> list[PciDevice]:
        """Every bridge between this device and the root, nearest first."""
        chain = []
        dev = self.parent
        while dev is not None:
            chain.append(dev)
            dev = dev.parent
        return chain

    @cached_property
    def children(self) -> list[PciDevice]:
        """The functions directly below this bridge."""
        return [d for d in self.host.devices() if d.parent == self]

    @cached_property
    def physfn(self) -> PciDevice | None:
        """The SR-IOV physical function of a virtual function."""
        return self.host.device_or_none(self._physfn) if self._physfn else None

    @cached_property
    def virtfns(self) -> list[PciDevice]:
        """The SR-IOV virtual functions of a physical function, by VF index."""
        if not self._may_have_sriov:
            return []  # no SR-IOV capability: no need to list the directory
        try:
            names = [n for n in os.listdir(self.sys_path) if n.startswith("virtfn")]
        except OSError:
            return []
        found = []
        for n in sorted(names, key=lambda n: parse_int(n[6:], 10) or 0):
            target = link_name(os.path.join(self.sys_path, n))
            dev = self.host.device_or_none(target) if target else None
            if dev is not None:
                found.append(dev)
        return found

    @cached_property
    def _may_have_sriov(self) -> bool:
        if self.capabilities is None:
            return True  # config space unreadable: look at sysfs
        if not self.is_pcie:
            return False  # SR-IOV is a PCIe extended capability
        if len(self.config) >= pci.PCI_CFG_SPACE_EXP_SIZE:
            return self.capability(pci.PCI_EXT_CAP_ID_SRIOV, extended=True) is not None
        return True

    @cached_property
    def sriov_totalvfs(self) -> int | None:
        return parse_int(self.attr("sriov_totalvfs"), 10) if self._may_have_sriov else None

    @cached_property
    def sriov_numvfs(self) -> int | None:
        return parse_int(self.attr("sriov_numvfs"), 10) if self._may_have_sriov else None

    @property
    def group(self) -> IommuGroup | None:
        return None if self.iommu_group is None else self.host.group(self.iommu_group)


class IommuGroup:
    """An IOMMU group: the devices the IOMMU cannot tell apart, passed through together."""

    def __init__(self, host: Host, number: int) -> None:
        self.host = host
        self.number = number
        self.sys_path = os.path.join(host.root, IOMMU_GROUPS, str(number))

    def __repr__(self) -> str:
        return f"IommuGroup({self.number})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IommuGroup) and other.host is self.host and other.number == self.number

    def __hash__(self) -> int:
        return hash(self.number)

    @cached_property
    def devices(self) -> list[PciDevice]:
        """The PCI members, by address."""
        try:
            names = os.listdir(os.path.join(self.sys_path, "devices"))
        except OSError:
            return []
        return [d for d in (self.host.device_or_none(n) for n in sorted(names) if is_bdf(n)) if d]

    @property
    def dev_path(self) -> str:
        """The VFIO group node this group gets once bound (/dev/vfio/N)."""
        return f"/dev/vfio/{self.number}"


class IommuState(NamedTuple):
    """Whether DMA remapping is on, and the evidence."""

    units: tuple[str, ...]  # ROOT/sys/class/iommu entries (dmar0, ivhd0, ...)
    groups: int  # how many IOMMU groups exist
    cmdline: tuple[str, ...]  # IOMMU-related kernel arguments

    @property
    def enabled(self) -> bool:
        # Groups without a hardware unit come from `vfio noiommu` or a software IOMMU;
        # a unit without groups means the kernel found it but did not turn it on.
        return bool(self.units) and self.groups > 0

    @property
    def disabled_on_cmdline(self) -> bool:
        off = {"intel_iommu=off", "amd_iommu=off", "iommu=off"}
        return any(arg in off for arg in self.cmdline)


_IOMMU_ARGS = ("intel_iommu=", "amd_iommu=", "iommu=", "iommu.", "amd_iommu_intr=", "intremap=")


class Host:
    """Every PCI device and IOMMU group of one host (or of a tree under `sysfs_root`)."""

    def __init__(self, sysfs_root: str = "/") -> None:
        self.root = os.path.abspath(sysfs_root)
        self._devices: dict[str, PciDevice] | None = None
        self._groups: dict[int, IommuGroup] = {}

    def __repr__(self) -> str:
        return f"Host({self.root!r})"

    def path(self, *parts: str) -> str:
        """A path under the root: host.path("proc", "mounts")."""
        return os.path.join(self.root, *parts)

    def _scan(self) -> dict[str, PciDevice]:
        if self._devices is None:
            try:
                names = os.listdir(self.path(PCI_DEVICES))
            except FileNotFoundError:
                raise PcipassError(
                    f"no PCI devices under {self.path(PCI_DEVICES)}",
                    hint="point --sysfs at the root of a tree that has sys/bus/pci/devices "
                    "(a `pcipass snapshot` output, or / on a Linux host)",
                    code="no-sysfs",
                ) from None
            found = {}
            for name in sorted(names):
                if is_bdf(name):
                    found[name] = PciDevice(self, parse_bdf(name))
            self._devices = found
        return self._devices

    def devices(self) -> list[PciDevice]:
        """All PCI functions, by address."""
        return list(self._scan().values())

    def preload(self, devices: Iterable[PciDevice] | None = None) -> None:
        """Read what a listing needs of every device (or of `devices`) now, in one pass,
        each device's directory opened from one fd on ROOT/sys/bus/pci/devices."""
        if devices is None:
            devices = self._scan().values()
        try:
            devices_fd = os.open(self.path(PCI_DEVICES), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            for dev in devices:
                if "config" not in dev.__dict__:
                    dev._load(devices_fd)
        finally:
            os.close(devices_fd)

    @cached_property
    def _slots(self) -> dict[tuple[int, ...], int]:
        count: dict[tuple[int, ...], int] = {}
        for dev in self._scan().values():
            count[dev.bdf[:3]] = count.get(dev.bdf[:3], 0) + 1
        return count

    def functions_in_slot(self, bdf: Bdf) -> int:
        """How many functions the slot of `bdf` (its domain, bus and device) has."""
        return self._slots.get(bdf[:3], 0)

    def device_or_none(self, bdf: str | Bdf) -> PciDevice | None:
        found = self._scan().get(bdf) if isinstance(bdf, str) else None  # the kernel's form: no parsing
        if found is not None:
            return found
        try:
            key = str(parse_bdf(bdf))
        except UsageError:
            return None
        return self._scan().get(key)

    def device(self, bdf: str | Bdf) -> PciDevice:
        """The device at `bdf`; a clear error if there is none."""
        dev = self.device_or_none(parse_bdf(bdf))
        if dev is None:
            where = "" if self.root == "/" else f" under {self.root}"
            raise PcipassError(
                f"no PCI device {parse_bdf(bdf)}{where}",
                hint="`pcipass list` shows every device and its address",
                code="unknown-bdf",
            )
        return dev

    def group(self, number: int) -> IommuGroup:
        if number not in self._groups:
            self._groups[number] = IommuGroup(self, number)
        return self._groups[number]

    def groups(self) -> list[IommuGroup]:
        """All IOMMU groups, by number."""
        try:
            names = os.listdir(self.path(IOMMU_GROUPS))
        except OSError:
            return []
        return [self.group(int(n)) for n in sorted(names, key=lambda n: int(n) if n.isdigit() else -1) if n.isdigit()]

    @cached_property
    def cmdline(self) -> str:
        return read_attr(self.path(PROC_CMDLINE)) or ""

    @cached_property
    def iommu(self) -> IommuState:
        try:
            units = tuple(sorted(os.listdir(self.path(CLASS_IOMMU))))
        except OSError:
            units = ()
        try:
            groups = sum(1 for n in os.listdir(self.path(IOMMU_GROUPS)) if n.isdigit())
        except OSError:
            groups = 0
        args = tuple(a for a in self.cmdline.split() if a.startswith(_IOMMU_ARGS))
        return IommuState(units, groups, args)

    @cached_property
    def xen_dom0(self) -> bool:
        """A Xen control domain: there Xen, not Linux, owns the IOMMU, and dom0 does not see it."""
        caps = read_attr(self.path("proc", "xen", "capabilities"))
        return caps is not None and "control_d" in caps.split()

    @cached_property
    def xen_iommu(self) -> bool | None:
        """On a Xen dom0, Xen's own IOMMU state: its boot log (`xl dmesg`; in a --sysfs tree,
        xenconsoled's hypervisor.log) says "I/O virtualisation enabled/disabled", else
        `xl info`'s virt_caps names pv_directio. None where unknown (xl needs root)."""
        if not self.xen_dom0:
            return None
        live = self.root == "/"

        import subprocess  # only on a Xen dom0: it would cost every listing's start-up

        def xl(verb: str) -> str:
            try:
                return subprocess.run(["xl", verb], capture_output=True, text=True, timeout=60).stdout
            except (OSError, subprocess.TimeoutExpired):
                return ""
        log = xl("dmesg") if live else read_attr(self.path(XEN_HYPERVISOR_LOG)) or ""
        if "I/O virtualisation enabled" in log or "I/O virtualisation disabled" in log:
            return "I/O virtualisation enabled" in log
        caps = re.search(r"^virt_caps\s*:(.*)$", xl("info") if live else "", re.MULTILINE)
        return None if caps is None else "pv_directio" in caps.group(1).split()

    @cached_property
    def acpi_iommu_tables(self) -> tuple[str, ...]:
        """The firmware's IOMMU tables present (names from ACPI_IOMMU_TABLES: DMAR, IVRS)."""
        return tuple(t for t in ACPI_IOMMU_TABLES if os.path.exists(self.path(ACPI_TABLES, t)))

    @cached_property
    def cpu_vendor(self) -> str | None:
        """GenuineIntel or AuthenticAMD (for the kernel argument that turns the IOMMU on)."""
        text = read_attr(self.path("proc", "cpuinfo")) or ""
        m = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.MULTILINE)
        return m.group(1) if m else None
