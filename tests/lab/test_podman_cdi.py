"""podman, a real consumer of pcipass's CDI specs: Debian 12's podman (4.3, bootstrap installs it)
runs a container with `--device pcipass.io/vfio=group-N` from the spec `pcipass claim` wrote,
and pcipass's edu driver runs inside over VFIO on the claimed device.

The container is made from the lab guest's own root (`--rootfs`, the root bound at a directory), so no image registry is
needed; podman runs with storage of its own (vfs under tmp), cgroupfs and no cgroups (the lab
guest has none), no network and no event log. Inside, the driver finds its device by the
PCIPASS_GROUP_N variable of the spec. Without --device the container has no /dev/vfio/N, and
after `pcipass release` the spec is gone and podman refuses the device.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from guest_pci import SRC, claim_state, find, pcipass  # noqa: F401 (claim_state: autouse)

from pcipass.lab.pytest_plugin import in_ci

pytestmark = pytest.mark.lab

EDU = "1234:11e8"
DRIVE = (f"import os, sys; sys.path.insert(0, {SRC!r}); from pcipass.drivers.edu import main; "
         "bdf = [v for k, v in os.environ.items() if k.startswith('PCIPASS_GROUP_')][0].split(',')[0]; "
         "print('device', bdf, 'nodes', sorted(os.listdir('/dev/vfio'))); sys.exit(main([bdf]))")


@pytest.fixture
def podman():
    exe = shutil.which("podman")
    if exe is None:
        if in_ci():
            pytest.fail("CI: no podman in the lab guest (./bootstrap installs it)")
        pytest.skip("no podman (./bootstrap installs it)")

    # podman refuses a runroot longer than 50 characters (pytest's tmp_path is longer).
    short = Path(tempfile.mkdtemp(prefix="podman", dir="/tmp"))

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        # The guest's root, bound (recursively) at a directory of its own in a mount namespace of
        # podman's: crun cannot pivot_root to / itself (EBUSY).
        rootfs = short / "rootfs"
        rootfs.mkdir(exist_ok=True)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --rbind / "$0" && exec "$@"', str(rootfs), exe, "--root", str(short / "storage"), "--runroot", str(short / "run"),
               "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none",
               "run", "--rm", "--network", "none", "--cgroups", "disabled",
               "--cap-add", "IPC_LOCK", "--ulimit", "memlock=-1:-1",
               # podman's own defaults (1048576 files, 4194304 processes) are above some hosts' hard limits
               "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
        at = args.index("--")  # options, then the root in the place of an image, then the command
        cmd += [*args[:at], "--rootfs", str(rootfs), *args[at + 1:]]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    yield run
    shutil.rmtree(short, ignore_errors=True)


def test_podman_runs_the_edu_driver_on_the_device_the_cdi_spec_gives(podman):
    alone = find(EDU, alone=True)
    assert alone, "the lab's topology has an edu alone in its group"
    bdf = alone[0]
    done = pcipass("claim", bdf)
    assert done.returncode == 0, done.stderr
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
    spec = Path(f"/var/run/cdi/pcipass.io-vfio_group-{group}.json")
    assert spec.exists(), spec
    name = f"pcipass.io/vfio=group-{group}"
    try:
        p = podman("--device", name, "--", sys.executable, "-c", DRIVE)
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"device {bdf} nodes" in p.stdout and f"'{group}'" in p.stdout and "'vfio'" in p.stdout
        assert "all checks passed" in p.stdout, p.stdout
        # Without the device, the container has no VFIO node of the group.
        p = podman("--", "sh", "-c", f"test ! -e /dev/vfio/{group} && echo no-node")
        assert p.stdout.strip() == "no-node", p.stdout + p.stderr
    finally:
        gone = pcipass("release", bdf)
    assert gone.returncode == 0, gone.stderr
    assert not spec.exists()
    p = podman("--device", name, "--", "true")
    assert p.returncode != 0 and "unresolvable CDI devices" in p.stderr, p.stdout + p.stderr
