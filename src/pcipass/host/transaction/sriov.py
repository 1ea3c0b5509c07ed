"""Create and remove SR-IOV virtual functions, journaled like a claim.

`pcipass sriov PF --vfs N` writes the physical function's `sriov_numvfs`, as the kernel wants
it: a count other than the current one needs 0 first (the kernel refuses one non-zero count
over another with EBUSY), and never more than `sriov_totalvfs`. `--autoprobe on|off` sets
`sriov_drivers_autoprobe` first, which decides whether the new VFs are probed by their driver
(igbvf, iavf, ...) or left on none, ready for vfio-pci.

The journal (key `sriov-<PF>`) holds the PF's count and autoprobe setting as they were, and
the steps, before the first write. When a step fails, or after a crash `recover` finds the
record, the PF is driven back to what the journal names (`rollback_steps`): its VFs are
removed, the autoprobe setting is put back, and the original count is created again. On
success the journal is removed: the VFs are the host's new state, not a binding to give back.

Refused with nothing changed: a VF named instead of its PF, a device without SR-IOV, more
VFs than sriov_totalvfs, a PF with no driver (the kernel creates VFs through the PF's driver),
a PF on vfio-pci without `enable_sriov`, and, when VFs would be removed, any VF in use:
claimed by pcipass, bound to a pass-through driver by someone else, held by a process or a
libvirt domain, or used by the host (an interface up with addresses, a mounted disk).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from pcipass.errors import PcipassError, UsageError
from pcipass.host.model.sysfs import Host, PciDevice, parse_bdf
from pcipass.host.transaction.journal import (
    IN_PROGRESS,
    SRIOV,
    DeviceRecord,
    Record,
    SriovRecord,
    Step,
)
from pcipass.host.transaction.writer import SysfsWriter
from pcipass.sysfs import PASS_THROUGH_DRIVERS

# What the host's use of a VF looks like in a verdict: each one refuses removing the VF.
IN_USE_CODES = frozenset({
    "block-device-in-use", "netdev-up", "boot-vga", "group-member-in-use",
    "held-by-process", "held-by-libvirt",
})

AUTOPROBE = {"on": "1", "off": "0"}
VFIO_ENABLE_SRIOV = "sys/module/vfio_pci/parameters/enable_sriov"


def key_for(pf: str) -> str:
    return f"sriov-{pf}"


@dataclass
class SriovPlan:
    """What `pcipass sriov` will do: the record before its first step, and the PF as it is."""

    record: Record
    pf: str
    numvfs: int  # now
    want: int
    totalvfs: int
    autoprobe: str | None  # now ("1"/"0"), None where the kernel has no such attribute
    vfs: list[str] = field(default_factory=list)  # the VFs now

    def lines(self) -> list[str]:
        out = [f"{self.pf}: {self.numvfs} VFs now, {self.want} wanted (at most {self.totalvfs})"]
        if self.record.steps:
            out.append("steps:")
            out += [f"  {i}. {s.describe()}" for i, s in enumerate(self.record.steps, 1)]
        else:
            out.append("nothing to do")
        return out


def _refuse(message: str, hint: str, code: str) -> PcipassError:
    return PcipassError(message, hint=hint, code=code)


def vfs_in_use(host: Host, pf: PciDevice, records: list[Record]) -> list[tuple[str, str, str]]:
    """(VF, what uses it, hint) for every VF of `pf` something uses."""
    from pcipass.host.model.usage import HostUse
    from pcipass.host.verdict.judge import judge

    claimed = {d.bdf: r for r in records if r.op != SRIOV for d in r.devices if d.taken}
    found: list[tuple[str, str, str]] = []
    use = HostUse(host) if pf.virtfns else None
    for vf in pf.virtfns:
        if vf.name in claimed:
            r = claimed[vf.name]
            found.append((vf.name, f"claimed by pcipass (IOMMU group {r.key}, for {r.target})",
                          f"`pcipass release {vf.name}` gives it back first"))
            continue
        # A PF on vfio-pci gives its VFs to vfio-pci itself (driver_override): they are the PF's.
        if vf.driver in PASS_THROUGH_DRIVERS and not (vf.driver == "vfio-pci" and pf.driver == "vfio-pci"):
            found.append((vf.name, f"on {vf.driver}, which pcipass did not bind (a consumer's: libvirt?)",
                          f"stop its consumer and give it back (`virsh nodedev-reattach`, or unbind it from {vf.driver})"))
            continue
        for reason in judge(host, vf.name, use=use).blocking:
            if reason.code in IN_USE_CODES:
                found.append((vf.name, reason.message, reason.hint))
    return found


def plan_sriov(root: str, bdf: str, want: int, *, autoprobe: str | None = None,
               writer: SysfsWriter, records: list[Record]) -> SriovPlan:
    """Check the change may go ahead and list its steps; refuses with nothing changed."""
    if want < 0:
        raise UsageError(f"--vfs {want}: a count of VFs is 0 or more", code="bad-vfs",
                         hint="--vfs 0 removes every VF")
    if autoprobe is not None and autoprobe not in AUTOPROBE:
        raise UsageError(f"--autoprobe {autoprobe!r}", code="bad-vfs", hint="--autoprobe on or --autoprobe off")
    host = Host(root)
    dev = host.device(str(parse_bdf(bdf)))
    if dev.physfn is not None:
        raise _refuse(f"{dev.name} is a virtual function of {dev.physfn.name}: VFs are made by their "
                      "physical function", f"pcipass sriov {dev.physfn.name} --vfs N", "sriov-is-vf")
    total = dev.sriov_totalvfs
    current = dev.sriov_numvfs
    if total is None or current is None:
        raise _refuse(f"{dev.name} has no SR-IOV (no sriov_totalvfs: the device lacks the capability, "
                      "or the kernel was built without CONFIG_PCI_IOV)",
                      "`pcipass list` shows which devices have VFs (the sriov fields)", "not-sriov")
    if want > total:
        raise _refuse(f"{dev.name} has at most {total} VFs (sriov_totalvfs), not {want}",
                      f"ask for {total} or fewer", "too-many-vfs")
    driver = writer.driver(dev.name)
    changes_count = want != current
    if changes_count and driver is None:
        raise _refuse(f"{dev.name} is on no driver: the kernel creates and removes VFs through the "
                      "physical function's driver", f"bind {dev.name} to its driver first "
                      "(`pcipass status` says whether pcipass holds it)", "sriov-no-driver")
    if changes_count and driver == "vfio-pci" and writer.read(VFIO_ENABLE_SRIOV) != "Y":
        raise _refuse(f"{dev.name} is on vfio-pci, which creates VFs only when loaded with enable_sriov=1",
                      "reload it: `modprobe -r vfio-pci && modprobe vfio-pci enable_sriov=1` (with nothing "
                      "on vfio-pci), or echo Y > /sys/module/vfio_pci/parameters/enable_sriov",
                      "sriov-vfio-disabled")
    if changes_count and current > 0:
        busy = vfs_in_use(host, dev, records)
        if busy:
            what = "; ".join(f"{vf} is {how}" for vf, how, _ in busy)
            raise _refuse(f"cannot change the VFs of {dev.name}: {what}", busy[0][2], "vf-in-use")
    now_autoprobe = writer.sriov_autoprobe_now(dev.name)
    steps: list[Step] = []
    new_autoprobe = AUTOPROBE.get(autoprobe or "")
    if new_autoprobe is not None and new_autoprobe != now_autoprobe:
        if now_autoprobe is None:
            raise _refuse(f"{dev.name} has no sriov_drivers_autoprobe (Linux 4.12 and later have it)",
                          "leave out --autoprobe", "not-sriov")
        steps.append(Step("sriov-autoprobe", dev.name, new_autoprobe))
    if changes_count and current > 0 and want > 0:
        steps.append(Step("sriov-numvfs", dev.name, "0"))  # the kernel needs 0 between two counts
    if changes_count:
        steps.append(Step("sriov-numvfs", dev.name, str(want)))
    record = Record(key=key_for(dev.name), group=dev.iommu_group, target=SRIOV, op=SRIOV, state=IN_PROGRESS,
                    devices=[DeviceRecord(dev.name, driver, writer.override(dev.name))], steps=steps,
                    sriov=SriovRecord(dev.name, current, now_autoprobe, want))
    return SriovPlan(record, dev.name, current, want, total, now_autoprobe, [v.name for v in dev.virtfns])


def rollback_steps(record: Record, writer: SysfsWriter) -> list[Step]:
    """The steps that put the PF back as the journal names it, from the state it is in now."""
    s = record.sriov
    assert s is not None
    now = writer.numvfs(s.pf)
    steps: list[Step] = []
    if now is not None and now != s.numvfs and now != 0:
        steps.append(Step("sriov-numvfs", s.pf, "0"))
    if s.autoprobe is not None and writer.sriov_autoprobe_now(s.pf) != s.autoprobe:
        steps.append(Step("sriov-autoprobe", s.pf, s.autoprobe))
    if now != s.numvfs and s.numvfs != 0:
        steps.append(Step("sriov-numvfs", s.pf, str(s.numvfs)))
    return steps


def explain_failure(exc: OSError, pf: str, driver: str | None) -> str:
    """What the kernel's errno means for a write of sriov_numvfs."""
    if exc.errno == errno.ENOENT:
        return (f"{driver or 'its driver'} does not create VFs through sysfs (it has no "
                "sriov_configure; dmesg says so)")
    if exc.errno == errno.EBUSY:
        return "VFs are already enabled (the kernel wants 0 first)"
    if exc.errno == errno.ERANGE:
        return "more VFs than sriov_totalvfs"
    return exc.strerror or str(exc)
