"""Who holds a PCI device: the processes that have it open through VFIO or map its BARs,
and the libvirt domains that have it as a hostdev.

Read under the same root as the model (ROOT/proc, ROOT/sys, ROOT/run/libvirt), so the
unit tests give fake trees. A process holds a device when one of its fds (the links in
ROOT/proc/PID/fd) is

- the group node /dev/vfio/N of the device's IOMMU group;
- the device's cdev /dev/vfio/devices/vfioX (VFIO_DEVICE_CDEV; X is the name under
  ROOT/sys/bus/pci/devices/BDF/vfio-dev/);
- a device fd, `anon_inode:[vfio-device]`. Newer kernels name its device in
  ROOT/proc/PID/fdinfo/FD (`vfio-device-syspath: /sys/devices/.../BDF`); Linux 6.1 does
  not. An unnamed device fd is counted against the groups the same process has open;
  a process that closed its group fds (allowed once it has the device fd) is counted
  against every device on vfio-pci, since which one it holds cannot be told;

or when ROOT/proc/PID/maps maps one of the device's sysfs resourceN files.

Why it matters: vfio-pci's remove waits, uninterruptibly, until every device fd is
closed (it sends the user a REQ every 10 s), so an unbind written while a user holds
the device hangs; and while a group fd with a container is open, the kernel keeps the
group's DMA ownership, so a host driver probed after the unbind fails and the device is
left without one. Reading other users' ROOT/proc/PID/fd needs root: without it the scan
names the processes it could not read (`unreadable`).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from pcipass.errors import PcipassError
from pcipass.host.model.sysfs import PCI_DEVICES, Host, is_bdf, read_attr

VFIO_DEVICE_FD = "anon_inode:[vfio-device]"
FDINFO_SYSPATH = "vfio-device-syspath:"
LIBVIRT_QEMU_STATE = "run/libvirt/qemu"
_GROUP_NODE = re.compile(r"^/dev/vfio/(\d+)$")
_CDEV_NODE = re.compile(r"^/dev/vfio/devices/(vfio\d+)$")
_RESOURCE = re.compile(r"^resource\d+(?:_wc)?$")


@dataclass
class ProcessUse:
    """What one process has open or mapped of VFIO and PCI devices."""

    pid: int
    command: str
    groups: set[int] = field(default_factory=set)  # /dev/vfio/N open
    cdevs: set[str] = field(default_factory=set)  # vfioX of /dev/vfio/devices/vfioX open
    devices: set[str] = field(default_factory=set)  # BDFs of device fds fdinfo names
    unnamed_device_fds: int = 0  # device fds the kernel does not name (Linux 6.1)
    mapped: dict[str, set[str]] = field(default_factory=dict)  # BDF -> {resource0, ...}

    @property
    def uses_vfio(self) -> bool:
        return bool(self.groups or self.cdevs or self.devices or self.unnamed_device_fds or self.mapped)


@dataclass(frozen=True)
class LibvirtDomain:
    """A running domain of libvirt's QEMU driver, from its status XML."""

    name: str
    pid: int | None
    state: str
    hostdevs: tuple[tuple[str, bool], ...]  # (host BDF, managed)
    path: str


@dataclass(frozen=True)
class Holder:
    """A process that holds one of the devices asked about, and how."""

    pid: int
    command: str
    uses: tuple[str, ...]  # "/dev/vfio/14 open", "a VFIO device fd", "0000:00:10.0 resource0 mapped"
    libvirt_domain: str | None = None

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.command})"
        if self.libvirt_domain:
            who += f", libvirt domain {self.libvirt_domain}"
        return f"{who}: {', '.join(self.uses)}"

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "command": self.command, "uses": list(self.uses),
                "libvirt_domain": self.libvirt_domain}


def _command(proc: str) -> str:
    try:
        with open(os.path.join(proc, "cmdline"), "rb") as f:
            raw = f.read(4096)
    except OSError:
        raw = b""
    words = [w.decode("utf-8", "replace") for w in raw.split(b"\0") if w]
    if words:
        return " ".join(words)
    comm = read_attr(os.path.join(proc, "comm"))
    return f"[{comm}]" if comm else "?"


def _syspath_bdf(text: str) -> str | None:
    """The BDF a sysfs device path ends in."""
    name = os.path.basename(text.strip().rstrip("/"))
    return name if is_bdf(name) else None


class Holders:
    """Every process's VFIO fds and BAR mappings, and libvirt's running domains, read once."""

    def __init__(self, host: Host, *, exclude: Iterable[int] | None = None) -> None:
        self.host = host
        # This process is never a holder of what it is about to change; a fake tree's pids are fake.
        self.exclude = set(exclude) if exclude is not None else ({os.getpid()} if host.root == "/" else set())
        self.unreadable: list[int] = []

    # --- processes ---

    def _scan_process(self, pid: int) -> ProcessUse | None:
        proc = self.host.path("proc", str(pid))
        fd_dir = os.path.join(proc, "fd")
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            return None  # exited meanwhile
        except OSError:  # EACCES: another user's, without root
            self.unreadable.append(pid)
            return None
        use = ProcessUse(pid, "")
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if m := _GROUP_NODE.match(target):
                use.groups.add(int(m.group(1)))
            elif m := _CDEV_NODE.match(target):
                use.cdevs.add(m.group(1))
            elif target == VFIO_DEVICE_FD:
                named = None
                for line in (read_attr(os.path.join(proc, "fdinfo", fd)) or "").splitlines():
                    if line.startswith(FDINFO_SYSPATH):
                        named = _syspath_bdf(line[len(FDINFO_SYSPATH):])
                if named:
                    use.devices.add(named)
                else:
                    use.unnamed_device_fds += 1
        try:
            with open(os.path.join(proc, "maps")) as f:
                maps = f.read()
        except OSError:
            maps = ""
        for line in maps.splitlines():
            parts = line.split(None, 5)
            if len(parts) < 6 or "/sys/" not in parts[5]:
                continue
            path = parts[5].strip()
            if _RESOURCE.match(os.path.basename(path)):
                bdf = _syspath_bdf(os.path.dirname(path))
                if bdf:
                    use.mapped.setdefault(bdf, set()).add(os.path.basename(path))
        if not use.uses_vfio:
            return None
        use.command = _command(proc)
        return use

    @cached_property
    def processes(self) -> list[ProcessUse]:
        """Every process with a VFIO fd or a mapped BAR, by pid."""
        try:
            pids = sorted(int(n) for n in os.listdir(self.host.path("proc")) if n.isdigit())
        except OSError:
            return []
        return [u for u in (self._scan_process(p) for p in pids if p not in self.exclude) if u is not None]

    def _cdev_of(self, bdf: str) -> str | None:
        try:
            names = os.listdir(self.host.path(PCI_DEVICES, bdf, "vfio-dev"))
        except OSError:
            return None
        return next((n for n in sorted(names) if n.startswith("vfio")), None)

    def _on_vfio(self, bdf: str) -> bool:
        dev = self.host.device_or_none(bdf)
        return dev is not None and dev.driver == "vfio-pci"

    def of(self, bdfs: Iterable[str]) -> list[Holder]:
        """The processes holding any of `bdfs` (the endpoints of one group, say), by pid."""
        wanted = sorted(set(bdfs))
        groups = {g for g in (self._group_of(b) for b in wanted) if g is not None}
        cdevs = {c: b for b in wanted if (c := self._cdev_of(b))}
        any_on_vfio = any(self._on_vfio(b) for b in wanted)
        out = []
        for p in self.processes:
            uses = [f"/dev/vfio/{g} open" for g in sorted(p.groups & groups)]
            uses += [f"/dev/vfio/devices/{c} ({cdevs[c]}) open" for c in sorted(p.cdevs & set(cdevs))]
            uses += [f"a VFIO device fd of {b}" for b in sorted(p.devices & set(wanted))]
            if p.unnamed_device_fds and (p.groups & groups or (not p.groups and any_on_vfio)):
                what = "of its group" if p.groups & groups else "of a device it does not name (maybe this one)"
                uses.append(f"{p.unnamed_device_fds} VFIO device fd(s) {what}")
            uses += [f"{b} {r} mapped" for b in wanted for r in sorted(p.mapped.get(b, ()))]
            if uses:
                out.append(Holder(p.pid, p.command, tuple(uses), self._libvirt_name(p)))
        return out

    def _group_of(self, bdf: str) -> int | None:
        dev = self.host.device_or_none(bdf)
        return None if dev is None else dev.iommu_group

    # --- libvirt ---

    @cached_property
    def libvirt_domains(self) -> list[LibvirtDomain]:
        """libvirt's running QEMU domains: ROOT/run/libvirt/qemu/NAME.xml, the status XML it keeps
        while a domain runs (removed when it stops), with a live pid."""
        base = self.host.path(LIBVIRT_QEMU_STATE)
        try:
            names = sorted(n for n in os.listdir(base) if n.endswith(".xml"))
        except OSError:
            return []
        found = []
        for n in names:
            dom = _parse_status(os.path.join(base, n))
            if dom is None:
                continue
            if dom.pid is not None and not os.path.isdir(self.host.path("proc", str(dom.pid))):
                continue  # a stale file: that QEMU is gone
            found.append(dom)
        return found

    def libvirt_of(self, bdf: str) -> list[tuple[LibvirtDomain, bool]]:
        """The running libvirt domains with `bdf` as a hostdev, with its managed flag."""
        return [(d, managed) for d in self.libvirt_domains for b, managed in d.hostdevs if b == bdf]

    def _libvirt_name(self, p: ProcessUse) -> str | None:
        for d in self.libvirt_domains:
            if d.pid == p.pid:
                return d.name
        # libvirt names its QEMU `-name guest=NAME,...` and keeps its files under
        # /var/lib/libvirt/qemu/domain-ID-NAME: a QEMU libvirt started, whatever its state file says.
        m = re.search(r"-name guest=([^,\s]+)", p.command)
        if m and "/libvirt/qemu/domain-" in p.command:
            return m.group(1)
        return None


def _parse_status(path: str) -> LibvirtDomain | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    domain = root.find("domain") if root.tag == "domstatus" else None
    if domain is None:
        return None
    name = domain.findtext("name") or os.path.basename(path)[:-4]
    pid_text = root.get("pid")
    hostdevs = []
    for hd in domain.iterfind("devices/hostdev"):
        if hd.get("mode", "subsystem") != "subsystem" or hd.get("type") != "pci":
            continue
        a = hd.find("source/address")
        if a is None:
            continue
        try:
            bdf = (f"{int(a.get('domain', '0'), 0):04x}:{int(a.get('bus', '0'), 0):02x}:"
                   f"{int(a.get('slot', '0'), 0):02x}.{int(a.get('function', '0'), 0):x}")
        except ValueError:
            continue
        hostdevs.append((bdf, hd.get("managed", "no") == "yes"))
    return LibvirtDomain(name, int(pid_text) if pid_text and pid_text.isdigit() else None,
                         root.get("state", "running"), tuple(hostdevs), path)


def nodedev_name(bdf: str) -> str:
    """libvirt's node device name of a PCI address: pci_0000_00_10_0."""
    return "pci_" + bdf.replace(":", "_").replace(".", "_")


LIBVIRT_HINT = ("pcipass does not take a device from libvirt: `virsh destroy {domain}` (or `virsh shutdown "
                "{domain}`) ends the domain's use of it; with managed='yes' libvirt then gives the device "
                "back to its host driver by itself, and `virsh nodedev-reattach {nodedev}` does for one it "
                "left detached. Nothing was changed")
PROCESS_HINT = ("stop the holder first (shut the VM down, stop `pcipass serve`, end the program) and run "
                "this again: vfio-pci's unbind waits until its user lets go, and no host driver can take a "
                "device whose group a user still has open. Nothing was changed")


@dataclass(frozen=True)
class Held:
    """What holds a set of devices: libvirt domains (with the hostdev and its managed flag)
    and processes."""

    libvirt: tuple[tuple[LibvirtDomain, str, bool], ...]
    processes: tuple[Holder, ...]

    def __bool__(self) -> bool:
        return bool(self.libvirt or self.processes)

    def libvirt_names(self) -> list[str]:
        names = [d.name for d, _, _ in self.libvirt]
        names += [h.libvirt_domain for h in self.processes if h.libvirt_domain and h.libvirt_domain not in names]
        return names

    def lines(self) -> list[str]:
        out = [f"libvirt domain {d.name}" + (f" (pid {d.pid})" if d.pid else "")
               + f" has {bdf} as a hostdev (managed='{'yes' if managed else 'no'}')"
               for d, bdf, managed in self.libvirt]
        out += [h.describe() for h in self.processes]
        return out

    def error(self, what: str) -> PcipassError:
        """`what` (e.g. "cannot release IOMMU group 12") refused, naming every holder."""
        names = self.libvirt_names()
        if names:
            first = self.libvirt[0][1] if self.libvirt else ""
            return PcipassError(f"{what}: it is held by libvirt: " + "; ".join(self.lines()),
                                hint=LIBVIRT_HINT.format(domain=names[0], nodedev=nodedev_name(first) if first
                                                         else "pci_DDDD_BB_SS_F"),
                                code="held-by-libvirt")
        return PcipassError(f"{what}: it is held open by " + "; ".join(self.lines()), hint=PROCESS_HINT,
                            code="held-by-process")


def held(holders: Holders, bdfs: Iterable[str]) -> Held:
    wanted = sorted(set(bdfs))
    libvirt = tuple((d, b, m) for b in wanted for d, m in holders.libvirt_of(b))
    return Held(libvirt, tuple(holders.of(wanted)))
