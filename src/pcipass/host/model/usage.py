"""What the host itself uses a PCI device for: disks, network interfaces.

Read under the same root as the model: ROOT/sys/block/*, ROOT/sys/class/net/*
(each resolved to the PCI function it hangs off), ROOT/proc/mounts,
ROOT/proc/swaps, ROOT/proc/net/route, if_inet6 and ipv6_route.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from functools import cached_property

from pcipass.host.model.sysfs import Host, is_bdf, read_attr

IFF_UP = 0x1


def pci_function_of(real_path: str) -> str | None:
    """The PCI function a sysfs device path hangs off: the last BDF component in it."""
    for part in reversed(real_path.split(os.sep)):
        if is_bdf(part):
            return part
    return None


@dataclass
class BlockUse:
    """A disk on a PCI function and what holds it: mounts, swap, holders (dm, md...)."""

    disk: str
    mounts: list[tuple[str, str]] = field(default_factory=list)  # (/dev/NAME, mount point)
    swaps: list[str] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)  # "nvme0n1p2 -> dm-0"

    @property
    def in_use(self) -> bool:
        return bool(self.mounts or self.swaps or self.holders)

    def describe(self) -> str:
        parts = [f"{dev} mounted on {where}" for dev, where in self.mounts]
        parts += [f"{dev} is swap" for dev in self.swaps]
        parts += [f"held by {h}" for h in self.holders]
        return f"/dev/{self.disk}: " + ", ".join(parts) if parts else f"/dev/{self.disk}: not in use"


@dataclass
class NetUse:
    """A network interface on a PCI function."""

    name: str
    up: bool
    addresses: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)

    @property
    def in_use(self) -> bool:
        return self.up and bool(self.addresses or self.routes)

    def describe(self) -> str:
        state = "up" if self.up else "down"
        extra = []
        if self.addresses:
            extra.append("addresses " + ", ".join(self.addresses))
        if self.routes:
            extra.append("routes to " + ", ".join(self.routes))
        return f"{self.name} is {state}" + (f" with {'; '.join(extra)}" if extra else "")


def _lines(path: str) -> list[str]:
    text = read_attr(path)
    return text.splitlines() if text else []


class HostUse:
    """Disks and interfaces of every PCI function, found once per Host."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @cached_property
    def holders(self):  # type: ignore[no-untyped-def]
        """The processes and libvirt domains holding devices (pcipass.host.holders.Holders)."""
        from pcipass.host.model.holders import Holders

        return Holders(self.host)

    @cached_property
    def _mounts(self) -> list[tuple[str, str]]:
        out = []
        for line in _lines(self.host.path("proc", "mounts")):
            f = line.split()
            if len(f) >= 2 and f[0].startswith("/dev/"):
                out.append((f[0], f[1].replace("\\040", " ")))
        return out

    @cached_property
    def _swaps(self) -> set[str]:
        return {line.split()[0] for line in _lines(self.host.path("proc", "swaps"))[1:] if line.split()}

    def _block_use(self, disk: str, disk_path: str) -> BlockUse:
        use = BlockUse(disk)
        names = [disk]
        try:
            names += sorted(n for n in os.listdir(disk_path) if os.path.exists(os.path.join(disk_path, n, "partition")))
        except OSError:
            pass
        for name in names:
            node = os.path.join(disk_path, name) if name != disk else disk_path
            dev = f"/dev/{name}"
            use.mounts += [(d, where) for d, where in self._mounts if d == dev]
            if dev in self._swaps:
                use.swaps.append(dev)
            try:
                use.holders += [f"{name} -> {h}" for h in sorted(os.listdir(os.path.join(node, "holders")))]
            except OSError:
                pass
        return use

    @cached_property
    def block(self) -> dict[str, list[BlockUse]]:
        """BDF -> disks on it."""
        found: dict[str, list[BlockUse]] = {}
        base = self.host.path("sys", "block")
        try:
            disks = sorted(os.listdir(base))
        except OSError:
            return found
        for disk in disks:
            real = os.path.realpath(os.path.join(base, disk))
            bdf = pci_function_of(real)
            if bdf:
                found.setdefault(bdf, []).append(self._block_use(disk, real))
        return found

    @cached_property
    def _routes(self) -> dict[str, list[str]]:
        routes: dict[str, list[str]] = {}
        for line in _lines(self.host.path("proc", "net", "route"))[1:]:
            f = line.split()
            if len(f) >= 8:
                dest = ".".join(str(b) for b in reversed(bytes.fromhex(f[1])))
                bits = bin(int(f[7], 16)).count("1")
                routes.setdefault(f[0], []).append(f"{dest}/{bits}")
        for line in _lines(self.host.path("proc", "net", "ipv6_route")):
            f = line.split()
            # Skip link-local and multicast routes every up interface has.
            if len(f) >= 10 and not f[0].startswith(("fe80", "ff")):
                routes.setdefault(f[9], []).append(f"{_v6(f[0])}/{int(f[1], 16)}")
        return routes

    @cached_property
    def _addresses(self) -> dict[str, list[str]]:
        addrs: dict[str, list[str]] = {}
        for line in _lines(self.host.path("proc", "net", "if_inet6")):
            f = line.split()
            # Scope 0x20 is link-local: every up IPv6 interface has one.
            if len(f) >= 6 and f[3] != "20":
                addrs.setdefault(f[5], []).append(f"{_v6(f[0])}/{int(f[2], 16)}")
        return addrs

    @cached_property
    def net(self) -> dict[str, list[NetUse]]:
        """BDF -> network interfaces on it."""
        found: dict[str, list[NetUse]] = {}
        base = self.host.path("sys", "class", "net")
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return found
        for name in names:
            node = os.path.join(base, name)
            device = os.path.join(node, "device")
            if not os.path.exists(device):
                continue
            bdf = pci_function_of(os.path.realpath(device))
            if not bdf:
                continue
            flags = read_attr(os.path.join(node, "flags"))
            up = read_attr(os.path.join(node, "operstate")) == "up" or bool(flags and int(flags, 16) & IFF_UP)
            use = NetUse(name, up, list(self._addresses.get(name, [])), list(self._routes.get(name, [])))
            found.setdefault(bdf, []).append(use)
        return found


def _v6(hexaddr: str) -> str:
    return str(ipaddress.IPv6Address(bytes.fromhex(hexaddr)))
