"""A small NVMe driver written only against `pcipass.device.Device`.

What it does, in the order the NVMe base specification asks for it:
bus master on, controller disabled (CC.EN = 0, wait CSTS.RDY = 0 within
CAP.TO), the admin queue placed (AQA, ASQ, ACQ), controller enabled, Identify
Controller, Set Features (Number of Queues), one I/O completion queue on MSI-X
vector 1 and its submission queue, Identify Namespace; then Read and Write
through PRPs; at the end a normal shutdown (CC.SHN, wait CSTS.SHST).

    with NvmeController(device) as nvme:
        print(nvme.id_ctrl.model, nvme.namespace.nsze)
        nvme.write(0, data)
        assert nvme.read(0, len(data) // nvme.block_size) == data
"""

from __future__ import annotations

import mmap
import time
from typing import Self

from pcipass.device import Device, DmaBuffer, EventFd, IrqKind, set_command
from pcipass.drivers import nvme_cmd as cmd
from pcipass.drivers.nvme_cmd import IdController, IdNamespace
from pcipass.drivers.nvme_prp import build_prps, list_pages_needed
from pcipass.drivers.nvme_queue import QueuePair
from pcipass.drivers.nvme_regs import (
    NVME_CC_ENABLE,
    NVME_CC_SHN_MASK,
    NVME_CC_SHN_NORMAL,
    NVME_CSTS_CFS,
    NVME_CSTS_RDY,
    NVME_CSTS_SHST_CMPLT,
    NVME_CSTS_SHST_MASK,
    NVME_REG_ACQ,
    NVME_REG_AQA,
    NVME_REG_ASQ,
    NVME_REG_CAP,
    NVME_REG_CC,
    NVME_REG_CSTS,
    NVME_REG_VS,
    Cap,
    aqa_value,
    cc_value,
    version_string,
)
from pcipass.drivers.nvme_status import NvmeCommandError
from pcipass.errors import PcipassError
from pcipass.pci import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY

ADMIN_QID = 0
IO_QID = 1
IO_VECTOR = 1  # MSI-X vector 0 is the admin queue's, by specification
# Bounds on waiting for CSTS: QEMU answers at once, real controllers within CAP.TO.
MIN_READY_TIMEOUT_S = 1.0
SHUTDOWN_TIMEOUT_S = 5.0


class NvmeController:
    """One NVMe controller, started on construction and shut down by `close`."""

    def __init__(
        self,
        device: Device,
        *,
        nsid: int = 1,
        admin_entries: int = 32,
        io_entries: int = 64,
        max_transfer: int = 256 * 1024,
        interrupts: bool = True,
        timeout: float = 10.0,
    ) -> None:
        for what, value, least in (
            ("nsid", nsid, 1),
            ("admin_entries", admin_entries, 2),
            ("io_entries", io_entries, 2),
            ("max_transfer", max_transfer, mmap.PAGESIZE),
        ):
            if value < least:
                raise PcipassError(
                    f"{device.name}: NVMe {what} = {value} is too small",
                    hint=f"{what} must be at least {least}",
                    code="nvme-usage",
                )
        self.device = device
        self.name = device.name
        self.nsid = nsid
        self.timeout = timeout
        self.bar = device.region(0)
        self.page_size = mmap.PAGESIZE
        self.admin: QueuePair | None = None
        self.io: QueuePair | None = None
        self.irqs: list[EventFd] = []
        self.interrupt_mode = "polling"
        self.id_ctrl: IdController | None = None
        self.namespace: IdNamespace | None = None
        self._buffers: list[DmaBuffer] = []
        self._command_saved: int | None = None
        self._started = False
        try:
            self.cap = Cap.decode(self._read64(NVME_REG_CAP))
            self.version = self.bar.read(NVME_REG_VS, 4)
            self._check_page_size()
            self._start(admin_entries, io_entries, max_transfer, interrupts)
        except BaseException:
            self._abandon()
            raise

    # Registers. 64-bit registers go as two 32-bit accesses, low half first,
    # which every controller must accept (and so does every transport).

    def _read64(self, offset: int) -> int:
        low = self.bar.read(offset, 4)
        return low | (self.bar.read(offset + 4, 4) << 32)

    def _write64(self, offset: int, value: int) -> None:
        self.bar.write(offset, 4, value & 0xFFFFFFFF)
        self.bar.write(offset + 4, 4, value >> 32)

    def csts(self) -> int:
        value = self.bar.read(NVME_REG_CSTS, 4)
        if value == 0xFFFFFFFF:
            raise PcipassError(
                f"{self.name}: the NVMe controller reads all ones (CSTS = 0xffffffff)",
                hint="the device is not answering: check that it is still present and bound to "
                "vfio-pci (lspci -k), then reset it",
                code="nvme-gone",
            )
        return value

    def _wait_csts(
        self, mask: int, want: int, timeout: float, what: str, *, fatal_ok: bool = False
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            csts = self.csts()
            if csts & mask == want:
                return
            # A reset (CC.EN = 0) is how a fatal status is cleared: keep waiting then.
            if csts & NVME_CSTS_CFS and not fatal_ok:
                raise PcipassError(
                    f"{self.name}: controller fatal status (CSTS.CFS) while waiting {what}",
                    hint="the controller has stopped; reset the device (it is reset when it is "
                    "opened again) and check the kernel log for IOMMU faults",
                    code="nvme-fatal",
                )
            if time.monotonic() > deadline:
                raise PcipassError(
                    f"{self.name}: timed out after {timeout:g} s waiting {what} (CSTS = {csts:#x})",
                    hint=f"CAP.TO allows {self.cap.timeout_s:g} s; the controller may be wedged: "
                    "reset the device and try again",
                    code="nvme-timeout",
                )
            time.sleep(0.001)

    def _check_page_size(self) -> None:
        if not self.cap.mpsmin <= self.page_size <= self.cap.mpsmax:
            raise PcipassError(
                f"{self.name}: the controller's memory page sizes "
                f"({self.cap.mpsmin}..{self.cap.mpsmax} bytes) exclude the host's {self.page_size}",
                hint="this driver uses the host page size for NVMe memory pages; "
                "such a controller is not supported",
                code="nvme-page-size",
            )

    # Bring-up.

    def _start(
        self, admin_entries: int, io_entries: int, max_transfer: int, interrupts: bool
    ) -> None:
        self._bus_master_on()
        self.disable()
        self._setup_interrupts(interrupts)
        admin_entries = min(admin_entries, self.cap.mqes, 4096)
        self.admin = self._make_queue(ADMIN_QID, admin_entries, self.irqs[0] if self.irqs else None)
        self.bar.write(NVME_REG_AQA, 4, aqa_value(admin_entries, admin_entries))
        self._write64(NVME_REG_ASQ, self.admin.sq.iova)
        self._write64(NVME_REG_ACQ, self.admin.cq.iova)
        self.enable()
        self._started = True

        self._identify_page = self._alloc(self.page_size)
        self.id_ctrl = IdController.parse(self._identify(cmd.NVME_ID_CNS_CTRL))
        limit = self.id_ctrl.max_transfer(self.cap.mpsmin)
        self.max_transfer = min(max_transfer, limit) if limit else max_transfer
        self.max_transfer -= self.max_transfer % self.page_size

        result = self.admin_command(cmd.set_num_queues(1, 1)).result
        nsq, ncq = cmd.granted_queues(result)
        if nsq < 1 or ncq < 1:
            raise PcipassError(f"{self.name}: the controller granted no I/O queues",
                               hint="reset the controller and retry", code="nvme-no-queues")  # fmt: skip
        self.io = self._create_io_queue(min(io_entries, self.cap.mqes))
        self.namespace = IdNamespace.parse(self._identify(cmd.NVME_ID_CNS_NS, nsid=self.nsid))

        # Data moves through one bounce buffer and its PRP list pages.
        self._data = self._alloc(self.max_transfer)
        pages = list_pages_needed(self.max_transfer, self.page_size)
        self._prp_list = self._alloc(pages * self.page_size) if pages else None

    def _bus_master_on(self) -> None:
        self._command_saved = set_command(self.device, on=PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def _setup_interrupts(self, wanted: bool) -> None:
        if not wanted:
            self.interrupt_mode = "polling (interrupts not requested)"
            return
        vectors = self.device.irq_count(IrqKind.MSIX)
        if vectors < 2:
            self.interrupt_mode = f"polling (the device has {vectors} MSI-X vectors, 2 needed)"
            return
        try:
            self.irqs = self.device.irq_enable(IrqKind.MSIX, 2)
        except PcipassError as exc:
            self.interrupt_mode = f"polling (MSI-X could not be enabled: {exc.message})"
            return
        self.interrupt_mode = "MSI-X"

    def disable(self) -> None:
        """CC.EN = 0 and wait for CSTS.RDY = 0: the controller's own reset."""
        cc = self.bar.read(NVME_REG_CC, 4)
        if cc & NVME_CC_ENABLE:
            self.bar.write(NVME_REG_CC, 4, cc & ~NVME_CC_ENABLE)
        self._wait_csts(
            NVME_CSTS_RDY,
            0,
            self._ready_timeout(),
            "for CSTS.RDY to clear after CC.EN = 0",
            fatal_ok=True,
        )

    def enable(self) -> None:
        cc = cc_value(self.page_size)
        self.bar.write(NVME_REG_CC, 4, cc)
        self.bar.write(NVME_REG_CC, 4, cc | NVME_CC_ENABLE)
        self._wait_csts(
            NVME_CSTS_RDY, NVME_CSTS_RDY, self._ready_timeout(), "for CSTS.RDY after CC.EN = 1"
        )

    def _ready_timeout(self) -> float:
        return max(self.cap.timeout_s, MIN_READY_TIMEOUT_S)

    def _alloc(self, size: int) -> DmaBuffer:
        size = -(-size // self.page_size) * self.page_size
        buffer = self.device.dma_alloc(size)
        self._buffers.append(buffer)
        return buffer

    def _make_queue(self, qid: int, entries: int, irq: EventFd | None) -> QueuePair:
        sq = self._alloc(entries * cmd.SQE_SIZE)
        cq = self._alloc(entries * cmd.CQE_SIZE)
        return QueuePair(qid, entries, sq, cq, self.bar, self.cap.dstrd, irq)

    def _create_io_queue(self, entries: int) -> QueuePair:
        irq = self.irqs[IO_VECTOR] if len(self.irqs) > IO_VECTOR else None
        queue = self._make_queue(IO_QID, entries, irq)
        self.admin_command(
            cmd.create_cq(IO_QID, entries, queue.cq.iova, IO_VECTOR if irq else None)
        )
        self.admin_command(cmd.create_sq(IO_QID, entries, queue.sq.iova, IO_QID))
        return queue

    # Commands.

    def _execute(self, queue: QueuePair, command: cmd.Command) -> cmd.Completion:
        cid = queue.submit(command)
        completion = queue.wait(cid, self.timeout)
        if completion is None:
            fatal = self.csts() & NVME_CSTS_CFS
            raise PcipassError(
                f"{self.name}: NVMe {command.name} got no completion within {self.timeout:g} s"
                + (" and the controller reports fatal status (CSTS.CFS)" if fatal else ""),
                hint="check the kernel log for IOMMU (DMAR) faults; the device is reset when it "
                "is opened again",
                code="nvme-timeout",
            )
        if not completion.status.ok:
            raise NvmeCommandError(command.name, self.name, completion.status)
        return completion

    def admin_command(self, command: cmd.Command) -> cmd.Completion:
        assert self.admin is not None
        return self._execute(self.admin, command)

    def io_command(self, command: cmd.Command) -> cmd.Completion:
        """Run one NVM command on the I/O queue, as is (no range checks: for tests and tools)."""
        assert self.io is not None
        return self._execute(self.io, command)

    def _identify(self, cns: int, nsid: int = 0) -> bytes:
        page = self._identify_page
        self.admin_command(cmd.identify(cns, page.iova, nsid=nsid))
        return bytes(page.window.bytes[: cmd.IDENTIFY_SIZE])

    # Data.

    @property
    def block_size(self) -> int:
        return self._active_namespace().block_size

    def _active_namespace(self) -> IdNamespace:
        ns = self.namespace
        if ns is None or ns.nsze == 0:
            raise PcipassError(
                f"{self.name}: namespace {self.nsid} is not active",
                hint=f"the controller has {self.id_ctrl.nn if self.id_ctrl else '?'} namespace(s); "
                "pick an active one with --nsid",
                code="nvme-no-namespace",
            )
        return ns

    def _check_range(self, lba: int, count: int) -> IdNamespace:
        ns = self._active_namespace()
        if lba < 0 or count < 1 or lba + count > ns.nsze:
            raise PcipassError(
                f"{self.name}: blocks {lba}..{lba + count - 1} are outside namespace {self.nsid} "
                f"(blocks 0..{ns.nsze - 1})",
                hint=f"use LBAs below {ns.nsze} and a count of at least 1",
                code="nvme-range",
            )
        return ns

    def _chunks(self, lba: int, count: int, block_size: int):  # type: ignore[no-untyped-def]
        # A command moves at most max_transfer bytes and 65536 blocks (NLB is 16 bits).
        per_command = min(self.max_transfer // block_size, 1 << 16)
        while count:
            n = min(count, per_command)
            yield lba, n
            lba += n
            count -= n

    def _io(self, opcode: int, lba: int, nblocks: int, length: int) -> None:
        list_iova = self._prp_list.iova if self._prp_list else 0
        prps = build_prps(self._data.iova, length, self.page_size, list_iova)
        for n, page in enumerate(prps.list_pages):
            assert self._prp_list is not None
            start = n * self.page_size
            self._prp_list.window.bytes[start : start + len(page)] = page
        self.io_command(cmd.read_write(opcode, self.nsid, lba, nblocks, prps.prp1, prps.prp2))

    def read(self, lba: int, count: int = 1) -> bytes:
        """Read `count` blocks starting at `lba`."""
        ns = self._check_range(lba, count)
        out = bytearray()
        for start, n in self._chunks(lba, count, ns.block_size):
            length = n * ns.block_size
            self._io(cmd.nvme_cmd_read, start, n, length)
            out += self._data.window.bytes[:length]
        return bytes(out)

    def write(self, lba: int, data: bytes) -> None:
        """Write `data` (whole blocks) starting at `lba`."""
        ns = self._active_namespace()
        if not data or len(data) % ns.block_size:
            raise PcipassError(
                f"{self.name}: {len(data)} bytes is not a whole number of {ns.block_size}-byte blocks",
                hint=f"pad the data to a multiple of {ns.block_size} bytes "
                f"(e.g. truncate -s %{ns.block_size} FILE)",
                code="nvme-partial-block",
            )
        count = len(data) // ns.block_size
        self._check_range(lba, count)
        done = 0
        for start, n in self._chunks(lba, count, ns.block_size):
            length = n * ns.block_size
            self._data.window.bytes[:length] = data[done : done + length]
            self._io(cmd.nvme_cmd_write, start, n, length)
            done += length

    # Teardown.

    def shutdown(self) -> None:
        """Delete the I/O queues, then a normal shutdown: CC.SHN = 01, wait CSTS.SHST = 10."""
        try:
            if self.io is not None:
                io, self.io = self.io, None
                self.admin_command(cmd.delete_sq(io.qid))
                self.admin_command(cmd.delete_cq(io.qid))
        finally:
            self._shutdown_controller()

    def _shutdown_controller(self) -> None:
        cc = self.bar.read(NVME_REG_CC, 4)
        self.bar.write(NVME_REG_CC, 4, (cc & ~NVME_CC_SHN_MASK) | NVME_CC_SHN_NORMAL)
        timeout = max(self.cap.timeout_s, SHUTDOWN_TIMEOUT_S)
        self._wait_csts(
            NVME_CSTS_SHST_MASK, NVME_CSTS_SHST_CMPLT, timeout, "for shutdown (CSTS.SHST)"
        )
        self.disable()

    def close(self) -> None:
        """Shut the controller down and give back interrupts, DMA memory and bus mastering.

        The Device itself stays open: it belongs to the caller.
        """
        try:
            if self._started:
                self._started = False
                self.shutdown()
        finally:
            self._release()

    def _abandon(self) -> None:
        # Bring-up failed: stop the controller before its queues' memory goes away.
        try:
            if self._started:
                self._started = False
                self.disable()
        except PcipassError:
            pass
        finally:
            self._release()

    def _release(self) -> None:
        try:
            if self.irqs:
                self.irqs = []
                self.device.irq_disable(IrqKind.MSIX)
        finally:
            while self._buffers:
                self.device.dma_free(self._buffers.pop())
            if self._command_saved is not None:
                self.device.config_write(PCI_COMMAND, 2, self._command_saved)
                self._command_saved = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, object]:
        """What Identify said, for people and --json."""
        assert self.id_ctrl is not None
        info: dict[str, object] = {
            "device": self.name,
            "model": self.id_ctrl.model,
            "serial": self.id_ctrl.serial,
            "firmware": self.id_ctrl.firmware,
            "nvme_version": version_string(self.version),
            "pci_vendor": f"{self.id_ctrl.vid:04x}",
            "mdts": self.id_ctrl.mdts,
            "max_transfer": self.max_transfer,
            "namespaces": self.id_ctrl.nn,
            "interrupts": self.interrupt_mode,
            "doorbell_stride": 4 << self.cap.dstrd,
            "max_queue_entries": self.cap.mqes,
        }
        ns = self.namespace
        if ns is not None and ns.nsze:
            info.update(
                nsid=self.nsid, blocks=ns.nsze, block_size=ns.block_size, size_bytes=ns.size_bytes
            )
        return info
