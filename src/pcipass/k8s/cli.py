"""`pcipass k8s dra | device-plugin | slices`: pcipass's claims behind the kubelet's plugin
APIs (the `pcipass[k8s]` extra: grpcio). See docs/fleet.md."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from pcipass.k8s import api
from pcipass.k8s import node as node_mod


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _selectors(args: argparse.Namespace) -> list[node_mod.Selector]:
    return [node_mod.Selector.parse(s) for s in args.select]


def _write_slices(args: argparse.Namespace, selectors: list[node_mod.Selector]) -> list[dict[str, Any]]:
    slices = node_mod.resource_slices(node_mod.groups(args.sysfs, selectors), args.node)
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": slices}, indent=2, sort_keys=True) + "\n"
    out = getattr(args, "slices", None) or getattr(args, "out", None)
    if out in (None, "-"):
        sys.stdout.write(text)
    else:
        tmp = f"{out}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    return slices


class Registration:
    """The pluginregistration service of a DRA driver: what the kubelet asks it first."""

    def __init__(self, driver: str, endpoint: str) -> None:
        self.info = {"type": api.DRA_PLUGIN_TYPE, "name": driver, "endpoint": endpoint,
                     "supported_versions": list(api.DRA_VERSIONS)}
        self.status: dict[str, Any] | None = None
        self.registered = threading.Event()

    def GetInfo(self, request: dict[str, Any], context: Any = None) -> dict[str, Any]:
        return self.info

    def NotifyRegistrationStatus(self, request: dict[str, Any], context: Any = None) -> dict[str, Any]:
        self.status = request
        if request["plugin_registered"]:
            print(f"pcipass k8s dra: registered with the kubelet as {self.info['name']}", flush=True)
            self.registered.set()
        else:
            print(f"pcipass k8s dra: the kubelet refused the registration: {request['error']}",
                  file=sys.stderr, flush=True)
        return {}


def cmd_dra(args: argparse.Namespace) -> int:
    from pcipass.k8s import dra, rpc

    selectors = _selectors(args)
    if args.claims_dir:
        source: Any = dra.DirectorySource(args.claims_dir)
    else:
        from pcipass.k8s import apiserver

        source = apiserver.ApiServer.in_cluster()
    driver = dra.Driver(args.sysfs, args.node, source, driver=args.driver, selectors=selectors)
    for line in driver.recover():
        print(f"pcipass k8s dra: recover: {line}", flush=True)
    if args.slices:
        _write_slices(args, selectors)
    elif not args.claims_dir:
        source.publish(node_mod.resource_slices(node_mod.groups(args.sysfs, selectors), args.node))
    stop = _stop_on_signals()
    endpoint = os.path.join(args.kubelet_dir, api.PLUGINS, args.driver, "dra.sock")
    reg_socket = os.path.join(args.kubelet_dir, api.PLUGINS_REGISTRY, f"{args.driver}-reg.sock")
    servers = [rpc.serve(endpoint, [(api.DRA_SERVICE_V1, driver), (api.DRA_SERVICE_V1BETA1, driver)]),
               rpc.serve(reg_socket, [(api.PLUGIN_REGISTRATION, Registration(args.driver, endpoint))])]
    print(f"pcipass k8s dra: serving {endpoint}, registration {reg_socket}", flush=True)
    stop.wait()
    for s in servers:
        s.stop(grace=2).wait()
    for path in (endpoint, reg_socket):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return 0


def cmd_device_plugin(args: argparse.Namespace) -> int:
    from pcipass.k8s import deviceplugin

    plugin = deviceplugin.DevicePlugin(args.sysfs, _selectors(args), resource=args.resource,
                                       poll=args.poll, use_cdi=not args.no_cdi)
    if args.claim:
        for key in plugin.claim_selected():
            print(f"pcipass k8s device-plugin: claimed IOMMU group {key}", flush=True)
    stop = _stop_on_signals()
    threading.Thread(target=lambda: (stop.wait(), plugin.stopping.set(), plugin.changed.set()),
                     daemon=True).start()
    ready = threading.Event()
    threading.Thread(target=lambda: (ready.wait(), print(
        f"pcipass k8s device-plugin: registered {args.resource} with the kubelet", flush=True)),
        daemon=True).start()
    plugin.run(os.path.join(args.kubelet_dir, api.DEVICE_PLUGINS), args.endpoint, ready)
    return 0


def cmd_slices(args: argparse.Namespace) -> int:
    _write_slices(args, _selectors(args))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `k8s` verb to the `pcipass` parser."""
    p = sub.add_parser("k8s", help="Kubernetes: a DRA kubelet plugin, a device plugin, ResourceSlices "
                       "(pip install 'pcipass[k8s]')")
    verbs = p.add_subparsers(dest="k8s_verb", metavar="VERB", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--select", action="append", required=True, metavar="VENDOR:DEVICE",
                       help="offer the IOMMU groups with a function of this vendor:device (hex, * for any, "
                       "or all); repeatable")
        q.add_argument("--sysfs", metavar="ROOT", default="/",
                       help="a tree under ROOT instead of this host (a synthetic or captured tree)")

    q = verbs.add_parser("dra", help="the DRA kubelet plugin: prepare claims the group, writes its CDI "
                         "spec, answers its CDI name; unprepare releases it")
    q.add_argument("--node", required=True, help="this node's name: the pool of its ResourceSlice")
    q.add_argument("--driver", default=node_mod.DRIVER, help=f"the DRA driver's name (default {node_mod.DRIVER})")
    q.add_argument("--kubelet-dir", default="/var/lib/kubelet", metavar="DIR",
                   help="the kubelet's directory: sockets in plugins_registry/ and plugins/DRIVER/")
    q.add_argument("--claims-dir", metavar="DIR",
                   help="read ResourceClaims from DIR/NAMESPACE/NAME.json instead of the API server "
                   "(tests, or a node without one)")
    q.add_argument("--slices", metavar="FILE",
                   help="write the ResourceSlices to FILE (JSON) instead of publishing them to the API server")
    common(q)
    q.set_defaults(func=cmd_dra)

    q = verbs.add_parser("device-plugin", help="the device plugin (v1beta1): the functions of the selected "
                         "groups as an extended resource")
    q.add_argument("--resource", default=node_mod.RESOURCE, help=f"the resource name (default {node_mod.RESOURCE})")
    q.add_argument("--kubelet-dir", default="/var/lib/kubelet", metavar="DIR",
                   help="the kubelet's directory: the plugin's socket goes in device-plugins/")
    q.add_argument("--endpoint", default="pcipass.sock", metavar="NAME", help="the socket's name in device-plugins/")
    q.add_argument("--claim", action="store_true",
                   help="claim (journaled) the selected groups the verdict allows, at start")
    q.add_argument("--no-cdi", action="store_true", help="answer Allocate with device specs only, no CDI names")
    q.add_argument("--poll", type=float, default=5.0, metavar="SECONDS",
                   help="how often ListAndWatch looks at the devices' health (default 5)")
    common(q)
    q.set_defaults(func=cmd_device_plugin)

    q = verbs.add_parser("slices", help="print (or write) the node's ResourceSlices as JSON")
    q.add_argument("--node", required=True, help="this node's name")
    q.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    common(q)
    q.set_defaults(func=cmd_slices)
