"""The API server, as a DRA driver in a pod talks to it: read a ResourceClaim, publish this
node's ResourceSlices. The standard library's HTTPS with the pod's service account (token and
CA under /var/run/secrets/kubernetes.io/serviceaccount), so the extra needs no Kubernetes client."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pcipass.errors import PcipassError

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
RESOURCE = "/apis/resource.k8s.io/v1"


class ApiServer:
    def __init__(self, base: str, token: str | None = None, ca_file: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_file) if base.startswith("https") else None

    @classmethod
    def in_cluster(cls) -> ApiServer:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise PcipassError("not in a pod: KUBERNETES_SERVICE_HOST is not set", code="no-apiserver",
                               hint="run it in the DaemonSet (deploy/k8s/), or give --claims-dir and --slices")
        with open(os.path.join(SERVICE_ACCOUNT, "token")) as f:
            token = f.read().strip()
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", token, os.path.join(SERVICE_ACCOUNT, "ca.crt"))

    def request(self, method: str, path: str, body: object | None = None) -> dict[str, Any] | None:
        """The decoded answer; None for 404."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.context) as resp:
                return json.loads(resp.read() or b"{}")  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            detail = exc.read().decode(errors="replace")[:300]
            raise PcipassError(f"the API server answered {method} {path} with {exc.code}: {detail}",
                               code="apiserver-error",
                               hint="the DaemonSet's ClusterRole (deploy/k8s/) grants what the plugin asks") from exc
        except OSError as exc:
            raise PcipassError(f"cannot reach the API server at {self.base}: {exc}", code="apiserver-unreachable",
                               hint="is the pod's network up? KUBERNETES_SERVICE_HOST and _PORT") from exc

    def claim(self, namespace: str, name: str, uid: str) -> dict[str, Any]:
        q = urllib.parse.quote
        obj = self.request("GET", f"{RESOURCE}/namespaces/{q(namespace)}/resourceclaims/{q(name)}")
        if obj is None:
            raise PcipassError(f"no ResourceClaim {namespace}/{name}", code="no-claim",
                               hint="it was deleted: the kubelet unprepares it")
        return obj

    def publish(self, slices: list[dict[str, Any]]) -> None:
        """Create or replace each ResourceSlice (by name)."""
        for s in slices:
            name = urllib.parse.quote(s["metadata"]["name"])
            current = self.request("GET", f"{RESOURCE}/resourceslices/{name}")
            if current is None:
                self.request("POST", f"{RESOURCE}/resourceslices", s)
            else:
                body = {**s, "metadata": {**s["metadata"],
                                          "resourceVersion": current["metadata"]["resourceVersion"]}}
                self.request("PUT", f"{RESOURCE}/resourceslices/{name}", body)
