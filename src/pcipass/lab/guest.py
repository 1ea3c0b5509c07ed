"""Runs inside the lab guest, around the user's command: says when the guest is up, runs it.

The host passes the wall-clock time at which it started the boot, so the line
below tells how long boot-to-command took end to end (QEMU, firmware, kernel,
virtme-ng's init) as well as the kernel's own uptime.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

GUEST_ENV = {
    "PCIPASS_LAB_GUEST": "1",  # lab tests and the pytest plugin look for this
    "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is read-only in here
    "PYTHONUNBUFFERED": "1",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcipass.lab.guest")
    parser.add_argument("--topology", required=True)
    parser.add_argument("--kernel", default="debian", help="which lab kernel this is (debian, "
                        "or a name of pcipass.lab.kbuild)")
    parser.add_argument("--host-start", type=float, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    release = os.uname().release
    print(f"lab: guest up ({release}, topology {args.topology}) {time.time() - args.host_start:.1f} s "
          f"after the host started it; kernel uptime {uptime:.1f} s", file=sys.stderr, flush=True)
    env = dict(os.environ, PCIPASS_LAB_TOPOLOGY=args.topology, PCIPASS_LAB_KERNEL_NAME=args.kernel,
               **GUEST_ENV)
    # The host's PATH lost its pyenv/venv parts on the way in: put our Python's first.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    try:
        return subprocess.call(command, env=env)
    except FileNotFoundError:
        print(f"lab: {command[0]}: command not found in the guest", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(main())
