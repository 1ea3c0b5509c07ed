"""`pcipass serve --model edu` against a vfio-user client we did not write: QEMU 11.1's vfio-user-pci.

The server runs on the host as its own process; QEMU 11.1 (pcipass.lab.peer_qemu,
unpacked from trixie-backports) boots the lab's Debian kernel under TCG with a
busybox initramfs and the served edu on its PCI bus. The guest's /init finds the
device in sysfs and drives it through BAR0 with busybox devmem: config space as
the kernel enumerated it, the identification and liveness registers, a factorial,
an INTx counted by the kernel (uio_pci_generic holds the line), an MSI to a
vector programmed by hand, and a DMA round
trip through guest memory, once a memfd QEMU handed the server, once anonymous
memory reached with DMA_READ/DMA_WRITE messages to QEMU. A second model
(scratch) has QEMU map a sparse BAR and a whole one.

Skipped when the peer QEMU or the lab kernel is missing (`./bootstrap` fetches
both); with CI=true that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pcipass.errors import PcipassError
from pcipass.lab import initramfs, peer_qemu
from pcipass.lab import kernel as lab_kernel
from pcipass.lab.pytest_plugin import in_ci

SRC = Path(__file__).resolve().parents[2] / "src"
BOOT_SECONDS = 180  # a Debian kernel under TCG on a busy 2-CPU machine, then the checks
GUEST_MEMORY = "256M"
# Kept out of the kernel's RAM (memmap=...$...) so /dev/mem may reach it: the DMA target.
# Below 2**28: edu's DMA engine masks addresses to 28 bits.
DMA_PAGE = 0x8000000
MSI_VECTOR = 0xD9  # an x86 vector the guest's kernel has given no interrupt
UIO_MODULES = ("uio.ko", "uio_pci_generic.ko")

# The guest's /init: find the device (VENDOR:DEVICE) in sysfs as $DEV, its BARs as $BAR0 and
# $BAR2; the checks follow. Each check prints `RESULT name value`; the test reads them back
# from the console.
PREAMBLE = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
say() { echo "RESULT $1 $2"; }
reg() { printf '0x%x' $((BAR0 + $1)); }
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "VENDOR:DEVICE" ] && DEV=$d
done
if [ -z "$DEV" ]; then say device missing; poweroff -f; fi
BAR0=$(sed -n 1p $DEV/resource | cut -d' ' -f1)
BAR2=$(sed -n 3p $DEV/resource | cut -d' ' -f1)
"""


def _init(vendor: int, device: int, checks: str) -> str:
    return PREAMBLE.replace("VENDOR", f"{vendor:#06x}").replace("DEVICE", f"{device:#06x}") + checks


EDU_INIT = _init(0x1234, 0x11E8, r"""say edu $(basename $DEV)
say revision $(cat $DEV/revision)
say class $(cat $DEV/class)
say subsystem $(cat $DEV/subsystem_vendor):$(cat $DEV/subsystem_device)
say msi-cap $(od -An -tx1 -j64 -N1 $DEV/config | tr -d ' ')
insmod /uio.ko && insmod /uio_pci_generic.ko
# uio_pci_generic enables the device and holds its INTx line, so the kernel counts interrupts.
echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/new_id
# Bus mastering on (command register: memory + bus master), for the DMA below.
printf '\006' | dd of=$DEV/config bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
say command $(od -An -tx1 -j4 -N1 $DEV/config | tr -d ' ')
say ident $(devmem $(reg 0x00) 32)
devmem $(reg 0x04) 32 0x12345678
say liveness $(devmem $(reg 0x04) 32)
irqs() { grep uio_pci_generic /proc/interrupts | awk '{ s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }'; }
say irqs-before $(irqs)
devmem $(reg 0x20) 32 0x80
devmem $(reg 0x08) 32 12
while [ $(( $(devmem $(reg 0x20) 32) & 1 )) -ne 0 ]; do :; done
say factorial $(devmem $(reg 0x08) 32)
say irq-status $(devmem $(reg 0x24) 32)
devmem $(reg 0x64) 32 $(devmem $(reg 0x24) 32)
say irqs-after $(irqs)
devmem $(reg 0x20) 32 0
# DMA: guest memory -> edu's buffer -> guest memory one page on.
devmem DMA_PAGE 32 0xcafef00d
devmem $(printf '0x%x' $((DMA_PAGE + 4))) 32 0x600dd00d
dma() { devmem $(reg 0x80) 32 $1; devmem $(reg 0x88) 32 $2; devmem $(reg 0x90) 32 8; devmem $(reg 0x98) 32 $3
        while [ $(( $(devmem $(reg 0x98) 32) & 1 )) -ne 0 ]; do :; done; }
dma DMA_PAGE 0x40000 1
dma 0x40000 $(printf '0x%x' $((DMA_PAGE + 0x100))) 3
say dma $(devmem $(printf '0x%x' $((DMA_PAGE + 0x100))) 32):$(devmem $(printf '0x%x' $((DMA_PAGE + 0x104))) 32)
# MSI, programmed by hand (no driver here asks for it): to CPU 0's local APIC, a vector no
# handler owns, so the kernel names it when it arrives. QEMU turns the enable into SET_IRQS.
cfg() { printf "$2" | dd of=$DEV/config bs=1 seek=$1 conv=notrunc 2>/dev/null; }
cfg 68 '\000\000\340\376'; cfg 72 '\000\000\000\000'; cfg 76 'MSI_VECTOR_OCTAL\000'
cfg 66 '\201'
say msi-control $(od -An -tx1 -j66 -N1 $DEV/config | tr -d ' ')
devmem $(reg 0x60) 32 0x100
sleep 1
devmem $(reg 0x64) 32 0x100
say done yes
poweroff -f
""").replace("DMA_PAGE", hex(DMA_PAGE)).replace("MSI_VECTOR_OCTAL", f"\\{MSI_VECTOR:03o}")

EDU_EXPECTED = {
    "revision": "0x10",
    "class": "0x00ff00",
    "subsystem": "0x1af4:0x1100",
    "msi-cap": "05",
    "ident": "0x010000ED",
    "liveness": "0xEDCBA987",
    "factorial": "0x1C8CFC00",  # 12! = 479001600
    "dma": "0xCAFEF00D:0x600DD00D",
    "msi-control": "81",  # 64-bit, enabled
    "done": "yes",
}


# The scratch model: a trapped register page then three mapped pages in BAR0 (a sparse mmap
# area), BAR2 mapped whole. QEMU maps what the server offers; the rest goes by message.
SCRATCH_INIT = _init(0x1B36, 0x00FE, r"""echo 1 > $DEV/enable
devmem $(reg 0x0) 32 0x11223344
say scratch $(devmem $(reg 0x0) 32)
devmem $(reg 0x1000) 32 0xa5a5a5a5
devmem $(reg 0x3ffc) 32 0x5a5a5a5a
say bar0-mapped $(devmem $(reg 0x1000) 32):$(devmem $(reg 0x3ffc) 32)
devmem $BAR2 64 0x0123456789abcdef
say bar2 $(devmem $BAR2 64)
say writes $(devmem $(reg 0x8) 32)
say done yes
poweroff -f
""")

SCRATCH_EXPECTED = {
    "scratch": "0x11223344",
    "bar0-mapped": "0xA5A5A5A5:0x5A5A5A5A",
    "bar2": "0x0123456789ABCDEF",
    "writes": "0x00000001",  # the one trapped write; the others went to mapped memory
    "done": "yes",
}

def _require(what: str, get):  # type: ignore[no-untyped-def]
    try:
        return get()
    except PcipassError as exc:
        if in_ci():
            pytest.fail(f"CI: {what} is missing: {exc}")
        pytest.skip(f"{what} is missing: {exc.message} ({exc.hint})")


def _busybox() -> Path:
    if not initramfs.BUSYBOX.exists():
        raise PcipassError(f"no {initramfs.BUSYBOX}", hint="install busybox-static (./bootstrap does)")
    return initramfs.BUSYBOX


@pytest.fixture(scope="module")
def peer() -> peer_qemu.PeerQemu:
    return _require("the peer QEMU 11.1", peer_qemu.require)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def kernel() -> lab_kernel.Kernel:
    _require("busybox for the guest", _busybox)
    return _require("the lab's kernel", lab_kernel.require)  # type: ignore[no-any-return]


def _serve(model: str, socket_path: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    server = subprocess.Popen([sys.executable, "-m", "pcipass", "serve", "--model", model, "--socket",
                               str(socket_path), "--trace"], env=env, stdout=log.open("wb"),
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"pcipass serve did not start: {log.read_text(errors='replace')}")
        time.sleep(0.05)
    return server


@dataclass
class Boot:
    results: dict[str, str]  # the guest's `RESULT name value` lines
    console: str
    qemu_stderr: str | None  # None: QEMU timed out
    qemu_trace: str  # QEMU's trace events (-trace), where asked for
    server_log: str
    where: str  # everything above, for an assertion's message

    def refused(self) -> list[str]:
        """The server's refusals, but for the ERR and REQ interrupts this device has not."""
        return [line for line in self.server_log.splitlines()
                if ": refused" in line and "no ERR interrupt" not in line and "no REQ interrupt" not in line]


def _boot(tmp_path: Path, peer: peer_qemu.PeerQemu, kernel: lab_kernel.Kernel, model: str, init: str,
          trace: tuple[str, ...] = (), shared_memory: bool = True) -> Boot:
    """Serve `model`, boot the guest with it on QEMU 11.1's vfio-user-pci, return what both said.

    With `shared_memory`, guest RAM is a memfd QEMU hands the server with DMA_MAP; without,
    it is anonymous memory the server reaches only with DMA_READ/DMA_WRITE messages."""
    socket_path, server_log, console = tmp_path / "dev.sock", tmp_path / "server.log", tmp_path / "console.log"
    trace_log = tmp_path / "qemu-trace.log"
    modules = [(name, initramfs.FILE, next(kernel.modules.rglob(name)).read_bytes(), 0) for name in UIO_MODULES]
    ramdisk = tmp_path / "initramfs.cpio"
    ramdisk.write_bytes(initramfs.busybox_image(init, modules))
    server = _serve(model, socket_path, server_log)
    device = json.dumps({"driver": "vfio-user-pci", "socket": {"path": str(socket_path), "type": "unix"}})
    tracing = [a for event in trace for a in ("-trace", event)] + (["-D", str(trace_log)] if trace else [])
    command = peer.command(
        "-M", "q35", "-accel", "tcg", "-m", GUEST_MEMORY, "-nodefaults", "-display", "none", "-no-reboot",
        "-object", f"memory-backend-{'memfd' if shared_memory else 'ram'},id=mem,size={GUEST_MEMORY}"
        + (",share=on" if shared_memory else ""), "-machine", "memory-backend=mem",
        "-kernel", str(kernel.image), "-initrd", str(ramdisk), "-serial", f"file:{console}",
        "-append", f"console=ttyS0 panic=-1 loglevel=4 memmap=64K${DMA_PAGE:#x}",
        "-device", device, *tracing)
    try:
        qemu_stderr: str | None = subprocess.run(command, env=peer.environment(), capture_output=True, text=True,
                                                 timeout=BOOT_SECONDS, check=False).stderr
    except subprocess.TimeoutExpired:
        qemu_stderr = None
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    text = console.read_text(errors="replace") if console.exists() else ""
    log = server_log.read_text(errors="replace")
    where = (f"\n--- console ---\n{text[-4000:]}\n--- server ---\n{log[-4000:]}"
             + (f"\n--- qemu ---\n{qemu_stderr[-2000:]}" if qemu_stderr is not None else "\n--- qemu timed out ---"))
    results = dict(m.groups() for m in re.finditer(r"^RESULT (\S+) (.*?)\s*$", text, re.MULTILINE))
    return Boot(results, text, qemu_stderr, trace_log.read_text() if trace_log.exists() else "", log, where)


def _expect(boot: Boot, expected: dict[str, str]) -> None:
    for name, value in expected.items():
        assert boot.results.get(name) == value, f"{name}: got {boot.results.get(name)!r}, expected {value!r}{boot.where}"
    assert boot.qemu_stderr == "", f"QEMU complained{boot.where}"
    assert not boot.refused(), f"the server refused some of QEMU's messages: {boot.refused()}{boot.where}"


@pytest.mark.parametrize("shared_memory", [True, False], ids=["memfd", "dma-messages"])
def test_qemu_vfio_user_pci_drives_the_served_edu(tmp_path, peer, kernel, shared_memory):
    boot = _boot(tmp_path, peer, kernel, "edu", EDU_INIT, shared_memory=shared_memory,
                 trace=("vfio_user_recv_request",))
    _expect(boot, EDU_EXPECTED)
    # One factorial, one interrupt: the status bit told uio_pci_generic it was its own.
    assert (int(boot.results["irqs-before"]), int(boot.results["irqs-after"])) == (0, 1), boot.where
    assert boot.results["irq-status"] == "0x00000001", boot.where  # edu's factorial-done interrupt
    # MSI: QEMU passed the guest's enable on as SET_IRQS with an eventfd, and edu's interrupt
    # reached the guest's CPU on the programmed vector.
    assert "SET_IRQS index 1 flags 0x24 vectors 0+1 with 1 eventfds" in boot.server_log, boot.where
    assert re.search(rf"\.{MSI_VECTOR} No irq handler for vector", boot.console), boot.where
    # The server's requests to QEMU: none where it maps guest memory, else one DMA_READ (0xb)
    # and one DMA_WRITE (0xc), the two transfers.
    requests = re.findall(r"vfio_user_recv_request +command (0x[0-9a-f]+)", boot.qemu_trace)
    assert requests == ([] if shared_memory else ["0xb", "0xc"]), boot.qemu_trace


def test_qemu_maps_the_bars_the_server_offers(tmp_path, peer, kernel):
    boot = _boot(tmp_path, peer, kernel, "scratch", SCRATCH_INIT,
                 trace=("vfio_region_mmap", "vfio_region_sparse_mmap_entry", "vfio_user_region_rw"))
    _expect(boot, SCRATCH_EXPECTED)
    trace = boot.qemu_trace
    assert "sparse entry 0 [0x1000 - 0x3fff]" in trace, trace
    assert re.search(r"BAR 0 mmaps\[0\] \[0x1000 - 0x3fff\]", trace), trace
    assert re.search(r"BAR 2 mmaps\[0\] \[0x0 - 0xfff\]", trace), trace
    # By message only the trapped register page: the other accesses went through the mappings.
    by_message = re.findall(r"vfio_user_region_rw +region ([0-6]) offset (0x[0-9a-f]+)", trace)
    assert sorted(set(by_message)) == [("0", "0x0"), ("0", "0x8")], trace
