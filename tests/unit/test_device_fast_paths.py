"""The hot paths of pcipass.device (register access, interrupt wait) keep their guarantees:
every access exactly one load or store of its width, every bad access refused by name."""

from __future__ import annotations

import time

import pytest

from pcipass.device import EventFd, MappedWindow, SharedMemory


@pytest.fixture
def window():
    mem = SharedMemory(4096)
    yield mem.window, mem.map
    mem.close()


def test_each_width_reads_and_writes_exactly_its_bytes(window):
    win, raw = window
    raw[0:8] = bytes(range(1, 9))
    assert [win.read(0, w) for w in (1, 2, 4, 8)] == [
        int.from_bytes(bytes(range(1, 1 + w)), "little") for w in (1, 2, 4, 8)]
    for width in (1, 2, 4, 8):
        raw[16:32] = b"\xee" * 16
        win.write(16 + width, width, 0)
        assert raw[16:32] == b"\xee" * width + b"\0" * width + b"\xee" * (16 - 2 * width)


def test_too_wide_and_negative_values_are_cut_to_the_width(window):
    win, raw = window
    win.write(8, 2, 0x123456)
    assert raw[8:10] == b"\x56\x34" and win.read(8, 2) == 0x3456
    win.write(12, 4, -1)
    assert win.read(12, 4) == 0xFFFFFFFF


@pytest.mark.parametrize("offset, width, words", [
    (4096, 4, "outside"), (4, 8, "not aligned"), (4092, 8, "outside"), (-4, 4, "outside"),
    (2, 4, "not aligned"), (0, 3, "width 3"), (0, 0, "width 0"), (0, 16, "width 16"),
])
def test_bad_accesses_are_refused_with_the_reason(window, offset, width, words):
    win, _ = window
    with pytest.raises(ValueError, match=words):
        win.read(offset, width)
    with pytest.raises(ValueError, match=words):
        win.write(offset, width, 0)


def test_a_window_whose_size_is_not_a_multiple_of_eight():
    win = MappedWindow(memoryview(bytearray(12)), "odd")
    win.write(8, 4, 0xAABBCCDD)
    assert win.read(8, 4) == 0xAABBCCDD
    with pytest.raises(ValueError, match="outside"):
        win.read(8, 8)


def test_wait_returns_a_count_already_there_without_blocking():
    with EventFd() as efd:
        efd.signal(3)
        assert efd.wait(5.0) == 3
        t0 = time.monotonic()
        assert efd.wait(0.05) == 0  # nothing left: waits out the timeout
        assert time.monotonic() - t0 >= 0.04
        efd.signal()
        assert efd.wait(None) == 1
    assert efd.fd == -1
