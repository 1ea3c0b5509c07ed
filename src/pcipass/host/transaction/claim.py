"""Seize an IOMMU group for pass-through and give it back, crash-safe.

A claim takes every endpoint of the group (bridges are left alone) from its
host driver to vfio-pci, or on a Xen dom0 to xen-pciback ("pciback"):

    vfio:  driver_override=vfio-pci, unbind, drivers_probe, check it is bound
    xen:   pciback/new_slot, driver_override=pciback, unbind, pciback/bind,
           [pciback/permissive], [pciback/quirks], check it is bound

Every step is in the journal (pcipass.host.transaction.journal) before the first change,
with each device's original driver and driver_override. Giving back does not
replay steps backwards: it drives each device to the state the journal names
(override cleared, unbound from what it has, probed, bound by name if the probe
chose another driver). That is idempotent, so the same code rolls back a failed
claim, releases a claim, and recovers from a process killed at any step:

    recover: an interrupted claim is rolled back; an interrupted release is completed.

This module holds the verbs (claim, release, recover, status) and their Context. Beside it:
plan (the steps, before anything changes), journaled (Transaction: runs them, journaling
each), writer (SysfsWriter: every write), simulated (SimulatedKernel: the kernel's part on
a --sysfs tree), crash (the test hook that kills a claim at a step), journal (the records).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pcipass.errors import PcipassError
from pcipass.host.model.sysfs import Host, parse_bdf
from pcipass.host.present import cdi
from pcipass.host.transaction import sriov as sriov_mod
from pcipass.host.transaction.crash import crash_at_step
from pcipass.host.transaction.journal import (
    CLAIM,
    DONE,
    RELEASE,
    SRIOV,
    GroupLock,
    Journal,
    Record,
    state_dir,
)
from pcipass.host.transaction.journaled import Transaction
from pcipass.host.transaction.plan import (
    TARGET_DRIVER,
    Plan,
    plan_claim,
    require_root,
    resolve_target,
)
from pcipass.host.transaction.simulated import writer_for
from pcipass.host.transaction.writer import UNBIND_TIMEOUT_ENV, SysfsWriter, WriteBlocked
from pcipass.unwind import signals_as_interrupt


def _failed_step(record: Record) -> str:
    """The step a failure stopped at, for the message: "N, what it does"."""
    at = record.done + 1
    return f"{at}, {record.steps[at - 1].describe()}" if at <= len(record.steps) else f"{at}"


def _failed(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _undo_failed(what: str, undo: BaseException, code: str) -> PcipassError:
    """A change that failed and whose undo failed too: the journal keeps the rest for recover."""
    return PcipassError(f"{what}; undoing it failed too: {undo}",
                        hint="the journal keeps what is left to undo: run `pcipass recover`", code=code)


@dataclass


class Context:
    """Where a verb works: the sysfs root, its writer and its journal directory."""

    root: str = "/"
    writer: SysfsWriter | None = None
    journal_dir: str | None = None
    crash: Callable[[int], None] = crash_at_step

    def __post_init__(self) -> None:
        self.writer = self.writer or writer_for(self.root)
        self.journal = Journal(self.journal_dir or state_dir(self.root))

    def transaction(self) -> Transaction:
        assert self.writer is not None
        return Transaction(self.journal, self.writer, self.crash)

    def lock(self, key: str) -> GroupLock:
        return GroupLock(self.journal.dir, key)


def claim(ctx: Context, bdf: str, target: str | None = None, *, dry_run: bool = False,
          unsafe_noiommu: bool = False, permissive: bool = False,
          quirks: tuple[str, ...] = (), owner: str | None = None, memlock: str | None = None,
          reset_method: str | None = None) -> Plan:
    """Claim `bdf`'s group. On failure every change is undone and the error says why."""
    target = resolve_target(ctx.root, target)
    plan = plan_claim(ctx.root, bdf, target, unsafe_noiommu=unsafe_noiommu,
                      permissive=permissive, quirks=quirks, writer=ctx.writer, owner=owner, memlock=memlock,
                      reset_method=reset_method)
    if dry_run:
        return plan
    require_root("pcipass claim", ctx.root)
    record = plan.record
    with ctx.lock(record.key):
        existing = ctx.journal.read(record.key)
        if existing is not None:
            if existing.op == CLAIM and existing.state == DONE:
                raise PcipassError(
                    f"IOMMU group {record.key} is already claimed for {existing.target}",
                    hint=f"`pcipass release {bdf}` gives it back first", code="already-claimed")
            raise PcipassError(
                f"an interrupted {existing.op} of IOMMU group {record.key} is in the journal",
                hint="run `pcipass recover` first", code="needs-recover")
        if not record.steps:
            return plan
        tx = ctx.transaction()
        try:
            with signals_as_interrupt():
                tx.run(record)
        except WriteBlocked as exc:
            raise _blocked(ctx, record, exc, "claim") from exc
        except (Exception, KeyboardInterrupt) as exc:  # any failure is undone
            cause = _failed(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
            step = _failed_step(record)
            try:
                tx.give_back(record, CLAIM)
            except WriteBlocked as undo:
                raise _blocked(ctx, record, undo, "claim") from exc
            except (Exception, KeyboardInterrupt) as undo:  # noqa: BLE001 - reported; the journal keeps the rest
                raise _undo_failed(f"claim of group {record.key} failed at step {step}: {cause}", undo,
                                   "claim-undo-failed") from exc
            raise PcipassError(
                f"claim of group {record.key} failed at step {step}: {cause}; "
                "every change was undone",
                hint="check `dmesg` for the driver's complaint; `pcipass check "
                f"{bdf}` for the verdict", code="claim-failed") from exc
        record.state = DONE
        ctx.journal.write(record)
        # Its CDI spec, now the journal says claimed (pcipass.host.present.cdi: never before).
        warning = cdi.after_claim(ctx.root, record)
        if warning:
            plan.notes.append(warning)
    return plan


def _record_for(ctx: Context, bdf: str) -> Record:
    name = str(parse_bdf(bdf))
    for r in _claims(ctx.journal.records()):
        if any(d.bdf == name for d in r.devices):
            return r
    from pcipass.host.model import holders

    by_libvirt = holders.held(holders.Holders(Host(ctx.root)), [name])
    if by_libvirt.libvirt_names():
        raise by_libvirt.error(f"cannot release {name}, which pcipass did not claim")
    raise PcipassError(f"{name} is not claimed by pcipass",
                       hint="`pcipass status` lists what is claimed", code="not-claimed")


def held_by(ctx: Context, record: Record, scan: object | None = None) -> object:
    """What holds the devices of `record` now (pcipass.host.holders.Held)."""
    from pcipass.host.model import holders

    scan = scan or holders.Holders(Host(ctx.root))
    assert isinstance(scan, holders.Holders)
    return holders.held(scan, [d.bdf for d in record.devices])


def _refuse_if_held(ctx: Context, records: list[Record], verb: str) -> None:
    """Refuse, before anything changes, when anything holds any of these groups."""
    from pcipass.host.model import holders

    scan = holders.Holders(Host(ctx.root))
    found = [(r, h) for r in records if (h := held_by(ctx, r, scan))]
    if not found:
        return
    assert all(isinstance(h, holders.Held) for _, h in found)
    errors = [h.error(f"cannot {verb} IOMMU group {r.key}") for r, h in found]  # type: ignore[attr-defined]
    first = next((e for e in errors if e.code == "held-by-libvirt"), errors[0])
    message = "; ".join(e.message for e in errors)
    if len(records) > 1:
        message += f" (nothing was released: {len(found)} of {len(records)} groups are held)"
    raise PcipassError(message, hint=first.hint, code=first.code)


def release(ctx: Context, bdf: str | None = None) -> list[Record]:
    """Give back the group holding `bdf` (or every claimed group, when None). Refuses, with
    nothing changed, while a process or libvirt domain holds any of them."""
    records = [_record_for(ctx, bdf)] if bdf else _claims(ctx.journal.records())
    if records:
        require_root("pcipass release", ctx.root)
    for r in records:
        _refuse_if_interrupted_claim(r)
    _refuse_if_held(ctx, records, "release")

    def how(current: Record) -> str:
        _refuse_if_interrupted_claim(current)
        return RELEASE

    return _give_back_each(ctx, records, how)


def _claims(records: list[Record]) -> list[Record]:
    """The records of claims (and releases), without those of pcipass sriov."""
    return [r for r in records if r.op != SRIOV]


def _refuse_if_interrupted_claim(record: Record) -> None:
    if record.op == CLAIM and record.state != DONE:
        raise PcipassError(
            f"the claim of group {record.key} was interrupted", code="needs-recover",
            hint="run `pcipass recover`: it rolls the claim back")


def _give_back_each(ctx: Context, records: list[Record], how: Callable[[Record], str | None]) -> list[Record]:
    """Give back each group under its lock, from its record read again under the lock (another
    pcipass may have finished it meanwhile). `how(record)` names the op the give-back finishes
    (RELEASE, or CLAIM to roll one back), None to leave the group, or raises to stop."""
    given = []
    for r in records:
        with ctx.lock(r.key):
            current = ctx.journal.read(r.key)
            op = None if current is None else how(current)
            if current is None or op is None:
                continue
            cdi.before_give_back(ctx.root, current)  # the CDI spec goes before any device
            _give_back(ctx, current, op)
            given.append(current)
    return given


def _blocked(ctx: Context, record: Record, exc: WriteBlocked, op: str) -> PcipassError:
    bdf = exc.value.strip()
    finish = "rolls the claim back" if op == "claim" else "completes the release"
    # The finisher inherited the group's lock: the lock file names it from now on, so that a
    # second release, a recover or status points at the process that is really at work.
    ctx.lock(record.key).retell(exc.finisher, f"waits for the kernel to let the unbind of {bdf} "
                                f"through, then {finish} ({op} in progress)")
    return PcipassError(
        f"the kernel still holds the unbind of {bdf} after {exc.timeout:g} s ({op} of IOMMU group "
        f"{record.key}): something still has the device open, and vfio-pci has asked it to let go. "
        f"An unbind cannot be taken back: pcipass pid {exc.finisher} waits for it and then {finish}, "
        "so the device goes back to a driver, not to none",
        hint=f"end whatever holds {bdf} (`pcipass status` names the holders it can see); `pcipass status` "
        f"shows the {op} in progress until pid {exc.finisher} is done; {UNBIND_TIMEOUT_ENV}=SECONDS waits longer",
        code="unbind-blocked")


def _give_back(ctx: Context, record: Record, op: str) -> None:
    try:
        ctx.transaction().give_back(record, op)
    except WriteBlocked as exc:
        raise _blocked(ctx, record, exc, op) from exc
    except OSError as exc:
        raise PcipassError(
            f"giving back group {record.key} stopped: {_failed(exc)}",
            hint="the journal keeps what is left: fix the cause (see dmesg) and run "
            "`pcipass recover`", code="release-failed") from exc


@dataclass


class Recovered:
    key: str
    action: str  # "rolled back", "completed release", "skipped: ..."


def recover(ctx: Context) -> list[Recovered]:
    """Roll back interrupted claims and complete interrupted releases; a group something
    still holds is skipped (giving it back would hang in the kernel)."""
    pending = [r for r in ctx.journal.records() if not (r.op == CLAIM and r.state == DONE)]
    if pending:
        require_root("pcipass recover", ctx.root)
    out = []

    def how(current: Record) -> str | None:
        if current.op == CLAIM and current.state == DONE:
            return None
        if current.op == SRIOV:
            return _recover_sriov(ctx, current, out)
        holding = held_by(ctx, current)
        if holding:
            out.append(Recovered(current.key, "skipped: held by " + "; ".join(holding.lines())))  # type: ignore[attr-defined]
            return None
        out.append(Recovered(current.key, "rolled back claim" if current.op == CLAIM else "completed release"))
        return current.op

    _give_back_each(ctx, pending, how)
    # What a crash between a claim's journal and its CDI spec left, and any stale spec.
    if cdi.spec_dir(ctx.root) is not None:
        out += [Recovered(c.key, f"{c.action} CDI spec {c.path}") for c in cdi.sync(ctx)
                if c.action in ("wrote", "removed")]
    return out


def _recover_sriov(ctx: Context, record: Record, out: list[Recovered]) -> str | None:
    """An interrupted pcipass sriov is rolled back, unless a VF it would remove is in use."""
    assert record.sriov is not None
    host = Host(ctx.root)
    pf = host.device_or_none(record.sriov.pf)
    busy = sriov_mod.vfs_in_use(host, pf, _claims(ctx.journal.records())) if pf is not None else []
    assert ctx.writer is not None
    if busy and ctx.writer.numvfs(record.sriov.pf) != record.sriov.numvfs:
        out.append(Recovered(record.key, "skipped: " + "; ".join(f"{vf} is {how}" for vf, how, _ in busy)))
        return None
    out.append(Recovered(record.key, f"rolled back sriov change ({record.sriov.pf} has "
                         f"{record.sriov.numvfs} VFs again)"))
    return SRIOV


def sriov(ctx: Context, bdf: str, vfs: int, *, autoprobe: str | None = None,
          dry_run: bool = False) -> sriov_mod.SriovPlan:
    """Give the physical function `bdf` `vfs` virtual functions (0 removes them). On failure
    every change is undone and the error says why."""
    assert ctx.writer is not None

    def planned() -> sriov_mod.SriovPlan:
        assert ctx.writer is not None
        return sriov_mod.plan_sriov(ctx.root, bdf, vfs, autoprobe=autoprobe, writer=ctx.writer,
                                    records=_claims(ctx.journal.records()))

    plan = planned()
    if dry_run or not plan.record.steps:
        return plan
    require_root("pcipass sriov", ctx.root)
    record = plan.record
    with ctx.lock(record.key):
        if ctx.journal.read(record.key) is not None:
            raise PcipassError(f"an interrupted change of {plan.pf}'s VFs is in the journal",
                               hint="run `pcipass recover` first", code="needs-recover")
        plan = planned()  # again under the lock: a claim of a VF may have finished meanwhile
        record = plan.record
        tx = ctx.transaction()
        try:
            with signals_as_interrupt():
                tx.run(record)
        except (Exception, KeyboardInterrupt) as exc:  # any failure is undone
            step = _failed_step(record)
            cause = (sriov_mod.explain_failure(exc, plan.pf, record.devices[0].original_driver)
                     if isinstance(exc, OSError) else str(exc) or type(exc).__name__)
            try:
                tx.give_back(record, SRIOV)
            except (Exception, KeyboardInterrupt) as undo:  # noqa: BLE001 - reported; the journal keeps the rest
                raise _undo_failed(f"changing the VFs of {plan.pf} failed at step {step}: {cause}", undo,
                                   "sriov-undo-failed") from exc
            raise PcipassError(
                f"changing the VFs of {plan.pf} failed at step {step}: {cause}; "
                f"it has {plan.numvfs} VFs again", hint="dmesg has the PF driver's complaint",
                code="sriov-failed") from exc
        ctx.journal.remove(record.key)
    return plan


def _state(r: Record, locked: bool) -> str:
    """claimed; CLAIM or RELEASE in progress (a process holds the group's lock: the finisher of
    an unbind the kernel still holds, say); or an interrupted one, for `recover`."""
    if (r.op, r.state) == (CLAIM, DONE):
        return "claimed"
    return f"{r.op} in progress" if locked else f"interrupted {r.op}"


def status(ctx: Context) -> dict[str, object]:
    """What is claimed, for what, since when (schema pcipass/status/1)."""
    from pcipass.host.model import holders

    assert ctx.writer is not None
    scan = holders.Holders(Host(ctx.root))
    scan.processes  # noqa: B018 - scanned now, so that holders_complete says whether all could be read
    groups = []
    changes = []
    claimed: set[str] = set()
    for r in ctx.journal.records():
        if r.op == SRIOV:
            assert r.sriov is not None
            changes.append({"pf": r.sriov.pf, "state": _state(r, ctx.lock(r.key).busy()),
                            "numvfs_before": r.sriov.numvfs, "numvfs_wanted": r.sriov.want,
                            "numvfs": ctx.writer.numvfs(r.sriov.pf),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.since)),
                            "by": {"pid": r.pid, "command": r.command}})
            continue
        claimed |= {d.bdf for d in r.devices}
        holding = held_by(ctx, r, scan)
        assert isinstance(holding, holders.Held)
        lock = ctx.lock(r.key)
        locked = lock.busy()  # probed once: state and locked_by say the same
        groups.append({
            "group": r.key,
            "for": r.target,
            "driver": TARGET_DRIVER[r.target],
            "state": _state(r, locked),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.since)),
            "by": {"pid": r.pid, "command": r.command},
            "locked_by": lock.holder() if locked else None,
            "noiommu": r.noiommu_original is not None,
            "devices": [
                {"bdf": d.bdf, "bridge": d.is_bridge, "original_driver": d.original_driver,
                 "driver": ctx.writer.driver(d.bdf)}
                for d in r.devices
            ],
            "owner": r.owner,
            "nodes": [{"path": n.path} for n in r.nodes],
            "holders": [h.to_json() for h in holding.processes],
            "libvirt": [{"domain": d.name, "pid": d.pid, "bdf": b, "managed": m} for d, b, m in holding.libvirt],
        })
    libvirt = [{"domain": d.name, "pid": d.pid, "state": d.state, "bdf": b, "managed": m,
                "claimed_by_pcipass": b in claimed}
               for d in scan.libvirt_domains for b, m in d.hostdevs]
    return {"schema": "pcipass/status/1", "groups": groups, "libvirt": libvirt,
            "holders_complete": not scan.unreadable, "sriov": changes}
