"""Run a function over parts of a list in forked processes, one per CPU, and gather the results.

A listing of thousands of functions (a host full of SR-IOV virtual functions) spends
its time in system calls and in decoding, both per device and independent: with the
devices split among processes it takes about 1/N of the time on N idle CPUs (threads
would not: each system call hands the GIL over). Results come back through a pipe as
`marshal` data, so they are limited to marshal's types (the JSON documents are).

Only for a program that holds no threads of its own (fork copies just the caller),
such as the `pcipass` command. A part whose process fails or dies is simply done
again here, in the caller, where any exception it raises is raised as usual.
"""

from __future__ import annotations

import marshal
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# Below this many items per process, forking costs more than it saves.
MIN_PER_PROCESS = 512


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def processes_for(count: int, cpus: int | None = None) -> int:
    """How many processes a listing of `count` items is worth: one per CPU, each with
    at least MIN_PER_PROCESS items."""
    return max(1, min(available_cpus() if cpus is None else cpus, count // MIN_PER_PROCESS))


def fan_out(func: Callable[[Sequence[T]], list[Any]], items: Sequence[T], processes: int) -> list[Any]:
    """func(part) for `processes` contiguous parts of `items`, concatenated in order."""
    if processes <= 1 or len(items) < 2:
        return func(items)
    step = -(-len(items) // processes)
    parts = [items[i : i + step] for i in range(0, len(items), step)]
    children = [_start(func, part) for part in parts[1:]]
    results = func(parts[0])
    for (pid, read_fd), part in zip(children, parts[1:]):
        results += _collect(pid, read_fd, func, part)
    return results


def _start(func: Callable[[Sequence[T]], list[Any]], part: Sequence[T]) -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, write, and leave without running the parent's cleanup
        status = 1
        try:
            os.close(read_fd)
            data = memoryview(marshal.dumps(func(part)))
            while data:
                data = data[os.write(write_fd, data) :]
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    return pid, read_fd


def _collect(pid: int, read_fd: int, func: Callable[[Sequence[T]], list[Any]], part: Sequence[T]) -> list[Any]:
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(1 << 20):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        try:
            result = marshal.loads(b"".join(chunks))
        except (EOFError, ValueError, TypeError):
            pass
        else:
            if isinstance(result, list):
                return result
    return func(part)  # the child failed: do its part here, raising what it raises
