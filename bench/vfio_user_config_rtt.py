"""vfio-user benchmarks, each side by side with its baseline in the same run.

1. A 4-byte configuration read, frontend -> backend -> frontend: pcipass's
   frontend against `pcipass serve --model edu` (a separate process: the
   policy, the model, the codec), and the same frontend against a minimal C
   server (bench/c/vfio_user_echo.c, built here with gcc) that answers with
   the same message sizes and does nothing else: the floor any server can
   reach on this socket. Target: within 1.3x.
2. A 4-byte BAR read and write through the area the backend offers for mmap
   (the scratch model's BAR2), against direct access to the same memory (a
   MappedWindow over the same memfd). Target: equal.

Blocks of the two sides alternate, so drift in machine load hits both.
usage: python bench/vfio_user_config_rtt.py [--rounds N] [--ops N]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
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


def build_echo(tmp: Path) -> Path:
    if not shutil.which("gcc"):
        sys.exit("gcc is needed to build the C baseline (apt-get install gcc)")
    exe = tmp / "vfio_user_echo"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "c" / "vfio_user_echo.c")], check=True)
    return exe


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"server did not start ({proc.args})")
        time.sleep(0.01)


def per_op(fn, ops: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(ops):
        fn()
    return (time.perf_counter_ns() - t0) / ops


def side_by_side(a, b, rounds: int, ops: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(per_op(a, ops))
        tb.append(per_op(b, ops))
    return statistics.median(ta), statistics.median(tb)


def config_rtt(tmp: Path, rounds: int, ops: int) -> tuple[float, float]:
    echo = build_echo(tmp)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    ours_sock, c_sock = tmp / "ours.sock", tmp / "c.sock"
    ours = subprocess.Popen([sys.executable, "-m", "pcipass", "serve", "--model", "edu", "--socket", str(ours_sock),
                             "--once"], env=env, stderr=subprocess.DEVNULL)
    c = subprocess.Popen([str(echo), str(c_sock)])
    try:
        wait_for(ours_sock, ours)
        wait_for(c_sock, c)
        with connect(ours_sock) as dev_ours, connect(c_sock) as dev_c:
            assert dev_ours.config_read(0, 4) == 0x11E81234  # it is the real thing
            return side_by_side(lambda: dev_ours.config_read(0, 4), lambda: dev_c.config_read(0, 4), rounds, ops)
    finally:
        for proc in (ours, c):
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pcipass-bench-") as d:
        tmp = Path(d)
        ours, floor = config_rtt(tmp, args.rounds, args.ops)
        (r_ours, r_direct), (w_ours, w_direct) = bar_access(tmp, args.rounds, args.ops * 50)
    print(f"{'benchmark':44} {'pcipass':>10} {'baseline':>10} {'ratio':>6}  target")
    print(f"{'4-byte config read round trip (us)':44} {ours / 1e3:10.2f} {floor / 1e3:10.2f} {ours / floor:6.2f}  "
          f"<= 1.3 (baseline: C echo server, same socket, same sizes)")
    print(f"{'4-byte BAR read via mapped area (ns)':44} {r_ours:10.1f} {r_direct:10.1f} {r_ours / r_direct:6.2f}  "
          f"~1.0 (baseline: MappedWindow on the same memfd)")
    print(f"{'4-byte BAR write via mapped area (ns)':44} {w_ours:10.1f} {w_direct:10.1f} {w_ours / w_direct:6.2f}  ~1.0")
    print(f"medians of {args.rounds} alternating blocks; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
