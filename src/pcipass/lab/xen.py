"""The Xen lab: Debian's Xen 4.17 under QEMU, with the lab's Debian kernel as its PV dom0.

The Linux lab's machinery is reused whole: virtme-ng builds the same initramfs,
shares the host's root over 9p with the same overlays, runs the command through
virtme-ng-init and brings its exit status back. Only the QEMU command changes,
so vng is given a QEMU of ours (`python -m pcipass.lab.xen qemu CONFIG ...`)
that rewrites vng's direct Linux boot into QEMU's multiboot form:

    -kernel xen  -append "XEN ARGS"  -initrd "vmlinuz LINUX ARGS,initrd"

with `-cpu qemu64` (under `-cpu max` dom0 crashes), the kernel's console moved
to hvc0 (Xen owns the serial port) and Xen's serial log kept in the run
directory. Inside, `python -m pcipass.lab.xen dom0 -- CMD` does what Debian's
xencommons does (xenfs, the xen-* modules, xenstored, xen-init-dom0,
xenconsoled) and loads xen-pciback at boot, so `xen-pciback.hide=` on dom0's
command line is honoured, then runs CMD.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pcipass.errors import PcipassError

VERSION = "4.17"
PACKAGES = (f"xen-hypervisor-{VERSION}-amd64", f"xen-utils-{VERSION}")
XEN_GZ = Path(f"/boot/xen-{VERSION}-amd64.gz")
XEN_TOOLS = Path(f"/usr/lib/xen-{VERSION}/bin")
CPU = "qemu64"
# Xen's own command line. iommu=1: Xen takes the emulated VT-d (it says "I/O
# virtualisation enabled"); bootscrub=false: scrubbing free RAM costs minutes under TCG.
XEN_ARGS = (
    "console=com1", "com1=115200,8n1", "iommu=1", "dom0_mem=1024M,max:1024M",
    "bootscrub=false", "loglvl=all", "guest_loglvl=all",
)
# dom0's console is Xen's virtual console; the serial port is Xen's.
DOM0_ARG_SWAPS = {
    "console=ttyS0": "console=hvc0",
    "virtme_console=ttyS0": "virtme_console=hvc0",
    "earlyprintk=serial,ttyS0,115200": "earlyprintk=xen",
}
# What xencommons loads in dom0; xen-pciback too, so that a boot-time hide takes effect.
DOM0_MODULES = ("xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-pciback")
# Xen copies dom0's command line into a buffer of this size (MAX_GUEST_CMDLINE) and cuts the rest,
# with virtme-ng's init= at the end of it.
DOM0_CMDLINE_MAX = 1024
XENSTORED_WAIT = 180.0  # seconds; everything is slow in a PV dom0 under TCG


def _say(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def _apt_hint() -> str:
    return f"apt-get install {' '.join(PACKAGES)} (./bootstrap installs them too)"


def require(cache: Path) -> Path:
    """Xen's image, gunzipped into the lab cache; a clear error if the packages are missing."""
    if not XEN_GZ.is_file() or not (XEN_TOOLS / "xl").is_file():
        missing = [str(p) for p in (XEN_GZ, XEN_TOOLS / "xl") if not p.is_file()]
        raise PcipassError(f"Xen {VERSION} is not installed ({', '.join(missing)} missing)",
                           hint=_apt_hint(), code="lab-no-xen")
    image = cache / "xen" / XEN_GZ.name.removesuffix(".gz")
    if not image.is_file() or image.stat().st_mtime < XEN_GZ.stat().st_mtime:
        image.parent.mkdir(parents=True, exist_ok=True)
        partial = image.with_name(image.name + ".partial")
        with gzip.open(XEN_GZ) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)  # QEMU's multiboot loader takes no gzip
        partial.replace(image)
    return image


def _escape(text: str) -> str:
    """QEMU separates multiboot modules with commas; a literal comma is doubled."""
    return text.replace(",", ",,")


def dom0_append(append: str) -> str:
    return " ".join(DOM0_ARG_SWAPS.get(arg, arg) for arg in append.split(" "))


def multiboot_args(args: list[str], xen: Path, xen_args: tuple[str, ...] = XEN_ARGS,
                   serial_log: str | None = None) -> list[str]:
    """vng's QEMU arguments for a direct Linux boot, turned into Xen with that Linux as dom0."""
    out: list[str] = []
    boot: dict[str, str] = {}
    it = iter(args)
    for arg in it:
        if arg in ("-kernel", "-append", "-initrd", "-cpu"):
            try:
                boot[arg] = next(it)
            except StopIteration:
                raise PcipassError(f"QEMU option {arg} without a value",
                                   hint="pcipass rewrites virtme-ng's QEMU command line for Xen and "
                                   "found it cut short: check that virtme-ng is 1.30 or later "
                                   "(./bootstrap installs it) and report `vng --version`",
                                   code="lab-xen-args") from None
        elif arg == "-chardev" and serial_log:
            spec = next(it)
            # vng's serial console goes to a file (or /dev/null): keep Xen's log instead.
            if spec.startswith("file,id=console,"):
                spec = f"file,id=console,path={_escape(serial_log)}"
            out += [arg, spec]
        else:
            out.append(arg)
    if "-kernel" not in boot:
        raise PcipassError("vng's QEMU command has no -kernel to boot as dom0",
                           hint="this virtme-ng boots in a way pcipass does not know",
                           code="lab-xen-args")
    dom0 = dom0_append(boot.get("-append", ""))
    if len(dom0) >= DOM0_CMDLINE_MAX:
        raise PcipassError(f"dom0's command line is {len(dom0)} bytes; Xen keeps {DOM0_CMDLINE_MAX - 1}",
                           hint="shorten the command or the extra kernel arguments (a long command "
                           "can go in a script)", code="lab-xen-cmdline")
    module = _escape(f"{boot['-kernel']} {dom0}".rstrip())
    modules = module + ("," + _escape(boot["-initrd"]) if "-initrd" in boot else "")
    return out + ["-cpu", CPU, "-kernel", str(xen), "-append", " ".join(xen_args),
                  "-initrd", modules]


# ---- on the host: the QEMU vng runs ------------------------------------------------------------

def qemu_wrapper(workdir: Path, qemu: str, xen: Path, *,
                 xen_args: tuple[str, ...] = XEN_ARGS) -> Path:
    """An executable for `vng --qemu`: our rewrite in front of the real QEMU."""
    config = workdir / "xen.json"
    config.write_text(json.dumps({
        "qemu": qemu, "xen": str(xen), "xen_args": list(xen_args),
        "serial_log": str(workdir / "xen-serial.log"),
    }))
    src = Path(__file__).resolve().parents[2]
    script = workdir / "qemu-xen"
    script.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={shlex.quote(str(src))} exec {shlex.quote(sys.executable)} "
        f"-m pcipass.lab.xen qemu {shlex.quote(str(config))} \"$@\"\n"
    )
    script.chmod(0o755)
    return script


def serial_tail(workdir: Path, lines: int = 30) -> str:
    try:
        text = (workdir / "xen-serial.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _exec_qemu(config_path: str, args: list[str]) -> int:
    config = json.loads(Path(config_path).read_text())
    qemu = config["qemu"]
    if "-kernel" in args:  # the boot; vng also runs `qemu --version` to probe it
        args = multiboot_args(args, Path(config["xen"]), tuple(config["xen_args"]),
                              config["serial_log"])
    # vng hands the initramfs over as /proc/self/fd/N: exec keeps the descriptor.
    os.execv(qemu, [qemu, *args])
    return 127  # not reached


# ---- inside: dom0's Xen services ----------------------------------------------------------------

def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def _version() -> str:
    parts = []
    for name in ("major", "minor"):
        try:
            parts.append(Path(f"/sys/hypervisor/version/{name}").read_text().strip())
        except OSError:
            return "?"
    try:
        extra = Path("/sys/hypervisor/version/extra").read_text().strip()
    except OSError:
        extra = ""
    return ".".join(parts) + extra


def iommu_line() -> str | None:
    """Xen's own word on its IOMMU, from its boot log (`xl dmesg`)."""
    out = _run([str(XEN_TOOLS / "xl"), "dmesg"])
    for line in out.stdout.splitlines():
        if "I/O virtualisation" in line:
            return line.removeprefix("(XEN) ").strip()
    return None


def start_dom0() -> None:
    """What xencommons does at boot, enough for `xl` to work."""
    try:
        hypervisor = Path("/sys/hypervisor/type").read_text().strip()
    except OSError:
        hypervisor = None
    if hypervisor != "xen":
        raise PcipassError("this is not a Xen domain", code="lab-xen-not-dom0",
                           hint="run it through `pcipass lab run --xen`")
    for module in DOM0_MODULES:
        result = _run(["modprobe", module])
        if result.returncode != 0:
            _say(f"modprobe {module} failed: {result.stderr.strip()}")
    if not Path("/proc/xen/capabilities").exists():
        subprocess.run(["mount", "-t", "xenfs", "xenfs", "/proc/xen"], check=True)
    for directory in ("/run/xen", "/run/xenstored", "/var/lib/xen", "/var/log/xen"):
        os.makedirs(directory, exist_ok=True)
    env = dict(os.environ, XENSTORED_ROOTDIR="/run/xenstored")
    subprocess.run([str(XEN_TOOLS / "xenstored"), "--pid-file", "/run/xen/xenstored.pid"],
                   check=True, env=env)
    deadline = time.monotonic() + XENSTORED_WAIT
    while _run(["xenstore-read", "-s", "/"]).returncode != 0:
        if time.monotonic() > deadline:
            raise PcipassError("xenstored did not answer", code="lab-xen-xenstored",
                               hint="see /var/log/xen in the guest")
        time.sleep(0.5)
    subprocess.run([str(XEN_TOOLS / "xen-init-dom0")], check=True, stdout=subprocess.DEVNULL)
    # Guests' consoles are kept in /var/log/xen/console/guest-NAME.log, for tests to read.
    os.makedirs("/var/log/xen/console", exist_ok=True)
    subprocess.run([str(XEN_TOOLS / "xenconsoled"), "--pid-file", "/run/xen/xenconsoled.pid",
                    "--log=guest", "--log-dir=/var/log/xen/console"], check=True)


def dom0_main(command: list[str]) -> int:
    started = time.monotonic()
    start_dom0()
    _say(f"Xen {_version()} dom0 up: xenstored, xenconsoled and xl ready in "
         f"{time.monotonic() - started:.1f} s; {iommu_line() or 'Xen said nothing on its IOMMU'}")
    if not command:
        return 0
    env = dict(os.environ, PCIPASS_LAB_XEN="1")
    try:
        return subprocess.call(command, env=env)
    except FileNotFoundError:
        _say(f"{command[0]}: command not found in dom0")
        return 127


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcipass.lab.xen")
    verbs = parser.add_subparsers(dest="verb", required=True)
    q = verbs.add_parser("qemu", help="(for vng) rewrite a Linux boot into Xen + dom0, run QEMU")
    q.add_argument("config")
    q.add_argument("args", nargs=argparse.REMAINDER)
    d = verbs.add_parser("dom0", help="(in the guest) start Xen's dom0 services, then run CMD")
    d.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.verb == "qemu":
            return _exec_qemu(args.config, args.args)
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return dom0_main(command)
    except PcipassError as exc:
        print(f"pcipass.lab.xen: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
