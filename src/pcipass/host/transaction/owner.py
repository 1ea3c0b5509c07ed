"""`claim --owner USER[:GROUP]`: whom the VFIO nodes are given to, and the locked memory
that user needs.

A VFIO user maps every page it gives the device for DMA (a VM: all of its RAM) and the
kernel pins them, counting them against the RLIMIT_MEMLOCK of the process that maps
them (Type1 containers; a process with CAP_IPC_LOCK is not limited). A user's limit
belongs to each of its processes, set by whatever starts them: pam_limits at login
(/etc/security/limits.conf and limits.d/*.conf), LimitMEMLOCK= for a systemd unit,
`ulimit -l` in a shell, `prlimit` on a running process; a process started some other way
inherits its parent's. So for another user pcipass can state the requirement and what
the configuration gives a login session, not what every future process will have.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
from dataclasses import dataclass

from pcipass.errors import UsageError

LIMITS_CONF = "etc/security/limits.conf"
LIMITS_D = "etc/security/limits.d"
# Linux's default RLIMIT_MEMLOCK for init and everything that inherits it (MLOCK_LIMIT).
KERNEL_DEFAULT_MEMLOCK = 8 << 20  # since Linux 5.16; 64 KiB before
KERNEL_DEFAULT_MEMLOCK_OLD = 64 << 10
UNLIMITED = -1
GROUP_NODE_MODE = 0o600  # vfio's /dev/vfio/N; 0o660 once a group is given too


@dataclass(frozen=True)
class Owner:
    user: str
    uid: int
    group: str | None  # named with USER:GROUP; the user's own group otherwise
    gid: int

    @property
    def mode(self) -> int:
        return 0o660 if self.group else GROUP_NODE_MODE

    def __str__(self) -> str:
        return f"{self.user}:{self.group}" if self.group else self.user


def parse_owner(text: str) -> Owner:
    """USER[:GROUP], names or numbers, resolved through this host's user database."""
    user, _, group = text.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise UsageError(f"--owner {text!r}: no user {user!r}", code="bad-owner",
                         hint="name an existing user (`id USER`), e.g. --owner qemu or --owner 1000:kvm; "
                         "create one with useradd") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, ValueError):
            raise UsageError(f"--owner {text!r}: no group {group!r}", code="bad-owner",
                             hint="name an existing group (`getent group NAME`), or give the user alone") from None
    return Owner(entry.pw_name, entry.pw_uid, group or None, gid)


def parse_size(text: str) -> int:
    """1G, 512M, 4096K or bytes (powers of 1024, as QEMU's -m reads them)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise UsageError(f"bad size {text!r}", code="bad-size",
                         hint="write it as QEMU's -m takes it: 2G, 512M, 65536K") from None


def human(n: int) -> str:
    if n == UNLIMITED:
        return "unlimited"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}iB"
    return f"{n} bytes"


@dataclass(frozen=True)
class LoginLimit:
    """What pam_limits gives `user` at login for memlock: the soft limit and where it is set."""

    soft: int | None  # bytes, UNLIMITED, or None where no line names memlock for this user
    where: str | None


def login_memlock(root: str, owner: Owner) -> LoginLimit:
    """limits.conf, then limits.d/*.conf in order (later files override); of the lines that
    match, one naming the user beats a @group line, which beats `*` (as pam_limits ranks them)."""
    groups = {g.gr_name for g in grp.getgrall() if owner.user in g.gr_mem}
    try:
        groups.add(grp.getgrgid(owner.gid).gr_name)
    except KeyError:
        pass
    files = [os.path.join(root, LIMITS_CONF), *sorted(glob.glob(os.path.join(root, LIMITS_D, "*.conf")))]
    best: tuple[int, int | None, str | None] = (-1, None, None)  # (rank, value, where)
    for path in files:
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for n, line in enumerate(lines, 1):
            f = line.split("#", 1)[0].split()
            if len(f) != 4 or f[2] != "memlock" or f[1] not in ("soft", "-"):
                continue
            who = f[0]
            rank = 3 if who in (owner.user, str(owner.uid)) else 2 if who.startswith("@") and who[1:] in groups \
                else 1 if who == "*" else -1
            if rank < 0 or rank < best[0]:
                continue
            value = UNLIMITED if f[3] in ("unlimited", "infinity", "-1") else int(f[3]) * 1024 if f[3].isdigit() else None
            if value is not None:
                best = (rank, value, f"{os.path.relpath(path, root) if root != '/' else path}:{n}")
    return LoginLimit(best[1], best[2])


def kernel_default(root: str) -> int:
    """RLIMIT_MEMLOCK that the kernel gives init (and what inherits it unchanged)."""
    try:
        release = open(os.path.join(root, "proc/sys/kernel/osrelease")).read()
        major, minor = (int(x) for x in release.split(".")[:2])
    except (OSError, ValueError):
        return KERNEL_DEFAULT_MEMLOCK
    return KERNEL_DEFAULT_MEMLOCK if (major, minor) >= (5, 16) else KERNEL_DEFAULT_MEMLOCK_OLD


HOW_TO_RAISE = (
    "raise it where the user's VFIO program starts: a login session, in /etc/security/limits.d/"
    "vfio.conf: `{user} soft memlock {kib}` and `{user} hard memlock {kib}` (KiB, or unlimited); "
    "a systemd service: LimitMEMLOCK={size} in its unit; a shell: `ulimit -l {kib}` (as root, "
    "before dropping to the user); a running process: `prlimit --pid PID --memlock={bytes}`"
)


def memlock_notes(root: str, owner: Owner, need: int | None) -> tuple[list[str], bool]:
    """Notes on the locked memory `owner` needs, and whether what is known is too small for
    `need` bytes (the guest RAM it will map; None: unknown, only the rule is stated)."""
    login = login_memlock(root, owner)
    default = kernel_default(root)
    have = login.soft if login.soft is not None else default
    source = (f"pam_limits gives {owner.user}'s login sessions {human(login.soft)} ({login.where})"
              if login.soft is not None else
              f"no memlock line for {owner.user} in /etc/security/limits.conf or limits.d, so its "
              f"processes have what they inherit, the kernel's default {human(default)} unless "
              "something raised it")
    notes = [f"{owner.user} must be allowed to lock as much memory as it maps for DMA (a VM: all of its "
             f"RAM, QEMU's -m, plus a few MiB); {source}; `ulimit -l` in its shell shows its own"]
    too_small = need is not None and have != UNLIMITED and have < need
    if too_small:
        assert need is not None
        kib = -(-need // 1024)
        notes.append(f"{human(have)} is less than the {human(need)} asked for with --memlock: "
                     + HOW_TO_RAISE.format(user=owner.user, kib=kib, size=need, bytes=need))
    elif need is None:
        notes.append("give --memlock SIZE (the guest's RAM) to have it checked")
    return notes, too_small
