"""Container Device Interface specs for claimed groups: what podman, CRI-O or containerd read
to give a container a group's VFIO nodes (`podman run --device pcipass.io/vfio=group-2`).

One spec file per claimed vfio group, ROOT/var/run/cdi/pcipass.io-vfio_group-<key>.json:

    {"cdiVersion": "0.3.0", "kind": "pcipass.io/vfio",
     "devices": [{"name": "group-2", "containerEdits": {
         "env": ["PCIPASS_GROUP_2=0000:02:0d.0,0000:02:0d.1"],
         "deviceNodes": [{"path": "/dev/vfio/vfio", ...}, {"path": "/dev/vfio/2", ...},
                         {"path": "/dev/iommu", ...}, {"path": "/dev/vfio/devices/vfio0", ...}]}}]}

The group API's nodes (/dev/vfio/vfio and /dev/vfio/N) are always there; the cdev API's
(/dev/iommu and each endpoint's /dev/vfio/devices/vfioX) where the kernel made the device a
cdev. cdiVersion is the lowest that carries these fields (0.3.0), so that older runtimes
(Debian 12's podman 4.3) load the spec as well as newer ones do.

The specs are derived from the journal, never the other way round, and kept in step with it
under each group's lock: a claim writes its group's spec once the journal says done; a release
or a roll-back removes it before the first device is given back (and refuses, with nothing
changed, when it cannot); `sync` (run by recover and by `pcipass cdi sync`) writes what a crash
left unwritten and removes any pcipass spec whose group is not claimed. So a crash at any point
leaves, at worst, a claimed group without its spec, never a spec naming a group that is given
back. /var/run is a tmpfs, as /run/pcipass is: a reboot forgets both together. A spec directory
that outlives a reboot (PCIPASS_CDI_DIR=/etc/cdi) needs `pcipass cdi sync` at boot.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pcipass.errors import PcipassError, UsageError
from pcipass.host.transaction.journal import CLAIM, DONE, Record, unlink_durably, write_durably
from pcipass.host.transaction.plan import VFIO

KIND = "pcipass.io/vfio"
CDI_VERSION = "0.3.0"
DIR_ENV = "PCIPASS_CDI_DIR"
DEFAULT_DIR = "/var/run/cdi"
STANDARD_DIRS = ("/etc/cdi", "/var/run/cdi")  # where runtimes look by default
FILE_PREFIX = KIND.replace("/", "-") + "_"  # the CDI library's vendor-class_id naming
ENV_PREFIX = "PCIPASS_GROUP_"
PERMISSIONS = "rw"  # read and write; no mknod in the container


def device_name(key: str) -> str:
    """The CDI device name of a group: group-2 (noiommu-0000:02:0d.0 -> group-noiommu-0000-02-0d.0)."""
    return "group-" + re.sub(r"[^A-Za-z0-9_.-]", "-", key)


def qualified_name(key: str) -> str:
    """The fully qualified CDI name a runtime is given: pcipass.io/vfio=group-2."""
    return f"{KIND}={device_name(key)}"


def env_name(key: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", key)


def spec_file(directory: Path, key: str) -> Path:
    return directory / f"{FILE_PREFIX}{device_name(key)}.json"


def spec_dir(root: str, directory: str | None = None) -> Path | None:
    """Where specs are written: `directory`, else $PCIPASS_CDI_DIR (set empty: nowhere, the
    claim hook is off), else ROOT/var/run/cdi."""
    if directory is None:
        directory = os.environ.get(DIR_ENV)
        if directory is None:
            return Path(root) / DEFAULT_DIR.lstrip("/")
        if directory == "":
            return None
    return Path(directory)


def swept_dirs(root: str, directory: Path | None) -> list[Path]:
    """Every directory a stale pcipass spec is looked for in: the one written to and the
    runtimes' standard ones under ROOT."""
    dirs = [Path(root) / d.lstrip("/") for d in STANDARD_DIRS]
    if directory is not None and directory not in dirs:
        dirs.insert(0, directory)
    return dirs


def wants_spec(record: Record | None) -> bool:
    """A claimed (done) vfio group has a spec; nothing else does (xen-pciback has no nodes)."""
    return record is not None and record.target == VFIO and (record.op, record.state) == (CLAIM, DONE)


def _group_node(root: Path, record: Record) -> str:
    """/dev/vfio/N of the group as the kernel numbers it now (noiommu-N in no-IOMMU mode)."""
    for d in record.devices:
        if d.is_bridge:
            continue
        link = root / "sys/bus/pci/devices" / d.bdf / "iommu_group"
        try:
            number = os.path.basename(os.readlink(link))
        except OSError:
            continue
        noiommu = root / "dev/vfio" / f"noiommu-{number}"
        return f"/dev/vfio/noiommu-{number}" if noiommu.exists() else f"/dev/vfio/{number}"
    if record.group is None:
        raise PcipassError(f"group {record.key} has no IOMMU group in sysfs", code="cdi-no-group",
                           hint="`pcipass status` shows where its devices are now; `pcipass recover`")
    return f"/dev/vfio/{record.group}"


def _cdevs(root: Path, bdf: str) -> list[str]:
    """The device's /dev/vfio/devices/vfioX (Linux 6.1-6.5 name vfio-dev/vfioX with no device
    number, so no node: those count as none)."""
    try:
        names = sorted(os.listdir(root / "sys/bus/pci/devices" / bdf / "vfio-dev"))
    except OSError:
        return []
    base = root / "sys/bus/pci/devices" / bdf / "vfio-dev"
    return [f"/dev/vfio/devices/{n}" for n in names if (base / n / "dev").exists()]


def _node(path: str) -> dict[str, object]:
    return {"path": path, "type": "c", "permissions": PERMISSIONS}


def spec_for(root: str, record: Record) -> dict[str, object]:
    """The CDI spec of one claimed vfio group."""
    if not wants_spec(record):
        raise PcipassError(f"group {record.key} is not claimed for vfio", code="cdi-not-claimed",
                           hint="`pcipass claim BDF` first; `pcipass status` lists what is claimed")
    r = Path(root)
    endpoints = [d.bdf for d in record.devices if not d.is_bridge]
    nodes = [_node("/dev/vfio/vfio"), _node(_group_node(r, record))]
    cdevs = [c for b in endpoints for c in _cdevs(r, b)]
    if cdevs:
        nodes += [_node("/dev/iommu")] + [_node(c) for c in cdevs]
    return {
        "cdiVersion": CDI_VERSION,
        "kind": KIND,
        "devices": [{
            "name": device_name(record.key),
            "containerEdits": {
                "env": [f"{env_name(record.key)}={','.join(endpoints)}"],
                "deviceNodes": nodes,
            },
        }],
    }


def _text(spec: dict[str, object]) -> bytes:
    return json.dumps(spec, indent=2, sort_keys=True).encode() + b"\n"


def _unwritable(path: Path, exc: OSError, what: str) -> PcipassError:
    return PcipassError(f"cannot {what} the CDI spec {path}: {exc.strerror or exc}",
                        hint=f"run as root, or point {DIR_ENV} at a writable directory "
                        f"({DIR_ENV}= with no value turns the specs off)", code="cdi-unwritable")


def write(directory: Path, spec: dict[str, object], key: str) -> bool:
    """Write one spec atomically (write, fsync, rename, fsync the directory); False if the
    file already says exactly that. A runtime scanning the directory sees the old file or the
    new one, never half of one (the temporary name is hidden and has no .json ending)."""
    path = spec_file(directory, key)
    data = _text(spec)
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        write_durably(path, data)
    except OSError as exc:
        raise _unwritable(path, exc, "write") from exc
    return True


def remove(root: str, key: str, directory: Path | None = None, *, keep: Path | None = None) -> list[Path]:
    """Remove group `key`'s spec from every swept directory (but `keep`); the paths removed.
    Raises, and a caller about to give the group back must then stop, if one exists and
    cannot be removed."""
    gone = []
    for d in swept_dirs(root, directory if directory is not None else spec_dir(root)):
        if d == keep:
            continue
        path = spec_file(d, key)
        try:
            if not unlink_durably(path):
                continue
        except OSError as exc:
            raise _unwritable(path, exc, "remove") from exc
        gone.append(path)
    return gone


_NAME = re.compile(re.escape(FILE_PREFIX) + r"group-(.+)\.json$")


def found(root: str, directory: Path | None = None) -> dict[str, list[Path]]:
    """The pcipass spec files in the swept directories, by the device name's group part."""
    out: dict[str, list[Path]] = {}
    for d in swept_dirs(root, directory if directory is not None else spec_dir(root)):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for n in names:
            m = _NAME.match(n)
            if m:
                out.setdefault(m.group(1), []).append(d / n)
    return out


# --- the hooks claim and release call, under the group's lock ---

def after_claim(root: str, record: Record) -> str | None:
    """The claim hook: write the group's spec. A claim is not undone for a spec that cannot
    be written: the warning says so, and `pcipass cdi sync` writes it later."""
    directory = spec_dir(root)
    if directory is None or not wants_spec(record):
        return None
    try:
        write(directory, spec_for(root, record), record.key)
    except PcipassError as exc:
        return f"{exc.message}; `pcipass cdi sync` writes it once that is fixed"
    return None


def before_give_back(root: str, record: Record) -> None:
    """The release (and roll-back) hook: the spec goes before any device does."""
    try:
        remove(root, record.key)
    except PcipassError as exc:
        raise PcipassError(f"{exc.message}; nothing was given back, so that no spec names a "
                           f"group that is not claimed", hint=exc.hint, code=exc.code) from exc


@dataclass
class Change:
    key: str
    action: str  # "wrote", "removed", "unchanged", "skipped: ..."
    path: str


def sync(ctx: object, directory: Path | None = None) -> list[Change]:
    """Make the spec files say what the journal says, group by group under each group's lock:
    write (or rewrite) the spec of every claimed vfio group, remove every pcipass spec whose
    group is not. A group whose lock another pcipass holds is skipped: the holder's claim
    writes its spec when done, its release removed it first."""
    from pcipass.host.transaction.claim import Context

    assert isinstance(ctx, Context)
    root = ctx.root
    directory = directory if directory is not None else spec_dir(root)
    if directory is None:
        raise UsageError(f"{DIR_ENV} is set empty: CDI specs are off",
                         hint=f"unset {DIR_ENV}, or give --dir DIR", code="cdi-off")
    keys = {device_name(r.key)[len("group-"):]: r.key for r in ctx.journal.records()}
    # A spec whose group no journal names is removed under the lock of the key its name
    # gives (the group's number: the lock a claim of that group would take).
    for name in found(root, directory):
        keys.setdefault(name, name)
    out: list[Change] = []
    for key in sorted(set(keys.values())):
        out += _sync_one(ctx, directory, key)
    return out


def _in_step(ctx: object, directory: Path, key: str) -> bool:
    """Whether group `key`'s spec files already say what its journal says."""
    from pcipass.host.transaction.claim import Context

    assert isinstance(ctx, Context)
    record = ctx.journal.read(key)
    others = [p for p in swept_dirs(ctx.root, directory) if p != directory]
    if any(spec_file(d, key).exists() for d in others):
        return False
    path = spec_file(directory, key)
    if not wants_spec(record):
        return not path.exists()
    assert record is not None
    try:
        return path.read_bytes() == _text(spec_for(ctx.root, record))
    except OSError:
        return False


def _sync_one(ctx: object, directory: Path, key: str) -> list[Change]:
    from pcipass.host.transaction.claim import Context

    assert isinstance(ctx, Context)
    path = spec_file(directory, key)
    if _in_step(ctx, directory, key):  # nothing to do: no lock taken (status-like, no root)
        return [Change(key, "unchanged", str(path))]
    try:
        lock = ctx.lock(key).acquire()
    except PcipassError as exc:
        if exc.code != "group-locked":
            raise
        return [Change(key, "skipped: " + exc.message, str(path))]
    try:
        record = ctx.journal.read(key)  # again, under the lock
        keep = directory if wants_spec(record) else None
        gone = [Change(key, "removed", str(p)) for p in remove(ctx.root, key, directory, keep=keep)]
        if keep is not None:
            assert record is not None
            wrote = write(directory, spec_for(ctx.root, record), key)
            return gone + [Change(key, "wrote" if wrote else "unchanged", str(path))]
        return gone
    finally:
        lock.release()


def show(ctx: object, directory: Path | None = None) -> dict[str, object]:
    """The specs the claimed groups have (schema pcipass/cdi/1), as `sync` would write them."""
    from pcipass.host.transaction.claim import Context

    assert isinstance(ctx, Context)
    root = ctx.root
    directory = directory if directory is not None else spec_dir(root)
    specs = []
    for r in ctx.journal.records():
        if not wants_spec(r):
            continue
        file = spec_file(directory, r.key) if directory is not None else None
        spec = spec_for(root, r)
        try:
            current = file is not None and file.read_bytes() == _text(spec)
        except OSError:
            current = False
        specs.append({"group": r.key, "device": qualified_name(r.key),
                      "file": str(file) if file else None, "written": current, "spec": spec})
    have = {device_name(str(s["group"]))[len("group-"):] for s in specs}
    stale = [str(p) for name, paths in found(root, directory).items() if name not in have for p in paths]
    return {"schema": "pcipass/cdi/1", "dir": str(directory) if directory else None,
            "kind": KIND, "specs": specs, "stale": stale}


def remove_all(root: str, directory: Path | None = None) -> list[Path]:
    """Remove every pcipass spec (before CDI is turned off). The next claim writes its own."""
    gone = []
    for paths in found(root, directory).values():
        for p in paths:
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _unwritable(p, exc, "remove") from exc
            gone.append(p)
    return gone
