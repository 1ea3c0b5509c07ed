"""Host verbs that change the host (see pcipass.cli): claim, release, recover, status,
boot and config. Each returns an exit status; errors are PcipassErrors."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from pcipass.host.transaction import claim as claim_mod
from pcipass.host.transaction.plan import TARGET_DRIVER, VFIO
from pcipass.sysfs import link_name


def _common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--sysfs", metavar="ROOT", default="/",
                   help="read and change a tree under ROOT instead of this host "
                   "(a synthetic or captured tree: the kernel's reactions are simulated)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _ctx(args: argparse.Namespace) -> claim_mod.Context:
    return claim_mod.Context(root=args.sysfs)


def _print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def cmd_claim(args: argparse.Namespace) -> int:
    plan = claim_mod.claim(_ctx(args), args.bdf, args.target, dry_run=args.dry_run,
                           unsafe_noiommu=args.unsafe_noiommu, permissive=args.permissive,
                           quirks=tuple(args.quirk), owner=args.owner, memlock=args.memlock,
                           reset_method=args.reset_method)
    r = plan.record
    if args.json:
        _print_json({"schema": "pcipass/claim/1", "dry_run": args.dry_run, "group": r.key,
                     "for": r.target, "notes": plan.notes, "advice": plan.advice, "owner": r.owner,
                     "devices": [d.__dict__ for d in r.devices],
                     "steps": [s.describe() for s in r.steps]})
    elif args.dry_run:
        print("\n".join(plan.lines()))
        print("(dry run: nothing was changed)")
    else:
        for n in plan.notes:
            print(f"warning: {n}", file=sys.stderr)
        taken = [d.bdf for d in r.devices if not d.is_bridge]
        print(f"claimed IOMMU group {r.key} for {r.target}: {', '.join(taken)} on "
              f"{TARGET_DRIVER[r.target]}")
        if r.target == VFIO and r.group is not None:
            given = f" (given to {r.owner})" if r.owner else ""
            print(f"  /dev/vfio/{r.group}{given}")
            for n in r.nodes[1:]:
                print(f"  {n.path}{given}")
        elif r.target == VFIO and r.noiommu_original is not None:
            # vfio-pci made the device a no-IOMMU group of its own as it took it
            group = link_name(os.path.join(args.sysfs, "sys/bus/pci/devices", taken[0], "iommu_group"))
            if group is not None:
                print(f"  /dev/vfio/noiommu-{group}")
        for n in plan.advice:
            print(f"note: {n}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    if bool(args.bdf) == bool(args.all):
        from pcipass.errors import UsageError

        raise UsageError("name one device or --all", hint="pcipass release 0000:02:0d.0, "
                         "or pcipass release --all")
    released = claim_mod.release(_ctx(args), args.bdf)
    if args.json:
        _print_json({"schema": "pcipass/release/1", "released": [r.key for r in released]})
    elif not released:
        print("nothing is claimed")
    for r in [] if args.json else released:
        back = ", ".join(f"{d.bdf} -> {d.original_driver or 'no driver'}"
                         for d in r.devices if not d.is_bridge)
        print(f"released IOMMU group {r.key}: {back}")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    done = claim_mod.recover(_ctx(args))
    if args.json:
        _print_json({"schema": "pcipass/recover/1",
                     "recovered": [{"group": r.key, "action": r.action} for r in done]})
    elif not done:
        print("nothing to recover")
    for r in [] if args.json else done:
        print(f"IOMMU group {r.key}: {r.action}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    data = claim_mod.status(_ctx(args))
    if args.json:
        _print_json(data)
        return 0
    groups = data["groups"]
    assert isinstance(groups, list)
    for ch in data["sriov"]:  # type: ignore[attr-defined]
        print(f"sriov {ch['pf']}: {ch['state']} ({ch['numvfs_before']} -> {ch['numvfs_wanted']} VFs, "
              f"{ch['numvfs']} now) since {ch['since']} (pid {ch['by']['pid']}: {ch['by']['command']})"
              + ("; `pcipass recover` rolls it back" if ch["state"].startswith("interrupted") else ""))
    if not groups:
        print("nothing is claimed")
    for g in groups:
        print(f"group {g['group']}: {g['state']} for {g['for']} since {g['since']} "
              f"(pid {g['by']['pid']}: {g['by']['command']})")
        if g["locked_by"]:
            print(f"  at work now: {g['locked_by']}")
        if g["owner"]:
            print(f"  nodes given to {g['owner']}: {', '.join(n['path'] for n in g['nodes'])}")
        for d in g["devices"]:
            if d["bridge"]:
                print(f"  {d['bdf']}  bridge, left alone")
            else:
                print(f"  {d['bdf']}  now {d['driver'] or 'no driver'}, "
                      f"gives back to {d['original_driver'] or 'no driver'}")
        for lv in g["libvirt"]:
            print(f"  held by libvirt domain {lv['domain']} (pid {lv['pid']}): {lv['bdf']}, "
                  f"managed='{'yes' if lv['managed'] else 'no'}'")
        for h in g["holders"]:
            dom = f", libvirt domain {h['libvirt_domain']}" if h["libvirt_domain"] else ""
            print(f"  held by pid {h['pid']} ({h['command']}{dom}): {', '.join(h['uses'])}")
        if not g["holders"] and not g["libvirt"]:
            print("  held by: nobody" if data["holders_complete"] else
                  "  held by: none seen (not root: other users' processes could not be read)")
    others = [lv for lv in data["libvirt"] if not lv["claimed_by_pcipass"]]  # type: ignore[union-attr]
    for lv in others:
        print(f"libvirt: {lv['bdf']} is a hostdev of running domain {lv['domain']} (pid {lv['pid']}, "
              f"managed='{'yes' if lv['managed'] else 'no'}'), not claimed by pcipass")
    return 0


def cmd_sriov(args: argparse.Namespace) -> int:
    from pcipass.host.model.sysfs import Host

    plan = claim_mod.sriov(_ctx(args), args.bdf, args.vfs, autoprobe=args.autoprobe, dry_run=args.dry_run)
    host = Host(args.sysfs)
    pf = host.device(plan.pf)
    vfs = [] if args.dry_run else [{"bdf": v.name, "driver": v.driver, "iommu_group": v.iommu_group}
                                   for v in pf.virtfns]
    if args.json:
        _print_json({"schema": "pcipass/sriov/1", "dry_run": args.dry_run, "pf": plan.pf,
                     "numvfs_before": plan.numvfs, "numvfs": plan.want if args.dry_run else pf.sriov_numvfs,
                     "totalvfs": plan.totalvfs, "autoprobe": None if args.dry_run else pf.attr("sriov_drivers_autoprobe"),
                     "steps": [s.describe() for s in plan.record.steps], "vfs": vfs})
        return 0
    if args.dry_run:
        print("\n".join(plan.lines()))
        print("(dry run: nothing was changed)")
        return 0
    what = "no change" if not plan.record.steps else f"was {plan.numvfs}"
    print(f"{plan.pf}: {pf.sriov_numvfs} VFs ({what}; at most {plan.totalvfs})")
    for v in vfs:
        print(f"  {v['bdf']}  {v['driver'] or 'no driver'}  IOMMU group {v['iommu_group']}")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from pcipass.host.transaction import boot

    if args.boot_verb == "check":
        data = boot.check(args.root, args.sysfs)
        if args.json:
            _print_json(data)
        else:
            args_next: Any = data["next_boot_args"]
            devices: Any = data["devices"]
            findings: Any = data["findings"]
            print(f"mode {data['mode']}; the next boot gets: {' '.join(args_next) or '(nothing)'}")
            for d in devices:
                print(f"  {d['bdf']}  {d['ids']}  now {d['now'] or 'no driver'}, next boot {d['next_boot']}"
                      + ("" if d["in_policy"] else "  (not in the policy)"))
            for f in findings:
                print(f"{f['severity']}: {f['message']} [{f['code']}]")
            if data["ok"]:
                print("ok: the next boot does what the policy says")
        return 0 if data["ok"] else 1
    if args.boot_verb == "apply":
        out, changed = boot.apply(args.root, args.sysfs)
    else:
        out = boot.plan_boot(args.root, args.sysfs)
        changed = sorted(boot.pending_changes(args.root, out))
    if args.json:
        _print_json({"schema": "pcipass/boot/1", "mode": out.mode, "kernel_args": out.args,
                     "files": {"/" + k: v for k, v in out.files.items()}, "notes": out.notes,
                     "changed" if args.boot_verb == "apply" else "would_change": ["/" + c for c in changed]})
        return 0
    policy = boot.load_policy(args.root)
    if args.boot_verb == "show":
        print(f"policy {os.path.join(args.root, boot.POLICY)}: mode {out.mode}, "
              f"{len(policy.devices)} device(s) hidden at boot")
        for h in policy.devices:
            print(f"  {h.bdf}")
        print(f"kernel arguments (GRUB_CMDLINE_LINUX): {' '.join(out.args) or '(none)'}")
        for rel, content in out.files.items():
            if content:
                print(f"/{rel}:")
                print("".join(f"  {ln}\n" for ln in content.splitlines() if not ln.startswith("#")), end="")
    for n in out.notes:
        print(f"note: {n}")
    verb = "changed" if args.boot_verb == "apply" else "apply would change"
    print(f"{verb}: {', '.join('/' + c for c in changed)}" if changed else "up to date: nothing to change")
    if args.boot_verb == "apply" and changed:
        print(f"now run: {boot.REGENERATE}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pcipass.host.model.sysfs import Host
    from pcipass.host.present import config

    host = Host(args.sysfs)
    for b in args.bdfs:
        host.device(b)  # an unknown device is an error here, not in the guest
    if args.consumer == "xl":
        text = config.xl(args.bdfs, host=host, vslot=args.vslot, permissive=args.permissive,
                         msitranslate=args.msitranslate, seize=args.seize, power_mgmt=args.power_mgmt,
                         rdm_policy=args.rdm_policy)
    elif args.consumer == "qemu":
        needs = config.vf_token_needed(host, args.bdfs)
        token = config.vf_token_arg(args.vf_token) if args.vf_token else None
        argv = config.qemu(args.bdfs, bus=args.bus, first_slot=args.slot,
                           vf_tokens=dict.fromkeys(needs, token) if token else None)
        warnings = config.vfio_warnings(host, args.bdfs)
        if needs and not token:
            warnings.append(f"{', '.join(needs)}: vfio-pci opens {'it' if len(needs) == 1 else 'them'} only with "
                            "the VF token the PF's user set (its PF is on vfio-pci): add --vf-token UUID, "
                            "which gives QEMU vf-token=UUID")
        elif token and not needs:
            warnings.append("--vf-token: no named device needs one (no VF whose PF is on vfio-pci); left out")
        for warning in warnings:  # stdout stays usable as printed
            print(f"warning: {warning}", file=sys.stderr)
        if args.json:
            _print_json({"schema": "pcipass/config/1", "consumer": "qemu", "args": argv})
            return 0
        # One line, so that `qemu-system-x86_64 ... $(pcipass config qemu BDF...)` works too.
        text = shlex.join(argv)
    else:
        text = config.libvirt(args.bdfs, managed=args.managed == "yes", driver=args.driver,
                              first_slot=args.slot)
        boot = {"kernel": args.kernel, "initrd": args.initrd, "cmdline": args.cmdline,
                "console_log": args.console_log}
        if args.domain:
            kind = args.domain_type or ("xen" if args.driver == "xen" else "kvm")
            text = config.libvirt_domain(text, args.domain, kind, memory_mib=512 if args.memory is None else args.memory,
                                         **{k: os.path.abspath(v) if v and k != "cmdline" else v
                                            for k, v in boot.items()})
        elif args.domain_type or args.memory is not None or any(v is not None for v in boot.values()):
            from pcipass.errors import UsageError
            raise UsageError("--domain-type, --memory, --kernel, --initrd, --cmdline and --console-log "
                             "shape the whole domain", hint="add --domain NAME")
    if args.json:
        _print_json({"schema": "pcipass/config/1", "consumer": args.consumer, "text": text})
    else:
        print(text.rstrip("\n"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add these verbs to the `pcipass` parser."""
    p = sub.add_parser("claim", help="take a device's whole IOMMU group for pass-through")
    p.add_argument("bdf", metavar="BDF")
    p.add_argument("--for", dest="target", choices=("vfio", "xen"),
                   help="vfio-pci or xen-pciback (default: xen on a Xen dom0, else vfio)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--unsafe-noiommu", action="store_true",
                   help="without an IOMMU, use vfio's no-IOMMU mode (the device can DMA anywhere)")
    p.add_argument("--permissive", action="store_true",
                   help="xen: let the guest write config space pciback does not know (pciback/permissive)")
    p.add_argument("--quirk", action="append", default=[], metavar="REG:SIZE:MASK",
                   help="xen: let the guest at one more config register (pciback/quirks); repeatable")
    p.add_argument("--owner", metavar="USER[:GROUP]",
                   help="vfio: give /dev/vfio/N (and the device cdevs) to this user, and mode 0660 to GROUP, "
                   "so an unprivileged QEMU or driver can open them; release gives them back")
    p.add_argument("--memlock", metavar="SIZE",
                   help="with --owner: the guest memory that user will map for DMA (e.g. 2G), checked "
                   "against its locked-memory limit")
    p.add_argument("--reset-method", metavar="M[,M]",
                   help="write the device's reset_method (the resets the kernel and vfio-pci try, in this "
                   "order, e.g. device_specific for vendor-reset, or flr,bus); release puts the original back")
    _common(p)
    p.set_defaults(func=cmd_claim)

    p = sub.add_parser("release", help="give a claimed group back to its drivers")
    p.add_argument("bdf", metavar="BDF", nargs="?")
    p.add_argument("--all", action="store_true", help="every claimed group")
    _common(p)
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("recover", help="roll back an interrupted claim or sriov change, complete an interrupted release")
    _common(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("status", help="what is claimed, for what, since when")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sriov", help="create or remove a physical function's SR-IOV virtual functions")
    p.add_argument("bdf", metavar="BDF", help="the physical function")
    p.add_argument("--vfs", type=int, required=True, metavar="N",
                   help="how many VFs it should have (sriov_numvfs, at most sriov_totalvfs); 0 removes them")
    p.add_argument("--autoprobe", choices=("on", "off"),
                   help="set sriov_drivers_autoprobe first: on, the VFs' driver takes them; off, they stay on "
                   "no driver, ready to claim (default: leave it as it is)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    _common(p)
    p.set_defaults(func=cmd_sriov)

    p = sub.add_parser("boot", help="hide devices at boot: show, apply or check /etc/pcipass/boot.conf")
    p.add_argument("boot_verb", choices=("show", "apply", "check"))
    p.add_argument("--root", metavar="DIR", default="/",
                   help="the root whose /etc and /boot are read and written (tests, image builders)")
    _common(p)
    p.set_defaults(func=cmd_boot)

    hexint = lambda text: int(text, 16)  # noqa: E731 - argparse names a bad value's type by its __name__
    p = sub.add_parser("config", help="the consumer's config for devices: xl, qemu or libvirt")
    p.add_argument("consumer", choices=("xl", "qemu", "libvirt"))
    p.add_argument("bdfs", metavar="BDF", nargs="+")
    g = p.add_argument_group("xl (xl-pci-configuration(5); each flag writes KEY=1, --no-FLAG KEY=0)")
    for flag in ("permissive", "msitranslate", "seize", "power-mgmt"):
        g.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--rdm-policy", choices=("strict", "relaxed"))
    g.add_argument("--vslot", type=hexint, metavar="HEX", help="first virtual slot (hex)")
    g = p.add_argument_group("qemu and libvirt")
    g.add_argument("--slot", type=hexint, default=0x10, metavar="HEX",
                   help="first guest slot (hex, default 10); each host slot gets the next")
    g.add_argument("--bus", default="pcie.0", help="qemu: the guest bus id (default pcie.0)")
    g.add_argument("--vf-token", metavar="UUID",
                   help="qemu: the VF token the PF's user set: vf-token=UUID for each VF whose PF is on "
                   "vfio-pci (and such a PF with VFs)")
    g.add_argument("--managed", choices=("yes", "no"), default="yes",
                   help="libvirt: yes lets libvirt detach the device itself; no when pcipass claimed it")
    g.add_argument("--driver", choices=("vfio", "xen"), default="vfio", help="libvirt: the backend")
    g.add_argument("--domain", metavar="NAME",
                   help="libvirt: the whole <domain> for virsh define, the hostdevs in it")
    g.add_argument("--domain-type", choices=("kvm", "qemu", "xen"),
                   help="libvirt --domain: kvm (default), qemu (TCG, where there is no KVM) or xen")
    g.add_argument("--memory", type=int, metavar="MIB", help="libvirt --domain: guest memory (default 512)")
    g.add_argument("--kernel", metavar="PATH", help="libvirt --domain: boot this kernel directly")
    g.add_argument("--initrd", metavar="PATH", help="libvirt --domain --kernel: its initramfs")
    g.add_argument("--cmdline", metavar="TEXT", help="libvirt --domain --kernel: its command line")
    g.add_argument("--console-log", metavar="PATH",
                   help="libvirt --domain: the serial console to this file (default: a pty, virsh console)")
    _common(p)
    p.set_defaults(func=cmd_config)
