"""The Kubernetes objects pcipass writes or ships, validated as Kubernetes objects: each is
loaded into the `kubernetes` Python client's models (required fields checked there) and must
come back unchanged (a misspelt or misplaced field would be dropped), and the ResourceSlices
are held to resource.k8s.io/v1's limits on names, attributes and sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pcipass.host.fixtures import synthetic
from pcipass.host.transaction import claim as c
from pcipass.k8s import node

k8s = pytest.importorskip("kubernetes")
yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "k8s"
MODELS = {("v1", "Namespace"): "V1Namespace", ("v1", "ServiceAccount"): "V1ServiceAccount",
          ("v1", "Pod"): "V1Pod", ("apps/v1", "DaemonSet"): "V1DaemonSet",
          ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
          ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
          ("resource.k8s.io/v1", "DeviceClass"): "V1DeviceClass",
          ("resource.k8s.io/v1", "ResourceClaimTemplate"): "V1ResourceClaimTemplate",
          ("resource.k8s.io/v1", "ResourceSlice"): "V1ResourceSlice"}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


def load(obj: dict):
    """The client's model of `obj`, after checking it round-trips unchanged."""
    api = k8s.client.ApiClient()
    model = api._ApiClient__deserialize(obj, MODELS[obj["apiVersion"], obj["kind"]])
    assert api.sanitize_for_serialization(model) == obj
    return model


def test_the_loader_catches_a_misspelt_field():
    good = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}}
    load(good)
    with pytest.raises(AssertionError):
        load({**good, "metadata": {"name": "x", "lables": {"a": "b"}}})
    with pytest.raises(ValueError):  # a required field missing
        load({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
              "metadata": {"name": "x"}})


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_each_manifest_is_kubernetes_objects(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for d in docs:
        load(d)


def test_the_daemonsets_mount_what_the_plugins_use():
    ds = {d["metadata"]["name"]: d for p in DEPLOY.glob("*.yaml") for d in yaml.safe_load_all(p.read_text())
          if d and d["kind"] == "DaemonSet"}
    for name, kubelet in (("pcipass-dra", ["/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins"]),
                          ("pcipass-device-plugin", ["/var/lib/kubelet/device-plugins"])):
        pod = ds[name]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["securityContext"]["privileged"] is True
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert set(kubelet + ["/sys", "/dev", "/run/pcipass", "/var/run/cdi"]) <= mounts
        host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
        assert all(host[m["name"]] == m["mountPath"] for m in container["volumeMounts"])
        assert container["command"][:3] == ["pcipass", "k8s", name.removeprefix("pcipass-")]


def check_slice(s: dict) -> None:
    spec = s["spec"]
    assert len(spec["devices"]) <= 128 and DNS_LABEL.match(s["metadata"]["name"])
    for d in spec["devices"]:
        assert DNS_LABEL.match(d["name"]) and len(d["name"]) <= 63
        assert len(d["attributes"]) <= 32
        for name, value in d["attributes"].items():
            assert C_IDENTIFIER.match(name) and len(name) <= 32, name
            [(kind, v)] = value.items()  # exactly one of int, bool, string, version
            assert kind in ("int", "bool", "string", "version")
            if kind == "string":
                assert len(v) <= 64


def test_the_resource_slices_of_a_node(tmp_path):
    t = synthetic.seed_layout(str(tmp_path / "seed"))
    c.claim(c.Context(root=t.root), "0000:00:0a.0")  # a claimed group is published too
    groups = node.groups(t.root, [node.Selector.parse("1234:11e8")])
    [s] = node.resource_slices(groups, "node-a")
    check_slice(s)
    model = load(s)
    assert model.spec.pool.name == "node-a" and model.spec.driver == "pcipass.io"
    by = {d["name"]: d["attributes"] for d in s["spec"]["devices"]}
    assert by["group-2"] == {"pciAddress": {"string": "0000:02:0d.0"}, "vendorID": {"string": "0x1234"},
                             "deviceID": {"string": "0x11e8"}, "iommuGroup": {"int": 2},
                             "functions": {"int": 2}, "sriov": {"string": "none"},
                             "pciAddresses": {"string": "0000:02:0d.0,0000:02:0d.1"}}
    assert by["group-3"]["iommuGroup"] == {"int": 3}
    json.dumps(s)  # plain JSON


def test_sriov_roles_numa_and_many_devices(tmp_path):
    t = synthetic.sriov(str(tmp_path / "sriov"), vfs=2)
    groups = node.groups(t.root, [node.Selector.parse("8086:*")])
    assert [(g.key, g.functions[0].role) for g in groups] == [("1", "pf"), ("2", "vf"), ("3", "vf")]
    many = synthetic.many(str(tmp_path / "many"), 300)
    groups = node.groups(many.root, [node.Selector.parse("all")])
    slices = node.resource_slices([g for g in groups if g.healthy], "n1")
    assert len(slices) > 1 and all(s["spec"]["pool"]["resourceSliceCount"] == len(slices) for s in slices)
    for s in slices:
        check_slice(s)
        load(s)
