"""The vfio-user codec, without sockets."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcipass.domain import protocol as p

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def test_header_layout_matches_the_spec():
    msg = p.Message(0x1234, p.Command.REGION_READ, b"x" * 16, p.TYPE_REPLY | p.FLAG_ERROR, 22)
    raw = msg.encode()
    assert len(raw) == 32
    assert struct.unpack_from("=HHIII", raw) == (0x1234, 9, 32, 0x21, 22)
    assert msg.is_reply and msg.is_error and not msg.no_reply


def test_command_numbers_match_the_spec():
    assert [c.value for c in p.Command] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17, 18]


def test_version_carries_json_capabilities():
    caps = p.Capabilities(max_msg_fds=8, max_data_xfer_size=65536, max_dma_maps=10, pgsizes=4096)
    raw = p.Version(0, 1, caps).pack()
    assert raw[:4] == struct.pack("=HH", 0, 1) and raw.endswith(b"\0")
    back = p.Version.unpack(raw)
    assert back.capabilities == caps
    # Only keys QEMU's client knows: it warns at any other (twin_socket among them).
    assert set(json.loads(raw[4:-1])["capabilities"]) == {
        "max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "write_multiple"}


def test_version_without_data_gets_the_spec_defaults():
    v = p.Version.unpack(struct.pack("=HH", 0, 1))
    assert v.capabilities.max_msg_fds == 1
    assert v.capabilities.max_data_xfer_size == 1 << 20
    assert v.capabilities.max_dma_maps == 65535
    assert v.capabilities.pgsizes == 4096


@pytest.mark.parametrize(
    "data, words",
    [
        (b"{}", "NUL-terminated"),
        (b"{\0}\0", "NUL-terminated"),
        (b"\xff\0", "UTF-8 JSON"),
        (b"[1]\0", "not a JSON object"),
        (b'{"capabilities":{"max_msg_fds":-1}}\0', "max_msg_fds"),
        (b'{"capabilities":{"pgsizes":"4096"}}\0', "pgsizes"),
        (b'{"capabilities":3}\0', "'capabilities'"),
    ],
)
def test_version_rejects_bad_data(data, words):
    with pytest.raises(p.ProtocolError, match=words):
        p.Version.unpack(struct.pack("=HH", 0, 1) + data)


def test_negotiation_takes_the_smaller_limits():
    client = p.Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20, max_dma_maps=100, pgsizes=4096 | 1 << 21)
    server = p.Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 16, max_dma_maps=1000, pgsizes=4096)
    agreed = client.negotiate(server)
    assert (agreed.max_msg_fds, agreed.max_data_xfer_size, agreed.max_dma_maps, agreed.pgsizes) == (
        8, 1 << 16, 100, 4096)


def test_fixed_sizes_match_the_spec():
    assert len(p.DmaMap(32, 3, 0, 0, 4096).pack()) == 32
    assert len(p.DmaUnmap(24, 0, 0, 4096).pack()) == 24
    assert len(p.DeviceInfo(16, 0, 0, 0).pack()) == 16
    assert len(p.RegionInfo(32, 0, 7, 0, 256, 0).pack()) == 32
    assert len(p.IrqInfo(16, 0, 1, 0).pack()) == 16
    assert len(p.IrqSet(20, 0, 1, 0, 1).pack()) == 20
    assert len(p.RegionAccess(0, 7, 4).pack()) == 16
    assert len(p.DmaAccess(0, 4).pack()) == 16
    assert len(p.IoFdSubRegion(0, 4, 0, 0, 0, 0, 0).pack()) == 40
    assert len(p.WriteMultiEntry(0, 0, 4, b"\0" * 8).pack()) == 24


def test_dma_write_reply_of_twelve_bytes_is_accepted():
    assert p.DmaAccess.unpack(struct.pack("=QI", 0x1000, 8)) == p.DmaAccess(0x1000, 8)


def test_region_info_capability_chain_round_trips():
    areas = [(0x1000, 0x1000), (0x3000, 0x2000)]
    other = p.RegionCap(p.VFIO_REGION_INFO_CAP_TYPE, 1, struct.pack("=II", 3, 1))
    info = p.region_info_with_caps(p.RegionInfo(0, p.VFIO_REGION_INFO_FLAG_READ, 0, 0, 0x10000, 0),
                                   [p.sparse_mmap_cap(areas), other])
    assert info.flags & p.VFIO_REGION_INFO_FLAG_CAPS and info.cap_offset == 32
    assert info.argsz == 32 + len(info.caps)
    back = p.RegionInfo.unpack(info.pack())
    caps = p.region_caps(back)
    assert [c.id for c in caps] == [p.VFIO_REGION_INFO_CAP_SPARSE_MMAP, p.VFIO_REGION_INFO_CAP_TYPE]
    assert p.sparse_mmap_areas(caps[0]) == areas
    assert caps[1].data == other.data


def test_region_caps_reject_loops_and_wild_pointers():
    loop = p.RegionInfo(0, p.VFIO_REGION_INFO_FLAG_CAPS, 0, 32, 0, 0, struct.pack("=HHI", 1, 1, 32))
    with pytest.raises(p.ProtocolError, match="out of order|loops"):
        p.region_caps(loop)
    wild = p.RegionInfo(0, p.VFIO_REGION_INFO_FLAG_CAPS, 0, 4000, 0, 0, b"")
    with pytest.raises(p.ProtocolError, match="outside the reply"):
        p.region_caps(wild)
    lying = p.sparse_mmap_cap([(0, 4096)])
    lying.data = struct.pack("=II", 5, 0) + lying.data[8:]
    with pytest.raises(p.ProtocolError, match="claims 5 areas"):
        p.sparse_mmap_areas(lying)


def test_io_fd_sub_regions_decode_by_stride():
    subs = [p.IoFdSubRegion(0x10, 4, 0, p.VFIO_USER_IO_FD_TYPE_IOEVENTFD, 0, 0, 7),
            p.IoFdSubRegion(0x20, 4, 1, p.VFIO_USER_IO_FD_TYPE_IOREGIONFD, 0, 0, 9)]
    reply = p.RegionIoFds(16 + 80, 0, 0, 2, b"".join(s.pack() for s in subs))
    assert p.io_fd_sub_regions(p.RegionIoFds.unpack(reply.pack())) == subs


def test_write_multi_checks_its_count():
    entries = [p.WriteMultiEntry(4 * i, 0, 4, struct.pack("=Q", i)) for i in range(3)]
    raw = p.RegionWriteMulti(entries).pack()
    assert p.RegionWriteMulti.unpack(raw).entries == entries
    with pytest.raises(p.ProtocolError, match="wr_cnt 4 needs"):
        p.RegionWriteMulti.unpack(struct.pack("=Q", 4) + raw[8:])
    bad = p.RegionWriteMulti([p.WriteMultiEntry(0, 0, 9, b"\0" * 8)]).pack()
    with pytest.raises(p.ProtocolError, match="9 bytes"):
        p.RegionWriteMulti.unpack(bad)


def test_decode_dispatches_on_command_and_direction():
    req = p.command(1, p.Command.REGION_READ, p.RegionAccess(0x10, 7, 4))
    assert p.decode(req) == p.RegionAccess(0x10, 7, 4)
    rep = req.reply(p.RegionAccess(0x10, 7, 4, b"\1\2\3\4").pack())
    assert p.decode(rep).data == b"\1\2\3\4"
    with pytest.raises(p.ProtocolError) as exc:
        p.decode(p.Message(1, 14))
    assert exc.value.errno == errno.ENOSYS
    with pytest.raises(p.ProtocolError, match="DEVICE_GET_INFO: .*payload is 3 bytes"):
        p.decode(p.command(1, p.Command.DEVICE_GET_INFO, b"abc"))
    assert p.decode(req.error_reply(errno.EFAULT)) == p.Empty()


def test_parser_handles_input_cut_anywhere_and_attributes_fds():
    a = p.command(1, p.Command.DEVICE_GET_INFO, p.DeviceInfo(16, 0, 0, 0))
    b = p.command(2, p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x1000, 0x1000))
    stream = a.encode() + b.encode()
    for cut in range(len(stream) + 1):
        parser = p.Parser()
        parser.feed(stream[:cut])
        first = parser.messages()
        # each sendmsg's bytes in a chunk of their own, the fds with the second message's
        if cut <= len(a.encode()):
            parser.feed(stream[cut:len(a.encode())])
            parser.feed(stream[len(a.encode()):], [99])
        else:
            parser.feed(stream[cut:])
        got = first + parser.messages()
        assert [m.msg_id for m in got] == [1, 2]
        assert got[1].payload == b.payload
        if cut <= len(a.encode()):
            assert got[0].fds == [] and got[1].fds == [99]


def test_fds_go_to_the_message_holding_the_last_byte_of_their_chunk():
    """What Linux does: a recvmsg() takes the bytes of a sendmsg() without fds together with
    those of the next one with fds; the fds are the second message's."""
    a = p.command(1, p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0xFFFC0000, 0x40000))
    b = p.command(2, p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0, 0x10000000))
    c = p.command(3, p.Command.DMA_MAP, p.DmaMap(32, 1, 0, 0xC0000, 0x20000))
    parser = p.Parser()
    parser.feed(a.encode() + b.encode(), [99])
    parser.feed(c.encode())
    assert [(m.msg_id, m.fds) for m in parser.messages()] == [(1, []), (2, [99]), (3, [])]


def test_a_unix_socket_glues_a_message_without_fds_to_the_next_with_fds():
    """The kernel behaviour the parser relies on, on this kernel: one recvmsg() returns both
    sendmsg()s' bytes and the second's fd; the parser gives the fd to the second message."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        a = p.command(1, p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0xFFFC0000, 0x40000)).encode()
        b = p.command(2, p.Command.DMA_MAP, p.DmaMap(32, 3, 0, 0, 0x10000000)).encode()
        left.sendmsg([a])
        left.sendmsg([b], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
        data, anc, _, _ = right.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 4))
        fds = [fd for _, _, blob in anc for fd in struct.unpack(f"{len(blob) // 4}i", blob)]
        assert data == a + b and len(fds) == 1  # glued: the fd came with a chunk that starts with a
        parser = p.Parser()
        parser.feed(data, fds)
        first, second = parser.messages()
        assert first.fds == [] and second.fds == fds
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


@pytest.mark.parametrize("size, words", [(8, "smaller than the 16-byte header"), (1 << 30, "over the negotiated maximum")])
def test_parser_rejects_lying_sizes(size, words):
    parser = p.Parser(max_size=4096)
    parser.feed(struct.pack("=HHIII", 7, 9, size, 0, 0))
    with pytest.raises(p.ProtocolError, match=words) as exc:
        parser.next_message()
    assert exc.value.fatal
    with pytest.raises(p.ProtocolError):  # and stays broken
        parser.next_message()


def test_parser_rejects_reserved_type():
    parser = p.Parser()
    parser.feed(struct.pack("=HHIII", 7, 9, 16, 5, 0))
    with pytest.raises(p.ProtocolError, match="reserved type 5"):
        parser.next_message()


def test_parser_hands_back_unattributed_fds():
    r, w = os.pipe()
    parser = p.Parser()
    parser.feed(b"\1\0", [r, w])
    assert parser.take_fds() == [r, w]
    os.close(r)
    os.close(w)


# --- property tests --------------------------------------------------------------

structs = st.one_of(
    st.builds(p.DmaMap, u32, u32, u64, u64, u64),
    st.builds(p.DmaUnmap, u32, u32, u64, u64),
    st.builds(p.DeviceInfo, u32, u32, u32, u32),
    st.builds(p.RegionInfo, u32, u32, u32, u32, u64, u64, st.binary(max_size=64)),
    st.builds(p.RegionIoFds, u32, u32, u32, u32, st.binary(max_size=80)),
    st.builds(p.IrqInfo, u32, u32, u32, u32),
    st.builds(p.IrqSet, u32, u32, u32, u32, u32, st.binary(max_size=16)),
    st.builds(p.RegionAccess, u64, u32, u32, st.binary(max_size=64)),
    st.builds(p.DmaAccess, u64, u64, st.binary(max_size=64)),
    st.builds(p.DeviceFeature, u32, u32, st.binary(max_size=32)),
    st.builds(p.WriteMultiReply, u64),
    st.builds(p.RegionWriteMulti, st.lists(st.builds(p.WriteMultiEntry, u64, u32, st.integers(1, 8),
                                                     st.binary(min_size=8, max_size=8)), max_size=8)),
    st.builds(p.Version, u16, u16, st.builds(p.Capabilities, st.integers(0, 255), u32, u32, u64,
                                             st.just(False), st.booleans())),
)


@given(structs)
def test_every_structure_round_trips(s):
    assert type(s).unpack(s.pack()) == s


@given(st.lists(st.tuples(u16, st.sampled_from(list(p.Command)), st.binary(max_size=200), st.booleans()),
                max_size=10), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_message_streams_round_trip_in_any_pieces(msgs, cuts):
    sent = [p.Message(i, int(c), body, p.TYPE_REPLY if r else p.TYPE_COMMAND) for i, c, body, r in msgs]
    stream = b"".join(m.encode() for m in sent)
    parser = p.Parser()
    got = []
    pos = 0
    for cut in cuts * (len(stream) // max(1, sum(cuts)) + 1):
        parser.feed(stream[pos:pos + cut])
        pos += cut
        got += parser.messages()
    parser.feed(stream[pos:])
    got += parser.messages()
    assert got == sent


@settings(max_examples=300)
@given(st.binary(max_size=512), st.integers(16, 4096))
def test_random_bytes_only_ever_raise_protocol_error(data, max_size):
    parser = p.Parser(max_size=max_size)
    parser.feed(data)
    try:
        for msg in parser.messages():
            try:
                p.decode(msg)
            except p.ProtocolError:
                pass
    except p.ProtocolError as exc:
        assert exc.fatal


@settings(max_examples=300)
@given(st.sampled_from(list(p.Command)), st.booleans(), st.binary(max_size=128))
def test_random_payloads_only_ever_raise_protocol_error(cmd, reply, payload):
    try:
        p.decode(p.Message(1, int(cmd), payload, p.TYPE_REPLY if reply else p.TYPE_COMMAND))
    except p.ProtocolError:
        pass
