"""The consumer's configuration for devices to pass through: xl, QEMU, libvirt.

Functions of one multi-function device stay together: they get one guest slot
and keep their function numbers (renumbered from 0 when function 0 is not
among them, since a guest only scans a slot whose function 0 exists), with
multifunction=on on the first. xl cannot pass a subset of a multi-function
device: it takes `BB:SS.*`, so several functions of one slot must be all of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from pcipass.errors import UsageError
from pcipass.host.model.sysfs import Bdf, Host, parse_bdf

RDM_POLICIES = ("strict", "relaxed")


@dataclass(frozen=True)
class Placement:
    """One host function and where it goes in the guest."""

    host: Bdf
    slot: int  # guest slot (device number) on the guest bus
    function: int  # guest function
    multifunction: bool  # set on the first function of a slot that holds several


def _slots(bdfs: Sequence[str]) -> list[list[Bdf]]:
    """The devices grouped by host slot, in the order first named; duplicates refused."""
    groups: dict[str, list[Bdf]] = {}
    seen = set()
    for text in bdfs:
        b = parse_bdf(text)
        if b in seen:
            raise UsageError(f"{b} is named twice", hint="name each function once")
        seen.add(b)
        groups.setdefault(b.slot, []).append(b)
    return [sorted(g) for g in groups.values()]


def place(bdfs: Sequence[str], first_slot: int) -> list[Placement]:
    """Give each host slot a guest slot from `first_slot` on, functions kept together."""
    if not bdfs:
        raise UsageError("no devices named", hint="name one or more BDFs, e.g. 0000:02:0d.0 0000:02:0d.1")
    out = []
    for i, funcs in enumerate(_slots(bdfs)):
        slot = first_slot + i
        if slot > 0x1F:
            raise UsageError(f"guest slot {slot:#x} is past the last slot 0x1f",
                             hint="use a lower --slot, or fewer devices")
        keep = any(f.function == 0 for f in funcs)
        for n, f in enumerate(funcs):
            out.append(Placement(f, slot, f.function if keep else n, len(funcs) > 1 and n == 0))
    return out


def _bool(flag: bool | None) -> str | None:
    return None if flag is None else ("1" if flag else "0")


def xl(bdfs: Sequence[str], *, host: Host | None = None, vslot: int | None = None,
       permissive: bool | None = None, msitranslate: bool | None = None, seize: bool | None = None,
       power_mgmt: bool | None = None, rdm_policy: str | None = None) -> str:
    """The xl.cfg `pci = [...]` line (xl-pci-configuration(5) PCI_SPEC_STRINGs)."""
    if rdm_policy is not None and rdm_policy not in RDM_POLICIES:
        raise UsageError(f"rdm_policy {rdm_policy!r}", hint="rdm_policy is strict or relaxed")
    specs = []
    for i, funcs in enumerate(_slots(bdfs)):
        if len(funcs) > 1:
            if host is not None:
                present = sorted(d.bdf for d in host.devices() if d.bdf.slot == funcs[0].slot)
                if present != funcs:
                    raise UsageError(
                        f"xl passes a multi-function device whole: {funcs[0].slot} has "
                        f"{', '.join(str(p) for p in present)}",
                        hint=f"name every function of {funcs[0].slot}, or just one")
            bdf = f"{funcs[0].slot}.*"
        else:
            bdf = str(funcs[0])
        opts = [bdf]
        if vslot is not None:
            opts.append(f"vslot={vslot + i:x}")  # hex, as xl reads it
        for key, value in (("permissive", _bool(permissive)), ("msitranslate", _bool(msitranslate)),
                           ("seize", _bool(seize)), ("power_mgmt", _bool(power_mgmt)),
                           ("rdm_policy", rdm_policy)):
            if value is not None:
                opts.append(f"{key}={value}")
        specs.append("'" + ",".join(opts) + "'")
    return f"pci = [ {', '.join(specs)} ]"


def qemu(bdfs: Sequence[str], *, bus: str = "pcie.0", first_slot: int = 0x10,
         id_prefix: str = "hostdev", vf_tokens: Mapping[str, str] | None = None) -> list[str]:
    """QEMU arguments: `-device vfio-pci,host=...` per function, multi-function kept together.
    `vf_tokens`: host BDF -> the VF token (a UUID) QEMU opens it with (`vf-token=`)."""
    if not re.fullmatch(r"[A-Za-z][\w.\-]*", bus):
        raise UsageError(f"{bus!r} is not a QEMU bus id", hint="e.g. pcie.0 (q35) or pci.0 (i440fx)")
    args = []
    for n, p in enumerate(place(bdfs, first_slot)):
        opts = [f"host={p.host}", f"id={id_prefix}{n}", f"bus={bus}", f"addr={p.slot:#04x}.{p.function}"]
        if p.multifunction:
            opts.append("multifunction=on")
        token = (vf_tokens or {}).get(str(p.host))
        if token:
            opts.append(f"vf-token={token}")
        args += ["-device", "vfio-pci," + ",".join(opts)]
    return args


def vf_token_needed(host: Host, bdfs: Sequence[str]) -> list[str]:
    """The named devices vfio-pci opens only with a VF token: a VF whose PF is on vfio-pci,
    and a PF on vfio-pci with VFs (while they are open)."""
    out = []
    for b in bdfs:
        dev = host.device(b)
        pf = dev.physfn
        if (pf is not None and pf.driver == "vfio-pci") or (dev.driver == "vfio-pci" and dev.virtfns):
            out.append(dev.name)
    return out


def vf_token_arg(value: str) -> str:
    """--vf-token's value: a UUID, as vfio-pci parses it."""
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise UsageError(f"--vf-token {value!r} is not a UUID", code="bad-vf-token",
                         hint="the token the PF's user set, e.g. 5b2a8a9e-1c77-4a3c-9d3e-6a1f0b7e2c44") from None


def vfio_warnings(host: Host, bdfs: Sequence[str], config_command: str = "pcipass config qemu") -> list[str]:
    """Why the named devices are not ready for a VFIO consumer, each with the command that fixes it:
    a device not on vfio-pci (QEMU cannot open it), a group only partly named (the VM gets
    part of what was taken with it). Empty when all is well."""
    from pcipass.host.transaction.plan import TARGET_DRIVER, VFIO, XEN

    named = [host.device(b) for b in bdfs]
    out = []
    groups_told: set[int] = set()  # one claim takes a whole group: one warning for it
    for dev in named:
        if dev.driver == TARGET_DRIVER[VFIO] or dev.iommu_group in groups_told:
            continue
        if dev.iommu_group is not None:
            groups_told.add(dev.iommu_group)
        if dev.driver == TARGET_DRIVER[XEN]:
            out.append(f"{dev.bdf} is claimed for Xen ({dev.driver}), not VFIO: run pcipass release {dev.bdf} "
                       f"&& pcipass claim {dev.bdf} --for vfio")
        else:
            out.append(f"{dev.bdf} is not claimed ({f'driver {dev.driver}' if dev.driver else 'no driver'}, not {TARGET_DRIVER[VFIO]}): "
                       f"QEMU cannot open it; run pcipass claim {dev.bdf}")
    names = {d.bdf for d in named}
    partial = {}  # group -> its members that are not named (bridges stay on the host)
    for dev in named:
        if dev.group is not None:
            rest = [m.bdf for m in dev.group.devices if not m.is_bridge and m.bdf not in names]
            if rest:
                partial[dev.group.number] = rest
    if partial:
        whole = " ".join(str(b) for b in [*(d.bdf for d in named), *(b for rest in partial.values() for b in rest)])
        for number, rest in partial.items():
            out.append(f"the VM gets only part of IOMMU group {number}: {', '.join(map(str, rest))} "
                       f"{'is' if len(rest) == 1 else 'are'} not named")
        out.append(f"to give it the whole group{'s' if len(partial) > 1 else ''}: {config_command} {whole}")
    return out


def libvirt(bdfs: Sequence[str], *, managed: bool = True, driver: str = "vfio", first_slot: int = 0x10,
            guest_bus: int = 0) -> str:
    """<hostdev mode='subsystem' type='pci'> elements, one per function."""
    if driver not in ("vfio", "xen"):
        raise UsageError(f"libvirt driver {driver!r}", hint="vfio (KVM/QEMU) or xen")
    out = []
    for p in place(bdfs, first_slot):
        h = p.host
        mf = " multifunction='on'" if p.multifunction else ""
        out.append(
            f"<hostdev mode='subsystem' type='pci' managed='{'yes' if managed else 'no'}'>\n"
            f"  <driver name='{driver}'/>\n"
            f"  <source>\n"
            f"    <address domain='0x{h.domain:04x}' bus='0x{h.bus:02x}' slot='0x{h.device:02x}' "
            f"function='0x{h.function:x}'/>\n"
            f"  </source>\n"
            f"  <address type='pci' domain='0x0000' bus='0x{guest_bus:02x}' slot='0x{p.slot:02x}' "
            f"function='0x{p.function:x}'{mf}/>\n"
            f"</hostdev>\n")
    return "".join(out)


DOMAIN_TYPES = ("kvm", "qemu", "xen")


def libvirt_domain(hostdevs: str, name: str = "pcipass-guest", kind: str = "kvm", *, memory_mib: int = 512,
                   kernel: str | None = None, initrd: str | None = None, cmdline: str | None = None,
                   console_log: str | None = None) -> str:
    """A whole <domain> around `hostdevs` that `virsh define` takes: q35, one vCPU, a serial
    console (a pty, or the file `console_log`), no USB controller or balloon to share the guest's
    PCI bus with, and a direct kernel boot when `kernel` is given (libvirt wants absolute paths)."""
    if kind not in DOMAIN_TYPES:
        raise UsageError(f"libvirt domain type {kind!r}", hint="kvm, qemu (TCG: no KVM) or xen")
    if memory_mib < 1:
        raise UsageError(f"guest memory {memory_mib} MiB", hint="give the guest's memory in MiB, e.g. 512")
    if kernel is None and (initrd is not None or cmdline is not None):
        raise UsageError("an initrd or a kernel command line without a kernel",
                         hint="add --kernel PATH (direct kernel boot), or drop --initrd and --cmdline")
    for path in (kernel, initrd, console_log):
        if path is not None and not path.startswith("/"):
            raise UsageError(f"{path} is not an absolute path", hint="libvirt resolves no relative paths: "
                             "give the whole path")
    boot = "".join(f"    <{tag}>{escape(value)}</{tag}>\n"
                   for tag, value in (("kernel", kernel), ("initrd", initrd), ("cmdline", cmdline))
                   if value is not None)
    serial = ("<serial type='pty'/>" if console_log is None
              else f"<serial type='file'>\n      <source path={quoteattr(console_log)}/>\n    </serial>")
    body = "".join(f"    {line}\n" for line in hostdevs.splitlines())
    return (f"<domain type={quoteattr(kind)}>\n"
            f"  <name>{escape(name)}</name>\n"
            f"  <memory unit='MiB'>{memory_mib}</memory>\n"
            f"  <vcpu>1</vcpu>\n"
            f"  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n{boot}  </os>\n"
            f"  <features>\n    <acpi/>\n  </features>\n"
            f"  <devices>\n"
            f"    {serial}\n"
            f"    <controller type='usb' model='none'/>\n"
            f"    <memballoon model='none'/>\n"
            f"{body}  </devices>\n"
            f"</domain>\n")
