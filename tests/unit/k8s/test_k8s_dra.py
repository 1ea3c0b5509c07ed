"""The DRA kubelet plugin on synthetic trees: the Driver's logic in-process, then `pcipass k8s dra`
driven by the kubelet stand-in over its real sockets with real gRPC, including a plugin killed
mid-prepare and started again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("grpc")

from kubelet_standin import DraKubelet  # noqa: E402

from pcipass.host.fixtures import synthetic  # noqa: E402
from pcipass.host.present import cdi  # noqa: E402
from pcipass.host.transaction import claim as c  # noqa: E402
from pcipass.host.transaction.crash import CRASH_ENV  # noqa: E402
from pcipass.k8s import dra  # noqa: E402

NODE = "node-a"
EDU_PAIR = ["0000:02:0d.0", "0000:02:0d.1"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for name in ("PCIPASS_STATE_DIR", CRASH_ENV, dra.CRASH_ENV, cdi.DIR_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tree(tmp_path):
    return synthetic.seed_layout(str(tmp_path / "seed"))


@pytest.fixture
def kubelet_dir():
    """A short directory: a unix socket's path has at most 107 bytes (pytest's tmp_path is long)."""
    d = Path(tempfile.mkdtemp(prefix="kl", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def resource_claim(claims_dir: Path, name: str, uid: str, *devices: str, driver: str = "pcipass.io",
                   pool: str = NODE) -> dict[str, str]:
    """A ResourceClaim as the API server gives it once the scheduler allocated it; the Claim the
    kubelet sends for it."""
    obj = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
           "metadata": {"name": name, "namespace": "default", "uid": uid},
           "spec": {"devices": {"requests": [{"name": "vfio", "exactly": {"deviceClassName": "pcipass-vfio"}}]}},
           "status": {"allocation": {"devices": {"results": [
               {"request": "vfio", "driver": driver, "pool": pool, "device": d} for d in devices]}}}}
    (claims_dir / "default").mkdir(parents=True, exist_ok=True)
    (claims_dir / "default" / f"{name}.json").write_text(json.dumps(obj))
    return {"namespace": "default", "uid": uid, "name": name}


def drivers(root: str) -> dict[str, str | None]:
    w = c.Context(root=root).writer
    return {b: w.driver(b) for b in EDU_PAIR + ["0000:00:0a.0"]}


def spec(root: str, key: str = "2") -> Path:
    return Path(root) / "var/run/cdi" / f"pcipass.io-vfio_group-{key}.json"


def test_a_resource_claim_as_written_here_loads_into_the_kubernetes_models(tmp_path):
    k8s = pytest.importorskip("kubernetes")
    resource_claim(tmp_path, "vm", "u-1", "group-2")
    data = json.loads((tmp_path / "default/vm.json").read_text())
    obj = k8s.client.ApiClient()._ApiClient__deserialize(data, "ResourceV1ResourceClaim")
    assert obj.status.allocation.devices.results[0].device == "group-2"
    assert k8s.client.ApiClient().sanitize_for_serialization(obj) == data


def test_prepare_claims_the_group_and_unprepare_releases_it(tree, tmp_path):
    d = dra.Driver(tree.root, NODE, dra.DirectorySource(tmp_path / "claims"))
    before = drivers(tree.root)
    claim = resource_claim(tmp_path / "claims", "vm", "u-1", "group-2")
    got = d.prepare(claim)
    assert got == {"error": "", "devices": [{"request_names": ["vfio"], "pool_name": NODE, "device_name": "group-2",
                                             "cdi_device_ids": ["pcipass.io/vfio=group-2"]}]}
    assert {drivers(tree.root)[b] for b in EDU_PAIR} == {"vfio-pci"}
    assert spec(tree.root).exists()
    assert d.prepare(claim) == got  # again: the same answer, nothing more done
    assert d.unprepare(claim) == {"error": ""}
    assert drivers(tree.root) == before and not spec(tree.root).exists()
    assert d.unprepare(claim) == {"error": ""}  # again: nothing to do, success
    assert d.journal.records() == []


def test_a_group_claimed_by_hand_is_used_and_left_claimed(tree, tmp_path):
    c.claim(c.Context(root=tree.root), "0000:02:0d.0")
    d = dra.Driver(tree.root, NODE, dra.DirectorySource(tmp_path / "claims"))
    claim = resource_claim(tmp_path / "claims", "vm", "u-1", "group-2")
    assert d.prepare(claim)["error"] == ""
    assert d.unprepare(claim) == {"error": ""}
    assert c.status(c.Context(root=tree.root))["groups"][0]["state"] == "claimed"  # not ours to give back


@pytest.mark.parametrize("devices, driver, pool, code", [
    (("group-9",), "pcipass.io", NODE, "no device group-9"),
    (("group-2",), "other.example.com", NODE, "has no device of pcipass.io allocated"),
    (("group-2",), "pcipass.io", "node-b", "not this node's"),
])
def test_prepare_refusals_change_nothing(tree, tmp_path, devices, driver, pool, code):
    d = dra.Driver(tree.root, NODE, dra.DirectorySource(tmp_path / "claims"))
    before = drivers(tree.root)
    got = d.prepare(resource_claim(tmp_path / "claims", "vm", "u-1", *devices, driver=driver, pool=pool))
    assert got["devices"] == [] and code in got["error"]
    assert drivers(tree.root) == before and d.journal.records() == []


def test_a_group_serves_one_claim_at_a_time(tree, tmp_path):
    d = dra.Driver(tree.root, NODE, dra.DirectorySource(tmp_path / "claims"))
    assert d.prepare(resource_claim(tmp_path / "claims", "a", "u-a", "group-2"))["error"] == ""
    got = d.prepare(resource_claim(tmp_path / "claims", "b", "u-b", "group-2", "group-3"))
    assert "prepared for ResourceClaim u-a" in got["error"]
    assert drivers(tree.root)["0000:00:0a.0"] is None  # group 3 was not taken either


def test_a_failed_claim_rolls_back_the_groups_already_taken(tree, tmp_path, monkeypatch):
    d = dra.Driver(tree.root, NODE, dra.DirectorySource(tmp_path / "claims"))
    before = drivers(tree.root)
    real = c.claim

    def claim(ctx, bdf, *a, **kw):
        if bdf == "0000:00:0a.0":
            from pcipass.errors import PcipassError
            raise PcipassError("simulated", hint="none", code="claim-failed")
        return real(ctx, bdf, *a, **kw)
    monkeypatch.setattr(c, "claim", claim)
    got = d.prepare(resource_claim(tmp_path / "claims", "vm", "u-1", "group-2", "group-3"))
    assert "simulated" in got["error"]
    assert drivers(tree.root) == before and not spec(tree.root).exists() and d.journal.records() == []


@pytest.mark.parametrize("where", ["journaled", "claimed 2"])
def test_a_prepare_that_stopped_half_way_is_rolled_back_by_recover(tree, tmp_path, where):
    class Killed(BaseException):
        pass

    def crash(at):
        if at == where:
            raise Killed
    before = drivers(tree.root)
    claim = resource_claim(tmp_path / "claims", "vm", "u-1", "group-2", "group-3")
    with pytest.raises(Killed):
        dra.Driver(tree.root, NODE, dra.DirectorySource(tmp_path / "claims"), crash=crash).prepare(claim)
    d = dra.Driver(tree.root, NODE, dra.DirectorySource(tmp_path / "claims"))
    [rec] = d.journal.records()
    assert rec.state == dra.PREPARING and rec.taken == ["2", "3"]
    done = d.recover()
    assert any("rolled back a prepare" in line for line in done), done
    assert drivers(tree.root) == before and not spec(tree.root).exists() and d.journal.records() == []
    assert d.prepare(claim)["error"] == ""  # the kubelet's retry


# --- the real thing: `pcipass k8s dra` over its sockets ---

def start_plugin(tree, tmp_path, kubelet, **env) -> subprocess.Popen:
    claims = tmp_path / "claims"
    claims.mkdir(exist_ok=True)
    e = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    return subprocess.Popen(
        [sys.executable, "-m", "pcipass", "k8s", "dra", "--node", NODE, "--kubelet-dir", str(kubelet),
         "--claims-dir", str(claims), "--slices", str(tmp_path / "slices.json"), "--select", "1234:11e8",
         "--sysfs", tree.root], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def serving(p: subprocess.Popen) -> str:
    """The plugin's output up to its "serving" line (it has recovered and listens)."""
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "serving" in line:
            return "".join(lines)
    raise AssertionError("the plugin ended before serving:\n" + "".join(lines))


def stop(p: subprocess.Popen) -> str:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    return out


def test_the_kubelet_registers_the_plugin_prepares_and_unprepares(tree, tmp_path, kubelet_dir):
    p = start_plugin(tree, tmp_path, kubelet_dir)
    try:
        serving(p)
        kubelet = DraKubelet(kubelet_dir)
        info = kubelet.register()
        assert info["name"] == "pcipass.io" and info["type"] == "DRAPlugin"
        assert info["endpoint"] == str(kubelet_dir / "plugins/pcipass.io/dra.sock")
        assert kubelet.service.name == "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin"
        slices = json.loads((tmp_path / "slices.json").read_text())["items"]
        assert [d["name"] for d in slices[0]["spec"]["devices"]] == ["group-2", "group-3"]
        before = drivers(tree.root)
        a = resource_claim(tmp_path / "claims", "a", "u-a", "group-2")
        b = resource_claim(tmp_path / "claims", "b", "u-b", "group-3")
        got = kubelet.prepare(a, b)
        assert got["u-a"]["devices"][0]["cdi_device_ids"] == ["pcipass.io/vfio=group-2"]
        assert got["u-b"]["devices"][0]["cdi_device_ids"] == ["pcipass.io/vfio=group-3"]
        assert got["u-a"]["error"] == got["u-b"]["error"] == ""
        assert set(drivers(tree.root).values()) == {"vfio-pci"}
        assert json.loads(spec(tree.root).read_text())["devices"][0]["name"] == "group-2"
        assert kubelet.prepare(a) == {"u-a": got["u-a"]}  # repeated: the same
        assert kubelet.unprepare(a, b) == {"u-a": {"error": ""}, "u-b": {"error": ""}}
        assert kubelet.unprepare(a) == {"u-a": {"error": ""}}  # repeated: success
        assert drivers(tree.root) == before and not spec(tree.root).exists()
        kubelet.service = __import__("pcipass.k8s.api", fromlist=["api"]).DRA_SERVICE_V1BETA1
        assert kubelet.prepare(a)["u-a"]["error"] == ""  # an older kubelet's v1beta1 works too
        assert kubelet.unprepare(a) == {"u-a": {"error": ""}}
    finally:
        out = stop(p)
    assert p.returncode == 0, out
    assert "registered with the kubelet as pcipass.io" in out
    assert not (kubelet_dir / "plugins/pcipass.io/dra.sock").exists()


@pytest.mark.parametrize("env", [{"PCIPASS_CRASH_IN_PREPARE": "claimed 2"}, {CRASH_ENV: "3"}],
                         ids=["after-the-first-group", "inside-a-group-claim"])
def test_a_plugin_killed_mid_prepare_is_put_right_when_it_starts_again(tree, tmp_path, kubelet_dir, env):
    import grpc

    before = drivers(tree.root)
    claim = resource_claim(tmp_path / "claims", "vm", "u-1", "group-2", "group-3")
    p = start_plugin(tree, tmp_path, kubelet_dir, **env)
    try:
        serving(p)
        kubelet = DraKubelet(kubelet_dir)
        kubelet.register()
        with pytest.raises(grpc.RpcError) as e:
            kubelet.prepare(claim)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the plugin died under the call
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        stop(p)
    assert drivers(tree.root) != before  # it was killed with devices moved
    p = start_plugin(tree, tmp_path, kubelet_dir)
    try:
        started = serving(p)
        kubelet = DraKubelet(kubelet_dir)
        kubelet.register()
        assert drivers(tree.root) == before  # the start's recover put it right
        got = kubelet.prepare(claim)  # the kubelet's retry
        assert got["u-1"]["error"] == "" and len(got["u-1"]["devices"]) == 2
        assert kubelet.unprepare(claim) == {"u-1": {"error": ""}}
        assert drivers(tree.root) == before
    finally:
        out = started + stop(p)
    assert "rolled back a prepare that stopped half way" in out, out


def test_the_api_server_source_reads_claims_and_publishes_slices(tree, tmp_path):
    """pcipass.k8s.apiserver against an HTTP stand-in for the API server's resource.k8s.io/v1."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pcipass.errors import PcipassError
    from pcipass.k8s import apiserver, node

    claim = resource_claim(tmp_path / "claims", "vm", "u-1", "group-2")
    stored: dict[str, dict] = {}
    seen = []

    class Api(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def answer(self, code, obj=None):
            body = json.dumps(obj or {}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            seen.append(("GET", self.path, self.headers["Authorization"]))
            if self.path == "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/vm":
                return self.answer(200, json.loads((tmp_path / "claims/default/vm.json").read_text()))
            name = self.path.rsplit("/", 1)[-1]
            return self.answer(200, stored[name]) if name in stored else self.answer(404, {"kind": "Status"})

        def _put(self):
            obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.command, self.path, obj["metadata"].get("resourceVersion")))
            obj["metadata"]["resourceVersion"] = str(len(seen))
            stored[obj["metadata"]["name"]] = obj
            self.answer(201 if self.command == "POST" else 200, obj)

        do_POST = do_PUT = _put

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = apiserver.ApiServer(f"http://127.0.0.1:{server.server_port}", token="t0ken")
        d = dra.Driver(tree.root, NODE, api)
        assert d.prepare(claim)["devices"][0]["cdi_device_ids"] == ["pcipass.io/vfio=group-2"]
        assert seen[0] == ("GET", "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/vm", "Bearer t0ken")
        slices = node.resource_slices(node.groups(tree.root, [node.Selector.parse("1234:11e8")]), NODE)
        api.publish(slices)
        api.publish(slices)  # again: replaced, with the resourceVersion it has
        writes = [s for s in seen if s[0] in ("POST", "PUT")]
        assert writes == [("POST", "/apis/resource.k8s.io/v1/resourceslices", None),
                          ("PUT", f"/apis/resource.k8s.io/v1/resourceslices/{slices[0]['metadata']['name']}", "3")]
        with pytest.raises(PcipassError) as e:
            api.claim("default", "gone", "u-2")
        assert e.value.code == "no-claim"
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(PcipassError) as e:
        apiserver.ApiServer(f"http://127.0.0.1:{server.server_port}").claim("default", "vm", "u-1")
    assert e.value.code == "apiserver-unreachable"
