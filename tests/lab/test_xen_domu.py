"""A PV driver domain on real Xen (the lab's dom0): the Debian kernel with xen-pcifront, a
busybox initramfs, and the edu that xen-pciback hid at boot, passed through with the line
`pcipass config xl` writes. Inside, the edu is checked the way its driver starts: the
identification register (0x00) and the liveness register (0x04, which returns the
inverse of what was written), read and written through the BAR that Xen mapped.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from test_xen import HIDDEN, assignable, driver, ids, pcipass, pytestmark  # noqa: F401 (one boot)

from pcipass.lab import initramfs
from pcipass.lab import kernel as lab_kernel
from pcipass.lab.topology import EDU

CONSOLE_LOG = Path("/var/log/xen/console")
DOMU_SECONDS = 900  # a PV guest's boot under TCG
# The guest's /init: load pcifront, find the edu, check its registers, say so, power off.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
insmod /xen-pcifront.ko
for i in $(seq 120); do
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor 2>/dev/null):$(cat $d/device 2>/dev/null)" = "0x1234:0x11e8" ] && EDU=$d
  done
  [ -n "$EDU" ] && break
  sleep 1
done
echo "domU: pci devices: $(ls /sys/bus/pci/devices)"
if [ -z "$EDU" ]; then echo "domU: EDU-MISSING"; poweroff -f; fi
echo 1 > $EDU/enable
BAR0=$(head -1 $EDU/resource | cut -d' ' -f1)
echo "domU: edu $EDU BAR0 $BAR0"
echo "domU: EDU-ID $(devmem $BAR0 32)"
devmem $(printf '0x%x' $((BAR0 + 4))) 32 0x12345678
echo "domU: EDU-LIVENESS $(devmem $(printf '0x%x' $((BAR0 + 4))) 32)"
poweroff -f
"""


def _initramfs(path: Path) -> None:
    pcifront = next(lab_kernel.require().modules.rglob("xen-pcifront.ko"))
    path.write_bytes(initramfs.busybox_image(INIT, [("xen-pcifront.ko", initramfs.FILE, pcifront.read_bytes(), 0)]))


def _guest_log(name: str) -> str:
    try:
        return (CONSOLE_LOG / f"guest-{name}.log").read_text(errors="replace")
    except OSError:
        return ""


def _said(log: str, name: str) -> int | None:
    """The number the guest printed after `domU: NAME` (devmem prints hex, 0x-prefixed)."""
    found = re.findall(rf"domU: {name} (0x[0-9a-fA-F]+)", log)
    return int(found[-1], 16) if found else None


def test_driver_domain_runs_the_edu_check(tmp_path):
    assert ids(HIDDEN) == EDU and driver(HIDDEN) == "pciback" and HIDDEN in assignable()
    line = pcipass("config", "xl", HIDDEN).stdout.strip()
    ramdisk = tmp_path / "domu.cpio"
    _initramfs(ramdisk)
    name = "pcipass-edu"
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(
        f'name = "{name}"\ntype = "pv"\nkernel = "{lab_kernel.require().image}"\n'
        f'ramdisk = "{ramdisk}"\nextra = "console=hvc0 loglevel=4"\nmemory = 256\nvcpus = 1\n'
        f'on_poweroff = "destroy"\non_crash = "preserve"\n{line}\n')
    # The guest's console goes to a log (xenconsoled --log=guest, started so by the lab).
    out = subprocess.run(["xl", "create", str(cfg)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr + subprocess.run(
        ["xl", "dmesg"], capture_output=True, text=True).stdout[-3000:]
    try:
        deadline = time.monotonic() + DOMU_SECONDS
        while "EDU-LIVENESS" not in _guest_log(name) and "EDU-MISSING" not in _guest_log(name):
            assert time.monotonic() < deadline, _guest_log(name)[-3000:]
            time.sleep(5)
    finally:
        subprocess.run(["xl", "destroy", name], capture_output=True)
    log = _guest_log(name)
    print(log[-2000:], file=sys.stderr)
    assert _said(log, "EDU-ID") == 0x010000ED, log[-2000:]
    assert _said(log, "EDU-LIVENESS") == 0xEDCBA987, log[-2000:]  # ~0x12345678
    # Once the domain is gone, the device is pciback's again, ready for the next domain.
    deadline = time.monotonic() + 120
    while HIDDEN not in assignable() and time.monotonic() < deadline:
        time.sleep(1)
    assert HIDDEN in assignable() and driver(HIDDEN) == "pciback"
