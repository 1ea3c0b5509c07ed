"""vfio-user benchmarks, each side by side with its baselines in the same run.

1. Servers, one small C client (bench/c/vfio_user_client.c, built here with
   gcc): 4-byte REGION_READs, one in flight, of config space (region 7) and of
   edu's trapped BAR0, against `pcipass serve --model edu`, a bare Python
   responder (recv, a fixed reply with the request's id, no parsing; this
   file, --bare-responder), the C echo server (bench/c/vfio_user_echo.c) and,
   with --peer CMD, a server built by hand (CMD is run with {socket} replaced
   by the socket path; e.g. libvfio-user's gpio sample). Target: pcipass
   serve within 1.15x of the bare Python responder.
2. Clients, against the C echo server: pcipass's frontend (`connect()`,
   config_read(0, 4)) and a bare Python client (send a prepared request,
   recv the reply, nothing else). Target: within 1.15x.
3. A 4-byte BAR read and write through the area the backend offers for mmap
   (the scratch model's BAR2), against direct access to the same memory (a
   MappedWindow over the same memfd). Target: equal.

Rounds of every side alternate, so drift in machine load hits all of them;
medians of the rounds are printed.
usage: python bench/vfio_user_config_rtt.py [--rounds N] [--ops N] [--peer CMD]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from pcipass import models
from pcipass.device import MappedWindow
from pcipass.domain import connect
from pcipass.domain.backend import ModelBackend
from pcipass.domain.server import Server


def build(tmp: Path, name: str) -> Path:
    if not shutil.which("gcc"):
        sys.exit("gcc is needed to build the C baselines (apt-get install gcc)")
    exe = tmp / name
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "c" / f"{name}.c")], check=True)
    return exe


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"server did not start ({proc.args})")
        time.sleep(0.01)
    time.sleep(0.05)  # bound is not listening yet for some servers


IDENT = 0x11E81234  # edu's vendor and device ids, config dword 0


def bare_responder(path: str) -> None:
    """recv, then a fixed 4-byte REGION_READ reply with the request's id: no parsing."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    conn, _ = listener.accept()
    buf = bytearray(1 << 16)
    n = conn.recv_into(buf)  # VERSION: answered with its own payload (a valid reply)
    version = bytearray(buf[:n])
    version[8:12] = struct.pack("=I", 1)
    conn.send(version)
    reply = bytearray(struct.pack("=HHIIIQIII", 0, 9, 36, 1, 0, 0, 7, 4, IDENT))
    recv_into, send = conn.recv_into, conn.send
    while recv_into(buf):
        reply[0:2] = buf[0:2]
        send(reply)


class CClient:
    """The C client, connected; run(ops) is one round."""

    def __init__(self, exe: Path, path: Path, region: int, offset: int, ops: int) -> None:
        self.proc = subprocess.Popen([str(exe), str(path), str(region), str(offset), str(ops)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def round(self) -> float:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the C client failed ({self.proc.args})")
        return float(line)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(10)


def bare_client(path: Path):
    """A Python client with nothing in it: a prepared request, send, recv."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    version = b"{}\0"
    sock.send(struct.pack("=HHIIIHH", 0, 1, 20 + len(version), 0, 0, 0, 1) + version)
    sock.recv(1 << 16)
    request = bytearray(struct.pack("=HHIIIQII", 1, 9, 32, 0, 0, 0, 7, 4))
    send, recv = sock.send, sock.recv

    def read() -> None:
        send(request)
        if len(recv(4096)) != 36:
            sys.exit("the bare client got a short reply")
    return sock, read


def rounds_of(sides: dict, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def per_op(fn, ops: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(ops):
        fn()
    return (time.perf_counter_ns() - t0) / ops


def side_by_side(a, b, rounds: int, ops: int) -> tuple[float, float]:
    out = rounds_of({"a": lambda: per_op(a, ops), "b": lambda: per_op(b, ops)}, rounds)
    return out["a"], out["b"]


def servers(tmp: Path, rounds: int, ops: int, peer: str | None) -> dict[str, dict[str, float]]:
    """C client round trips (ns) per server: config space and, where it has one, edu's trapped BAR0."""
    client, echo = build(tmp, "vfio_user_client"), build(tmp, "vfio_user_echo")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    socks = {name: tmp / f"{name}.sock" for name in ("pcipass", "bare", "echo", "peer", "pcipass-bar0")}
    serve = [sys.executable, "-m", "pcipass", "serve", "--model", "edu", "--once", "--socket"]
    procs = {
        "pcipass": subprocess.Popen(serve + [str(socks["pcipass"])], env=env, stderr=subprocess.DEVNULL),
        "bare": subprocess.Popen([sys.executable, __file__, "--bare-responder", str(socks["bare"])], env=env),
        "echo": subprocess.Popen([str(echo), str(socks["echo"])]),
    }
    if peer:
        # No shell: the server itself is the child, so the kill below reaches it.
        procs["peer"] = subprocess.Popen([w.replace("{socket}", str(socks["peer"])) for w in shlex.split(peer)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A second pcipass serve (one client each): edu's BAR0 is trapped (no mmap), every read a message.
    procs["pcipass-bar0"] = subprocess.Popen(serve + [str(socks["pcipass-bar0"])], env=env, stderr=subprocess.DEVNULL)
    clients: dict[str, CClient] = {}
    try:
        for name, proc in procs.items():
            wait_for(socks[name], proc)
        clients = {f"{name} config": CClient(client, socks[name], 7, 0, ops) for name in procs if name != "pcipass-bar0"}
        clients["pcipass bar0"] = CClient(client, socks["pcipass-bar0"], 0, 0, ops)  # edu's ident register
        medians = rounds_of({k: c.round for k, c in clients.items()}, rounds)
    finally:
        for c in clients.values():
            c.close()
        if "peer" in procs:  # a server of its own kind: it may serve on after its client
            procs["peer"].terminate()
        for proc in procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"config": {n: medians[f"{n} config"] for n in procs if n != "pcipass-bar0"}, "bar0": {"pcipass": medians["pcipass bar0"]}}


def clients(tmp: Path, rounds: int, ops: int) -> tuple[float, float]:
    """pcipass's frontend and the bare Python client against the C echo server (ns per read)."""
    echo = build(tmp, "vfio_user_echo")
    paths = [tmp / "echo-frontend.sock", tmp / "echo-bare.sock"]
    procs = [subprocess.Popen([str(echo), str(p)]) for p in paths]
    try:
        for path, proc in zip(paths, procs):
            wait_for(path, proc)
        with connect(paths[0], twin_socket=False) as dev:  # the echo would echo the proposal back
            sock, read = bare_client(paths[1])
            try:
                return side_by_side(lambda: dev.config_read(0, 4), read, rounds, ops)
            finally:
                sock.close()
    finally:
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def bar_access(tmp: Path, rounds: int, ops: int) -> tuple[tuple[float, float], tuple[float, float]]:
    model = models.create("scratch")
    server = Server(ModelBackend(model), tmp / "scratch.sock")
    thread = threading.Thread(target=server.serve_one, daemon=True)
    thread.start()
    try:
        with connect(server.path) as dev:
            bar = dev.region(2)
            assert bar.info.mappable
            mem = model.regions[2].memory
            m = mmap.mmap(mem.fd, mem.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            direct = MappedWindow(m, "direct")
            bar.write(8, 4, 0xA5A5A5A5)
            assert direct.read(8, 4) == 0xA5A5A5A5  # the same memory
            reads = side_by_side(lambda: bar.read(8, 4), lambda: direct.read(8, 4), rounds, ops)
            writes = side_by_side(lambda: bar.write(8, 4, 1), lambda: direct.write(8, 4, 1), rounds, ops)
            direct.release()
            m.close()
        thread.join(5)
        return reads, writes
    finally:
        server.close()
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--peer", metavar="CMD", help="a server built by hand, started as CMD with {socket} replaced")
    parser.add_argument("--bare-responder", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_responder:
        bare_responder(args.bare_responder)
        return
    with tempfile.TemporaryDirectory(prefix="pcipass-bench-") as d:
        tmp = Path(d)
        srv = servers(tmp, args.rounds, args.ops, args.peer)
        front, bare = clients(tmp, args.rounds, args.ops)
        (r_ours, r_direct), (w_ours, w_direct) = bar_access(tmp, args.rounds, args.ops * 50)
    cfg, bare_resp = srv["config"], srv["config"]["bare"]
    print("4-byte REGION_READ round trip, one in flight, the C client (us; ratio to the bare Python responder):")
    names = {"pcipass": "pcipass serve --model edu", "bare": "bare Python responder", "echo": "C echo server",
             "peer": f"--peer {Path(args.peer.split()[0]).name}" if args.peer else ""}
    for name, ns in cfg.items():
        print(f"  {names[name]:44} config {ns / 1e3:7.2f}  {ns / bare_resp:5.2f}x")
    bar0 = srv["bar0"]["pcipass"]
    print(f"  {'pcipass serve --model edu, trapped BAR0':44} bar0   {bar0 / 1e3:7.2f}  {bar0 / bare_resp:5.2f}x"
          f"  ({bar0 / cfg['pcipass']:.2f}x its config read)")
    print("  target: pcipass serve <= 1.15x the bare Python responder")
    print("4-byte config read round trip against the C echo server (us):")
    print(f"  {'pcipass frontend, connect().config_read':44} {front / 1e3:7.2f}  {front / bare:5.2f}x")
    print(f"  {'bare Python client':44} {bare / 1e3:7.2f}  1.00x   target: frontend <= 1.15x")
    print(f"{'4-byte BAR read via mapped area (ns)':46} {r_ours:8.1f} vs direct {r_direct:8.1f}  {r_ours / r_direct:5.2f}x")
    print(f"{'4-byte BAR write via mapped area (ns)':46} {w_ours:8.1f} vs direct {w_direct:8.1f}  {w_ours / w_direct:5.2f}x")
    print(f"medians of {args.rounds} alternating rounds of {args.ops}; {os.cpu_count()} CPUs; "
          f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
