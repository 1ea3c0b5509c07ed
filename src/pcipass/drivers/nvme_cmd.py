"""NVMe commands: submission and completion entries, opcodes, Identify data.

Entries are little-endian structures in host memory that the controller reads
and writes by DMA; they are packed here with `struct` and nowhere else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pcipass.drivers.nvme_status import Status

# Submission Queue Entry (64 bytes): CDW0 (opcode, flags, command ID), NSID,
# CDW2-3, MPTR, PRP1, PRP2 (the data pointer), CDW10-15.
SQE = struct.Struct("<BBHI8xQQQ6I")
# Completion Queue Entry (16 bytes): DW0 (command specific), DW1, SQ head,
# SQ ID, command ID, status field with the phase tag in bit 0.
CQE = struct.Struct("<IIHHHH")
SQE_SIZE = SQE.size  # 64 = 2 ** 6 (CC.IOSQES)
CQE_SIZE = CQE.size  # 16 = 2 ** 4 (CC.IOCQES)
assert SQE_SIZE == 64 and CQE_SIZE == 16

# Admin command set opcodes.
nvme_admin_delete_sq = 0x00
nvme_admin_create_sq = 0x01
nvme_admin_get_log_page = 0x02
nvme_admin_delete_cq = 0x04
nvme_admin_create_cq = 0x05
nvme_admin_identify = 0x06
nvme_admin_set_features = 0x09
nvme_admin_get_features = 0x0A

# NVM command set opcodes.
nvme_cmd_flush = 0x00
nvme_cmd_write = 0x01
nvme_cmd_read = 0x02

# Identify CNS values.
NVME_ID_CNS_NS = 0x00
NVME_ID_CNS_CTRL = 0x01
NVME_ID_CNS_NS_ACTIVE_LIST = 0x02
IDENTIFY_SIZE = 4096

# Feature identifiers.
NVME_FEAT_NUM_QUEUES = 0x07

# Create I/O queue flags (CDW11).
NVME_QUEUE_PHYS_CONTIG = 1 << 0
NVME_CQ_IRQ_ENABLED = 1 << 1


@dataclass(frozen=True)
class Command:
    """A submission entry before it gets its command ID."""

    opcode: int
    nsid: int = 0
    prp1: int = 0
    prp2: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0
    name: str = "command"  # for error messages

    def pack(self, cid: int) -> bytes:
        # flags = 0: not fused, PRPs (not SGLs) describe the data.
        return SQE.pack(
            self.opcode, 0, cid, self.nsid, 0, self.prp1, self.prp2,
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        )  # fmt: skip


@dataclass(frozen=True)
class Completion:
    result: int  # DW0, command specific
    sq_head: int
    sq_id: int
    cid: int
    phase: int
    status: Status

    @classmethod
    def unpack(cls, entry: bytes) -> Completion:
        dw0, _dw1, sq_head, sq_id, cid, sf = CQE.unpack(entry)
        return cls(dw0, sq_head, sq_id, cid, sf & 1, Status.decode(sf >> 1))


# Builders for the commands this driver issues.


def identify(cns: int, prp1: int, *, nsid: int = 0) -> Command:
    names = {NVME_ID_CNS_CTRL: "Identify Controller", NVME_ID_CNS_NS: f"Identify Namespace {nsid}"}
    return Command(nvme_admin_identify, nsid=nsid, prp1=prp1, cdw10=cns,
                   name=names.get(cns, f"Identify (CNS {cns:#x})"))  # fmt: skip


def set_num_queues(nsq: int, ncq: int) -> Command:
    # Both counts are 0's based: NSQR in bits 15:0, NCQR in bits 31:16.
    return Command(nvme_admin_set_features, cdw10=NVME_FEAT_NUM_QUEUES,
                   cdw11=((ncq - 1) << 16) | (nsq - 1), name="Set Features (Number of Queues)")  # fmt: skip


def granted_queues(result: int) -> tuple[int, int]:
    """(submission, completion) queues allocated, from Set Features' DW0 (0's based)."""
    return (result & 0xFFFF) + 1, (result >> 16) + 1


def create_cq(qid: int, entries: int, prp1: int, vector: int | None) -> Command:
    flags = NVME_QUEUE_PHYS_CONTIG | (NVME_CQ_IRQ_ENABLED if vector is not None else 0)
    return Command(nvme_admin_create_cq, prp1=prp1, cdw10=((entries - 1) << 16) | qid,
                   cdw11=((vector or 0) << 16) | flags, name=f"Create I/O Completion Queue {qid}")  # fmt: skip


def create_sq(qid: int, entries: int, prp1: int, cqid: int) -> Command:
    return Command(nvme_admin_create_sq, prp1=prp1, cdw10=((entries - 1) << 16) | qid,
                   cdw11=(cqid << 16) | NVME_QUEUE_PHYS_CONTIG, name=f"Create I/O Submission Queue {qid}")  # fmt: skip


def delete_sq(qid: int) -> Command:
    return Command(nvme_admin_delete_sq, cdw10=qid, name=f"Delete I/O Submission Queue {qid}")


def delete_cq(qid: int) -> Command:
    return Command(nvme_admin_delete_cq, cdw10=qid, name=f"Delete I/O Completion Queue {qid}")


def read_write(opcode: int, nsid: int, slba: int, nblocks: int, prp1: int, prp2: int) -> Command:
    # SLBA is 64 bits over CDW10 (low) and CDW11 (high); NLB (CDW12 15:0) is 0's based.
    name = {nvme_cmd_read: "Read", nvme_cmd_write: "Write"}[opcode]
    return Command(opcode, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF,
                   cdw11=slba >> 32, cdw12=nblocks - 1, name=f"{name} LBA {slba}+{nblocks}")  # fmt: skip


# Identify data.


def _ascii(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip(" \0")


@dataclass(frozen=True)
class IdController:
    vid: int
    ssvid: int
    serial: str
    model: str
    firmware: str
    mdts: int  # max data transfer = 2 ** mdts units of CAP.MPSMIN; 0: no limit
    cntlid: int
    version: int
    sqes: int  # required (low nibble) and maximum (high nibble) log2 SQ entry size
    cqes: int
    nn: int  # number of namespaces

    @classmethod
    def parse(cls, data: bytes) -> IdController:
        if len(data) < IDENTIFY_SIZE:
            raise ValueError(f"Identify Controller data is {len(data)} bytes, not {IDENTIFY_SIZE}")
        vid, ssvid = struct.unpack_from("<HH", data, 0)
        (cntlid,) = struct.unpack_from("<H", data, 78)
        (version,) = struct.unpack_from("<I", data, 80)
        sqes, cqes = data[512], data[513]
        (nn,) = struct.unpack_from("<I", data, 516)
        return cls(
            vid=vid, ssvid=ssvid, serial=_ascii(data[4:24]), model=_ascii(data[24:64]),
            firmware=_ascii(data[64:72]), mdts=data[77], cntlid=cntlid, version=version,
            sqes=sqes, cqes=cqes, nn=nn,
        )  # fmt: skip

    def max_transfer(self, mpsmin: int) -> int | None:
        """Largest transfer in bytes, or None when MDTS says there is no limit."""
        return mpsmin << self.mdts if self.mdts else None


@dataclass(frozen=True)
class LbaFormat:
    metadata_size: int  # MS
    block_size: int  # 2 ** LBADS
    relative_performance: int  # RP


@dataclass(frozen=True)
class IdNamespace:
    nsze: int  # size in blocks
    ncap: int
    nuse: int
    flbas: int
    lba_formats: tuple[LbaFormat, ...]

    @classmethod
    def parse(cls, data: bytes) -> IdNamespace:
        if len(data) < IDENTIFY_SIZE:
            raise ValueError(f"Identify Namespace data is {len(data)} bytes, not {IDENTIFY_SIZE}")
        nsze, ncap, nuse = struct.unpack_from("<QQQ", data, 0)
        nlbaf, flbas = data[25], data[26]  # NLBAF is 0's based
        formats = []
        for i in range(nlbaf + 1):
            (lbaf,) = struct.unpack_from("<I", data, 128 + 4 * i)
            lbads = (lbaf >> 16) & 0xFF
            formats.append(LbaFormat(lbaf & 0xFFFF, 1 << lbads if lbads else 0, (lbaf >> 24) & 0x3))
        return cls(nsze, ncap, nuse, flbas, tuple(formats))

    @property
    def lba_format(self) -> LbaFormat:
        # FLBAS bits 3:0 pick the format in use (bits 6:5 extend it past 16 formats).
        index = (self.flbas & 0xF) | (((self.flbas >> 5) & 0x3) << 4)
        if index >= len(self.lba_formats):
            raise ValueError(
                f"FLBAS picks LBA format {index}, but only {len(self.lba_formats)} exist"
            )
        return self.lba_formats[index]

    @property
    def block_size(self) -> int:
        return self.lba_format.block_size

    @property
    def size_bytes(self) -> int:
        return self.nsze * self.block_size
