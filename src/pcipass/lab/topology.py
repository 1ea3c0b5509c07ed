"""Named PCI topologies for the lab: what QEMU builds, and what the kernel should then show.

A topology is data: a list of QEMU `-device` specs (plus the drives and netdevs
they need) and the devices a test may expect to find. The emulated Intel IOMMU
and the q35 machine are common to all of them (see `machine_args`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pcipass.errors import UsageError

EDU = "1234:11e8"
QEMU_NVME = "1b36:0010"
E1000E = "8086:10d3"
# QEMU's igb: an 82576 (driver igb) with SR-IOV; its VFs are 82576 VFs (driver igbvf).
IGB = "8086:10c9"
IGBVF = "8086:10ca"
# Which QEMU boots a topology: Debian's own (7.2), or the peer QEMU 11.1 that bootstrap
# unpacks (pcipass.lab.peer_qemu), for devices 7.2 does not have.
DEBIAN_QEMU, PEER_QEMU = "debian", "peer"
# The serial the lab gives its NVMe controller, so a driver can check Identify.
NVME_SERIAL = "PCIPASS0001"


@dataclass(frozen=True)
class Topology:
    name: str
    summary: str
    devices: tuple[str, ...]  # QEMU -device specs, in order (buses before what sits on them)
    nvme_disks: tuple[str, ...] = ()  # drive ids that need a backing image
    netdevs: tuple[str, ...] = ()  # netdev ids (user networking, restricted: no way out)
    expect: tuple[str, ...] = field(default=())  # vendor:device ids a guest will find
    qemu: str = DEBIAN_QEMU  # DEBIAN_QEMU or PEER_QEMU

    def qemu_args(self, workdir: Path) -> list[str]:
        """The QEMU arguments for the devices; disk images are created in `workdir`."""
        args: list[str] = []
        for drive in self.nvme_disks:
            image = workdir / f"{drive}.img"
            if not image.exists():
                with open(image, "wb") as f:
                    f.truncate(64 << 20)  # sparse: costs nothing until written
            args += ["-drive", f"if=none,id={drive},file={image},format=raw"]
        for netdev in self.netdevs:
            args += ["-netdev", f"user,id={netdev},restrict=on"]
        for device in self.devices:
            args += ["-device", device]
        return args


def machine_args() -> list[str]:
    """q35 with an emulated VT-d that remaps interrupts; caching-mode lets VFIO map through it."""
    return [
        "-machine", "q35,kernel-irqchip=split",
        "-device", "intel-iommu,intremap=on,caching-mode=on",
    ]


# The VFIO document's example: a PCIe-to-PCI bridge with a two-function device
# behind it (bridge and both functions share one group), and a standalone edu.
_SEED = (
    "pcie-root-port,id=rp1,chassis=1,slot=1",
    "pcie-pci-bridge,id=br1,bus=rp1",
    "edu,bus=br1,addr=0x0d.0,multifunction=on",
    "edu,bus=br1,addr=0x0d.1",
    # On the root bus, alone in its group; pinned to slot 0x10 so its address stays
    # 0000:00:10.0 however many devices virtme-ng adds before it.
    "edu,addr=0x10",
)
STANDALONE_EDU = "0000:00:10.0"
# Devices with real kernel drivers, each behind its own root port.
_DRIVERS = (
    "pcie-root-port,id=rp2,chassis=2,slot=2",
    f"nvme,bus=rp2,serial={NVME_SERIAL},drive=nvm0",
    "pcie-root-port,id=rp3,chassis=3,slot=3",
    "e1000e,bus=rp3,netdev=net0",
)

# SR-IOV that Linux really drives: igb (QEMU 8.0 and later) behind its own root port, whose ACS
# gives the PF and each VF a group of its own. QEMU places the VFs at the PF's routing ID +
# 0x80, stride 2 (01:10.0, 01:10.2, ...), at most 7.
_SRIOV = (
    "pcie-root-port,id=rp4,chassis=4,slot=4",
    "igb,bus=rp4,netdev=net1",
)

TOPOLOGIES: dict[str, Topology] = {
    t.name: t
    for t in (
        Topology(
            "seed",
            "the VFIO document's example: a PCIe-to-PCI bridge with edu functions 0d.0 and 0d.1 "
            "behind it (one group of three), plus a standalone edu",
            _SEED,
            expect=(EDU,),
        ),
        Topology(
            "drivers",
            "devices with real drivers: an NVMe controller (nvme, MSI-X) and an e1000e NIC, "
            "each behind its own root port",
            _DRIVERS,
            nvme_disks=("nvm0",),
            netdevs=("net0",),
            expect=(QEMU_NVME, E1000E),
        ),
        Topology(
            "default",
            "seed and drivers together: used by the demo and the test suite",
            _SEED + _DRIVERS,
            nvme_disks=("nvm0",),
            netdevs=("net0",),
            expect=(EDU, QEMU_NVME, E1000E),
        ),
        Topology(
            "sriov",
            "an 82576 NIC (QEMU's igb, driver igb) whose SR-IOV VFs igbvf drives, behind its own "
            "root port; boots on the peer QEMU 11.1 (Debian's 7.2 has no igb)",
            _SRIOV,
            netdevs=("net1",),
            expect=(IGB,),
            qemu=PEER_QEMU,
        ),
    )
}


def get(name: str) -> Topology:
    try:
        return TOPOLOGIES[name]
    except KeyError:
        known = ", ".join(sorted(TOPOLOGIES))
        raise UsageError(
            f"unknown lab topology {name!r}",
            hint=f"known topologies: {known} (pcipass lab topologies describes them)",
            code="unknown-topology",
        ) from None
