"""The device plugin (deviceplugin/v1beta1), for clusters without DRA: the kubelet allocates
an extended resource (pcipass.io/vfio) whose devices are the PCI functions of the selected
IOMMU groups, claimed for vfio by pcipass (at the plugin's start, or beforehand by hand).

    ListAndWatch            the functions, Healthy while their group is claimed, on vfio-pci and
                            its verdict (`pcipass check`) has nothing against it, with NUMA nodes
    GetPreferredAllocation  whole groups first, on one NUMA node
    Allocate                the group's VFIO nodes as device specs, PCIPASS_GROUP_N, and the CDI
                            device names; a request that splits a group is refused, since
                            /dev/vfio/N opens every device of the group
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

from pcipass.errors import PcipassError
from pcipass.host.present import cdi
from pcipass.host.transaction import claim as claim_mod
from pcipass.k8s import api
from pcipass.k8s import node as node_mod


class DevicePlugin:
    """The DevicePlugin service's logic over one host (`root`)."""

    def __init__(self, root: str, selectors: list[node_mod.Selector], *, resource: str = node_mod.RESOURCE,
                 poll: float = 5.0, use_cdi: bool = True) -> None:
        self.root = root
        self.selectors = selectors
        self.resource = resource
        self.poll = poll
        self.use_cdi = use_cdi
        self.stopping = threading.Event()
        self.changed = threading.Event()  # set to make ListAndWatch look again at once

    def claim_selected(self) -> list[str]:
        """Claim, journaled, every selected group the verdict allows that pcipass has not claimed."""
        ctx = claim_mod.Context(root=self.root)
        claimed = []
        for g in node_mod.groups(self.root, self.selectors):
            if not g.claimed and g.healthy:
                claim_mod.claim(ctx, g.bdfs[0], "vfio")
                claimed.append(g.key)
        return claimed

    def groups(self) -> list[node_mod.GroupDevice]:
        return node_mod.groups(self.root, self.selectors)

    def devices(self) -> list[dict[str, Any]]:
        out = []
        for g in self.groups():
            for f in g.functions:
                dev: dict[str, Any] = {"ID": f.bdf, "health": api.HEALTHY if g.healthy and g.claimed else api.UNHEALTHY}
                if f.numa is not None:
                    dev["topology"] = {"nodes": [{"ID": f.numa}]}
                out.append(dev)
        return out

    # --- the service ---

    def GetDevicePluginOptions(self, request: dict[str, Any], context: Any = None) -> dict[str, Any]:
        return {"pre_start_required": False, "get_preferred_allocation_available": True}

    def ListAndWatch(self, request: dict[str, Any], context: Any = None) -> Any:
        last = None
        while not self.stopping.is_set() and (context is None or context.is_active()):
            now = self.devices()
            if now != last:
                yield {"devices": now}
                last = now
            self.changed.wait(self.poll)
            self.changed.clear()

    def GetPreferredAllocation(self, request: dict[str, Any], context: Any = None) -> dict[str, Any]:
        groups = self.groups()
        return {"container_responses": [
            {"deviceIDs": preferred(groups, r["available_deviceIDs"], r["must_include_deviceIDs"],
                                    r["allocation_size"])}
            for r in request["container_requests"]]}

    def Allocate(self, request: dict[str, Any], context: Any = None) -> dict[str, Any]:
        try:
            return {"container_responses": [self.allocate(r["devices_ids"]) for r in request["container_requests"]]}
        except PcipassError as exc:
            if context is None:
                raise
            import grpc

            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # not reached: abort raises

    def PreStartContainer(self, request: dict[str, Any], context: Any = None) -> dict[str, Any]:
        return {}

    def allocate(self, ids: list[str]) -> dict[str, Any]:
        """ContainerAllocateResponse for one container's device IDs (BDFs)."""
        by_bdf = {b: g for g in self.groups() for b in g.bdfs}
        unknown = [i for i in ids if i not in by_bdf]
        if unknown:
            raise PcipassError(f"{', '.join(unknown)}: not a device of {self.resource} on this node",
                               code="unknown-device", hint="the kubelet asks for IDs ListAndWatch gave it: "
                               "a stale kubelet checkpoint? restart the plugin")
        chosen: list[node_mod.GroupDevice] = []
        for i in ids:
            g = by_bdf[i]
            if g not in chosen:
                chosen.append(g)
        ctx = claim_mod.Context(root=self.root)
        specs: list[dict[str, str]] = []
        envs: dict[str, str] = {}
        names = []
        for g in chosen:
            missing = [b for b in g.bdfs if b not in ids]
            if missing:
                raise PcipassError(f"IOMMU group {g.key} also has {', '.join(missing)}: a container gets "
                                   "a whole group or none of it (its /dev/vfio/N opens every member)",
                                   code="split-group",
                                   hint="ask for all of them (GetPreferredAllocation offers whole groups)")
            record = ctx.journal.read(g.key)
            if not (g.claimed and cdi.wants_spec(record)):
                raise PcipassError(f"IOMMU group {g.key} is not claimed for vfio", code="not-claimed",
                                   hint="`pcipass claim BDF`, or start the plugin with --claim")
            assert record is not None
            spec = cdi.spec_for(self.root, record)
            edits = spec["devices"][0]["containerEdits"]  # type: ignore[index]
            for n in edits["deviceNodes"]:
                if not any(s["container_path"] == n["path"] for s in specs):
                    specs.append({"container_path": n["path"], "host_path": n["path"], "permissions": "rw"})
            for e in edits["env"]:
                k, _, v = e.partition("=")
                envs[k] = v
            names.append({"name": cdi.qualified_name(g.key)})
            if self.use_cdi and (directory := cdi.spec_dir(self.root)) is not None:
                cdi.write(directory, spec, g.key)
        return {"envs": envs, "devices": specs, "mounts": [], "annotations": {},
                "cdi_devices": names if self.use_cdi else []}

    # --- registration with the kubelet, and staying registered ---

    def register(self, kubelet_dir: str, endpoint: str) -> None:
        from pcipass.k8s import rpc

        with rpc.Client(os.path.join(kubelet_dir, api.KUBELET_SOCKET), api.DEVICE_PLUGIN_REGISTRATION,
                        timeout=10) as kubelet:
            kubelet.call("Register", {"version": api.DEVICE_PLUGIN_VERSION, "endpoint": endpoint,
                                      "resource_name": self.resource,
                                      "options": self.GetDevicePluginOptions({})})

    def run(self, kubelet_dir: str, endpoint: str = "pcipass.sock", ready: threading.Event | None = None) -> None:
        """Serve on KUBELET_DIR/ENDPOINT and register; when the kubelet restarts (it removes the
        plugins' sockets), serve and register again. Until `stopping` is set."""
        from pcipass.k8s import rpc

        path = os.path.join(kubelet_dir, endpoint)
        while not self.stopping.is_set():
            server = rpc.serve(path, [(api.DEVICE_PLUGIN_SERVICE, self)])
            try:
                self._register_until_done(kubelet_dir, endpoint)
                if ready is not None:
                    ready.set()
                while not self.stopping.is_set() and os.path.exists(path):
                    self.stopping.wait(0.2)
            finally:
                self.changed.set()  # let a ListAndWatch on this server end its wait
                server.stop(grace=1).wait()

    def _register_until_done(self, kubelet_dir: str, endpoint: str) -> None:
        import grpc

        while not self.stopping.is_set():
            try:
                self.register(kubelet_dir, endpoint)
                return
            except grpc.RpcError:
                time.sleep(0.5)  # the kubelet is not (yet) there


def _exact(groups: list[node_mod.GroupDevice], need: int) -> list[node_mod.GroupDevice] | None:
    """The fewest of `groups` whose functions add up to exactly `need` (earlier ones preferred)."""
    best: dict[int, list[int]] = {0: []}
    for i, g in enumerate(groups):
        for total, picked in sorted(best.items(), reverse=True):
            n = total + len(g.bdfs)
            if n <= need and (n not in best or len(best[n]) > len(picked) + 1):
                best[n] = picked + [i]
    return None if need not in best else [groups[i] for i in best[need]]


def preferred(groups: list[node_mod.GroupDevice], available: list[str], must: list[str], size: int) -> list[str]:
    """`size` of the available IDs: those that must be in, then their groups' other members,
    then whole groups making up exactly the rest on one NUMA node (the must-haves' node, else the
    one with the most to give), else across nodes; single functions of split groups only if whole
    groups cannot make up the size."""
    avail = set(available)
    by_bdf = {b: g for g in groups for b in g.bdfs}
    chosen = [b for b in must if b in avail]

    def add(bdfs: list[str]) -> None:
        chosen.extend(b for b in bdfs if b not in chosen)

    for b in list(chosen):
        g = by_bdf.get(b)
        if g and len(set(chosen) | set(g.bdfs)) <= size and set(g.bdfs) <= avail:
            add(g.bdfs)
    whole = [g for g in groups if set(g.bdfs) <= avail and not set(g.bdfs) & set(chosen)]
    capacity: Counter[int | None] = Counter()
    for g in whole:
        capacity[g.numa] += len(g.bdfs)
    votes = Counter(by_bdf[b].numa for b in chosen if b in by_bdf)
    nodes = sorted(capacity, key=lambda n: (-votes[n], -capacity[n], -1 if n is None else n))
    need = size - len(chosen)
    picked = None
    for n in nodes:  # one NUMA node, the best first
        picked = _exact([g for g in whole if g.numa == n], need)
        if picked is not None:
            break
    if picked is None:  # across nodes, the best node's groups first
        picked = _exact(sorted(whole, key=lambda g: nodes.index(g.numa)), need) or []
    for g in picked:
        add(g.bdfs)
    if len(chosen) < size:
        target = nodes[0] if nodes else None
        rest = sorted((b for b in available if b not in chosen),
                      key=lambda b: (by_bdf[b].numa != target if b in by_bdf else True, b))
        add(rest[:size - len(chosen)])
    return chosen[:size]
