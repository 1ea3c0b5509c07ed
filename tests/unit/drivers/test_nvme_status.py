"""Completion entries and their status field, decoded into words."""

from __future__ import annotations

import struct

from pcipass.drivers.nvme_cmd import Command, Completion, granted_queues, read_write, set_num_queues
from pcipass.drivers.nvme_status import NvmeCommandError, Status
from pcipass.errors import PcipassError


def cqe(dw0: int, sq_head: int, sq_id: int, cid: int, status_with_phase: int) -> bytes:
    return dw0.to_bytes(4, "little") + bytes(4) + sq_head.to_bytes(2, "little") + \
        sq_id.to_bytes(2, "little") + cid.to_bytes(2, "little") + status_with_phase.to_bytes(2, "little")  # fmt: skip


def test_status_field_bits() -> None:
    # DNR (14), M (13), CRD 2 (12:11), SCT 2 (10:8), SC 0x81 (7:0).
    status = Status.decode(1 << 14 | 1 << 13 | 2 << 11 | 2 << 8 | 0x81)
    assert (status.sc, status.sct, status.crd, status.more, status.dnr) == (0x81, 2, 2, True, True)
    assert not status.ok
    assert status.describe() == "unrecovered read error (SCT 0x2, SC 0x81, do not retry)"


def test_completion_unpacks_phase_and_status() -> None:
    # Phase 1 and "invalid field in command" (SCT 0, SC 2), DNR set.
    completion = Completion.unpack(cqe(0x00070007, 5, 1, 0xBEEF, (1 << 14 | 0x02) << 1 | 1))
    fields = (completion.result, completion.sq_head, completion.sq_id, completion.cid)
    assert fields == (0x70007, 5, 1, 0xBEEF)
    assert completion.phase == 1
    assert completion.status.sc == 2 and completion.status.dnr
    assert Completion.unpack(cqe(0, 0, 0, 0, 0)).status.ok


def test_command_specific_and_unknown_codes() -> None:
    assert Status.decode(1 << 8 | 0x08).describe().startswith("invalid interrupt vector")
    unknown = Status.decode(7 << 8 | 0xC0)
    assert unknown.describe().startswith("unknown status (vendor specific)")
    assert "NVMe base specification" in unknown.hint()


def test_error_names_the_command_and_says_what_to_do() -> None:
    error = NvmeCommandError("Write LBA 9+1", "0000:03:00.0", Status.decode(0x80))
    assert isinstance(error, PcipassError) and error.code == "nvme-status"
    assert (
        error.message
        == "0000:03:00.0: NVMe Write LBA 9+1 failed: LBA out of range (SCT 0x0, SC 0x80)"
    )
    assert error.hint is not None and "namespace's end" in error.hint


def test_submission_entry_layout() -> None:
    entry = read_write(0x01, nsid=1, slba=0x1_2345_6789, nblocks=8, prp1=0x1000, prp2=0x2000).pack(
        cid=0x42
    )
    assert len(entry) == 64
    opcode, flags, cid, nsid = struct.unpack_from("<BBHI", entry, 0)
    assert (opcode, flags, cid, nsid) == (0x01, 0, 0x42, 1)
    assert struct.unpack_from("<QQ", entry, 24) == (0x1000, 0x2000)  # PRP1, PRP2
    cdw10, cdw11, cdw12 = struct.unpack_from("<III", entry, 40)
    assert (cdw10, cdw11, cdw12) == (0x23456789, 0x1, 7)  # NLB is 0's based
    assert entry[8:24] == bytes(16)  # CDW2-3 and MPTR unused


def test_number_of_queues_is_zeros_based_both_ways() -> None:
    command = set_num_queues(nsq=1, ncq=1)
    assert isinstance(command, Command) and (command.cdw10, command.cdw11) == (0x07, 0)
    assert granted_queues(0x003F_0007) == (8, 64)
