"""`pcipass list --json` against lspci on the same synthetic sysfs trees.

    python bench/list_vs_lspci.py [--sizes 256,1024,4096] [--runs 7]

For each size, a tree of that many PCI functions is written once
(pcipass.host.synthetic.many: root ports with ACS, 7 NVMe functions behind
each, one IOMMU group per function), then both commands run as processes,
alternating, `--runs` times each:

    pcipass list --json --sysfs ROOT          (stdout to a pipe, read fully)
    lspci -vmm -nn -D -A linux-sysfs -O sysfs.path=ROOT/sys/bus/pci

It prints the median wall time of each, the ratio pcipass/lspci, and how each
grows from one size to the next (x4 devices: linear means about x4), in wall
time and in CPU time (user+system of the process, steadier on a shared
machine). Python start-up (with cached bytecode, as an installed package has)
is in pcipass's time, as a user sees it; `py start` is a bare `python -c pass`
timed alongside (the interpreter's own start on this machine, which pcipass
cannot shorten), `in-proc` is the same listing timed inside one
interpreter, without start-up, and `syscalls` is Python making only the
system calls that listing makes for each device (PciDevice._load's), decoding
nothing: the floor of any listing in Python that reads what pcipass reads.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)

from pcipass.host.fixtures import synthetic
from pcipass.host.model.pciids import PciIds
from pcipass.host.model.sysfs import Host
from pcipass.host.present import inventory


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+system) of one run; runs are sequential, so the
    children's rusage delta is this run's."""
    cpu, t = _children_cpu(), time.perf_counter()
    res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({res.returncode}): {res.stderr.decode()[-400:]}")
    return elapsed, _children_cpu() - cpu


def syscalls_only(root: str) -> float:
    """Seconds for the system calls of PciDevice._load on every device, and nothing else."""
    devices = os.path.join(root, "sys/bus/pci/devices")
    t = time.perf_counter()
    dir_fd = os.open(devices, os.O_PATH | os.O_DIRECTORY)
    for name in os.listdir(devices):
        os.readlink(name, dir_fd=dir_fd)
        dev_fd = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=dir_fd)
        for attr in ("config", "class", "driver_override", "numa_node", "reset_method"):
            try:
                fd = os.open(attr, os.O_RDONLY, dir_fd=dev_fd)
            except OSError:
                continue
            os.read(fd, 65536)
            os.close(fd)
        for link in ("driver", "iommu_group", "physfn"):
            try:
                os.readlink(link, dir_fd=dev_fd)
            except OSError:
                pass
        os.close(dev_fd)
    os.close(dir_fd)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024,4096")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--keep", metavar="DIR", help="build the trees under DIR and keep them")
    args = ap.parse_args()
    if not shutil.which("lspci"):
        print("lspci (pciutils) is not installed: nothing to compare against", file=sys.stderr)
        return 1
    sizes = [int(s) for s in args.sizes.split(",")]
    base = args.keep or tempfile.mkdtemp(prefix="pcipass-bench-")
    # Bytecode is cached (in a scratch prefix, not the checkout), as it is for an installed
    # package: otherwise every run would compile pcipass from source first.
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), PYTHONPYCACHEPREFIX=os.path.join(base, "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    ids = PciIds()
    rows = []
    try:
        for n in sizes:
            root = os.path.join(base, f"tree-{n}")
            if not os.path.exists(os.path.join(root, "sys")):
                synthetic.many(root, n)
            count = len(Host(root).devices())
            ours = [sys.executable, "-m", "pcipass", "list", "--json", "--sysfs", root]
            bare = [sys.executable, "-c", "pass"]
            theirs = ["lspci", "-vmm", "-nn", "-D", "-A", "linux-sysfs", "-O", f"sysfs.path={root}/sys/bus/pci"]
            # One untimed run of each warms the page and dentry caches for both alike.
            timed(ours, env), timed(theirs, env)
            t_ours, t_theirs, t_inproc, t_bare, t_sys = [], [], [], [], []
            for i in range(args.runs):
                pair = [(ours, t_ours), (theirs, t_theirs)]
                for argv, into in pair if i % 2 == 0 else reversed(pair):
                    into.append(timed(argv, env))
                t_bare.append(timed(bare, env))
                t = time.perf_counter()
                inventory.list_doc(Host(root), ids)
                t_inproc.append(time.perf_counter() - t)
                t_sys.append(syscalls_only(root))
            med = lambda runs, i: statistics.median(r[i] for r in runs)
            rows.append((count, med(t_ours, 0), med(t_theirs, 0), statistics.median(t_inproc),
                         med(t_ours, 1), med(t_theirs, 1), med(t_bare, 0), statistics.median(t_sys)))
            print(f"  {count} devices measured", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print("wall time (what a user waits for) and CPU time (user+system: steadier on a busy machine)")
    print(f"{'devices':>8} {'pcipass s':>10} {'lspci s':>9} {'ratio':>6} {'py start s':>10} {'in-proc s':>10} {'syscalls s':>10} "
          f"{'cpu pcipass':>12} {'cpu lspci':>10} {'cpu ratio':>10} {'growth wall':>14} {'growth cpu':>14}")
    prev = None
    for count, ours, theirs, inproc, cpu_ours, cpu_theirs, bare, sys_only in rows:
        grow_w = grow_c = ""
        if prev:
            grow_w = f"x{ours / prev[1]:.2f}/x{theirs / prev[2]:.2f}"
            grow_c = f"x{cpu_ours / prev[3]:.2f}/x{cpu_theirs / max(prev[4], 1e-9):.2f}"
        print(f"{count:>8} {ours:>10.3f} {theirs:>9.3f} {ours / theirs:>6.2f} {bare:>10.3f} {inproc:>10.3f} {sys_only:>10.3f} "
              f"{cpu_ours:>12.3f} {cpu_theirs:>10.3f} {cpu_ours / max(cpu_theirs, 1e-9):>10.2f} "
              f"{grow_w:>14} {grow_c:>14}")
        prev = (count, ours, theirs, cpu_ours, cpu_theirs)
    print(f"(median of {args.runs} runs each, alternating; ratio = pcipass / lspci, below 1 is faster; "
          f"growth = pcipass/lspci time over the previous size's; linear is about "
          f"x{sizes[1] // sizes[0] if len(sizes) > 1 else 1})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
