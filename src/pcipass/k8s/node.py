"""What a node offers Kubernetes: one device per IOMMU group (the unit VFIO isolates), chosen
by vendor:device selectors, with its health from `pcipass check`'s verdict; and the
resource.k8s.io ResourceSlice that publishes them for DRA."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pcipass.errors import UsageError
from pcipass.host.model.sysfs import Host
from pcipass.host.present import cdi
from pcipass.host.transaction.claim import Context
from pcipass.host.transaction.journal import CLAIM, DONE
from pcipass.host.transaction.plan import VFIO

DRIVER = "pcipass.io"  # the DRA driver's name (a DNS subdomain); the CDI kind is pcipass.io/vfio
RESOURCE = "pcipass.io/vfio"  # the device plugin's extended resource
RESOURCE_API = "resource.k8s.io/v1"
# Reasons of the verdict that do not make a claimed group unhealthy: its container using it.
IN_USE_CODES = frozenset({"bound-to-vfio", "held-by-process", "held-by-libvirt", "holders-unknown"})
MAX_SLICE_DEVICES = 128  # resource.k8s.io/v1: devices in one ResourceSlice
MAX_STRING_ATTRIBUTE = 64


@dataclass(frozen=True)
class Selector:
    """VENDOR:DEVICE in hex (1234:11e8), either half * for any; or "all"."""

    vendor: int | None
    device: int | None

    @classmethod
    def parse(cls, text: str) -> Selector:
        if text == "all":
            return cls(None, None)
        m = re.fullmatch(r"([0-9a-fA-F]{1,4}|\*):([0-9a-fA-F]{1,4}|\*)", text)
        if not m:
            raise UsageError(f"bad selector {text!r}", hint="VENDOR:DEVICE in hex (1234:11e8, 8086:*), or all",
                             code="bad-selector")
        return cls(*(None if g == "*" else int(g, 16) for g in m.groups()))

    def matches(self, vendor: int | None, device: int | None) -> bool:
        return (self.vendor is None or self.vendor == vendor) and (self.device is None or self.device == device)


@dataclass
class Function:
    bdf: str
    vendor: int | None
    device: int | None
    numa: int | None
    role: str  # "pf" (has VFs), "vf" or "none"


@dataclass
class GroupDevice:
    """One IOMMU group as Kubernetes sees it."""

    key: str  # the claim journal's key ("2")
    number: int
    functions: list[Function]
    healthy: bool
    claimed: bool  # by pcipass for vfio, done
    why: list[str] = field(default_factory=list)  # why not healthy

    @property
    def name(self) -> str:
        return cdi.device_name(self.key)

    @property
    def bdfs(self) -> list[str]:
        return [f.bdf for f in self.functions]

    @property
    def numa(self) -> int | None:
        nodes = {f.numa for f in self.functions}
        return nodes.pop() if len(nodes) == 1 else None


def groups(root: str, selectors: list[Selector]) -> list[GroupDevice]:
    """The groups that have an endpoint a selector matches, by number. Healthy: the verdict has
    no blocking reason but its use by a container, and, once claimed, every endpoint is on
    vfio-pci."""
    from pcipass.host.model.usage import HostUse
    from pcipass.host.verdict.judge import judge_group

    host = Host(root)
    use = HostUse(host)  # the host's use (mounts, links, processes) scanned once for all groups
    journal = Context(root=root).journal
    out = []
    for g in host.groups():
        endpoints = [d for d in g.devices if not d.is_bridge]
        if not endpoints or not any(s.matches(d.vendor, d.device) for s in selectors for d in endpoints):
            continue
        record = journal.read(str(g.number))
        claimed = record is not None and record.target == VFIO and (record.op, record.state) == (CLAIM, DONE)
        verdict = judge_group(host, g.number, use=use)
        why = [r.message for r in verdict.blocking if r.code not in IN_USE_CODES]
        if claimed:
            why += [f"{d.name} is on {d.driver or 'no driver'}, not vfio-pci" for d in endpoints
                    if d.driver != "vfio-pci"]
        elif record is not None:
            why.append(f"group {g.number}: {record.op} {record.state}")
        functions = [Function(d.name, d.vendor, d.device, d.numa_node,
                              "vf" if d.physfn is not None else "pf" if d.virtfns else "none")
                     for d in endpoints]
        out.append(GroupDevice(str(g.number), g.number, functions, not why, claimed, why))
    return out


def _hex(n: int | None) -> str:
    return "" if n is None else f"0x{n:04x}"


def attributes(g: GroupDevice) -> dict[str, dict[str, object]]:
    """The device's attributes in a ResourceSlice (names in the driver's domain)."""
    first = g.functions[0]
    attrs: dict[str, dict[str, object]] = {
        "pciAddress": {"string": first.bdf},
        "vendorID": {"string": _hex(first.vendor)},
        "deviceID": {"string": _hex(first.device)},
        "iommuGroup": {"int": g.number},
        "functions": {"int": len(g.functions)},
        "sriov": {"string": first.role},
    }
    if g.numa is not None:
        attrs["numaNode"] = {"int": g.numa}
    joined = ",".join(g.bdfs)
    if len(joined) <= MAX_STRING_ATTRIBUTE:
        attrs["pciAddresses"] = {"string": joined}
    return attrs


def resource_slices(devices: list[GroupDevice], node: str, generation: int = 1) -> list[dict[str, object]]:
    """The ResourceSlices of this node's pool (named after the node): the healthy groups, 128
    to a slice."""
    healthy = [g for g in devices if g.healthy]
    chunks = [healthy[i:i + MAX_SLICE_DEVICES] for i in range(0, len(healthy), MAX_SLICE_DEVICES)] or [[]]
    out = []
    for i, chunk in enumerate(chunks):
        out.append({
            "apiVersion": RESOURCE_API,
            "kind": "ResourceSlice",
            "metadata": {"name": f"{node}-{DRIVER}-{i}".replace(".", "-").lower()},
            "spec": {
                "driver": DRIVER,
                "nodeName": node,
                "pool": {"name": node, "generation": generation, "resourceSliceCount": len(chunks)},
                "devices": [{"name": g.name, "attributes": attributes(g)} for g in chunk],
            },
        })
    return out
