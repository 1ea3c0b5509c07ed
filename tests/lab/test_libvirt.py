"""Debian's libvirt (9.0) runs TCG domains that `pcipass config libvirt --domain` defined, with
their hostdevs through vfio-pci, in the lab guest.

The test starts libvirtd as root the way a user would, with a qemu.conf of its own
(bind-mounted over /etc/libvirt in a mount namespace of libvirtd's, so the guest's /etc keeps
its libvirt files): QEMU runs as root, without a security driver, namespaces or cgroups, none
of which the lab guest has. Each domain is one nested VM (TCG in TCG), booted directly from
the PVH kernel and busybox initramfs of pcipass.lab.nested; its /init prints what it read on
the serial console (a file) and idles until `virsh destroy`. The two domains run at once:
each is one TCG vCPU, and the lab guest has two.

- managed='no', the e1000e NIC: `pcipass claim`, then the domain. While it runs, `status`
  shows the domain holding the group and `pcipass release` refuses, naming it. The guest
  reads the receive address from the NIC's BAR0: the host's MAC. After `virsh destroy`,
  `pcipass release` gives the NIC back to e1000e, with the same MAC.
- managed='yes', the NVMe controller: libvirt takes it from nvme itself. While the domain runs,
  `status` (and --json) and `check` (and --json) name the domain, and `claim` and `release`
  refuse (held-by-libvirt) and change nothing. The guest's nvme driver reads the block the host
  wrote before and writes one; after `virsh destroy` libvirt has given the controller back to
  nvme, and the host reads both blocks.

Progress (each step, each console line of the nested guests) goes to progress.log in the
lab run's directory as it happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_pci import PCI, claim_state, driver, find, nested_kernel, pcipass, wait_for  # noqa: F401 (claim_state: autouse)

from pcipass.lab import kernel as lab_kernel
from pcipass.lab import nested
from pcipass.lab.topology import E1000E, NVME_SERIAL, QEMU_NVME

# A boot of its own (the drivers topology: the NVMe and the e1000e), apart from the default
# boot's hour.
pytestmark = pytest.mark.lab(topology="drivers")

URI = "qemu:///system"
# What libvirt's QEMU driver needs in the lab guest: no libvirt-qemu user, SELinux/AppArmor,
# mount namespaces or cgroups there; QEMU's stdout into a file, with no virtlogd running.
QEMU_CONF = """user = "root"
group = "root"
security_driver = "none"
namespaces = []
cgroup_controllers = []
stdio_handler = "file"
"""
# How long a domain's guest may take to reach the end of its checks (nested TCG: measured up to
# 826 s under a load of 12-17).
GUEST_TIMEOUT = 1800

# Debian's build of libvirt names this user (and group) for QEMU; 64055 is its usual id.
QEMU_USER = "libvirt-qemu"
QEMU_ID = 64055
# libvirtd's log (libvirtd.log) and its QEMU driver's, one per domain (NAME.log).
LOG = Path("/var/log/libvirt")
LOG_DIRS = (LOG, LOG / "qemu")

STARTED = time.monotonic()
# progress.log beside the lab's report (the run directory the host sees), set by progress_log.
PROGRESS_LOG: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def progress_log(request: pytest.FixtureRequest) -> None:
    report = request.config.getoption("--lab-report", default=None)
    if report:
        PROGRESS_LOG[:] = [Path(report).with_name("progress.log")]


def progress(text: str) -> None:
    """Where the test is, as it happens, in the run directory's progress.log (readable from the
    host while the lab runs: a domain takes minutes), and in the test's captured stderr."""
    line = f"[libvirt {time.monotonic() - STARTED:6.0f} s] {text}"
    print(line, file=sys.stderr, flush=True)
    for log in PROGRESS_LOG:
        with log.open("a") as f:
            f.write(line + "\n")


def add_qemu_user() -> None:
    """The user and group libvirt's QEMU driver looks up before it reads qemu.conf (it will not
    start without them), as libvirt-daemon-system would add them: appended to /etc/passwd and
    /etc/group (useradd cannot write the lab guest's /etc/shadow)."""
    for path, line in ((Path("/etc/passwd"), f"{QEMU_USER}:x:{QEMU_ID}:{QEMU_ID}::/var/lib/libvirt:/usr/sbin/nologin"),
                       (Path("/etc/group"), f"{QEMU_USER}:x:{QEMU_ID}:")):
        text = path.read_text()
        if not any(entry.split(":")[0] == QEMU_USER for entry in text.splitlines()):
            with path.open("a") as f:
                f.write(("" if text.endswith("\n") else "\n") + line + "\n")


def libvirtd_log() -> str:
    log = LOG / "libvirtd.log"
    return f"\n--- {log} ---\n{log.read_text(errors='replace')[-3000:]}" if log.exists() else ""


def virsh(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "--connect", URI, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Path]:
    """libvirtd running as root with QEMU_CONF; yields its working directory."""
    work = Path(tempfile.mkdtemp(prefix="pcipass-libvirt-"))
    conf = work / "etc-libvirt"
    conf.mkdir()
    (conf / "qemu.conf").write_text(QEMU_CONF)
    pidfile = work / "libvirtd.pid"
    for d in LOG_DIRS:  # libvirt-daemon-system's, and no package here makes them
        d.mkdir(parents=True, exist_ok=True)
    add_qemu_user()
    t0 = time.monotonic()
    started = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              'mount --bind "$1" /etc/libvirt && exec libvirtd --daemon --pid-file "$2"',
                              "sh", str(conf), str(pidfile)], capture_output=True, text=True, timeout=120,
                             check=False)
    assert started.returncode == 0, f"{started.stderr}{libvirtd_log()}"
    # `virsh list`, not `version`: that waits for the QEMU driver's first probe of QEMU (minutes here).
    assert wait_for(lambda: virsh("list", timeout=120).returncode == 0, 120), \
        f"{virsh('list').stderr}{libvirtd_log()}"
    progress(f"libvirtd answers {time.monotonic() - t0:.1f} s after its start")
    t0 = time.monotonic()
    version = virsh("version")  # the QEMU driver probes QEMU's capabilities first
    assert version.returncode == 0, f"{version.stderr}{libvirtd_log()}"
    progress(f"libvirt's QEMU driver ready {time.monotonic() - t0:.1f} s later: "
             f"{' / '.join(version.stdout.strip().splitlines())}")
    yield work
    for name in virsh("list", "--all", "--name").stdout.split():
        virsh("destroy", name)
        virsh("undefine", name)
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60)
    shutil.rmtree(work)


class Domain:
    """A domain as `pcipass config libvirt BDF --domain NAME` printed it, defined and started;
    its guest's serial console in a file that `wait_done` follows."""

    def __init__(self, workdir: Path, name: str, bdf: str, kernel: lab_kernel.Kernel, init: str,
                 files: list[nested.initramfs.Entry], *managed: str) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir()
        image, ramdisk = nested.boot_files(self.dir, kernel, init, files)
        self.console = self.dir / "console.log"
        config = pcipass("config", "libvirt", bdf, *managed, "--domain", name, "--domain-type", "qemu",
                         "--memory", str(nested.MEMORY_MIB), "--kernel", str(image), "--initrd", str(ramdisk),
                         "--cmdline", nested.KERNEL_ARGS, "--console-log", str(self.console))
        assert config.returncode == 0, config.stderr
        self.xml = self.dir / f"{name}.xml"
        self.xml.write_text(config.stdout)
        for verb, arg in (("define", str(self.xml)), ("start", name)):
            done = virsh(verb, arg)
            assert done.returncode == 0, f"virsh {verb} {arg}: {done.stderr}\n{config.stdout}{self.qemu_log()}"
        self.started = time.monotonic()
        self.seen = 0  # console lines echoed
        self.done: float | None = None  # seconds from virsh start to the guest's last check
        progress(f"domain {name} started ({bdf}{', managed=' + managed[-1] if managed else ''})")

    def qemu_log(self) -> str:
        log = LOG / "qemu" / f"{self.name}.log"
        text = f"\n--- {log} ---\n{log.read_text(errors='replace')[-3000:]}" if log.exists() else ""
        return text + libvirtd_log()

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def follow(self) -> dict[str, str] | None:
        """Echo the console lines not yet echoed; the guest's results once it has said it is done."""
        lines = self.text().replace("\r\n", "\n").split("\n")
        for line in lines[self.seen:-1]:
            progress(f"{self.name}: {line}")
        self.seen = max(self.seen, len(lines) - 1)
        results = nested.results(self.text())
        if "uptime-done" not in results:
            return None
        if self.done is None:
            self.done = time.monotonic() - self.started
            progress(f"domain {self.name}: guest done {self.done:.0f} s after virsh start (kernel uptime "
                     f"at /init {results.get('uptime-init')} s, at the end {results['uptime-done']} s)")
        return results

    @property
    def where(self) -> str:
        return f"\n--- console ---\n{self.text()[-4000:]}{self.qemu_log()}"

    def destroy(self) -> None:
        t0 = time.monotonic()
        done = virsh("destroy", self.name)
        assert done.returncode == 0, done.stderr
        assert virsh("undefine", self.name).returncode == 0
        progress(f"domain {self.name} destroyed and undefined in {time.monotonic() - t0:.1f} s")


def wait_done(domains: list[Domain], timeout: float = GUEST_TIMEOUT) -> list[dict[str, str]]:
    """Each domain's results once its guest has said it is done, their consoles echoed meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        results = [d.follow() for d in domains]
        if all(r is not None for r in results):
            return results  # type: ignore[return-value]
        for d, r in zip(domains, results):
            state = virsh("domstate", d.name).stdout.strip()
            if r is None and (time.monotonic() > deadline or state != "running"):
                raise AssertionError(f"domain {d.name}: the guest did not finish ({state}, "
                                     f"{time.monotonic() - d.started:.0f} s){d.where}")
        time.sleep(5)


def journal() -> dict[str, bytes]:
    d = Path(os.environ["PCIPASS_STATE_DIR"])
    return {p.name: p.read_bytes() for p in sorted(d.glob("group-*.json"))}


def mac_of(nic: str) -> list[str]:
    return [p.read_text().strip() for p in (PCI / nic / "net").glob("*/address")]


def test_managed_no_and_yes_the_guests_read_the_nic_and_the_nvme_pcipass_respects_libvirt(libvirtd: Path) -> None:
    """Both domains at once: each nested VM is one TCG vCPU, and the lab guest has two."""
    kernel = nested_kernel("libvirtd", "virsh", nested.QEMU, "unshare")
    [nic] = find(E1000E)
    [nvme] = find(QEMU_NVME)
    assert (driver(nic), driver(nvme)) == ("e1000e", "nvme")
    [mac] = mac_of(nic)
    exchange = nested.NvmeExchange.new()
    progress(f"host block written to {exchange.write_host_block(nvme)}; {nic} has MAC {mac}")
    claimed = pcipass("claim", nic)  # managed='no': pcipass's claim comes first
    assert claimed.returncode == 0, claimed.stderr
    assert driver(nic) == "vfio-pci"

    shell, files = exchange.checks(kernel)
    domains: list[Domain] = []
    try:
        domains.append(Domain(libvirtd, "pcipass-nic", nic, kernel,
                              nested.init_script(nested.E1000E_CHECKS, then=nested.IDLE), [], "--managed", "no"))
        domains.append(Domain(libvirtd, "pcipass-nvme", nvme, kernel, nested.init_script(shell, then=nested.IDLE),
                              files))  # managed='yes', config libvirt's default
        nic_domain, nvme_domain = domains
        assert driver(nvme) == "vfio-pci"  # libvirt detached it

        data = json.loads(pcipass("status", "--json").stdout)
        [group] = data["groups"]  # the NIC's: pcipass claimed nothing else
        [nic_held] = group["libvirt"]
        assert (nic_held["bdf"], nic_held["domain"], nic_held["managed"]) == (nic, nic_domain.name, False), group
        by_bdf = {lv["bdf"]: lv for lv in data["libvirt"]}
        assert sorted(by_bdf) == sorted([nic, nvme]), data
        nvme_held = by_bdf[nvme]
        assert (nvme_held["domain"], nvme_held["managed"], nvme_held["claimed_by_pcipass"]) \
            == (nvme_domain.name, True, False), data
        assert by_bdf[nic]["claimed_by_pcipass"] is True
        nic_pid, nvme_pid = nic_held["pid"], nvme_held["pid"]
        status = pcipass("status")
        assert status.returncode == 0, status.stderr
        assert f"held by libvirt domain {nic_domain.name} (pid {nic_pid}): {nic}, managed='no'" in status.stdout, \
            status.stdout
        assert (f"libvirt: {nvme} is a hostdev of running domain {nvme_domain.name} (pid {nvme_pid}, "
                "managed='yes'), not claimed by pcipass") in status.stdout, status.stdout

        nvme_hold = f"libvirt domain {nvme_domain.name} (pid {nvme_pid}) has {nvme} as a hostdev (managed='yes')"
        check = pcipass("check", nvme)
        assert check.returncode == 1, check.stdout
        assert nvme_hold in check.stdout and f"virsh destroy {nvme_domain.name}" in check.stdout, check.stdout
        verdict = json.loads(pcipass("check", nvme, "--json").stdout)["verdict"]
        assert not verdict["ok"]
        [reason] = [r for r in verdict["reasons"] if r["code"] == "held-by-libvirt"]
        assert (reason["details"]["domain"], reason["details"]["managed"]) == (nvme_domain.name, True), reason

        kept = journal()
        nic_hold = f"it is held by libvirt: libvirt domain {nic_domain.name} (pid {nic_pid}) has {nic} as a hostdev " \
            "(managed='no')"
        for argv, wanted, domain in ((["release", nic], nic_hold, nic_domain),
                                     (["claim", nvme], nvme_hold, nvme_domain),
                                     (["release", nvme], nvme_hold, nvme_domain)):
            refused = pcipass(*argv)
            assert refused.returncode == 1, (argv, refused.stdout)
            assert wanted in refused.stderr, (argv, refused.stderr)
            assert f"virsh destroy {domain.name}" in refused.stderr, (argv, refused.stderr)  # the way out
            assert (driver(nic), driver(nvme)) == ("vfio-pci", "vfio-pci") and journal() == kept, argv
        progress("status, check, claim and release: libvirt's hold seen and respected")

        nic_results, nvme_results = wait_done(domains)
        assert nested.e1000e_macs(nic_results) == {"0000:00:10.0": mac}, nic_domain.where
        assert nvme_results.get("nvme-driver") == "0000:00:10.0=nvme", nvme_domain.where
        assert nvme_results.get("nvme-serial") == NVME_SERIAL, nvme_domain.where
        assert not exchange.mismatches(nvme_results), f"{exchange.mismatches(nvme_results)}{nvme_domain.where}"
    finally:
        for d in domains:
            d.destroy()
    released = pcipass("release", nic)
    assert released.returncode == 0, released.stderr
    assert driver(nic) == "e1000e"
    assert wait_for(lambda: mac_of(nic) == [mac])
    assert wait_for(lambda: driver(nvme) == "nvme", 60)  # libvirt gave it back
    host_block, guest_block = exchange.read_back(nvme)
    assert host_block == exchange.host_block  # the controller came back whole
    assert guest_block == exchange.guest_block
