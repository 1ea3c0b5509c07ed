"""What the lab tests read of the guest's PCI devices, and how they run pcipass there.

Imported by the test modules of every lab boot (tests/lab is on sys.path for them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pcipass as pcipass_package
from pcipass.errors import PcipassError
from pcipass.host.transaction import claim as c
from pcipass.host.transaction.crash import CRASH_ENV
from pcipass.lab import kernel as lab_kernel
from pcipass.lab import nested
from pcipass.lab.pytest_plugin import in_ci
from pcipass.vfio import BACKEND_ENV

PCI = Path("/sys/bus/pci/devices")
# The pcipass these tests import, whatever an installed one is: children get it first.
SRC = str(Path(pcipass_package.__file__).resolve().parents[1])


def wait_for(predicate, timeout: float = 60.0) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def ids(bdf: str) -> str:
    """vendor:device of the device at `bdf`, e.g. 1234:11e8."""
    dev = PCI / bdf
    return f"{(dev / 'vendor').read_text().strip()[2:]}:{(dev / 'device').read_text().strip()[2:]}"


def driver(bdf: str) -> str | None:
    link = PCI / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def group_members(bdf: str) -> list[str]:
    return sorted(p.name for p in ((PCI / bdf / "iommu_group").resolve() / "devices").iterdir())


def find(wanted: str, *, alone: bool | None = None) -> list[str]:
    """Devices with these vendor:device IDs; alone=True: only those alone in their group."""
    found = sorted(p.name for p in PCI.iterdir() if ids(p.name) == wanted)
    if alone is not None:
        found = [b for b in found if (len(group_members(b)) == 1) == alone]
    return found


def pcipass(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m pcipass ARGS` as root in the guest, output captured."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pcipass", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(autouse=True)
def claim_state(tmp_path, monkeypatch):
    """Each test's journal and lock in a directory of its own; afterwards whatever it left
    claimed or half done is recovered and released, so the next test finds the guest as
    this one did."""
    monkeypatch.setenv("PCIPASS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv(CRASH_ENV, raising=False)
    yield
    ctx = c.Context("/")
    c.recover(ctx)
    c.release(ctx)


def nested_kernel(*tools: str) -> lab_kernel.Kernel:
    """The lab's kernel and initramfs tools for a nested guest, once the lab guest is found to
    have `tools` and busybox: a test without them skips, and fails in CI."""
    try:
        for tool in tools:
            if shutil.which(tool) is None:
                raise PcipassError(f"no {tool} in the lab guest", hint="./bootstrap installs it", code="nested-tool")
        if not nested.initramfs.BUSYBOX.exists():
            raise PcipassError("no busybox", hint="install busybox-static (./bootstrap does)", code="no-busybox")
        return lab_kernel.require()
    except PcipassError as exc:
        if in_ci():
            pytest.fail(f"CI: {exc}")
        pytest.skip(f"{exc.message} ({exc.hint})")


# The VFIO backends one lab test body runs through, each in the boot it needs, as the kernel's
# VFIO selftests run one body in every IOMMU mode (FIXTURE_VARIANT_ADD_ALL_IOMMU_MODES):
# Debian's kernel has only the container; the lab kernel `iommufd` (pcipass.lab.kbuild) has
# the container and cdev + IOMMUFD.
IOMMU_MODES = {
    "debian-container": pytest.param("container", marks=pytest.mark.lab, id="debian-container"),
    "iommufd-container": pytest.param("container", marks=pytest.mark.lab(kernel="iommufd"),
                                      id="iommufd-container"),
    "iommufd-iommufd": pytest.param("iommufd", marks=pytest.mark.lab(kernel="iommufd"),
                                    id="iommufd-iommufd"),
}


def iommu_mode_fixture(*which: str):
    """A module's `iommu_mode` fixture, over the IOMMU_MODES named (all by default): it sets
    PCIPASS_VFIO_IOMMU for the module's tests, so open_device and every pcipass they start
    take that backend, and gives the backend's name (what `device.container.kind` must say)."""
    params = [IOMMU_MODES[w] for w in which or IOMMU_MODES]

    @pytest.fixture(scope="module", params=params)
    def iommu_mode(request: pytest.FixtureRequest) -> Iterator[str]:
        saved = os.environ.get(BACKEND_ENV)
        os.environ[BACKEND_ENV] = request.param
        try:
            yield request.param
        finally:
            if saved is None:
                os.environ.pop(BACKEND_ENV, None)
            else:
                os.environ[BACKEND_ENV] = saved

    return iommu_mode
