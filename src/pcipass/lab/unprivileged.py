"""Run pcipass as an unprivileged user inside the lab (the driver-domain frontend).

The host's Python may live where such a user cannot reach it (pyenv under
/root, mode 0700, on a read-only share), so the unprivileged side runs on
Debian's /usr/bin/python3 with this checkout's src on its path: pcipass needs
only the standard library. setpriv drops every id, group and capability.
"""

from __future__ import annotations

import os
import pwd

import pcipass

SYSTEM_PYTHON = "/usr/bin/python3"
SRC = os.path.dirname(os.path.dirname(pcipass.__file__))


def command(user: str, *python_args: str) -> list[str]:
    """argv that runs `python3 *python_args` as `user` with no privilege left."""
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
            "--inh-caps=-all", SYSTEM_PYTHON, *python_args]


def environment() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/nonexistent"}
