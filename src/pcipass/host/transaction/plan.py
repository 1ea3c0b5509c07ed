"""Planning a claim, before anything changes: the target and its driver, the verdict's
refusal, the steps of the journal record (plan_claim), and the steps that give a group back
from the state it is in now (give_back_steps).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from pcipass.errors import NeedsRoot, PcipassError, UsageError
from pcipass.host.model.sysfs import Host, PciDevice, parse_bdf
from pcipass.host.transaction.journal import (
    CLAIM,
    IN_PROGRESS,
    SRIOV,
    DeviceRecord,
    Record,
    Step,
)
from pcipass.host.transaction.simulated import writer_for
from pcipass.host.transaction.writer import NOIOMMU_UNSUPPORTED, SysfsWriter

VFIO, XEN = "vfio", "xen"

# What each target binds to: the driver's name in sysfs and the module that provides it.
TARGET_DRIVER = {VFIO: "vfio-pci", XEN: "pciback"}

TARGET_MODULE = {VFIO: "vfio-pci", XEN: "xen-pciback"}

_QUIRK = re.compile(r"^[0-9a-fA-F]{1,3}:[124]:[0-9a-fA-F]{1,8}$")


def resolve_target(root: str, requested: str | None) -> str:
    if requested is None:
        return XEN if Host(root).xen_dom0 else VFIO
    if requested not in TARGET_DRIVER:
        raise UsageError(f"unknown target {requested!r}", hint="use --for vfio or --for xen")
    return requested


def require_root(what: str, root: str) -> None:
    """Changes to the real host need root; a synthetic --sysfs tree does not."""
    if os.path.abspath(root) == "/" and os.geteuid() != 0:
        raise NeedsRoot(what)

# Verdict codes that --unsafe-noiommu overrides (the verdict's other blocking codes always refuse).
NOIOMMU_CODES = frozenset({"iommu-off", "no-iommu-group"})


def refuse_by_verdict(host: Host, dev: PciDevice, unsafe_noiommu: bool) -> None:
    """Refuse, with the verdict's reasons and hints, what host-inventory's judge blocks:
    no IOMMU, a bridge, a device or group member the host is using (mounted, up, boot VGA)."""
    from pcipass.host.verdict.judge import judge

    blocking = [r for r in judge(host, dev.name).blocking
                if not (unsafe_noiommu and r.code in NOIOMMU_CODES)]
    if not blocking:
        return
    first = blocking[0]
    more = "" if len(blocking) == 1 else "; " + "; ".join(r.message for r in blocking[1:])
    hint = first.hint
    if first.code in NOIOMMU_CODES:
        hint += "; only for a trusted device, --unsafe-noiommu uses vfio's no-IOMMU mode instead"
    raise PcipassError(f"cannot claim {dev.name}: {first.message}{more}",
                       hint=f"{hint} (`pcipass check {dev.name}` explains)", code=first.code)


@dataclass


class Plan:
    """What a claim will do: the journal record before its first step."""

    record: Record
    notes: list[str] = field(default_factory=list)  # warnings
    advice: list[str] = field(default_factory=list)  # what the user should know (--owner's memlock)

    def lines(self) -> list[str]:
        r = self.record
        out = [f"claim IOMMU group {r.key} for {r.target} ({TARGET_DRIVER[r.target]}):"]
        for d in r.devices:
            what = "bridge, left alone" if d.is_bridge else f"{d.original_driver or 'no driver'}"
            out.append(f"  {d.bdf}  {what}")
        out += [f"  warning: {n}" for n in self.notes]
        out += [f"  note: {n}" for n in self.advice]
        if r.steps:
            out.append("steps:")
            out += [f"  {i}. {s.describe()}" for i, s in enumerate(r.steps, 1)]
        else:
            out.append("nothing to do: every endpoint is already bound to "
                       f"{TARGET_DRIVER[r.target]}")
        return out


def plan_claim(
    root: str,
    bdf: str,
    target: str,
    *,
    unsafe_noiommu: bool = False,
    permissive: bool = False,
    quirks: tuple[str, ...] = (),
    writer: SysfsWriter | None = None,
    owner: str | None = None,
    memlock: str | None = None,
    reset_method: str | None = None,
) -> Plan:
    """Check the claim may go ahead and list its steps; refuses with nothing changed.

    `owner` (USER[:GROUP]) gives the group's VFIO nodes to that user once bound;
    `memlock` (a size) is the guest memory that user will map, checked against its limit."""
    from pcipass.host.transaction import owner as owner_mod

    new_owner = owner_mod.parse_owner(owner) if owner else None
    if memlock and not new_owner:
        raise UsageError("--memlock goes with --owner", code="bad-owner",
                         hint="--memlock SIZE says how much guest memory the --owner user will map")
    need = owner_mod.parse_size(memlock) if memlock else None
    if new_owner and target != VFIO:
        raise UsageError("--owner is for vfio-pci's nodes", code="bad-owner",
                         hint="a Xen guest gets the device through xl as root; leave out --owner with --for xen")
    for q in quirks:
        if target != XEN or not _QUIRK.match(q):
            raise UsageError(f"bad --quirk {q!r}", code="bad-quirk",
                             hint="--quirk REG:SIZE:MASK in hex (SIZE 1, 2 or 4), e.g. e0:2:ff, with --for xen")
    host = Host(root)
    writer = writer or writer_for(root)
    dev = host.device(str(parse_bdf(bdf)))
    driver = TARGET_DRIVER[target]
    reset = _reset_methods(writer, dev.name, reset_method) if reset_method is not None else None
    notes: list[str] = []
    refuse_by_verdict(host, dev, unsafe_noiommu)
    noiommu_original = None
    prefix: list[Step] = []
    if (dev.iommu_group is None or not host.iommu.enabled) and target == XEN:
        # A Xen dom0: Xen owns the IOMMU and Linux sees no groups; xl and Xen check the
        # device's isolation when it is assigned, so the claim takes the device alone.
        members = [dev]
        key = f"xen-{dev.name}"
    elif dev.iommu_group is None or not host.iommu.enabled:
        if new_owner:
            raise UsageError("--owner in no-IOMMU mode", code="bad-owner",
                             hint="vfio's no-IOMMU groups need CAP_SYS_RAWIO, so an unprivileged user "
                             "cannot use them: turn the IOMMU on, or run the consumer as root")
        if writer.noiommu_supported() is False:
            # vfio-pci would refuse the device at probe time (EINVAL, no group): say why now.
            raise PcipassError(
                f"cannot claim {dev.name} in no-IOMMU mode: {NOIOMMU_UNSUPPORTED}",
                hint="turn the IOMMU on (`pcipass check` names the kernel argument), or boot a "
                "kernel built with CONFIG_VFIO_NOIOMMU=y", code="noiommu-unsupported")
        members = [dev]
        key = f"noiommu-{dev.name}"
        noiommu_original = writer.noiommu_mode() or "N"
        prefix.append(Step("noiommu", None, "Y"))
        notes.append("no IOMMU: vfio's unsafe no-IOMMU mode gives the device's user DMA to "
                     "all of host memory, and the kernel taints itself when vfio-pci takes the "
                     "device (TAINT_USER: 'U' in /proc/sys/kernel/tainted, until the next boot)")
    else:
        members = dev.group.devices if dev.group else [dev]
        key = str(dev.iommu_group)
    if not writer.has_driver(driver):
        prefix.append(Step("modprobe", None, TARGET_MODULE[target]))
    steps: list[Step] = []
    devices = []
    for m in members:
        rec = DeviceRecord(m.name, writer.driver(m.name), writer.override(m.name), m.is_bridge)
        devices.append(rec)
        if m.is_bridge or rec.original_driver == driver:
            continue
        rec.taken = True
        if target == XEN:
            rec.pciback_slot_added = True
            steps.append(Step("pciback-new-slot", m.name))
        steps.append(Step("override-set", m.name, driver))
        if rec.original_driver is not None:
            steps.append(Step("unbind", m.name, rec.original_driver))
        if target == XEN:
            steps.append(Step("bind", m.name, driver))
            if permissive:
                steps.append(Step("pciback-permissive", m.name))
            steps += [Step("pciback-quirk", m.name, q) for q in quirks]
        else:
            steps.append(Step("probe", m.name))
        steps.append(Step("expect", m.name, driver))
    if reset is not None:
        rec = next(d for d in devices if d.bdf == dev.name)
        rec.original_reset_method = writer.reset_method_now(dev.name)
        if reset != rec.original_reset_method:
            steps.append(Step("reset-method", dev.name, reset))
    advice: list[str] = []
    if new_owner:
        ids = f"{new_owner.uid}:{new_owner.gid} {new_owner.mode:o}"
        steps.append(Step("node-owner", None, f"/dev/vfio/{dev.iommu_group} {ids}"))
        steps += [Step("node-owner", m.name, f"cdev {ids}") for m in members if not m.is_bridge]
        memlock_notes, too_small = owner_mod.memlock_notes(root, new_owner, need)
        (notes if too_small else advice).extend(memlock_notes)
    if steps:
        steps = prefix + steps
    record = Record(key=key, group=dev.iommu_group, target=target, op=CLAIM, state=IN_PROGRESS,
                    devices=devices, steps=steps, noiommu_original=noiommu_original,
                    owner=str(new_owner) if new_owner else None)
    return Plan(record, notes, advice)


# The kernel's reset method names (drivers/pci/pci.c, pci_reset_fn_methods).
RESET_METHODS = ("device_specific", "acpi", "flr", "af_flr", "pm", "bus", "cxl_bus")


def _reset_methods(writer: SysfsWriter, bdf: str, asked: str) -> str:
    """claim --reset-method M[,M]: the text reset_method takes ("flr bus"), checked first."""
    now = writer.reset_method_now(bdf)
    if now is None:
        raise UsageError(f"{bdf} has no reset_method (Linux 5.15 and later have it)", code="bad-reset-method",
                         hint="leave out --reset-method; the kernel picks the reset")
    names = [m.strip() for m in asked.split(",") if m.strip()]
    bad = [m for m in names if m not in RESET_METHODS]
    if not names or bad or len(set(names)) != len(names):
        raise UsageError(f"--reset-method {asked!r}: " + (f"unknown {', '.join(bad)}" if bad else "name each method once"),
                         code="bad-reset-method",
                         hint=f"methods, in the order to try them, from {', '.join(RESET_METHODS)}; {bdf} has {now}")
    unsupported = [m for m in names if m not in now.split()]
    if unsupported:
        raise UsageError(f"{bdf} has no {', '.join(unsupported)} reset (it has {now})", code="bad-reset-method",
                         hint=f"choose among {now.replace(' ', ', ')}")
    return " ".join(names)


def give_back_steps(record: Record, writer: SysfsWriter, others: list[Record]) -> list[Step]:
    """The steps that put every device of `record` back as it was, from the state now."""
    if record.op == SRIOV:
        from pcipass.host.transaction.sriov import rollback_steps

        return rollback_steps(record, writer)
    # The nodes first: once the group's last device leaves vfio-pci the kernel removes them.
    steps: list[Step] = [Step("node-restore", None, f"{n.path} {n.uid}:{n.gid} {n.mode:o}")
                         for n in record.nodes]
    for d in record.devices:
        # Even on a device the claim did not move: it may have written its reset_method.
        if d.original_reset_method is not None and writer.reset_method_now(d.bdf) != d.original_reset_method:
            steps.append(Step("reset-method", d.bdf, d.original_reset_method))
        if d.is_bridge or not d.taken:
            continue
        now = writer.driver(d.bdf)
        if writer.override(d.bdf) is not None:
            steps.append(Step("override-set", d.bdf, None))
        if now != d.original_driver and now is not None:
            steps.append(Step("unbind", d.bdf, now))
        if d.pciback_slot_added:
            # Before the probe, or pciback would match its slot list and take it again.
            steps.append(Step("pciback-remove-slot", d.bdf))
        if now != d.original_driver and d.original_driver is not None:
            steps.append(Step("probe", d.bdf))
            steps.append(Step("bind", d.bdf, d.original_driver))
        steps.append(Step("expect", d.bdf, d.original_driver))
    still_noiommu = any(o.noiommu_original is not None for o in others if o.key != record.key)
    if record.noiommu_original is not None and not still_noiommu:
        steps.append(Step("noiommu", None, record.noiommu_original))
    return steps
