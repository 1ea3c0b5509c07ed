"""The NVMe driver end to end against pcipass.models.nvme, a controller modelled from the
specification, over each Device implementation (the `serve` fixture, conftest)."""

from __future__ import annotations

import os

import pytest

from pcipass.drivers.nvme import NvmeController
from pcipass.drivers.nvme_status import NvmeCommandError
from pcipass.errors import PcipassError
from pcipass.models.nvme import Nvme


def opcodes(fake: Nvme, qid: int) -> list[int]:
    return [op for q, op, _ in fake.log.commands if q == qid]


def nvme_on(serve, **knobs):  # type: ignore[no-untyped-def]
    """(the served model, the model, a Device on it)."""
    served = serve(Nvme(**knobs))
    return served, served.model, served.open()


def test_bring_up_identifies_and_creates_one_io_queue_pair_on_vector_1(serve) -> None:
    served, fake, dev = nvme_on(serve, serial="PCIPASS0001", model="QEMU NVMe Ctrl", firmware="7.2.5", mdts=7)
    with NvmeController(dev, max_transfer=1 << 20) as nvme:
        assert nvme.id_ctrl is not None and nvme.namespace is not None
        assert (nvme.id_ctrl.serial, nvme.id_ctrl.model, nvme.id_ctrl.firmware) == (
            "PCIPASS0001", "QEMU NVMe Ctrl", "7.2.5",
        )  # fmt: skip
        assert nvme.namespace.nsze == 256 and nvme.block_size == 4096
        # 1 MiB asked for, but MDTS 7 (in units of CAP.MPSMIN) allows only 512 KiB.
        assert nvme.max_transfer == 4096 << 7
        assert nvme.interrupt_mode == "MSI-X"
        assert dev.config_read(0x04, 2) & 0b110 == 0b110  # memory decoding and bus master
        # Identify Controller, Set Features, Create CQ, Create SQ, Identify Namespace.
        assert opcodes(fake, 0) == [0x06, 0x09, 0x05, 0x01, 0x06]
        assert fake.cqs[1].vector == 1 and fake.sqs[1].cqid == 1
        assert nvme.describe()["serial"] == "PCIPASS0001"


def test_write_then_read_back_across_prp_forms(serve) -> None:
    served, fake, dev = nvme_on(serve, blocks=1200, block_size=512)
    with NvmeController(dev, max_transfer=2 * 1024 * 1024) as nvme:
        # 1 block (PRP1 only), 8 blocks = 1 page, 16 = 2 pages (PRP2 is data),
        # 64 = 8 pages (PRP2 points to a list), 1100 blocks = 138 pages.
        for lba, count in [(0, 1), (1, 8), (9, 16), (25, 64), (89, 1100)]:
            data = os.urandom(count * 512)
            nvme.write(lba, data)
            assert fake.storage[lba * 512 : (lba + count) * 512] == data
            assert nvme.read(lba, count) == data
        assert nvme.io is not None and nvme.io.stats.by_polling == 0


def test_chained_prp_list_transfer(serve) -> None:
    served, fake, dev = nvme_on(serve, blocks=1100, block_size=4096)  # 1100 pages: a list of 3 pages
    with NvmeController(dev, max_transfer=1100 * 4096) as nvme:
        data = os.urandom(1100 * 4096)
        nvme.write(0, data)
        assert bytes(fake.storage) == data
        assert nvme.read(0, 1100) == data
        assert opcodes(fake, 1) == [0x01, 0x02]  # one command each way


def test_transfers_are_split_at_mdts(serve) -> None:
    served, fake, dev = nvme_on(serve, blocks=64, block_size=4096, mdts=2)  # 16 KiB per command
    with NvmeController(dev) as nvme:
        data = os.urandom(10 * 4096)
        nvme.write(3, data)
        assert nvme.read(3, 10) == data
        writes = [cdw10 for q, op, cdw10 in fake.log.commands if q == 1 and op == 0x01]
        assert writes == [3, 7, 11]  # SLBAs of the 4 + 4 + 2 block pieces


def test_queue_wraps_and_phase_flips_many_times(serve) -> None:
    served, fake, dev = nvme_on(serve, blocks=16, block_size=512)
    with NvmeController(dev, admin_entries=2, io_entries=3) as nvme:
        for i in range(20):
            data = bytes([i]) * 512
            nvme.write(i % 16, data)
            assert nvme.read(i % 16) == data
        assert nvme.io is not None
        assert nvme.io.stats.completed == 40 and nvme.io.stats.by_interrupt == 40
        assert fake.cqs[1].phase == nvme.io.phase  # both sides agree after 13 wraps


@pytest.mark.parametrize("dstrd", [0, 1, 3])
def test_doorbell_stride_is_honoured(serve, dstrd: int) -> None:
    served, fake, dev = nvme_on(serve, dstrd=dstrd)  # the fake asserts that doorbells sit on the stride
    with NvmeController(dev) as nvme:
        nvme.write(0, b"x" * 4096)
        assert nvme.read(0) == b"x" * 4096
    doorbells = {off for off, _, _ in fake.log.register_writes if off >= 0x1000}
    stride = 4 << dstrd
    assert doorbells == {0x1000, 0x1000 + stride, 0x1000 + 2 * stride, 0x1000 + 3 * stride}


def test_polling_when_interrupts_are_off_or_missing(serve) -> None:
    for knobs, kwargs, mode in [
        ({}, {"interrupts": False}, "polling (interrupts not requested)"),
        ({"msix_vectors": 1}, {}, "polling (the device has 1 MSI-X vectors, 2 needed)"),
    ]:
        served, fake, dev = nvme_on(serve, **knobs)
        with NvmeController(dev, **kwargs) as nvme:
            nvme.write(5, b"p" * 4096)
            assert nvme.read(5) == b"p" * 4096
            assert nvme.interrupt_mode == mode
            assert nvme.io is not None and nvme.io.stats.by_interrupt == 0
            assert nvme.io.stats.by_polling == 2
            assert fake.cqs[1].vector is None  # the CQ was created with interrupts off


def test_lost_interrupt_falls_back_to_polling(serve) -> None:
    served, fake, dev = nvme_on(serve, deliver_interrupts=False)
    with NvmeController(dev, timeout=2.0) as nvme:
        assert nvme.interrupt_mode == "MSI-X"
        nvme.write(0, b"q" * 4096)
        assert nvme.io is not None and nvme.io.stats.by_polling == 1


def test_error_status_becomes_a_readable_error(serve) -> None:
    served, fake, dev = nvme_on(serve)
    with NvmeController(dev) as nvme:
        fake.fail_next[0x02] = 0x2 << 8 | 0x81  # media error: unrecovered read error
        with pytest.raises(NvmeCommandError) as err:
            nvme.read(7, 1)
        assert "NVMe Read LBA 7+1 failed: unrecovered read error (SCT 0x2" in str(err.value)
        assert err.value.hint and "failing" in err.value.hint
        assert nvme.read(7, 1) == bytes(4096)  # the next command goes through


def test_device_side_range_error_is_decoded(serve) -> None:
    served, fake, dev = nvme_on(serve, blocks=8)
    with NvmeController(dev) as nvme:
        assert nvme.namespace is not None
        # Pretend the namespace is larger than it is, so the controller is the one to refuse.
        object.__setattr__(nvme.namespace, "nsze", 100)
        with pytest.raises(NvmeCommandError) as err:
            nvme.write(50, bytes(4096))
        assert err.value.status.sc == 0x80 and "LBA out of range" in err.value.message


def test_bad_input_is_refused_before_anything_is_sent(serve) -> None:
    served, fake, dev = nvme_on(serve, blocks=8)
    with NvmeController(dev) as nvme:
        before = len(fake.log.commands)
        with pytest.raises(PcipassError, match="outside namespace 1"):
            nvme.read(8)
        with pytest.raises(PcipassError, match="outside namespace 1"):
            nvme.read(0, 0)
        with pytest.raises(PcipassError, match="not a whole number of 4096-byte blocks") as err:
            nvme.write(0, b"short")
        assert err.value.hint and "truncate" in err.value.hint
        with pytest.raises(PcipassError, match="outside namespace 1"):
            nvme.write(7, bytes(8192))
        assert len(fake.log.commands) == before
        assert bytes(fake.storage) == bytes(len(fake.storage))


def test_inactive_namespace_identifies_but_refuses_io(serve) -> None:
    served, fake, dev = nvme_on(serve)
    with NvmeController(dev, nsid=2) as nvme:
        assert nvme.id_ctrl is not None
        with pytest.raises(PcipassError, match="namespace 2 is not active") as err:
            nvme.read(0)
        assert "--nsid" in str(err.value.hint)
        assert "blocks" not in nvme.describe()


def test_close_shuts_down_and_gives_everything_back(serve) -> None:
    served, fake, dev = nvme_on(serve)
    dev.config_write(0x04, 2, 0x0400)  # INTx disabled, nothing else: restored at close
    nvme = NvmeController(dev)
    nvme.write(0, b"z" * 4096)
    nvme.close()
    assert opcodes(fake, 0)[-2:] == [0x00, 0x04]  # Delete SQ, then Delete CQ
    cc_writes = [value for off, _, value in fake.log.register_writes if off == 0x14]
    assert (cc_writes[-2] >> 14) & 3 == 0b01  # CC.SHN = normal shutdown ...
    assert cc_writes[-1] & 1 == 0  # ... then disabled
    assert served.left() == ([], [])
    # Over vfio-user the server's policy never lets a client turn memory decode off (XSA-120):
    # the driver wrote 0x0400 back, the backend kept the memory bit.
    assert dev.config_read(0x04, 2) == (0x0402 if served.way == "vfio-user" else 0x0400)


def test_failed_bring_up_releases_everything(serve) -> None:
    served, fake, dev = nvme_on(serve)
    fake.fail_next[0x09] = 0x06  # Set Features answers "internal error"
    with pytest.raises(NvmeCommandError, match="Set Features"):
        NvmeController(dev)
    assert served.left() == ([], []) and fake.regs[0x14] & 1 == 0


def test_controller_that_never_gets_ready_times_out_with_a_hint(serve) -> None:
    served, fake, dev = nvme_on(serve)
    fake._cc_changed = lambda old, new: None  # type: ignore[method-assign]  # RDY never follows EN
    with pytest.raises(PcipassError, match="timed out after 1 s waiting for CSTS.RDY") as err:
        NvmeController(dev)
    assert err.value.code == "nvme-timeout" and served.left()[0] == []


def test_bad_parameters_are_refused_before_the_device_is_touched(serve) -> None:
    served, fake, dev = nvme_on(serve)
    for kwargs in ({"nsid": 0}, {"io_entries": 1}, {"admin_entries": 0}, {"max_transfer": 512}):
        with pytest.raises(PcipassError, match="is too small") as err:
            NvmeController(dev, **kwargs)
        assert err.value.hint and "at least" in err.value.hint
    assert fake.log.register_writes == [] and dev.config_read(0x04, 2) == 0


def test_reset_clears_a_fatal_status(serve) -> None:
    served, fake, dev = nvme_on(serve)
    fake.regs[0x14] = 1  # left enabled by a previous user ...
    fake.regs[0x1C] = 0b11  # ... and in fatal status: the reset must go through
    with NvmeController(dev) as nvme:
        assert nvme.read(0) == bytes(4096)


def test_fatal_status_while_enabling_is_reported(serve) -> None:
    served, fake, dev = nvme_on(serve)

    def fail(old: int, new: int) -> None:
        fake.regs[0x1C] = 0b10 if new & 1 else 0  # CFS instead of RDY

    fake._cc_changed = fail  # type: ignore[method-assign]
    with pytest.raises(PcipassError, match=r"controller fatal status \(CSTS.CFS\)") as err:
        NvmeController(dev)
    assert err.value.code == "nvme-fatal" and served.left()[0] == []
