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

import re
from pathlib import Path

import pytest

from pcipass.errors import PcipassError
from pcipass.lab import kernel as lab_kernel
from pcipass.lab import peer_guest, peer_qemu
from pcipass.lab.peer_guest import EDU_EXPECTED, EDU_INIT, MSI_ARRIVED, Boot, init_script
from pcipass.lab.pytest_plugin import in_ci

BOOT_SECONDS = 180  # a Debian kernel under TCG on a busy 2-CPU machine, then the checks


# The scratch model: a trapped register page then three mapped pages in BAR0 (a sparse mmap
# area), BAR2 mapped whole. QEMU maps what the server offers; the rest goes by message.
SCRATCH_INIT = init_script(0x1B36, 0x00FE, r"""echo 1 > $DEV/enable
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


@pytest.fixture(scope="module")
def peer() -> peer_qemu.PeerQemu:
    return _require("the peer QEMU 11.1", peer_qemu.require)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def kernel() -> lab_kernel.Kernel:
    _require("busybox for the guest", peer_guest.require_busybox)
    return _require("the lab's kernel", lab_kernel.require)  # type: ignore[no-any-return]


def _boot(tmp_path: Path, peer: peer_qemu.PeerQemu, kernel: lab_kernel.Kernel, model: str, init: str,
          trace: tuple[str, ...] = (), shared_memory: bool = True) -> Boot:
    """Serve `model` (pcipass serve --model, its own process), boot the guest on it."""
    socket_path, server_log = tmp_path / "dev.sock", tmp_path / "server.log"
    try:
        server = peer_guest.serve(["--model", model], socket_path, server_log)
    except PcipassError as exc:
        pytest.fail(exc.message)
    return peer_guest.boot(tmp_path, peer, kernel, socket_path, init, server=server, server_log=server_log,
                           trace=trace, shared_memory=shared_memory, timeout=BOOT_SECONDS)


def _expect(boot: Boot, expected: dict[str, str]) -> None:
    assert not boot.mismatches(expected), f"{boot.mismatches(expected)}{boot.where}"
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
    assert MSI_ARRIVED.search(boot.console), boot.where
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
