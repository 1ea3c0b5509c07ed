"""The claim journal and the group lock: what `claim` changed, written before it changes it.

One JSON record per claimed IOMMU group, in the state directory:

    group-<key>.json   the record (see `Record`); replaced atomically on every update
    group-<key>.lock   flock'ed while a claim, release or recover works on the group;
                       holds the holder's pid and command line so a loser can name it

The state directory is /run/pcipass: a claim is a run-time binding and a reboot
forgets it, so the journal must be forgotten with it. Under `--sysfs ROOT` it is
ROOT/run/pcipass; the environment variable PCIPASS_STATE_DIR overrides both.

Write-ahead: the record, with every device's original driver and
driver_override and the whole plan of steps, is on disk (written, fsync'ed,
renamed into place, directory fsync'ed) before the first change; `done` is
advanced after each step. Recovery does not replay steps: it drives every
device back to the state the record names (see pcipass.host.transaction.claim), so it is
right whichever step was interrupted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from pcipass.errors import PcipassError

SCHEMA = "pcipass/journal/1"
# The step actions of each journal schema: every name a journal of that schema may hold on
# disk. Within a schema a name is only ever added, never renamed or removed: a recover after
# an upgrade reads the journals the older pcipass wrote. claim.SysfsWriter.STEPS carries
# each one out; tests/unit/host/test_journal_steps.py replays every one.
STEP_ACTIONS: dict[str, frozenset[str]] = {
    "pcipass/journal/1": frozenset({
        "modprobe", "noiommu",  # the target's module; vfio's no-IOMMU mode
        "override-set", "unbind", "probe", "bind", "expect",  # a device's driver
        "pciback-new-slot", "pciback-remove-slot", "pciback-permissive", "pciback-quirk",  # Xen
        "node-owner", "node-restore",  # claim --owner's VFIO nodes
        "sriov-autoprobe", "sriov-numvfs",  # pcipass sriov: a PF's VFs
        "reset-method",  # claim --reset-method: the device's reset_method, and back
    }),
}
DEFAULT_STATE_DIR = "/run/pcipass"

# Operations and their states. An interrupted claim is rolled back; an
# interrupted release is completed (both end with the device on its own driver).
CLAIM, RELEASE = "claim", "release"
# pcipass sriov: op and target of a record that changes a PF's VFs (key sriov-<PF>). It is in
# the journal only while in progress: an interrupted one is rolled back.
SRIOV = "sriov"
IN_PROGRESS, DONE = "in-progress", "done"


def command_line() -> str:
    """This process's command line, as the user typed it (`python -m pcipass` shows as pcipass)."""
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) in ("__main__.py", "pcipass"):
        argv[0] = "pcipass"
    return " ".join(argv)


def state_dir(sysfs_root: str | os.PathLike[str] = "/") -> Path:
    """Where journals and locks live for this sysfs root."""
    override = os.environ.get("PCIPASS_STATE_DIR")
    if override:
        return Path(override)
    return Path(sysfs_root) / DEFAULT_STATE_DIR.lstrip("/")


@dataclass
class DeviceRecord:
    """One device of the group as it was before the claim touched it."""

    bdf: str
    original_driver: str | None
    original_override: str | None
    is_bridge: bool = False
    # Set when the claim added the device to xen-pciback's slot list, so that
    # giving it back removes it (or pciback would take it again on the next probe).
    pciback_slot_added: bool = False
    # Whether the claim moves this device; one already on the target is left as it is.
    taken: bool = False
    # claim --reset-method: the device's reset_method before the claim wrote it (None: untouched).
    original_reset_method: str | None = None


@dataclass
class NodeRecord:
    """A VFIO node (/dev/vfio/N, /dev/vfio/devices/vfioX) that `claim --owner` gave to a user,
    as it was just before: written to the journal before the node is changed."""

    path: str
    uid: int
    gid: int
    mode: int


@dataclass
class SriovRecord:
    """pcipass sriov: the physical function as it was before the change, and the count asked for."""

    pf: str
    numvfs: int
    autoprobe: str | None  # sriov_drivers_autoprobe, "1" or "0"
    want: int


@dataclass
class Step:
    """One change to sysfs. `action` is one of STEP_ACTIONS[SCHEMA] (claim.SysfsWriter.STEPS)."""

    action: str
    bdf: str | None = None
    value: str | None = None

    def describe(self) -> str:
        target = f" {self.bdf}" if self.bdf else ""
        value = f" = {self.value!r}" if self.value is not None else ""
        return f"{self.action}{target}{value}"


@dataclass
class Record:
    """The journal of one group: what was there, what we are doing, how far we got."""

    key: str
    group: int | None
    target: str  # "vfio" or "xen"; SRIOV for pcipass sriov
    op: str  # CLAIM or RELEASE; SRIOV for pcipass sriov
    state: str  # IN_PROGRESS or DONE
    devices: list[DeviceRecord]
    steps: list[Step] = field(default_factory=list)
    done: int = 0
    since: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    command: str = field(default_factory=lambda: command_line())
    # noiommu: the value of vfio's enable_unsafe_noiommu_mode before the claim
    # set it, or None when the claim did not touch it.
    noiommu_original: str | None = None
    # claim --owner: "USER" or "USER:GROUP" as resolved, and the nodes given to it as they were.
    owner: str | None = None
    nodes: list[NodeRecord] = field(default_factory=list)
    # pcipass sriov (op SRIOV): the PF as it was.
    sriov: SriovRecord | None = None
    schema: str = SCHEMA

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Record:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"unknown journal schema {data.get('schema')!r}")
        fields: dict[str, Any] = dict(data)
        fields["devices"] = [DeviceRecord(**d) for d in fields["devices"]]
        fields["steps"] = [Step(**s) for s in fields["steps"]]
        unknown = sorted({s.action for s in fields["steps"]} - STEP_ACTIONS[SCHEMA])
        if unknown:
            raise ValueError(f"unknown step {', '.join(unknown)} (a newer pcipass wrote it?)")
        fields["nodes"] = [NodeRecord(**n) for n in fields.get("nodes", [])]
        if fields.get("sriov") is not None:
            fields["sriov"] = SriovRecord(**fields["sriov"])
        return cls(**fields)


class Journal:
    """The records in one state directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / f"group-{key}.json"

    def ensure_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o755)  # status reads it without root
        except OSError as exc:
            raise PcipassError(
                f"cannot create the journal directory {self.dir}: {exc.strerror}",
                hint="run as root, or point PCIPASS_STATE_DIR at a writable directory",
                code="journal-unwritable",
            ) from exc

    def write(self, record: Record) -> None:
        """Replace the record atomically and durably: write, fsync, rename, fsync the dir."""
        self.ensure_dir()
        write_durably(self.path(record.key), json.dumps(record.to_json(), indent=1, sort_keys=True).encode() + b"\n")

    def remove(self, key: str) -> None:
        unlink_durably(self.path(key))

    def read(self, key: str) -> Record | None:
        try:
            text = self.path(key).read_text()
        except FileNotFoundError:
            return None
        return self._parse(self.path(key), text)

    def records(self) -> list[Record]:
        """Every record, ordered by key."""
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("group-*.json")):
            out.append(self._parse(path, path.read_text()))
        return out

    @staticmethod
    def _parse(path: Path, text: str) -> Record:
        try:
            return Record.from_json(json.loads(text))
        except (ValueError, TypeError, KeyError) as exc:
            raise PcipassError(
                f"the journal {path} is damaged: {exc}",
                hint="inspect it by hand; move it away once every device it names is on its "
                "own driver (pcipass status shows the drivers now)",
                code="journal-damaged",
            ) from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: write a hidden temporary file in the
    same directory, fsync it, rename it over `path`, fsync the directory. A reader (recover, a
    container runtime scanning the directory) sees the old file or the new one, never half of
    one; a crash leaves at most the hidden temporary, which no reader's glob takes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def unlink_durably(path: Path) -> bool:
    """Remove `path` and fsync its directory; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


# Seconds a lock is tried before a refusal: long enough to pass a status's busy() probe,
# which holds the lock shared for a moment, short enough to refuse at once to a real holder.
LOCK_PATIENCE = 0.2


def _flock_within(fd: int, seconds: float) -> bool:
    """Take an exclusive flock on `fd`, trying for up to `seconds`; False if another holds it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


class GroupLock:
    """An exclusive, non-blocking flock on one group's lock file.

    The winner writes its pid and command line into the file; a loser is refused
    with them. The kernel drops the lock when the holder dies, even by SIGKILL,
    so a stale lock file never blocks anyone.
    """

    def __init__(self, directory: str | os.PathLike[str], key: str) -> None:
        self.path = Path(directory) / f"group-{key}.lock"
        self.key = key
        self.fd: int | None = None

    def acquire(self) -> GroupLock:
        Journal(self.path.parent).ensure_dir()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _flock_within(fd, LOCK_PATIENCE)
        except OSError:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            holder = self.holder() or "an unknown process"
            raise PcipassError(
                f"IOMMU group {self.key} is locked by {holder}",
                hint="another pcipass claim, release or recover is working on this group; "
                "wait for it to finish and try again",
                code="group-locked",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command_line()}\n".encode(), 0)
        self.fd = fd
        return self

    def retell(self, pid: int, what: str) -> None:
        """Name another holder in the lock file: a process that inherited the lock (the
        finisher of a blocked unbind) once the one that took it goes."""
        self.path.write_text(f"pid {pid}: {what}\n")

    def busy(self) -> bool:
        """Whether some process holds the lock now: a shared, non-blocking try that is let go
        at once (an exclusive holder makes it fail; acquire retries past a try that overlaps)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)
        return False

    def holder(self) -> str | None:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return text or None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def devices_at_work(journal: Journal) -> dict[str, str]:
    """BDF -> its group lock's holder, for each device of a journaled group that a claim,
    release or recover is working on now. An unbind of such a device may be waiting in the
    kernel, and a read of an attribute the kernel shows under the device lock
    (driver_override, sriov_numvfs) would wait with it. Empty where the journal cannot be read."""
    at_work: dict[str, str] = {}
    try:
        records = journal.records()
    except (OSError, PcipassError):
        return at_work
    for record in records:
        lock = GroupLock(journal.dir, record.key)
        try:
            busy = lock.busy()
        except OSError:
            continue
        if busy:
            who = lock.holder() or "an unknown process"
            at_work.update((d.bdf, who) for d in record.devices)
    return at_work
