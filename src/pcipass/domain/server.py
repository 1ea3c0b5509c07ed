"""The vfio-user server: `pcipass serve`.

`Session` answers one client's messages (no sockets: message in, replies
out), with every check the spec asks for; `Server` owns the UNIX socket and
the loop: one client at a time, bounded sends, and when a client goes (or is
dropped) everything it gave is released and the device is reset before the
next one is accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import pwd
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pcipass.device import IrqKind
from pcipass.domain import protocol as p
from pcipass.domain.backend import Backend, BackendError, RemoteMemory
from pcipass.domain.policy import ConfigPolicy, Quirk
from pcipass.errors import PcipassError, UsageError

log = logging.getLogger(__name__)

# What this server offers in VERSION.
SERVER_CAPS = p.Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20, max_dma_maps=1024,
                             pgsizes=4096, write_multiple=True, twin_socket=True)


# Plain ints: socket's flags are IntFlag members, and `int & member` runs enum's Python __and__.
MSG_CTRUNC = int(socket.MSG_CTRUNC)
MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
ACCESS_SIZE = p.ACCESS_SIZE
RECV_ANC_SIZE = socket.CMSG_SPACE(SERVER_CAPS.max_msg_fds * 4)


class DropClient(Exception):
    """Stop serving this client (after sending any reply already queued)."""


# What an access on the fast path may raise that becomes an error reply (as on the general path).
FAST_REFUSALS = (BackendError, ValueError, PcipassError)


# A fast-table entry (Session._learn_access): the request's size; the reply as the buffers to
# send (the request's id, a view of the receive buffer; the rest of the reply; for a read of
# memory, a view of the access's bytes themselves) and its length; for a read to make, the
# access (a function of nothing), the data's pack_into and the buffer it packs into (at
# ACCESS_DATA_AT); for a write, a function of the receive buffer that makes it.
FastEntry = tuple[int, list[Any], int, Callable[[], int] | None, Callable[..., None] | None, bytearray | None,
                  Callable[[bytearray], None] | None]
ACCESS_DATA_AT = ACCESS_SIZE - 2  # a read's data in the reply after its id


def _write_access(access: Callable[[int], None], count: int) -> Callable[[bytearray], None]:
    """A fast-table write: the request's data (in the receive buffer) to the access."""
    end = ACCESS_SIZE + count
    from_bytes = int.from_bytes

    def write(buf: bytearray) -> None:
        access(from_bytes(buf[ACCESS_SIZE:end], "little"))
    return write


def _accesses(offset: int, count: int, widest: int) -> list[tuple[int, int]]:
    """Split [offset, offset+count) into aligned accesses of at most `widest` bytes."""
    out = []
    while count:
        w = widest
        while w > 1 and (offset % w or w > count):
            w //= 2
        out.append((offset, w))
        offset += w
        count -= w
    return out


class Session:
    """One client's conversation with the backend."""

    def __init__(self, backend: Backend, *, permissive: bool = False, quirks: Sequence[Quirk] = (),
                 trace: Callable[[str], None] | None = None, caps: p.Capabilities = SERVER_CAPS,
                 open_twin: Callable[[], int] | None = None, remote: RemoteMemory | None = None,
                 rbuf: bytearray | None = None) -> None:
        self.backend = backend
        # Where the server receives requests: a fast-table reply starts with a view of the id in it.
        self.rbuf = bytearray(64) if rbuf is None else rbuf
        self._id_view = memoryview(self.rbuf)[:2]
        self.ours = caps
        # Twin-socket mode: makes the socket pair for server-to-client commands and returns the
        # client's end (the caller sends it with the VERSION reply, then closes it). Without it
        # (no socket to pair with) twin_socket is never agreed.
        self.open_twin = open_twin
        self.remote = remote  # the client's memory mapped without an fd (the server's DMA_READ/WRITE)
        self.caps: p.Capabilities | None = None  # agreed, after VERSION
        self.trace = trace
        self.regions = backend.regions()
        bar_sizes = {i: r.size for i, r in self.regions.items() if i <= p.VFIO_PCI_ROM_REGION_INDEX}
        raw = SimpleNamespace(read=backend.config_read, write=backend.config_write)
        self.policy = ConfigPolicy(raw, bar_sizes, size=backend.config_size, permissive=permissive,
                                   quirks=list(quirks), trace=trace)
        # The fast table (see fast_reply): request bytes after the id -> FastEntry.
        self.fast: dict[bytes, FastEntry] = {}
        self.handlers: dict[int, Callable[[p.Message, Any], p.Message]] = {
            p.Command.DMA_MAP: self._dma_map,
            p.Command.DMA_UNMAP: self._dma_unmap,
            p.Command.DEVICE_GET_INFO: self._device_info,
            p.Command.DEVICE_GET_REGION_INFO: self._region_info,
            p.Command.DEVICE_GET_REGION_IO_FDS: self._region_io_fds,
            p.Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            p.Command.DEVICE_SET_IRQS: self._set_irqs,
            p.Command.REGION_READ: self._region_read,
            p.Command.REGION_WRITE: self._region_write,
            p.Command.REGION_WRITE_MULTI: self._region_write_multi,
            p.Command.DEVICE_RESET: self._reset,
        }

    @property
    def max_size(self) -> int:
        xfer = (self.caps or p.Capabilities()).max_data_xfer_size
        return p.max_message_size(xfer)

    def handle(self, msg: p.Message) -> p.Message | None:
        """The reply to `msg` (None for no_reply). Raises DropClient when the client must go.

        Takes ownership of `msg.fds`: they are kept (DMA memory, eventfds) or closed.
        """
        fds = list(msg.fds)
        try:
            reply = self._dispatch(msg, fds)
        except BackendError as exc:
            self._say(f"{msg.command_name()} #{msg.msg_id}: refused ({errno.errorcode.get(exc.errno, exc.errno)}): {exc}")
            reply = msg.error_reply(exc.errno)
        except p.ProtocolError as exc:
            self._say(f"{msg.command_name()} #{msg.msg_id}: refused: {exc.message}")
            reply = msg.error_reply(exc.errno)
        except (ValueError, PcipassError) as exc:
            self._say(f"{msg.command_name()} #{msg.msg_id}: refused: {exc}")
            reply = msg.error_reply(errno.EINVAL)
        finally:
            for fd in fds:  # whatever no handler kept
                os.close(fd)
        return None if msg.no_reply else reply

    def _say(self, text: str) -> None:
        if self.trace:
            self.trace(text)
        log.info("%s", text)

    def _dispatch(self, msg: p.Message, fds: list[int]) -> p.Message:
        if msg.is_reply:
            raise p.ProtocolError(f"unexpected reply to message {msg.msg_id}")
        if len(fds) > (self.caps or self.ours).max_msg_fds:
            raise p.ProtocolError(f"{len(fds)} file descriptors, over the agreed {(self.caps or self.ours).max_msg_fds}")
        if msg.command == p.Command.VERSION:
            return self._version(msg)
        if self.caps is None:
            self._say(f"{msg.command_name()} before VERSION: dropping the client")
            raise DropClient(f"{msg.command_name()} before VERSION")
        handler = self.handlers.get(msg.command)
        if handler is None:
            known = msg.command in p.Command.__members__.values()
            raise p.ProtocolError(f"{msg.command_name()} is not served here",
                                  errno_=errno.ENOTSUP if known else errno.ENOSYS)
        body = p.decode(msg)
        self._fds = fds
        return handler(msg, body)

    def _take_fds(self) -> list[int]:
        fds, self._fds[:] = list(self._fds), []
        return fds

    # --- handlers ---

    def _version(self, msg: p.Message) -> p.Message:
        if self.caps is not None:
            raise p.ProtocolError("a second VERSION")
        try:
            theirs = p.Version.unpack(msg.payload)
        except p.ProtocolError as exc:
            raise DropClient(f"bad VERSION: {exc.message}") from None
        if theirs.major != p.VERSION_MAJOR:
            raise DropClient(f"client speaks vfio-user {theirs.major}.{theirs.minor}, we speak {p.VERSION_MAJOR}.x")
        self.caps = theirs.capabilities.negotiate(self.ours)
        if self.open_twin is None:
            self.caps.twin_socket = False
        self.backend.client_joined(self.caps, self.remote)
        minor = min(theirs.minor, p.VERSION_MINOR)
        self._say(f"VERSION {p.VERSION_MAJOR}.{minor}: {self.caps}")
        if not self.caps.twin_socket:
            return msg.reply(p.Version(p.VERSION_MAJOR, minor, self.caps).pack())
        assert self.open_twin is not None
        offered = dataclasses.replace(self.caps, twin_fd_index=0)  # the reply's one fd
        return msg.reply(p.Version(p.VERSION_MAJOR, minor, offered).pack(), [self.open_twin()])

    def _dma_map(self, msg: p.Message, req: p.DmaMap) -> p.Message:
        fds = self._take_fds()
        if len(fds) > 1:
            for fd in fds:
                os.close(fd)
            raise BackendError(errno.EINVAL, f"DMA_MAP with {len(fds)} fds (0 or 1)")
        self.backend.dma.map(req.address, req.size, req.flags, fds[0] if fds else None, req.offset)
        self._say(f"DMA_MAP {req.address:#x}+{req.size:#x} " + ("fd" if fds else f"no fd ({self.backend.without_fd})"))
        return msg.reply()

    def _dma_unmap(self, msg: p.Message, req: p.DmaUnmap) -> p.Message:
        if req.flags & p.VFIO_DMA_UNMAP_FLAG_ALL:
            if req.address or req.size:
                raise BackendError(errno.EINVAL, "DMA_UNMAP of all with an address or size")
            self.backend.dma.unmap_all()
        elif req.flags:
            raise BackendError(errno.EINVAL, f"DMA_UNMAP flags {req.flags:#x} are not supported")
        else:
            self.backend.dma.unmap(req.address, req.size)
        return msg.reply(p.DmaUnmap(p.DmaUnmap.FMT.size, req.flags, req.address, req.size).pack())

    def _device_info(self, msg: p.Message, req: p.DeviceInfo) -> p.Message:
        b = self.backend
        return msg.reply(p.DeviceInfo(16, b.device_flags, b.num_regions(), b.num_irqs()).pack())

    def _region(self, index: int):  # -> RegionDesc
        r = self.regions.get(index)
        if r is None:
            raise BackendError(errno.EINVAL, f"no region {index}")
        return r

    def _region_info(self, msg: p.Message, req: p.RegionInfo) -> p.Message:
        r = self._region(req.index)
        info = p.RegionInfo(32, r.flags, r.index, 0, r.size, 0)
        if r.sparse is not None:
            info = p.region_info_with_caps(info, [p.sparse_mmap_cap(r.sparse)])
        fds = [r.fd] if r.fd is not None and r.flags & p.VFIO_REGION_INFO_FLAG_MMAP else []
        if req.argsz < info.argsz:
            # Too small for the caps: say how much is needed, the caps left out. cap_offset still
            # says where they will start (the kernel sends 0 here, but QEMU 11.1's vfio-user
            # client refuses CAPS with a cap_offset inside the fixed structure: EINVAL).
            info = p.RegionInfo(info.argsz, info.flags, r.index, info.cap_offset, r.size, 0)
        return msg.reply(info.pack(), fds)

    def _region_io_fds(self, msg: p.Message, req: p.RegionIoFds) -> p.Message:
        self._region(req.index)
        # No ioeventfds are offered: every region is reached by mmap or by messages.
        return msg.reply(p.RegionIoFds(16, 0, req.index, 0).pack())

    def _irq_info(self, msg: p.Message, req: p.IrqInfo) -> p.Message:
        if req.index >= self.backend.num_irqs():
            raise BackendError(errno.EINVAL, f"no interrupt index {req.index}")
        flags, count = self.backend.irq_info(req.index)
        if count == 0 and req.index == IrqKind.ERR:
            # What vfio-pci answers for ERR on a device that is not PCIe (REQ it counts 1 on every
            # device). QEMU takes EINVAL as "no error reporting here" and says nothing; a count of 0
            # makes it warn it cannot recover errors.
            raise BackendError(errno.EINVAL, f"no {IrqKind(req.index).name} interrupt on this device")
        return msg.reply(p.IrqInfo(16, flags, req.index, count).pack())

    def _set_irqs(self, msg: p.Message, req: p.IrqSet) -> p.Message:
        if req.index >= self.backend.num_irqs():
            raise BackendError(errno.EINVAL, f"no interrupt index {req.index}")
        fds = self._take_fds()
        nfds = len(fds)  # the backend may hand them on (and clear the list)
        try:
            self.backend.set_irqs(req, fds)
        except BaseException:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        self._say(f"SET_IRQS index {req.index} flags {req.flags:#x} vectors {req.start}+{req.count} with {nfds} eventfds")
        return msg.reply()

    def _check_access(self, region: int, offset: int, count: int) -> None:
        r = self._region(region)
        assert self.caps is not None
        if count == 0 or count > self.caps.max_data_xfer_size:
            raise BackendError(errno.EINVAL, f"count {count} is not within 1..{self.caps.max_data_xfer_size}")
        if offset + count > r.size:  # offset is < 2**64 and count < 2**32: no wrap in Python, but out of range
            raise BackendError(errno.EINVAL, f"region {region}: {offset:#x}+{count} is outside its {r.size:#x} bytes")

    def _read(self, region: int, offset: int, count: int) -> bytes:
        self._check_access(region, offset, count)
        out = bytearray()
        if region == p.VFIO_PCI_CONFIG_REGION_INDEX:
            for at, w in _accesses(offset, count, 4):
                out += self.policy.read(at, w).to_bytes(w, "little")
        else:
            for at, w in _accesses(offset, count, 8):
                out += self.backend.region_read(region, at, w).to_bytes(w, "little")
        return bytes(out)

    def _write(self, region: int, offset: int, data: bytes) -> None:
        self._check_access(region, offset, len(data))
        if region == p.VFIO_PCI_CONFIG_REGION_INDEX:
            for at, w in _accesses(offset, len(data), 4):
                self.policy.write(at, w, int.from_bytes(data[at - offset : at - offset + w], "little"))
        else:
            for at, w in _accesses(offset, len(data), 8):
                self.backend.region_write(region, at, w, int.from_bytes(data[at - offset : at - offset + w], "little"))

    def fast_reply(self, buf: bytearray, n: int) -> bytes | None:
        """The reply to `buf[:n]` if it is exactly one small REGION_READ/WRITE the general path
        has already found valid in this session (same command, size, flags, region, offset and
        width); else None, and the general path takes it. (The server's receive loop does the
        same inline, on requests received into `rbuf`.)

        Table dispatch: the request's bytes after its id are the key; the entry (FastEntry) holds
        the request's size, the access, and the reply as buffers with everything filled in but
        the id, which is a view of the receive buffer, and a read's data, packed in or, for
        memory, a view of it.
        """
        if n < ACCESS_SIZE:
            return None
        entry = self.fast.get(bytes(buf[2:ACCESS_SIZE]))
        if entry is None or n != entry[0]:
            return None
        if buf is not self.rbuf:
            self.rbuf[:n] = buf[:n]
        _, iov, _, read, pack, into, write = entry
        try:
            if read is not None:
                pack(into, ACCESS_DATA_AT, read())
            elif write is not None:
                write(self.rbuf)
        except FAST_REFUSALS as exc:
            return self.fast_refused(self.rbuf, exc)
        return b"".join(iov)

    def fast_refused(self, buf: bytearray, exc: Exception) -> bytes:
        """The error reply to the fast-path request in `buf` whose access raised `exc`."""
        err = getattr(exc, "errno", None) or errno.EINVAL
        msg_id, cmd = struct.unpack_from("=HH", buf)
        self._say(f"{p.Command(cmd).name} #{msg_id}: refused ({errno.errorcode.get(err, err)}): {exc}")
        return p.error_reply_bytes(msg_id, cmd, err)

    def _learn_access(self, msg: p.Message, req: p.RegionAccess) -> None:
        """After the general path served a small, valid REGION_READ/WRITE: its entry in the fast table."""
        if msg.flags or msg.error or len(self.fast) >= 4096 or req.count not in p.ACCESS_DATA or req.offset % req.count:
            return
        region, offset, count = req.region, req.offset, req.count
        config = region == p.VFIO_PCI_CONFIG_REGION_INDEX
        if config and (count == 8 or offset + count > self.policy.size):
            return
        r = self.regions.get(region)
        if r is None or offset + count > r.size:
            return
        reply = p.access_reply_template(msg.command, offset, region, count)
        idv = self._id_view
        entry: FastEntry
        if msg.command == p.Command.REGION_READ:
            view = self.backend.config_view(offset, count) if config and self.policy.passes_through(offset, count) else None
            if view is not None:  # memory: its bytes go out as they are
                entry = (msg.size, [idv, bytes(reply[2:ACCESS_SIZE]), view], len(reply), None, None, None, None)
            else:
                if config:
                    read = self.policy.reader(offset, count, self.backend.config_reader(offset, count))
                else:
                    read = self.backend.region_reader(region, offset, count)
                into = reply[2:]
                entry = (msg.size, [idv, into], len(reply), read, p.ACCESS_DATA[count].pack_into, into, None)
        else:
            if config:
                write: Callable[[int], None] = partial(self.policy.write, offset, count)
            else:
                write = self.backend.region_writer(region, offset, count)
            entry = (msg.size, [idv, bytes(reply[2:])], len(reply), None, None, None, _write_access(write, count))
        key = p.ACCESS.pack(msg.msg_id, msg.command, msg.size, 0, 0, offset, region, count)[2:]
        self.fast[key] = entry

    def _region_read(self, msg: p.Message, req: p.RegionAccess) -> p.Message:
        if req.data:
            raise p.ProtocolError("REGION_READ request carries data")
        if req.region == p.VFIO_PCI_CONFIG_REGION_INDEX and req.count in (1, 2, 4) and not req.offset % req.count \
                and req.offset + req.count <= self.policy.size:  # the common case, checked, without the splitting
            data = self.policy.read(req.offset, req.count).to_bytes(req.count, "little")
        else:
            data = self._read(req.region, req.offset, req.count)
        self._learn_access(msg, req)
        return msg.reply(p.RegionAccess(req.offset, req.region, req.count, data).pack())

    def _region_write(self, msg: p.Message, req: p.RegionAccess) -> p.Message:
        if len(req.data) != req.count:
            raise p.ProtocolError(f"REGION_WRITE count {req.count} but {len(req.data)} bytes of data")
        self._write(req.region, req.offset, req.data)
        self._learn_access(msg, req)
        return msg.reply(p.RegionAccess(req.offset, req.region, req.count).pack())

    def _region_write_multi(self, msg: p.Message, req: p.RegionWriteMulti) -> p.Message:
        done = 0
        for e in req.entries:
            self._write(e.region, e.offset, e.data[: e.count])
            done += 1
        return msg.reply(p.WriteMultiReply(done).pack())

    def _reset(self, msg: p.Message, req: object) -> p.Message:
        self.backend.reset()
        self._say("DEVICE_RESET")
        return msg.reply()


class Server:
    """A UNIX socket serving one backend to one client at a time."""

    def __init__(self, backend: Backend, path: str | Path, *, permissive: bool = False, quirks: Sequence[Quirk] = (),
                 trace: Callable[[str], None] | None = None, owner: str | None = None, mode: int = 0o600,
                 send_timeout: float = 5.0, reply_timeout: float = 5.0) -> None:
        self.backend = backend
        self.path = str(path)
        self.permissive = permissive
        self.quirks = list(quirks)
        self.trace = trace
        self.send_timeout = send_timeout
        self.reply_timeout = reply_timeout
        self.clients_served = 0
        self.stopping = False
        self._listener = self._bind(owner, mode)
        self._conn: socket.socket | None = None
        self._parser: p.Parser | None = None
        self._session: Session | None = None
        self._backlog: list[p.Message] = []
        self._next_id = 0
        # Twin-socket mode: our end of the pair for server-to-client commands, its parser, and
        # the client's end until the VERSION reply has carried it.
        self._rbuf = bytearray(1 << 16)  # what one recvmsg may bring
        self._key_view = memoryview(self._rbuf)[2:ACCESS_SIZE]  # a small access's fast-table key
        self._twin: socket.socket | None = None
        self._twin_parser: p.Parser | None = None
        self._twin_given: socket.socket | None = None

    def _bind(self, owner: str | None, mode: int) -> socket.socket:
        uid = gid = -1
        if owner is not None:
            try:
                pw = pwd.getpwnam(owner)
            except KeyError:
                raise UsageError(f"no user named {owner!r}", hint="give --owner an existing user name") from None
            uid, gid = pw.pw_uid, pw.pw_gid
        if os.path.exists(self.path):
            import stat

            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise UsageError(f"{self.path} exists and is not a socket", hint="choose another --socket path")
            os.unlink(self.path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bind under a temporary name, set owner and mode, then rename: the socket
        # appears at its path only when it is ready, with its final permissions.
        staging = f"{self.path}.{os.getpid()}.tmp"
        old = os.umask(0o777)  # no window in which the socket is open to others
        try:
            sock.bind(staging)
        except OSError as exc:
            sock.close()
            raise PcipassError(f"cannot bind {self.path}: {exc.strerror}",
                               hint="check that the directory exists and is writable", code="bind-failed") from None
        finally:
            os.umask(old)
        try:
            if uid >= 0:
                os.chown(staging, uid, gid)
            os.chmod(staging, mode)
            sock.listen(1)
            os.rename(staging, self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise
        return sock

    def fileno(self) -> int:
        return self._listener.fileno()

    def close(self) -> None:
        self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.backend.close()

    def serve_forever(self) -> None:
        while not self.stopping:
            self.serve_one()

    def serve_one(self, accept_timeout: float | None = None) -> bool:
        """Accept one client and serve it until it goes. False if none came in time."""
        ready, _, _ = select.select([self._listener], [], [], accept_timeout)
        if not ready:
            return False
        conn, _ = self._listener.accept()
        self.serve_connection(conn)
        return True

    def serve_connection(self, conn: socket.socket) -> None:
        self._conn = conn
        conn.setblocking(True)  # receives block; sends never do (MSG_DONTWAIT, bounded by send_timeout)
        self._in_poller = select.poll()
        self._in_poller.register(conn, select.POLLIN)
        session = Session(self.backend, permissive=self.permissive, quirks=self.quirks, trace=self.trace,
                          open_twin=self._open_twin, remote=self, rbuf=self._rbuf)
        self._parser = p.Parser(session.max_size)
        self._session = session
        self._backlog = []
        why = "client disconnected"
        try:
            while not self.stopping:
                msgs = self._receive()
                if msgs is None:
                    break
                for msg in msgs:
                    reply = session.handle(msg)
                    if msg.command == p.Command.VERSION:
                        self._parser.max_size = session.max_size
                    if reply is not None:
                        self._send(reply)
                    if self._twin_given is not None:  # the client has its end now
                        self._twin_given.close()
                        self._twin_given = None
        except DropClient as exc:
            why = f"dropped: {exc}"
        except p.ProtocolError as exc:
            why = f"dropped: {exc.message}"
        except (ConnectionError, TimeoutError, OSError) as exc:
            why = f"dropped: {exc}"
        finally:
            try:
                self._forget_client()
            finally:
                # Said only once the client's fds, memory and interrupts are gone and the device
                # is reset, and before its connection closes: whoever waits for this line or for
                # the end of the connection (a test, an operator, the client) finds the server idle.
                self._say(f"client gone ({why}); the device is reset")
                conn.close()
                self._conn = None
                self.clients_served += 1

    def _forget_client(self) -> None:
        """Everything the client left but its connection: queued fds, the twin socket; then the device."""
        assert self._parser is not None
        for fd in self._parser.take_fds():
            os.close(fd)
        for msg in self._backlog:
            for fd in msg.fds:
                os.close(fd)
        self._backlog = []
        for sock in (self._twin, self._twin_given):
            if sock is not None:
                sock.close()
        self._twin = self._twin_parser = self._twin_given = None
        self._session = None
        self.backend.client_gone()

    def _say(self, text: str) -> None:
        if self.trace:
            self.trace(text)
        log.info("%s", text)

    def _receive(self) -> list[p.Message] | None:
        """Wait for whole messages (running the device's timers meanwhile); None at EOF."""
        assert self._conn is not None and self._parser is not None
        while True:
            if self._backlog:  # commands that came in while we waited for a reply of the client's
                msgs, self._backlog = self._backlog, []
                return msgs
            if self._parser.pending >= p.HEADER_SIZE:
                msgs = self._parser.messages()
                if msgs:
                    return msgs
            deadline = self.backend.next_deadline()
            # Nothing scheduled: block in recvmsg itself (one system call per request, not two).
            timeout = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
            watched = self.backend.watched_fds()
            if watched:
                readable = self._poll_watched(watched, timeout)
            else:
                readable = timeout is None or bool(self._in_poller.poll(timeout))
            if readable:
                if not self._recv_some():
                    if self._parser.pending:
                        self._say(f"client left in the middle of a message ({self._parser.pending} bytes)")
                    return None
            self.backend.run_due()

    def _poll_watched(self, watched: dict[int, Callable[[], None]], timeout: int | None) -> bool:
        """Wait for the socket or a backend fd (running its action); True if the socket is readable."""
        assert self._conn is not None
        poller = select.poll()
        poller.register(self._conn, select.POLLIN)
        for fd in watched:
            poller.register(fd, select.POLLIN)
        socket_fd = self._conn.fileno()
        readable = False
        for fd, _ in poller.poll(timeout):
            if fd == socket_fd:
                readable = True
            else:
                watched[fd]()
        return readable

    def _recv_some(self, fast: bool = True) -> bool:
        """One recvmsg into the preallocated buffer (with room for fds: any message may bring
        some). With `fast`, small accesses the session already knows are answered right here,
        and the next one received, for as long as the loop has nothing else to do (no timers,
        no watched fds); anything else goes to the parser. False at EOF."""
        assert self._conn is not None and self._parser is not None and self._session is not None
        conn, parser, session, backend, buf = self._conn, self._parser, self._session, self.backend, self._rbuf
        bufs = [buf]
        recv, sendmsg = conn.recvmsg_into, conn.sendmsg
        # Only whole messages, nothing queued; with fds to watch, one request and back to the loop.
        fast = fast and not parser.pending and not self._backlog
        stay = not backend.watched_fds()
        table, key, timers = session.fast, self._key_view, backend.timers
        last_key, last = b"", None  # the entry found last: a driver polling a register repeats itself
        while True:
            try:
                n, ancdata, flags, _ = recv(bufs, RECV_ANC_SIZE, MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return True
            # (flags carries MSG_CMSG_CLOEXEC back; only MSG_CTRUNC matters, and the general path checks it)
            if not fast or ancdata or flags & MSG_CTRUNC:
                break
            # Session.fast_reply, inline. The key's bytes may be an older message's past a short
            # one: the entry's size then differs from n.
            if last is None or not buf.startswith(last_key, 2):
                last_key = bytes(key)
                last = table.get(last_key)
                if last is None:
                    break
            size, iov, total, read, pack, into, write = last
            if size != n:
                break
            try:
                if read is not None:
                    pack(into, ACCESS_DATA_AT, read())
                elif write is not None:
                    write(buf)
            except FAST_REFUSALS as exc:
                self._send_bytes(session.fast_refused(buf, exc))
            else:
                # The reply straight from its parts: the id from the request, a read's data as
                # packed or, for memory, from the memory itself.
                try:
                    sent = sendmsg(iov, (), MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                if sent < total:
                    self._send_bytes(b"".join(iov)[sent:])
            if timers or not stay or self.stopping:  # the loop has work besides the socket
                return True
        fds = []
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                blob = blob[: len(blob) - len(blob) % 4]
                fds += list(struct.unpack(f"{len(blob) // 4}i", blob))
        if flags & MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise DropClient(f"the client sent more than {SERVER_CAPS.max_msg_fds} file descriptors at once")
        if not n:
            for fd in fds:
                os.close(fd)
            return False
        parser.feed(bytes(buf[:n]), fds)
        return True

    def _send(self, msg: p.Message) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(msg.fds)}i", *msg.fds))] if msg.fds else []
        self._send_bytes(msg.encode(), anc)

    def _send_bytes(self, raw: bytes, anc: list | None = None) -> None:
        """Send the whole message within send_timeout, or drop the client. Never blocks in send."""
        assert self._conn is not None
        nowait = MSG_DONTWAIT
        data = memoryview(raw)
        deadline = None
        poller = None
        while data:
            try:
                n = self._conn.sendmsg([data], anc, nowait) if anc else self._conn.send(data, nowait)
                anc = None  # the fds go with the first bytes only
                data = data[n:]
                continue
            except BlockingIOError:
                pass
            if deadline is None:  # only a client that is not reading gets here
                deadline = time.monotonic() + self.send_timeout
                poller = select.poll()
                poller.register(self._conn, select.POLLOUT)
            left = deadline - time.monotonic()
            assert poller is not None
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                raise TimeoutError(f"the client has not read for {self.send_timeout} s")

    # --- server-to-client commands, for client memory mapped without an fd ---

    def _open_twin(self) -> int:
        """A socket pair for twin-socket mode: ours kept, the client's end's fd returned."""
        assert self._conn is not None
        self._twin, self._twin_given = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._twin_parser = p.Parser(p.max_message_size(SERVER_CAPS.max_data_xfer_size))
        return self._twin_given.fileno()

    def _call_client(self, cmd: p.Command, body: p.DmaAccess) -> p.DmaAccess:
        if self._conn is None or self._parser is None:
            raise PermissionError("no client")
        self._next_id = (self._next_id + 1) & 0xFFFF
        msg_id = self._next_id
        if self._twin is not None:
            return self._call_on_twin(msg_id, cmd, body)
        self._send(p.command(msg_id, cmd, body))
        deadline = time.monotonic() + self.reply_timeout
        poller = select.poll()
        poller.register(self._conn, select.POLLIN)
        while True:
            for m in self._parser.messages():
                if m.is_reply and m.msg_id == msg_id and m.command == cmd:
                    if m.is_error:
                        raise PermissionError(f"the client refused {cmd.name}: errno {m.error}")
                    return p.decode(m)  # type: ignore[no-any-return]
                self._backlog.append(m)  # a command of the client's: served after this
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                raise PermissionError(f"the client did not answer {cmd.name} in {self.reply_timeout} s")
            if not self._recv_some(fast=False):  # commands wait in the backlog: served in order, after this
                raise PermissionError("the client went away during DMA")

    def _call_on_twin(self, msg_id: int, cmd: p.Command, body: p.DmaAccess) -> p.DmaAccess:
        """The command on its own socket: only its reply can come back there, nothing to interleave."""
        assert self._twin is not None and self._twin_parser is not None
        sock, parser = self._twin, self._twin_parser
        deadline = time.monotonic() + self.reply_timeout
        try:
            sock.settimeout(self.reply_timeout)
            sock.sendall(p.command(msg_id, cmd, body).encode())
            while True:
                for m in parser.messages():
                    if not (m.is_reply and m.msg_id == msg_id and m.command == cmd):
                        raise PermissionError(f"the client sent {m.command_name()} #{m.msg_id} on the twin socket, "
                                              f"where only the reply to {cmd.name} #{msg_id} belongs")
                    if m.is_error:
                        raise PermissionError(f"the client refused {cmd.name}: errno {m.error}")
                    return p.decode(m)  # type: ignore[no-any-return]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                data = sock.recv(1 << 16)  # fds sent here are discarded by the kernel: none belong
                if not data:
                    raise PermissionError("the client closed its twin socket during DMA")
                parser.feed(data)
        except PermissionError:
            raise
        except TimeoutError:
            raise PermissionError(f"the client did not answer {cmd.name} in {self.reply_timeout} s") from None
        except p.ProtocolError as exc:
            raise PermissionError(f"the client's reply to {cmd.name}: {exc.message}") from None
        except OSError as exc:
            raise PermissionError(f"the twin socket failed during {cmd.name}: {exc}") from None

    def remote_read(self, address: int, size: int) -> bytes:
        reply = self._call_client(p.Command.DMA_READ, p.DmaAccess(address, size))
        if reply.address != address or reply.count != size or len(reply.data) != size:
            raise PermissionError("the client's DMA_READ reply does not match the request")
        return reply.data

    def remote_write(self, address: int, data: bytes) -> None:
        self._call_client(p.Command.DMA_WRITE, p.DmaAccess(address, len(data), data))

