"""pcipass on real Xen: a Xen 4.17 dom0 in the lab (Xen's IOMMU on the emulated VT-d).

All of these run in one boot of the seed topology under Xen, with dom0 booted
with the argument `pcipass boot apply` produces for hiding the standalone edu,
so the boot-time hide is proven by the real xen-pciback on the same boot.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from guest_pci import PCI, claim_state, driver, ids, pcipass  # noqa: F401 (claim_state: autouse)

from pcipass.host.transaction.crash import CRASH_ENV
from pcipass.host.transaction.plan import XEN, plan_claim
from pcipass.lab import kernel as lab_kernel
from pcipass.lab.topology import EDU, STANDALONE_EDU

# The standalone edu of the seed topology (QEMU gives it the first free slot on bus 0
# after virtme-ng's devices and the root port); test_hidden_at_boot checks it is an edu.
HIDDEN = STANDALONE_EDU  # pinned by the topology, whatever vng adds on bus 0
HIDE_ARG = f"xen-pciback.hide=({HIDDEN})"
pytestmark = pytest.mark.lab(topology="seed", xen=True, append=(HIDE_ARG,))


def run(*cmd: str, env: dict[str, str] | None = None, check: bool = False,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env or dict(os.environ),
                          timeout=timeout, check=check)


def assignable() -> set[str]:
    out = run("xl", "pci-assignable-list", check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def claimed(status: dict) -> set[str]:
    return {d["bdf"] for g in status["groups"] if g["state"] == "claimed"
            for d in g["devices"] if not d["bridge"]}


def status_json() -> dict:
    out = pcipass("status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def edu() -> str:
    """An edu behind the PCIe-to-PCI bridge (02:0d.0): no host driver, not hidden at boot."""
    found = sorted(p.name for p in PCI.iterdir() if ids(p.name) == EDU and p.name.endswith(":0d.0"))
    assert found, "the seed topology's edu 0d.0 is missing"
    assert driver(found[0]) is None
    return found[0]


def test_xen_dom0_with_iommu():
    assert "control_d" in Path("/proc/xen/capabilities").read_text()
    log = run("xl", "dmesg", check=True).stdout
    assert "I/O virtualisation enabled" in log
    assert "Interrupt Remapping enabled" in log
    assert "xen_version" in run("xl", "info", check=True).stdout


def test_hidden_at_boot(tmp_path):
    # The kernel argument pcipass writes for this policy is the one dom0 booted with ...
    (tmp_path / "etc/pcipass").mkdir(parents=True)
    (tmp_path / "etc/pcipass/boot.conf").write_text(f"mode xen\nhide {HIDDEN}\n")
    out = pcipass("boot", "apply", "--root", str(tmp_path))
    assert out.returncode == 0, out.stderr
    grub = (tmp_path / "etc/default/grub").read_text()
    produced = re.search(r"xen-pciback\.hide=\S+?(?=[\s\"])", grub)
    assert produced and produced.group(0) == HIDE_ARG, grub
    assert HIDE_ARG in Path("/proc/cmdline").read_text().split()
    # ... and the real xen-pciback, loaded at boot, seized the device: nothing of
    # pcipass's claimed it (the journal is empty), and xl can assign it.
    assert ids(HIDDEN) == EDU
    assert driver(HIDDEN) == "pciback"
    assert HIDDEN in assignable()
    assert status_json()["groups"] == []
    assert "seizing device" in run("dmesg", check=True).stdout


def test_claim_for_xen_and_release(edu):
    out = pcipass("claim", edu, "--for", "xen")
    assert out.returncode == 0, out.stdout + out.stderr
    assert driver(edu) == "pciback"
    # xl's view and pcipass's agree: the claimed device, plus what was hidden at boot.
    status = status_json()
    assert claimed(status) == {edu}
    assert status["groups"][0]["for"] == "xen"
    assert assignable() == claimed(status) | {HIDDEN}
    slots = Path("/sys/bus/pci/drivers/pciback/slots").read_text()
    assert edu.split(":", 1)[1] in slots

    out = pcipass("release", edu)
    assert out.returncode == 0, out.stdout + out.stderr
    assert driver(edu) is None  # edu has no host driver: back to none
    assert edu not in assignable()
    assert claimed(status_json()) == set()


def test_claim_permissive_and_quirk(edu):
    out = pcipass("claim", edu, "--for", "xen", "--permissive", "--quirk", "40:4:ffffffff")
    assert out.returncode == 0, out.stdout + out.stderr
    assert driver(edu) == "pciback"
    bus_slot = edu.split(":", 1)[1]
    assert bus_slot in Path("/sys/bus/pci/drivers/pciback/permissive").read_text()
    assert bus_slot in Path("/sys/bus/pci/drivers/pciback/quirks").read_text()


def test_recover_after_sigkill_at_every_step(edu):
    plan = plan_claim("/", edu, XEN)
    steps = len(plan.record.steps)
    assert steps >= 3, plan.lines()
    for n in range(steps + 1):
        env = dict(os.environ, **{CRASH_ENV: str(n)})
        out = pcipass("claim", edu, "--for", "xen", env=env)
        assert out.returncode == -9, (n, out.stdout, out.stderr)
        out = pcipass("recover")
        assert out.returncode == 0, (n, out.stdout + out.stderr)
        assert driver(edu) is None, n
        assert edu not in assignable(), n
        assert status_json()["groups"] == [], n


def _domain_config(tmp_path: Path, name: str, pci_line: str) -> Path:
    kernel = lab_kernel.require()
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\ntype = "pv"\nkernel = "{kernel.image}"\n'
                   f'memory = 128\nvcpus = 1\n{pci_line}\n')
    return cfg


def test_config_xl_accepted_by_xl_create(edu, tmp_path):
    out = pcipass("config", "xl", edu)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("pci") and edu.split(":", 1)[1] in line, line
    assert pcipass("claim", edu, "--for", "xen").returncode == 0
    cfg = _domain_config(tmp_path, "pcipass-dry", line)
    out = run("xl", "create", "-n", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    # xl prints the domain config it would build: the device is in it.
    config = json.loads(out.stdout[out.stdout.index("{"):])
    bus, slot = edu.split(":")[1:]
    dev, fn = slot.split(".")
    assert {(p.get("domain", 0), p.get("bus", 0), p.get("dev", 0), p.get("func", 0))
            for p in config.get("pcidevs", [])} == {(0, int(bus, 16), int(dev, 16), int(fn))}, out.stdout


def test_pv_domain_gets_the_device(edu, tmp_path):
    """The domain is built paused: Xen assigns the device through its VT-d (no guest runs)."""
    line = pcipass("config", "xl", edu).stdout.strip()
    assert pcipass("claim", edu, "--for", "xen").returncode == 0
    cfg = _domain_config(tmp_path, "pcipass-dd", line)
    out = run("xl", "create", "-p", str(cfg))
    try:
        assert out.returncode == 0, out.stdout + out.stderr + run("xl", "dmesg").stdout[-3000:]
        listed = run("xl", "pci-list", "pcipass-dd", check=True).stdout
        assert edu.split(":", 1)[1] in listed, listed
        assert edu not in assignable()  # it belongs to the domain now
    finally:
        run("xl", "destroy", "pcipass-dd")
    deadline = time.monotonic() + 120
    while edu not in assignable() and time.monotonic() < deadline:
        time.sleep(1)
    assert edu in assignable()  # back to pciback once the domain is gone


def test_list_and_check_read_xens_iommu(edu):
    out = pcipass("check", edu, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    codes = {r["code"] for r in doc["verdict"]["reasons"]}
    assert "iommu-off" not in codes and "xen-iommu-not-visible" not in codes, codes
    assert "xen-iommu-on" in codes, codes
    out = pcipass("list", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["iommu"]["xen"]["enabled"] is True

