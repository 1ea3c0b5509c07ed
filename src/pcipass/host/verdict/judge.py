"""The verdict: can this device be passed through, and if not, why and what to do.

`judge(host, bdf)` runs every check over the model and returns a Verdict: a
list of Reasons, each with a stable code (docs/host.md), a severity and a hint.
`blocking` reasons are the ones `pcipass claim` refuses on; `warning` reasons
are consequences the user should know; `info` reasons explain.

The policy is the REASONS table (code -> severity, hint); the checks only find
facts and name the code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pcipass import pci
from pcipass.errors import PcipassError
from pcipass.host.model.sysfs import (
    ACPI_IOMMU_TABLES,
    Host,
    PciDevice,
    parse_bdf,
)
from pcipass.host.model.usage import HostUse
from pcipass.sysfs import STUB_DRIVERS, VFIO_DRIVERS, may_share_group

BLOCKING, WARNING, INFO = "blocking", "warning", "info"

# code -> (severity, hint). The hint says what to do; {placeholders} come from the reason's details.
REASONS: dict[str, tuple[str, str]] = {
    "unknown-bdf": (BLOCKING, "`pcipass list` shows every device and its address"),
    "iommu-off": (
        BLOCKING,
        "turn the IOMMU on: {how}; without an IOMMU a passed-through device can DMA anywhere "
        "in host memory",
    ),
    "xen-iommu-not-visible": (
        WARNING,
        "on a Xen dom0 the IOMMU belongs to Xen, so Linux shows none: check that `xl dmesg` says "
        "\"I/O virtualisation enabled\" (boot Xen with iommu=1); without it a guest given the device "
        "can DMA anywhere in host memory",
    ),
    "xen-iommu-on": (
        INFO,
        "Xen checks the device's isolation and maps its DMA when `xl create` or `xl pci-attach` "
        "assigns it",
    ),
    "xen-iommu-off": (
        BLOCKING,
        "boot Xen with iommu=1 (VT-d / AMD-Vi enabled in the firmware); without it a guest given "
        "the device can DMA anywhere in host memory",
    ),
    "no-iommu-group": (
        BLOCKING,
        "the IOMMU does not cover this device; check the firmware's DMAR/IVRS tables and dmesg "
        "for IOMMU errors",
    ),
    "system-device": (
        BLOCKING,
        "{kind} belongs to the host's chipset: the host needs it and a guest has no use for it; "
        "pass through a device a guest drives (a GPU, NIC, NVMe or USB controller)",
    ),
    "group-member-system-device": (
        BLOCKING,
        "the group holds {member}, {kind} the host needs, and a group goes to a guest whole: this "
        "device cannot be passed through where it sits (a card in a slot with a group of its own "
        "can; `pcipass groups` shows the groups)",
    ),
    "is-bridge": (
        BLOCKING,
        "a bridge or port is not passed through: pass through the endpoints below it "
        "({children})",
    ),
    "group-member-bound-to-host-driver": (
        WARNING,
        "the group is viable only when every member is on vfio-pci, pci-stub, no driver, or is a "
        "bridge: `pcipass claim` moves this one to vfio-pci too, so the host loses it",
    ),
    "group-member-in-use": (
        BLOCKING,
        "a member of the group is in use by the host ({what}); the whole group goes together, so "
        "stop using it first",
    ),
    "behind-pcie-to-pci-bridge": (
        INFO,
        "devices behind a PCIe-to-PCI bridge reach the IOMMU with the bridge's requester ID, so they "
        "can only be passed through together; put the card in a PCIe slot to isolate it",
    ),
    "upstream-port-without-acs": (
        WARNING,
        "port {port} lacks ACS {missing}: peer-to-peer traffic below it bypasses the IOMMU, so "
        "everything below it is one group; pass the whole group through, move the card to a port "
        "with ACS, or turn ACS on in the firmware",
    ),
    "multifunction-without-acs": (
        WARNING,
        "the functions of a multi-function device without ACS can reach each other, so they are one "
        "group; pass them through together",
    ),
    "acs-unknown": (
        INFO,
        "config space beyond 64 bytes needs root: run `sudo pcipass check` to read the ACS bits",
    ),
    "block-device-in-use": (
        BLOCKING,
        "unmount its filesystems, turn off swap on it and stop what holds it (LVM, RAID, dm-crypt) "
        "before passing it through",
    ),
    "netdev-up": (
        BLOCKING,
        "the host is using this network interface: move its traffic elsewhere, then `ip link set "
        "{iface} down` and remove its addresses",
    ),
    "netdev-up-no-address": (
        WARNING,
        "the interface is up but has no address or route; it goes away from the host when claimed",
    ),
    "boot-vga": (
        BLOCKING,
        "this is the boot display: the firmware and the host console use it; give the host another "
        "GPU (and video=efifb:off / no simplefb) before passing it through",
    ),
    "no-reset": (
        WARNING,
        "the device has no reset method the kernel can use, so state may leak between users; "
        "prefer a device with FLR",
    ),
    "bus-reset-affects-others": (
        WARNING,
        "the only reset is a secondary bus reset, which also resets {others}; pass those through "
        "together or expect them to be reset too",
    ),
    "sriov-vf": (
        INFO,
        "a virtual function: its physical function {physfn} stays on the host and its driver must "
        "stay loaded while the VF is used; with the PF on vfio-pci, the PF's user sets a VF token "
        "and whoever opens the VF gives it (QEMU: vf-token=UUID)",
    ),
    "sriov-pf-with-vfs": (
        WARNING,
        "this physical function has {numvfs} virtual functions enabled; disable them first "
        "(`pcipass sriov {pf} --vfs 0`) or pass through the VFs instead",
    ),
    "held-by-process": (
        BLOCKING,
        "stop it first (shut the VM down, stop `pcipass serve`, end the program): the kernel holds an "
        "unbind until the device's user lets go, and no other user can open the group meanwhile",
    ),
    "held-by-libvirt": (
        BLOCKING,
        "libvirt owns it while domain {domain} runs: `virsh destroy {domain}` or `virsh shutdown {domain}`; "
        "with managed='yes' libvirt gives it back to its host driver itself, and `virsh nodedev-reattach "
        "{nodedev}` does for one it left on vfio-pci. pcipass does not claim or release it meanwhile",
    ),
    "holders-unknown": (
        INFO,
        "the open files of {count} processes could not be read (another user's /proc/PID/fd needs root): "
        "run `sudo pcipass check` to see every holder",
    ),
    "bound-to-vfio": (INFO, "already bound to vfio-pci: ready for a VFIO user"),
    "bound-to-host-driver": (INFO, "`pcipass claim` unbinds it from {driver} and binds vfio-pci"),
}


@dataclass(frozen=True)
class Reason:
    code: str
    message: str
    device: str | None = None  # the BDF the reason is about (the target or a group member)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        return REASONS[self.code][0]

    @property
    def hint(self) -> str:
        template = REASONS[self.code][1]
        try:
            return template.format(**self.details)
        except (KeyError, IndexError):
            return template

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "device": self.device,
            "message": self.message,
            "hint": self.hint,
            "details": self.details,
        }


SEVERITY_ORDER = (BLOCKING, WARNING, INFO)


def most_important(reasons: list[Reason]) -> Reason | None:
    """The reason to show when only one fits: the most severe, and of those the one first in
    REASONS (its order puts what decides a verdict before its consequences)."""
    codes = list(REASONS)
    return min(reasons, key=lambda r: (SEVERITY_ORDER.index(r.severity), codes.index(r.code)), default=None)


@dataclass(frozen=True)
class Member:
    """One member of the target's group, and whether it keeps the group from being viable."""

    bdf: str
    driver: str | None
    role: str  # target | endpoint | bridge
    blocks: bool

    def to_json(self) -> dict[str, Any]:
        return {"bdf": self.bdf, "driver": self.driver, "role": self.role, "blocks": self.blocks}


@dataclass
class Verdict:
    bdf: str
    group: int | None = None
    members: list[Member] = field(default_factory=list)
    reset_methods: list[str] = field(default_factory=list)
    bus_reset_affects: list[str] = field(default_factory=list)  # what a bus reset would also hit
    reasons: list[Reason] = field(default_factory=list)
    sriov: dict[str, Any] = field(default_factory=lambda: {"physfn": None, "vfs": []})  # sriov_links

    @property
    def ok(self) -> bool:
        """No blocking reason: `pcipass claim` would go ahead."""
        return not self.blocking

    @property
    def blocking(self) -> list[Reason]:
        return [r for r in self.reasons if r.severity == BLOCKING]

    def codes(self) -> list[str]:
        return [r.code for r in self.reasons]

    def refuse(self) -> None:
        """Raise a PcipassError naming every blocking reason (for claim); no-op when ok."""
        if self.ok:
            return
        first = self.blocking[0]
        lines = "; ".join(f"{r.message} [{r.code}]" for r in self.blocking)
        raise PcipassError(f"{self.bdf} cannot be passed through: {lines}", hint=first.hint, code=first.code)

    def to_json(self) -> dict[str, Any]:
        return {
            "bdf": self.bdf,
            "ok": self.ok,
            "iommu_group": self.group,
            "members": [m.to_json() for m in self.members],
            "reset_methods": self.reset_methods,
            "bus_reset_affects": self.bus_reset_affects,
            "reasons": [r.to_json() for r in self.reasons],
            "sriov": self.sriov,
        }


def member_allowed(dev: PciDevice) -> bool:
    """The VFIO viability rule for one group member (pcipass.sysfs.may_share_group)."""
    return may_share_group(dev.driver, dev.is_bridge)


class _Context:
    """What the checks share: the host, the target, its group and the host's uses."""

    def __init__(self, host: Host, dev: PciDevice, use: HostUse) -> None:
        self.host = host
        self.dev = dev
        self.use = use
        group = dev.group
        self.members = group.devices if group is not None else [dev]
        self.endpoints = [d for d in self.members if not d.is_bridge]


Check = Callable[[_Context], Iterator[Reason]]


TO_CMDLINE = "in GRUB_CMDLINE_LINUX of /etc/default/grub, then update-grub"


def _iommu_on(host: Host) -> tuple[str | None, str]:
    """The kernel argument that turns this host's IOMMU on (None where the kernel needs
    none), and how to turn it on, in words."""
    # The firmware's IOMMU table decides which kind this host has (an emulated VT-d under QEMU's
    # TCG sits beside a CPU that says AuthenticAMD); without one, the CPU's vendor does.
    kind = next((ACPI_IOMMU_TABLES[t] for t in host.acpi_iommu_tables),
                "amd" if host.cpu_vendor == "AuthenticAMD" else "intel")
    if kind == "intel":
        return "intel_iommu=on", f"enable VT-d in the firmware and boot with intel_iommu=on ({TO_CMDLINE})"
    # Linux turns AMD-Vi on by itself when the firmware's IVRS table describes it; amd_iommu=
    # has no `on`, only ways to turn it off.
    return None, ("enable AMD-Vi (IOMMU) in the firmware; Linux turns it on by itself unless "
                  f"amd_iommu=off or iommu=off is given ({TO_CMDLINE} after removing them)")


def _check_iommu(c: _Context) -> Iterator[Reason]:
    state = c.host.iommu
    if not state.enabled and c.host.xen_dom0:
        xen = c.host.xen_iommu  # Xen's word (xl), not dom0's sysfs
        if xen is True:
            yield Reason("xen-iommu-on", "this is a Xen dom0 and Xen's IOMMU is on (xl dmesg/info)", None)
        elif xen is False:
            yield Reason("xen-iommu-off", "this is a Xen dom0 and Xen's IOMMU is off (xl dmesg/info)", None)
        else:
            yield Reason("xen-iommu-not-visible", "this is a Xen dom0: Linux sees no IOMMU, Xen may have one", None)
        return
    if state.enabled:
        if c.dev.iommu_group is None:
            yield Reason("no-iommu-group", f"{c.dev.name} is in no IOMMU group", c.dev.name)
        return
    arg, how = _iommu_on(c.host)
    why = []
    if not state.units:
        why.append("no IOMMU unit in /sys/class/iommu")
    if not state.groups:
        why.append("no IOMMU groups")
    if state.disabled_on_cmdline:
        why.append("turned off on the kernel command line (" + " ".join(state.cmdline) + ")")
    yield Reason(
        "iommu-off",
        "the IOMMU is off or absent (" + ", ".join(why) + "): a device passed through could DMA "
        "anywhere in host memory",
        None,
        {"kernel_arg": arg, "how": how, "units": list(state.units), "groups": state.groups,
         "cmdline": list(state.cmdline)},
    )


def _check_system(c: _Context) -> Iterator[Reason]:
    if c.dev.system_kind:
        yield Reason("system-device", f"{c.dev.name} is {c.dev.system_kind}, part of the host's chipset",
                     c.dev.name, {"kind": c.dev.system_kind})
    for m in c.members:
        if m != c.dev and m.system_kind:
            yield Reason("group-member-system-device",
                         f"group {c.dev.iommu_group} member {m.name} is {m.system_kind}, part of the host's chipset",
                         m.name, {"member": m.name, "kind": m.system_kind})


def _check_bridge(c: _Context) -> Iterator[Reason]:
    if c.dev.is_bridge:
        children = ", ".join(d.name for d in c.dev.children) or "none"
        yield Reason("is-bridge", f"{c.dev.name} is a bridge (below it: {children})", c.dev.name,
                     {"children": children})


def _check_driver(c: _Context) -> Iterator[Reason]:
    if c.dev.is_bridge:
        return
    if c.dev.driver in VFIO_DRIVERS:
        yield Reason("bound-to-vfio", f"{c.dev.name} is bound to {c.dev.driver}", c.dev.name)
    elif c.dev.driver and c.dev.driver not in STUB_DRIVERS:
        yield Reason("bound-to-host-driver", f"{c.dev.name} is bound to {c.dev.driver}", c.dev.name,
                     {"driver": c.dev.driver})


def _check_members(c: _Context) -> Iterator[Reason]:
    for m in c.members:
        if m == c.dev or member_allowed(m):
            continue
        yield Reason(
            "group-member-bound-to-host-driver",
            f"group {c.dev.iommu_group} member {m.name} is bound to host driver {m.driver}",
            m.name,
            {"driver": m.driver},
        )


def _check_isolation(c: _Context) -> Iterator[Reason]:
    """Why the group is bigger than the device: name the bridge or the port and its ACS bits."""
    if len(c.members) < 2:
        return
    step = c.dev
    for up in c.dev.upstream:
        # Known from config space (as root), or seen as the step from conventional PCI up to PCIe.
        if up.express_type == pci.PCI_EXP_TYPE_PCI_BRIDGE or (up.is_pcie and not step.is_pcie) or (
            up.is_bridge and not up.is_pcie and up.config_complete
        ):
            yield Reason(
                "behind-pcie-to-pci-bridge",
                f"{c.dev.name} is behind the PCIe-to-PCI bridge {up.name}, which shares its group",
                up.name,
                {"bridge": up.name},
            )
            break
        step = up
    unknown = [d.name for d in [c.dev, *c.dev.upstream] if not d.config_complete]
    if unknown:
        yield Reason("acs-unknown", "the ACS capabilities of " + ", ".join(unknown) + " could not be read",
                     unknown[0], {"devices": unknown})
    others = [d for d in c.endpoints if d != c.dev]
    for up in c.dev.upstream:
        if up.express_type not in (pci.PCI_EXP_TYPE_ROOT_PORT, pci.PCI_EXP_TYPE_DOWNSTREAM):
            continue
        missing = list(pci.ACS_REQUIRED) if up.acs is None else up.acs.missing()
        # Without ACS here, peer traffic can turn around at this port's switch, before the IOMMU.
        below = [d.name for d in others]
        if missing and below and up.config_complete:
            what = "no ACS capability" if up.acs is None else "ACS without " + " ".join(missing)
            yield Reason(
                "upstream-port-without-acs",
                f"upstream port {up.name} has {what}, so {', '.join(below)} share the group",
                up.name,
                {"port": up.name, "missing": " ".join(missing), "shared_with": below},
            )
    # The kernel treats a conventional PCI function as having no ACS at all.
    if c.dev.is_multifunction and c.dev.config_complete and not c.dev.is_bridge:
        missing = list(pci.ACS_REQUIRED) if c.dev.acs is None else c.dev.acs.missing()
        siblings = [d.name for d in others if d.bdf.slot == c.dev.bdf.slot]
        if missing and siblings:
            yield Reason(
                "multifunction-without-acs",
                f"{c.dev.name} is a multi-function device without ACS ({' '.join(missing)} missing); "
                f"{', '.join(siblings)} share the group",
                c.dev.name,
                {"functions": siblings, "missing": " ".join(missing)},
            )


def _check_in_use(c: _Context) -> Iterator[Reason]:
    # The whole group leaves the host, so every endpoint in it is checked.
    for d in c.endpoints:
        own = d == c.dev
        for disk in c.use.block.get(d.name, []):
            if disk.in_use:
                if own:
                    yield Reason("block-device-in-use", f"{d.name} has {disk.describe()}", d.name,
                                 {"disk": disk.disk, "mounts": disk.mounts, "holders": disk.holders, "swaps": disk.swaps})
                else:
                    yield Reason("group-member-in-use", f"group member {d.name} has {disk.describe()}", d.name,
                                 {"what": disk.describe()})
        for iface in c.use.net.get(d.name, []):
            if iface.in_use:
                if own:
                    yield Reason("netdev-up", f"{d.name}: {iface.describe()}", d.name,
                                 {"iface": iface.name, "addresses": iface.addresses, "routes": iface.routes})
                else:
                    yield Reason("group-member-in-use", f"group member {d.name}: {iface.describe()}", d.name,
                                 {"what": iface.describe()})
            elif iface.up and own:
                yield Reason("netdev-up-no-address", f"{d.name}: {iface.describe()}", d.name,
                             {"iface": iface.name})
        if d.boot_vga:
            if own:
                yield Reason("boot-vga", f"{d.name} is the boot VGA device", d.name)
            else:
                yield Reason("group-member-in-use", f"group member {d.name} is the boot VGA device", d.name,
                             {"what": "the boot display"})


def _check_reset(c: _Context) -> Iterator[Reason]:
    if c.dev.is_bridge:
        return
    methods = [m for m in c.dev.reset_methods if m != "unknown"]
    if not methods:
        yield Reason("no-reset", f"{c.dev.name} has no reset method", c.dev.name)
        return
    hit = bus_reset_affects(c.host, c.dev)
    if methods[0] == "bus" and c.dev.parent is not None:
        if hit:
            yield Reason(
                "bus-reset-affects-others",
                f"a bus reset of {c.dev.name} (through {c.dev.parent.name}) also resets {', '.join(hit)}",
                c.dev.name,
                {"bridge": c.dev.parent.name, "others": ", ".join(hit), "devices": hit},
            )


def bus_reset_affects(host: Host, dev: PciDevice) -> list[str]:
    """Everything a secondary bus reset through `dev`'s parent bridge would also reset."""
    if "bus" not in dev.reset_methods or dev.parent is None:
        return []
    return [d.name for d in host.devices() if d != dev and dev.parent in d.upstream]


def sriov_links(dev: PciDevice) -> dict[str, Any]:
    """The device's SR-IOV links, each end with its driver and IOMMU group: its physical
    function (a VF), its virtual functions (a PF)."""
    def end(d: PciDevice) -> dict[str, Any]:
        return {"bdf": d.name, "driver": d.driver, "iommu_group": d.iommu_group}

    pf = dev.physfn
    return {"physfn": end(pf) if pf is not None else None, "vfs": [end(v) for v in dev.virtfns]}


def _check_sriov(c: _Context) -> Iterator[Reason]:
    pf = c.dev.physfn
    if pf is not None:
        token = pf.driver == "vfio-pci"
        yield Reason("sriov-vf", f"{c.dev.name} is a virtual function of {pf.name} (on {pf.driver or 'no driver'}, "
                     f"IOMMU group {pf.iommu_group})" + ("; a VF token is needed to open it" if token else ""),
                     c.dev.name,
                     {"physfn": pf.name, "physfn_driver": pf.driver, "physfn_group": pf.iommu_group,
                      "vf_token": token})
    vfs = c.dev.virtfns
    if vfs:
        yield Reason("sriov-pf-with-vfs", f"{c.dev.name} has {len(vfs)} virtual functions enabled", c.dev.name,
                     {"numvfs": len(vfs), "virtfns": [v.name for v in vfs],
                      "groups": [v.iommu_group for v in vfs], "pf": c.dev.name})


def _check_holders(c: _Context) -> Iterator[Reason]:
    """Who holds the group now: a process through VFIO or a mapped BAR, a libvirt domain."""
    from pcipass.host.model.holders import held, nodedev_name

    found = held(c.use.holders, [d.name for d in c.endpoints])
    domains = set()
    for dom, bdf, managed in found.libvirt:
        domains.add(dom.name)
        yield Reason("held-by-libvirt", f"libvirt domain {dom.name}" + (f" (pid {dom.pid})" if dom.pid else "")
                     + f" has {bdf} as a hostdev (managed='{'yes' if managed else 'no'}')", bdf,
                     {"domain": dom.name, "pid": dom.pid, "managed": managed, "nodedev": nodedev_name(bdf),
                      "status_xml": dom.path})
    for h in found.processes:
        if h.libvirt_domain and h.libvirt_domain not in domains:
            domains.add(h.libvirt_domain)
            yield Reason("held-by-libvirt", f"a QEMU libvirt started for domain {h.libvirt_domain}: "
                         f"{h.describe()}", c.dev.name,
                         {"domain": h.libvirt_domain, "pid": h.pid, "managed": None,
                          "nodedev": nodedev_name(c.dev.name), "status_xml": None})
        elif not h.libvirt_domain:
            yield Reason("held-by-process", h.describe(), c.dev.name, h.to_json())
    if c.use.holders.unreadable and any(d.driver == "vfio-pci" for d in c.endpoints):
        yield Reason("holders-unknown", f"the open files of {len(c.use.holders.unreadable)} processes "
                     "could not be read", None, {"count": len(c.use.holders.unreadable)})


CHECKS: tuple[Check, ...] = (
    _check_iommu,
    _check_system,
    _check_bridge,
    _check_driver,
    _check_members,
    _check_isolation,
    _check_in_use,
    _check_reset,
    _check_sriov,
    _check_holders,
)


def judge(host: Host, bdf: str, *, use: HostUse | None = None) -> Verdict:
    """The verdict for one device. A malformed address raises UsageError; an unknown one is a reason."""
    name = str(parse_bdf(bdf))
    dev = host.device_or_none(name)
    if dev is None:
        return Verdict(name, reasons=[Reason("unknown-bdf", f"no PCI device {name}", name)])
    c = _Context(host, dev, use or HostUse(host))
    verdict = Verdict(name, dev.iommu_group, reset_methods=list(dev.reset_methods),
                      bus_reset_affects=bus_reset_affects(host, dev), sriov=sriov_links(dev))
    for m in c.members:
        role = "target" if m == dev else ("bridge" if m.is_bridge else "endpoint")
        verdict.members.append(Member(m.name, m.driver, role, m != dev and not member_allowed(m)))
    for check in CHECKS:
        verdict.reasons.extend(check(c))
    return verdict


def judge_group(host: Host, number: int, *, use: HostUse | None = None) -> Verdict:
    """The verdict for a group: every endpoint's blocking reasons, once each (for `pcipass groups`)."""
    use = use or HostUse(host)
    group = host.group(number)
    endpoints = [d for d in group.devices if not d.is_bridge] or group.devices
    if not endpoints:
        return Verdict(f"group {number}", number)
    merged = Verdict(f"group {number}", number)
    merged.members = [
        Member(m.name, m.driver, "bridge" if m.is_bridge else "endpoint", not member_allowed(m)) for m in group.devices
    ]
    seen = set()
    for d in endpoints:
        v = judge(host, d.name, use=use)
        for r in v.reasons:
            if r.code in ("group-member-bound-to-host-driver", "group-member-in-use", "group-member-system-device",
                          "bound-to-host-driver", "bound-to-vfio"):
                continue  # each endpoint's own reasons already cover these
            key = (r.code, r.device)
            if key not in seen:
                seen.add(key)
                merged.reasons.append(r)
    return merged
