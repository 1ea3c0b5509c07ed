"""The vfio-user wire protocol (QEMU docs/interop/vfio-user.rst, 0.9.x), sans IO.

Pure functions and classes over bytes and file descriptors: no sockets here.
A `Message` is a header, a payload and the fds that travelled beside it
(SCM_RIGHTS on a UNIX socket). Payload structures mirror the spec's tables,
one dataclass each, with `pack()` and `unpack()`. `Parser` turns a byte
stream (fed in any pieces, with the fds received alongside) into messages and
rejects framing lies with a precise `ProtocolError`.

All integers are in host byte order, as the spec says for this revision.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pcipass.errors import PcipassError

VERSION_MAJOR = 0
VERSION_MINOR = 1

HEADER = struct.Struct("=HHIII")  # msg id, command, size, flags, error
HEADER_SIZE = HEADER.size  # 16

# Header flags.
FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5

# Defaults the spec gives when a capability is absent.
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096
# A VERSION message carries JSON of unbounded size in principle; we bound it.
MAX_VERSION_DATA = 4096
# Room for fixed structures and region-info capability chains beside the data.
MESSAGE_OVERHEAD = 4096


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# Values shared with linux/vfio.h come from its one mirror.
from pcipass.vfio.uapi import (  # noqa: E402, F401 (re-exported for the codec's users)
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS,
    VFIO_PCI_ROM_REGION_INDEX,
    VFIO_PCI_VGA_REGION_INDEX,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_CAP_TYPE,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
)

VFIO_USER_IO_FD_TYPE_IOEVENTFD = 0
VFIO_USER_IO_FD_TYPE_IOREGIONFD = 1
# REGION_WRITE_MULTI carries writes of at most this many bytes each.
WRITE_MULTI_DATA = 8


class ProtocolError(PcipassError):
    """The peer broke the protocol. `errno` is what a reply should carry."""

    def __init__(self, message: str, *, errno_: int = errno.EINVAL, fatal: bool = False) -> None:
        super().__init__(
            message,
            hint="the peer does not speak vfio-user 0.9 as QEMU's docs/interop/vfio-user.rst "
            "describes it; check its version and message sizes",
            code="vfio-user-protocol",
        )
        self.errno = errno_
        # Fatal: the byte stream cannot be trusted any more (framing is lost).
        self.fatal = fatal


# --- Messages -----------------------------------------------------------------


@dataclass
class Message:
    """One vfio-user message: header fields, payload bytes, fds received with it."""

    msg_id: int
    command: int
    payload: bytes = b""
    flags: int = TYPE_COMMAND
    error: int = 0
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.flags & FLAG_TYPE_MASK == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def size(self) -> int:
        return HEADER_SIZE + len(self.payload)

    def encode(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error) + self.payload

    def reply(self, payload: bytes = b"", fds: list[int] | None = None) -> Message:
        return Message(self.msg_id, self.command, payload, TYPE_REPLY, 0, list(fds or []))

    def error_reply(self, err: int) -> Message:
        # The spec: an error reply carries only the header.
        return Message(self.msg_id, self.command, b"", TYPE_REPLY | FLAG_ERROR, err)

    def command_name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"command {self.command}"


def command(msg_id: int, cmd: Command, body: Any = b"", fds: list[int] | None = None,
            no_reply: bool = False) -> Message:
    payload = body if isinstance(body, (bytes, bytearray)) else body.pack()
    flags = TYPE_COMMAND | (FLAG_NO_REPLY if no_reply else 0)
    return Message(msg_id, int(cmd), bytes(payload), flags, 0, list(fds or []))


# --- Payload structures ---------------------------------------------------------


class _Struct:
    """A payload: a fixed part packed with `FMT`, optionally a variable tail.

    Fields are the dataclass fields in order; if `TAIL` names a bytes field,
    it is the last one and takes the rest of the payload.
    """

    FMT: ClassVar[struct.Struct]
    TAIL: ClassVar[str | None] = None
    _FIXED: ClassVar[tuple[str, ...]]  # the packed fields' names, computed once per class

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls._FIXED = ()

    def pack(self) -> bytes:
        cls = type(self)
        if not cls._FIXED:
            cls._FIXED = tuple(f.name for f in dataclasses.fields(self) if f.name != self.TAIL)  # type: ignore[arg-type]
        out = self.FMT.pack(*[getattr(self, n) for n in cls._FIXED])
        if self.TAIL:
            out += bytes(getattr(self, self.TAIL))
        return out

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Any:
        if type(data) is not bytes:
            data = bytes(data)
        if len(data) < cls.FMT.size:
            raise ProtocolError(
                f"{cls.__name__}: payload is {len(data)} bytes, the structure needs {cls.FMT.size}"
            )
        if not cls.TAIL and len(data) != cls.FMT.size:
            raise ProtocolError(
                f"{cls.__name__}: payload is {len(data)} bytes, the structure is {cls.FMT.size}"
            )
        values = list(cls.FMT.unpack_from(data))
        if cls.TAIL:
            values.append(data[cls.FMT.size :])
        return cls(*values)


@dataclass
class Capabilities:
    """The `capabilities` object of VERSION, with the spec's defaults."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    twin_socket: bool = False
    write_multiple: bool = False
    # In a reply that enables twin-socket mode: which of the reply's fds is the client's end.
    twin_fd_index: int | None = None

    _NUMBERS: ClassVar[tuple[str, ...]] = ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes")

    def to_json(self) -> dict[str, Any]:
        caps: dict[str, Any] = {n: getattr(self, n) for n in self._NUMBERS}
        # Absent means unsupported, so twin_socket is sent only when supported, and migration
        # never (QEMU 11.1 warns of "spurious capabilities" at any key it does not know,
        # twin_socket among them: a server offers it only to a client that proposed it).
        if self.twin_socket:
            caps["twin_socket"] = {"supported": True}
            if self.twin_fd_index is not None:
                caps["twin_socket"]["fd_index"] = self.twin_fd_index
        caps["write_multiple"] = self.write_multiple
        return {"capabilities": caps}

    @classmethod
    def from_json(cls, doc: Any) -> Capabilities:
        if not isinstance(doc, dict):
            raise ProtocolError("VERSION: the version data is not a JSON object")
        caps = doc.get("capabilities", {})
        if not isinstance(caps, dict):
            raise ProtocolError("VERSION: 'capabilities' is not a JSON object")
        out = cls()
        for name in cls._NUMBERS:
            if name in caps:
                value = caps[name]
                if type(value) is not int or not 0 <= value < 1 << 64:
                    raise ProtocolError(f"VERSION: capability {name} must be an unsigned integer, not {value!r}")
                setattr(out, name, value)
        twin = caps.get("twin_socket", {})
        out.twin_socket = isinstance(twin, dict) and twin.get("supported") is True
        if out.twin_socket and "fd_index" in twin:
            index = twin["fd_index"]
            if type(index) is not int or not 0 <= index < 1 << 31:
                raise ProtocolError(f"VERSION: twin_socket.fd_index must be a small unsigned integer, not {index!r}")
            out.twin_fd_index = index
        out.write_multiple = caps.get("write_multiple") is True
        return out

    def negotiate(self, ours: Capabilities) -> Capabilities:
        """What both sides can live with: the smaller of each limit."""
        pg = self.pgsizes & ours.pgsizes
        return Capabilities(
            max_msg_fds=min(self.max_msg_fds, ours.max_msg_fds),
            max_data_xfer_size=min(self.max_data_xfer_size, ours.max_data_xfer_size),
            max_dma_maps=min(self.max_dma_maps, ours.max_dma_maps),
            pgsizes=pg or ours.pgsizes,
            twin_socket=self.twin_socket and ours.twin_socket,
            write_multiple=self.write_multiple and ours.write_multiple,
        )


@dataclass
class Version:
    major: int
    minor: int
    capabilities: Capabilities = field(default_factory=Capabilities)

    _FMT: ClassVar[struct.Struct] = struct.Struct("=HH")

    def pack(self) -> bytes:
        text = json.dumps(self.capabilities.to_json(), separators=(",", ":")).encode()
        return self._FMT.pack(self.major, self.minor) + text + b"\0"

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Version:
        data = bytes(data)
        if len(data) < cls._FMT.size:
            raise ProtocolError(f"VERSION: payload is {len(data)} bytes, needs at least 4")
        major, minor = cls._FMT.unpack_from(data)
        text = data[cls._FMT.size :]
        if not text:
            return cls(major, minor)
        if len(text) > MAX_VERSION_DATA:
            raise ProtocolError(f"VERSION: version data of {len(text)} bytes is over {MAX_VERSION_DATA}")
        if not text.endswith(b"\0") or b"\0" in text[:-1]:
            raise ProtocolError("VERSION: version data must be one NUL-terminated string")
        try:
            doc = json.loads(text[:-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"VERSION: version data is not UTF-8 JSON ({exc})") from None
        return cls(major, minor, Capabilities.from_json(doc))


@dataclass
class DmaMap(_Struct):
    argsz: int
    flags: int
    offset: int
    address: int
    size: int
    FMT = struct.Struct("=IIQQQ")


@dataclass
class DmaUnmap(_Struct):
    argsz: int
    flags: int
    address: int
    size: int
    FMT = struct.Struct("=IIQQ")


@dataclass
class DeviceInfo(_Struct):
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int
    FMT = struct.Struct("=IIII")


@dataclass
class RegionInfo(_Struct):
    """struct vfio_region_info, followed in a reply by its capability chain."""

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: bytes = b""
    FMT = struct.Struct("=IIIIQQ")
    TAIL = "caps"


CAP_HEADER = struct.Struct("=HHI")  # id, version, next (from the start of RegionInfo)
SPARSE_HEADER = struct.Struct("=II")  # nr_areas, reserved
SPARSE_AREA = struct.Struct("=QQ")  # offset, size


@dataclass
class RegionCap:
    id: int
    version: int
    data: bytes


def sparse_mmap_cap(areas: list[tuple[int, int]]) -> RegionCap:
    body = SPARSE_HEADER.pack(len(areas), 0) + b"".join(SPARSE_AREA.pack(o, s) for o, s in areas)
    return RegionCap(VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, body)


def sparse_mmap_areas(cap: RegionCap) -> list[tuple[int, int]]:
    if len(cap.data) < SPARSE_HEADER.size:
        raise ProtocolError("sparse mmap capability is shorter than its header")
    (count, _) = SPARSE_HEADER.unpack_from(cap.data)
    if SPARSE_HEADER.size + count * SPARSE_AREA.size > len(cap.data):
        raise ProtocolError(f"sparse mmap capability claims {count} areas it does not carry")
    return [SPARSE_AREA.unpack_from(cap.data, SPARSE_HEADER.size + i * SPARSE_AREA.size) for i in range(count)]


def region_info_with_caps(info: RegionInfo, caps: list[RegionCap]) -> RegionInfo:
    """Lay `caps` out after the fixed structure and link them, as the kernel does."""
    base = RegionInfo.FMT.size
    chain = b""
    offsets = []
    for cap in caps:
        offsets.append(base + len(chain))
        chain += CAP_HEADER.pack(cap.id, cap.version, 0) + cap.data
        chain += b"\0" * (-len(chain) % 8)
    out = bytearray(chain)
    for i, off in enumerate(offsets):
        nxt = offsets[i + 1] if i + 1 < len(offsets) else 0
        struct.pack_into("=I", out, off - base + 4, nxt)
    flags = info.flags | (VFIO_REGION_INFO_FLAG_CAPS if caps else 0)
    return dataclasses.replace(
        info, flags=flags, cap_offset=offsets[0] if caps else 0, argsz=base + len(out), caps=bytes(out)
    )


def region_caps(info: RegionInfo) -> list[RegionCap]:
    """Walk a reply's capability chain; rejects pointers out of range and loops."""
    if not info.flags & VFIO_REGION_INFO_FLAG_CAPS or not info.cap_offset:
        return []
    base = RegionInfo.FMT.size
    blob = info.caps
    caps: list[RegionCap] = []
    seen: set[int] = set()
    off = info.cap_offset
    while off:
        if off in seen:
            raise ProtocolError(f"region {info.index}: capability chain loops at {off}")
        seen.add(off)
        rel = off - base
        if rel < 0 or rel + CAP_HEADER.size > len(blob):
            raise ProtocolError(f"region {info.index}: capability at {off} is outside the reply")
        cap_id, version, nxt = CAP_HEADER.unpack_from(blob, rel)
        end = (nxt - base) if nxt else len(blob)
        if nxt and (end <= rel or end > len(blob)):
            raise ProtocolError(f"region {info.index}: capability next pointer {nxt} is out of order")
        caps.append(RegionCap(cap_id, version, blob[rel + CAP_HEADER.size : end]))
        off = nxt
    return caps


@dataclass
class RegionIoFds(_Struct):
    argsz: int
    flags: int
    index: int
    count: int
    sub_regions: bytes = b""
    FMT = struct.Struct("=IIII")
    TAIL = "sub_regions"


@dataclass
class IoFdSubRegion(_Struct):
    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    padding: int
    datamatch: int  # user_data for an ioregionfd
    FMT = struct.Struct("=QQIIIIQ")


def io_fd_sub_regions(reply: RegionIoFds) -> list[IoFdSubRegion]:
    if reply.count == 0:
        return []
    stride = len(reply.sub_regions) // reply.count
    if stride < IoFdSubRegion.FMT.size:
        raise ProtocolError(f"GET_REGION_IO_FDS: {reply.count} sub-regions do not fit in the reply")
    return [
        IoFdSubRegion.unpack(reply.sub_regions[i * stride : i * stride + IoFdSubRegion.FMT.size])
        for i in range(reply.count)
    ]


@dataclass
class IrqInfo(_Struct):
    argsz: int
    flags: int
    index: int
    count: int
    FMT = struct.Struct("=IIII")


@dataclass
class IrqSet(_Struct):
    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    FMT = struct.Struct("=IIIII")
    TAIL = "data"


@dataclass
class RegionAccess(_Struct):
    """REGION_READ/WRITE request and reply: data present in a read reply and a write request."""

    offset: int
    region: int
    count: int
    data: bytes = b""
    FMT = struct.Struct("=QII")
    TAIL = "data"


@dataclass
class DmaAccess(_Struct):
    """DMA_READ/WRITE: data present in a read reply and a write request.

    The spec's table gives DMA_WRITE's reply count 4 bytes; libvfio-user sends
    the same 16-byte structure as everywhere else, and so do we. Decoding
    accepts both.
    """

    address: int
    count: int
    data: bytes = b""
    FMT = struct.Struct("=QQ")
    TAIL = "data"

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> DmaAccess:
        data = bytes(data)
        if len(data) == 12:
            address, count = struct.unpack("=QI", data)
            return cls(address, count)
        return super().unpack(data)  # type: ignore[no-any-return]


@dataclass
class WriteMultiEntry(_Struct):
    offset: int
    region: int
    count: int
    data: bytes  # always 8 bytes on the wire; the first `count` matter
    FMT = struct.Struct(f"=QII{WRITE_MULTI_DATA}s")


@dataclass
class RegionWriteMulti:
    entries: list[WriteMultiEntry]

    _COUNT: ClassVar[struct.Struct] = struct.Struct("=Q")

    def pack(self) -> bytes:
        return self._COUNT.pack(len(self.entries)) + b"".join(e.pack() for e in self.entries)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> RegionWriteMulti:
        data = bytes(data)
        if len(data) < cls._COUNT.size:
            raise ProtocolError("REGION_WRITE_MULTI: payload is shorter than wr_cnt")
        (count,) = cls._COUNT.unpack_from(data)
        size = WriteMultiEntry.FMT.size
        if len(data) != cls._COUNT.size + count * size:
            raise ProtocolError(
                f"REGION_WRITE_MULTI: wr_cnt {count} needs {cls._COUNT.size + count * size} bytes, "
                f"payload has {len(data)}"
            )
        entries = [WriteMultiEntry.unpack(data[8 + i * size : 8 + (i + 1) * size]) for i in range(count)]
        for e in entries:
            if not 0 < e.count <= WRITE_MULTI_DATA:
                raise ProtocolError(f"REGION_WRITE_MULTI: a write of {e.count} bytes (1..8 allowed)")
        return cls(entries)


@dataclass
class WriteMultiReply(_Struct):
    wr_cnt: int
    FMT = struct.Struct("=Q")


@dataclass
class DeviceFeature(_Struct):
    argsz: int
    flags: int
    data: bytes = b""
    FMT = struct.Struct("=II")
    TAIL = "data"


@dataclass
class MigDataAccess(_Struct):
    argsz: int
    size: int
    data: bytes = b""
    FMT = struct.Struct("=II")
    TAIL = "data"


@dataclass
class Empty:
    """DEVICE_RESET, and replies that carry nothing (DMA_MAP, SET_IRQS)."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Empty:
        if len(data):
            raise ProtocolError(f"payload of {len(data)} bytes where none is allowed")
        return cls()


# (command) -> (request type, reply type)
PAYLOADS: dict[Command, tuple[Any, Any]] = {
    Command.VERSION: (Version, Version),
    Command.DMA_MAP: (DmaMap, Empty),
    Command.DMA_UNMAP: (DmaUnmap, DmaUnmap),
    Command.DEVICE_GET_INFO: (DeviceInfo, DeviceInfo),
    Command.DEVICE_GET_REGION_INFO: (RegionInfo, RegionInfo),
    Command.DEVICE_GET_REGION_IO_FDS: (RegionIoFds, RegionIoFds),
    Command.DEVICE_GET_IRQ_INFO: (IrqInfo, IrqInfo),
    Command.DEVICE_SET_IRQS: (IrqSet, Empty),
    Command.REGION_READ: (RegionAccess, RegionAccess),
    Command.REGION_WRITE: (RegionAccess, RegionAccess),
    Command.DMA_READ: (DmaAccess, DmaAccess),
    Command.DMA_WRITE: (DmaAccess, DmaAccess),
    Command.DEVICE_RESET: (Empty, Empty),
    Command.REGION_WRITE_MULTI: (RegionWriteMulti, WriteMultiReply),
    Command.DEVICE_FEATURE: (DeviceFeature, DeviceFeature),
    Command.MIG_DATA_READ: (MigDataAccess, MigDataAccess),
    Command.MIG_DATA_WRITE: (MigDataAccess, MigDataAccess),
}


_PAYLOADS_BY_NUMBER = {int(c): (c, *types) for c, types in PAYLOADS.items()}


def decode(msg: Message) -> Any:
    """The payload of `msg` as its structure; ProtocolError if it does not fit."""
    entry = _PAYLOADS_BY_NUMBER.get(msg.command)
    if entry is None:
        raise ProtocolError(f"unknown command {msg.command}", errno_=errno.ENOSYS)
    cmd, request, reply = entry
    is_reply = msg.flags & FLAG_TYPE_MASK == TYPE_REPLY
    if is_reply and msg.flags & FLAG_ERROR:
        return Empty.unpack(msg.payload)
    try:
        return (reply if is_reply else request).unpack(msg.payload)
    except ProtocolError as exc:
        raise ProtocolError(f"{cmd.name}: {exc.message}", errno_=exc.errno) from None


# --- The hot path: small REGION_READ/WRITE, without building objects ------------------

# A REGION_READ or REGION_WRITE of 1..8 bytes: the header and RegionAccess's fixed part, then
# in a write request (or a read reply) `count` bytes of data.
ACCESS = struct.Struct("=HHIIIQII")  # msg id, command, size, flags, error, offset, region, count
ACCESS_SIZE = ACCESS.size  # 32
ACCESS_DATA = {1: struct.Struct("=B"), 2: struct.Struct("=H"), 4: struct.Struct("=I"), 8: struct.Struct("=Q")}


def access_reply_template(cmd: int, offset: int, region: int, count: int) -> bytearray:
    """The encoded reply to a small REGION_READ (data left 0) or REGION_WRITE, message id 0:
    the same bytes Message.encode() makes once the id (bytes 0..1) and a read's data are put in."""
    size = ACCESS_SIZE + (count if cmd == Command.REGION_READ else 0)
    return bytearray(ACCESS.pack(0, cmd, size, TYPE_REPLY, 0, offset, region, count)) + bytes(size - ACCESS_SIZE)


def error_reply_bytes(msg_id: int, cmd: int, err: int) -> bytes:
    return HEADER.pack(msg_id, cmd, HEADER_SIZE, TYPE_REPLY | FLAG_ERROR, err)


# --- Framing ----------------------------------------------------------------------


def max_message_size(max_data_xfer_size: int) -> int:
    return HEADER_SIZE + max_data_xfer_size + MESSAGE_OVERHEAD


class Parser:
    """Bytes (and fds) in, messages out. Handles input cut anywhere.

    Fds are attributed by stream position. Linux hands a recvmsg() on a UNIX
    stream socket the bytes of earlier sendmsg() calls that carried no fds
    together with those of one that did, and stops right after the latter:
    the fds that come with a chunk belong to the message its last byte is in
    (a client sending one message per sendmsg, as QEMU and libvfio-user do).
    Attributing them to the chunk's first byte gave a memfd to the DMA_MAP
    queued just before the one that sent it (QEMU sends its maps in bursts).
    A framing lie (size below the header, size over `max_size`, a reserved
    type) raises a fatal ProtocolError: the stream cannot be resynchronised.
    """

    def __init__(self, max_size: int = max_message_size(DEFAULT_MAX_DATA_XFER_SIZE)) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self.unparsed = self._buf  # read-only to others: bytes received, not yet in a message
        self._consumed = 0  # stream position of _buf[0]
        self._fds: deque[tuple[int, int]] = deque()  # (stream position, fd)
        self.broken: ProtocolError | None = None

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Add a chunk as one recvmsg() returned it, with the fds that came with it."""
        pos = self._consumed + len(self._buf) + max(len(data) - 1, 0)  # the chunk's last byte
        for fd in fds:
            self._fds.append((pos, fd))
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a whole message."""
        return len(self._buf)

    def next_message(self) -> Message | None:
        """The next whole message, or None if more bytes are needed."""
        if self.broken:
            raise self.broken
        if len(self._buf) < HEADER_SIZE:
            return None
        msg_id, cmd, size, flags, err = HEADER.unpack_from(self._buf)
        problem = None
        if size < HEADER_SIZE:
            problem = f"message {msg_id} (command {cmd}) says its size is {size}, smaller than the {HEADER_SIZE}-byte header"
        elif size > self.max_size:
            problem = f"message {msg_id} (command {cmd}) says its size is {size}, over the negotiated maximum {self.max_size}"
        elif flags & FLAG_TYPE_MASK not in (TYPE_COMMAND, TYPE_REPLY):
            problem = f"message {msg_id} (command {cmd}) has reserved type {flags & FLAG_TYPE_MASK}"
        if problem:
            self.broken = ProtocolError(problem, errno_=errno.EINVAL, fatal=True)
            raise self.broken
        if len(self._buf) < size:
            return None
        payload = bytes(self._buf[HEADER_SIZE:size])
        end = self._consumed + size
        fds = []
        while self._fds and self._fds[0][0] < end:
            fds.append(self._fds.popleft()[1])
        del self._buf[:size]
        self._consumed = end
        return Message(msg_id, cmd, payload, flags, err, fds)

    def messages(self) -> list[Message]:
        out = []
        while (msg := self.next_message()) is not None:
            out.append(msg)
        return out

    def take_fds(self) -> list[int]:
        """Fds not yet attributed to a message (for the owner to close)."""
        fds = [fd for _, fd in self._fds]
        self._fds.clear()
        return fds
