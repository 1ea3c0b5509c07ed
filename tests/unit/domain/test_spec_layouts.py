"""pcipass serve and the frontend, every message either side implements, against the spec's tables.

A relay between the two records the byte streams; each message is then taken
apart with offsets and sizes written out here from QEMU's
docs/interop/vfio-user.rst (not with pcipass's codec), so a layout both sides
got wrong the same way still fails. No peer code is built.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import threading

import pytest

from pcipass.device import IrqKind
from pcipass.domain import connect
from pcipass.domain import protocol as p
from pcipass.domain.client import RemoteError

edu_driver = pytest.importorskip("pcipass.drivers.edu", reason="the edu driver (vfio part) is not in this checkout")


class Relay:
    """Accepts the frontend, connects to the server, passes bytes and fds both ways, keeps the bytes."""

    def __init__(self, tmp_path, server_path) -> None:
        self.path = str(tmp_path / "relay.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.server_path = str(server_path)
        self.streams = {"client": bytearray(), "server": bytearray()}  # by sender
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        front, _ = self.listener.accept()
        back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        back.connect(self.server_path)
        peer = {front: (back, "client"), back: (front, "server")}
        try:
            while True:
                for s in select.select([front, back], [], [])[0]:
                    data, anc, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
                    if not data:
                        return
                    to, who = peer[s]
                    self.streams[who] += data
                    fds = [fd for _, _, blob in anc for fd in struct.unpack(f"{len(blob) // 4}i", blob)]
                    if fds:
                        to.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
                        for fd in fds:
                            os.close(fd)
                    else:
                        to.sendall(data)
        except OSError:
            return
        finally:
            front.close()
            back.close()


# The spec's header: id (2) @0, command (2) @2, size (4) @4, flags (4) @8, error (4) @12.
def split(stream: bytes) -> list[tuple[int, int, int, int, bytes]]:
    out, at = [], 0
    while at < len(stream):
        msg_id, cmd = struct.unpack_from("<HH", stream, at)  # the tests' host is little-endian
        (size,) = struct.unpack_from("<I", stream, at + 4)
        (flags,) = struct.unpack_from("<I", stream, at + 8)
        (error,) = struct.unpack_from("<I", stream, at + 12)
        assert size >= 16 and at + size <= len(stream)
        out.append((msg_id, cmd, flags, error, bytes(stream[at + 16 : at + size])))
        at += size
    return out


def u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


# Request and reply payload sizes from the spec's tables (fixed part; "+" means data may follow).
FIXED = {
    # command: (request size, reply size)
    2: (32, 0),  # DMA_MAP: argsz 4, flags 4, offset 8, address 8, size 8; no reply payload
    3: (24, 24),  # DMA_UNMAP: argsz 4, flags 4, address 8, size 8
    4: (16, 16),  # DEVICE_GET_INFO: argsz, flags, num_regions, num_irqs
    5: (32, "32+"),  # GET_REGION_INFO: argsz, flags, index, cap_offset, size 8, offset 8 (+ caps)
    6: (16, "16+"),  # GET_REGION_IO_FDS: argsz, flags, index, count (+ sub-regions)
    7: (16, 16),  # GET_IRQ_INFO: argsz, flags, index, count
    8: ("20+", 0),  # SET_IRQS: argsz, flags, index, start, count (+ data); no reply payload
    9: (16, "16+"),  # REGION_READ: offset 8, region 4, count 4; reply + data
    10: ("16+", 16),  # REGION_WRITE
    11: (16, "16+"),  # DMA_READ: address 8, count 8; reply + data
    12: ("16+", (12, 16)),  # DMA_WRITE: reply address 8, count 4 in the spec's table; 16 as libvfio-user
    13: (0, 0),  # DEVICE_RESET
    15: ("8+", 8),  # REGION_WRITE_MULTI: wr_cnt 8, wrs of 24 each; reply wr_cnt 8
    16: ("8+", "8+"),  # DEVICE_FEATURE: argsz 4, flags 4 (+ data)
}


def fits(size: int, rule) -> bool:
    if isinstance(rule, tuple):
        return size in rule
    if isinstance(rule, str):
        return size >= int(rule[:-1])
    return size == rule


def check_message(direction: str, msg_id: int, cmd: int, flags: int, error: int, payload: bytes, requests) -> None:
    kind = flags & 0xF
    assert kind in (0, 1), f"reserved type {kind}"
    if kind == 0:
        assert error == 0, "Error is reserved in a command"
        requests[(direction, msg_id)] = (cmd, payload)
        if cmd == 1:
            return
        assert fits(len(payload), FIXED[cmd][0]), f"command {cmd} request of {len(payload)} bytes"
        if cmd in (9, 11):  # a read carries no data
            assert len(payload) == 16
        if cmd in (10, 12):
            count = u(payload, 12, 4) if cmd == 10 else u(payload, 8, 8)
            assert len(payload) == 16 + count, "a write carries count bytes"
        if cmd == 8:
            assert u(payload, 0, 4) >= 20
        if cmd == 15:
            wr_cnt = u(payload, 0, 8)
            assert len(payload) == 8 + 24 * wr_cnt
            for i in range(wr_cnt):
                assert 1 <= u(payload, 8 + 24 * i + 12, 4) <= 8
        return
    other = "server" if direction == "client" else "client"
    req_cmd, req = requests.pop((other, msg_id))
    assert cmd == req_cmd, "a reply carries its command's number"
    if flags & 0x20:
        assert payload == b"", "an error reply is the header only"
        return
    if cmd == 1:
        major, minor = struct.unpack_from("<HH", payload)
        assert payload.endswith(b"\0") and major == 0 and minor <= u(req, 2, 2)
        json.loads(payload[4:-1])
        return
    assert fits(len(payload), FIXED[cmd][1]), f"command {cmd} reply of {len(payload)} bytes"
    if cmd in (9, 10):  # offset, region, count echoed
        assert payload[:16] == req[:16]
    if cmd == 9:
        assert len(payload) == 16 + u(req, 12, 4)
    if cmd == 11:
        assert payload[:16] == req[:16] and len(payload) == 16 + u(req, 8, 8)
    if cmd == 12:
        assert payload[:8] == req[:8] and u(payload, 8, 4) == u(req, 8, 8)
    if cmd in (4, 5, 6, 7):
        assert u(payload, 0, 4) >= len(payload) or cmd == 5  # argsz: what a full reply needs
    if cmd == 5:
        assert u(payload, 8, 4) == u(req, 8, 4)  # index
        if u(payload, 4, 4) & p.VFIO_REGION_INFO_FLAG_CAPS and len(payload) > 32:
            assert u(payload, 12, 4) >= 32  # cap_offset from the start of the structure
    if cmd == 7:
        assert u(payload, 8, 4) == u(req, 8, 4)
    if cmd == 15:
        assert u(payload, 0, 8) == u(req, 0, 8)


def test_every_message_both_sides_implement_matches_the_spec(edu_server, tmp_path):
    relay = Relay(tmp_path, edu_server.path)
    seen: set[tuple[str, int, bool]] = set()
    # One socket (a twin socket's fd would bypass the relay) and no shared DMA memory, so the
    # server's DMA_READ/DMA_WRITE come through here too.
    dev = connect(relay.path, timeout=5, twin_socket=False, share_dma_memory=False)
    try:
        edu = edu_driver.Edu(dev, irq=IrqKind.MSI, timeout=5)
        data = os.urandom(64)
        assert edu.dma_roundtrip(data) == data  # DMA_MAP, SET_IRQS, REGION_*, DMA_READ/WRITE, DMA_UNMAP
        edu.close()
        for index in range(5):
            dev.irq_count(IrqKind(index))  # GET_IRQ_INFO (ERR: EINVAL, an error reply)
        dev.region(2)  # GET_REGION_INFO of an absent BAR
        dev.call(p.Command.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds(16, 0, 0, 0))
        writes = [p.WriteMultiEntry(0x04, 0, 4, (0x55).to_bytes(8, "little")),
                  p.WriteMultiEntry(0x08, 0, 4, (0x77).to_bytes(8, "little"))]
        assert dev.call(p.Command.REGION_WRITE_MULTI, p.RegionWriteMulti(writes)).wr_cnt == 2
        assert dev.region(0).read(0x04, 4) == ~0x55 & 0xFFFFFFFF  # edu's liveness: the write arrived
        with pytest.raises(RemoteError) as refused:  # DEVICE_FEATURE: no features served
            dev.call(p.Command.DEVICE_FEATURE, p.DeviceFeature(8, p.VFIO_DEVICE_FEATURE_PROBE | 1))
        assert refused.value.errno == errno.ENOTSUP
        dev.reset()
    finally:
        dev.close()
    relay.thread.join(5)
    requests: dict = {}
    for direction in ("client", "server"):
        for msg_id, cmd, flags, error, payload in split(relay.streams[direction]):
            seen.add((direction, cmd, bool(flags & 1)))
    # Every request first, then every reply against the request it answers (ids are per sender).
    for direction in ("client", "server"):
        for m in split(relay.streams[direction]):
            if not m[2] & 0xF:
                check_message(direction, *m, requests)
    for direction in ("client", "server"):
        for m in split(relay.streams[direction]):
            if m[2] & 0xF:
                check_message(direction, *m, requests)
    assert not requests, f"commands without a reply: {sorted(requests)}"
    client_commands = {c for d, c, r in seen if d == "client" and not r}
    assert client_commands == {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 15, 16}
    assert {c for d, c, r in seen if d == "server" and not r} == {11, 12}  # DMA by message
