"""A test hook read from the environment: PCIPASS_CRASH_AT_STEP=N kills the claiming process
at step N, so the tests can interrupt a claim or release anywhere and recover from it.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "PCIPASS_CRASH_AT_STEP"


def crash_at_step(n: int) -> None:
    """Test hook: PCIPASS_CRASH_AT_STEP=N kills this process with SIGKILL right after
    step N was carried out and before the journal says so (N=0: after the journal
    is first written, before any change)."""
    if os.environ.get(CRASH_ENV) == str(n):
        os.kill(os.getpid(), signal.SIGKILL)
