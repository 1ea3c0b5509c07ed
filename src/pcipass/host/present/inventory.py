"""The documents `pcipass list`, `groups` and `check` print with --json (docs/host.md).

Each document carries "schema": "pcipass/<verb>/<version>". Within a version,
fields are only ever added, never renamed, retyped or removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pcipass import pci
from pcipass.host.model.pciids import PciIds
from pcipass.host.model.sysfs import Host, PciDevice
from pcipass.host.speed.fanout import fan_out

if TYPE_CHECKING:
    from pcipass.host.verdict.judge import Verdict

# The verdicts (pcipass.host.verdict.judge, usage) are imported by the documents that judge:
# `list` judges nothing, and its start-up is part of every listing's time.

LIST_SCHEMA = "pcipass/list/1"
GROUPS_SCHEMA = "pcipass/groups/1"
CHECK_SCHEMA = "pcipass/check/1"


def _hex(value: int | None, digits: int) -> str | None:
    return None if value is None else f"{value:0{digits}x}"


def device_json(dev: PciDevice, ids: PciIds, at_work: str | None = None) -> dict[str, Any]:
    """One device of the listing. `at_work`: who holds the device's group lock now (see
    journal.devices_at_work); the attributes the kernel shows under the device lock are then
    left unread (None), since a blocked unbind would make the listing wait with it."""
    v, d, sv, sd, cls = dev.vendor, dev.device, dev.subsystem_vendor, dev.subsystem_device, dev.pci_class
    class_names = ids.pci_class(cls) if cls is not None else (None, None, None)
    caps = dev.capabilities
    pf = dev.physfn
    return {
        "bdf": dev.name,
        "vendor_id": _hex(v, 4),
        "device_id": _hex(d, 4),
        "subsystem_vendor_id": _hex(sv, 4),
        "subsystem_device_id": _hex(sd, 4),
        "vendor": ids.vendor(v) if v is not None else None,
        "device": ids.device(v, d) if v is not None and d is not None else None,
        "subsystem": ids.subsystem(v, d, sv, sd) if None not in (v, d, sv, sd) else None,  # type: ignore[arg-type]
        "subsystem_vendor": ids.vendor(sv) if sv else None,
        "class": _hex(cls, 6),
        "class_name": class_names[0],
        "subclass_name": class_names[1],
        "prog_if_name": class_names[2],
        "revision": _hex(dev.revision, 2),
        "driver": dev.driver,
        "driver_override": None if at_work else dev.driver_override,
        "iommu_group": dev.iommu_group,
        "numa_node": dev.numa_node,
        "kind": "bridge" if dev.is_bridge else "endpoint",
        "header_type": dev.header_type,
        "pcie_type": pci.EXP_TYPE_NAMES.get(dev.express_type) if dev.express_type is not None else None,  # type: ignore[arg-type]
        "multifunction": dev.is_multifunction,
        "parent": dev.parent.name if dev.parent else None,
        "reset_methods": dev.reset_methods,
        "boot_vga": dev.boot_vga,
        "capabilities": None if caps is None else [c.name for c in caps],
        "sriov": {
            "physfn": pf.name if pf else None,
            "virtfns": [vf.name for vf in dev.virtfns],
            "vf_groups": [vf.iommu_group for vf in dev.virtfns],
            "totalvfs": dev.sriov_totalvfs,
            "numvfs": None if at_work else dev.sriov_numvfs,
        },
        "at_work": at_work,
    }


def iommu_json(host: Host) -> dict[str, Any]:
    s = host.iommu
    doc = {"enabled": s.enabled, "units": list(s.units), "groups": s.groups, "cmdline": list(s.cmdline)}
    if host.xen_dom0:  # the IOMMU is Xen's there, and dom0's sysfs does not show it
        doc["xen"] = {"enabled": host.xen_iommu}
    return doc


def list_doc(host: Host, ids: PciIds, processes: int = 1, at_work: dict[str, str] | None = None) -> dict[str, Any]:
    """The listing; with `processes` > 1 the devices are read in that many forked
    processes (host.fanout: only for a program without threads, such as `pcipass`).
    `at_work`: BDF -> holder, the devices a claim, release or recover is working on."""
    at_work = at_work or {}

    def devices_json(devices: Sequence[PciDevice]) -> list[dict[str, Any]]:
        host.preload(devices)
        return [device_json(d, ids, at_work.get(d.name)) for d in devices]

    return {
        "schema": LIST_SCHEMA,
        "sysfs_root": host.root,
        "iommu": iommu_json(host),
        "devices": fan_out(devices_json, host.devices(), processes),
    }


def group_json(verdict: Verdict) -> dict[str, Any]:
    doc = verdict.to_json()
    return {
        "group": verdict.group,
        "ok": doc["ok"],
        "members": doc["members"],
        "reasons": doc["reasons"],
    }


def groups_doc(host: Host) -> dict[str, Any]:
    from pcipass.host.model.usage import HostUse
    from pcipass.host.verdict.judge import judge_group

    use = HostUse(host)
    return {
        "schema": GROUPS_SCHEMA,
        "sysfs_root": host.root,
        "iommu": iommu_json(host),
        "groups": [group_json(judge_group(host, g.number, use=use)) for g in host.groups()],
    }


def check_doc(host: Host, bdf: str) -> tuple[dict[str, Any], Verdict]:
    from pcipass.host.verdict.judge import judge

    verdict = judge(host, bdf)
    return (
        {"schema": CHECK_SCHEMA, "sysfs_root": host.root, "iommu": iommu_json(host), "verdict": verdict.to_json()},
        verdict,
    )


def describe(dev: PciDevice, ids: PciIds) -> str:
    """One line of names: "Red Hat, Inc. QEMU NVM Express Controller", with IDs where unknown."""
    v, d = dev.vendor or 0, dev.device or 0
    vendor = ids.vendor(v) or f"vendor {v:04x}"
    device = ids.device(v, d) or f"device {d:04x}"
    return f"{vendor} {device}"
