"""Server replies that are not errors: what a well-behaved client gets."""

from __future__ import annotations

import errno
import json
import os
import select
import struct

from test_hostile import Raw, err

from pcipass.domain import protocol as p


def test_version_reply_is_a_subset_with_the_smaller_limits(edu_server):
    c = Raw(edu_server.path, version=False)
    theirs = p.Capabilities(max_msg_fds=4, max_data_xfer_size=1 << 30, max_dma_maps=10, pgsizes=4096 | 1 << 21,
                            write_multiple=True)
    reply = p.decode(c.call(p.Command.VERSION, p.Version(0, 7, theirs)))
    assert (reply.major, reply.minor) == (0, 1)
    caps = reply.capabilities
    assert (caps.max_msg_fds, caps.max_data_xfer_size, caps.max_dma_maps, caps.pgsizes) == (4, 1 << 20, 10, 4096)
    assert caps.write_multiple and not caps.twin_socket
    c.close()


# QEMU 11.1's VERSION as its vfio_user_version trace showed it, and the keys its client knows.
QEMU_VERSION_CAPS = (b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
                     b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, '
                     b'"write_multiple": true}}')
QEMU_KNOWN_CAPS = {"max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps", "migration", "write_multiple"}


def test_qemus_version_gets_a_reply_qemu_accepts(edu_server):
    c = Raw(edu_server.path, version=False)
    reply = c.call(p.Command.VERSION, struct.pack("=HH", 0, 0) + QEMU_VERSION_CAPS + b"\0")
    major, minor = struct.unpack_from("=HH", reply.payload)
    assert (major, minor) == (0, 0)  # QEMU refuses a minor above its own
    caps = json.loads(reply.payload[4:-1])["capabilities"]
    assert set(caps) <= QEMU_KNOWN_CAPS  # else it warns of spurious capabilities
    assert caps["max_msg_fds"] <= 16 and caps["max_dma_maps"] <= 65535 and caps["pgsizes"] % 4096 == 0
    c.close()


def test_device_region_and_irq_info(edu_server):
    c = Raw(edu_server.path)
    info = p.decode(c.call(p.Command.DEVICE_GET_INFO, p.DeviceInfo(16, 0, 0, 0)))
    assert info.flags & p.VFIO_DEVICE_FLAGS_PCI and info.num_regions == 9 and info.num_irqs == 5
    bar0 = p.decode(c.call(p.Command.DEVICE_GET_REGION_INFO, p.RegionInfo(32, 0, 0, 0, 0, 0)))
    assert bar0.size == 1 << 20 and bar0.flags == p.VFIO_REGION_INFO_FLAG_READ | p.VFIO_REGION_INFO_FLAG_WRITE
    cfg = p.decode(c.call(p.Command.DEVICE_GET_REGION_INFO, p.RegionInfo(32, 0, 7, 0, 0, 0)))
    assert cfg.size == 256
    intx = p.decode(c.call(p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(16, 0, 0, 0)))
    assert intx.count == 1 and intx.flags & p.VFIO_IRQ_INFO_AUTOMASKED and intx.flags & p.VFIO_IRQ_INFO_MASKABLE
    msix = p.decode(c.call(p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(16, 0, 2, 0)))
    assert msix.count == 0
    # ERR on a device that is not PCIe: EINVAL, as vfio-pci (QEMU warns at count 0)
    assert err(c.call(p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(16, 0, 3, 0))) == errno.EINVAL
    # REQ: count 1 on every device, as vfio-pci (libvfio-user's client aborts on EINVAL)
    req = p.decode(c.call(p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(16, 0, 4, 0)))
    assert req.count == 1 and req.flags == p.VFIO_IRQ_INFO_EVENTFD | p.VFIO_IRQ_INFO_NORESIZE
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    flags = p.VFIO_IRQ_SET_DATA_EVENTFD | p.VFIO_IRQ_SET_ACTION_TRIGGER
    assert not c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, flags, 4, 0, 1), [efd]).is_error  # QEMU's request notifier
    os.close(efd)
    fds = p.decode(c.call(p.Command.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds(16, 0, 0, 0)))
    assert fds.count == 0 and fds.argsz == 16
    c.close()


def test_region_info_says_how_much_room_its_caps_need(scratch_server):
    c = Raw(scratch_server.path)
    small = c.call(p.Command.DEVICE_GET_REGION_INFO, p.RegionInfo(32, 0, 0, 0, 0, 0))
    info = p.decode(small)
    assert info.argsz > 32 and not info.caps and info.flags & p.VFIO_REGION_INFO_FLAG_CAPS
    assert info.cap_offset == 32  # where the chain will be: QEMU 11.1 refuses CAPS with a cap_offset below 32
    for fd in small.fds:
        os.close(fd)
    full = c.call(p.Command.DEVICE_GET_REGION_INFO, p.RegionInfo(info.argsz, 0, 0, 0, 0, 0))
    info = p.decode(full)
    assert len(full.fds) == 1 and info.flags & p.VFIO_REGION_INFO_FLAG_MMAP
    [cap] = p.region_caps(info)
    assert p.sparse_mmap_areas(cap) == [(4096, 3 * 4096)]
    for fd in full.fds:
        os.close(fd)
    c.close()


def test_region_write_multi_and_no_reply(edu_server):
    c = Raw(edu_server.path)
    writes = [p.WriteMultiEntry(0x04, 0, 4, struct.pack("=Q", 0x0F0F0F0F)),
              p.WriteMultiEntry(0x80, 0, 8, struct.pack("=Q", 0x1234))]
    reply = p.decode(c.call(p.Command.REGION_WRITE_MULTI, p.RegionWriteMulti(writes)))
    assert reply.wr_cnt == 2
    c.send(p.command(50, p.Command.REGION_WRITE, p.RegionAccess(0x88, 0, 8, struct.pack("=Q", 0x5678)),
                     no_reply=True).encode())
    got = p.decode(c.call(p.Command.REGION_READ, p.RegionAccess(0x80, 0, 16)))
    assert struct.unpack("=QQ", got.data) == (0x1234, 0x5678)  # the no-reply write was done, in order
    got = p.decode(c.call(p.Command.REGION_READ, p.RegionAccess(0x04, 0, 4)))
    assert got.data == struct.pack("=I", 0xF0F0F0F0)
    c.close()


def test_unmap_all_and_reset(edu_server):
    c = Raw(edu_server.path)
    for i in range(3):
        assert not c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x10000 * (i + 1), 4096)).is_error
    assert not c.call(p.Command.DMA_UNMAP, p.DmaUnmap(24, p.VFIO_DMA_UNMAP_FLAG_ALL, 0, 0)).is_error
    assert err(c.call(p.Command.DMA_UNMAP, p.DmaUnmap(24, 0, 0x10000, 4096))) == errno.ENOENT
    assert not c.call(p.Command.DEVICE_RESET).is_error
    assert "DEVICE_RESET" in edu_server.traces
    c.close()


def test_the_fast_path_answers_exactly_as_the_general_path():
    """Two edu sessions get the same requests; one answers from its fast table where it can."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pcipass import models
    from pcipass.domain.backend import ModelBackend
    from pcipass.domain.server import Session

    models_ = [models.create("edu"), models.create("edu")]
    backends = [ModelBackend(m) for m in models_]
    fast, general = (Session(b) for b in backends)
    read = p.command(1, p.Command.REGION_READ, p.RegionAccess(0, 7, 4)).encode()
    assert fast.fast_reply(bytearray(read), len(read)) is None  # nothing learned before VERSION
    for s in (fast, general):
        s.handle(p.command(0, p.Command.VERSION, p.Version(0, 1)))
    used = []

    @settings(max_examples=600, deadline=None)
    @given(st.integers(0, 0xFFFF), st.sampled_from([p.Command.REGION_READ, p.Command.REGION_WRITE]),
           st.sampled_from([0, 4, 6, 8, 0x10, 0x20, 0x34, 0x80, 0x88, 0xFC, 0xFE, 0x100]),
           st.sampled_from([0, 1, 7, 8]), st.sampled_from([0, 1, 2, 3, 4, 8]), st.sampled_from([0, p.FLAG_NO_REPLY]),
           st.integers(0, 2**64 - 1))
    def check(msg_id, cmd, offset, region, count, flags, value):
        data = (value & ((1 << (8 * count)) - 1)).to_bytes(count, "little") if cmd == p.Command.REGION_WRITE else b""
        msg = p.command(msg_id, cmd, p.RegionAccess(offset, region, count, data))
        msg.flags = flags
        raw = bytearray(msg.encode())
        answer = fast.fast_reply(raw, len(raw))
        if answer is None:
            got = fast.handle(p.Message(msg.msg_id, msg.command, msg.payload, msg.flags))
            answer = b"" if got is None else got.encode()
        else:
            used.append(region)
            assert flags == 0
        expected = general.handle(msg)
        assert bytes(answer) == (b"" if expected is None else expected.encode())

    try:
        check()
        assert {0, 7} <= set(used)  # config space and edu's trapped BAR0 both went the fast way
        for offset in range(0, 256, 4):  # and left the two devices in the same state
            assert fast.policy.read(offset, 4) == general.policy.read(offset, 4)
    finally:
        for b, m in zip(backends, models_):
            b.close()
            m.close()


def test_the_server_loop_answers_small_accesses_as_the_general_path(tmp_path):
    """Over the socket, with no trace (config reads that pass through are then sent from the
    config bytes themselves, edu's registers read by their prepared readers): every reply is
    byte for byte what a general session answers, also after writes change what is read."""
    import threading

    from pcipass import models
    from pcipass.domain.backend import ModelBackend
    from pcipass.domain.server import Server, Session

    served, other = models.create("edu"), models.create("edu")
    server = Server(ModelBackend(served), tmp_path / "edu.sock")
    general = Session(ModelBackend(other))
    thread = threading.Thread(target=server.serve_one, daemon=True)
    thread.start()
    c = Raw(server.path, version=False)
    read, write = p.Command.REGION_READ, p.Command.REGION_WRITE
    steps = [(read, 7, 0, 4), (read, 7, 4, 2), (write, 7, 4, 2, 0x0006), (read, 7, 4, 2), (read, 7, 0x3C, 1),
             (write, 7, 0x3C, 1, 0x0B), (read, 7, 0x3C, 1), (read, 7, 0x34, 1), (read, 7, 0x10, 4),
             (write, 7, 0x10, 4, 0xFFFFFFFF), (read, 7, 0x10, 4), (read, 0, 0, 4), (read, 0, 4, 4),
             (write, 0, 4, 4, 0x12345678), (read, 0, 4, 4), (read, 0, 2, 2), (read, 0, 0x20, 4), (read, 0, 0x80, 8),
             (write, 0, 0x80, 8, 0x1122334455667788), (read, 0, 0x80, 8), (read, 0, 0x80, 4), (read, 0, 0x84, 4)]
    try:
        for n, msg in enumerate([p.command(0, p.Command.VERSION, p.Version(0, 1))] + [
                p.command(i, step[0], p.RegionAccess(step[2], step[1], step[3],
                                                     step[4].to_bytes(step[3], "little") if step[0] == write else b""))
                for i, step in enumerate((s for s in steps for _ in range(3)), 1)]):  # each thrice: learnt, then fast
            c.send(msg.encode())
            got = c.recv()
            expected = general.handle(msg)
            assert got is not None and expected is not None
            assert got.encode() == expected.encode(), f"step {n}: {msg.command_name()} {msg.payload.hex()}"
        assert len(server._session.fast) >= 10  # the repeats were learnt (and answered the fast way)
    finally:
        c.close()
        thread.join(10)
        server.close()
        served.close()
        other.close()


def _fires(fd: int, wait: float) -> bool:
    ready = select.select([fd], [], [], wait)[0]
    if ready:
        os.eventfd_read(fd)
    return bool(ready)


def test_intx_unmask_eventfd_unmasks_with_no_message(edu_server):
    # QEMU under KVM hands its irqfd's resample eventfd over with EVENTFD|UNMASK: the guest's EOI
    # signals it, and the server's loop must unmask (and fire again if still asserted) by itself.
    c = Raw(edu_server.path)
    trigger, unmask = os.eventfd(0), os.eventfd(0)
    try:
        flags = p.VFIO_IRQ_SET_DATA_EVENTFD | p.VFIO_IRQ_SET_ACTION_TRIGGER
        assert not c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(24, flags, 0, 0, 1), [trigger]).is_error
        flags = p.VFIO_IRQ_SET_DATA_EVENTFD | p.VFIO_IRQ_SET_ACTION_UNMASK
        assert not c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(24, flags, 0, 0, 1), [unmask]).is_error
        raise_irq = p.RegionAccess(0x60, 0, 4, (1).to_bytes(4, "little"))
        assert not c.call(p.Command.REGION_WRITE, raise_irq).is_error
        assert _fires(trigger, 2)
        assert not _fires(trigger, 0.1)  # automasked
        os.eventfd_write(unmask, 1)
        assert _fires(trigger, 2)  # unmasked while still asserted: fires again, no message sent
        ack = p.RegionAccess(0x64, 0, 4, (1).to_bytes(4, "little"))
        assert not c.call(p.Command.REGION_WRITE, ack).is_error
        os.eventfd_write(unmask, 1)
        assert not _fires(trigger, 0.2)  # deasserted: nothing to fire
        # Without an fd the unmask eventfd is dropped; masking through an eventfd is refused.
        assert not c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, flags, 0, 0, 1)).is_error
        mask = p.VFIO_IRQ_SET_DATA_EVENTFD | p.VFIO_IRQ_SET_ACTION_MASK
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(24, mask, 0, 0, 1), [unmask])) == errno.EINVAL
    finally:
        os.close(trigger)
        os.close(unmask)
    c.close()


def test_err_counted_only_on_pcie_req_on_every_device():
    """vfio_pci_get_irq_count: REQ 1 always; ERR 1 only with the PCI Express capability."""
    from pcipass import pci
    from pcipass.domain.backend import vfio_pci_err_req
    from pcipass.models import ConfigSpace

    conventional = ConfigSpace()
    conventional.header(vendor=0x1234, device=0x11E8, revision=0x10, class_code=0xFF0000)
    assert vfio_pci_err_req(conventional.read) == {4: 1}
    pcie = ConfigSpace()
    pcie.header(vendor=0x1234, device=0x11E8, revision=0x10, class_code=0xFF0000)
    pcie.add_capability(pci.PCI_CAP_ID_EXP, bytes(58))
    assert vfio_pci_err_req(pcie.read) == {3: 1, 4: 1}


def test_twin_socket_offered_only_to_a_client_that_proposed_it(edu_server):
    plain = Raw(edu_server.path, version=False)
    reply = plain.call(p.Command.VERSION, p.Version(0, 1, p.Capabilities()))
    assert "twin_socket" not in json.loads(reply.payload[4:-1])["capabilities"] and not reply.fds
    plain.close()
    twin = Raw(edu_server.path, version=False)
    reply = twin.call(p.Command.VERSION, p.Version(0, 1, p.Capabilities(twin_socket=True)))
    # The spec: supported true, fd_index naming the reply's fd, which is a socket.
    assert json.loads(reply.payload[4:-1])["capabilities"]["twin_socket"] == {"supported": True, "fd_index": 0}
    assert len(reply.fds) == 1
    import socket as socketlib
    import stat

    assert stat.S_ISSOCK(os.fstat(reply.fds[0]).st_mode)
    s = socketlib.socket(fileno=reply.fds[0])
    assert s.family == socketlib.AF_UNIX and s.type == socketlib.SOCK_STREAM
    s.close()
    twin.close()
