"""The edge: pcipass.k8s.api's services on gRPC (grpcio, the `pcipass[k8s]` extra) over unix
sockets. A server is built from a Service and an object with one method per RPC (taking the
request dict and returning the response dict, or yielding them for a stream); a client calls a
Service's methods by name with dicts. Bytes are made by pcipass.k8s.wire, nothing else."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

from pcipass.errors import PcipassError
from pcipass.k8s import wire
from pcipass.k8s.api import Service

SUN_PATH_MAX = 107  # sockaddr_un's sun_path, less its terminating NUL


def grpc_module() -> Any:
    try:
        import grpc
    except ImportError as exc:
        raise PcipassError("the Kubernetes plugins need grpcio", code="no-grpc",
                           hint="pip install 'pcipass[k8s]'") from exc
    return grpc


def _codec(service: Service, message: str) -> tuple[Callable[[bytes], dict], Callable[[dict], bytes]]:
    return (lambda data: wire.decode(service.schema, message, data),
            lambda obj: wire.encode(service.schema, message, obj))


def handler(service: Service, impl: object) -> Any:
    """The grpc generic handler that serves `service` with `impl`'s methods."""
    grpc = grpc_module()
    methods = {}
    for m in service.methods:
        fn = getattr(impl, m.name)
        decode_req, _ = _codec(service, m.request)
        _, encode_resp = _codec(service, m.response)

        def call(request: dict, context: Any, fn: Callable[..., Any] = fn) -> Any:
            return fn(request, context)
        make = grpc.unary_stream_rpc_method_handler if m.stream else grpc.unary_unary_rpc_method_handler
        methods[m.name] = make(call, request_deserializer=decode_req, response_serializer=encode_resp)
    return grpc.method_handlers_generic_handler(service.name, methods)


def serve(socket_path: str, services: list[tuple[Service, object]], workers: int = 4) -> Any:
    """A started grpc server on unix socket `socket_path` (a stale socket file is replaced)."""
    grpc = grpc_module()
    path = os.path.abspath(socket_path)
    if len(path.encode()) > SUN_PATH_MAX:
        raise PcipassError(f"the socket path {path} is longer than a unix socket's {SUN_PATH_MAX} bytes",
                           code="socket-path-too-long", hint="give a shorter --kubelet-dir")
    os.makedirs(os.path.dirname(socket_path) or ".", exist_ok=True)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers(tuple(handler(s, impl) for s, impl in services))
    try:
        bound = server.add_insecure_port(f"unix://{path}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise PcipassError(f"cannot listen on {socket_path}", code="socket-unusable",
                           hint="is the kubelet's directory mounted and writable?")
    server.start()
    return server


class Client:
    """Calls a Service's methods over a unix socket: `Client(path, service).call("GetInfo", {})`."""

    def __init__(self, socket_path: str, service: Service, timeout: float = 30.0) -> None:
        grpc = grpc_module()
        self.service = service
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{os.path.abspath(socket_path)}")

    def call(self, method: str, request: dict, timeout: float | None = None) -> dict:
        m = self.service.method(method)
        decode_resp, _ = _codec(self.service, m.response)
        _, encode_req = _codec(self.service, m.request)
        stub = self.channel.unary_unary(self.service.path(method), request_serializer=encode_req,
                                        response_deserializer=decode_resp)
        return stub(request, timeout=timeout or self.timeout)  # type: ignore[no-any-return]

    def stream(self, method: str, request: dict, timeout: float | None = None) -> Iterator[dict]:
        m = self.service.method(method)
        decode_resp, _ = _codec(self.service, m.response)
        _, encode_req = _codec(self.service, m.request)
        stub = self.channel.unary_stream(self.service.path(method), request_serializer=encode_req,
                                         response_deserializer=decode_resp)
        return stub(request, timeout=timeout)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
