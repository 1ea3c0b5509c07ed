"""pcipass.vfio against C doing the same work, side by side, on the lab's edu device.

    python bench/vfio_bench.py [--rounds R] [--only mmio-read,mmio-write,dma,irq]

Run outside the lab, it boots the lab and runs itself inside as root. Inside,
it claims the standalone edu for vfio-pci (`pcipass claim`), builds
bench/c/vfio_bench.c with gcc, and alternates C and Python rounds of each
workload (so both see the same machine load), then prints the median
nanoseconds per operation of each and the ratio Python / C:

    mmio-read    one 32-bit load from edu's liveness register (BAR0 + 4)
    mmio-write   one 32-bit store to it
    dma          VFIO_IOMMU_MAP_DMA + VFIO_IOMMU_UNMAP_DMA of 4 KiB at a fixed IOVA
    irq          edu raises an MSI (write 0x60) -> eventfd wakes the waiter -> acknowledge (0x64)
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
COUNTS = {"mmio-read": 20000, "mmio-write": 20000, "dma": 400, "irq": 400}
TARGETS = {"mmio-read": 2.0, "mmio-write": 2.0, "dma": 1.5, "irq": 1.5}


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


def python_round(dev, mode: str, n: int) -> float:  # type: ignore[no-untyped-def]
    from pcipass.device import IrqKind, SharedMemory
    from pcipass.vfio import uapi

    dev.bus_master(True)  # as the C side does: MSIs are memory writes by the device
    bar = dev.region(0)
    if mode == "mmio-read":
        read = bar.read
        t0 = time.perf_counter_ns()
        for _ in range(n):
            read(4, 4)
        t1 = time.perf_counter_ns()
    elif mode == "mmio-write":
        write = bar.write
        t0 = time.perf_counter_ns()
        for i in range(n):
            write(4, 4, i)
        t1 = time.perf_counter_ns()
    elif mode == "dma":
        space = dev.container.dma
        mem = SharedMemory(4096)
        vaddr = uapi.address_of(mem.map)
        t0 = time.perf_counter_ns()
        for _ in range(n):
            space.map_vaddr(vaddr, 0x100000, 4096)
            space.unmap(0x100000)
        t1 = time.perf_counter_ns()
        mem.close()
    else:
        (efd,) = dev.irq_enable(IrqKind.MSI)
        write = bar.write
        t0 = time.perf_counter_ns()
        for _ in range(n):
            write(0x60, 4, 0x8000)
            if not efd.wait(5.0):
                raise SystemExit("no interrupt")
            write(0x64, 4, 0x8000)
        t1 = time.perf_counter_ns()
        dev.irq_disable(IrqKind.MSI)
    return (t1 - t0) / n


def c_round(exe: str, group: str, bdf: str, mode: str, n: int) -> float:
    out = subprocess.run([exe, group, bdf, mode, str(n)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=",".join(COUNTS))
    args = parser.parse_args()
    if not in_lab():
        cmd = [sys.executable, "-m", "pcipass", "lab", "run", "--", sys.executable, str(Path(__file__).resolve()),
               "--rounds", str(args.rounds), "--only", args.only]
        return subprocess.call(cmd, cwd=ROOT)

    sys.path.insert(0, str(ROOT / "src"))
    from pcipass.vfio import open_device

    bdf = find_edu()
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    subprocess.run([sys.executable, "-m", "pcipass", "claim", bdf], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    try:
        exe = os.path.join(tempfile.mkdtemp(), "vfio_bench")
        subprocess.run(["gcc", "-O2", "-o", exe, str(HERE / "c" / "vfio_bench.c")], check=True)
        results: dict[str, tuple[list[float], list[float]]] = {}
        for mode in args.only.split(","):
            n = COUNTS[mode]
            c_runs, py_runs = [], []
            for _ in range(args.rounds):
                c_runs.append(c_round(exe, group, bdf, mode, n))
                with open_device(bdf) as dev:
                    py_runs.append(python_round(dev, mode, n))
            results[mode] = (c_runs, py_runs)
            report(mode, c_runs, py_runs)
    finally:
        subprocess.run([sys.executable, "-m", "pcipass", "release", bdf], cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"\nedu {bdf}, {args.rounds} rounds each, C and Python alternating; ns per operation (median)")
    print(f"{'workload':<12} {'C':>10} {'Python':>10} {'ratio':>7} {'target':>7}")
    for mode, (c_runs, py_runs) in results.items():
        c, py = statistics.median(c_runs), statistics.median(py_runs)
        ratio = py / c
        verdict = "ok" if ratio <= TARGETS[mode] else "MISSED"
        print(f"{mode:<12} {c:>10.0f} {py:>10.0f} {ratio:>6.2f}x {TARGETS[mode]:>6.1f}x {verdict}")
    return 0


def report(mode: str, c_runs: list[float], py_runs: list[float]) -> None:
    print(f"{mode}: C {[round(x) for x in c_runs]} Python {[round(x) for x in py_runs]} ns/op", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
