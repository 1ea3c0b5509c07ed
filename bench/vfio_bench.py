"""pcipass.vfio against C doing the same work, side by side, on the lab's edu device.

    python bench/vfio_bench.py [--rounds R] [--only mmio-read,mmio-write,dma,irq] [--cpu N]

Run outside the lab, it boots the lab and runs itself inside as root. Inside,
it claims the standalone edu for vfio-pci (`pcipass claim`), builds
bench/c/vfio_bench.c with gcc, and alternates C and Python rounds of each
workload (so both see the same machine load), then prints the median over
rounds of the nanoseconds per operation of each, and the ratio Python / C:

    mmio-read    one 32-bit load from edu's liveness register (BAR0 + 4)
    mmio-write   one 32-bit store to it
    dma          VFIO_IOMMU_MAP_DMA + VFIO_IOMMU_UNMAP_DMA of 4 KiB at a fixed IOVA
    irq          edu raises an MSI (write 0x60) -> the eventfd is read (and, if not signalled
                 yet, poll()ed first) -> acknowledge (0x64); C and Python make the same
                 system calls, as EventFd.wait does them

Both sides run on one CPU (--cpu, default 0), and the MSI is routed to that CPU:
the lab has two vCPUs, and an interrupt taken on the other one costs 50-90 us
more under TCG (an IPI to a halted vCPU and back), which made C's irq rounds
bimodal depending on where the scheduler put it.

The "floor" column is the Python loop itself with each library call replaced by
a call to a function that does nothing: what the interpreter costs before any
device work, the least any Python API could cost here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EDU = ("0x1234", "0x11e8")
COUNTS = {"mmio-read": 50000, "mmio-write": 50000, "dma": 1000, "irq": 1000}
TARGETS = {"mmio-read": 2.0, "mmio-write": 2.0, "dma": 1.5, "irq": 1.5}
IOVA = 0x100000


def in_lab() -> bool:
    return os.environ.get("PCIPASS_LAB_GUEST") == "1" and os.geteuid() == 0


def find_edu() -> str:
    pci = Path("/sys/bus/pci/devices")
    for dev in sorted(pci.iterdir()):
        ids = ((dev / "vendor").read_text().strip(), (dev / "device").read_text().strip())
        group = (dev / "iommu_group").resolve() / "devices"
        if ids == EDU and len(list(group.iterdir())) == 1:
            return dev.name
    sys.exit("no standalone edu device here")


def _nothing(a: object, b: object = None, c: object = None) -> int:
    return 1


def python_round(dev, mode: str, n: int, floor: bool = False) -> float:  # type: ignore[no-untyped-def]
    """ns per operation of one round; `floor`: the same loop, every library call replaced by _nothing."""
    from pcipass.device import IrqKind, SharedMemory
    from pcipass.vfio import uapi

    dev.bus_master(True)  # as the C side does: MSIs are memory writes by the device
    bar = dev.region(0)
    read, write = (_nothing, _nothing) if floor else (bar.read, bar.write)
    if mode == "mmio-read":
        t0 = time.perf_counter_ns()
        for _ in range(n):
            read(4, 4)
        t1 = time.perf_counter_ns()
    elif mode == "mmio-write":
        t0 = time.perf_counter_ns()
        for i in range(n):
            write(4, 4, i)
        t1 = time.perf_counter_ns()
    elif mode == "dma":
        space = dev.container.dma
        map_vaddr, unmap = (_nothing, _nothing) if floor else (space.map_vaddr, space.unmap)
        mem = SharedMemory(4096)
        vaddr = uapi.address_of(mem.map)
        t0 = time.perf_counter_ns()
        for _ in range(n):
            map_vaddr(vaddr, IOVA, 4096)
            unmap(IOVA)
        t1 = time.perf_counter_ns()
        mem.close()
    else:
        (efd,) = dev.irq_enable(IrqKind.MSI)
        wait = _nothing if floor else efd.wait
        t0 = time.perf_counter_ns()
        for _ in range(n):
            write(0x60, 4, 0x8000)
            if not wait(5.0):
                raise SystemExit("no interrupt")
            write(0x64, 4, 0x8000)
        t1 = time.perf_counter_ns()
        dev.irq_disable(IrqKind.MSI)
    return (t1 - t0) / n


def pin(cpu: int) -> str:
    """Run on `cpu` (the C program inherits it) and route new interrupts there; returns the old IRQ mask."""
    os.sched_setaffinity(0, {cpu})
    path = Path("/proc/irq/default_smp_affinity")
    old = path.read_text().strip()
    path.write_text(f"{1 << cpu:x}")
    return old


def c_round(exe: str, group: str, bdf: str, mode: str, n: int) -> float:
    out = subprocess.run([exe, group, bdf, mode, str(n)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=",".join(COUNTS))
    parser.add_argument("--cpu", type=int, default=0, help="the CPU both sides and the MSI run on")
    args = parser.parse_args()
    if not in_lab():
        cmd = [sys.executable, "-m", "pcipass", "lab", "run", "--", sys.executable, str(Path(__file__).resolve()),
               "--rounds", str(args.rounds), "--only", args.only, "--cpu", str(args.cpu)]
        return subprocess.call(cmd, cwd=ROOT)

    sys.path.insert(0, str(ROOT / "src"))
    from pcipass.vfio import open_device

    bdf = find_edu()
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    subprocess.run([sys.executable, "-m", "pcipass", "claim", bdf], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    old_mask = pin(args.cpu)
    try:
        exe = os.path.join(tempfile.mkdtemp(), "vfio_bench")
        subprocess.run(["gcc", "-O2", "-o", exe, str(HERE / "c" / "vfio_bench.c")], check=True)
        results: dict[str, tuple[list[float], list[float], list[float]]] = {}
        for mode in args.only.split(","):
            n = COUNTS[mode]
            c_runs, py_runs, floor_runs = [], [], []
            for _ in range(args.rounds):
                c_runs.append(c_round(exe, group, bdf, mode, n))
                with open_device(bdf) as dev:
                    py_runs.append(python_round(dev, mode, n))
                    floor_runs.append(python_round(dev, mode, n, floor=True))
            results[mode] = (c_runs, py_runs, floor_runs)
            report(mode, c_runs, py_runs, floor_runs)
    finally:
        Path("/proc/irq/default_smp_affinity").write_text(old_mask)
        subprocess.run([sys.executable, "-m", "pcipass", "release", bdf], cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"\nedu {bdf}, {args.rounds} rounds each, C and Python alternating, on CPU {args.cpu} with the MSI "
          "routed there; ns per operation (median of the rounds)")
    print(f"{'workload':<12} {'C':>10} {'Python':>10} {'floor':>10} {'ratio':>7} {'target':>7}")
    for mode, (c_runs, py_runs, floor_runs) in results.items():
        c, py, floor = (statistics.median(runs) for runs in (c_runs, py_runs, floor_runs))
        ratio = py / c
        verdict = "ok" if ratio <= TARGETS[mode] else "MISSED"
        print(f"{mode:<12} {c:>10.0f} {py:>10.0f} {floor:>10.0f} {ratio:>6.2f}x {TARGETS[mode]:>6.1f}x {verdict}")
    return 0


def report(mode: str, c_runs: list[float], py_runs: list[float], floor_runs: list[float]) -> None:
    print(f"{mode}: C {[round(x) for x in c_runs]} Python {[round(x) for x in py_runs]} "
          f"floor {[round(x) for x in floor_runs]} ns/op", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
