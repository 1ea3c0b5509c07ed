"""The one place that writes the kernel's PCI bindings: SysfsWriter, whose methods carry out
the claim journal's steps (STEPS names them), each idempotent so that giving back can run
again after a crash. An unbind is written in a child that can outlive a timeout
(write_may_block), since vfio-pci's remove waits for the device's user without end.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pcipass.host.transaction.journal import (
    Step,
)
from pcipass.sysfs import link_name, read_attr

NOIOMMU_PARAM = "sys/module/vfio/parameters/enable_unsafe_noiommu_mode"

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
        "sriov-autoprobe": "sriov_autoprobe",
        "sriov-numvfs": "sriov_numvfs",
        "reset-method": "reset_method",
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

    def read(self, rel: str) -> str | None:
        """An attribute under the root (e.g. sys/module/vfio_pci/parameters/enable_sriov)."""
        return read_attr(str(self.root / rel))

    def numvfs(self, bdf: str) -> int | None:
        value = read_attr(str(self.dev_path(bdf) / "sriov_numvfs"))
        return int(value) if value is not None and value.isdigit() else None

    def sriov_autoprobe_now(self, bdf: str) -> str | None:
        return read_attr(str(self.dev_path(bdf) / "sriov_drivers_autoprobe"))

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
        # Nor the caller's output: a shell's $(pcipass release ...) or a pipe would wait for
        # EOF until the kernel lets go. What the child did shows in the journal instead.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
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

    def reset_method_now(self, bdf: str) -> str | None:
        return read_attr(str(self.dev_path(bdf) / "reset_method"))

    def reset_method(self, bdf: str, value: str | None) -> None:
        """The methods the kernel (and vfio-pci's VFIO_DEVICE_RESET) tries, in order: "flr bus"."""
        if self.reset_method_now(bdf) != value:
            self.write(self.dev_path(bdf) / "reset_method", str(value))

    # --- SR-IOV: a physical function's virtual functions (pcipass sriov) ---

    def sriov_autoprobe(self, bdf: str, value: str | None) -> None:
        """Whether the PF's next VFs are probed by their driver: "1" or "0"."""
        if self.sriov_autoprobe_now(bdf) != value:
            self.write(self.dev_path(bdf) / "sriov_drivers_autoprobe", str(value))

    def sriov_numvfs(self, bdf: str, value: str | None) -> None:
        """Make the PF have `value` VFs: the kernel creates (or removes) them in the write,
        through the PF's driver, so the count is checked right after it."""
        want = int(str(value))
        if self.numvfs(bdf) == want:
            return
        self.write(self.dev_path(bdf) / "sriov_numvfs", str(want))
        if self.numvfs(bdf) != want:
            raise OSError(f"{bdf} has {self.numvfs(bdf)} VFs after writing {want} to sriov_numvfs")

    def expect(self, bdf: str, value: str | None, timeout: float = 5.0) -> None:
        """Check (not change) that the device ended on driver `value`."""
        deadline = time.monotonic() + timeout
        while self.driver(bdf) != value:
            if time.monotonic() >= deadline:
                raise OSError(f"{bdf} is on {self.driver(bdf) or 'no driver'}, not {value or 'no driver'}")
            time.sleep(0.05)

    def apply(self, step: Step) -> None:
        getattr(self, self.STEPS[step.action])(step.bdf, step.value)
