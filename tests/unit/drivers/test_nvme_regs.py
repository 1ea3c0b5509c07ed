"""NVMe register decoding: CAP, VS, CC, AQA and the doorbell stride."""

from __future__ import annotations

import pytest

from pcipass.drivers.nvme_regs import (
    Cap,
    aqa_value,
    cc_value,
    cq_head_doorbell,
    sq_tail_doorbell,
    version_string,
)


def test_cap_decode() -> None:
    # MQES 0x7ff, CQR, TO 0x0f, DSTRD 2, CSS bit 37 (NVM), MPSMIN 0, MPSMAX 4.
    cap = 0x7FF | 1 << 16 | 0x0F << 24 | 2 << 32 | 1 << 37 | 0 << 48 | 4 << 52
    decoded = Cap.decode(cap)
    assert decoded.mqes == 2048  # the register is 0's based
    assert decoded.cqr is True
    assert decoded.timeout_s == 7.5  # 15 units of 500 ms
    assert decoded.dstrd == 2
    assert decoded.css == 1
    assert (decoded.mpsmin, decoded.mpsmax) == (4096, 65536)


@pytest.mark.parametrize(
    "dstrd, sq0, cq0, sq1, cq1",
    [
        (0, 0x1000, 0x1004, 0x1008, 0x100C),
        (1, 0x1000, 0x1008, 0x1010, 0x1018),
        (4, 0x1000, 0x1040, 0x1080, 0x10C0),
    ],
)
def test_doorbells_follow_the_stride(dstrd: int, sq0: int, cq0: int, sq1: int, cq1: int) -> None:
    assert sq_tail_doorbell(0, dstrd) == sq0
    assert cq_head_doorbell(0, dstrd) == cq0
    assert sq_tail_doorbell(1, dstrd) == sq1
    assert cq_head_doorbell(1, dstrd) == cq1


def test_cc_value_sets_entry_sizes_and_page_size() -> None:
    cc = cc_value(4096)
    assert cc & 1 == 0  # not enabled yet
    assert (cc >> 7) & 0xF == 0  # MPS: 4 KiB
    assert (cc >> 16) & 0xF == 6 and (cc >> 20) & 0xF == 4  # 64-byte SQEs, 16-byte CQEs
    assert (cc >> 4) & 0x7 == 0 and (cc >> 11) & 0x7 == 0  # NVM command set, round robin
    assert (cc_value(65536) >> 7) & 0xF == 4


def test_aqa_is_zeros_based() -> None:
    assert aqa_value(32, 16) == (15 << 16) | 31


def test_version_string() -> None:
    assert version_string(0x00010400) == "1.4"
    assert version_string(0x00020001) == "2.0.1"
