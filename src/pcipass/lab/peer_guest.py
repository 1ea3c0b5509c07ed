"""A small guest on the peer QEMU (11.1) with one device on `vfio-user-pci`, checked from inside.

`pcipass serve ... --trace` runs as its own process; QEMU boots the lab's
Debian kernel under TCG with a busybox initramfs (pcipass.lab.initramfs)
whose /init finds the device in sysfs, drives it through its BARs with
`devmem` and prints `RESULT name value` lines on the serial console. What
both sides said comes back as a `Boot`.

Used by tests/interop (the server on the host, serving a model) and by the
lab test tests/lab/test_serve_to_qemu.py (the server inside the lab guest
serving QEMU 7.2's real edu through vfio-pci, QEMU 11.1 nested there).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pcipass.errors import PcipassError
from pcipass.lab import initramfs
from pcipass.lab.kernel import Kernel
from pcipass.lab.nested import transcript
from pcipass.lab.peer_qemu import PeerQemu

SRC = Path(__file__).resolve().parents[2]  # the pcipass the server runs: this one
GUEST_MEMORY = "256M"
# Kept out of the kernel's RAM (memmap=...$...) so /dev/mem may reach it: the DMA target.
# Below 2**28: edu's DMA engine masks addresses to 28 bits.
DMA_PAGE = 0x8000000
MSI_VECTOR = 0xD9  # an x86 vector the guest's kernel has given no interrupt
UIO_MODULES = ("uio.ko", "uio_pci_generic.ko")
# How long vfio-user-pci waits for a reply (its x-msg-timeout; QEMU's own default is 5 s). Under
# TCG, and TCG inside TCG in the lab guest, a loaded 2-core host has held a reply back past 5 s
# (QEMU then printed "vfio_wait_reqs - timed out" and, when it came, "unexpected reply").
REPLY_WAIT_MS = 60_000

# The guest's /init: find the device (VENDOR:DEVICE) in sysfs as $DEV, its BARs as $BAR0 and
# $BAR2; the checks follow. Each check prints `RESULT name value`.
PREAMBLE = initramfs.INIT_START + r"""reg() { printf '0x%x' $((BAR0 + $1)); }
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "VENDOR:DEVICE" ] && DEV=$d
done
if [ -z "$DEV" ]; then say device missing; poweroff -f; fi
BAR0=$(sed -n 1p $DEV/resource | cut -d' ' -f1)
BAR2=$(sed -n 3p $DEV/resource | cut -d' ' -f1)
"""


def init_script(vendor: int, device: int, checks: str) -> str:
    """An /init that finds VENDOR:DEVICE and runs `checks` (shell) against it."""
    return PREAMBLE.replace("VENDOR", f"{vendor:#06x}").replace("DEVICE", f"{device:#06x}") + checks


# QEMU's edu (or the model of it): config space as the guest's kernel enumerated it, the
# identification and liveness registers, a factorial polled and its INTx counted by the kernel
# (uio_pci_generic holds the line), a DMA round trip through guest memory, an MSI to a vector
# programmed by hand.
EDU_INIT = init_script(0x1234, 0x11E8, r"""say edu $(basename $DEV)
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
# The MSI's arrival, as the guest's kernel reports a vector no handler owns.
MSI_ARRIVED = re.compile(rf"\.{MSI_VECTOR} No irq handler for vector")


def require_busybox() -> Path:
    """The busybox the guest's initramfs is made of."""
    if not initramfs.BUSYBOX.exists():
        raise PcipassError(f"no {initramfs.BUSYBOX}", hint="install busybox-static (./bootstrap does)",
                           code="no-busybox")
    return initramfs.BUSYBOX


def serve(args: Sequence[str], socket_path: Path, log: Path, *, start_timeout: float = 30) -> subprocess.Popen[bytes]:
    """`pcipass serve ARGS --socket PATH --trace` as its own process, once its socket is there."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "pcipass", "serve", *args, "--socket", str(socket_path),
                                   "--trace"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + start_timeout
    while not socket_path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise PcipassError(f"pcipass serve {' '.join(args)} did not start: {log.read_text(errors='replace')}",
                               hint="run the same command by hand to see why", code="serve-start")
        time.sleep(0.05)
    return server


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@dataclass
class Boot:
    results: dict[str, str]  # the guest's `RESULT name value` lines
    console: str
    qemu_stderr: str | None  # None: QEMU timed out
    qemu_trace: str  # QEMU's trace events (-trace), where asked for
    server_log: str
    seconds: float  # from QEMU's start to its exit

    @property
    def where(self) -> str:
        """Everything both sides said, for an assertion's message."""
        return transcript([("console", self.console), ("server", self.server_log)], self.qemu_stderr, self.seconds)

    def refused(self) -> list[str]:
        """The server's refusals, but for the ERR and REQ interrupts this device has not."""
        return [line for line in self.server_log.splitlines()
                if ": refused" in line and "no ERR interrupt" not in line and "no REQ interrupt" not in line]

    def mismatches(self, expected: dict[str, str]) -> list[str]:
        """What the guest reported differently from `expected`."""
        return [f"{name}: got {self.results.get(name)!r}, expected {value!r}"
                for name, value in expected.items() if self.results.get(name) != value]


def boot(workdir: Path, peer: PeerQemu, kernel: Kernel, socket_path: Path, init: str, *,
         server: subprocess.Popen[bytes], server_log: Path, trace: Sequence[str] = (),
         shared_memory: bool = True, timeout: float = 180, tcg: str = "tcg") -> Boot:
    """Boot a guest with the device served on `socket_path` and `init` as its /init; stop
    `server` once QEMU is done and return what both said.

    With `shared_memory`, guest RAM is a memfd QEMU hands the server with DMA_MAP; without,
    it is anonymous memory the server reaches only with DMA_READ/DMA_WRITE messages.
    `tcg`: QEMU's -accel argument."""
    console, trace_log = workdir / "console.log", workdir / "qemu-trace.log"
    modules = [(name, initramfs.FILE, next(kernel.modules.rglob(name)).read_bytes(), 0) for name in UIO_MODULES]
    ramdisk = workdir / "initramfs.cpio"
    ramdisk.write_bytes(initramfs.busybox_image(init, modules))
    device = json.dumps({"driver": "vfio-user-pci", "socket": {"path": str(socket_path), "type": "unix"},
                         "x-msg-timeout": REPLY_WAIT_MS})
    tracing = [a for event in trace for a in ("-trace", event)] + (["-D", str(trace_log)] if trace else [])
    command = peer.command(
        "-M", "q35", "-accel", tcg, "-m", GUEST_MEMORY, "-nodefaults", "-display", "none", "-no-reboot",
        "-object", f"memory-backend-{'memfd' if shared_memory else 'ram'},id=mem,size={GUEST_MEMORY}"
        + (",share=on" if shared_memory else ""), "-machine", "memory-backend=mem",
        "-kernel", str(kernel.image), "-initrd", str(ramdisk), "-serial", f"file:{console}",
        "-append", f"console=ttyS0 panic=-1 loglevel=4 memmap=64K${DMA_PAGE:#x}",
        "-device", device, *tracing)
    started = time.monotonic()
    try:
        qemu_stderr: str | None = subprocess.run(command, env=peer.environment(), capture_output=True, text=True,
                                                 timeout=timeout, check=False).stderr
    except subprocess.TimeoutExpired:
        qemu_stderr = None
    finally:
        seconds = time.monotonic() - started
        stop(server)
    text = console.read_text(errors="replace") if console.exists() else ""
    results: dict[str, str] = {m[1]: m[2] for m in re.finditer(r"^RESULT (\S+) (.*?)\s*$", text, re.MULTILINE)}
    return Boot(results, text, qemu_stderr, trace_log.read_text() if trace_log.exists() else "",
                server_log.read_text(errors="replace"), seconds)
