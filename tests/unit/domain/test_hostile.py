"""The server against hostile clients, case by case, over a real socket; then fuzzed.

After every case the server must still serve the next client (`still_serving`).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served import start, stop

from pcipass import models
from pcipass.domain import connect
from pcipass.domain import protocol as p
from pcipass.domain.backend import ModelBackend
from pcipass.domain.server import DropClient, Session


class Raw:
    """A client that sends whatever it is told to."""

    def __init__(self, path, version=True, **caps):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(5)
        self.parser = p.Parser(1 << 24)
        self.next = 0
        if version:
            reply = self.call(p.Command.VERSION, p.Version(0, 1, p.Capabilities(**caps)))
            assert not reply.is_error

    def send(self, data: bytes, fds=()):
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            self.sock.sendall(data)

    def recv(self) -> p.Message | None:
        while True:
            msgs = self.parser.next_message()
            if msgs:
                return msgs
            data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64))
            if not data:
                return None
            fds = []
            for _, _, blob in anc:
                fds += struct.unpack(f"{len(blob) // 4}i", blob)
            self.parser.feed(data, fds)

    def call(self, cmd, body=b"", fds=(), raw_cmd=None) -> p.Message:
        self.next += 1
        msg = p.command(self.next, cmd, body)
        if raw_cmd is not None:
            msg.command = raw_cmd
        self.send(msg.encode(), fds)
        reply = self.recv()
        assert reply is not None, "the server dropped us"
        assert reply.msg_id == self.next and reply.is_reply
        return reply

    def dropped(self) -> bool:
        try:
            return self.recv() is None
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def still_serving(server):
    with connect(server.path, timeout=5) as dev:
        assert dev.config_read(0, 4) == 0x11E81234
        assert dev.region(0).read(0, 4) == 0x010000ED


def fds_settle(limit: int, wait: float = 3.0) -> bool:
    """True once this process has at most `limit` fds open (the server thread closes the last one late)."""
    deadline = time.monotonic() + wait
    while len(os.listdir("/proc/self/fd")) > limit:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def err(reply: p.Message) -> int:
    assert reply.is_error and reply.payload == b""
    return reply.error


@pytest.fixture
def server(edu_server):
    yield edu_server
    still_serving(edu_server)


def test_header_smaller_than_itself_drops_the_client(server):
    c = Raw(server.path)
    c.send(struct.pack("=HHIII", 1, 9, 8, 0, 0))
    assert c.dropped()
    assert any("smaller than the 16-byte header" in t for t in server.traces)


def test_size_over_the_negotiated_maximum_drops_the_client(server):
    c = Raw(server.path, max_data_xfer_size=4096)
    c.send(struct.pack("=HHIII", 1, 10, 1 << 20, 0, 0))
    assert c.dropped()
    assert any("over the negotiated maximum" in t for t in server.traces)


def test_reserved_message_type_drops_the_client(server):
    c = Raw(server.path)
    c.send(struct.pack("=HHIII", 1, 4, 16, 7, 0))
    assert c.dropped()


def test_unknown_commands_get_an_error_and_the_session_goes_on(server):
    c = Raw(server.path)
    assert err(c.call(p.Command.DEVICE_RESET, raw_cmd=99)) == errno.ENOSYS
    assert err(c.call(p.Command.DEVICE_RESET, raw_cmd=14)) == errno.ENOSYS  # the old DIRTY_PAGES
    assert err(c.call(p.Command.DEVICE_FEATURE, p.DeviceFeature(8, p.VFIO_DEVICE_FEATURE_PROBE | 1))) == errno.ENOTSUP
    assert err(c.call(p.Command.DMA_READ, p.DmaAccess(0, 4))) == errno.ENOTSUP  # a server-to-client command
    assert not c.call(p.Command.DEVICE_GET_INFO, p.DeviceInfo(16, 0, 0, 0)).is_error
    c.close()


def test_commands_before_version_drop_the_client(server):
    c = Raw(server.path, version=False)
    c.send(p.command(1, p.Command.DEVICE_GET_INFO, p.DeviceInfo(16, 0, 0, 0)).encode())
    assert c.dropped()
    assert any("before VERSION" in t for t in server.traces)


@pytest.mark.parametrize("payload", [struct.pack("=HH", 1, 0), struct.pack("=HH", 0, 1) + b"{not json}\0",
                                     b"\0"])
def test_bad_version_drops_the_client(server, payload):
    c = Raw(server.path, version=False)
    c.send(p.Message(1, p.Command.VERSION, payload).encode())
    assert c.dropped()


def test_a_second_version_and_a_stray_reply_are_refused(server):
    c = Raw(server.path)
    assert err(c.call(p.Command.VERSION, p.Version(0, 1))) == errno.EINVAL
    c.send(p.Message(77, p.Command.REGION_READ, b"", p.TYPE_REPLY).encode())
    reply = c.recv()
    assert reply.msg_id == 77 and err(reply) == errno.EINVAL
    c.close()


@pytest.mark.parametrize("cmd", [p.Command.REGION_READ, p.Command.REGION_WRITE])
@pytest.mark.parametrize("offset, count", [((1 << 64) - 4, 8), ((1 << 64) - 1, 1), (1 << 20, 4), (0, 0)])
def test_offsets_that_wrap_or_leave_the_region(server, cmd, offset, count):
    c = Raw(server.path)
    data = b"\0" * count if cmd == p.Command.REGION_WRITE else b""
    assert err(c.call(cmd, p.RegionAccess(offset, 0, count, data))) == errno.EINVAL
    c.close()


def test_counts_over_the_negotiated_maximum(server):
    c = Raw(server.path, max_data_xfer_size=64)
    assert err(c.call(p.Command.REGION_READ, p.RegionAccess(0, 7, 128))) == errno.EINVAL
    assert not c.call(p.Command.REGION_READ, p.RegionAccess(0, 7, 64)).is_error
    c.close()


def test_region_and_data_lies(server):
    c = Raw(server.path)
    assert err(c.call(p.Command.REGION_READ, p.RegionAccess(0, 42, 4))) == errno.EINVAL
    assert err(c.call(p.Command.REGION_WRITE, p.RegionAccess(0, 7, 4, b"\0" * 2))) == errno.EINVAL
    assert err(c.call(p.Command.REGION_READ, p.RegionAccess(0, 7, 4, b"junk"))) == errno.EINVAL
    assert err(c.call(p.Command.DEVICE_GET_REGION_INFO, p.RegionInfo(32, 0, 99, 0, 0, 0))) == errno.EINVAL
    assert err(c.call(p.Command.DEVICE_GET_INFO, b"\1\2\3")) == errno.EINVAL
    multi = p.RegionWriteMulti([p.WriteMultiEntry(4, 0, 4, b"\0" * 8)]).pack()
    assert err(c.call(p.Command.REGION_WRITE_MULTI, struct.pack("=Q", 9) + multi[8:])) == errno.EINVAL
    c.close()


def memfd(size=8192):
    fd = os.memfd_create("hostile")
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("address, size, words", [
    (0x10000, 0, "size 0"),
    ((1 << 64) - 4096, 8192, "wraps"),
    (0x10001, 4096, "aligned"),
])
def test_bad_dma_maps(server, address, size, words):
    c = Raw(server.path)
    fd = memfd()
    try:
        assert err(c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, address, size), [fd])) == errno.EINVAL
    finally:
        os.close(fd)
    assert any(words in t for t in server.traces)
    c.close()


def test_overlapping_dma_map_is_eexist_and_unmatched_unmap_is_enoent(server):
    c = Raw(server.path)
    fd = memfd()
    try:
        assert not c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x10000, 8192), [fd]).is_error
        assert err(c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x11000, 8192), [fd])) == errno.EEXIST
        assert err(c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0xF000, 8192))) == errno.EEXIST
        assert err(c.call(p.Command.DMA_UNMAP, p.DmaUnmap(24, 0, 0x10000, 4096))) == errno.ENOENT
        assert err(c.call(p.Command.DMA_UNMAP, p.DmaUnmap(24, 0, 0x90000, 4096))) == errno.ENOENT
        assert err(c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x40000, 4096), [fd, fd])) == errno.EINVAL
        assert err(c.call(p.Command.DMA_MAP, p.DmaMap(32, 0x80, 0, 0x40000, 4096))) == errno.EINVAL
        r, w = os.pipe()
        assert err(c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x40000, 4096), [r])) == errno.EINVAL
        os.close(r)
        os.close(w)
        reply = c.call(p.Command.DMA_UNMAP, p.DmaUnmap(24, 0, 0x10000, 8192))
        assert p.decode(reply) == p.DmaUnmap(24, 0, 0x10000, 8192)
    finally:
        os.close(fd)
    c.close()


def test_dma_maps_sent_in_a_burst_keep_their_own_fds(server):
    """QEMU sends the DMA_MAPs of a memory transaction without waiting for replies, ROM
    (no fd) and RAM (a memfd) mixed: each map must get the fd its own message carried."""
    c = Raw(server.path)
    fd = memfd(0x4000)
    maps = [(0x100000, None), (0x200000, fd), (0x300000, None), (0x400000, fd)]
    first = c.next + 1
    for address, with_fd in maps:
        c.next += 1
        c.send(p.command(c.next, p.Command.DMA_MAP, p.DmaMap(32, 3, 0, address, 0x4000)).encode(),
               [with_fd] if with_fd is not None else ())
    for msg_id in range(first, c.next + 1):
        reply = c.recv()
        assert reply is not None and reply.msg_id == msg_id and not reply.is_error
    os.close(fd)
    dma = server.server.backend.dma
    assert [(m.address, m.fd is not None) for m in dma.maps] == [(a, f is not None) for a, f in maps]
    c.close()


def test_more_dma_maps_than_agreed(server):
    c = Raw(server.path, max_dma_maps=2)
    for i in range(2):
        assert not c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x10000 * (i + 1), 4096)).is_error
    assert err(c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x90000, 4096))) == errno.ENOSPC
    c.close()


def test_bad_set_irqs(server):
    c = Raw(server.path)
    e1, e2 = os.eventfd(0), os.eventfd(0)
    trig = p.VFIO_IRQ_SET_DATA_EVENTFD | p.VFIO_IRQ_SET_ACTION_TRIGGER
    try:
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, trig, 9, 0, 1), [e1])) == errno.EINVAL
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, trig, 2, 0, 1), [e1])) == errno.EINVAL  # no MSI-X
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, trig, 1, 0, 2), [e1, e2])) == errno.EINVAL
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, trig, 1, 0, 1), [e1, e2])) == errno.EINVAL
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, 0x3 | 0x20, 1, 0, 1))) == errno.EINVAL
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, 0x1 | 0x18, 0, 0, 1))) == errno.EINVAL
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, p.VFIO_IRQ_SET_DATA_NONE | p.VFIO_IRQ_SET_ACTION_MASK, 1, 0, 1))) == errno.EINVAL
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, p.VFIO_IRQ_SET_DATA_BOOL | p.VFIO_IRQ_SET_ACTION_TRIGGER, 1, 0, 1))) == errno.EINVAL
        assert not c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, trig, 1, 0, 1), [e1]).is_error
    finally:
        os.close(e1)
        os.close(e2)
    c.close()


def test_too_many_fds_at_once_drops_the_client(server):
    c = Raw(server.path)
    fds = [os.eventfd(0) for _ in range(40)]
    try:
        c.send(p.command(1, p.Command.DEVICE_RESET).encode(), fds)
        assert c.dropped()
    finally:
        for fd in fds:
            os.close(fd)


def test_more_fds_than_agreed_is_refused(server):
    c = Raw(server.path, max_msg_fds=1)
    e1, e2 = os.eventfd(0), os.eventfd(0)
    try:
        trig = p.VFIO_IRQ_SET_DATA_EVENTFD | p.VFIO_IRQ_SET_ACTION_TRIGGER
        assert err(c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, trig, 1, 0, 1), [e1, e2])) == errno.EINVAL
    finally:
        os.close(e1)
        os.close(e2)
    c.close()


def test_disconnect_in_the_middle_of_a_request(server):
    c = Raw(server.path)
    whole = p.command(5, p.Command.REGION_WRITE, p.RegionAccess(4, 0, 4, b"\1\2\3\4")).encode()
    c.send(whole[:20])
    c.close()
    time.sleep(0.1)
    assert any("middle of a message" in t for t in server.traces)


def test_disconnect_with_dma_and_interrupts_set_up_releases_them(server):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        c = Raw(server.path)
        fd, ev = memfd(), os.eventfd(0)
        assert not c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x10000, 8192), [fd]).is_error
        assert not c.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, 0x24, 1, 0, 1), [ev]).is_error
        os.close(fd)
        os.close(ev)
        c.close()
        still_serving(server)
    assert fds_settle(before)  # the server kept no fd of the clients that left


def test_a_client_that_never_reads_is_dropped(tmp_path):
    running = start(tmp_path, "scratch", send_timeout=0.3)
    try:
        c = Raw(running.path)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        req = p.command(1, p.Command.REGION_READ, p.RegionAccess(4096, 2, 4096)).encode()
        deadline = time.monotonic() + 10
        c.sock.settimeout(0.5)
        try:
            while time.monotonic() < deadline and not any("has not read" in t for t in running.traces):
                c.sock.send(req)
        except (TimeoutError, BrokenPipeError, ConnectionResetError, BlockingIOError):
            pass
        time.sleep(0.5)
        assert any("has not read" in t for t in running.traces)
        c.close()
        with connect(running.path, timeout=5) as dev:
            assert dev.config_read(0, 2) == 0x1B36
    finally:
        stop(running)


# --- fuzzing -------------------------------------------------------------------------

commands = st.sampled_from([int(c) for c in p.Command] + [0, 14, 19, 0xFFFF])
bodies = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda o, r, c: p.RegionAccess(o, r, c).pack(), st.integers(0, 1 << 21), st.integers(0, 9), st.integers(0, 16)),
    st.builds(lambda a, s: p.DmaMap(32, 3, 0, a, s).pack(), st.integers(0, 1 << 20), st.integers(0, 1 << 14)),
    st.builds(lambda f, i, s, c: p.IrqSet(20, f, i, s, c).pack(), st.integers(0, 0x3F), st.integers(0, 5),
              st.integers(0, 2), st.integers(0, 2)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(commands, bodies, st.integers(0, 0x3F), st.integers(0, 2)), max_size=12))
def test_session_fuzz_only_replies_or_drops(msgs):
    model = models.create("edu")
    backend = ModelBackend(model)
    session = Session(backend)
    before = len(os.listdir("/proc/self/fd"))
    try:
        session.handle(p.command(0, p.Command.VERSION, p.Version(0, 1)))
        for i, (cmd, body, flags, nfds) in enumerate(msgs):
            fds = [os.eventfd(0) for _ in range(nfds)]
            msg = p.Message(i, cmd, body, flags & ~p.FLAG_TYPE_MASK | (flags & 1), 0, fds)
            try:
                reply = session.handle(msg)
            except DropClient:
                break
            assert reply is None or (reply.is_reply and reply.msg_id == i)
            backend.run_due()
    finally:
        backend.close()
        model.close()
    assert len(os.listdir("/proc/self/fd")) <= before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300))
def test_socket_fuzz_the_server_survives_random_bytes(edu_server, data):
    c = Raw(edu_server.path)
    try:
        c.send(data)
        c.sock.shutdown(socket.SHUT_WR)
        while c.recv() is not None:
            pass
    except (ConnectionResetError, p.ProtocolError, TimeoutError):
        pass
    finally:
        c.close()
    still_serving(edu_server)


def test_dma_to_memory_mapped_without_an_fd_goes_by_messages(server):
    """DMA_MAP without an fd: the edu model's DMA becomes DMA_READ/DMA_WRITE to the client."""
    c = Raw(server.path)
    memory = bytearray(b"client memory!" + bytes(4096 - 14))
    assert not c.call(p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x200000, 4096)).is_error

    def bar_write(offset, value):
        assert not c.call(p.Command.REGION_WRITE, p.RegionAccess(offset, 0, 8, value.to_bytes(8, "little"))).is_error

    def run_dma(src, dst, count, cmd):
        bar_write(0x80, src)
        bar_write(0x88, dst)
        bar_write(0x90, count)
        c.next += 1
        c.send(p.command(c.next, p.Command.REGION_WRITE, p.RegionAccess(0x98, 0, 8, cmd.to_bytes(8, "little"))).encode())
        mine, served = c.next, []
        while True:  # serve the server's commands until our reply and the DMA are both done
            msg = c.recv()
            assert msg is not None
            if msg.is_reply:
                assert msg.msg_id == mine and not msg.is_error
                if served:
                    return served
                c.next += 1  # poll the command register until the transfer is done
                c.send(p.command(c.next, p.Command.REGION_READ, p.RegionAccess(0x98, 0, 8)).encode())
                mine = c.next
                continue
            req = p.decode(msg)
            at = req.address - 0x200000
            if msg.command == p.Command.DMA_READ:
                c.send(msg.reply(p.DmaAccess(req.address, req.count, bytes(memory[at:at + req.count])).pack()).encode())
            else:
                memory[at:at + req.count] = req.data
                c.send(msg.reply(p.DmaAccess(req.address, req.count).pack()).encode())
            served.append(msg.command)

    assert run_dma(0x200000, 0x40000, 14, 0x1) == [p.Command.DMA_READ]
    assert run_dma(0x40000, 0x200800, 14, 0x3) == [p.Command.DMA_WRITE]
    assert bytes(memory[0x800:0x800 + 14]) == b"client memory!"
    c.close()
