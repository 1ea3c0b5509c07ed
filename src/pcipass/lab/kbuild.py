"""Lab kernels of the project's own: Debian's kernel source built with a small config of ours.

Debian builds none of its kernels with CONFIG_IOMMUFD or CONFIG_VFIO_NOIOMMU, so the lab
kernel `iommufd` is built here: `make allnoconfig` plus the fragment kconfig/NAME.config,
everything built in. It is cached under the lab cache as

    built/NAME-SOURCEVERSION-CONFIGHASH/boot/vmlinuz-RELEASE   (what virtme-ng boots)
    built/NAME-SOURCEVERSION-CONFIGHASH/boot/vmlinux-RELEASE   (the ELF, for a PVH boot)
    built/NAME-SOURCEVERSION-CONFIGHASH/lib/modules/RELEASE/   (modules.builtin, depmod's
                                                                 index: modprobe of a built-in
                                                                 driver succeeds, modinfo reads it)

so it is built again only when the source package's version or the fragment changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pcipass.errors import PcipassError
from pcipass.lab.kernel import Kernel, cache_dir

# Debian's kernel source (the tree with Debian's patches, as a tarball in a .deb); 6.12 is
# the newest in bookworm (through its security updates) and trixie's own kernel.
SOURCE_PACKAGE = "linux-source-6.12"
CONFIGS = Path(__file__).with_name("kconfig")
# Steps (kbuild's CC/LD/AR... lines) between two progress lines.
PROGRESS_EVERY = 250


def _say(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def names() -> list[str]:
    """The lab kernels this pcipass can build (one kconfig/NAME.config each)."""
    return sorted(p.stem for p in CONFIGS.glob("*.config"))


def config_fragment(name: str) -> Path:
    path = CONFIGS / f"{name}.config"
    if not path.is_file():
        known = ", ".join(names()) or "none"
        raise PcipassError(f"no lab kernel named {name!r}",
                           hint=f"lab kernels that can be built: {known}; without --kernel the lab "
                           "boots Debian's", code="lab-unknown-kernel")
    return path


def config_hash(name: str) -> str:
    return hashlib.sha256(config_fragment(name).read_bytes()).hexdigest()[:12]


def wanted(name: str) -> list[tuple[str, str]]:
    """(CONFIG_X, value) for every setting the fragment asks for; value 'n' means unset."""
    out = []
    for line in config_fragment(name).read_text().splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line.strip())
        if m:
            out.append((m[1], m[2]))
    return out


def missing_settings(name: str, config_text: str) -> list[str]:
    """The fragment's settings that the final .config does not have (a dependency said no)."""
    have = dict(re.findall(r"^(CONFIG_\w+)=(.*)$", config_text, re.M))
    missing = []
    for key, value in wanted(name):
        if value == "n":
            if key in have:
                missing.append(f"{key} should be off, is {have[key]}")
        elif have.get(key) != value:
            missing.append(f"{key}={value} (got {have.get(key, 'unset')})")
    return missing


def _built_dirs(name: str) -> list[Path]:
    return sorted((cache_dir() / "built").glob(f"{name}-*-{config_hash(name)}"))


def _kernel_in(directory: Path) -> Kernel | None:
    images = sorted(directory.glob("boot/vmlinuz-*"))
    if not images:
        return None
    return Kernel(images[-1], images[-1].name.removeprefix("vmlinuz-"))


def find(name: str) -> Kernel | None:
    """The newest build of `name` with today's config fragment, or None."""
    for directory in reversed(_built_dirs(name)):
        kernel = _kernel_in(directory)
        if kernel is not None:
            return kernel
    return None


def require(name: str) -> Kernel:
    kernel = find(name)
    if kernel is None:
        raise PcipassError(
            f"the lab kernel {name!r} is not built yet (or its config changed)",
            hint=f"run `pcipass lab setup --kernel {name}` (it builds {SOURCE_PACKAGE} with "
            f"{config_fragment(name).name}; about 10 minutes on 2 cores)",
            code="lab-no-kernel")
    return kernel


def _run(cmd: list[str], what: str, **kwargs: object) -> str:
    try:
        done = subprocess.run(cmd, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise PcipassError(f"{cmd[0]} is not installed",
                           hint="./bootstrap installs what the kernel build needs "
                           "(build-essential bc bison flex libelf-dev libssl-dev cpio)",
                           code="lab-missing-tool") from None
    except subprocess.CalledProcessError as exc:
        tail = "\n".join((exc.stderr or exc.stdout or "").strip().splitlines()[-15:])
        raise PcipassError(f"{what} failed (`{' '.join(cmd)}`):\n{tail}",
                           hint="./bootstrap installs what the build needs; run `pcipass lab setup "
                           "--kernel NAME` again once fixed", code="lab-build-failed") from None
    return str(done.stdout)


def source_version() -> str:
    """The version apt would download of SOURCE_PACKAGE, e.g. 6.12.117-1~deb12u1."""
    out = _run(["apt-cache", "show", "--no-all-versions", SOURCE_PACKAGE], "apt-cache show")
    m = re.search(r"^Version: (\S+)", out, re.M)
    if not m:
        raise PcipassError(f"apt knows no {SOURCE_PACKAGE}",
                           hint="run `apt-get update` once so apt has Debian's package lists (on "
                           "Debian 12 it comes from bookworm-security)",
                           code="lab-setup-failed")
    return m[1]


def _unpack_source(work: Path) -> Path:
    """Download SOURCE_PACKAGE and unpack its tarball under `work`; returns the tree."""
    _say(f"downloading {SOURCE_PACKAGE} (about 150 MB) with apt-get download ...")
    if subprocess.call(["apt-get", "download", SOURCE_PACKAGE], cwd=work) != 0:
        raise PcipassError(f"apt-get download {SOURCE_PACKAGE} failed",
                           hint="run `apt-get update` once, then `pcipass lab setup --kernel NAME` again",
                           code="lab-setup-failed")
    deb = next(work.glob(f"{SOURCE_PACKAGE}_*.deb"))
    _say(f"unpacking {deb.name} ...")
    tarball = f"./usr/src/{SOURCE_PACKAGE}.tar.xz"
    _run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -xO "$2" | tar -xJ -C "$3"',
          "unpack", str(deb), tarball, str(work)], "unpacking the kernel source")
    deb.unlink()
    return work / SOURCE_PACKAGE


def _make(tree: Path, out: Path, *targets: str, progress: bool = False) -> None:
    cmd = ["make", "-C", str(tree), f"O={out}", "ARCH=x86_64", f"-j{os.cpu_count() or 1}",
           f"LOCALVERSION={_localversion(out)}", *targets]
    if not progress:
        _run(cmd, f"make {' '.join(targets)}")
        return
    start = time.monotonic()
    tail: list[str] = []
    steps = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-30:]
            if line.startswith("  ") and not line.startswith("   "):  # kbuild's "  CC      x.o"
                steps += 1
                if steps % PROGRESS_EVERY == 0:
                    _say(f"building: {steps} steps, {_minutes(time.monotonic() - start)} "
                         f"({line.split()[-1]})")
    if proc.returncode != 0:
        raise PcipassError("the kernel build failed:\n" + "\n".join(tail),
                           hint="./bootstrap installs what the build needs; run `pcipass lab "
                           "setup --kernel NAME` again once fixed", code="lab-build-failed")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def _localversion(out: Path) -> str:
    return (out / ".pcipass-localversion").read_text().strip()


def setup(name: str) -> Kernel:
    """Build `name` unless a build of the same source version and config is cached."""
    fragment = config_fragment(name)
    try:
        version = source_version()
    except PcipassError:
        cached = find(name)
        if cached is None:
            raise
        # A root whose apt lists lack the source (Debian 12 without bookworm-security, say)
        # still boots a build of today's config.
        _say(f"apt knows no {SOURCE_PACKAGE} here; kernel {cached.release} (built with today's "
             f"{fragment.name}) is ready in {cached.image.parent.parent}")
        return cached
    key = f"{name}-{version}-{config_hash(name)}"
    target = cache_dir() / "built" / key
    kernel = _kernel_in(target) if target.is_dir() else None
    if kernel is not None:
        _say(f"kernel {kernel.release} ({key}) is ready in {target}")
        return kernel
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-build-") as tmp:
        work = Path(tmp)
        tree = _unpack_source(work)
        out = work / "out"
        out.mkdir()
        (out / ".pcipass-localversion").write_text(f"-{name}\n")
        _say(f"configuring: make allnoconfig, then {fragment.name} ...")
        _make(tree, out, "allnoconfig")
        _run([str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(out),
              str(out / ".config"), str(fragment)], "merging the config fragment", cwd=tree)
        _make(tree, out, "olddefconfig")
        missing = missing_settings(name, (out / ".config").read_text())
        if missing:
            raise PcipassError(f"{SOURCE_PACKAGE} {version} does not take every setting of "
                               f"{fragment.name}: {'; '.join(missing)}",
                               hint=f"a dependency of those changed: fix {fragment}",
                               code="lab-build-failed")
        _say(f"building {SOURCE_PACKAGE} {version} on {os.cpu_count()} CPUs (about 10 minutes "
             "on 2 cores) ...")
        _make(tree, out, "bzImage", progress=True)
        release = _run(["make", "-s", "-C", str(tree), f"O={out}", "ARCH=x86_64",
                        f"LOCALVERSION={_localversion(out)}", "kernelrelease"],
                       "make kernelrelease").strip().splitlines()[-1]
        partial = work / "tree"
        boot = partial / "boot"
        boot.mkdir(parents=True)
        shutil.copy(out / "arch/x86/boot/bzImage", boot / f"vmlinuz-{release}")
        shutil.copy(out / "vmlinux", boot / f"vmlinux-{release}")
        shutil.copy(out / ".config", boot / f"config-{release}")
        modules = partial / "lib" / "modules" / release
        modules.mkdir(parents=True)
        for index in ("modules.builtin", "modules.builtin.modinfo"):
            if (out / index).exists():
                shutil.copy(out / index, modules / index)
        (modules / "modules.order").touch()
        _run(["depmod", "-b", str(partial), release], "depmod")
        partial.rename(target)  # only a complete tree is ever found
    for old in (cache_dir() / "built").glob(f"{name}-*"):  # earlier versions or configs
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    kernel = require(name)
    _say(f"kernel {kernel.release} ({key}) built in {_minutes(time.monotonic() - start)}; "
         f"in {target}")
    return kernel
