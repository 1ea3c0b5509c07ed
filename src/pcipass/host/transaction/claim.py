"""Seize an IOMMU group for pass-through and give it back, crash-safe.

A claim takes every endpoint of the group (bridges are left alone) from its
host driver to vfio-pci, or on a Xen dom0 to xen-pciback ("pciback"):

    vfio:  driver_override=vfio-pci, unbind, drivers_probe, check it is bound
    xen:   pciback/new_slot, driver_override=pciback, unbind, pciback/bind,
           [pciback/permissive], [pciback/quirks], check it is bound

Every step is in the journal (pcipass.host.transaction.journal) before the first change,
with each device's original driver and driver_override. Giving back does not
replay steps backwards: it drives each device to the state the journal names
(override cleared, unbound from what it has, probed, bound by name if the probe
chose another driver). That is idempotent, so the same code rolls back a failed
claim, releases a claim, and recovers from a process killed at any step:

    recover: an interrupted claim is rolled back; an interrupted release is completed.

All writes go through `SysfsWriter`; `SimulatedKernel` plays the kernel's part
on a synthetic tree (binding moves the `driver` symlink) for `--sysfs ROOT`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pcipass.errors import NeedsRoot, PcipassError, UsageError
from pcipass.host.model.sysfs import Host, PciDevice, parse_bdf
from pcipass.host.transaction.journal import (
    CLAIM,
    DONE,
    IN_PROGRESS,
    RELEASE,
    DeviceRecord,
    GroupLock,
    Journal,
    NodeRecord,
    Record,
    Step,
    state_dir,
)
from pcipass.sysfs import PASS_THROUGH_DRIVERS, link_name, read_attr
from pcipass.unwind import signals_as_interrupt

VFIO, XEN = "vfio", "xen"
# What each target binds to: the driver's name in sysfs and the module that provides it.
TARGET_DRIVER = {VFIO: "vfio-pci", XEN: "pciback"}
TARGET_MODULE = {VFIO: "vfio-pci", XEN: "xen-pciback"}
_QUIRK = re.compile(r"^[0-9a-fA-F]{1,3}:[124]:[0-9a-fA-F]{1,8}$")
NOIOMMU_PARAM = "sys/module/vfio/parameters/enable_unsafe_noiommu_mode"
CRASH_ENV = "PCIPASS_CRASH_AT_STEP"
NOIOMMU_UNSUPPORTED = ("vfio has no enable_unsafe_noiommu_mode parameter: this kernel was built "
                       "without CONFIG_VFIO_NOIOMMU")
# How long an unbind may take before pcipass stops waiting for it (seconds).
UNBIND_TIMEOUT_ENV = "PCIPASS_UNBIND_TIMEOUT"
DEFAULT_UNBIND_TIMEOUT = 30.0


class WriteBlocked(OSError):
    """A write the kernel still holds after the timeout; `finisher` is the process that
    waits it out and then finishes the operation (see SysfsWriter.write_may_block)."""

    def __init__(self, path: Path, value: str, finisher: int, timeout: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"the kernel still holds the write after {timeout:g} s", str(path))
        self.value = value
        self.finisher = finisher
        self.timeout = timeout


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class SysfsWriter:
    """Every change pcipass makes to the kernel's PCI bindings goes through here.

    Each journal step action is carried out by the method STEPS names. Each step is
    idempotent (unbind of an unbound device, bind of a bound one, do nothing),
    so giving back can run the same steps again after a crash.
    """

    # The journal's step actions (journal.STEP_ACTIONS, written on disk: never renamed) ->
    # the method that carries each out (renamed freely, here).
    STEPS: dict[str, str] = {
        "modprobe": "modprobe",
        "noiommu": "noiommu",
        "override-set": "override_set",
        "unbind": "unbind",
        "probe": "probe",
        "bind": "bind",
        "expect": "expect",
        "pciback-new-slot": "pciback_new_slot",
        "pciback-remove-slot": "pciback_remove_slot",
        "pciback-permissive": "pciback_permissive",
        "pciback-quirk": "pciback_quirk",
        "node-owner": "node_owner",
        "node-restore": "node_restore",
    }

    # Unbinds run in a child that can outlive a timeout (write_may_block); the simulation
    # writes in-process unless a test turns this on.
    fork_blocking_writes = True

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)
        self.pci = self.root / "sys/bus/pci"
        # Run, in the child that waited out a blocked write, once the kernel let it through:
        # finishes what the caller started (Transaction sets it).
        self.finish: Callable[[], None] | None = None

    # --- live state: read fresh every time, the kernel changes it under us ---

    def dev_path(self, bdf: str) -> Path:
        return self.pci / "devices" / bdf

    def driver(self, bdf: str) -> str | None:
        return link_name(str(self.dev_path(bdf) / "driver"))

    def override(self, bdf: str) -> str | None:
        value = read_attr(str(self.dev_path(bdf) / "driver_override"))
        return None if value in (None, "", "(null)") else value

    def has_driver(self, name: str) -> bool:
        return (self.pci / "drivers" / name).is_dir()

    def noiommu_mode(self) -> str | None:
        return read_attr(str(self.root / NOIOMMU_PARAM))

    def noiommu_supported(self) -> bool | None:
        """Whether vfio has its no-IOMMU mode (a kernel built with CONFIG_VFIO_NOIOMMU),
        found without loading anything; None when it cannot be known."""
        if (self.root / NOIOMMU_PARAM).parent.parent.is_dir():  # vfio loaded or built in
            return (self.root / NOIOMMU_PARAM).exists()
        return self._vfio_module_has_noiommu()

    def _vfio_module_has_noiommu(self) -> bool | None:
        try:
            result = subprocess.run(["modinfo", "-F", "parm", "vfio"], capture_output=True,
                                    text=True, check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if result.returncode != 0:
            return None
        return any(line.startswith(NOIOMMU_PARAM.rsplit("/", 1)[1] + ":")
                   for line in result.stdout.splitlines())

    # --- the one place that writes ---

    def write(self, path: Path, value: str) -> None:
        with open(path, "w") as f:
            f.write(value)

    def write_may_block(self, path: Path, value: str) -> None:
        """A write the kernel may hold for as long as someone else decides: vfio-pci's remove
        waits, uninterruptibly and without end, for the device's user to close it. Once
        written, an unbind cannot be taken back, and when it goes through the device is on
        no driver. So the write is made in a child, detached from the terminal; if it takes
        longer than PCIPASS_UNBIND_TIMEOUT seconds (default 30), WriteBlocked is raised here,
        and the child, when the kernel lets the write through, runs `finish` (the rest of
        the release, or the claim's undo), so the device still ends on a driver."""
        if not self.fork_blocking_writes:
            self.write(path, value)
            return
        timeout = float(os.environ.get(UNBIND_TIMEOUT_ENV) or DEFAULT_UNBIND_TIMEOUT)
        result_r, result_w = os.pipe()
        decide_r, decide_w = os.pipe()
        middle = os.fork()
        if middle == 0:  # forks the writer and exits, so that the writer is nobody's zombie
            try:
                if os.fork() == 0:
                    os.close(result_r)
                    os.close(decide_w)
                    # Its own pid first, then the result: one writer, so they come in that order.
                    os.write(result_w, os.getpid().to_bytes(4, "little"))
                    try:
                        self._blocking_child(path, value, result_w, decide_r)
                    except BaseException:  # noqa: BLE001 - nobody else will say it
                        import traceback

                        traceback.print_exc()
            finally:
                os._exit(0)
        os.close(result_w)
        os.close(decide_r)
        try:
            os.waitpid(middle, 0)
            writer = int.from_bytes(_read_exactly(result_r, 4), "little")
            if select.select([result_r], [], [], timeout)[0]:
                reply = os.read(result_r, 1)
                os.write(decide_w, b"C")  # carry on: this process finishes
                code = reply[0] if reply else errno.EIO
                if code:
                    raise OSError(code, os.strerror(code), str(path))
                return
            os.write(decide_w, b"F")  # give up: the writer finishes when the kernel lets go
            raise WriteBlocked(path, value, writer, timeout)
        finally:
            os.close(result_r)
            os.close(decide_w)

    def _blocking_child(self, path: Path, value: str, result_w: int, decide_r: int) -> None:
        os.setsid()  # Ctrl-C and a closed terminal are for the parent, not for this write
        code = 0
        try:
            self.write(path, value)
        except OSError as exc:
            code = exc.errno or errno.EIO
        try:
            os.write(result_w, bytes([min(code, 255)]))
        except BrokenPipeError:
            pass  # the parent stopped listening: it gave up, or died
        decision = os.read(decide_r, 1)  # b"C": the parent carries on; b"F" or EOF: it gave up or died
        if decision != b"C" and code == 0 and self.finish is not None:
            self.fork_blocking_writes = False  # nobody is waiting any more
            self.finish()

    # --- step actions ---

    def override_set(self, bdf: str, value: str | None) -> None:
        # A newline clears driver_override (an empty write never reaches the kernel).
        self.write(self.dev_path(bdf) / "driver_override", value or "\n")

    def unbind(self, bdf: str, value: str | None = None) -> None:
        if self.driver(bdf) is not None:
            self.write_may_block(self.dev_path(bdf) / "driver" / "unbind", bdf)

    def probe(self, bdf: str, value: str | None = None) -> None:
        if self.driver(bdf) is None:
            self.write(self.pci / "drivers_probe", bdf)

    def bind(self, bdf: str, value: str | None) -> None:
        """Bind to driver `value` unless the device already has a driver."""
        if value and self.driver(bdf) is None and self.has_driver(value):
            self.write(self.pci / "drivers" / value / "bind", bdf)

    def pciback_new_slot(self, bdf: str, value: str | None = None) -> None:
        self.write(self.pci / "drivers/pciback/new_slot", bdf)

    def pciback_remove_slot(self, bdf: str, value: str | None = None) -> None:
        # ENOENT: pciback holds no such slot (a claim killed before new_slot), or
        # pciback is not loaded at all. Either way there is nothing to remove, and
        # giving back must be able to run twice.
        try:
            self.write(self.pci / "drivers/pciback/remove_slot", bdf)
        except FileNotFoundError:
            pass

    def pciback_permissive(self, bdf: str, value: str | None = None) -> None:
        self.write(self.pci / "drivers/pciback/permissive", bdf)

    def pciback_quirk(self, bdf: str, value: str | None) -> None:
        # DDDD:BB:DD.F-REG:SIZE:MASK: let the guest at one more config register.
        self.write(self.pci / "drivers/pciback/quirks", f"{bdf}-{value}")

    def modprobe(self, bdf: str | None, value: str | None) -> None:
        if value and not self.has_driver(value.replace("xen-pciback", "pciback")):
            result = subprocess.run(["modprobe", value], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise OSError(f"modprobe {value} failed: {result.stderr.strip()}")

    def noiommu(self, bdf: str | None, value: str | None) -> None:
        if value is None or self.noiommu_mode() == value:
            return
        if self.noiommu_mode() is None:
            if value == "N":  # no parameter: vfio is not loaded or has no such mode, so it is off
                return
            self.modprobe(None, "vfio")
            if self.noiommu_mode() is None:
                raise OSError(NOIOMMU_UNSUPPORTED)
        self.write(self.root / NOIOMMU_PARAM, value)

    # --- the VFIO nodes claim --owner gives to a user ---

    def node_path(self, bdf: str | None, where: str) -> Path | None:
        """The node a node step names: "/dev/vfio/N" as it is, "cdev" the device's
        /dev/vfio/devices/vfioX (None where the kernel has no such node)."""
        if where != "cdev":
            return self.root / where.lstrip("/")
        try:
            names = sorted(os.listdir(self.dev_path(str(bdf)) / "vfio-dev"))
        except OSError:
            return None
        node = self.root / "dev/vfio/devices" / names[0] if names else None
        return node if node is not None and node.exists() else None

    def has_cdev(self, bdf: str) -> bool:
        """Whether the kernel gives `bdf` a VFIO cdev: Linux 6.1 to 6.5 make the vfio-dev/vfioX
        class device without a device number (no `dev` file), so no /dev/vfio/devices node."""
        return any((self.dev_path(bdf) / "vfio-dev").glob("*/dev"))

    def node_state(self, path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    def set_node(self, path: Path, uid: int, gid: int, mode: int) -> None:
        os.chown(path, uid, gid)
        os.chmod(path, mode)

    def wait_node(self, bdf: str | None, where: str, timeout: float = 10.0) -> Path | None:
        """The node, once the kernel has made it (/dev/vfio/N appears with the group's first
        vfio-pci device) and udev has run its rules on it, so that no rule undoes the owner."""
        deadline = time.monotonic() + timeout
        while True:
            path = self.node_path(bdf, where)
            if path is not None and path.exists():
                break
            if where == "cdev" and path is None and not self.has_cdev(str(bdf)):
                return None  # no cdev on this kernel
            if time.monotonic() >= deadline:
                raise OSError(errno.ENOENT, "the node did not appear", str(path or where))
            time.sleep(0.05)
        if os.path.abspath(self.root) == "/" and shutil.which("udevadm"):
            subprocess.run(["udevadm", "settle", "--timeout=10"], capture_output=True, check=False)
        return path

    def node_owner(self, bdf: str | None, value: str | None) -> None:
        """value: "WHERE UID:GID MODE" (mode in octal): give the node to that user."""
        where, ids, mode = str(value).split()
        uid, gid = (int(x) for x in ids.split(":"))
        path = self.wait_node(bdf, where)
        if path is not None:
            self.set_node(path, uid, gid, int(mode, 8))

    def node_restore(self, bdf: str | None, value: str | None) -> None:
        """value: "PATH UID:GID MODE": put a node back as it was; a node the kernel has removed
        meanwhile (the group left vfio-pci) needs nothing."""
        where, ids, mode = str(value).split()
        uid, gid = (int(x) for x in ids.split(":"))
        path = self.root / where.lstrip("/")
        if self.node_state(path) is not None:
            self.set_node(path, uid, gid, int(mode, 8))

    def expect(self, bdf: str, value: str | None, timeout: float = 5.0) -> None:
        """Check (not change) that the device ended on driver `value`."""
        deadline = time.monotonic() + timeout
        while self.driver(bdf) != value:
            if time.monotonic() >= deadline:
                raise OSError(f"{bdf} is on {self.driver(bdf) or 'no driver'}, not {value or 'no driver'}")
            time.sleep(0.05)

    def apply(self, step: Step) -> None:
        getattr(self, self.STEPS[step.action])(step.bdf, step.value)


class SimulatedKernel(SysfsWriter):
    """The kernel's reactions to binding writes, played on a synthetic tree.

    Binding moves the `driver` symlink; drivers_probe picks driver_override, else
    the device's own driver (the one it was last unbound from, remembered in
    ROOT/.pcipass-sim.json, or given as `native`); modprobe creates the driver's
    directory. `fail` makes chosen writes fail like the kernel's EINVAL would.
    `noiommu=False` plays a kernel built without CONFIG_VFIO_NOIOMMU.
    Writes are made in-process: a test sets `fork_blocking_writes` to play a blocked unbind.
    """

    fork_blocking_writes = False

    def __init__(
        self,
        root: str | os.PathLike[str],
        native: dict[str, str] | None = None,
        fail: Callable[[Path, str], bool] | None = None,
        noiommu: bool = True,
    ) -> None:
        super().__init__(root)
        self.noiommu_built = noiommu
        self.state_path = self.root / ".pcipass-sim.json"
        self.native = dict(native or {})
        try:
            self.native.update(json.loads(self.state_path.read_text()).get("native", {}))
        except (OSError, ValueError):
            pass
        self.fail = fail
        self.writes: list[tuple[str, str]] = []

    def _remember(self) -> None:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            data = {}
        data["native"] = self.native
        self.state_path.write_text(json.dumps(data))

    def _group_node(self, bdf: str) -> Path | None:
        group = link_name(str(self.dev_path(bdf) / "iommu_group"))
        return None if group is None else self.root / "dev/vfio" / group

    def _nodes(self) -> dict[str, list[int]]:
        try:
            return dict(json.loads(self.state_path.read_text()).get("nodes", {}))
        except (OSError, ValueError):
            return {}

    def _remember_nodes(self, nodes: dict[str, list[int]]) -> None:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            data = {"native": self.native}
        data["nodes"] = nodes
        self.state_path.write_text(json.dumps(data))

    def _vfio_bound(self, bdf: str, bound: bool) -> None:
        """vfio-pci makes /dev/vfio/N (root, 0600) with the group's first device and removes
        it with its last."""
        node = self._group_node(bdf)
        if node is None:
            return
        others = [d for d in os.listdir(self.pci / "devices")
                  if d != bdf and self.driver(d) == "vfio-pci" and self._group_node(d) == node]
        nodes = self._nodes()
        if bound and not node.exists():
            node.parent.mkdir(parents=True, exist_ok=True)
            node.write_text("")
            nodes[str(node)] = [0, 0, 0o600]
        elif not bound and not others and node.exists():
            node.unlink()
            nodes.pop(str(node), None)
        self._remember_nodes(nodes)

    def node_state(self, path: Path) -> tuple[int, int, int] | None:
        if not path.exists():
            return None
        uid, gid, mode = self._nodes().get(str(path), [0, 0, 0o600])
        return uid, gid, mode

    def set_node(self, path: Path, uid: int, gid: int, mode: int) -> None:
        self.writes.append((os.path.relpath(path, self.root), f"{uid}:{gid} {mode:o}"))
        nodes = self._nodes()
        nodes[str(path)] = [uid, gid, mode]
        self._remember_nodes(nodes)

    def _link(self, bdf: str, driver: str) -> None:
        drv = self.pci / "drivers" / driver
        os.symlink(os.path.relpath(drv, self.dev_path(bdf).resolve()), self.dev_path(bdf).resolve() / "driver")
        try:
            os.symlink(os.path.relpath(self.dev_path(bdf).resolve(), drv), drv / bdf)
        except FileExistsError:
            pass
        if driver == "vfio-pci":
            self._vfio_bound(bdf, True)

    def _match(self, bdf: str, driver: str) -> bool:
        override = self.override(bdf)
        if override is not None:
            return override == driver
        return self.native.get(bdf) == driver

    def write(self, path: Path, value: str) -> None:
        rel = os.path.relpath(path, self.pci)
        self.writes.append((rel, value))
        if self.fail is not None and self.fail(Path(rel), value):
            raise OSError(22, "Invalid argument (simulated)", str(path))
        bdf = value.strip()
        parts = Path(rel).parts
        if parts[-1] == "driver_override":
            path.write_text((value.strip() or "(null)") + "\n")
        elif parts[-1] == "unbind":
            # devices/BDF/driver/unbind or drivers/NAME/unbind
            driver = self.driver(bdf)
            if driver is None:
                raise OSError(19, "No such device (simulated)", str(path))
            if driver not in PASS_THROUGH_DRIVERS:  # never picked by ID
                self.native[bdf] = driver
                self._remember()
            (self.dev_path(bdf).resolve() / "driver").unlink()
            (self.pci / "drivers" / driver / bdf).unlink(missing_ok=True)
            if driver == "vfio-pci":
                self._vfio_bound(bdf, False)
        elif parts[-1] == "drivers_probe":
            if self.driver(bdf) is None:
                for name in sorted(os.listdir(self.pci / "drivers")):
                    if self._match(bdf, name):
                        self._link(bdf, name)
                        break
        elif parts[-1] == "bind":
            driver = parts[-2]
            if self.driver(bdf) is not None:
                raise OSError(16, "Device or resource busy (simulated)", str(path))
            override = self.override(bdf)
            if override is not None and override != driver:
                raise OSError(19, "No such device (simulated)", str(path))
            self._link(bdf, driver)
        elif parts[-1] in ("new_slot", "remove_slot", "permissive", "quirks"):
            with open(path, "a") as f:
                f.write(bdf + "\n")
        else:
            path.write_text(value)

    def modprobe(self, bdf: str | None, value: str | None) -> None:
        name = {"xen-pciback": "pciback"}.get(value or "", value or "")
        if name == "vfio":
            param = self.root / NOIOMMU_PARAM
            param.parent.parent.mkdir(parents=True, exist_ok=True)
            if self.noiommu_built and not param.exists():
                param.parent.mkdir(exist_ok=True)
                param.write_text("N\n")
            return
        drv = self.pci / "drivers" / name
        if not drv.is_dir():
            drv.mkdir(parents=True)
            for attr in ("bind", "unbind", "new_id", "remove_id"):
                (drv / attr).write_text("")

    def _vfio_module_has_noiommu(self) -> bool | None:
        return self.noiommu_built

    def expect(self, bdf: str, value: str | None, timeout: float = 0.0) -> None:
        super().expect(bdf, value, timeout)


def writer_for(root: str) -> SysfsWriter:
    """The real kernel at /, the simulation under any other --sysfs root."""
    return SysfsWriter("/") if os.path.abspath(root) == "/" else SimulatedKernel(root)


def resolve_target(root: str, requested: str | None) -> str:
    if requested is None:
        return XEN if Host(root).xen_dom0 else VFIO
    if requested not in TARGET_DRIVER:
        raise UsageError(f"unknown target {requested!r}", hint="use --for vfio or --for xen")
    return requested


def require_root(what: str, root: str) -> None:
    """Changes to the real host need root; a synthetic --sysfs tree does not."""
    if os.path.abspath(root) == "/" and os.geteuid() != 0:
        raise NeedsRoot(what)


# Verdict codes that --unsafe-noiommu overrides (the verdict's other blocking codes always refuse).
NOIOMMU_CODES = frozenset({"iommu-off", "no-iommu-group"})


def refuse_by_verdict(host: Host, dev: PciDevice, unsafe_noiommu: bool) -> None:
    """Refuse, with the verdict's reasons and hints, what host-inventory's judge blocks:
    no IOMMU, a bridge, a device or group member the host is using (mounted, up, boot VGA)."""
    from pcipass.host.verdict.judge import judge

    blocking = [r for r in judge(host, dev.name).blocking
                if not (unsafe_noiommu and r.code in NOIOMMU_CODES)]
    if not blocking:
        return
    first = blocking[0]
    more = "" if len(blocking) == 1 else "; " + "; ".join(r.message for r in blocking[1:])
    hint = first.hint
    if first.code in NOIOMMU_CODES:
        hint += "; only for a trusted device, --unsafe-noiommu uses vfio's no-IOMMU mode instead"
    raise PcipassError(f"cannot claim {dev.name}: {first.message}{more}",
                       hint=f"{hint} (`pcipass check {dev.name}` explains)", code=first.code)


@dataclass
class Plan:
    """What a claim will do: the journal record before its first step."""

    record: Record
    notes: list[str] = field(default_factory=list)  # warnings
    advice: list[str] = field(default_factory=list)  # what the user should know (--owner's memlock)

    def lines(self) -> list[str]:
        r = self.record
        out = [f"claim IOMMU group {r.key} for {r.target} ({TARGET_DRIVER[r.target]}):"]
        for d in r.devices:
            what = "bridge, left alone" if d.is_bridge else f"{d.original_driver or 'no driver'}"
            out.append(f"  {d.bdf}  {what}")
        out += [f"  warning: {n}" for n in self.notes]
        out += [f"  note: {n}" for n in self.advice]
        if r.steps:
            out.append("steps:")
            out += [f"  {i}. {s.describe()}" for i, s in enumerate(r.steps, 1)]
        else:
            out.append("nothing to do: every endpoint is already bound to "
                       f"{TARGET_DRIVER[r.target]}")
        return out


def plan_claim(
    root: str,
    bdf: str,
    target: str,
    *,
    unsafe_noiommu: bool = False,
    permissive: bool = False,
    quirks: tuple[str, ...] = (),
    writer: SysfsWriter | None = None,
    owner: str | None = None,
    memlock: str | None = None,
) -> Plan:
    """Check the claim may go ahead and list its steps; refuses with nothing changed.

    `owner` (USER[:GROUP]) gives the group's VFIO nodes to that user once bound;
    `memlock` (a size) is the guest memory that user will map, checked against its limit."""
    from pcipass.host.transaction import owner as owner_mod

    new_owner = owner_mod.parse_owner(owner) if owner else None
    if memlock and not new_owner:
        raise UsageError("--memlock goes with --owner", code="bad-owner",
                         hint="--memlock SIZE says how much guest memory the --owner user will map")
    need = owner_mod.parse_size(memlock) if memlock else None
    if new_owner and target != VFIO:
        raise UsageError("--owner is for vfio-pci's nodes", code="bad-owner",
                         hint="a Xen guest gets the device through xl as root; leave out --owner with --for xen")
    for q in quirks:
        if target != XEN or not _QUIRK.match(q):
            raise UsageError(f"bad --quirk {q!r}", code="bad-quirk",
                             hint="--quirk REG:SIZE:MASK in hex (SIZE 1, 2 or 4), e.g. e0:2:ff, with --for xen")
    host = Host(root)
    writer = writer or writer_for(root)
    dev = host.device(str(parse_bdf(bdf)))
    driver = TARGET_DRIVER[target]
    notes: list[str] = []
    refuse_by_verdict(host, dev, unsafe_noiommu)
    noiommu_original = None
    prefix: list[Step] = []
    if (dev.iommu_group is None or not host.iommu.enabled) and target == XEN:
        # A Xen dom0: Xen owns the IOMMU and Linux sees no groups; xl and Xen check the
        # device's isolation when it is assigned, so the claim takes the device alone.
        members = [dev]
        key = f"xen-{dev.name}"
    elif dev.iommu_group is None or not host.iommu.enabled:
        if new_owner:
            raise UsageError("--owner in no-IOMMU mode", code="bad-owner",
                             hint="vfio's no-IOMMU groups need CAP_SYS_RAWIO, so an unprivileged user "
                             "cannot use them: turn the IOMMU on, or run the consumer as root")
        if writer.noiommu_supported() is False:
            # vfio-pci would refuse the device at probe time (EINVAL, no group): say why now.
            raise PcipassError(
                f"cannot claim {dev.name} in no-IOMMU mode: {NOIOMMU_UNSUPPORTED}",
                hint="turn the IOMMU on (`pcipass check` names the kernel argument), or boot a "
                "kernel built with CONFIG_VFIO_NOIOMMU=y", code="noiommu-unsupported")
        members = [dev]
        key = f"noiommu-{dev.name}"
        noiommu_original = writer.noiommu_mode() or "N"
        prefix.append(Step("noiommu", None, "Y"))
        notes.append("no IOMMU: vfio's unsafe no-IOMMU mode gives the device's user DMA to "
                     "all of host memory")
    else:
        members = dev.group.devices if dev.group else [dev]
        key = str(dev.iommu_group)
    if not writer.has_driver(driver):
        prefix.append(Step("modprobe", None, TARGET_MODULE[target]))
    steps: list[Step] = []
    devices = []
    for m in members:
        rec = DeviceRecord(m.name, writer.driver(m.name), writer.override(m.name), m.is_bridge)
        devices.append(rec)
        if m.is_bridge or rec.original_driver == driver:
            continue
        rec.taken = True
        if target == XEN:
            rec.pciback_slot_added = True
            steps.append(Step("pciback-new-slot", m.name))
        steps.append(Step("override-set", m.name, driver))
        if rec.original_driver is not None:
            steps.append(Step("unbind", m.name, rec.original_driver))
        if target == XEN:
            steps.append(Step("bind", m.name, driver))
            if permissive:
                steps.append(Step("pciback-permissive", m.name))
            steps += [Step("pciback-quirk", m.name, q) for q in quirks]
        else:
            steps.append(Step("probe", m.name))
        steps.append(Step("expect", m.name, driver))
    advice: list[str] = []
    if new_owner:
        ids = f"{new_owner.uid}:{new_owner.gid} {new_owner.mode:o}"
        steps.append(Step("node-owner", None, f"/dev/vfio/{dev.iommu_group} {ids}"))
        steps += [Step("node-owner", m.name, f"cdev {ids}") for m in members if not m.is_bridge]
        memlock_notes, too_small = owner_mod.memlock_notes(root, new_owner, need)
        (notes if too_small else advice).extend(memlock_notes)
    if steps:
        steps = prefix + steps
    record = Record(key=key, group=dev.iommu_group, target=target, op=CLAIM, state=IN_PROGRESS,
                    devices=devices, steps=steps, noiommu_original=noiommu_original,
                    owner=str(new_owner) if new_owner else None)
    return Plan(record, notes, advice)


def give_back_steps(record: Record, writer: SysfsWriter, others: list[Record]) -> list[Step]:
    """The steps that put every device of `record` back as it was, from the state now."""
    # The nodes first: once the group's last device leaves vfio-pci the kernel removes them.
    steps: list[Step] = [Step("node-restore", None, f"{n.path} {n.uid}:{n.gid} {n.mode:o}")
                         for n in record.nodes]
    for d in record.devices:
        if d.is_bridge or not d.taken:
            continue
        now = writer.driver(d.bdf)
        if writer.override(d.bdf) is not None:
            steps.append(Step("override-set", d.bdf, None))
        if now != d.original_driver and now is not None:
            steps.append(Step("unbind", d.bdf, now))
        if d.pciback_slot_added:
            # Before the probe, or pciback would match its slot list and take it again.
            steps.append(Step("pciback-remove-slot", d.bdf))
        if now != d.original_driver and d.original_driver is not None:
            steps.append(Step("probe", d.bdf))
            steps.append(Step("bind", d.bdf, d.original_driver))
        steps.append(Step("expect", d.bdf, d.original_driver))
    still_noiommu = any(o.noiommu_original is not None for o in others if o.key != record.key)
    if record.noiommu_original is not None and not still_noiommu:
        steps.append(Step("noiommu", None, record.noiommu_original))
    return steps


def _crash_hook(n: int) -> None:
    """Test hook: PCIPASS_CRASH_AT_STEP=N kills this process with SIGKILL right after
    step N was carried out and before the journal says so (N=0: after the journal
    is first written, before any change)."""
    if os.environ.get(CRASH_ENV) == str(n):
        os.kill(os.getpid(), signal.SIGKILL)


class Transaction:
    """Runs a record's steps, journaling each; the crash hook is injectable for tests."""

    def __init__(self, journal: Journal, writer: SysfsWriter,
                 crash: Callable[[int], None] = _crash_hook) -> None:
        self.journal = journal
        self.writer = writer
        self.crash = crash

    def run(self, record: Record) -> None:
        self.journal.write(record)
        self.crash(0)
        # What the child that waits out a blocked unbind does once it goes through.
        self.writer.finish = lambda: self.finish(record.key)
        for i in range(record.done, len(record.steps)):
            step = record.steps[i]
            if step.action == "node-owner":
                self._remember_node(record, step)
            self.writer.apply(step)
            self.crash(i + 1)
            record.done = i + 1
            self.journal.write(record)

    def _remember_node(self, record: Record, step: Step) -> None:
        """Write-ahead for a node: how it was, in the journal, before it is given away."""
        path = self.writer.wait_node(step.bdf, str(step.value).split()[0])
        if path is None:
            return
        name = "/" + os.path.relpath(path, self.writer.root)
        if any(n.path == name for n in record.nodes):
            return
        state = self.writer.node_state(path)
        if state is not None:
            record.nodes.append(NodeRecord(name, *state))
            self.journal.write(record)

    def give_back(self, record: Record, op: str) -> None:
        """Drive every device back to its original state; the journal goes when it is done."""
        others = self.journal.records()
        record.op, record.state, record.done = op, IN_PROGRESS, 0
        record.steps = give_back_steps(record, self.writer, others)
        self.run(record)
        self.journal.remove(record.key)

    def finish(self, key: str) -> None:
        """As recover would: roll back an interrupted claim, complete an interrupted release."""
        record = self.journal.read(key)
        if record is None or (record.op == CLAIM and record.state == DONE):
            return
        Transaction(self.journal, self.writer, crash=lambda n: None).give_back(record, record.op)


def _failed(exc: OSError) -> str:
    return exc.strerror or str(exc)


@dataclass
class Context:
    """Where a verb works: the sysfs root, its writer and its journal directory."""

    root: str = "/"
    writer: SysfsWriter | None = None
    journal_dir: str | None = None
    crash: Callable[[int], None] = _crash_hook

    def __post_init__(self) -> None:
        self.writer = self.writer or writer_for(self.root)
        self.journal = Journal(self.journal_dir or state_dir(self.root))

    def transaction(self) -> Transaction:
        assert self.writer is not None
        return Transaction(self.journal, self.writer, self.crash)

    def lock(self, key: str) -> GroupLock:
        return GroupLock(self.journal.dir, key)


def claim(ctx: Context, bdf: str, target: str | None = None, *, dry_run: bool = False,
          unsafe_noiommu: bool = False, permissive: bool = False,
          quirks: tuple[str, ...] = (), owner: str | None = None, memlock: str | None = None) -> Plan:
    """Claim `bdf`'s group. On failure every change is undone and the error says why."""
    target = resolve_target(ctx.root, target)
    plan = plan_claim(ctx.root, bdf, target, unsafe_noiommu=unsafe_noiommu,
                      permissive=permissive, quirks=quirks, writer=ctx.writer, owner=owner, memlock=memlock)
    if dry_run:
        return plan
    require_root("pcipass claim", ctx.root)
    record = plan.record
    with ctx.lock(record.key):
        existing = ctx.journal.read(record.key)
        if existing is not None:
            if existing.op == CLAIM and existing.state == DONE:
                raise PcipassError(
                    f"IOMMU group {record.key} is already claimed for {existing.target}",
                    hint=f"`pcipass release {bdf}` gives it back first", code="already-claimed")
            raise PcipassError(
                f"an interrupted {existing.op} of IOMMU group {record.key} is in the journal",
                hint="run `pcipass recover` first", code="needs-recover")
        if not record.steps:
            return plan
        tx = ctx.transaction()
        try:
            with signals_as_interrupt():
                tx.run(record)
        except WriteBlocked as exc:
            raise _blocked(record, exc, "claim") from exc
        except (Exception, KeyboardInterrupt) as exc:  # any failure is undone
            cause = _failed(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
            at = record.done + 1
            step = f"{at}, {record.steps[at - 1].describe()}" if at <= len(record.steps) else f"{at}"
            try:
                tx.give_back(record, CLAIM)
            except WriteBlocked as undo:
                raise _blocked(record, undo, "claim") from exc
            except (Exception, KeyboardInterrupt) as undo:  # noqa: BLE001 - reported; the journal keeps the rest
                raise PcipassError(
                    f"claim of group {record.key} failed at step {step}: {cause}; "
                    f"undoing it failed too: {undo}",
                    hint="the journal keeps what is left to undo: run `pcipass recover`",
                    code="claim-undo-failed") from exc
            raise PcipassError(
                f"claim of group {record.key} failed at step {step}: {cause}; "
                "every change was undone",
                hint="check `dmesg` for the driver's complaint; `pcipass check "
                f"{bdf}` for the verdict", code="claim-failed") from exc
        record.state = DONE
        ctx.journal.write(record)
    return plan


def _record_for(ctx: Context, bdf: str) -> Record:
    name = str(parse_bdf(bdf))
    for r in ctx.journal.records():
        if any(d.bdf == name for d in r.devices):
            return r
    from pcipass.host.model import holders

    by_libvirt = holders.held(holders.Holders(Host(ctx.root)), [name])
    if by_libvirt.libvirt_names():
        raise by_libvirt.error(f"cannot release {name}, which pcipass did not claim")
    raise PcipassError(f"{name} is not claimed by pcipass",
                       hint="`pcipass status` lists what is claimed", code="not-claimed")


def held_by(ctx: Context, record: Record, scan: object | None = None) -> object:
    """What holds the devices of `record` now (pcipass.host.holders.Held)."""
    from pcipass.host.model import holders

    scan = scan or holders.Holders(Host(ctx.root))
    assert isinstance(scan, holders.Holders)
    return holders.held(scan, [d.bdf for d in record.devices])


def _refuse_if_held(ctx: Context, records: list[Record], verb: str) -> None:
    """Refuse, before anything changes, when anything holds any of these groups."""
    from pcipass.host.model import holders

    scan = holders.Holders(Host(ctx.root))
    found = [(r, h) for r in records if (h := held_by(ctx, r, scan))]
    if not found:
        return
    assert all(isinstance(h, holders.Held) for _, h in found)
    errors = [h.error(f"cannot {verb} IOMMU group {r.key}") for r, h in found]  # type: ignore[attr-defined]
    first = next((e for e in errors if e.code == "held-by-libvirt"), errors[0])
    message = "; ".join(e.message for e in errors)
    if len(records) > 1:
        message += f" (nothing was released: {len(found)} of {len(records)} groups are held)"
    raise PcipassError(message, hint=first.hint, code=first.code)


def release(ctx: Context, bdf: str | None = None) -> list[Record]:
    """Give back the group holding `bdf` (or every claimed group, when None). Refuses, with
    nothing changed, while a process or libvirt domain holds any of them."""
    records = [_record_for(ctx, bdf)] if bdf else ctx.journal.records()
    if records:
        require_root("pcipass release", ctx.root)
    for r in records:
        _refuse_if_interrupted_claim(r)
    _refuse_if_held(ctx, records, "release")

    def how(current: Record) -> str:
        _refuse_if_interrupted_claim(current)
        return RELEASE

    return _give_back_each(ctx, records, how)


def _refuse_if_interrupted_claim(record: Record) -> None:
    if record.op == CLAIM and record.state != DONE:
        raise PcipassError(
            f"the claim of group {record.key} was interrupted", code="needs-recover",
            hint="run `pcipass recover`: it rolls the claim back")


def _give_back_each(ctx: Context, records: list[Record], how: Callable[[Record], str | None]) -> list[Record]:
    """Give back each group under its lock, from its record read again under the lock (another
    pcipass may have finished it meanwhile). `how(record)` names the op the give-back finishes
    (RELEASE, or CLAIM to roll one back), None to leave the group, or raises to stop."""
    given = []
    for r in records:
        with ctx.lock(r.key):
            current = ctx.journal.read(r.key)
            op = None if current is None else how(current)
            if current is None or op is None:
                continue
            _give_back(ctx, current, op)
            given.append(current)
    return given


def _blocked(record: Record, exc: WriteBlocked, op: str) -> PcipassError:
    bdf = exc.value.strip()
    finish = "rolls the claim back" if op == "claim" else "completes the release"
    return PcipassError(
        f"the kernel still holds the unbind of {bdf} after {exc.timeout:g} s ({op} of IOMMU group "
        f"{record.key}): something still has the device open, and vfio-pci has asked it to let go. "
        f"An unbind cannot be taken back: pcipass pid {exc.finisher} waits for it and then {finish}, "
        "so the device goes back to a driver, not to none",
        hint=f"end whatever holds {bdf} (`pcipass status` names the holders it can see); `pcipass status` "
        f"shows the {op} in progress until pid {exc.finisher} is done; {UNBIND_TIMEOUT_ENV}=SECONDS waits longer",
        code="unbind-blocked")


def _give_back(ctx: Context, record: Record, op: str) -> None:
    try:
        ctx.transaction().give_back(record, op)
    except WriteBlocked as exc:
        raise _blocked(record, exc, op) from exc
    except OSError as exc:
        raise PcipassError(
            f"giving back group {record.key} stopped: {_failed(exc)}",
            hint="the journal keeps what is left: fix the cause (see dmesg) and run "
            "`pcipass recover`", code="release-failed") from exc


@dataclass
class Recovered:
    key: str
    action: str  # "rolled back", "completed release", "skipped: ..."


def recover(ctx: Context) -> list[Recovered]:
    """Roll back interrupted claims and complete interrupted releases; a group something
    still holds is skipped (giving it back would hang in the kernel)."""
    pending = [r for r in ctx.journal.records() if not (r.op == CLAIM and r.state == DONE)]
    if pending:
        require_root("pcipass recover", ctx.root)
    out = []

    def how(current: Record) -> str | None:
        if current.op == CLAIM and current.state == DONE:
            return None
        holding = held_by(ctx, current)
        if holding:
            out.append(Recovered(current.key, "skipped: held by " + "; ".join(holding.lines())))  # type: ignore[attr-defined]
            return None
        out.append(Recovered(current.key, "rolled back claim" if current.op == CLAIM else "completed release"))
        return current.op

    _give_back_each(ctx, pending, how)
    return out


def status(ctx: Context) -> dict[str, object]:
    """What is claimed, for what, since when (schema pcipass/status/1)."""
    from pcipass.host.model import holders

    assert ctx.writer is not None
    scan = holders.Holders(Host(ctx.root))
    scan.processes  # noqa: B018 - scanned now, so that holders_complete says whether all could be read
    groups = []
    claimed: set[str] = set()
    for r in ctx.journal.records():
        claimed |= {d.bdf for d in r.devices}
        holding = held_by(ctx, r, scan)
        assert isinstance(holding, holders.Held)
        groups.append({
            "group": r.key,
            "for": r.target,
            "driver": TARGET_DRIVER[r.target],
            "state": "claimed" if (r.op, r.state) == (CLAIM, DONE) else f"interrupted {r.op}",
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.since)),
            "by": {"pid": r.pid, "command": r.command},
            "noiommu": r.noiommu_original is not None,
            "devices": [
                {"bdf": d.bdf, "bridge": d.is_bridge, "original_driver": d.original_driver,
                 "driver": ctx.writer.driver(d.bdf)}
                for d in r.devices
            ],
            "owner": r.owner,
            "nodes": [{"path": n.path} for n in r.nodes],
            "holders": [h.to_json() for h in holding.processes],
            "libvirt": [{"domain": d.name, "pid": d.pid, "bdf": b, "managed": m} for d, b, m in holding.libvirt],
        })
    libvirt = [{"domain": d.name, "pid": d.pid, "state": d.state, "bdf": b, "managed": m,
                "claimed_by_pcipass": b in claimed}
               for d in scan.libvirt_domains for b, m in d.hostdevs]
    return {"schema": "pcipass/status/1", "groups": groups, "libvirt": libvirt,
            "holders_complete": not scan.unreadable}
