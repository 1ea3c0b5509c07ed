"""What the journal, lock and verdict cost: pcipass claim+release against bare sysfs writes.

Runs in the lab (root, real kernel):  pcipass lab run -- python bench/claim_release.py
For each device (the standalone edu, with no driver; the NVMe controller, on nvme), times
REPS rounds of (a) the bare writes a shell script would do (driver_override, unbind,
drivers_probe, and back) and (b) pcipass's claim then release through its API (verdict,
lock, write-ahead journal with fsync at every step), interleaved, and prints medians,
the ratio, and how much of pcipass's time is the read-only plan (model + verdict).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pcipass.host.transaction import claim as c
from pcipass.host.transaction.plan import VFIO, plan_claim
from pcipass.host.transaction.writer import SysfsWriter

PCI = Path("/sys/bus/pci/devices")
REPS = int(os.environ.get("REPS", "7"))


def ids(bdf: str) -> str:
    return f"{(PCI / bdf / 'vendor').read_text().strip()[2:]}:{(PCI / bdf / 'device').read_text().strip()[2:]}"


def find(want: str, standalone: bool = False) -> str:
    for p in sorted(PCI.iterdir()):
        if ids(p.name) == want:
            group = (p / "iommu_group").resolve() / "devices"
            if not standalone or len(list(group.iterdir())) == 1:
                return p.name
    raise SystemExit(f"no {want} device in this VM")


def write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def bare(bdf: str, native: str | None) -> None:
    """What a shell script does: override, unbind, probe; then clear, unbind, probe."""
    dev = PCI / bdf
    write(dev / "driver_override", "vfio-pci")
    if (dev / "driver").exists():
        write(dev / "driver" / "unbind", bdf)
    write(Path("/sys/bus/pci/drivers_probe"), bdf)
    assert os.path.basename(os.readlink(dev / "driver")) == "vfio-pci"
    write(dev / "driver_override", "\n")
    write(dev / "driver" / "unbind", bdf)
    write(Path("/sys/bus/pci/drivers_probe"), bdf)
    now = os.path.basename(os.readlink(dev / "driver")) if (dev / "driver").exists() else None
    assert now == native, now


def pcipass(bdf: str) -> None:
    ctx = c.Context("/")
    c.claim(ctx, bdf)
    c.release(ctx, bdf)


def main() -> int:
    if os.geteuid() != 0 or os.environ.get("PCIPASS_LAB_GUEST") != "1":
        print("run it in the lab: pcipass lab run -- python bench/claim_release.py", file=sys.stderr)
        return 2
    os.environ["PCIPASS_STATE_DIR"] = tempfile.mkdtemp(prefix="pcipass-bench-")
    SysfsWriter("/").modprobe(None, "vfio-pci")
    print(f"{'device':28} {'bare sysfs (ms)':>16} {'pcipass (ms)':>14} {'ratio':>7} "
          f"{'of which plan+verdict (ms)':>27}   ({REPS} rounds, medians)")
    for label, bdf in (("edu (no driver)", find("1234:11e8", standalone=True)),
                       ("nvme (nvme)", find("1b36:0010"))):
        native = SysfsWriter("/").driver(bdf)
        t_bare, t_pcipass, t_plan = [], [], []
        for _ in range(REPS):
            t0 = time.perf_counter()
            bare(bdf, native)
            t1 = time.perf_counter()
            pcipass(bdf)
            t2 = time.perf_counter()
            plan_claim("/", bdf, VFIO)
            t3 = time.perf_counter()
            t_bare.append(t1 - t0)
            t_pcipass.append(t2 - t1)
            t_plan.append(t3 - t2)
        mb, mp = statistics.median(t_bare) * 1e3, statistics.median(t_pcipass) * 1e3
        mplan = statistics.median(t_plan) * 1e3
        print(f"{label + ' ' + bdf:28} {mb:16.1f} {mp:14.1f} {mp / mb:7.2f} {mplan:27.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
