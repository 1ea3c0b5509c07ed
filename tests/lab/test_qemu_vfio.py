"""Debian's QEMU (7.2) boots a VM with the devices `pcipass config qemu` gave it, through vfio-pci.

In the lab guest: the NVMe controller's group and the group of the two edu
functions behind the PCIe-to-PCI bridge are claimed for an unprivileged user
(`claim --owner USER --memlock SIZE`), and one nested VM (TCG in TCG,
pcipass.lab.nested), run as that user with the locked-memory limit it needs,
boots with exactly the arguments `pcipass config qemu` printed for the three
functions. Its own Linux nvme driver binds
the controller through the lab's VT-d, reads back a block the host wrote
through its nvme driver before the claim and writes one of its own; it reads
the identification and liveness registers of both edu functions, which sit
together in one guest slot. After `pcipass release` the controller is back on
nvme and the host reads the guest's block.

Measured 2026-12-02 under a load of about 12: 1210 s in all, the nested VM 665 s
of it (its kernel at /init after 332 s of uptime), the claims 286 s.
"""

from __future__ import annotations

import pwd
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from guest_pci import PCI, claim_state, driver, find, nested_kernel, pcipass  # noqa: F401 (claim_state: autouse)

from pcipass.lab import nested
from pcipass.lab.topology import EDU, NVME_SERIAL, QEMU_NVME

pytestmark = pytest.mark.lab


STARTED = time.monotonic()


def progress(text: str) -> None:
    """Where the test is, in the lab's log as it happens (run with -s): a nested VM takes minutes."""
    print(f"[{time.monotonic() - STARTED:6.0f} s] {text}", flush=True)


def test_qemu_72_gets_the_nvme_and_the_edu_pair_through_vfio_pci(tmp_path: Path) -> None:
    kernel = nested_kernel(nested.QEMU, "prlimit", "setpriv")
    [nvme] = find(QEMU_NVME)
    edus = find(EDU, alone=False)  # 0d.0 and 0d.1 behind the bridge, one group with it
    assert [b[-4:] for b in edus] == ["0d.0", "0d.1"], edus
    exchange = nested.NvmeExchange.new()
    progress(f"host block written to {exchange.write_host_block(nvme)}")

    user = nested.VM_USER
    for bdf in (nvme, edus[0]):
        claimed = pcipass("claim", bdf, "--owner", user, "--memlock", f"{nested.MEMLOCK_BYTES >> 20}M")
        assert claimed.returncode == 0, claimed.stderr
    assert [driver(b) for b in (nvme, *edus)] == ["vfio-pci"] * 3
    nodes = [Path("/dev/vfio", (PCI / b / "iommu_group").resolve().name) for b in (nvme, edus[0])]
    assert [n.stat().st_uid for n in nodes] == [pwd.getpwnam(user).pw_uid] * 2

    device_args, warnings = nested.config_qemu([*edus, nvme])
    assert warnings == "", warnings  # whole groups, all claimed: nothing to say
    assert device_args == [
        "-device", f"vfio-pci,host={edus[0]},id=hostdev0,bus=pcie.0,addr=0x10.0,multifunction=on",
        "-device", f"vfio-pci,host={edus[1]},id=hostdev1,bus=pcie.0,addr=0x10.1",
        "-device", f"vfio-pci,host={nvme},id=hostdev2,bus=pcie.0,addr=0x11.0",
    ]
    shell, files = exchange.checks(kernel)
    progress(f"nested VM: {nested.QEMU} ... {' '.join(device_args)}")
    workdir = Path(tempfile.mkdtemp(prefix="pcipass-nested-"))  # tmp_path's parents are root's alone
    try:
        run = nested.boot(workdir, kernel, device_args, nested.init_script(shell, nested.EDU_CHECKS), files,
                          user=user, echo=lambda line: progress(f"nested: {line}"))
    finally:
        shutil.rmtree(workdir)
    print(f"nested VM: {run.seconds:.0f} s from QEMU's start to its exit; kernel uptime at /init "
          f"{run.results.get('uptime-init')} s, at the end {run.results.get('uptime-done')} s")

    assert run.results.get("nvme-driver") == "0000:00:11.0=nvme", run.where
    assert run.results.get("nvme-serial") == NVME_SERIAL, run.where
    assert not exchange.mismatches(run.results), f"{exchange.mismatches(run.results)}{run.where}"
    assert nested.edu_results(run.results) == {
        "0000:00:10.0": (nested.EDU_IDENT, nested.EDU_LIVENESS),
        "0000:00:10.1": (nested.EDU_IDENT, nested.EDU_LIVENESS),
    }, run.where
    assert run.qemu_stderr == "", f"QEMU complained{run.where}"

    for bdf in (nvme, edus[0]):
        released = pcipass("release", bdf)
        assert released.returncode == 0, released.stderr
    assert [driver(b) for b in (nvme, *edus)] == ["nvme", None, None]
    assert not any(n.exists() for n in nodes)  # vfio-pci let go of both groups
    host_block, guest_block = exchange.read_back(nvme)
    assert host_block == exchange.host_block  # the device came back whole
    assert guest_block == exchange.guest_block
