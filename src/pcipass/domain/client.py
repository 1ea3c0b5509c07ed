"""The vfio-user frontend: `connect(PATH)` gives a `pcipass.device.Device`.

Configuration space goes by REGION_READ/WRITE on region 7 (the backend's
policy answers); BAR areas the backend offers as fds are mmapped and accessed
directly, the rest by messages; DMA buffers are `SharedMemory` sent with
DMA_MAP; interrupts are eventfds sent with SET_IRQS, which the backend hands
on to the device (a real device's MSI lands straight on them).
It needs no privilege: only access to the socket.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from pcipass.device import (
    DmaBuffer,
    EventFd,
    IrqKind,
    MappedWindow,
    RegionInfo,
    SharedDmaBuffer,
    SharedMemory,
    check_access,
    new_eventfds,
)
from pcipass.domain import protocol as p
from pcipass.errors import PcipassError
from pcipass.vfio.iova import IovaAllocator

CLIENT_CAPS = p.Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20, max_dma_maps=1024, pgsizes=4096,
                             twin_socket=True)
IOVA_BASE = 0x100000  # leave the first MiB unused, so a stray zero address never hits a buffer


class RemoteError(PcipassError):
    def __init__(self, what: str, err: int) -> None:
        name = errno.errorcode.get(err, str(err))
        super().__init__(f"the backend refused {what}: {name} ({os.strerror(err) if err else 'no errno'})",
                         hint="the backend's log says why (for pcipass serve: its --trace output)", code="vfio-user-refused")
        self.errno = err


class UserRegion:
    """A region reached through mapped areas where offered, messages elsewhere.

    `read(offset, width)` and `write(offset, width, value)` as pcipass.device.Region.
    """

    read: Callable[[int, int], int]
    write: Callable[[int, int, int], None]

    def __init__(self, dev: VfioUserDevice, info: RegionInfo, areas: list[tuple[int, mmap.mmap, MappedWindow]]) -> None:
        self.info = info
        self._dev = dev
        self._areas = areas  # (offset in region, mmap, window)
        # The whole region mapped: accesses are the window's own, nothing in between.
        if len(areas) == 1 and areas[0][0] == 0 and areas[0][2].size == info.size:
            self.read, self.write = areas[0][2].read, areas[0][2].write
        else:
            self.read, self.write = self._read_areas_or_messages, self._write_areas_or_messages

    def _window(self, offset: int, width: int) -> tuple[MappedWindow, int] | None:
        for start, _, win in self._areas:
            if start <= offset and offset + width <= start + win.size:
                return win, offset - start
        return None

    def _read_areas_or_messages(self, offset: int, width: int) -> int:
        check_access(offset, width, self.info.size, f"region {self.info.index}")
        hit = self._window(offset, width)
        if hit:
            return hit[0].read(hit[1], width)
        return self._dev.read_small(self.info.index, offset, width)

    def _write_areas_or_messages(self, offset: int, width: int, value: int) -> None:
        check_access(offset, width, self.info.size, f"region {self.info.index}")
        hit = self._window(offset, width)
        if hit:
            hit[0].write(hit[1], width, value)
            return
        self._dev.write_small(self.info.index, offset, width, value & ((1 << (8 * width)) - 1))

    @property
    def mapped_areas(self) -> list[tuple[int, int]]:
        return [(start, win.size) for start, _, win in self._areas]

    def close(self) -> None:
        for _, m, win in self._areas:
            win.release()
            m.close()
        self._areas = []


# A small access prepared (VfioUserDevice._prepare_small).
Small = tuple[bytearray, memoryview, memoryview | None, bytes, int, memoryview | None, tuple[p.Command, int, int, int]]


class VfioUserDevice:
    """A device served over vfio-user (implements pcipass.device.Device)."""

    def __init__(self, sock: socket.socket, name: str, timeout: float = 30.0, *, twin_socket: bool = True,
                 share_dma_memory: bool = True) -> None:
        self.name = name
        self._sock = sock
        self._timeout = timeout
        # False: DMA buffers are mapped without their fd, so the backend reaches them only by
        # DMA_READ/DMA_WRITE messages (it cannot keep a mapping the client cannot revoke).
        self.share_dma_memory = share_dma_memory
        self._twin: socket.socket | None = None
        self._twin_thread: threading.Thread | None = None
        self._rbuf = bytearray(1 << 16)  # small accesses' replies (see _small_access)
        self._reply_id = memoryview(self._rbuf)[:2].cast("H")
        self._small: dict[tuple[p.Command, int, int, int], Small] = {}
        self._config_reads: dict[int, Small] = {}  # offset << 4 | width -> the same, for config_read
        # A blocking socket whose receives give up after the timeout (EAGAIN): a small access
        # waits in recv itself, with no select before it.
        secs = int(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", secs, int((timeout - secs) * 1e6)))
        self._parser = p.Parser()
        self._unparsed = self._parser.unparsed  # its bytes not yet in a message (one bytearray, kept)
        # Held by a call from its request to its reply. Nothing holding it takes it again.
        self._lock = threading.Lock()
        self._next_id = 0
        self._regions: dict[int, UserRegion] = {}
        self._irq_counts: dict[IrqKind, int] = {}
        self._irq_fds: dict[IrqKind, list[EventFd]] = {}
        self._buffers: dict[int, SharedDmaBuffer] = {}
        # The client chooses its IOVAs (the backend's IOMMU, if any, is not ours to ask).
        self._iovas = IovaAllocator([(IOVA_BASE, (1 << 64) - 1)], mmap.PAGESIZE)
        ours = dataclasses.replace(CLIENT_CAPS, twin_socket=twin_socket)
        raw = self.call_raw(p.Command.VERSION, p.Version(p.VERSION_MAJOR, p.VERSION_MINOR, ours))
        try:
            reply = p.decode(raw)
            if reply.major != p.VERSION_MAJOR:
                raise PcipassError(f"{name}: the backend answered vfio-user {reply.major}.{reply.minor}",
                                   hint="use a backend that speaks vfio-user 0.x", code="vfio-user-version")
            if reply.capabilities.twin_socket and not twin_socket:
                raise PcipassError(f"{name}: the backend enabled twin_socket, which this client did not propose",
                                   hint="the backend breaks the VERSION rules; its log may say why",
                                   code="vfio-user-protocol")
            if reply.capabilities.twin_socket:
                index = reply.capabilities.twin_fd_index
                if index is None or index >= len(raw.fds):
                    # The spec: inconsistent, the client must close (it could miss the server's commands).
                    raise PcipassError(f"{name}: the backend enabled twin_socket without a socket "
                                       f"(fd_index {index}, {len(raw.fds)} fds)",
                                       hint="the backend's twin-socket support is broken; its log may say why",
                                       code="vfio-user-protocol")
                self._twin = socket.socket(fileno=raw.fds.pop(index))
        finally:
            for fd in raw.fds:
                os.close(fd)
        self.caps = reply.capabilities
        self._closing = False
        if self._twin is not None:
            self._twin_thread = threading.Thread(target=self._serve_twin, name=f"{name} twin", daemon=True)
            self._twin_thread.start()
        elif not share_dma_memory:
            # One socket, and memory the server reaches only by message: its DMA_READ/DMA_WRITE may
            # come while the driver waits on an eventfd, not on us; a thread answers between calls.
            self._twin_thread = threading.Thread(target=self._serve_between_calls, name=f"{name} dma", daemon=True)
            self._twin_thread.start()
        self._parser.max_size = p.max_message_size(self.caps.max_data_xfer_size)
        self.info = self.call(p.Command.DEVICE_GET_INFO, p.DeviceInfo(16, 0, 0, 0))

    # --- the wire ---

    def call(self, cmd: p.Command, body: object = b"", fds: list[int] | None = None) -> Any:
        """Send a command and return its decoded reply; RemoteError if the backend refuses."""
        return p.decode(self.call_raw(cmd, body, fds))

    def call_raw(self, cmd: p.Command, body: object = b"", fds: list[int] | None = None) -> p.Message:
        with self._lock:
            self._next_id = (self._next_id + 1) & 0xFFFF
            msg = p.command(self._next_id, cmd, body, fds)
            self._send(msg)
            return self._await(msg.msg_id, cmd)

    def _await(self, msg_id: int, cmd: p.Command) -> p.Message:
        """The reply to our `msg_id`, serving the server's commands that come first."""
        while True:
            for reply in self._receive():
                if reply.is_reply and reply.msg_id == msg_id:
                    for fd in reply.fds if reply.is_error else []:
                        os.close(fd)
                    if reply.is_error:
                        raise RemoteError(cmd.name, reply.error)
                    return reply
                if not reply.is_reply:
                    self._serve(reply)
                else:
                    for fd in reply.fds:
                        os.close(fd)

    def _small_access(self, small: Small, value: int = 0) -> int:
        """A REGION_READ/WRITE of 1, 2, 4 or 8 bytes without building objects: its request
        prepared once (_prepare_small), one send, and one recv into a preallocated buffer (its
        reply can carry no fds, and the kernel closes any sent anyway) that is usually exactly
        the reply, checked whole (id, then bytes 2..31: command, size, flags, error, offset,
        region, count); anything else goes to the parser and the general wait. `value`: a
        write's data. Returns a read's data (0 for a write)."""
        request, request_id, request_data, expect, want, data, key = small
        lock = self._lock
        lock.acquire()  # not `with`: its __exit__(None, None, None) costs as much again
        try:
            self._next_id = msg_id = (self._next_id + 1) & 0xFFFF
            request_id[0] = msg_id
            if request_data is not None:
                request_data[0] = value
            try:
                if self._sock.send(request) < len(request):
                    raise BlockingIOError  # cannot happen on a blocking socket; the general path copes
            except BlockingIOError:
                self._send(p.Message(msg_id, int(key[0]), bytes(request[p.HEADER_SIZE :])))
            except OSError as exc:
                raise self._gone(exc) from None
            if not self._unparsed:
                buf = self._rbuf
                try:
                    n = self._sock.recv_into(buf)  # SO_RCVTIMEO bounds the wait
                except BlockingIOError:
                    raise self._no_reply() from None
                except OSError as exc:
                    raise self._gone(exc) from None
                if not n:
                    raise self._gone(None)
                if n == want and self._reply_id[0] == msg_id and buf.startswith(expect, 2):
                    return 0 if data is None else data[0]  # type: ignore[no-any-return]
                self._parser.feed(bytes(buf[:n]))
            reply = p.decode(self._await(msg_id, key[0]))
        finally:
            lock.release()
        cmd, index, offset, count = key
        if reply.count != count or reply.offset != offset or reply.region != index or \
                len(reply.data) != (count if cmd == p.Command.REGION_READ else 0):
            raise PcipassError(f"{self.name}: {cmd.name} answered {len(reply.data)} bytes for {count}",
                               hint="the backend is broken", code="vfio-user-protocol")
        return int.from_bytes(reply.data, "little")

    def _prepare_small(self, key: tuple[p.Command, int, int, int]) -> Small:
        """One kind of small access (command, region, offset, count), kept in self._small: its
        request, with views of its id and a write's data to fill in (unsigned ints of their
        width, native order: the wire's little-endian, as protocol.py's "=" formats assume),
        the bytes 2..31 its reply must have, the reply's size, a view of a read's data where the
        reply lands, and the key."""
        cmd, index, offset, count = key
        fmt = p.ACCESS_DATA[count].format[-1]
        size = p.ACCESS_SIZE + (count if cmd == p.Command.REGION_WRITE else 0)
        request = bytearray(p.ACCESS.pack(0, cmd, size, 0, 0, offset, index, count)) + bytes(size - p.ACCESS_SIZE)
        reply = p.access_reply_template(cmd, offset, index, count)
        view = memoryview(request)
        small = (request, view[:2].cast("H"), view[p.ACCESS_SIZE :].cast(fmt) if size > p.ACCESS_SIZE else None,
                 bytes(reply[2 : p.ACCESS_SIZE]), len(reply),
                 memoryview(self._rbuf)[p.ACCESS_SIZE : len(reply)].cast(fmt) if len(reply) > p.ACCESS_SIZE else None,
                 key)
        if len(self._small) < 4096:
            self._small[key] = small
        return small

    def _send(self, msg: p.Message) -> None:
        data = msg.encode()
        try:
            if msg.fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(msg.fds)}i", *msg.fds))]
                sent = self._sock.sendmsg([data], anc)
            else:
                sent = self._sock.send(data)
            if sent < len(data):
                self._sock.sendall(data[sent:])
        except OSError as exc:
            raise self._gone(exc) from None

    def _receive(self) -> list[p.Message]:
        while True:
            msgs = self._parser.messages()
            if msgs:
                return msgs
            if not select.select([self._sock], [], [], self._timeout)[0]:
                raise self._no_reply()
            try:
                data, anc, _, _ = self._sock.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC)
            except OSError as exc:
                raise self._gone(exc) from None
            if not data:
                raise self._gone(None)
            fds: list[int] = []
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    blob = blob[: len(blob) - len(blob) % 4]
                    fds += struct.unpack(f"{len(blob) // 4}i", blob)
            self._parser.feed(data, fds)

    def _no_reply(self) -> PcipassError:
        return PcipassError(f"{self.name}: no reply from the backend in {self._timeout} s",
                            hint="is the backend stuck? the backend's log may say (for pcipass serve: its --trace output)",
                            code="vfio-user-timeout")

    def _gone(self, exc: OSError | None) -> PcipassError:
        return PcipassError(f"{self.name}: the backend closed the connection" + (f" ({exc})" if exc else ""),
                            hint="the backend may have dropped this client; its log says why",
                            code="vfio-user-disconnected")

    def _serve(self, msg: p.Message) -> None:
        """A command from the server on the main socket (no twin socket), met while awaiting a reply."""
        self._send(self._answer(msg))

    def _serve_twin(self) -> None:
        """The twin socket's own thread: the server's commands answered whenever they come."""
        assert self._twin is not None
        parser = p.Parser(self._parser.max_size)
        try:
            while True:
                data = self._twin.recv(1 << 16)  # fds sent here are discarded by the kernel: none belong
                if not data:
                    return
                parser.feed(data)
                for msg in parser.messages():
                    if not msg.is_reply:
                        self._twin.sendall(self._answer(msg).encode())
        except (OSError, p.ProtocolError):
            return  # closed, or the server broke the protocol: its commands go unanswered and it times out

    def _serve_between_calls(self) -> None:
        """One-socket mode: the server's commands that come while no call of ours is waiting."""
        while not self._closing:
            try:
                if not select.select([self._sock], [], [], 0.1)[0]:
                    continue
                with self._lock:  # a call in progress reads its own reply (and serves what comes first)
                    if self._closing or not select.select([self._sock], [], [], 0)[0]:
                        continue
                    for msg in self._receive():
                        if not msg.is_reply:
                            self._serve(msg)
                        else:  # a reply nobody waits for
                            for fd in msg.fds:
                                os.close(fd)
            except (OSError, ValueError, PcipassError):
                return  # the connection is gone: the next call says so

    def _answer(self, msg: p.Message) -> p.Message:
        """The reply to a command from the server: DMA to memory it could not map (from our buffers)."""
        for fd in msg.fds:
            os.close(fd)
        try:
            req = p.decode(msg)
            if msg.command not in (p.Command.DMA_READ, p.Command.DMA_WRITE):
                raise p.ProtocolError(f"{msg.command_name()} from the server", errno_=errno.ENOTSUP)
            buf = next((b for b in list(self._buffers.values())
                        if b.iova <= req.address and req.address + req.count <= b.iova + b.size), None)
            if buf is None:
                raise p.ProtocolError(f"DMA at {req.address:#x} is outside our buffers", errno_=errno.EFAULT)
            at = req.address - buf.iova
            if msg.command == p.Command.DMA_READ:
                reply = msg.reply(p.DmaAccess(req.address, req.count, bytes(buf.window.bytes[at : at + req.count])).pack())
            else:
                buf.window.bytes[at : at + req.count] = req.data[: req.count]
                reply = msg.reply(p.DmaAccess(req.address, req.count).pack())
        except p.ProtocolError as exc:
            reply = msg.error_reply(exc.errno)
        return reply

    # --- Device: configuration space and regions ---

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if count in p.ACCESS_DATA:
            return self.read_small(index, offset, count).to_bytes(count, "little")
        reply = self.call(p.Command.REGION_READ, p.RegionAccess(offset, index, count))
        if reply.count != count or len(reply.data) != count:
            raise PcipassError(f"{self.name}: REGION_READ answered {len(reply.data)} bytes for {count}",
                               hint="the backend is broken", code="vfio-user-protocol")
        return reply.data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if len(data) in p.ACCESS_DATA:
            self.write_small(index, offset, len(data), int.from_bytes(data, "little"))
            return
        self.call(p.Command.REGION_WRITE, p.RegionAccess(offset, index, len(data), data))

    def read_small(self, index: int, offset: int, width: int) -> int:
        """region_read of 1, 2, 4 or 8 bytes as an int (little-endian, as the device's)."""
        key = (p.Command.REGION_READ, index, offset, width)
        return self._small_access(self._small.get(key) or self._prepare_small(key))

    def write_small(self, index: int, offset: int, width: int, value: int) -> None:
        """region_write of 1, 2, 4 or 8 bytes given as an int (0 <= value < 2**(8*width))."""
        key = (p.Command.REGION_WRITE, index, offset, width)
        self._small_access(self._small.get(key) or self._prepare_small(key), value)

    def config_read(self, offset: int, width: int) -> int:
        small = self._config_reads.get(offset << 4 | width)  # an int key: no tuple to build
        if small is None:
            check_access(offset, width, 4096, "config space")
            small = self._prepare_small((p.Command.REGION_READ, p.VFIO_PCI_CONFIG_REGION_INDEX, offset, width))
            self._config_reads[offset << 4 | width] = small
        return self._small_access(small)

    def config_write(self, offset: int, width: int, value: int) -> None:
        check_access(offset, width, 4096, "config space")
        self.write_small(p.VFIO_PCI_CONFIG_REGION_INDEX, offset, width, value & ((1 << (8 * width)) - 1))

    def region_info(self, index: int) -> tuple[p.RegionInfo, list[int]]:
        reply = self.call_raw(p.Command.DEVICE_GET_REGION_INFO, p.RegionInfo(32, 0, index, 0, 0, 0))
        info = p.decode(reply)
        if info.argsz > p.RegionInfo.FMT.size and not info.caps:  # caps did not fit: ask again
            for fd in reply.fds:
                os.close(fd)
            reply = self.call_raw(p.Command.DEVICE_GET_REGION_INFO, p.RegionInfo(info.argsz, 0, index, 0, 0, 0))
            info = p.decode(reply)
        return info, reply.fds

    def region(self, index: int) -> UserRegion:
        if index in self._regions:
            return self._regions[index]
        info, fds = self.region_info(index)
        areas = []
        try:
            if info.flags & p.VFIO_REGION_INFO_FLAG_MMAP and fds:
                sparse = [p.sparse_mmap_areas(c) for c in p.region_caps(info) if c.id == p.VFIO_REGION_INFO_CAP_SPARSE_MMAP]
                for start, size in (sparse[0] if sparse else [(0, info.size)]):
                    if size == 0 or start + size > info.size:
                        continue
                    try:
                        m = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                      offset=info.offset + start)
                    except OSError:
                        continue  # the kernel would not map it here: that area goes by messages
                    areas.append((start, m, MappedWindow(m, f"{self.name} region {index}")))
        finally:
            for fd in fds:
                os.close(fd)  # the mappings stay valid without the fd
        readable = bool(info.flags & p.VFIO_REGION_INFO_FLAG_READ)
        desc = RegionInfo(index, info.size, readable, bool(info.flags & p.VFIO_REGION_INFO_FLAG_WRITE), bool(areas))
        region = UserRegion(self, desc, areas)
        self._regions[index] = region
        return region

    # --- DMA ---

    def dma_alloc(self, size: int, *, dma_mask_bits: int = 64) -> SharedDmaBuffer:
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE or mmap.PAGESIZE
        iova = self._iovas.alloc(size, limit_bits=dma_mask_bits)
        try:
            mem = SharedMemory(size, "pcipass-vfio-user-dma")
        except BaseException:
            self._iovas.free(iova)
            raise
        try:
            flags = p.VFIO_DMA_MAP_FLAG_READ | p.VFIO_DMA_MAP_FLAG_WRITE
            self.call(p.Command.DMA_MAP, p.DmaMap(32, flags, 0, iova, size), [mem.fd] if self.share_dma_memory else [])
        except BaseException:
            mem.close()
            self._iovas.free(iova)
            raise
        buf = SharedDmaBuffer(iova, size, mem.window, mem)
        self._buffers[iova] = buf
        return buf

    def dma_free(self, buffer: DmaBuffer) -> None:
        ours = self._buffers.get(buffer.iova)
        if ours is not buffer:
            raise ValueError(f"{self.name}: DMA buffer at {buffer.iova:#x} is not one of this device's")
        del self._buffers[ours.iova]
        self._iovas.free(ours.iova)
        try:
            self.call(p.Command.DMA_UNMAP, p.DmaUnmap(24, 0, ours.iova, ours.size))
        finally:
            ours.memory.close()

    # --- interrupts ---

    def irq_count(self, kind: IrqKind) -> int:
        if kind not in self._irq_counts:
            if int(kind) >= self.info.num_irqs:
                return 0
            try:
                count = self.call(p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(16, 0, int(kind), 0)).count
            except RemoteError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                count = 0  # as from vfio-pci: this index does not apply (ERR on a device that is not PCIe)
            self._irq_counts[kind] = count
        return self._irq_counts[kind]

    def irq_enable(self, kind: IrqKind, count: int = 1) -> list[EventFd]:
        have = self.irq_count(kind)
        if not 0 < count <= have:
            raise PcipassError(f"{self.name}: {count} {kind.name} vectors asked, the device has {have}",
                               hint="ask irq_count() first", code="no-such-irq")
        self.irq_disable(kind)
        flags = p.VFIO_IRQ_SET_DATA_EVENTFD | p.VFIO_IRQ_SET_ACTION_TRIGGER
        fds = new_eventfds(count, lambda fds: self.call(p.Command.DEVICE_SET_IRQS,
                                                        p.IrqSet(20, flags, int(kind), 0, count), [e.fd for e in fds]))
        self._irq_fds[kind] = fds
        return fds

    def irq_disable(self, kind: IrqKind) -> None:
        fds = self._irq_fds.pop(kind, None)
        if fds is None:
            return
        flags = p.VFIO_IRQ_SET_DATA_NONE | p.VFIO_IRQ_SET_ACTION_TRIGGER
        try:
            self.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, flags, int(kind), 0, 0))
        finally:
            for e in fds:
                e.close()

    def irq_unmask(self, kind: IrqKind = IrqKind.INTX, vector: int = 0) -> None:
        flags = p.VFIO_IRQ_SET_DATA_NONE | p.VFIO_IRQ_SET_ACTION_UNMASK
        self.call(p.Command.DEVICE_SET_IRQS, p.IrqSet(20, flags, int(kind), vector, 1))

    def reset(self) -> None:
        self.call(p.Command.DEVICE_RESET)

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        self._closing = True
        if self._twin is not None:
            self._twin.shutdown(socket.SHUT_RDWR)  # its thread sees the end and stops
        if self._twin_thread is not None:
            self._twin_thread.join(5)
            self._twin_thread = None
        if self._twin is not None:
            self._twin.close()
            self._twin = None
        try:
            for kind in list(self._irq_fds):
                self.irq_disable(kind)
            for buf in list(self._buffers.values()):
                self.dma_free(buf)
        except PcipassError:
            pass  # the backend went first: it forgets us anyway
        finally:
            for region in self._regions.values():
                region.close()
            self._regions.clear()
            for buf in self._buffers.values():
                buf.memory.close()
                self._iovas.free(buf.iova)
            self._buffers.clear()
            for fd in self._parser.take_fds():
                os.close(fd)
            self._sock.close()

    def __enter__(self) -> VfioUserDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(path: str | os.PathLike[str], timeout: float = 30.0, *, twin_socket: bool = True,
            share_dma_memory: bool = True) -> VfioUserDevice:
    """Connect to a vfio-user backend (`pcipass serve ... --socket PATH`).

    `twin_socket`: propose the spec's twin-socket mode (the server's DMA_READ/DMA_WRITE on a
    socket of their own, answered by a thread at any time); used only if the backend agrees.
    `share_dma_memory`: False maps DMA buffers without their fd (reached by messages only).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(os.fspath(path))
    except FileNotFoundError:
        sock.close()
        raise PcipassError(f"no vfio-user backend at {path}",
                           hint="start one: pcipass serve BDF --socket PATH (or --model edu)",
                           code="no-backend") from None
    except PermissionError:
        sock.close()
        raise PcipassError(f"not allowed to connect to {path}",
                           hint="the backend sets the socket's owner and mode: pcipass serve --owner USER --mode 0660",
                           code="socket-permission") from None
    except OSError as exc:
        sock.close()
        raise PcipassError(f"cannot connect to {path}: {exc.strerror}",
                           hint="is the backend running? (pcipass serve)", code="no-backend") from None
    try:
        return VfioUserDevice(sock, f"vfio-user:{os.fspath(path)}", timeout, twin_socket=twin_socket,
                              share_dma_memory=share_dma_memory)
    except BaseException:
        sock.close()
        raise
