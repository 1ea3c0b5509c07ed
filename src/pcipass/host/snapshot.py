"""`pcipass snapshot OUT`: copy every file pcipass reads into a tree `--sysfs` accepts.

Symlinks are copied as they are (sysfs makes them relative), and the
directories they point at are created, so the copy resolves the same way the
original does. Only what the model, the verdict and `lspci -A linux-sysfs`
read is copied: no ROMs, no BARs.
"""

from __future__ import annotations

import json
import os
import time

from pcipass import __version__
from pcipass.errors import PcipassError
from pcipass.host.sysfs import CLASS_IOMMU, IOMMU_GROUPS, PCI_DEVICES, XEN_HYPERVISOR_LOG, Host
from pcipass.host.usage import pci_function_of

SNAPSHOT_SCHEMA = "pcipass/snapshot/1"
MANIFEST = "pcipass-snapshot.json"

# Per PCI function: attributes read as files, and symlinks kept as links.
DEVICE_FILES = (
    "vendor", "device", "subsystem_vendor", "subsystem_device", "class", "revision", "numa_node",
    "driver_override", "enable", "boot_vga", "reset_method", "reset", "config", "modalias", "irq",
    "resource", "local_cpulist", "sriov_totalvfs", "sriov_numvfs", "label", "index", "max_link_speed",
)
DEVICE_LINKS = ("driver", "iommu_group", "physfn")
PROC_FILES = ("cmdline", "mounts", "swaps", "net/route", "net/if_inet6", "net/ipv6_route", "xen/capabilities")


class Snapshot:
    def __init__(self, host: Host, out: str) -> None:
        self.host = host
        self.out = os.path.abspath(out)
        self.files = 0

    def _dst(self, rel: str) -> str:
        return os.path.join(self.out, rel)

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.host.root)

    def dir(self, rel: str) -> None:
        os.makedirs(self._dst(rel), exist_ok=True)

    def file(self, rel: str) -> None:
        """Copy one file's bytes (a missing or unreadable file is left out)."""
        src = self.host.path(rel)
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError:
            return
        self.dir(os.path.dirname(rel))
        with open(self._dst(rel), "wb") as f:
            f.write(data)
        self.files += 1

    def link(self, rel: str) -> str | None:
        """Copy a symlink as it is and create the directory it resolves to; return that directory's rel path."""
        src = self.host.path(rel)
        try:
            target = os.readlink(src)
        except OSError:
            return None
        real = os.path.realpath(src)
        if not real.startswith(self.host.root.rstrip(os.sep) + os.sep):
            return None  # points outside the tree: nothing to keep
        real_rel = self._rel(real)
        self.dir(real_rel)
        self.dir(os.path.dirname(rel))
        dst = self._dst(rel)
        if os.path.lexists(dst):
            os.unlink(dst)
        os.symlink(target, dst)
        self.files += 1
        return real_rel

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.host.path(rel)))
        except OSError:
            return []

    def take(self) -> None:
        if os.path.exists(self.out) and os.listdir(self.out):
            raise PcipassError(
                f"{self.out} exists and is not empty",
                hint="give a new directory (or remove this one); a snapshot never overwrites",
                code="snapshot-exists",
            )
        devices = self.host.devices()  # fails with a clear error on a tree without PCI devices
        os.makedirs(self.out, exist_ok=True)
        for dev in devices:
            real_rel = self.link(os.path.join(PCI_DEVICES, dev.name))
            if real_rel is None:
                continue
            for name in DEVICE_FILES:
                self.file(os.path.join(real_rel, name))
            for name in DEVICE_LINKS + tuple(n for n in self.listdir(real_rel) if n.startswith("virtfn")):
                self.link(os.path.join(real_rel, name))
        for group in self.listdir(IOMMU_GROUPS):
            self.dir(os.path.join(IOMMU_GROUPS, group))
            self.file(os.path.join(IOMMU_GROUPS, group, "type"))
            for member in self.listdir(os.path.join(IOMMU_GROUPS, group, "devices")):
                self.link(os.path.join(IOMMU_GROUPS, group, "devices", member))
        self.dir(CLASS_IOMMU)
        for unit in self.listdir(CLASS_IOMMU):
            self.link(os.path.join(CLASS_IOMMU, unit))
        self._block()
        self._net()
        for name in PROC_FILES:
            self.file(os.path.join("proc", name))
        self._cpu_vendor()
        self._iommu_tables()
        self._xen_log()
        self._manifest(len(devices))

    def _block(self) -> None:
        self.dir("sys/block")
        for disk in self.listdir("sys/block"):
            rel = f"sys/block/{disk}"
            if not pci_function_of(os.path.realpath(self.host.path(rel))):
                continue  # loop, zram, ...: not on a PCI device
            real_rel = self.link(rel)
            if real_rel is None:
                continue
            self.link(os.path.join(real_rel, "device"))
            for h in self.listdir(os.path.join(real_rel, "holders")):
                self.link(os.path.join(real_rel, "holders", h))
            for part in self.listdir(real_rel):
                if os.path.exists(self.host.path(os.path.join(real_rel, part, "partition"))):
                    self.file(os.path.join(real_rel, part, "partition"))
                    self.dir(os.path.join(real_rel, part, "holders"))
                    for h in self.listdir(os.path.join(real_rel, part, "holders")):
                        self.link(os.path.join(real_rel, part, "holders", h))

    def _net(self) -> None:
        self.dir("sys/class/net")
        for iface in self.listdir("sys/class/net"):
            rel = f"sys/class/net/{iface}"
            device = self.host.path(rel, "device")
            if not os.path.exists(device) or not pci_function_of(os.path.realpath(device)):
                continue
            real_rel = self.link(rel)
            if real_rel is None:
                continue
            self.link(os.path.join(real_rel, "device"))
            for name in ("operstate", "flags", "address"):
                self.file(os.path.join(real_rel, name))

    def _xen_log(self) -> None:
        """On a Xen dom0, Xen's boot log (where it says whether its IOMMU is on), where the
        model reads it in a captured tree."""
        if not self.host.xen_dom0:
            return
        if self.host.root != "/":
            self.file(XEN_HYPERVISOR_LOG)
            return
        import subprocess

        try:
            log = subprocess.run(["xl", "dmesg"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        if log:
            self.dir(os.path.dirname(XEN_HYPERVISOR_LOG))
            with open(self._dst(XEN_HYPERVISOR_LOG), "w") as f:
                f.write(log)

    def _cpu_vendor(self) -> None:
        # Only the vendor line: it picks intel_iommu= or amd_iommu= in hints.
        vendor = self.host.cpu_vendor
        if vendor:
            self.dir("proc")
            with open(self._dst("proc/cpuinfo"), "w") as f:
                f.write(f"vendor_id\t: {vendor}\n")

    def _iommu_tables(self) -> None:
        # Only that they exist (empty files): they pick intel_iommu= or amd_iommu= in hints.
        from pcipass.host.verdict import ACPI_IOMMU_TABLES, ACPI_TABLES

        for table in ACPI_IOMMU_TABLES:
            if os.path.exists(self.host.path(ACPI_TABLES, table)):
                self.dir(ACPI_TABLES)
                open(self._dst(os.path.join(ACPI_TABLES, table)), "w").close()

    def _manifest(self, count: int) -> None:
        import platform  # only here: it pulls in subprocess

        doc = {
            "schema": SNAPSHOT_SCHEMA,
            "pcipass": __version__,
            "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": self.host.root,
            "kernel": platform.release() if self.host.root == "/" else None,
            "devices": count,
            "files": self.files,
            "root": os.geteuid() == 0,
        }
        with open(self._dst(MANIFEST), "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


def snapshot(host: Host, out: str) -> dict[str, object]:
    """Take the snapshot; return its manifest."""
    s = Snapshot(host, out)
    s.take()
    with open(os.path.join(s.out, MANIFEST)) as f:
        return json.load(f)
