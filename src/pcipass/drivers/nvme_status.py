"""NVMe completion status: the Status Field decoded into words, and the error it raises.

The Status Field is the upper half of a completion's dword 3 without the phase
tag: SC (bits 7:0), SCT (10:8), CRD (12:11), M (13), DNR (14).
"""

from __future__ import annotations

from dataclasses import dataclass

from pcipass.errors import PcipassError

SCT_GENERIC = 0
SCT_COMMAND_SPECIFIC = 1
SCT_MEDIA = 2
SCT_PATH = 3
SCT_VENDOR = 7

SCT_NAMES = {
    SCT_GENERIC: "generic command status",
    SCT_COMMAND_SPECIFIC: "command specific status",
    SCT_MEDIA: "media and data integrity error",
    SCT_PATH: "path related status",
    SCT_VENDOR: "vendor specific",
}

# (SCT, SC) -> meaning, from the NVMe base and NVM command set specifications.
STATUS_NAMES: dict[tuple[int, int], str] = {
    (0, 0x00): "successful completion",
    (0, 0x01): "invalid command opcode",
    (0, 0x02): "invalid field in command",
    (0, 0x03): "command ID conflict",
    (0, 0x04): "data transfer error",
    (0, 0x05): "commands aborted due to power loss notification",
    (0, 0x06): "internal error",
    (0, 0x07): "command abort requested",
    (0, 0x08): "command aborted due to SQ deletion",
    (0, 0x09): "command aborted due to failed fused command",
    (0, 0x0A): "command aborted due to missing fused command",
    (0, 0x0B): "invalid namespace or format",
    (0, 0x0C): "command sequence error",
    (0, 0x0D): "invalid SGL segment descriptor",
    (0, 0x0E): "invalid number of SGL descriptors",
    (0, 0x0F): "data SGL length invalid",
    (0, 0x10): "metadata SGL length invalid",
    (0, 0x11): "SGL descriptor type invalid",
    (0, 0x12): "invalid use of controller memory buffer",
    (0, 0x13): "PRP offset invalid",
    (0, 0x14): "atomic write unit exceeded",
    (0, 0x15): "operation denied",
    (0, 0x16): "SGL offset invalid",
    (0, 0x18): "host identifier inconsistent format",
    (0, 0x19): "keep alive timer expired",
    (0, 0x1A): "keep alive timeout invalid",
    (0, 0x1B): "command aborted due to preempt and abort",
    (0, 0x1C): "sanitize failed",
    (0, 0x1D): "sanitize in progress",
    (0, 0x1E): "SGL data block granularity invalid",
    (0, 0x1F): "command not supported for queue in CMB",
    (0, 0x20): "namespace is write protected",
    (0, 0x21): "command interrupted",
    (0, 0x22): "transient transport error",
    (0, 0x80): "LBA out of range",
    (0, 0x81): "capacity exceeded",
    (0, 0x82): "namespace not ready",
    (0, 0x83): "reservation conflict",
    (0, 0x84): "format in progress",
    (1, 0x00): "completion queue invalid",
    (1, 0x01): "invalid queue identifier",
    (1, 0x02): "invalid queue size",
    (1, 0x03): "abort command limit exceeded",
    (1, 0x05): "asynchronous event request limit exceeded",
    (1, 0x06): "invalid firmware slot",
    (1, 0x07): "invalid firmware image",
    (1, 0x08): "invalid interrupt vector",
    (1, 0x09): "invalid log page",
    (1, 0x0A): "invalid format",
    (1, 0x0B): "firmware activation requires conventional reset",
    (1, 0x0C): "invalid queue deletion",
    (1, 0x0D): "feature identifier not saveable",
    (1, 0x0E): "feature not changeable",
    (1, 0x0F): "feature not namespace specific",
    (1, 0x80): "conflicting attributes",
    (1, 0x81): "invalid protection information",
    (1, 0x82): "attempted write to read only range",
    (2, 0x80): "write fault",
    (2, 0x81): "unrecovered read error",
    (2, 0x82): "end-to-end guard check error",
    (2, 0x83): "end-to-end application tag check error",
    (2, 0x84): "end-to-end reference tag check error",
    (2, 0x85): "compare failure",
    (2, 0x86): "access denied",
    (2, 0x87): "deallocated or unwritten logical block",
}

# What a user can do about the statuses a user can cause.
STATUS_HINTS: dict[tuple[int, int], str] = {
    (0, 0x01): "the controller lacks this command; see Identify Controller (OACS, ONCS)",
    (0, 0x02): "a field is out of range for this controller; check LBA, count and namespace",
    (0, 0x04): "the controller could not reach the buffer: look for IOMMU (DMAR) faults in dmesg",
    (0, 0x0B): "no such namespace; `pcipass drive nvme BDF` shows how many there are",
    (0, 0x0C): "reset the controller (open the device again) and retry",
    (0, 0x13): "the PRP entries were misaligned: a driver bug, please report it",
    (0, 0x20): "the namespace is write protected; write elsewhere or lift the protection",
    (0, 0x80): "the range passes the namespace's end; `pcipass drive nvme BDF` shows its size",
    (0, 0x81): "the namespace is full",
    (0, 0x82): "the namespace is not ready yet; retry in a moment",
    (1, 0x01): "the queue ID is in use or above what Set Features (Number of Queues) granted",
    (1, 0x02): "the queue is larger than CAP.MQES allows; use a smaller queue depth",
    (1, 0x08): "no such MSI-X vector; run with interrupts off (polling) or use fewer vectors",
    (2, 0x81): "the medium could not return the data: the device may be failing",
}


@dataclass(frozen=True)
class Status:
    """A decoded Status Field (phase tag already removed)."""

    sc: int  # status code
    sct: int  # status code type
    crd: int  # command retry delay index
    more: bool  # more information in the Error Information log page
    dnr: bool  # do not retry

    @classmethod
    def decode(cls, status_field: int) -> Status:
        return cls(
            sc=status_field & 0xFF,
            sct=(status_field >> 8) & 0x7,
            crd=(status_field >> 11) & 0x3,
            more=bool(status_field & (1 << 13)),
            dnr=bool(status_field & (1 << 14)),
        )

    @property
    def ok(self) -> bool:
        return self.sct == SCT_GENERIC and self.sc == 0

    def describe(self) -> str:
        name = STATUS_NAMES.get((self.sct, self.sc))
        if name is None:
            kind = SCT_NAMES.get(self.sct, "reserved status code type")
            name = f"unknown status ({kind})"
        retry = ", do not retry" if self.dnr else ""
        return f"{name} (SCT {self.sct:#x}, SC {self.sc:#04x}{retry})"

    def hint(self) -> str:
        return STATUS_HINTS.get(
            (self.sct, self.sc),
            "look the status code up in the NVMe base specification (Status Field); "
            "the controller's Error Information log page may say more",
        )


class NvmeCommandError(PcipassError):
    """A command completed with an error status."""

    def __init__(self, command: str, device: str, status: Status) -> None:
        super().__init__(
            f"{device}: NVMe {command} failed: {status.describe()}",
            hint=status.hint(),
            code="nvme-status",
        )
        self.command = command
        self.status = status
