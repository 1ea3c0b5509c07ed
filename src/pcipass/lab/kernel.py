"""The lab's kernel: Debian's linux-image package, downloaded and unpacked into a cache.

Nothing is installed into the host's /boot: `apt-get download` fetches the
.deb and `dpkg-deb -x` unpacks it under the cache directory, where virtme-ng
finds both the image (boot/vmlinuz-*) and its modules (lib/modules/*).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pcipass.errors import PcipassError

# The meta-package that names the current kernel of this Debian release.
META_PACKAGE = "linux-image-amd64"
# What the guest calls Debian's kernel, beside the lab kernels of pcipass.lab.kbuild.
DEBIAN = "debian"


def cache_dir() -> Path:
    """Where the lab keeps kernels and run directories (PCIPASS_LAB_CACHE overrides)."""
    explicit = os.environ.get("PCIPASS_LAB_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pcipass" / "lab"


@dataclass(frozen=True)
class Kernel:
    image: Path  # .../boot/vmlinuz-VERSION
    release: str  # VERSION, e.g. 6.1.0-56-amd64

    @property
    def modules(self) -> Path:
        return self.image.parent.parent / "lib" / "modules" / self.release


def _say(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def find(name: str | None = None) -> Kernel | None:
    """The kernel to boot: PCIPASS_LAB_KERNEL (a vmlinuz path), else the newest in the cache.

    `name`: a lab kernel of the project's own (pcipass.lab.kbuild) instead of Debian's.
    """
    if name is not None:
        from pcipass.lab import kbuild

        return kbuild.find(name)
    explicit = os.environ.get("PCIPASS_LAB_KERNEL")
    if explicit:
        image = Path(explicit)
        if not image.is_file():
            raise PcipassError(
                f"PCIPASS_LAB_KERNEL={explicit} is not a file",
                hint="point it at a vmlinuz whose modules sit in ../lib/modules/, or unset it",
                code="lab-no-kernel",
            )
        return Kernel(image, image.name.removeprefix("vmlinuz-"))
    images = sorted((cache_dir() / "kernels").glob("*/boot/vmlinuz-*"))
    if not images:
        return None
    image = images[-1]
    return Kernel(image, image.name.removeprefix("vmlinuz-"))


def require(name: str | None = None) -> Kernel:
    if name is not None:
        from pcipass.lab import kbuild

        return kbuild.require(name)
    kernel = find()
    if kernel is None:
        raise PcipassError(
            "the lab has no kernel yet",
            hint="run `pcipass lab setup` (it downloads Debian's linux-image package into "
            f"{cache_dir()}; needs `apt-get update` to have run once)",
            code="lab-no-kernel",
        )
    return kernel


def _run(cmd: list[str], hint: str = "run `apt-get update` once, then `pcipass lab setup` again",
         **kwargs: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]
    except FileNotFoundError:
        raise PcipassError(
            f"{cmd[0]} is not installed",
            hint="the lab's set-up needs Debian's apt and dpkg (this is a Debian 12 tool)",
            code="lab-no-apt",
        ) from None
    except subprocess.CalledProcessError as exc:
        raise PcipassError(
            f"`{' '.join(cmd)}` failed: {exc.stderr.strip() or exc.stdout.strip()}",
            hint=hint,
            code="lab-setup-failed",
        ) from None


def resolve_package() -> str:
    """The versioned package that linux-image-amd64 stands for now, e.g. linux-image-6.1.0-56-amd64."""
    out = _run(["apt-cache", "depends", META_PACKAGE]).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise PcipassError(
        f"apt knows no {META_PACKAGE}",
        hint="run `apt-get update` once so apt has Debian's package lists, then `pcipass lab setup`",
        code="lab-setup-failed",
    )


def setup() -> Kernel:
    """Make sure a kernel is in the cache, downloading it if needed; returns it."""
    kernel = find()
    if kernel is not None:
        _say(f"kernel {kernel.release} is ready in {kernel.image.parent.parent}")
        return kernel
    package = resolve_package()
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {package} (about 70 MB) with apt-get download ...")
    # Not captured: apt shows its own progress while it downloads.
    if subprocess.call(["apt-get", "download", package], cwd=debs) != 0:
        raise PcipassError(f"apt-get download {package} failed",
                           hint="run `apt-get update` once, then `pcipass lab setup` again",
                           code="lab-setup-failed")
    deb = max(debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    target = cache_dir() / "kernels" / package
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _say(f"unpacking {deb.name} into {target} ...")
    _run(["dpkg-deb", "-x", str(deb), str(partial)],
         hint=f"check that {cache_dir()} has about 500 MB free, then `pcipass lab setup` again")
    partial.rename(target)  # only a complete tree is ever found by find()
    deb.unlink()
    kernel = require()
    _say(f"kernel {kernel.release} is ready")
    return kernel
