"""PCI configuration space: register offsets, capability IDs and names, and the walkers.

Shared by the host inventory (config space read from sysfs's `config` file)
and the vfio library (config space read over a device fd). The walkers take a
`read(offset, width) -> int` callable, or any bytes-like object, which
`reader()` turns into one. Config space is little-endian.

Names mirror linux/pci_regs.h.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple, Union

Read = Callable[[int, int], int]
Source = Union[Read, bytes, bytearray, memoryview]

# Type 0/1 header (linux/pci_regs.h).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_IO = 0x1  # I/O space decoding
PCI_COMMAND_MEMORY = 0x2  # memory space decoding
PCI_COMMAND_MASTER = 0x4  # bus mastering: the device's own memory accesses (DMA, MSI)
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS = 0x06
PCI_STATUS_INTERRUPT = 0x08  # INTx asserted (read-only)
PCI_STATUS_CAP_LIST = 0x10
# The write-1-to-clear error bits: PCI_STATUS_PARITY, SIG_TARGET_ABORT, REC_TARGET_ABORT,
# REC_MASTER_ABORT, SIG_SYSTEM_ERROR, DETECTED_PARITY.
PCI_STATUS_ERRORS = 0xF900
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_HEADER_TYPE = 0x0E
PCI_HEADER_TYPE_MASK = 0x7F
PCI_HEADER_TYPE_MFD = 0x80
PCI_HEADER_TYPE_NORMAL = 0
PCI_HEADER_TYPE_BRIDGE = 1
PCI_HEADER_TYPE_CARDBUS = 2
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8
PCI_PRIMARY_BUS = 0x18
PCI_SECONDARY_BUS = 0x19
PCI_SUBORDINATE_BUS = 0x1A
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_CB_CAPABILITY_LIST = 0x14
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_STD_HEADER_SIZEOF = 0x40
PCI_CFG_SPACE_SIZE = 0x100
PCI_CFG_SPACE_EXP_SIZE = 0x1000

# Standard capability IDs (PCI_CAP_ID_*).
PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_AGP = 0x02
PCI_CAP_ID_VPD = 0x03
PCI_CAP_ID_SLOTID = 0x04
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_CHSWP = 0x06
PCI_CAP_ID_PCIX = 0x07
PCI_CAP_ID_HT = 0x08
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_DBG = 0x0A
PCI_CAP_ID_CCRC = 0x0B
PCI_CAP_ID_SHPC = 0x0C
PCI_CAP_ID_SSVID = 0x0D
PCI_CAP_ID_AGP3 = 0x0E
PCI_CAP_ID_SECDEV = 0x0F
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_SATA = 0x12
PCI_CAP_ID_AF = 0x13
PCI_CAP_ID_EA = 0x14

CAP_NAMES = {
    PCI_CAP_ID_PM: "pm",
    PCI_CAP_ID_AGP: "agp",
    PCI_CAP_ID_VPD: "vpd",
    PCI_CAP_ID_SLOTID: "slotid",
    PCI_CAP_ID_MSI: "msi",
    PCI_CAP_ID_CHSWP: "chswp",
    PCI_CAP_ID_PCIX: "pcix",
    PCI_CAP_ID_HT: "ht",
    PCI_CAP_ID_VNDR: "vndr",
    PCI_CAP_ID_DBG: "dbg",
    PCI_CAP_ID_CCRC: "ccrc",
    PCI_CAP_ID_SHPC: "shpc",
    PCI_CAP_ID_SSVID: "ssvid",
    PCI_CAP_ID_AGP3: "agp3",
    PCI_CAP_ID_SECDEV: "secdev",
    PCI_CAP_ID_EXP: "exp",
    PCI_CAP_ID_MSIX: "msix",
    PCI_CAP_ID_SATA: "sata",
    PCI_CAP_ID_AF: "af",
    PCI_CAP_ID_EA: "ea",
}

# Extended capability IDs (PCI_EXT_CAP_ID_*), from 0x100 in PCIe config space.
PCI_EXT_CAP_ID_ERR = 0x01
PCI_EXT_CAP_ID_VC = 0x02
PCI_EXT_CAP_ID_DSN = 0x03
PCI_EXT_CAP_ID_PWR = 0x04
PCI_EXT_CAP_ID_RCLD = 0x05
PCI_EXT_CAP_ID_RCILC = 0x06
PCI_EXT_CAP_ID_RCEC = 0x07
PCI_EXT_CAP_ID_MFVC = 0x08
PCI_EXT_CAP_ID_VC9 = 0x09
PCI_EXT_CAP_ID_RCRB = 0x0A
PCI_EXT_CAP_ID_VNDR = 0x0B
PCI_EXT_CAP_ID_CAC = 0x0C
PCI_EXT_CAP_ID_ACS = 0x0D
PCI_EXT_CAP_ID_ARI = 0x0E
PCI_EXT_CAP_ID_ATS = 0x0F
PCI_EXT_CAP_ID_SRIOV = 0x10
PCI_EXT_CAP_ID_MRIOV = 0x11
PCI_EXT_CAP_ID_MCAST = 0x12
PCI_EXT_CAP_ID_PRI = 0x13
PCI_EXT_CAP_ID_AMD_XXX = 0x14
PCI_EXT_CAP_ID_REBAR = 0x15
PCI_EXT_CAP_ID_DPA = 0x16
PCI_EXT_CAP_ID_TPH = 0x17
PCI_EXT_CAP_ID_LTR = 0x18
PCI_EXT_CAP_ID_SECPCI = 0x19
PCI_EXT_CAP_ID_PMUX = 0x1A
PCI_EXT_CAP_ID_PASID = 0x1B
PCI_EXT_CAP_ID_DPC = 0x1D
PCI_EXT_CAP_ID_L1SS = 0x1E
PCI_EXT_CAP_ID_PTM = 0x1F
PCI_EXT_CAP_ID_DVSEC = 0x23
PCI_EXT_CAP_ID_DLF = 0x25
PCI_EXT_CAP_ID_PL_16GT = 0x26

EXT_CAP_NAMES = {
    PCI_EXT_CAP_ID_ERR: "err",
    PCI_EXT_CAP_ID_VC: "vc",
    PCI_EXT_CAP_ID_DSN: "dsn",
    PCI_EXT_CAP_ID_PWR: "pwr",
    PCI_EXT_CAP_ID_RCLD: "rcld",
    PCI_EXT_CAP_ID_RCILC: "rcilc",
    PCI_EXT_CAP_ID_RCEC: "rcec",
    PCI_EXT_CAP_ID_MFVC: "mfvc",
    PCI_EXT_CAP_ID_VC9: "vc9",
    PCI_EXT_CAP_ID_RCRB: "rcrb",
    PCI_EXT_CAP_ID_VNDR: "vndr",
    PCI_EXT_CAP_ID_CAC: "cac",
    PCI_EXT_CAP_ID_ACS: "acs",
    PCI_EXT_CAP_ID_ARI: "ari",
    PCI_EXT_CAP_ID_ATS: "ats",
    PCI_EXT_CAP_ID_SRIOV: "sriov",
    PCI_EXT_CAP_ID_MRIOV: "mriov",
    PCI_EXT_CAP_ID_MCAST: "mcast",
    PCI_EXT_CAP_ID_PRI: "pri",
    PCI_EXT_CAP_ID_AMD_XXX: "amd_xxx",
    PCI_EXT_CAP_ID_REBAR: "rebar",
    PCI_EXT_CAP_ID_DPA: "dpa",
    PCI_EXT_CAP_ID_TPH: "tph",
    PCI_EXT_CAP_ID_LTR: "ltr",
    PCI_EXT_CAP_ID_SECPCI: "secpci",
    PCI_EXT_CAP_ID_PMUX: "pmux",
    PCI_EXT_CAP_ID_PASID: "pasid",
    PCI_EXT_CAP_ID_DPC: "dpc",
    PCI_EXT_CAP_ID_L1SS: "l1ss",
    PCI_EXT_CAP_ID_PTM: "ptm",
    PCI_EXT_CAP_ID_DVSEC: "dvsec",
    PCI_EXT_CAP_ID_DLF: "dlf",
    PCI_EXT_CAP_ID_PL_16GT: "pl_16gt",
}

# PCI Express capability: flags register and the device/port type in it.
PCI_EXP_FLAGS = 0x02
PCI_EXP_FLAGS_TYPE = 0x00F0
PCI_EXP_TYPE_ENDPOINT = 0x0
PCI_EXP_TYPE_LEG_END = 0x1
PCI_EXP_TYPE_ROOT_PORT = 0x4
PCI_EXP_TYPE_UPSTREAM = 0x5
PCI_EXP_TYPE_DOWNSTREAM = 0x6
PCI_EXP_TYPE_PCI_BRIDGE = 0x7
PCI_EXP_TYPE_PCIE_BRIDGE = 0x8
PCI_EXP_TYPE_RC_END = 0x9
PCI_EXP_TYPE_RC_EC = 0xA
PCI_EXP_DEVCAP = 0x04
PCI_EXP_DEVCAP_FLR = 0x10000000

EXP_TYPE_NAMES = {
    PCI_EXP_TYPE_ENDPOINT: "endpoint",
    PCI_EXP_TYPE_LEG_END: "legacy-endpoint",
    PCI_EXP_TYPE_ROOT_PORT: "root-port",
    PCI_EXP_TYPE_UPSTREAM: "upstream-port",
    PCI_EXP_TYPE_DOWNSTREAM: "downstream-port",
    PCI_EXP_TYPE_PCI_BRIDGE: "pcie-to-pci-bridge",
    PCI_EXP_TYPE_PCIE_BRIDGE: "pci-to-pcie-bridge",
    PCI_EXP_TYPE_RC_END: "rc-integrated-endpoint",
    PCI_EXP_TYPE_RC_EC: "rc-event-collector",
}

# Power management: No_Soft_Reset in PMCSR decides whether a D3hot->D0 cycle resets.
PCI_PM_CTRL = 0x04
PCI_PM_CTRL_NO_SOFT_RESET = 0x0008

# Advanced features: FLR through the AF capability on conventional PCI.
PCI_AF_CAP = 0x03
PCI_AF_CAP_TP = 0x01
PCI_AF_CAP_FLR = 0x02

# Single Root I/O Virtualization: the registers of the extended capability (offsets from it).
PCI_SRIOV_CAP = 0x04
PCI_SRIOV_CTRL = 0x08
PCI_SRIOV_CTRL_VFE = 0x0001  # VF enable
PCI_SRIOV_CTRL_MSE = 0x0008  # VF memory space enable
PCI_SRIOV_INITIAL_VF = 0x0C
PCI_SRIOV_TOTAL_VF = 0x0E
PCI_SRIOV_NUM_VF = 0x10
PCI_SRIOV_VF_OFFSET = 0x14  # first VF's routing ID, from the PF's
PCI_SRIOV_VF_STRIDE = 0x16  # routing ID distance between VFs
PCI_SRIOV_VF_DID = 0x1A  # the VFs' device ID

# Access Control Services: capability and control registers, and their bits.
PCI_ACS_CAP = 0x04
PCI_ACS_CTRL = 0x06
PCI_ACS_SV = 0x0001  # source validation
PCI_ACS_TB = 0x0002  # translation blocking
PCI_ACS_RR = 0x0004  # P2P request redirect
PCI_ACS_CR = 0x0008  # P2P completion redirect
PCI_ACS_UF = 0x0010  # upstream forwarding
PCI_ACS_EC = 0x0020  # P2P egress control
PCI_ACS_DT = 0x0040  # direct translated P2P

ACS_BITS = {
    "SV": PCI_ACS_SV,
    "TB": PCI_ACS_TB,
    "RR": PCI_ACS_RR,
    "CR": PCI_ACS_CR,
    "UF": PCI_ACS_UF,
    "EC": PCI_ACS_EC,
    "DT": PCI_ACS_DT,
}
# What the kernel asks of a port before it lets the devices below be isolated
# (drivers/pci/pci.c, REQ_ACS_FLAGS): SV, RR, CR, UF.
ACS_REQUIRED = ("SV", "RR", "CR", "UF")

# MSI capability: offsets from the capability, and the bits of its flags.
PCI_MSI_FLAGS = 0x02
PCI_MSI_FLAGS_ENABLE = 0x01
PCI_MSI_FLAGS_QMASK = 0x0E  # vectors the function can ask for (log2)
PCI_MSI_FLAGS_QSIZE = 0x70  # vectors enabled (log2)
PCI_MSI_FLAGS_64BIT = 0x80

# Class codes (class >> 8; linux/pci_ids.h).
PCI_CLASS_BRIDGE_HOST = 0x0600
PCI_CLASS_BRIDGE_ISA = 0x0601
PCI_CLASS_BRIDGE_EISA = 0x0602
PCI_CLASS_BRIDGE_MC = 0x0603
PCI_CLASS_BRIDGE_PCI = 0x0604
PCI_CLASS_BRIDGE_CARDBUS = 0x0607
PCI_CLASS_BRIDGE_PCI_SEMI = 0x0609  # subtractive-decode PCI-to-PCI bridge
PCI_CLASS_SYSTEM_PIC = 0x0800
PCI_CLASS_SYSTEM_DMA = 0x0801
PCI_CLASS_SYSTEM_TIMER = 0x0802
PCI_CLASS_SYSTEM_RTC = 0x0803
PCI_CLASS_SYSTEM_IOMMU = 0x0806
PCI_CLASS_SERIAL_SMBUS = 0x0C05
PCI_BASE_CLASS_DISPLAY = 0x03


class ConfigUnreadable(Exception):
    """The part of config space asked for is not there (short read, e.g. without root)."""


def reader(src: Source) -> Read:
    """A `read(offset, width) -> int` over `src` (a callable is returned as is)."""
    if callable(src):
        return src
    # bytes are immutable: no copy (a listing walks thousands of 4 KiB config spaces).
    data = src if isinstance(src, bytes) else bytes(src)
    size = len(data)
    from_bytes = int.from_bytes

    def read(offset: int, width: int) -> int:
        if offset < 0 or offset + width > size:
            raise ConfigUnreadable(f"config space has {size} bytes, not {offset + width}")
        return data[offset] if width == 1 else from_bytes(data[offset : offset + width], "little")

    return read


class Capability(NamedTuple):
    """One capability found in config space: `id`, where it is, and its name."""

    id: int
    offset: int
    extended: bool = False
    version: int = 0

    @property
    def name(self) -> str:
        names = EXT_CAP_NAMES if self.extended else CAP_NAMES
        return names.get(self.id, f"{'ext-' if self.extended else ''}cap-{self.id:#04x}")


def capabilities(src: Source) -> Iterator[Capability]:
    """The standard capability list, from the pointer at 0x34 (0x14 on a CardBus bridge).

    Stops on a loop or a pointer into the header, as the kernel does.
    """
    read = reader(src)
    if not read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return
    header = read(PCI_HEADER_TYPE, 1) & PCI_HEADER_TYPE_MASK
    ptr = read(PCI_CB_CAPABILITY_LIST if header == PCI_HEADER_TYPE_CARDBUS else PCI_CAPABILITY_LIST, 1)
    seen: set[int] = set()
    # At most 48 capabilities fit in 192 bytes (the kernel's PCI_FIND_CAP_TTL).
    while len(seen) < 48:
        ptr &= 0xFC
        if ptr < PCI_STD_HEADER_SIZEOF or ptr in seen:
            return
        seen.add(ptr)
        cap_id = read(ptr, 1)
        if cap_id == 0xFF:
            return
        yield Capability(cap_id, ptr)
        ptr = read(ptr + 1, 1)


def extended_capabilities(src: Source) -> Iterator[Capability]:
    """The extended capability list of a PCIe function, from 0x100."""
    read = reader(src)
    offset = PCI_CFG_SPACE_SIZE
    seen: set[int] = set()
    while offset and offset not in seen and len(seen) < (PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE) // 8:
        seen.add(offset)
        header = read(offset, 4)
        # All ones: no extended space (conventional PCI); all zeros: empty list.
        if header in (0, 0xFFFFFFFF):
            return
        yield Capability(header & 0xFFFF, offset, extended=True, version=(header >> 16) & 0xF)
        offset = (header >> 20) & 0xFFC
        if offset and offset < PCI_CFG_SPACE_SIZE:
            return


def find_capability(src: Source, cap_id: int, extended: bool = False) -> Capability | None:
    """The first capability `cap_id`, or None."""
    walk = extended_capabilities if extended else capabilities
    for cap in walk(src):
        if cap.id == cap_id:
            return cap
    return None


class Acs(NamedTuple):
    """A port's ACS capability and control registers, bit by bit."""

    cap: int
    ctrl: int

    @property
    def supported(self) -> list[str]:
        return [name for name, bit in ACS_BITS.items() if self.cap & bit]

    @property
    def enabled(self) -> list[str]:
        return [name for name, bit in ACS_BITS.items() if self.ctrl & bit]

    def missing(self, wanted: tuple[str, ...] = ACS_REQUIRED) -> list[str]:
        """The bits in `wanted` that are not both supported and enabled."""
        return [name for name in wanted if not (self.cap & self.ctrl & ACS_BITS[name])]


def acs(src: Source) -> Acs | None:
    """The ACS registers of a function, or None when it has no ACS capability."""
    read = reader(src)
    cap = find_capability(read, PCI_EXT_CAP_ID_ACS, extended=True)
    if cap is None:
        return None
    return Acs(read(cap.offset + PCI_ACS_CAP, 2), read(cap.offset + PCI_ACS_CTRL, 2))


def express_type(src: Source) -> int | None:
    """The PCIe device/port type (PCI_EXP_TYPE_*), or None for a conventional PCI function."""
    read = reader(src)
    cap = find_capability(read, PCI_CAP_ID_EXP)
    if cap is None:
        return None
    return (read(cap.offset + PCI_EXP_FLAGS, 2) & PCI_EXP_FLAGS_TYPE) >> 4
