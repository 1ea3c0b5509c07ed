"""A VM nested in the lab guest on the distro's QEMU (7.2), given devices by vfio-pci, checked from inside.

In the lab guest (as root, or as the user a claim gave /dev/vfio/N to), Debian's
qemu-system-x86_64 boots the lab's kernel under TCG with exactly the arguments
`pcipass config qemu BDF...` printed. The guest is a busybox initramfs
(pcipass.lab.initramfs) with only the kernel modules its checks need; its
/init prints `RESULT name value` lines on the serial console, collected in a
`Run`.

The kernel is booted as PVH: QEMU loads the uncompressed ELF and jumps to its
32-bit entry, skipping the BIOS's Linux loader and the XZ decompression. At
the top level of TCG that took a boot to /init from 12.7 s to 4.3 s, and nested
TCG is slower still.

Used by tests/lab/test_qemu_vfio.py and by `pcipass lab demo`.
"""

from __future__ import annotations

import hashlib
import lzma
import mmap
import os
import pwd
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pcipass.errors import PcipassError
from pcipass.lab import initramfs
from pcipass.lab.kernel import Kernel

QEMU = "qemu-system-x86_64"
# The PVH kernel sits from 16 to 74 MiB; 96 MiB boots but spends longer, 64 does not boot.
MEMORY_MIB = 128
# QEMU pins all guest RAM through VFIO, and its firmware and option ROMs beside it.
MEMLOCK_BYTES = (MEMORY_MIB + 32) << 20
# A small translation cache: QEMU's default reserves up to 1 GiB, the lab guest has 2.
ACCEL = "tcg,tb-size=64"
KERNEL_ARGS = "console=ttyS0 panic=-1 loglevel=4"
SRC = Path(__file__).resolve().parents[2]  # the pcipass whose `config qemu` is asked

PCI = Path("/sys/bus/pci/devices")
XZ_MAGIC = b"\xfd7zXZ\x00"

PREAMBLE = initramfs.INIT_START + r"""say uptime-init $(cut -d' ' -f1 /proc/uptime)
"""
DONE = r"""say uptime-done $(cut -d' ' -f1 /proc/uptime)
"""
POWER_OFF = "poweroff -f\n"
# For a VM that someone else stops (`virsh destroy`): a guest that powered off by itself would
# end a libvirt domain before its host had looked at it running.
IDLE = "while :; do sleep 3600; done\n"


def results(console: str) -> dict[str, str]:
    """The guest's `RESULT name value` lines (from `say`) in `console`, by name."""
    return {m[1]: m[2] for m in re.finditer(r"^RESULT (\S+) (.*?)\s*$", console, re.MULTILINE)}


def init_script(*checks: str, then: str = POWER_OFF) -> str:
    """The guest's /init: each of `checks` (shell) in turn, then `then` (power off)."""
    return PREAMBLE + "".join(checks) + DONE + then


# Every edu function the guest has: its identification register and the liveness register
# (which reads back the complement of what was written), through BAR0 with devmem. No driver
# enables the device, so memory decoding is switched on in its command register by hand.
EDU_CHECKS = r"""for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "0x1234:0x11e8" ] || continue
  f=$(basename $d)
  printf '\002' | dd of=$d/config bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
  bar=$(sed -n 1p $d/resource | cut -d' ' -f1)
  live=$(printf '0x%x' $((bar + 4)))
  say edu-$f-ident $(devmem $bar 32)
  devmem $live 32 0x12345678
  say edu-$f-liveness $(devmem $live 32)
done
"""
EDU_IDENT = "0x010000ED"
EDU_LIVENESS = "0xEDCBA987"  # ~0x12345678


def edu_results(results: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """Guest BDF -> (identification, liveness) as the guest read them."""
    found = sorted({m[1] for name in results if (m := re.fullmatch(r"edu-(.+)-ident", name))})
    return {b: (results.get(f"edu-{b}-ident"), results.get(f"edu-{b}-liveness")) for b in found}


# Every e1000e the guest has: receive address 0 (RAL0, RAH0 in BAR0), which the NIC loads from
# its EEPROM's MAC at reset. No driver, memory decoding switched on by hand, as for edu.
E1000E_CHECKS = r"""for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "0x8086:0x10d3" ] || continue
  f=$(basename $d)
  printf '\002' | dd of=$d/config bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
  bar=$(sed -n 1p $d/resource | cut -d' ' -f1)
  say e1000e-$f-ral $(devmem $(printf '0x%x' $((bar + 0x5400))) 32)
  say e1000e-$f-rah $(devmem $(printf '0x%x' $((bar + 0x5404))) 32)
done
"""


def e1000e_macs(results: dict[str, str]) -> dict[str, str]:
    """Guest BDF -> the MAC its e1000e holds in receive address 0 (aa:bb:cc:dd:ee:ff), as read."""
    out = {}
    for name, value in results.items():
        if (m := re.fullmatch(r"e1000e-(.+)-ral", name)) and f"e1000e-{m[1]}-rah" in results:
            low, high = int(value, 16), int(results[f"e1000e-{m[1]}-rah"], 16)
            out[m[1]] = ":".join(f"{b:02x}" for b in (low.to_bytes(4, "little") + (high & 0xFFFF).to_bytes(2, "little")))
    return out


# ---- NVMe: a block the host writes before the claim, one the guest writes back ---------------

NVME_MODULES = ("nvme",)
BLOCK = 4096
HOST_BLOCK_OFFSET = 1 << 20  # the host writes here before the claim; the guest reads it
GUEST_BLOCK_OFFSET = HOST_BLOCK_OFFSET + BLOCK  # the guest writes here; the host reads it after
GUEST_BLOCK_FILE = "guest-block"  # in the initramfs: what the guest writes
# How long the guest's /init waits for its nvme driver to show the namespace (tenths of a second).
NVME_WAIT_TENTHS = 1200

NVME_CHECKS = r"""for m in {modules}; do insmod /$m; done
n=0
while [ ! -b /dev/nvme0n1 ] && [ $n -lt {wait} ]; do sleep 0.1; n=$((n + 1)); done
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/class)" = "0x010802" ] && say nvme-driver $(basename $d)=$(basename $(readlink $d/driver))
done
say nvme-serial $(cat /sys/class/nvme/nvme0/serial)
say nvme-read $(dd if=/dev/nvme0n1 bs={block} skip={host} count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
dd if=/{file} of=/dev/nvme0n1 bs={block} seek={guest} count=1 oflag=direct conv=fsync 2>/dev/null \
  && say nvme-wrote $(sha256sum /{file} | cut -d' ' -f1)
"""


def block_device(bdf: str) -> Path | None:
    """/dev/nvmeXn1 of the kernel's nvme driver on `bdf`, once it has probed the namespace."""
    for ns in sorted((PCI / bdf).glob("nvme/nvme*/nvme*n1")):
        if Path("/dev", ns.name).exists():
            return Path("/dev", ns.name)
    return None


def wait_for_block_device(bdf: str, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while (dev := block_device(bdf)) is None:
        if time.monotonic() > deadline:
            raise PcipassError(f"{bdf} shows no namespace block device after {timeout:.0f} s",
                               hint="is it bound to nvme? (pcipass status, dmesg)", code="nested-no-disk")
        time.sleep(0.2)
    return dev


def _direct(dev: Path, offset: int, data: bytes | None = None) -> bytes:
    """Read (or write `data` to) one BLOCK at `offset` of `dev`, past the page cache (O_DIRECT
    wants an aligned buffer: an anonymous mapping is page-aligned)."""
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(dev, (os.O_RDONLY if data is None else os.O_WRONLY) | os.O_DIRECT)
    try:
        if data is None:
            assert os.preadv(fd, [buf], offset) == BLOCK
        else:
            buf[:] = data
            assert os.pwritev(fd, [buf], offset) == BLOCK
            os.fsync(fd)
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class NvmeExchange:
    """The blocks of one round trip: random, so nothing left from an earlier run can pass."""

    host_block: bytes
    guest_block: bytes

    @classmethod
    def new(cls) -> NvmeExchange:
        return cls(os.urandom(BLOCK), os.urandom(BLOCK))

    def write_host_block(self, bdf: str) -> Path:
        """Through the host's nvme driver, before the claim."""
        dev = wait_for_block_device(bdf)
        _direct(dev, HOST_BLOCK_OFFSET, self.host_block)
        return dev

    def read_back(self, bdf: str) -> tuple[bytes, bytes]:
        """(the host's block, the guest's block) through the host's nvme driver, after the release."""
        dev = wait_for_block_device(bdf)
        return _direct(dev, HOST_BLOCK_OFFSET), _direct(dev, GUEST_BLOCK_OFFSET)

    def checks(self, kernel: Kernel) -> tuple[str, list[initramfs.Entry]]:
        """The guest's shell and what its initramfs needs for it: the modules and the block."""
        modules = initramfs.kernel_modules(kernel.modules, NVME_MODULES)
        shell = NVME_CHECKS.format(modules=" ".join(name for name, *_ in modules), wait=NVME_WAIT_TENTHS,
                                   block=BLOCK, host=HOST_BLOCK_OFFSET // BLOCK,
                                   guest=GUEST_BLOCK_OFFSET // BLOCK, file=GUEST_BLOCK_FILE)
        return shell, [*modules, (GUEST_BLOCK_FILE, initramfs.FILE, self.guest_block, 0)]

    def mismatches(self, results: dict[str, str]) -> list[str]:
        """What the guest reported differently from a read of the host's block and a write of its own."""
        want = {"nvme-read": sha256(self.host_block), "nvme-wrote": sha256(self.guest_block)}
        return [f"{k}: got {results.get(k)!r}, expected {v!r}" for k, v in want.items() if results.get(k) != v]


# ---- the kernel and its modules -----------------------------------------------------------------

def pvh_kernel(kernel: Kernel, into: Path) -> Path:
    """The kernel as the ELF inside its bzImage (XZ-compressed there), written into `into`."""
    target = into / f"vmlinux-{kernel.release}"
    if not target.exists():
        data = kernel.image.read_bytes()
        start = data.find(XZ_MAGIC)
        if start < 0:
            raise PcipassError(f"{kernel.image} holds no XZ-compressed kernel",
                               hint="the nested VM boots a Debian kernel (CONFIG_KERNEL_XZ)", code="nested-kernel")
        elf = lzma.LZMADecompressor().decompress(data[start:])  # stops at the end of the stream
        if not elf.startswith(b"\x7fELF"):
            raise PcipassError(f"{kernel.image}'s payload is not an ELF", hint="use a Debian kernel",
                               code="nested-kernel")
        partial = target.with_suffix(".partial")
        partial.write_bytes(elf)
        partial.replace(target)
    return target


# ---- the run --------------------------------------------------------------------------------------

def config_qemu(bdfs: Sequence[str]) -> tuple[list[str], str]:
    """(QEMU's arguments as `pcipass config qemu BDFS` printed them, what it said on stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "pcipass", "config", "qemu", *bdfs], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise PcipassError(f"pcipass config qemu {' '.join(bdfs)} failed: {done.stderr.strip()}",
                           hint="run it by hand to see why", code="nested-config")
    return shlex.split(done.stdout), done.stderr  # as `$(pcipass config qemu ...)` splits it


@dataclass
class Run:
    results: dict[str, str]  # the guest's `RESULT name value` lines
    console: str
    qemu_stderr: str | None  # None: QEMU timed out
    seconds: float  # from QEMU's start to its exit
    command: list[str]

    @property
    def where(self) -> str:
        """What the guest and QEMU said, for an assertion's message."""
        return f"\n--- {shlex.join(self.command)}" + transcript([("console", self.console)], self.qemu_stderr,
                                                                self.seconds)


def transcript(said: Sequence[tuple[str, str]], qemu_stderr: str | None, seconds: float) -> str:
    """The tails of what each side said (name, text), then QEMU's stderr (None: it timed out) and
    how long it ran: a lab run's account for an assertion's message."""
    parts = "".join(f"\n--- {name} ---\n{text[-4000:]}" for name, text in said)
    qemu = f"\n--- qemu ---\n{qemu_stderr[-2000:]}" if qemu_stderr is not None else "\n--- qemu timed out ---"
    return f"{parts}{qemu}\n--- {seconds:.0f} s ---"


def boot_files(workdir: Path, kernel: Kernel, init: str, files: Sequence[initramfs.Entry] = ()) -> tuple[Path, Path]:
    """(the PVH kernel, the initramfs with `init` and `files`) of a nested VM, written into `workdir`."""
    ramdisk = workdir / "initramfs.cpio"
    ramdisk.write_bytes(initramfs.busybox_image(init, files))
    return pvh_kernel(kernel, workdir), ramdisk


def command(workdir: Path, kernel: Kernel, device_args: Sequence[str], init: str,
            files: Sequence[initramfs.Entry] = ()) -> list[str]:
    """The QEMU command line of a nested VM (its serial console on stdout), its kernel and
    initramfs written into `workdir`."""
    image, ramdisk = boot_files(workdir, kernel, init, files)
    return [QEMU, "-M", "q35", "-accel", ACCEL, "-m", f"{MEMORY_MIB}M", "-nodefaults", "-display", "none",
            "-no-reboot", "-kernel", str(image), "-initrd", str(ramdisk),
            "-serial", "stdio", "-append", KERNEL_ARGS, *device_args]


# The unprivileged user the lab runs nested VMs as (useradd fails in the lab guest: its /etc
# overlay refuses the write of /etc/shadow).
VM_USER = "nobody"


def as_user(user: str, argv: Sequence[str]) -> list[str]:
    """argv run as `user`, with no privilege left and the locked-memory limit QEMU needs for VFIO."""
    entry = pwd.getpwnam(user)
    return ["prlimit", f"--memlock={MEMLOCK_BYTES}:{MEMLOCK_BYTES}", "setpriv", f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}", "--clear-groups", "--inh-caps=-all", *argv]


def boot(workdir: Path, kernel: Kernel, device_args: Sequence[str], init: str,
         files: Sequence[initramfs.Entry] = (), *, user: str | None = None, timeout: float = 900,
         echo: Callable[[str], None] | None = None) -> Run:
    """Boot a nested VM with `device_args` (from `pcipass config qemu`) and `init` as its /init;
    as `user` if given (`workdir` is then made theirs); return what the guest and QEMU said.
    `echo` gets each console line as it comes."""
    argv = command(workdir, kernel, device_args, init, files)
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in [workdir, *workdir.iterdir()]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        argv = as_user(user, argv)
    lines: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                text=True, errors="replace")

        def read() -> None:
            assert qemu.stdout is not None
            for line in qemu.stdout:
                lines.append(line)
                if echo is not None:
                    echo(line.rstrip("\r\n"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            qemu.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()
            timed_out = True
        reader.join(10)
        err.seek(0)
        stderr = None if timed_out else err.read()
    seconds = time.monotonic() - started
    text = "".join(lines).replace("\r\n", "\n")
    return Run(results(text), text, stderr, seconds, argv)
