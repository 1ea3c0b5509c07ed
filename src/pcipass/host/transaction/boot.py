"""Hide devices at boot: one policy file, written out to what the system uses.

The policy, /etc/pcipass/boot.conf (one directive a line, `#` starts a comment):

    mode vfio            # vfio | xen | pciback (default: xen on a Xen dom0, else vfio)
    hide 0000:03:00.0    # a device the host's own driver must not take at boot
    hide 0000:02:0d.0 ids=1234:11e8 driver=edu   # ids/driver: for a root without that device

`apply` writes (only what changed; running it twice changes nothing):

  /etc/default/grub         GRUB_CMDLINE_LINUX gets `vfio-pci.ids=V:D,...` (vfio) or
                            `xen-pciback.hide=(BDF)...` (xen) / `pciback.hide=(BDF)...`
                            (pciback); pcipass owns those three keys there. The boot loader's
                            own config is never touched: apply prints the command that
                            regenerates it.
  /etc/modprobe.d/pcipass.conf   `softdep DRIVER pre: vfio-pci` (or xen-pciback), so the
                            stub loads before the device's own driver can bind.
  /etc/udev/rules.d/60-pcipass.rules   per-device driver_override, then vfio-pci loaded
                            and the device taken from any driver quicker than udevd, for a
                            device whose vendor:device ID a kept twin shares (vfio-pci.ids
                            would take both).

`check` compares what the next boot will do (from those files, and whether the
boot loader's config has caught up) with what is bound now.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pcipass.errors import NeedsRoot, PcipassError, UsageError
from pcipass.host.model.sysfs import Host, parse_bdf
from pcipass.sysfs import PASS_THROUGH_DRIVERS, link_name

POLICY = "etc/pcipass/boot.conf"
GRUB_DEFAULT = "etc/default/grub"
GRUB_CFG = ("boot/grub/grub.cfg", "boot/grub2/grub.cfg")
MODPROBE = "etc/modprobe.d/pcipass.conf"
UDEV = "etc/udev/rules.d/60-pcipass.rules"
MODES = ("vfio", "xen", "pciback")
# The kernel-argument keys pcipass owns on GRUB_CMDLINE_LINUX.
OWNED_KEYS = ("vfio-pci.ids", "xen-pciback.hide", "pciback.hide")
HIDE_KEY = {"xen": "xen-pciback.hide", "pciback": "pciback.hide"}
STUB = {"vfio": "vfio-pci", "xen": "xen-pciback", "pciback": "xen-pciback"}
STUB_DRIVER = {"vfio": "vfio-pci", "xen": "pciback", "pciback": "pciback"}
REGENERATE = "update-grub (or: grub-mkconfig -o /boot/grub/grub.cfg), then update-initramfs -u"
HEADER = "# Written by `pcipass boot apply` from /etc/pcipass/boot.conf: edit that, not this.\n"


# --- pciback.hide strings ---------------------------------------------------------

_HIDE_ITEM = re.compile(
    r"\s*\(\s*(?:(?P<dom>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})"
    r"\.(?P<fn>[0-7*])\s*\)\s*"
)


def parse_hide(text: str) -> list[str]:
    """Parse a pciback.hide / xen-pciback.hide value: `(bus:dev.fun)` items, domain optional,
    function `*` for every function. Returns kernel-form addresses (0000:02:0d.0, 0000:02:0d.*)."""
    out, pos = [], 0
    if not text.strip():
        raise UsageError("an empty pciback.hide list", hint="write (BUS:DEV.FN)(BUS:DEV.FN)..., e.g. (02:0d.0)",
                         code="bad-pciback-hide")
    while pos < len(text):
        m = _HIDE_ITEM.match(text, pos)
        if m is None or int(m["dev"], 16) > 0x1F:
            raise UsageError(
                f"pciback.hide: cannot read {text[pos:pos + 20]!r} (at character {pos + 1} of {text!r})",
                hint="each device is ([DOMAIN:]BUS:DEV.FN) in hex, e.g. (02:0d.0)(0000:03:00.0); "
                "FN may be * for every function", code="bad-pciback-hide")
        out.append(f"{int(m['dom'] or '0', 16):04x}:{int(m['bus'], 16):02x}:{int(m['dev'], 16):02x}.{m['fn']}")
        pos = m.end()
    return out


def format_hide(bdfs: list[str]) -> str:
    return "".join(f"({b})" for b in bdfs)


# --- the policy -----------------------------------------------------------------------

@dataclass
class Hidden:
    bdf: str
    ids: str | None = None  # vendor:device, 4 hex digits each
    driver: str | None = None  # the device's own driver (for softdep)


@dataclass
class Policy:
    mode: str | None = None
    devices: list[Hidden] = field(default_factory=list)


_IDS = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")


def parse_policy(text: str, where: str = POLICY) -> Policy:
    policy = Policy()
    seen = set()
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue

        def bad(msg: str, n: int = n) -> PcipassError:
            return PcipassError(f"{where}:{n}: {msg}", code="bad-boot-policy",
                                hint="lines are `mode vfio|xen|pciback` or `hide BDF [ids=VVVV:DDDD] "
                                "[driver=NAME]`")
        if words[0] == "mode" and len(words) == 2 and words[1] in MODES:
            policy.mode = words[1]
        elif words[0] == "hide" and len(words) >= 2:
            try:
                bdf = str(parse_bdf(words[1]))
            except UsageError as exc:
                raise bad(exc.message) from None
            if bdf in seen:
                raise bad(f"{bdf} is listed twice")
            seen.add(bdf)
            h = Hidden(bdf)
            for opt in words[2:]:
                key, _, value = opt.partition("=")
                if key == "ids" and _IDS.match(value):
                    h.ids = value.lower()
                elif key == "driver" and value:
                    h.driver = value
                else:
                    raise bad(f"unknown option {opt!r}")
            policy.devices.append(h)
        else:
            raise bad(f"cannot read {raw.strip()!r}")
    return policy


def load_policy(root: str) -> Policy:
    path = Path(root) / POLICY
    try:
        return parse_policy(path.read_text(), str(path))
    except FileNotFoundError:
        return Policy()


# --- /etc/default/grub ----------------------------------------------------------------

_GRUB_LINE = re.compile(r'^(?P<pre>\s*GRUB_CMDLINE_LINUX=)(?P<q>["\']?)(?P<val>.*?)(?P=q)\s*$')


def grub_cmdline(text: str) -> list[str] | None:
    """The words of GRUB_CMDLINE_LINUX (the last assignment wins, as in the shell)."""
    found = None
    for line in text.splitlines():
        m = _GRUB_LINE.match(line)
        if m:
            found = m["val"].split()
    return found


def set_grub_cmdline(text: str, words: list[str]) -> str:
    """`text` with the last GRUB_CMDLINE_LINUX replaced by `words` (appended if there is none)."""
    lines = text.splitlines(keepends=True)
    value = " ".join(words)
    for i in range(len(lines) - 1, -1, -1):
        m = _GRUB_LINE.match(lines[i].rstrip("\n"))
        if m:
            q = m["q"] or '"'
            lines[i] = f"{m['pre']}{q}{value}{q}\n"
            return "".join(lines)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines) + f'GRUB_CMDLINE_LINUX="{value}"\n'


def owned(word: str) -> str | None:
    key = word.split("=", 1)[0]
    return key if key in OWNED_KEYS and "=" in word else None


# --- from the policy to files -----------------------------------------------------------

@dataclass
class Outputs:
    mode: str
    args: list[str]  # the owned kernel arguments, in order
    files: dict[str, str | None]  # path under root -> content (None: the file must not exist)
    notes: list[str] = field(default_factory=list)


def _describe(host: Host, policy: Policy) -> list[Hidden]:
    """Fill each hidden device's IDs and driver from sysfs where the policy leaves them out."""
    out = []
    for h in policy.devices:
        dev = host.device_or_none(h.bdf)
        ids, driver = h.ids, h.driver
        if dev is not None:
            ids = ids or f"{dev.vendor:04x}:{dev.device:04x}"
            if driver is None and dev.driver in PASS_THROUGH_DRIVERS:
                driver = _native_from_policy_state(host, h.bdf)
            elif driver is None:
                driver = dev.driver
        if ids is None:
            raise PcipassError(f"{h.bdf} is not on this host and the policy does not give its IDs",
                               hint=f"write `hide {h.bdf} ids=VVVV:DDDD driver=NAME` in /{POLICY}",
                               code="boot-unknown-device")
        out.append(Hidden(h.bdf, ids, driver))
    return out


def _native_from_policy_state(host: Host, bdf: str) -> str | None:
    """The own driver of a device that is on a stub now: from a pcipass claim's journal,
    else from modules.alias (the first module, other than the stubs, whose alias matches)."""
    from pcipass.host.transaction.journal import Journal, state_dir

    try:
        for r in Journal(state_dir(host.root)).records():
            for d in r.devices:
                if d.bdf == bdf and d.original_driver:
                    return d.original_driver
    except PcipassError:
        pass
    dev = host.device_or_none(bdf)
    modalias = dev.modalias if dev is not None else None
    if not modalias:
        return None
    release = (os.uname().release if host.root == "/" else
               (Path(host.path("proc/sys/kernel/osrelease")).read_text().strip()
                if os.path.exists(host.path("proc/sys/kernel/osrelease")) else None))
    try:
        lines = Path(host.path("lib/modules", release or "", "modules.alias")).read_text().splitlines()
    except OSError:
        return None
    vendor = modalias[:13]  # pci:vVVVVVVVV: most aliases name the vendor, so skip the others cheaply
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[0] != "alias" or not parts[1].startswith("pci:v"):
            continue
        pattern = parts[1]
        if not (pattern.startswith(vendor) or pattern[5] in "*?["):
            continue
        if parts[2] not in ("vfio_pci", "pci_stub", "xen_pciback") and fnmatch.fnmatchcase(modalias, pattern):
            return parts[2]
    return None


def _module(host: Host, driver: str) -> str:
    """The module that provides `driver` (its sysfs `module` link), else the driver's name."""
    return link_name(host.path("sys/bus/pci/drivers", driver, "module")) or driver


# What the rule runs once driver_override is set. The kernel probes a new device in
# the same rescan that announced it, so udev's write may come after a driver already
# took it (then it is unbound here) or after the probe found nothing (then it is
# probed again). Loading vfio-pci binds the device by itself when the module was not
# loaded yet (at boot nothing else may load it: edu has no driver, a built-in driver
# wants no softdep). `%k` is the device's name and `/sys%p` its directory; `$` is
# udev's, so the shell gets none.
_UDEV_TAKE = ("cd /sys%p && if [ -e driver ] && ! [ driver -ef /sys/bus/pci/drivers/vfio-pci ]; "
              "then echo %k > driver/unbind; fi; [ -e driver ] || echo %k > /sys/bus/pci/drivers_probe")


def udev_rule(bdf: str) -> str:
    """The udev rule that gives the device at `bdf`, and no other, to vfio-pci when it appears."""
    return (f'ACTION=="add", SUBSYSTEM=="pci", KERNEL=="{bdf}", ATTR{{driver_override}}="vfio-pci", '
            f'RUN{{builtin}}+="kmod load vfio-pci", RUN+="/bin/sh -c \'{_UDEV_TAKE}\'"\n')


def plan_boot(root: str, sysfs: str, policy: Policy | None = None) -> Outputs:
    """What `apply` writes for this policy, given the devices under `sysfs`."""
    policy = policy if policy is not None else load_policy(root)
    host = Host(sysfs)
    mode = policy.mode or ("xen" if host.xen_dom0 else "vfio")
    hidden = _describe(host, policy)
    hidden_bdfs = {h.bdf for h in hidden}
    notes: list[str] = []
    args: list[str] = []
    rules: list[str] = []
    if mode == "vfio":
        kept: dict[str, list[str]] = {}
        for dev in host.devices():
            if dev.name not in hidden_bdfs and dev.vendor is not None and dev.device is not None:
                kept.setdefault(f"{dev.vendor:04x}:{dev.device:04x}", []).append(dev.name)
        ids: list[str] = []
        for h in hidden:
            assert h.ids is not None
            twins = kept.get(h.ids)
            if twins:
                rules.append(udev_rule(h.bdf))
                notes.append(f"{h.bdf}: by address (udev), since {', '.join(twins)} shares its ID "
                             f"{h.ids} and stays with the host")
            elif h.ids not in ids:
                ids.append(h.ids)
        if ids:
            args.append("vfio-pci.ids=" + ",".join(ids))
    elif hidden:
        args.append(f"{HIDE_KEY[mode]}={format_hide([h.bdf for h in hidden])}")
    softdeps = sorted({_module(host, h.driver) for h in hidden if h.driver})
    modprobe = None
    if softdeps:
        modprobe = HEADER + "".join(f"softdep {m} pre: {STUB[mode]}\n" for m in softdeps)
    udev = HEADER + "".join(rules) if rules else None
    return Outputs(mode, args, {MODPROBE: modprobe, UDEV: udev}, notes)


def grub_text(root: str) -> str:
    try:
        return (Path(root) / GRUB_DEFAULT).read_text()
    except FileNotFoundError:
        return ""


def new_grub(root: str, args: list[str]) -> str:
    text = grub_text(root)
    words = [w for w in grub_cmdline(text) or [] if owned(w) is None] + args
    if grub_cmdline(text) is not None and [w for w in grub_cmdline(text) or []] == words:
        return text
    return set_grub_cmdline(text, words)


def pending_changes(root: str, out: Outputs) -> dict[str, str | None]:
    """path -> new content (None: remove) for each file `apply` would change."""
    changes: dict[str, str | None] = {}
    grub = new_grub(root, out.args)
    if grub != grub_text(root):
        changes[GRUB_DEFAULT] = grub
    for rel, content in out.files.items():
        path = Path(root) / rel
        current = path.read_text() if path.exists() else None
        if content != current:
            changes[rel] = content
    return changes


def apply(root: str, sysfs: str) -> tuple[Outputs, list[str]]:
    """Write the policy out; returns the outputs and the paths changed (none on a second run)."""
    out = plan_boot(root, sysfs)
    changes = pending_changes(root, out)
    if changes and os.path.abspath(root) == "/" and os.geteuid() != 0:
        raise NeedsRoot("pcipass boot apply")
    for rel, content in changes.items():
        path = Path(root) / rel
        if content is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.pcipass.tmp")
        tmp.write_text(content)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    return out, sorted(changes)


# --- check: the next boot against now --------------------------------------------------

@dataclass
class Finding:
    code: str
    message: str
    severity: str = "warning"  # warning | info


def _next_boot_args(root: str) -> tuple[list[str], list[Finding]]:
    """The owned arguments the next boot gets, and what stands between /etc/default/grub and it."""
    findings = []
    words = grub_cmdline(grub_text(root)) or []
    args = [w for w in words if owned(w)]
    cfg = next((Path(root) / p for p in GRUB_CFG if (Path(root) / p).exists()), None)
    if cfg is not None:
        linux_lines = [ln.split() for ln in cfg.read_text().splitlines() if ln.strip().startswith(("linux", "module"))]
        booted = set(linux_lines[0]) if linux_lines else set()
        missing = [a for a in args if a not in booted]
        stale = [w for w in booted if owned(w) and w not in args]
        if missing or stale:
            findings.append(Finding("grub-cfg-stale", f"{cfg} does not match GRUB_CMDLINE_LINUX "
                                    f"(missing {' '.join(missing) or '-'}, stale {' '.join(stale) or '-'}): "
                                    f"run {REGENERATE}"))
            args = [w for w in booted if owned(w)]
    return args, findings


def check(root: str, sysfs: str) -> dict[str, object]:
    """What the next boot will bind each device to, against what is bound now."""
    policy = load_policy(root)
    host = Host(sysfs)
    findings: list[Finding] = []
    for w in grub_cmdline(grub_text(root)) or []:
        if owned(w) in ("xen-pciback.hide", "pciback.hide"):
            try:
                parse_hide(w.split("=", 1)[1])
            except UsageError as exc:
                findings.append(Finding("bad-pciback-hide", f"/etc/default/grub: {exc.message}"))
    out = plan_boot(root, sysfs, policy)
    changes = pending_changes(root, out)
    if changes:
        findings.append(Finding("policy-not-applied", f"/{POLICY} is not written out yet ("
                                f"{', '.join('/' + c for c in sorted(changes))} would change): "
                                "run `pcipass boot apply`"))
    args, stale = _next_boot_args(root)
    findings += stale
    ids, hide = set(), set()
    for a in args:
        key, _, value = a.partition("=")
        if key == "vfio-pci.ids":
            ids |= {i.lower() for i in value.split(",") if i}
        else:
            try:
                hide |= set(parse_hide(value))
            except UsageError:
                pass
    rules_path = Path(root) / UDEV
    by_rule = set(re.findall(r'KERNEL=="([^"]+)"', rules_path.read_text())) if rules_path.exists() else set()
    wanted = {h.bdf for h in policy.devices}
    devices = []
    for dev in host.devices():
        id_ = f"{dev.vendor or 0:04x}:{dev.device or 0:04x}"
        slot_any = f"{dev.bdf.slot}.*"
        if id_ in ids or dev.name in by_rule:
            nxt = "vfio-pci"
        elif dev.name in hide or slot_any in hide:
            nxt = "pciback"
        else:
            nxt = None
        if nxt is None and dev.name not in wanted:
            continue
        devices.append({"bdf": dev.name, "ids": id_, "now": dev.driver, "next_boot": nxt or "its own driver",
                        "in_policy": dev.name in wanted})
        if dev.name in wanted and nxt is None:
            findings.append(Finding("not-hidden-next-boot", f"{dev.name} is in the policy but the next boot "
                                    "will not hide it"))
        elif dev.name not in wanted:
            findings.append(Finding("twin-caught", f"{dev.name} ({id_}) is not in the policy but the next "
                                    f"boot gives it to {nxt}"))
        elif dev.driver != nxt:
            findings.append(Finding("differs-now", f"{dev.name} is on {dev.driver or 'no driver'} now and "
                                    f"goes to {nxt} at the next boot", "info"))
    return {"schema": "pcipass/boot-check/1", "mode": out.mode, "next_boot_args": args,
            "devices": devices, "findings": [f.__dict__ for f in findings],
            "ok": not any(f.severity == "warning" for f in findings)}
