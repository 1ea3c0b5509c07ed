"""Host verbs that only read (see pcipass.cli): list, groups, check, snapshot.

None of them needs root; without it config space is cut to 64 bytes, so ACS
bits and capabilities show as unknown and `check` says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import TYPE_CHECKING, Any

from pcipass.host.model.pciids import load as load_ids
from pcipass.host.model.sysfs import Host
from pcipass.host.present import inventory
from pcipass.host.speed import fanout
from pcipass.host.transaction.journal import Journal, devices_at_work, state_dir

if TYPE_CHECKING:
    from pcipass.host.verdict.judge import Verdict


def _common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--sysfs", metavar="ROOT", default="/",
                   help="read the tree under ROOT (a `pcipass snapshot` or synthetic tree) instead of this host")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the documented JSON (docs/host.md)")


def _print_json(doc: Any) -> None:
    # Indented for a terminal; one compact line for a pipe (json's C encoder only runs unindented).
    sys.stdout.write(json.dumps(doc, indent=2 if sys.stdout.isatty() else None) + "\n")


def _dash(value: object) -> str:
    return "-" if value is None or value == [] else str(value)


def cmd_list(args: argparse.Namespace) -> int:
    # A listing makes many small objects and no cycles worth collecting: the cyclic GC's
    # passes cost about a tenth of a 4096-device listing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _list(args)
    finally:
        if was_enabled:
            gc.enable()


def _list(args: argparse.Namespace) -> int:
    host = Host(args.sysfs)
    ids = load_ids(args.pci_ids)
    processes = args.jobs or fanout.processes_for(len(host.devices()))
    at_work = devices_at_work(Journal(state_dir(args.sysfs)))
    doc = inventory.list_doc(host, ids, processes, at_work)
    if args.json:
        _print_json(doc)
        return 0
    rows = [("BDF", "IDS", "GROUP", "DRIVER", "KIND", "RESET", "NAME")]
    for d in doc["devices"]:
        name = f"{d['vendor'] or d['vendor_id']} {d['device'] or d['device_id']}"
        cls = d["subclass_name"] or d["class_name"] or d["class"]
        extra = []
        if d["sriov"]["physfn"]:
            extra.append(f"VF of {d['sriov']['physfn']}")
        if d["sriov"]["virtfns"]:
            groups = ", ".join(_dash(g) for g in d["sriov"]["vf_groups"])
            extra.append(f"{len(d['sriov']['virtfns'])} VFs, groups {groups}")
        if d["numa_node"] is not None:
            extra.append(f"node {d['numa_node']}")
        if d["boot_vga"]:
            extra.append("boot VGA")
        if d["at_work"]:
            extra.append(f"at work: {d['at_work']}")
        rows.append((
            d["bdf"],
            f"{d['vendor_id']}:{d['device_id']}",
            _dash(d["iommu_group"]),
            _dash(d["driver"]),
            d["kind"],
            ",".join(d["reset_methods"]) or "-",
            f"{cls}: {name}" + (f" ({'; '.join(extra)})" if extra else ""),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    xen = doc["iommu"].get("xen")
    if xen is not None:
        print("\nXen dom0: Xen's IOMMU is " + {True: "on", False: "off", None: "unknown (run as root)"}[xen["enabled"]])
    elif not doc["iommu"]["enabled"]:
        print("\nthe IOMMU is off: no device can be passed through safely (`pcipass check BDF` says how to "
              "turn it on)")
    return 0


def _print_reasons(verdict: Verdict, indent: str = "  ") -> None:
    for r in verdict.reasons:
        print(f"{indent}{r.severity}: {r.message} [{r.code}]")
        print(f"{indent}  what to do: {r.hint}")


def _group_state(verdict: Verdict) -> str:
    """One word for a group: system (the chipset's own), blocked, or ok."""
    if any(r.code == "system-device" for r in verdict.reasons):
        return "system"
    return "ok" if verdict.ok else "blocked"


def cmd_groups(args: argparse.Namespace) -> int:
    host = Host(args.sysfs)
    doc = inventory.groups_doc(host)
    if args.json:
        _print_json(doc)
        return 0
    if not doc["groups"]:
        print("no IOMMU groups: the IOMMU is off or absent (`pcipass check BDF` says how to turn it on)")
        return 0
    from pcipass.host.model.usage import HostUse
    from pcipass.host.verdict.judge import judge_group, most_important

    ids = load_ids(args.pci_ids)
    use = HostUse(host)  # disks, interfaces and holders found once, not once a group
    verdicts = [judge_group(host, g.number, use=use) for g in host.groups()]
    if not args.verbose:
        # One line a group: its word, its members, and the reason that matters most.
        rows = []
        for v in verdicts:
            first = most_important(v.reasons)
            why = f"{first.severity}: {first.message} [{first.code}]" if first else "nothing in the way"
            if len(v.reasons) > 1:
                why += f" (and {len(v.reasons) - 1} more: -v)"
            rows.append((str(v.group), _group_state(v), " ".join(m.bdf for m in v.members), why))
        rows.insert(0, ("GROUP", "VERDICT", "DEVICES", "MOST IMPORTANT REASON"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
        return 0
    for v in verdicts:
        print(f"group {v.group}: {_group_state(v)}, {len(v.members)} device{'s' if len(v.members) != 1 else ''}")
        for m in v.members:
            dev = host.device(m.bdf)
            note = " (bound to a host driver)" if m.blocks else ""
            print(f"  {m.bdf}  {m.role:<8}  {_dash(m.driver):<10}  {inventory.describe(dev, ids)}{note}")
        _print_reasons(v, "    ")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from pcipass.host.verdict.judge import BLOCKING

    host = Host(args.sysfs)
    doc, verdict = inventory.check_doc(host, args.bdf)
    if args.json:
        _print_json(doc)
        return 0 if verdict.ok else 1
    if verdict.codes() == ["unknown-bdf"]:
        _print_reasons(verdict, "")
        return 1
    ids = load_ids(args.pci_ids)
    dev = host.device(verdict.bdf)
    print(f"{verdict.bdf}  {inventory.describe(dev, ids)}  (driver: {_dash(dev.driver)})")
    if verdict.group is not None:
        print(f"IOMMU group {verdict.group}:")
        for m in verdict.members:
            what = {"target": "this device", "bridge": "bridge, stays with the host"}.get(m.role, "endpoint")
            if m.blocks:
                what += f", bound to host driver {m.driver}: claim moves it too"
            print(f"  {m.bdf}  {_dash(m.driver):<10}  {what}")
    pf, vfs = verdict.sriov["physfn"], verdict.sriov["vfs"]
    if pf is not None:
        print(f"SR-IOV: a virtual function of {pf['bdf']} (driver {_dash(pf['driver'])}, IOMMU group "
              f"{_dash(pf['iommu_group'])}); judged as itself, with its own group")
    if vfs:
        print(f"SR-IOV: {len(vfs)} virtual functions:")
        for v in vfs:
            print(f"  {v['bdf']}  {_dash(v['driver']):<10}  IOMMU group {_dash(v['iommu_group'])}")
    first = f" (the kernel and vfio-pci's VFIO_DEVICE_RESET try {verdict.reset_methods[0]} first)" \
        if verdict.reset_methods else ""
    print(f"reset: {', '.join(verdict.reset_methods) or 'none'}{first}")
    if verdict.bus_reset_affects:
        print(f"  a bus reset would also reset: {', '.join(verdict.bus_reset_affects)}")
    n = len([r for r in verdict.reasons if r.severity == BLOCKING])
    system = next((r for r in verdict.reasons if r.code == "system-device"), None)
    if system is not None:
        print(f"verdict: {system.details['kind']}, part of the host's chipset: not worth passing through")
    elif verdict.ok:
        together = [m.bdf for m in verdict.members if m.role == "endpoint"]
        extra = f" together with {', '.join(together)}" if together else ""
        print(f"verdict: can be passed through{extra}")
    else:
        print(f"verdict: cannot be passed through ({n} blocking reason{'s' if n != 1 else ''})")
    _print_reasons(verdict)
    return 0 if verdict.ok else 1


def cmd_snapshot(args: argparse.Namespace) -> int:
    from pcipass.host.fixtures.snapshot import (
        snapshot,  # here: its imports cost every other verb's start-up
    )

    host = Host(args.sysfs)
    manifest = snapshot(host, args.out)
    if args.json:
        _print_json(manifest)
        return 0
    print(f"snapshot of {manifest['devices']} PCI devices ({manifest['files']} files) in {args.out}")
    if not manifest["root"]:
        print("note: taken without root, so config space is cut to 64 bytes (no ACS bits); run it as root "
              "for a complete snapshot", file=sys.stderr)
    print(f"read it back with: pcipass list --sysfs {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add these verbs to the `pcipass` parser."""
    p = sub.add_parser("list", help="every PCI device: IDs, names, class, driver, IOMMU group, reset, SR-IOV")
    _common(p)
    p.add_argument("--pci-ids", metavar="FILE", default=None, help="the pci.ids database (default: the system's)")
    p.add_argument("--jobs", metavar="N", type=int, default=None,
                   help=f"read the devices in N processes (default: one per CPU, each with at least "
                   f"{fanout.MIN_PER_PROCESS} devices)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("groups", help="each IOMMU group, its members and its verdict, one line each")
    _common(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="every member's name and driver, and every reason with what to do")
    p.add_argument("--pci-ids", metavar="FILE", default=None, help="the pci.ids database (default: the system's)")
    p.set_defaults(func=cmd_groups)

    p = sub.add_parser("check", help="can this device be passed through? every reason, and what to do")
    p.add_argument("bdf", metavar="BDF", help="the device, e.g. 0000:02:0d.0 or 02:0d.0")
    _common(p)
    p.add_argument("--pci-ids", metavar="FILE", default=None, help="the pci.ids database (default: the system's)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("snapshot", help="capture this host's PCI sysfs into a tree --sysfs accepts")
    p.add_argument("out", metavar="OUT", help="a new directory to write the tree into")
    _common(p)
    p.set_defaults(func=cmd_snapshot)
