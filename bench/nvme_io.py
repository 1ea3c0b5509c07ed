"""Read latency of the Python NVMe driver against the kernel's nvme driver, same controller.

Runs in the lab (root, real kernel):  pcipass lab run -- python bench/nvme_io.py
For QEMU's NVMe controller, ROUNDS times: OPS reads of each SIZE through the
kernel (O_DIRECT preadv on /dev/nvmeXn1, so each read is one command to the
controller), then the controller is claimed for vfio-pci and the same reads go
through pcipass.drivers.nvme with MSI-X completions (as scheduled, and pinned
to the CPU the interrupt is delivered to) and with polling; then it is
released to the kernel again. Prints per-read medians and the ratios to the
kernel. Under TCG every number is slow; the ratios are what to look at.
"""

from __future__ import annotations

import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pcipass.drivers.nvme import NvmeController
from pcipass.host.transaction import claim as c
from pcipass.vfio import open_device

PCI = Path("/sys/bus/pci/devices")
QEMU_NVME = "1b36:0010"
OPS = int(os.environ.get("OPS", "200"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
SIZES = (4096, 128 * 1024)  # one page (PRP1 only) and 32 pages (a PRP list)
SPAN = 32 << 20  # reads are spread over the first 32 MiB
MODES = (("pcipass MSI-X", True), ("pcipass MSI-X pinned", True), ("pcipass polling", False))


def ids(bdf: str) -> str:
    dev = PCI / bdf
    return f"{(dev / 'vendor').read_text().strip()[2:]}:{(dev / 'device').read_text().strip()[2:]}"


def block_device(bdf: str, timeout: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ns in sorted((PCI / bdf).glob("nvme/nvme*/nvme*n1")):
            if Path("/dev", ns.name).exists():
                return Path("/dev", ns.name)
        time.sleep(0.2)
    raise SystemExit(f"{bdf}: the kernel's nvme driver did not show its namespace")


def offsets(size: int) -> list[int]:
    step = SPAN // OPS - (SPAN // OPS) % size
    return [(n * step) % (SPAN - size) // size * size for n in range(OPS)]


def kernel_reads(disk: Path, size: int) -> list[float]:
    buffer = mmap.mmap(-1, size)  # page aligned, as O_DIRECT wants
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
    times = []
    try:
        for off in offsets(size):
            t = time.perf_counter()
            os.preadv(fd, [buffer], off)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        buffer.close()
    return times


def driver_reads(nvme: NvmeController, size: int) -> list[float]:
    block = nvme.block_size
    times = []
    for off in offsets(size):
        t = time.perf_counter()
        nvme.read(off // block, size // block)
        times.append(time.perf_counter() - t)
    return times


def msix_irq_cpu(bdf: str, vector: int) -> int | None:
    """The CPU the kernel delivers this vfio MSI-X vector to (its effective affinity)."""
    with open("/proc/interrupts") as f:
        for line in f:
            if line.rstrip().endswith(f"vfio-msix[{vector}]({bdf})"):
                irq = line.split(":")[0].strip()
                cpus = Path(f"/proc/irq/{irq}/effective_affinity_list").read_text().strip()
                return int(cpus.split(",")[0].split("-")[0])
    return None


def main() -> int:
    if os.geteuid() != 0:
        print("run it in the lab: pcipass lab run -- python bench/nvme_io.py", file=sys.stderr)
        return 2
    bdf = next((p.name for p in sorted(PCI.iterdir()) if ids(p.name) == QEMU_NVME), None)
    if bdf is None:
        print("no QEMU NVMe controller (1b36:0010) here", file=sys.stderr)
        return 2
    os.environ.setdefault("PCIPASS_STATE_DIR", tempfile.mkdtemp(prefix="pcipass-bench-"))
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(ROUNDS):
        disk = block_device(bdf)
        for size in SIZES:
            results.setdefault(("kernel nvme", size), []).extend(kernel_reads(disk, size))
        c.claim(c.Context("/"), bdf)
        try:
            device = open_device(bdf)
            try:
                for mode, irq in MODES:
                    with NvmeController(device, interrupts=irq) as nvme:
                        cpus = os.sched_getaffinity(0)
                        if mode.endswith("pinned"):
                            # Sleep on the CPU the interrupt arrives on: no cross-CPU wake-up.
                            cpu = msix_irq_cpu(bdf, 1)
                            assert cpu is not None, "no vfio-msix[1] line in /proc/interrupts"
                            os.sched_setaffinity(0, {cpu})
                        try:
                            for size in SIZES:
                                results.setdefault((mode, size), []).extend(
                                    driver_reads(nvme, size)
                                )
                        finally:
                            os.sched_setaffinity(0, cpus)
            finally:
                device.close()
        finally:
            c.release(c.Context("/"), bdf)

    print(
        f"NVMe reads on {bdf} (QEMU, TCG, {os.cpu_count()} vCPUs): "
        f"{ROUNDS} rounds x {OPS} reads, per-read median"
    )
    print(f"{'path':<22}{'size':>8}{'median us':>12}{'vs kernel':>11}")
    for size in SIZES:
        base = statistics.median(results[("kernel nvme", size)])
        for mode in ("kernel nvme", *(m for m, _ in MODES)):
            median = statistics.median(results[(mode, size)])
            print(f"{mode:<22}{size // 1024:>6}Ki{median * 1e6:>12.1f}{median / base:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
