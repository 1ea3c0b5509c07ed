"""The device plugin (v1beta1) on synthetic trees: the preferred allocation in-process, then
`pcipass k8s device-plugin` with the kubelet stand-in over the real sockets: Register, ListAndWatch
with health from the verdict, GetPreferredAllocation, Allocate, and a kubelet restart."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("grpc")

from kubelet_standin import DevicePluginKubelet  # noqa: E402

from pcipass import pci  # noqa: E402
from pcipass.host.fixtures import synthetic  # noqa: E402
from pcipass.host.present import cdi  # noqa: E402
from pcipass.host.transaction import claim as c  # noqa: E402
from pcipass.k8s import deviceplugin, node  # noqa: E402

EDU = (0x1234, 0x11E8, 0x00FF00)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for name in ("PCIPASS_STATE_DIR", cdi.DIR_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def kubelet_dir():
    d = Path(tempfile.mkdtemp(prefix="kl", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def numa_tree(root: str) -> synthetic.Tree:
    """Root ports on NUMA nodes 0 and 1: on node 0 a two-function edu card (one group) and a lone
    edu; on node 1 two lone edus."""
    t = synthetic.Tree(root, cmdline="intel_iommu=on")
    group = 0
    for port, bus, numa, funcs in (("0000:00:01.0", 1, 0, 2), ("0000:00:02.0", 2, 0, 1),
                                   ("0000:00:03.0", 3, 1, 1), ("0000:00:04.0", 4, 1, 1)):
        t.add(port, *synthetic.ROOT_PORT, driver="pcieport", group=group, express=pci.PCI_EXP_TYPE_ROOT_PORT,
              acs=synthetic.ACS_FULL, secondary_bus=bus, reset_method=None, numa_node=numa)
        group += 1
        for f in range(funcs):
            t.add(f"0000:{bus:02x}:00.{f}", *EDU, parent=port, group=group, numa_node=numa,
                  express=pci.PCI_EXP_TYPE_ENDPOINT, multifunction=funcs > 1 and f == 0, flr=True)
        group += 1
    return t


def test_preferred_takes_whole_groups_on_one_numa_node(tmp_path):
    t = numa_tree(str(tmp_path / "t"))
    groups = node.groups(t.root, [node.Selector.parse("1234:11e8")])
    assert [(g.key, g.bdfs, g.numa) for g in groups] == [
        ("1", ["0000:01:00.0", "0000:01:00.1"], 0), ("3", ["0000:02:00.0"], 0),
        ("5", ["0000:03:00.0"], 1), ("7", ["0000:04:00.0"], 1)]
    every = [b for g in groups for b in g.bdfs]
    # two: a whole group, not the halves of two; the node with the most to give (0) first
    assert deviceplugin.preferred(groups, every, [], 2) == ["0000:01:00.0", "0000:01:00.1"]
    # one: a lone function (the card's halves would split its group)
    assert deviceplugin.preferred(groups, every, [], 1) == ["0000:02:00.0"]
    # must include one on node 1: its NUMA node wins
    assert deviceplugin.preferred(groups, every, ["0000:03:00.0"], 2) == ["0000:03:00.0", "0000:04:00.0"]
    # must include half of the card: the other half comes with it
    assert deviceplugin.preferred(groups, every, ["0000:01:00.1"], 3) == [
        "0000:01:00.1", "0000:01:00.0", "0000:02:00.0"]
    # the card's other half is not available: whole groups still first, then what is left
    assert deviceplugin.preferred(groups, ["0000:01:00.0", "0000:03:00.0"], [], 2) == [
        "0000:03:00.0", "0000:01:00.0"]


def test_a_selector_is_vendor_device_in_hex():
    assert node.Selector.parse("8086:*") == node.Selector(0x8086, None)
    assert node.Selector.parse("all").matches(1, 2)
    from pcipass.errors import UsageError
    for bad in ("8086", "xyz:1", "1:2:3", ""):
        with pytest.raises(UsageError):
            node.Selector.parse(bad)


def start(root: str, kubelet_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-m", "pcipass", "k8s", "device-plugin", "--select", "1234:11e8",
                             "--kubelet-dir", str(kubelet_dir), "--sysfs", root, "--poll", "0.2", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(p: subprocess.Popen) -> str:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    return out


def until(q: queue.Queue, pred, timeout: float = 60.0):
    """The first item of `q` `pred` accepts (the ones before are dropped)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        item = q.get(timeout=max(0.1, deadline - time.monotonic()))
        if pred(item):
            return item


def test_the_kubelet_registers_watches_prefers_and_allocates(tmp_path, kubelet_dir):
    import grpc

    t = synthetic.seed_layout(str(tmp_path / "seed"))
    kubelet = DevicePluginKubelet(kubelet_dir)
    kubelet.start()
    p = start(t.root, kubelet_dir, "--claim")
    try:
        reg = kubelet.registrations.get(timeout=60)
        assert reg["version"] == "v1beta1" and reg["resource_name"] == "pcipass.io/vfio"
        assert reg["endpoint"] == "pcipass.sock" and reg["options"]["get_preferred_allocation_available"]
        plugin = kubelet.watch(reg)
        devices = until(kubelet.updates, lambda d: d)
        assert [(d["ID"], d["health"]) for d in devices] == [
            ("0000:02:0d.0", "Healthy"), ("0000:02:0d.1", "Healthy"), ("0000:00:0a.0", "Healthy")]
        assert c.status(c.Context(root=t.root))["groups"][0]["state"] == "claimed"  # --claim did
        opts = plugin.call("GetDevicePluginOptions", {})
        assert opts == {"pre_start_required": False, "get_preferred_allocation_available": True}
        ids = [d["ID"] for d in devices]
        pref = plugin.call("GetPreferredAllocation", {"container_requests": [
            {"available_deviceIDs": ids, "must_include_deviceIDs": [], "allocation_size": 2}]})
        assert pref["container_responses"][0]["deviceIDs"] == ["0000:02:0d.0", "0000:02:0d.1"]
        got = plugin.call("Allocate", {"container_requests": [{"devices_ids": ["0000:02:0d.0", "0000:02:0d.1"]},
                                                              {"devices_ids": ["0000:00:0a.0"]}]})
        first, second = got["container_responses"]
        assert [d["host_path"] for d in first["devices"]] == ["/dev/vfio/vfio", "/dev/vfio/2"]
        assert all(d["container_path"] == d["host_path"] and d["permissions"] == "rw" for d in first["devices"])
        assert first["envs"] == {"PCIPASS_GROUP_2": "0000:02:0d.0,0000:02:0d.1"}
        assert first["cdi_devices"] == [{"name": "pcipass.io/vfio=group-2"}]
        assert second["cdi_devices"] == [{"name": "pcipass.io/vfio=group-3"}]
        assert (Path(t.root) / "var/run/cdi/pcipass.io-vfio_group-2.json").exists()
        with pytest.raises(grpc.RpcError) as e:  # half a group: refused
            plugin.call("Allocate", {"container_requests": [{"devices_ids": ["0000:02:0d.0"]}]})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "whole group" in e.value.details()
        # The group given back by hand: ListAndWatch says so.
        c.release(c.Context(root=t.root), "0000:00:0a.0")
        devices = until(kubelet.updates, lambda d: d[2]["health"] == "Unhealthy")
        assert [d["health"] for d in devices] == ["Healthy", "Healthy", "Unhealthy"]
        # The kubelet restarts (its sockets go): the plugin registers again.
        kubelet.restart()
        again = kubelet.registrations.get(timeout=60)
        assert again["resource_name"] == "pcipass.io/vfio"
        plugin = kubelet.watch(again)
        assert len(until(kubelet.updates, lambda d: d)) == 3
    finally:
        out = stop(p)
        kubelet.stop()
    assert p.returncode == 0, out
    assert "claimed IOMMU group 2" in out and "claimed IOMMU group 3" in out
