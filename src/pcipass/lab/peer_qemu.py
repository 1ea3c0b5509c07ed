"""A newer QEMU as a test peer, unpacked into a private prefix; the system is never touched.

QEMU's own vfio-user client (`vfio-user-pci`) appeared in QEMU 10.1; Debian 12
ships 7.2. Debian trixie-backports has 11.1, built against trixie's glibc, so
it cannot be installed here. Instead the package and the closure of its
library dependencies are downloaded from deb.debian.org (checked against the
SHA256 of the Packages index), unpacked with `dpkg-deb -x` under the lab
cache, and QEMU is started through the prefix's own dynamic loader with the
prefix's library directories, so trixie's glibc runs beside the host's.

    pcipass lab peer-qemu          # fetch (idempotent), check it, print its version
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pcipass.errors import PcipassError
from pcipass.lab.kernel import cache_dir

MIRROR = "http://deb.debian.org/debian"
# Searched in this order for every package: backports first, so QEMU's own packages
# (and the seabios its Depends asks for) come from there, everything else from trixie.
SUITES = ("trixie-backports", "trixie")
ROOT_PACKAGE = "qemu-system-x86"
VERSION = "11.1"
# Packages followed besides libraries: QEMU's own and the firmware it loads.
QEMU_AND_FIRMWARE = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios", "ipxe-qemu")
LOADER = "usr/lib64/ld-linux-x86-64.so.2"
BINARY = "usr/bin/qemu-system-x86_64"
# Where the unpacked packages keep firmware (-L, searched in order).
FIRMWARE_DIRS = ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu")
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "lib64")
TIMEOUT = 120  # seconds for one download
INDEX_MAX_AGE = 24 * 3600


def prefix_dir() -> Path:
    return cache_dir() / f"peer-qemu-{VERSION}"


def _say(message: str) -> None:
    print(f"peer-qemu: {message}", file=sys.stderr, flush=True)


def _failed(message: str, hint: str) -> PcipassError:
    return PcipassError(message, hint=hint, code="peer-qemu")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str  # relative to MIRROR
    sha256: str
    depends: tuple[tuple[str, ...], ...]  # each entry: its alternatives, in order


def _dependency_names(field: str) -> tuple[tuple[str, ...], ...]:
    """'a (>= 1) | b, c:any' -> (('a', 'b'), ('c',)): versions and architecture qualifiers dropped."""
    out = []
    for entry in field.split(","):
        alternatives = tuple(re.sub(r"\(.*?\)|\[.*?\]|<.*?>", "", alt).strip().split(":")[0]
                             for alt in entry.split("|"))
        alternatives = tuple(a for a in alternatives if a)
        if alternatives:
            out.append(alternatives)
    return tuple(out)


def parse_index(text: str) -> dict[str, Package]:
    """A Packages index: name -> Package (the first stanza of a name wins)."""
    out: dict[str, Package] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:  # a continuation line
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        name = fields.get("Package")
        if not name or name in out or "Filename" not in fields or "SHA256" not in fields:
            continue
        depends = ", ".join(v for v in (fields.get("Pre-Depends"), fields.get("Depends")) if v)
        out[name] = Package(name, fields.get("Version", ""), fields["Filename"], fields["SHA256"],
                            _dependency_names(depends))
    return out


def _follows(name: str) -> bool:
    """Whether a dependency is unpacked: shared libraries and QEMU's own packages only
    (not debconf, adduser and the like, which a private prefix does not need)."""
    return name.startswith("lib") or name in QEMU_AND_FIRMWARE


def closure(indexes: list[dict[str, Package]], root: str = ROOT_PACKAGE) -> list[Package]:
    """`root` and every package it needs, each from the first index that has it; the first
    alternative of a dependency that exists anywhere is taken."""

    def find(name: str) -> Package | None:
        return next((ix[name] for ix in indexes if name in ix), None)

    top = find(root)
    if top is None:
        raise _failed(f"no {root} in the Packages indexes of {', '.join(SUITES)}",
                      "Debian may have moved it; check the suites in pcipass.lab.peer_qemu.SUITES")
    if not re.match(rf"(\d+:)?{re.escape(VERSION)}\.", top.version):
        raise _failed(f"{SUITES[0]} has {root} {top.version}, not {VERSION}",
                      "Debian moved on: set pcipass.lab.peer_qemu.VERSION to it (vfio-user-pci needs 10.1 or later)")
    chosen = {root: top}
    todo = [top]
    while todo:
        for alternatives in todo.pop().depends:
            if any(a in chosen for a in alternatives):
                continue
            name = next((a for a in alternatives if find(a) is not None), None)
            if name is None or not _follows(name):
                continue  # a virtual or non-library package: not needed to run QEMU
            package = find(name)
            assert package is not None
            chosen[name] = package
            todo.append(package)
    return sorted(chosen.values(), key=lambda p: p.name)


def _partial(path: Path) -> Path:
    """Where this process builds `path` before renaming it into place (another may be at it too)."""
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def _download(url: str, target: Path) -> None:
    partial = _partial(target)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise _failed(f"cannot download {url}: {exc}",
                      f"check that {MIRROR} is reachable (a proxy may need http_proxy set)") from None
    partial.rename(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _indexes(downloads: Path) -> list[dict[str, Package]]:
    out = []
    for suite in SUITES:
        target = downloads / f"{suite}_Packages.xz"
        # A day old at most: Debian replaces the .debs an old index names.
        if not target.exists() or time.time() - target.stat().st_mtime > INDEX_MAX_AGE:
            _say(f"downloading the {suite} Packages index")
            _download(f"{MIRROR}/dists/{suite}/main/binary-amd64/Packages.xz", target)
        try:
            out.append(parse_index(lzma.decompress(target.read_bytes()).decode("utf-8", "replace")))
        except lzma.LZMAError as exc:
            target.unlink()
            raise _failed(f"{target} is not a valid xz file ({exc})", "run the fetch again") from None
    return out


def _unpack(deb: Path, into: Path) -> None:
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise _failed("dpkg-deb is not installed", "install Debian's dpkg") from None
    except subprocess.CalledProcessError as exc:
        raise _failed(f"dpkg-deb -x {deb.name} failed: {exc.stderr.strip()}",
                      f"check the free space under {cache_dir()}, then fetch again") from None


def _fetch_deb(package: Package, downloads: Path) -> Path:
    target = downloads / Path(package.filename).name
    if target.exists() and _sha256(target) == package.sha256:
        return target
    _say(f"downloading {package.name} {package.version}")
    _download(f"{MIRROR}/{package.filename}", target)
    got = _sha256(target)
    if got != package.sha256:
        target.unlink()
        raise _failed(f"{target.name}: SHA256 {got}, the index says {package.sha256}",
                      "the download was corrupted or the index is stale; run the fetch again")
    return target


@dataclass(frozen=True)
class PeerQemu:
    prefix: Path

    def library_path(self) -> str:
        return ":".join(str(self.prefix / d) for d in LIBRARY_DIRS if (self.prefix / d).is_dir())

    def command(self, *args: str) -> list[str]:
        """The command line that runs this QEMU with `args` (firmware from the prefix)."""
        firmware = [a for d in FIRMWARE_DIRS if (self.prefix / d).is_dir() for a in ("-L", str(self.prefix / d))]
        return [str(self.prefix / LOADER), "--library-path", self.library_path(),
                str(self.prefix / BINARY), *firmware, *args]

    def environment(self) -> dict[str, str]:
        """QEMU looks for its loadable modules in the prefix first (the system's are 7.2's)."""
        env = dict(os.environ)
        env["QEMU_MODULE_DIR"] = str(self.prefix / "usr/lib/x86_64-linux-gnu/qemu")
        return env

    def wrapper(self, directory: Path) -> Path:
        """An executable that runs this QEMU with the arguments it is given, for `vng --qemu`
        (a lab topology that needs a newer QEMU than Debian's): exec keeps the descriptors
        vng hands over as /proc/self/fd/N."""
        script = directory / "qemu-peer"
        module_dir = self.environment()["QEMU_MODULE_DIR"]
        script.write_text("#!/bin/sh\n"
                          f"QEMU_MODULE_DIR={shlex.quote(module_dir)} exec {shlex.join(self.command())} \"$@\"\n")
        script.chmod(0o755)
        return script

    def run(self, *args: str, timeout: float = 60) -> str:
        try:
            done = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout,
                                  env=self.environment(), check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _failed(f"cannot run the peer QEMU in {self.prefix}: {exc}",
                          f"remove {self.prefix} and fetch it again") from None
        if done.returncode != 0:
            raise _failed(f"the peer QEMU ({' '.join(args)}) exited with {done.returncode}: "
                          f"{(done.stderr or done.stdout).strip()[:500]}",
                          f"remove {self.prefix} and fetch it again")
        return done.stdout

    def check(self) -> str:
        """The version line, after checking it is the expected one and has vfio-user-pci."""
        line = self.run("--version").splitlines()[0]
        if f"version {VERSION}" not in line:
            raise _failed(f"the peer QEMU says {line!r}, expected {VERSION}",
                          f"remove {self.prefix} and fetch it again")
        # Not `-device help`: that loads every module QEMU knows, and where the prefix lacks one
        # (the GUI ones are only recommended) QEMU finds the system's 7.2 module and aborts.
        if "socket" not in self.run("-device", "vfio-user-pci,help"):
            raise _failed(f"the peer QEMU {line!r} has no vfio-user-pci device",
                          "this Debian build may not enable vfio-user; see the package's changelog")
        return line


def find() -> PeerQemu | None:
    """The unpacked peer QEMU, if a complete one is in the cache."""
    prefix = prefix_dir()
    return PeerQemu(prefix) if (prefix / BINARY).exists() and (prefix / LOADER).exists() else None


def require() -> PeerQemu:
    peer = find()
    if peer is None:
        raise _failed(f"the peer QEMU {VERSION} is not in {prefix_dir()}",
                      "run `pcipass lab peer-qemu` (./bootstrap does) to fetch it")
    return peer


def fetch() -> PeerQemu:
    """Download and unpack the peer QEMU unless it is there already; check it runs."""
    peer = find()
    if peer is None:
        downloads = cache_dir() / "peer-qemu-debs"
        downloads.mkdir(parents=True, exist_ok=True)
        packages = closure(_indexes(downloads))
        _say(f"{len(packages)} packages: {' '.join(p.name for p in packages)}")
        debs = [_fetch_deb(p, downloads) for p in packages]
        prefix = prefix_dir()
        partial = _partial(prefix)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            for deb in debs:
                _unpack(deb, partial)
            partial.rename(prefix)  # only a complete prefix is ever found
        except OSError:
            if find() is None:  # else another process finished first: use its prefix
                raise _failed(f"cannot move the unpacked QEMU into {prefix}",
                              f"remove {prefix} and fetch again") from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        peer = PeerQemu(prefix)
    line = peer.check()
    _say(f"ready: {line} ({peer.prefix})")
    return peer

