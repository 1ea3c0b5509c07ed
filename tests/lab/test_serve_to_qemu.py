"""`pcipass serve BDF` on a real device, driven by a vfio-user client we did not write.

In the lab guest (as root): the standalone edu (QEMU 7.2's, alone in its IOMMU
group) is claimed for vfio-pci and served; QEMU 11.1 (the peer, from the host's
cache) boots the lab's kernel nested inside the guest, under TCG, with the
served device on `vfio-user-pci` and the busybox /init of tests/interop
(pcipass.lab.peer_guest). Every check the model passed there is made against
the real edu: config space through the policy and VFIO, the registers, a
factorial, INTx through vfio-pci counted by the nested kernel, DMA into the
nested guest's memfd through the lab's IOMMU, an MSI through vfio-pci.

Twice: with BAR0 offered to QEMU as the fd of its sysfs `resource0` (QEMU maps
it), and with `--no-map-bars` (every BAR access by message, through vfio-pci).

The nested kernel takes about two minutes to reach its /init on these machines
(measured 2026-11-24: first RESULT 122 s after QEMU started, all done at 135 s).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from guest_pci import SRC, claim_state, driver, pcipass  # noqa: F401 (claim_state: autouse)

from pcipass.errors import PcipassError
from pcipass.host.transaction.writer import SysfsWriter
from pcipass.lab import kernel as lab_kernel
from pcipass.lab import peer_guest, peer_qemu
from pcipass.lab.peer_guest import EDU_EXPECTED, EDU_INIT, MSI_ARRIVED
from pcipass.lab.pytest_plugin import in_ci
from pcipass.lab.topology import STANDALONE_EDU

pytestmark = pytest.mark.lab

BDF = STANDALONE_EDU
NESTED_SECONDS = 480  # the nested boot and the checks; measured about 135 s
# Nested TCG: a small translation cache (QEMU's default reserves up to 1 GiB; the lab has 2).
ACCEL = "tcg,tb-size=64"


def _tools() -> tuple[peer_qemu.PeerQemu, lab_kernel.Kernel]:
    try:
        peer_guest.require_busybox()
        return peer_qemu.require(), lab_kernel.require()
    except PcipassError as exc:
        if in_ci():
            pytest.fail(f"CI: {exc}")
        pytest.skip(f"{exc.message} ({exc.hint})")


def _iommu_faults() -> list[str]:
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    return [line for line in log.splitlines() if "DMAR" in line and "fault" in line.lower()]


@pytest.mark.parametrize("map_bars", [True, False], ids=["bar-mapped", "bar-by-message"])
def test_qemu_drives_the_real_edu_through_pcipass_serve(tmp_path: Path, map_bars: bool) -> None:
    peer, kernel = _tools()
    claimed = pcipass("claim", BDF)
    assert claimed.returncode == 0, claimed.stderr
    assert driver(BDF) == "vfio-pci"
    faults_before = _iommu_faults()

    socket_path, server_log = tmp_path / "edu.sock", tmp_path / "server.log"
    server = peer_guest.serve([BDF, *([] if map_bars else ["--no-map-bars"])], socket_path, server_log)
    boot = peer_guest.boot(tmp_path, peer, kernel, socket_path, EDU_INIT, server=server, server_log=server_log,
                           trace=("vfio_region_mmap", "vfio_user_region_rw"), timeout=NESTED_SECONDS, tcg=ACCEL)

    assert not boot.mismatches(EDU_EXPECTED), f"{boot.mismatches(EDU_EXPECTED)}{boot.where}"
    # One factorial, one INTx: vfio-pci masked the line, QEMU unmasked it by message.
    assert (int(boot.results["irqs-before"]), int(boot.results["irqs-after"])) == (0, 1), boot.where
    assert boot.results["irq-status"] == "0x00000001", boot.where
    # MSI: vfio-pci signalled the eventfd QEMU gave with SET_IRQS, on the programmed vector.
    assert "SET_IRQS index 1 flags 0x24 vectors 0+1 with 1 eventfds" in boot.server_log, boot.where
    assert MSI_ARRIVED.search(boot.console), boot.where
    # DMA: the nested guest's RAM (a memfd) went into the lab's IOMMU at the guest's addresses.
    maps = [(int(a, 16), int(s, 16)) for a, s in re.findall(r"^DMA_MAP (0x[0-9a-f]+)\+(0x[0-9a-f]+) fd$",
                                                               boot.server_log, re.MULTILINE)]
    assert any(a <= peer_guest.DMA_PAGE < a + s for a, s in maps), boot.where
    assert _iommu_faults() == faults_before
    assert boot.qemu_stderr == "", f"QEMU complained{boot.where}"
    assert not boot.refused(), f"the server refused some of QEMU's messages: {boot.refused()}{boot.where}"

    bar0_mapped = re.search(r"BAR 0 mmaps\[0\]", boot.qemu_trace) is not None
    bar0_by_message = re.search(r"vfio_user_region_rw +region 0 ", boot.qemu_trace) is not None
    if map_bars:
        # Mapped, and yet some accesses by message: on INTx QEMU (without KVM) stops using its
        # BAR mappings until a timer maps them back. Those reached the device through the
        # server's own mapping of resource0, so QEMU's stayed valid (through VFIO: SIGBUS).
        assert bar0_mapped and bar0_by_message, boot.qemu_trace
    else:
        assert not bar0_mapped and bar0_by_message, boot.qemu_trace

    released = pcipass("release", BDF)
    assert released.returncode == 0, released.stderr
    assert driver(BDF) is None  # edu has no driver of its own
    assert SysfsWriter("/").override(BDF) is None


# A process that maps the BAR through sysfs, then reads it through VFIO, then through its
# mapping again.
REVOKED = r"""
import mmap, os, sys
from pcipass import vfio
bdf = sys.argv[1]
bar = mmap.mmap(os.open(f"/sys/bus/pci/devices/{bdf}/resource0", os.O_RDWR), mmap.PAGESIZE)
print("resource0", hex(int.from_bytes(bar[0:4], "little")), flush=True)
print("vfio", hex(vfio.open_device(bdf).region(0).read(0, 4)), flush=True)
print("resource0", hex(int.from_bytes(bar[0:4], "little")), flush=True)
"""


def test_a_bar_read_through_vfio_revokes_its_sysfs_mappings() -> None:
    """Why the backend reaches a BAR it offers by resource fd through that file only: vfio-pci
    claims the BAR on the first access through VFIO, and (CONFIG_IO_STRICT_DEVMEM) the claim
    unmaps every mapping of `resource0`; the next access through one is a SIGBUS."""
    claimed = pcipass("claim", BDF)
    assert claimed.returncode == 0, claimed.stderr
    done = subprocess.run([sys.executable, "-c", REVOKED, BDF], capture_output=True, text=True, timeout=120, check=False,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert done.stdout.splitlines() == ["resource0 0x10000ed", "vfio 0x10000ed"], done
    assert done.returncode == -7, done  # SIGBUS
