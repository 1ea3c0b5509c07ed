"""NVMe controller registers (BAR0), as the NVMe base specification lays them out.

Offsets and bit fields only; the driver in `nvme.py` decides what to do with
them. Names follow the specification (and Linux's `include/linux/nvme.h`).
"""

from __future__ import annotations

from dataclasses import dataclass

# Register offsets in BAR0.
NVME_REG_CAP = 0x00  # Controller Capabilities (64 bits)
NVME_REG_VS = 0x08  # Version
NVME_REG_INTMS = 0x0C  # Interrupt Mask Set (pin-based and MSI only)
NVME_REG_INTMC = 0x10  # Interrupt Mask Clear
NVME_REG_CC = 0x14  # Controller Configuration
NVME_REG_CSTS = 0x1C  # Controller Status
NVME_REG_AQA = 0x24  # Admin Queue Attributes
NVME_REG_ASQ = 0x28  # Admin Submission Queue base (64 bits)
NVME_REG_ACQ = 0x30  # Admin Completion Queue base (64 bits)
NVME_REG_DBS = 0x1000  # first doorbell

# CC: Controller Configuration.
NVME_CC_ENABLE = 1 << 0
NVME_CC_CSS_SHIFT = 4  # I/O command set selected: 0 = NVM
NVME_CC_MPS_SHIFT = 7  # memory page size = 2 ** (12 + MPS)
NVME_CC_AMS_SHIFT = 11  # arbitration: 0 = round robin
NVME_CC_SHN_SHIFT = 14
NVME_CC_SHN_MASK = 0b11 << NVME_CC_SHN_SHIFT
NVME_CC_SHN_NORMAL = 0b01 << NVME_CC_SHN_SHIFT
NVME_CC_IOSQES_SHIFT = 16  # log2 of the I/O submission queue entry size
NVME_CC_IOCQES_SHIFT = 20  # log2 of the I/O completion queue entry size

# CSTS: Controller Status.
NVME_CSTS_RDY = 1 << 0
NVME_CSTS_CFS = 1 << 1  # controller fatal status
NVME_CSTS_SHST_SHIFT = 2
NVME_CSTS_SHST_MASK = 0b11 << NVME_CSTS_SHST_SHIFT
NVME_CSTS_SHST_OCCUR = 0b01 << NVME_CSTS_SHST_SHIFT
NVME_CSTS_SHST_CMPLT = 0b10 << NVME_CSTS_SHST_SHIFT

# The timeout unit of CAP.TO.
CAP_TO_UNIT_S = 0.5


def _bits(value: int, low: int, high: int) -> int:
    return (value >> low) & ((1 << (high - low + 1)) - 1)


@dataclass(frozen=True)
class Cap:
    """CAP decoded. Sizes are converted from the specification's encodings."""

    mqes: int  # maximum queue entries supported, as a count (the register is 0's based)
    cqr: bool  # queues must be physically contiguous
    timeout_s: float  # worst case time to flip CSTS.RDY (CAP.TO in seconds)
    dstrd: int  # doorbell stride: doorbells are (4 << dstrd) bytes apart
    css: int  # command sets supported (bit 0: NVM)
    mpsmin: int  # smallest memory page size, in bytes
    mpsmax: int  # largest memory page size, in bytes
    raw: int

    @classmethod
    def decode(cls, cap: int) -> Cap:
        return cls(
            mqes=_bits(cap, 0, 15) + 1,
            cqr=bool(_bits(cap, 16, 16)),
            timeout_s=_bits(cap, 24, 31) * CAP_TO_UNIT_S,
            dstrd=_bits(cap, 32, 35),
            css=_bits(cap, 37, 44),
            mpsmin=1 << (12 + _bits(cap, 48, 51)),
            mpsmax=1 << (12 + _bits(cap, 52, 55)),
            raw=cap,
        )


def version_string(vs: int) -> str:
    """VS as "major.minor[.tertiary]"."""
    major, minor, ter = vs >> 16, (vs >> 8) & 0xFF, vs & 0xFF
    return f"{major}.{minor}.{ter}" if ter else f"{major}.{minor}"


def cc_value(page_size: int, *, iosqes: int = 6, iocqes: int = 4) -> int:
    """CC for an NVM controller with round robin arbitration, not yet enabled."""
    mps = page_size.bit_length() - 1 - 12
    return (
        (0 << NVME_CC_CSS_SHIFT)
        | (mps << NVME_CC_MPS_SHIFT)
        | (0 << NVME_CC_AMS_SHIFT)
        | (iosqes << NVME_CC_IOSQES_SHIFT)
        | (iocqes << NVME_CC_IOCQES_SHIFT)
    )


def aqa_value(sq_entries: int, cq_entries: int) -> int:
    """AQA: admin queue sizes, 0's based (ASQS in bits 11:0, ACQS in bits 27:16)."""
    return ((cq_entries - 1) << 16) | (sq_entries - 1)


def sq_tail_doorbell(qid: int, dstrd: int) -> int:
    """BAR0 offset of submission queue `qid`'s tail doorbell."""
    return NVME_REG_DBS + (2 * qid) * (4 << dstrd)


def cq_head_doorbell(qid: int, dstrd: int) -> int:
    """BAR0 offset of completion queue `qid`'s head doorbell."""
    return NVME_REG_DBS + (2 * qid + 1) * (4 << dstrd)
