"""The frontend (`connect`) against the backend serving models over a real socket.

The edu driver (pcipass.drivers.edu, written against pcipass.device.Device)
runs unchanged over vfio-user: the same calls its lab tests make on the real
device through VFIO.
"""

from __future__ import annotations

import os

import pytest

from pcipass.device import Device, IrqKind
from pcipass.domain import connect
from pcipass.domain import protocol as p
from pcipass.domain.client import RemoteError
from pcipass.errors import PcipassError

edu_driver = pytest.importorskip("pcipass.drivers.edu", reason="the edu driver (vfio part) is not in this checkout")


@pytest.fixture
def dev(edu_server):
    d = connect(edu_server.path)
    yield d
    d.close()


def test_frontend_is_a_device(dev):
    assert isinstance(dev, Device)
    assert dev.config_read(0, 2) == 0x1234 and dev.config_read(2, 2) == 0x11E8
    assert dev.irq_count(IrqKind.MSI) == 1 and dev.irq_count(IrqKind.MSIX) == 0
    assert dev.irq_count(IrqKind.ERR) == 0  # EINVAL from the server, as from vfio-pci on conventional PCI
    assert dev.irq_count(IrqKind.REQ) == 1  # as vfio-pci on every device
    assert dev.region(0).info.size == 1 << 20 and not dev.region(0).info.mappable


@pytest.mark.parametrize("irq", [IrqKind.MSI, IrqKind.INTX])
def test_edu_driver_over_vfio_user(dev, irq):
    edu = edu_driver.Edu(dev, irq=irq, timeout=5)
    try:
        assert edu.ident().raw == 0x010000ED
        assert edu.liveness(0xCAFEF00D)
        assert edu.factorial(12) == 479001600
        assert edu.factorial(10, use_irq=True) == 3628800
        data = os.urandom(4096)
        assert edu.dma_roundtrip(data) == data
    finally:
        edu.close()


def test_non_4_byte_reads_below_0x80_answer_all_ones(dev):
    bar = dev.region(0)
    assert bar.read(0, 4) == 0x010000ED
    assert bar.read(0, 2) == 0xFFFF and bar.read(0, 1) == 0xFF
    assert bar.read(0x80, 8) == 0


def test_interrupt_raised_by_hand_reaches_the_eventfd(dev):
    edu = edu_driver.Edu(dev, timeout=5)
    try:
        fd = edu.enable_irq()
        edu.raise_irq(0x8000)
        assert edu.wait_irq(0x8000) & 0x8000
        assert fd.consume() == 0
    finally:
        edu.close()


def test_intx_is_automasked_until_unmasked(dev):
    [fd] = dev.irq_enable(IrqKind.INTX)
    bar = dev.region(0)
    bar.write(0x60, 4, 1)
    assert fd.wait(2) == 1
    bar.write(0x60, 4, 2)  # the line is still high and masked: nothing new
    assert fd.wait(0.05) == 0
    dev.irq_unmask(IrqKind.INTX)  # still asserted: fires again
    assert fd.wait(2) == 1
    bar.write(0x64, 4, 3)
    dev.irq_unmask(IrqKind.INTX)
    assert fd.wait(0.05) == 0
    dev.irq_disable(IrqKind.INTX)


def test_dma_only_reaches_what_the_client_mapped(dev, edu_server, caplog):
    keep = dev.dma_alloc(4096, dma_mask_bits=28)
    gone = dev.dma_alloc(4096, dma_mask_bits=28)
    keep.window.bytes[:8] = b"original"
    gone_iova = gone.iova
    dev.dma_free(gone)  # unmapped: the device must not reach it any more
    edu_server.model.buffer[:8] = b"devbytes"
    bar = dev.region(0)
    with caplog.at_level("WARNING", logger="pcipass.models.edu"):
        for target in (gone_iova, keep.iova + 4096, 0):
            bar.write(0x80, 8, 0x40000)
            bar.write(0x88, 8, target)
            bar.write(0x90, 8, 8)
            bar.write(0x98, 8, 0x3)  # start, buffer -> RAM
            while bar.read(0x98, 8) & 1:
                pass
    blocked = [r.getMessage() for r in caplog.records if "blocked" in r.getMessage()]
    assert len(blocked) == 3 and all("outside what the client mapped" in m for m in blocked)
    assert bytes(keep.window.bytes[:8]) == b"original"
    dev.dma_free(keep)


def test_config_policy_applies_to_the_frontend(dev, edu_server):
    dev.config_write(4, 2, 0x0006)
    dev.config_write(4, 2, 0x0000)
    assert dev.config_read(4, 2) & 0x2  # memory decode stays on
    dev.config_write(0x10, 4, 0xFFFFFFFF)
    assert dev.config_read(0x10, 4) == 0xFFF00000  # sizing
    dev.config_write(0x10, 4, 0xC0000000)
    assert dev.config_read(0x10, 4) == 0xC0000000
    assert edu_server.model.config.read(0x10, 4) == 0  # relocation never reached the device
    dev.config_write(0x42, 2, 1)  # MSI enable by config write: refused
    assert not edu_server.model.msi_enabled()
    dev.irq_enable(IrqKind.MSI)
    assert edu_server.model.msi_enabled()
    dev.irq_disable(IrqKind.MSI)
    assert not edu_server.model.msi_enabled()
    assert any("REFUSED turning off memory decode" in t for t in edu_server.traces)


def test_mapped_bar_areas_and_sparse_mmap(scratch_server):
    with connect(scratch_server.path) as dev:
        bar0, bar2 = dev.region(0), dev.region(2)
        assert bar0.mapped_areas == [(4096, 3 * 4096)] and bar2.mapped_areas == [(0, 4096)]
        bar0.write(4096, 8, 0x0123456789ABCDEF)  # through the mapping: the model's memory changes, no message
        assert scratch_server.model.regions[0].memory.window.read(4096, 8) == 0x0123456789ABCDEF
        writes = scratch_server.model.writes
        bar0.write(0, 4, 0x55)  # the register page goes by message
        assert scratch_server.model.writes == writes + 1 and bar0.read(0, 4) == 0x55
        bar2.write(8, 4, 0xAABBCCDD)
        assert scratch_server.model.regions[2].memory.window.read(8, 4) == 0xAABBCCDD


def test_region_read_of_many_bytes_is_split_into_aligned_accesses(dev):
    raw = dev.region_read(p.VFIO_PCI_CONFIG_REGION_INDEX, 0, 64)
    assert raw[:4] == (0x11E81234).to_bytes(4, "little") and len(raw) == 64


def test_dma_alloc_honours_the_mask_and_frees(dev):
    bufs = [dev.dma_alloc(4096, dma_mask_bits=28) for _ in range(4)]
    assert len({b.iova for b in bufs}) == 4 and all(b.iova + b.size <= 1 << 28 for b in bufs)
    for b in bufs:
        dev.dma_free(b)
    with pytest.raises(PcipassError, match="no room"):
        dev.dma_alloc(1 << 21, dma_mask_bits=20)
    with pytest.raises(ValueError):
        dev.dma_free(bufs[0])


def test_errors_from_the_backend_say_what_was_refused(dev):
    with pytest.raises(RemoteError, match="REGION_READ.*EINVAL"):
        dev.region_read(0, 1 << 20, 4)
    with pytest.raises(PcipassError, match="vectors asked"):
        dev.irq_enable(IrqKind.MSI, 2)


def test_reset_goes_to_the_device(dev, edu_server):
    bar = dev.region(0)
    bar.write(4, 4, 0)
    dev.reset()
    assert bar.read(4, 4) == 0


def test_connect_errors_have_hints(tmp_path):
    with pytest.raises(PcipassError, match="no vfio-user backend") as exc:
        connect(tmp_path / "nothing")
    assert "pcipass serve" in exc.value.hint


def test_next_client_after_one_leaves_without_cleaning_up(edu_server):
    first = connect(edu_server.path)
    first.dma_alloc(4096)
    first.irq_enable(IrqKind.MSI)
    first.region(0).write(4, 4, 1)
    first._sock.close()  # vanish: no unmap, no disable
    with connect(edu_server.path) as second:
        assert second.region(0).read(4, 4) == 0  # reset between clients
        assert not edu_server.model.msi_enabled()
        edu = edu_driver.Edu(second, timeout=5)
        assert edu.factorial(5) == 120
        edu.close()


@pytest.mark.parametrize("twin", [True, False], ids=["twin-socket", "one-socket"])
def test_dma_by_messages_with_and_without_twin_socket(edu_server, twin):
    """Buffers mapped without their fd: edu's DMA goes by DMA_READ/DMA_WRITE to the frontend,
    on the twin socket (answered by its thread) or interleaved on the main one."""
    with connect(edu_server.path, twin_socket=twin, share_dma_memory=False) as d:
        assert d.caps.twin_socket is twin and (d._twin is not None) is twin
        edu = edu_driver.Edu(d, irq=IrqKind.MSI, timeout=5)
        try:
            data = os.urandom(4096)
            assert edu.dma_roundtrip(data) == data
        finally:
            edu.close()
    assert any("DMA_MAP" in t and "no fd" in t for t in edu_server.traces)


def test_dma_alloc_reuses_a_freed_iova_and_a_refused_size_takes_none(dev):
    first, second = dev.dma_alloc(4096), dev.dma_alloc(8192)
    assert first.iova >= 0x100000 and second.iova == first.iova + 4096
    dev.dma_free(first)
    again = dev.dma_alloc(4096)
    assert again.iova == first.iova  # first fit: the hole is taken again
    with pytest.raises(PcipassError) as exc:
        dev.dma_alloc(1 << 21, dma_mask_bits=21)  # below 2 MiB only 1 MiB is the client's
    assert exc.value.code == "vfio-iova-exhausted"
    assert dev.dma_alloc(4096).iova == second.iova + 8192  # the refused size took nothing


def test_small_accesses_take_only_their_own_reply():
    """A server that answers small accesses wrongly: another id is not taken for the reply (the
    right one that follows is), a reply for another offset or of the wrong size is refused."""
    import socket
    import threading
    import time

    from pcipass.domain.client import VfioUserDevice

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def server() -> None:
        parser = p.Parser()
        while data := theirs.recv(1 << 16):
            parser.feed(data)
            for msg in parser.messages():
                if msg.command == p.Command.VERSION:
                    out = [msg.reply(p.Version(0, 1, p.Capabilities()).pack())]
                elif msg.command == p.Command.DEVICE_GET_INFO:
                    out = [msg.reply(p.DeviceInfo(16, 0, 9, 5).pack())]
                else:
                    req = p.decode(msg)
                    data_ = (0x11223344).to_bytes(4, "little")
                    if req.offset == 0:  # a stray reply first, then the right one
                        stray = p.Message((msg.msg_id + 1) & 0xFFFF, msg.command, b"", p.TYPE_REPLY)
                        stray.payload = p.RegionAccess(0, 7, 4, b"\xff" * 4).pack()
                        out = [stray, msg.reply(p.RegionAccess(0, 7, 4, data_).pack())]
                    elif req.offset == 4:  # the reply of another offset
                        out = [msg.reply(p.RegionAccess(8, 7, 4, data_).pack())]
                    else:  # the data of a 2-byte read
                        out = [msg.reply(p.RegionAccess(req.offset, 7, 4, data_[:2]).pack())]
                for m in out:  # one at a time: the client's recv is to get the stray on its own
                    theirs.sendall(m.encode())
                    time.sleep(0.05)

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    dev = VfioUserDevice(ours, "fake", timeout=5, twin_socket=False)
    try:
        for _ in range(2):
            assert dev.config_read(0, 4) == 0x11223344
            for offset in (4, 0x10):
                with pytest.raises(PcipassError) as exc:
                    dev.config_read(offset, 4)
                assert exc.value.code == "vfio-user-protocol"
    finally:
        dev.close()  # the server's recv sees the end
        thread.join(5)
        theirs.close()
