"""A kubelet stand-in, written from the published plugin APIs (pcipass.k8s.api's tables): it
finds a DRA driver's registration socket as the kubelet's plugin watcher does, asks GetInfo,
picks a DRA service version it speaks and says so with NotifyRegistrationStatus, then calls
NodePrepareResources/NodeUnprepareResources; for device plugins it serves the kubelet's
Registration service on device-plugins/kubelet.sock, and on Register connects back to the
plugin's endpoint for its options, ListAndWatch, GetPreferredAllocation and Allocate. Real
gRPC over the real unix sockets."""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from pcipass.k8s import api, rpc

# The DRA service versions this kubelet speaks, best first (as a kubelet 1.34 does).
SPEAKS = ("v1.DRAPlugin", "v1beta1.DRAPlugin")


def wait_for(predicate, timeout: float = 60.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


class DraKubelet:
    """The kubelet's side of a DRA driver."""

    def __init__(self, kubelet_dir: Path) -> None:
        self.dir = kubelet_dir
        self.info: dict[str, Any] | None = None
        self.service: api.Service | None = None

    def registration_socket(self, timeout: float = 60.0) -> Path:
        registry = self.dir / api.PLUGINS_REGISTRY
        return wait_for(lambda: next(iter(sorted(registry.glob("*.sock"))), None) if registry.is_dir() else None,
                        timeout, f"a socket in {registry}")

    def register(self, timeout: float = 60.0) -> dict[str, Any]:
        """What the plugin watcher does with a new socket: GetInfo, check, NotifyRegistrationStatus."""
        sock = self.registration_socket(timeout)
        with rpc.Client(str(sock), api.PLUGIN_REGISTRATION) as reg:
            info = wait_for(lambda: _try(reg.call, "GetInfo", {}), timeout, "GetInfo")
            version = next((v for v in SPEAKS if v in info["supported_versions"]), None)
            ok = info["type"] == api.DRA_PLUGIN_TYPE and version is not None and os.path.isabs(info["endpoint"])
            reg.call("NotifyRegistrationStatus", {
                "plugin_registered": ok,
                "error": "" if ok else f"cannot use plugin {info}"})
        assert ok, info
        self.info = info
        self.service = api.DRA_VERSIONS[version]
        return info

    def _dra(self) -> rpc.Client:
        assert self.info is not None and self.service is not None, "register first"
        return rpc.Client(self.info["endpoint"], self.service, timeout=120)

    def prepare(self, *claims: dict[str, str]) -> dict[str, Any]:
        with self._dra() as c:
            return c.call("NodePrepareResources", {"claims": list(claims)})["claims"]

    def unprepare(self, *claims: dict[str, str]) -> dict[str, Any]:
        with self._dra() as c:
            return c.call("NodeUnprepareResources", {"claims": list(claims)})["claims"]


def _try(fn, *a):
    import grpc

    try:
        return fn(*a)
    except grpc.RpcError:
        return None


class DevicePluginKubelet:
    """The kubelet's side of the device plugin API: its Registration service, and a client of
    each plugin that registers."""

    def __init__(self, kubelet_dir: Path) -> None:
        self.dir = kubelet_dir / api.DEVICE_PLUGINS
        self.registrations: queue.Queue[dict[str, Any]] = queue.Queue()
        self.updates: queue.Queue[list[dict[str, Any]]] = queue.Queue()
        self.server: Any = None
        self.watchers: list[threading.Thread] = []

    def Register(self, request: dict[str, Any], context: Any = None) -> dict[str, Any]:
        if request["version"] != api.DEVICE_PLUGIN_VERSION:
            import grpc

            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version {request['version']} is not supported")
        self.registrations.put(request)
        return {}

    def start(self) -> None:
        self.server = rpc.serve(str(self.dir / api.KUBELET_SOCKET), [(api.DEVICE_PLUGIN_REGISTRATION, self)])

    def restart(self) -> None:
        """As a kubelet restart does: every socket in device-plugins/ goes, then it serves again."""
        self.stop()
        for p in self.dir.glob("*.sock"):
            p.unlink()
        self.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0).wait()
            self.server = None

    def plugin(self, request: dict[str, Any]) -> rpc.Client:
        return rpc.Client(str(self.dir / request["endpoint"]), api.DEVICE_PLUGIN_SERVICE, timeout=60)

    def watch(self, request: dict[str, Any]) -> rpc.Client:
        """ListAndWatch in a thread: each list the plugin sends goes to `updates`."""
        client = self.plugin(request)

        def run() -> None:
            import grpc

            try:
                for resp in client.stream("ListAndWatch", {}):
                    self.updates.put(resp["devices"])
            except grpc.RpcError:
                pass
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.watchers.append(t)
        return client
