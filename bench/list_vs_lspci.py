"""`pcipass list --json` against lspci on the same synthetic sysfs trees.

    python bench/list_vs_lspci.py [--sizes 256,1024,4096] [--runs 7]

For each size, a tree of that many PCI functions is written once
(pcipass.host.synthetic.many: root ports with ACS, 7 NVMe functions behind
each, one IOMMU group per function), then both commands run as processes,
alternating, `--runs` times each:

    pcipass list --json --sysfs ROOT          (stdout to a pipe, read fully)
    lspci -vmm -nn -D -A linux-sysfs -O sysfs.path=ROOT/sys/bus/pci

It prints the median wall time of each, the ratio pcipass/lspci, and how each
grows from one size to the next (x4 devices: linear means about x4). Python
start-up is in pcipass's time, as a user sees it; `pcipass in-process` is the
same listing timed inside one interpreter, without start-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)

from pcipass.host import inventory, synthetic  # noqa: E402
from pcipass.host.pciids import PciIds  # noqa: E402
from pcipass.host.sysfs import Host  # noqa: E402


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({res.returncode}): {res.stderr.decode()[-400:]}")
    return elapsed


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
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), PYTHONDONTWRITEBYTECODE="1")
    ids = PciIds()
    rows = []
    try:
        for n in sizes:
            root = os.path.join(base, f"tree-{n}")
            if not os.path.exists(os.path.join(root, "sys")):
                synthetic.many(root, n)
            count = len(Host(root).devices())
            ours = [sys.executable, "-m", "pcipass", "list", "--json", "--sysfs", root]
            theirs = ["lspci", "-vmm", "-nn", "-D", "-A", "linux-sysfs", "-O", f"sysfs.path={root}/sys/bus/pci"]
            # One untimed run of each warms the page and dentry caches for both alike.
            timed(ours, env), timed(theirs, env)
            t_ours, t_theirs, t_inproc = [], [], []
            for i in range(args.runs):
                pair = [(ours, t_ours), (theirs, t_theirs)]
                for argv, into in pair if i % 2 == 0 else reversed(pair):
                    into.append(timed(argv, env))
                t = time.perf_counter()
                inventory.list_doc(Host(root), ids)
                t_inproc.append(time.perf_counter() - t)
            rows.append((count, statistics.median(t_ours), statistics.median(t_theirs), statistics.median(t_inproc)))
            print(f"  {count} devices measured", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print(f"{'devices':>8} {'pcipass s':>10} {'lspci s':>9} {'ratio':>6} {'in-process s':>13} "
          f"{'growth pcipass':>15} {'growth lspci':>13}")
    prev = None
    for count, ours, theirs, inproc in rows:
        grow = ("", "")
        if prev:
            grow = (f"x{ours / prev[1]:.2f}", f"x{theirs / prev[2]:.2f}")
        print(f"{count:>8} {ours:>10.3f} {theirs:>9.3f} {ours / theirs:>6.2f} {inproc:>13.3f} "
              f"{grow[0]:>15} {grow[1]:>13}")
        prev = (count, ours, theirs)
    print(f"(median of {args.runs} runs each, alternating; ratio = pcipass / lspci, below 1 is faster; "
          f"growth = time over the previous size's, for x{sizes[1] // sizes[0] if len(sizes) > 1 else 1} devices)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
