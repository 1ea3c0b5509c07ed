"""Turn SIGTERM and SIGHUP into KeyboardInterrupt while something must be undone on the way out.

A claim in progress, or a lab guest running, then unwinds through its `finally`
blocks as on Ctrl-C. SIGKILL cannot be caught: that is what claim's journal and
`pcipass recover` are for.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
