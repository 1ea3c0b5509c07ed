"""Holders on fake trees: processes with VFIO fds or mapped BARs under ROOT/proc, libvirt's
status XML under ROOT/run/libvirt/qemu; release, release --all, claim and recover refuse
while something holds a group and change nothing; status and check name the holders."""

from __future__ import annotations

import json
import os
import select
import time
from pathlib import Path

import pytest

from pcipass.cli import main
from pcipass.errors import PcipassError
from pcipass.host.fixtures import synthetic
from pcipass.host.model.holders import Holders, held
from pcipass.host.model.sysfs import Host
from pcipass.host.transaction import claim as c
from pcipass.host.transaction.journal import Step
from pcipass.host.transaction.simulated import SimulatedKernel
from pcipass.host.transaction.writer import UNBIND_TIMEOUT_ENV, SysfsWriter
from pcipass.host.verdict.judge import judge

EDU_PAIR = ["0000:02:0d.0", "0000:02:0d.1"]  # group 2, behind the bridge 0000:01:00.0
NVME = "0000:03:00.0"  # group 4, on nvme


@pytest.fixture
def tree(tmp_path):
    return synthetic.seed_layout(str(tmp_path / "seed"))


def add_process(root: str, pid: int, argv: list[str], fds: dict[int, str] | None = None,
                fdinfo: dict[int, str] | None = None, maps: list[str] = ()) -> Path:
    """ROOT/proc/PID as the kernel shows a process: fd links, fdinfo, maps, cmdline."""
    proc = Path(root, "proc", str(pid))
    (proc / "fd").mkdir(parents=True)
    (proc / "fdinfo").mkdir()
    for fd, target in (fds or {}).items():
        os.symlink(target, proc / "fd" / str(fd))
        (proc / "fdinfo" / str(fd)).write_text((fdinfo or {}).get(fd, "pos:\t0\nflags:\t02\nmnt_id:\t15\n"))
    (proc / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / "maps").write_text("".join(
        f"7f0000{i:04x}000-7f0000{i:04x}fff rw-s 00000000 00:15 1234   {path}\n" for i, path in enumerate(maps)))
    return proc


def syspath(tree, bdf: str) -> str:
    """The device's path as /proc/PID/maps names it: /sys/devices/pci0000:00/.../BDF."""
    real = os.path.realpath(os.path.join(tree.root, "sys/bus/pci/devices", bdf))
    return "/" + os.path.relpath(real, tree.root)


def bindings(root: str) -> dict[str, tuple[str | None, str | None]]:
    w = SysfsWriter(root)
    return {n: (w.driver(n), w.override(n)) for n in sorted(os.listdir(os.path.join(root, "sys/bus/pci/devices")))}


def journal_files(root: str) -> list[str]:
    d = Path(root, "run/pcipass")
    return sorted(p.name for p in d.glob("group-*.json")) if d.is_dir() else []


def write_libvirt_status(root: str, name: str, pid: int, hostdevs: list[tuple[str, str]]) -> Path:
    """A running domain's status XML as libvirtd keeps it in /run/libvirt/qemu/NAME.xml."""
    devs = ""
    for bdf, managed in hostdevs:
        dom, bus, rest = bdf.split(":")
        slot, fn = rest.split(".")
        devs += (f"      <hostdev mode='subsystem' type='pci' managed='{managed}'>\n"
                 "        <driver name='vfio'/>\n"
                 f"        <source>\n          <address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' "
                 f"function='0x{fn}'/>\n        </source>\n"
                 "        <alias name='hostdev0'/>\n"
                 "        <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>\n"
                 "      </hostdev>\n")
    text = ("<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE\n"
            "OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:\n"
            "  virsh edit\n-->\n\n"
            f"<domstatus state='running' reason='booted' pid='{pid}'>\n"
            "  <taint flag='high-privileges'/>\n"
            f"  <domain type='qemu' id='1'>\n    <name>{name}</name>\n    <memory unit='KiB'>131072</memory>\n"
            f"    <devices>\n      <emulator>/usr/bin/qemu-system-x86_64</emulator>\n{devs}    </devices>\n"
            "  </domain>\n</domstatus>\n")
    path = Path(root, "run/libvirt/qemu", f"{name}.xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- detection ---

def test_group_node_device_fd_and_mapped_bar_are_holders(tree):
    add_process(tree.root, 4242, ["qemu-system-x86_64", "-device", "vfio-pci,host=0000:02:0d.0"],
                fds={3: "/dev/vfio/vfio", 4: "/dev/vfio/2", 5: "anon_inode:[vfio-device]", 6: "/dev/null"})
    add_process(tree.root, 4343, ["python3", "map.py"], maps=[syspath(tree, NVME) + "/resource0"])
    add_process(tree.root, 4444, ["bash"], fds={0: "/dev/pts/0"})
    scan = Holders(Host(tree.root))
    [h] = scan.of(EDU_PAIR)
    assert (h.pid, h.command) == (4242, "qemu-system-x86_64 -device vfio-pci,host=0000:02:0d.0")
    assert h.uses == ("/dev/vfio/2 open", "1 VFIO device fd(s) of its group")
    [m] = scan.of([NVME])
    assert m.pid == 4343 and m.uses == (f"{NVME} resource0 mapped",)
    assert scan.of(["0000:00:0a.0"]) == []  # group 3: nobody


def test_fdinfo_naming_the_device_and_the_cdev(tree):
    # Newer kernels name a device fd's device in fdinfo; the cdev is /dev/vfio/devices/vfioX.
    vfio_dev = Path(tree.root, "sys/bus/pci/devices/0000:00:0a.0/vfio-dev/vfio0")
    vfio_dev.mkdir(parents=True)
    add_process(tree.root, 7, ["consumer"], fds={5: "anon_inode:[vfio-device]"},
                fdinfo={5: f"pos:\t0\nflags:\t02\nvfio-device-syspath: {syspath(tree, '0000:00:0a.0')}\n"})
    add_process(tree.root, 8, ["cdev-user"], fds={3: "/dev/vfio/devices/vfio0", 4: "/dev/iommu"})
    scan = Holders(Host(tree.root))
    assert [(h.pid, h.uses) for h in scan.of(["0000:00:0a.0"])] == [
        (7, ("a VFIO device fd of 0000:00:0a.0",)), (8, ("/dev/vfio/devices/vfio0 (0000:00:0a.0) open",))]
    assert scan.of(EDU_PAIR) == []  # named: not counted against another group


def test_an_unnamed_device_fd_without_its_group_counts_against_every_vfio_device(tree):
    # Linux 6.1 does not name a device fd; a process that closed its group fd could hold any.
    c.claim(c.Context(tree.root), "0000:00:0a.0")
    add_process(tree.root, 9, ["driver"], fds={5: "anon_inode:[vfio-device]"})
    scan = Holders(Host(tree.root))
    [h] = scan.of(["0000:00:0a.0"])
    assert "maybe this one" in h.uses[0]
    assert scan.of([NVME]) == []  # on nvme, not vfio-pci: it cannot be that one


def test_unreadable_processes_are_named(tree, monkeypatch):
    add_process(tree.root, 10, ["someone"], fds={3: "/dev/vfio/2"})
    real_listdir = os.listdir

    def listdir(path):
        if str(path).endswith("/proc/10/fd"):
            raise PermissionError(13, "Permission denied")
        return real_listdir(path)
    monkeypatch.setattr(os, "listdir", listdir)
    scan = Holders(Host(tree.root))
    assert scan.of(EDU_PAIR) == [] and scan.unreadable == [10]


def test_libvirt_status_xml_and_its_qemu(tree):
    add_process(tree.root, 555, ["/usr/bin/qemu-system-x86_64", "-name", "guest=vm1,debug-threads=on", "-object",
                                 '{"qom-type":"secret","id":"masterKey0","format":"raw","file":'
                                 '"/var/lib/libvirt/qemu/domain-1-vm1/master-key.aes"}'],
                fds={20: "/dev/vfio/2", 21: "anon_inode:[vfio-device]"})
    write_libvirt_status(tree.root, "vm1", 555, [("0000:02:0d.0", "yes")])
    write_libvirt_status(tree.root, "gone", 999, [(NVME, "yes")])  # its QEMU is not running: stale
    scan = Holders(Host(tree.root))
    [dom] = scan.libvirt_domains
    assert (dom.name, dom.pid, dom.hostdevs) == ("vm1", 555, (("0000:02:0d.0", True),))
    found = held(scan, EDU_PAIR)
    assert found.libvirt_names() == ["vm1"]
    assert found.processes[0].libvirt_domain == "vm1"
    assert not held(scan, [NVME])


# --- refusals: release, release --all, claim, recover ---

def test_release_release_all_and_claim_refuse_while_a_process_holds_the_group(tree, capsys):
    ctx = c.Context(tree.root)
    c.claim(ctx, "0000:02:0d.0")
    c.claim(ctx, NVME)
    before, journal = bindings(tree.root), journal_files(tree.root)
    add_process(tree.root, 4242, ["python3", "holder.py"], fds={4: "/dev/vfio/2", 5: "anon_inode:[vfio-device]"})
    for argv in (["release", "0000:02:0d.1"], ["release", "--all"], ["claim", "0000:02:0d.0"]):
        assert main([*argv, "--sysfs", tree.root]) == 1, argv
        err = capsys.readouterr().err
        assert "pid 4242 (python3 holder.py)" in err and "/dev/vfio/2 open" in err, (argv, err)
        assert "hint: stop the holder first" in err or "hint: stop it first" in err, err
        assert bindings(tree.root) == before and journal_files(tree.root) == journal, argv
    assert "nothing was released: 1 of 2 groups are held" in _err(["release", "--all", "--sysfs", tree.root], capsys)
    # The held group's record is untouched: still a finished claim, no step added.
    [g2] = [r for r in ctx.journal.records() if r.key == "2"]
    assert (g2.op, g2.state) == ("claim", "done")
    # The NVMe, which nobody holds, can go.
    assert main(["release", NVME, "--sysfs", tree.root]) == 0
    assert bindings(tree.root)[NVME] == ("nvme", None)


def _err(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


def test_after_the_holder_exits_release_gives_the_group_back(tree):
    ctx = c.Context(tree.root)
    before = bindings(tree.root)
    c.claim(ctx, "0000:02:0d.0")
    proc = add_process(tree.root, 4242, ["holder"], fds={4: "/dev/vfio/2"})
    with pytest.raises(PcipassError) as e:
        c.release(ctx, "0000:02:0d.0")
    assert e.value.code == "held-by-process"
    for p in proc.rglob("*"):
        if p.is_symlink() or p.is_file():
            p.unlink()
    for p in sorted(proc.rglob("*"), reverse=True):
        p.rmdir()
    proc.rmdir()
    assert [r.key for r in c.release(ctx, "0000:02:0d.0")] == ["2"]
    assert bindings(tree.root) == before and journal_files(tree.root) == []


def test_recover_skips_a_held_group(tree):
    ctx = c.Context(tree.root)
    c.claim(ctx, "0000:02:0d.0")
    [r] = ctx.journal.records()
    r.op, r.state = "release", "in-progress"
    ctx.journal.write(r)
    add_process(tree.root, 77, ["qemu"], fds={9: "/dev/vfio/2"})
    done, spec = c.recover(ctx)
    assert done.action.startswith("skipped: held by pid 77 (qemu)")
    assert ctx.journal.read("2") is not None
    # The claim's CDI spec goes all the same: no spec names a group that is being given back.
    assert spec.action.startswith("removed CDI spec") and spec.key == "2"


def test_libvirt_managed_yes_check_status_claim_release(tree, capsys):
    """A device libvirt detached itself (on vfio-pci, not in pcipass's journal) for a running
    domain: check and status say so, claim and release refuse, naming the domain."""
    w = SimulatedKernel(tree.root)
    for step in (Step("modprobe", None, "vfio-pci"), Step("override-set", NVME, "vfio-pci"),
                 Step("unbind", NVME), Step("probe", NVME)):  # what libvirt's nodedev-detach does
        w.apply(step)
    assert w.driver(NVME) == "vfio-pci"
    add_process(tree.root, 600, ["/usr/bin/qemu-system-x86_64", "-name", "guest=web,debug-threads=on"],
                fds={30: "/dev/vfio/4", 31: "anon_inode:[vfio-device]"})
    write_libvirt_status(tree.root, "web", 600, [(NVME, "yes")])
    before = bindings(tree.root)

    v = judge(Host(tree.root), NVME)
    [r] = [r for r in v.reasons if r.code == "held-by-libvirt"]
    assert r.severity == "blocking" and r.details["domain"] == "web" and r.details["managed"] is True
    assert "virsh destroy web" in r.hint and "virsh nodedev-reattach pci_0000_03_00_0" in r.hint
    assert not [r for r in v.reasons if r.code == "held-by-process"]  # its QEMU is the domain, said once
    assert main(["check", NVME, "--sysfs", tree.root]) == 1
    out = capsys.readouterr().out
    assert "held-by-libvirt" in out or "libvirt domain web" in out, out

    for argv in (["claim", NVME], ["release", NVME]):
        assert main([*argv, "--sysfs", tree.root]) == 1
        err = capsys.readouterr().err
        assert "libvirt domain web" in err and "virsh destroy web" in err, err
    with pytest.raises(PcipassError) as e:
        c.release(c.Context(tree.root), NVME)
    assert e.value.code == "held-by-libvirt"
    with pytest.raises(PcipassError) as e:
        c.claim(c.Context(tree.root), NVME)
    assert e.value.code == "held-by-libvirt"
    assert bindings(tree.root) == before and journal_files(tree.root) == []

    assert main(["status", "--json", "--sysfs", tree.root]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["libvirt"] == [{"domain": "web", "pid": 600, "state": "running", "bdf": NVME, "managed": True,
                                "claimed_by_pcipass": False}]
    assert main(["status", "--sysfs", tree.root]) == 0
    assert f"libvirt: {NVME} is a hostdev of running domain web (pid 600, managed='yes')" in capsys.readouterr().out


def test_libvirt_managed_no_on_a_claimed_group_refuses_release_until_the_domain_stops(tree, capsys):
    ctx = c.Context(tree.root)
    c.claim(ctx, "0000:02:0d.0")
    xml = write_libvirt_status(tree.root, "vm1", 555, [("0000:02:0d.0", "no"), ("0000:02:0d.1", "no")])
    add_process(tree.root, 555, ["qemu-system-x86_64"], fds={4: "/dev/vfio/2"})
    with pytest.raises(PcipassError) as e:
        c.release(ctx, "0000:02:0d.0")
    assert e.value.code == "held-by-libvirt" and "managed='no'" in e.value.message
    [g] = c.status(ctx)["groups"]
    assert [lv["domain"] for lv in g["libvirt"]] == ["vm1", "vm1"]
    assert g["holders"][0]["pid"] == 555 and g["holders"][0]["libvirt_domain"] == "vm1"
    xml.unlink()  # virsh destroy: libvirtd removes the status file, QEMU exits
    for p in sorted(Path(tree.root, "proc/555").rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
    Path(tree.root, "proc/555").rmdir()
    assert [r.key for r in c.release(ctx, "0000:02:0d.0")] == ["2"]


def test_status_shows_the_holders(tree, capsys):
    c.claim(c.Context(tree.root), "0000:02:0d.0")
    add_process(tree.root, 4242, ["pcipass", "serve", "0000:02:0d.0", "--socket", "/run/edu.sock"],
                fds={4: "/dev/vfio/2", 5: "anon_inode:[vfio-device]"},
                maps=[syspath(tree, "0000:02:0d.0") + "/resource0"])
    assert main(["status", "--sysfs", tree.root]) == 0
    out = capsys.readouterr().out
    assert ("held by pid 4242 (pcipass serve 0000:02:0d.0 --socket /run/edu.sock): /dev/vfio/2 open, "
            "1 VFIO device fd(s) of its group, 0000:02:0d.0 resource0 mapped") in out, out
    assert main(["status", "--json", "--sysfs", tree.root]) == 0
    [g] = json.loads(capsys.readouterr().out)["groups"]
    assert g["holders"] == [{"pid": 4242, "command": "pcipass serve 0000:02:0d.0 --socket /run/edu.sock",
                             "uses": ["/dev/vfio/2 open", "1 VFIO device fd(s) of its group",
                                      "0000:02:0d.0 resource0 mapped"], "libvirt_domain": None}]


def test_check_names_a_process_holding_the_group(tree):
    c.claim(c.Context(tree.root), "0000:02:0d.0")
    add_process(tree.root, 31, ["python3", "-c", "hold"], fds={4: "/dev/vfio/2"})
    v = judge(Host(tree.root), "0000:02:0d.1")
    [r] = [r for r in v.reasons if r.code == "held-by-process"]
    assert r.severity == "blocking" and r.details["pid"] == 31 and not v.ok


# --- an unbind the kernel holds ---

def _gated_kernel(tree, gate: Path, **kw) -> SimulatedKernel:
    """The simulation, with an unbind that blocks while `gate` exists (as vfio-pci's remove
    waits for the device's user) and is written in a child, as on the real host."""
    def hold(path: Path, value: str) -> bool:
        while path.name == "unbind" and gate.exists():
            time.sleep(0.02)
        return False
    kernel = SimulatedKernel(tree.root, fail=hold, **kw)
    kernel.fork_blocking_writes = True
    return kernel


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_blocked_unbind_times_out_and_the_release_is_finished_when_the_kernel_lets_go(tree, tmp_path, monkeypatch):
    before = bindings(tree.root)
    c.claim(c.Context(tree.root), NVME)
    gate = tmp_path / "user-holds-it"
    gate.write_text("")
    monkeypatch.setenv(UNBIND_TIMEOUT_ENV, "0.5")
    ctx = c.Context(tree.root, writer=_gated_kernel(tree, gate))
    t0 = time.monotonic()
    with pytest.raises(PcipassError) as e:
        c.release(ctx, NVME)
    assert time.monotonic() - t0 < 10
    assert e.value.code == "unbind-blocked"
    assert f"the kernel still holds the unbind of {NVME} after 0.5 s" in e.value.message
    assert "completes the release" in e.value.message
    finisher = e.value.message.split("pcipass pid ")[1].split()[0]
    [g] = c.status(c.Context(tree.root))["groups"]
    assert g["state"] == "release in progress"  # the finisher holds the group's lock
    assert g["locked_by"].startswith(f"pid {finisher}: waits for the kernel"), g["locked_by"]
    with pytest.raises(PcipassError) as again:  # nobody fights the finisher for the group
        c.release(c.Context(tree.root), NVME)
    assert again.value.code == "group-locked" and f"pid {finisher}" in again.value.message
    assert bindings(tree.root)[NVME][0] == "vfio-pci"  # the unbind has not gone through yet
    gate.unlink()  # the user lets go: the kernel finishes the unbind, the waiting child the release
    assert wait_until(lambda: journal_files(tree.root) == [])
    assert bindings(tree.root) == before  # back on nvme, not on no driver


def test_the_finisher_keeps_none_of_the_callers_output(tree, tmp_path, monkeypatch):
    """`out=$(pcipass release X)` or a pipe must not wait, after unbind-blocked, for the
    kernel: the child that waits keeps none of the caller's stdin, stdout or stderr."""
    c.claim(c.Context(tree.root), NVME)
    gate = tmp_path / "user-holds-it"
    gate.write_text("")
    monkeypatch.setenv(c.UNBIND_TIMEOUT_ENV, "0.5")
    ctx = c.Context(tree.root, writer=_gated_kernel(tree, gate))
    r, w = os.pipe()
    saved = os.dup(1)
    os.dup2(w, 1)  # our stdout is the pipe, as under $(...)
    os.close(w)
    try:
        with pytest.raises(PcipassError) as e:
            c.release(ctx, NVME)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    try:
        assert e.value.code == "unbind-blocked"
        assert select.select([r], [], [], 10)[0], "the finisher still holds the caller's stdout"
        assert os.read(r, 1) == b""  # end of file: nobody writes to it any more
    finally:
        os.close(r)
        gate.unlink()
    assert wait_until(lambda: journal_files(tree.root) == [])


def test_an_unbind_in_time_and_a_failed_one_through_the_child(tree, tmp_path, monkeypatch):
    before = bindings(tree.root)
    c.claim(c.Context(tree.root), NVME)
    ctx = c.Context(tree.root, writer=_gated_kernel(tree, tmp_path / "no-gate"))
    assert [r.key for r in c.release(ctx, NVME)] == ["4"]
    assert bindings(tree.root) == before and journal_files(tree.root) == []
    c.claim(c.Context(tree.root), NVME)
    failing = SimulatedKernel(tree.root, fail=lambda path, value: path.name == "unbind")
    failing.fork_blocking_writes = True
    with pytest.raises(PcipassError) as e:
        c.release(c.Context(tree.root, writer=failing), NVME)
    assert e.value.code == "release-failed" and "Invalid argument" in e.value.message


def test_list_leaves_the_device_lock_alone_while_a_group_is_at_work(tree):
    """While a release waits in the kernel, the device lock is held and a read of
    driver_override waits with it. Here driver_override is a FIFO nobody writes, which blocks
    the same way: a listing that read it would never answer."""
    import subprocess
    import sys

    c.claim(c.Context(tree.root), "0000:02:0d.0")
    override = Path(tree.root, "sys/bus/pci/devices/0000:02:0d.0/driver_override")
    override.unlink()
    os.mkfifo(override)
    lock = c.Context(tree.root).lock("2").acquire()
    lock.retell(4242, "pcipass release 0000:02:0d.0 (finishing)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3] / "src")}

    def listing(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pcipass", "list", "--sysfs", tree.root, *extra],
                              capture_output=True, text=True, timeout=60, env=env)

    try:
        doc = json.loads(listing("--json").stdout)
        human = listing().stdout
    finally:
        lock.release()
    by_bdf = {d["bdf"]: d for d in doc["devices"]}
    for bdf in EDU_PAIR:
        assert by_bdf[bdf]["at_work"] == "pid 4242: pcipass release 0000:02:0d.0 (finishing)", by_bdf[bdf]
        assert by_bdf[bdf]["driver_override"] is None
    assert by_bdf[NVME]["at_work"] is None
    assert "at work: pid 4242" in human, human
    # The lock let go: the group is no longer at work, and its attributes are read again.
    override.unlink()
    override.write_text("vfio-pci\n")
    by_bdf = {d["bdf"]: d for d in json.loads(listing("--json").stdout)["devices"]}
    assert by_bdf["0000:02:0d.0"]["at_work"] is None
    assert by_bdf["0000:02:0d.0"]["driver_override"] == "vfio-pci"
