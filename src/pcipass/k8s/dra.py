"""The DRA kubelet plugin: NodePrepareResources claims the whole IOMMU group of each device a
ResourceClaim was allocated (a journaled `pcipass claim`), writes its CDI spec and answers the
CDI device names; NodeUnprepareResources releases what the prepare claimed.

Each prepare is journaled too, as one record per ResourceClaim (uid) in the state directory's
k8s-dra/: written with the groups it is about to claim before the first claim, so that a
plugin killed half way leaves a record that `recover` (run whenever the plugin starts) rolls
back: pcipass's own recover finishes the group claim that was interrupted, then every group
the record says the prepare took is released and the record removed. The kubelet, which had no
answer, calls prepare again. A repeated prepare of a prepared claim answers the same devices;
a repeated unprepare (or one of a claim never prepared) answers success.

Which devices a claim was allocated is in the ResourceClaim's status (allocation.devices.results,
those of this driver and this node's pool): a ClaimSource reads it, from the API server in a
cluster (pcipass.k8s.apiserver) or from a directory of ResourceClaim objects (the tests).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pcipass.errors import PcipassError
from pcipass.host.present import cdi
from pcipass.host.transaction import claim as claim_mod
from pcipass.host.transaction.journal import CLAIM, DONE, unlink_durably, write_durably
from pcipass.k8s import node as node_mod

PREPARING, PREPARED = "preparing", "prepared"
CRASH_ENV = "PCIPASS_CRASH_IN_PREPARE"  # a test hook: SIGKILL at that point of a prepare


def crash_in_prepare(where: str) -> None:
    """Test hook: PCIPASS_CRASH_IN_PREPARE=WHERE kills the plugin with SIGKILL at that point of
    a prepare ("journaled": the record written, nothing claimed; "claimed 2": group 2 claimed)."""
    if os.environ.get(CRASH_ENV) == where:
        os.kill(os.getpid(), signal.SIGKILL)


class ClaimSource(Protocol):
    def claim(self, namespace: str, name: str, uid: str) -> dict[str, Any]:
        """The ResourceClaim object (as the API server gives it)."""


class DirectorySource:
    """ResourceClaim objects as JSON files, DIR/NAMESPACE/NAME.json (what `kubectl get
    resourceclaim -o json` prints): the tests' API server."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)

    def claim(self, namespace: str, name: str, uid: str) -> dict[str, Any]:
        path = self.dir / namespace / f"{name}.json"
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise PcipassError(f"no ResourceClaim {namespace}/{name} ({path})", code="no-claim",
                               hint="the kubelet names claims the API server has: is the source right?") from None


@dataclass
class PrepareRecord:
    uid: str
    namespace: str
    name: str
    state: str  # PREPARING or PREPARED
    groups: list[str]  # every group the claim's devices are
    taken: list[str] = field(default_factory=list)  # the groups this prepare claims (write-ahead)
    devices: list[dict[str, Any]] = field(default_factory=list)  # the answer, once prepared


class PrepareJournal:
    """One record per ResourceClaim, replaced atomically (the claim journal's way)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, uid: str) -> Path:
        if not uid or "/" in uid or uid.startswith("."):
            raise PcipassError(f"bad ResourceClaim uid {uid!r}", code="bad-claim",
                               hint="a uid as the API server gives it (no '/', no leading '.')")
        return self.dir / f"claim-{uid}.json"

    def read(self, uid: str) -> PrepareRecord | None:
        try:
            return PrepareRecord(**json.loads(self.path(uid).read_text()))
        except FileNotFoundError:
            return None

    def records(self) -> list[PrepareRecord]:
        if not self.dir.is_dir():
            return []
        return [PrepareRecord(**json.loads(p.read_text())) for p in sorted(self.dir.glob("claim-*.json"))]

    def write(self, record: PrepareRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_durably(self.path(record.uid), json.dumps(asdict(record), indent=1, sort_keys=True).encode() + b"\n")

    def remove(self, uid: str) -> None:
        unlink_durably(self.path(uid))


class Driver:
    """The DRA node service's logic, on one host (`root`, a --sysfs tree in the tests)."""

    def __init__(self, root: str, node: str, source: ClaimSource, *, driver: str = node_mod.DRIVER,
                 selectors: list[node_mod.Selector] | None = None,
                 crash: Callable[[str], None] = crash_in_prepare) -> None:
        self.root = root
        self.node = node
        self.source = source
        self.driver = driver
        self.crash = crash  # a test hook: called at named points of a prepare
        self.selectors = selectors if selectors is not None else [node_mod.Selector(None, None)]
        self.lock = threading.Lock()  # one prepare or unprepare at a time (group locks are per fd)
        ctx = claim_mod.Context(root=root)
        self.journal = PrepareJournal(ctx.journal.dir / "k8s-dra")

    def ctx(self) -> claim_mod.Context:
        return claim_mod.Context(root=self.root)

    # --- the kubelet's two calls ---

    def NodePrepareResources(self, request: dict[str, Any], context: Any = None) -> dict[str, Any]:
        return {"claims": {c["uid"]: self.prepare(c) for c in request["claims"]}}

    def NodeUnprepareResources(self, request: dict[str, Any], context: Any = None) -> dict[str, Any]:
        return {"claims": {c["uid"]: self.unprepare(c) for c in request["claims"]}}

    def prepare(self, claim: dict[str, Any]) -> dict[str, Any]:
        """NodePrepareResourceResponse for one claim: its devices, or an error."""
        with self.lock:
            try:
                return {"devices": self._prepare(claim), "error": ""}
            except PcipassError as exc:
                return {"devices": [], "error": str(exc)}

    def unprepare(self, claim: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            try:
                self._unprepare(claim["uid"])
                return {"error": ""}
            except PcipassError as exc:
                return {"error": str(exc)}

    # --- the work ---

    def allocated(self, claim: dict[str, Any]) -> list[dict[str, Any]]:
        """This driver's results in the claim's allocation, on this node's pool."""
        obj = self.source.claim(claim["namespace"], claim["name"], claim["uid"])
        uid = obj.get("metadata", {}).get("uid")
        if uid != claim["uid"]:
            raise PcipassError(f"ResourceClaim {claim['namespace']}/{claim['name']} is uid {uid}, "
                               f"not {claim['uid']}", code="claim-mismatch",
                               hint="the claim was deleted and made again: the kubelet retries with the new uid")
        results = ((obj.get("status") or {}).get("allocation") or {}).get("devices", {}).get("results", [])
        mine = [r for r in results if r.get("driver") == self.driver]
        if not mine:
            raise PcipassError(f"ResourceClaim {claim['namespace']}/{claim['name']} has no device of "
                               f"{self.driver} allocated", code="not-allocated",
                               hint="the scheduler allocates a claim before the kubelet prepares it")
        foreign = [r for r in mine if r.get("pool") != self.node]
        if foreign:
            raise PcipassError(f"device {foreign[0].get('device')} is in pool {foreign[0].get('pool')}, "
                               f"not this node's ({self.node})", code="wrong-pool",
                               hint="--node must be the node's name, as in the ResourceSlice's pool")
        return mine

    def _prepare(self, claim: dict[str, Any]) -> list[dict[str, Any]]:
        uid = claim["uid"]
        record = self.journal.read(uid)
        if record is not None and record.state == PREPARED:
            self._ensure(record)
            return record.devices
        if record is not None:  # an earlier prepare of this claim stopped half way
            self._roll_back(record)
        results = self.allocated(claim)
        by_name = {g.name: g for g in node_mod.groups(self.root, self.selectors)}
        keys = []
        for r in results:
            g = by_name.get(r.get("device", ""))
            if g is None:
                raise PcipassError(f"no device {r.get('device')} on node {self.node}", code="no-device",
                                   hint="`pcipass groups`: is the group still there? republish the slices")
            if g.key not in keys:
                keys.append(g.key)
        ctx = self.ctx()
        others = {k: r.uid for r in self.journal.records() if r.uid != uid for k in r.groups}
        taken: list[str] = []
        for key in keys:
            if key in others:
                raise PcipassError(f"IOMMU group {key} is prepared for ResourceClaim {others[key]}",
                                   code="group-in-use",
                                   hint="one group serves one ResourceClaim at a time")
            existing = ctx.journal.read(key)
            if existing is None:
                taken.append(key)
            elif existing.target != "vfio" or (existing.op, existing.state) != (CLAIM, DONE):
                raise PcipassError(f"IOMMU group {key} is in the journal as {existing.op} {existing.state} "
                                   f"for {existing.target}", hint="`pcipass recover`; `pcipass status`",
                                   code="group-busy")
        record = PrepareRecord(uid, claim["namespace"], claim["name"], PREPARING, keys, taken)
        self.journal.write(record)  # write-ahead: before the first claim
        self.crash("journaled")
        try:
            for key in taken:
                bdf = by_name[cdi.device_name(key)].bdfs[0]
                claim_mod.claim(ctx, bdf, "vfio")
                self.crash(f"claimed {key}")
            self._ensure(record)
        except PcipassError:
            self._roll_back(record)
            raise
        record.devices = [{"request_names": [r["request"]] if r.get("request") else [],
                           "pool_name": r["pool"], "device_name": r["device"],
                           "cdi_device_ids": [cdi.qualified_name(by_name[r["device"]].key)]}
                          for r in results]
        record.state = PREPARED
        self.journal.write(record)
        return record.devices

    def _ensure(self, record: PrepareRecord) -> None:
        """Every group of the claim is claimed for vfio and has its CDI spec written."""
        ctx = self.ctx()
        directory = cdi.spec_dir(self.root)
        if directory is None:
            raise PcipassError(f"{cdi.DIR_ENV} is set empty: no CDI spec to give the container",
                               code="cdi-off", hint=f"unset {cdi.DIR_ENV} for the plugin")
        for key in record.groups:
            existing = ctx.journal.read(key)
            if not cdi.wants_spec(existing):
                raise PcipassError(f"IOMMU group {key} of ResourceClaim {record.uid} is no longer claimed",
                                   code="group-lost", hint="unprepare and prepare again; `pcipass status`")
            assert existing is not None
            cdi.write(directory, cdi.spec_for(self.root, existing), key)

    def _roll_back(self, record: PrepareRecord) -> None:
        """Give back what a prepare that stopped half way took, then forget it."""
        ctx = self.ctx()
        claim_mod.recover(ctx)  # an interrupted group claim is rolled back first
        for key in reversed(record.taken):
            existing = ctx.journal.read(key)
            if existing is not None and (existing.op, existing.state) == (CLAIM, DONE):
                claim_mod.release(ctx, existing.devices[0].bdf)
        self.journal.remove(record.uid)

    def _unprepare(self, uid: str) -> None:
        record = self.journal.read(uid)
        if record is None:
            return  # never prepared, or already unprepared: done
        if record.state != PREPARED:
            self._roll_back(record)
            return
        ctx = self.ctx()
        for key in reversed(record.taken):
            existing = ctx.journal.read(key)
            if existing is not None:
                claim_mod.release(ctx, existing.devices[0].bdf)
        self.journal.remove(uid)

    def recover(self) -> list[str]:
        """Roll back every prepare that stopped half way (run when the plugin starts)."""
        with self.lock:
            done = [f"{r.key}: {r.action}" for r in claim_mod.recover(self.ctx())]
            for record in self.journal.records():
                if record.state != PREPARED:
                    self._roll_back(record)
                    done.append(f"ResourceClaim {record.namespace}/{record.name} ({record.uid}): "
                                f"rolled back a prepare that stopped half way")
            return done
