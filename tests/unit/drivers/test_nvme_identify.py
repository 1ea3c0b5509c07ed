"""Identify data parsed from bytes recorded in the lab (QEMU 7.2's NVMe controller).

Recorded by running the driver inside the lab VM against `-device nvme,serial=PCIPASS0001`
with a 64 MiB drive, and keeping the non-zero bytes: (offset, hex) pieces.
"""

from __future__ import annotations

import pytest

from pcipass.drivers.nvme_cmd import IdController, IdNamespace, LbaFormat
from pcipass.drivers.nvme_regs import Cap, version_string

QEMU_CAP = 0x4018200F0107FF
QEMU_VS = 0x10400
QEMU_ID_CTRL = [
    (0, "361bf41a"),  # VID, SSVID
    (4, "5043495041535330303031202020202020202020"),  # SN
    (24, "51454d55204e564d65204374726c2020202020202020202020202020202020202020202020202020"),  # MN
    (64, "372e322e32322020"),  # FR
    (72, "06"),  # RAB
    (74, "5452"),
    (77, "07"),  # MDTS
    (81, "0401"),  # VER 1.4
    (93, "01"),
    (97, "80"),
    (111, "01"),
    (256, "0a0103030307"),
    (266, "57017501"),
    (512, "6644"),  # SQES, CQES
    (517, "01"),  # NN = 256
    (520, "5d01"),
    (525, "07"),
    (534, "03"),
    (536, "01"),
    (768, "6e716e2e323031392d30382e6f72672e71656d753a5043495041535330303031"),  # SUBNQN
    (2048, "c409"),
    (2052, "10"),
    (2056, "04"),
]
QEMU_ID_NS = [
    (2, "02"),  # NSZE = 0x20000 blocks
    (10, "02"),  # NCAP
    (18, "02"),  # NUSE
    (24, "1407"),  # NSFEAT, NLBAF = 7 (eight formats), FLBAS = 0
    (27, "031f"),
    (33, "01"),
    (68, "07"),
    (70, "07"),
    (130, "09"),  # LBAF0: 512-byte blocks, no metadata
    (132, "080009"),
    (136, "100009"),
    (140, "400009"),
    (146, "0c"),  # LBAF4: 4 KiB blocks
    (148, "08000c"),
    (152, "10000c"),
    (156, "40000c"),
]


def assemble(pieces: list[tuple[int, str]]) -> bytes:
    data = bytearray(4096)
    for offset, hexes in pieces:
        raw = bytes.fromhex(hexes)
        data[offset : offset + len(raw)] = raw
    return bytes(data)


def test_identify_controller_from_qemu() -> None:
    ctrl = IdController.parse(assemble(QEMU_ID_CTRL))
    assert (ctrl.vid, ctrl.ssvid) == (0x1B36, 0x1AF4)
    assert ctrl.serial == "PCIPASS0001"  # the serial= given on QEMU's command line
    assert ctrl.model == "QEMU NVMe Ctrl"
    assert ctrl.firmware == "7.2.22"
    assert ctrl.mdts == 7 and ctrl.max_transfer(4096) == 512 * 1024
    assert version_string(ctrl.version) == "1.4"
    assert (ctrl.sqes, ctrl.cqes, ctrl.nn) == (0x66, 0x44, 256)


def test_identify_namespace_from_qemu() -> None:
    ns = IdNamespace.parse(assemble(QEMU_ID_NS))
    assert (ns.nsze, ns.ncap, ns.nuse) == (0x20000, 0x20000, 0x20000)
    assert ns.block_size == 512 and ns.size_bytes == 64 << 20
    assert len(ns.lba_formats) == 8
    assert ns.lba_formats[0] == LbaFormat(metadata_size=0, block_size=512, relative_performance=0)
    assert ns.lba_formats[3] == LbaFormat(metadata_size=64, block_size=512, relative_performance=0)
    assert ns.lba_formats[4].block_size == 4096 and ns.lba_formats[7].metadata_size == 64


def test_formatted_lba_format_is_the_one_in_use() -> None:
    data = bytearray(assemble(QEMU_ID_NS))
    data[26] = 4  # FLBAS: the 4 KiB format
    ns = IdNamespace.parse(bytes(data))
    assert ns.block_size == 4096 and ns.size_bytes == 0x20000 * 4096


def test_flbas_past_the_formats_is_refused() -> None:
    data = bytearray(assemble(QEMU_ID_NS))
    data[26] = 9
    with pytest.raises(ValueError, match="LBA format 9, but only 8 exist"):
        _ = IdNamespace.parse(bytes(data)).block_size


def test_inactive_namespace_is_all_zeros() -> None:
    ns = IdNamespace.parse(bytes(4096))
    assert ns.nsze == 0 and ns.size_bytes == 0


def test_qemu_cap() -> None:
    cap = Cap.decode(QEMU_CAP)
    assert cap.mqes == 2048 and cap.cqr and cap.timeout_s == 7.5 and cap.dstrd == 0
    assert cap.css & 1  # the NVM command set
    assert (cap.mpsmin, cap.mpsmax) == (4096, 65536)
    assert version_string(QEMU_VS) == "1.4"


def test_short_data_is_refused() -> None:
    with pytest.raises(ValueError, match="not 4096"):
        IdController.parse(bytes(100))
    with pytest.raises(ValueError, match="not 4096"):
        IdNamespace.parse(bytes(100))
