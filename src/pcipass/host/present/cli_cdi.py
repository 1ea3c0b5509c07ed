"""`pcipass cdi show | sync | remove`: the Container Device Interface specs of claimed groups
(pcipass.host.present.cdi). Claim and release keep them in step on their own; these verbs show
them, put them right after a crash or a reboot, and take them all away."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pcipass.host.present import cdi
from pcipass.host.transaction import claim as claim_mod
from pcipass.host.transaction.plan import require_root


def _dir(args: argparse.Namespace) -> Path | None:
    return cdi.spec_dir(args.sysfs, args.dir)


def cmd_cdi(args: argparse.Namespace) -> int:
    ctx = claim_mod.Context(root=args.sysfs)
    directory = _dir(args)
    if args.cdi_verb == "show":
        data = cdi.show(ctx, directory)
        if args.json:
            json.dump(data, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
            return 0
        specs = data["specs"]
        assert isinstance(specs, list)
        if not specs:
            print("no group is claimed for vfio: no CDI spec")
        for s in specs:
            state = "written" if s["written"] else "not written yet (`pcipass cdi sync` writes it)"
            print(f"group {s['group']}: --device {s['device']}  {s['file'] or '(specs off)'}: {state}")
            edits = s["spec"]["devices"][0]["containerEdits"]
            for n in edits["deviceNodes"]:
                print(f"  {n['path']}")
            for e in edits["env"]:
                print(f"  {e}")
        for p in data["stale"]:  # type: ignore[union-attr]
            print(f"stale: {p} names a group that is not claimed (`pcipass cdi sync` removes it)")
        return 0
    require_root(f"pcipass cdi {args.cdi_verb}", args.sysfs)
    if args.cdi_verb == "sync":
        changes = cdi.sync(ctx, directory)
        if args.json:
            json.dump({"schema": "pcipass/cdi-sync/1",
                       "changes": [c.__dict__ for c in changes]}, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
            return 0
        done = [c for c in changes if c.action != "unchanged"]
        for c in done:
            print(f"group {c.key}: {c.action} {c.path}")
        if not done:
            print("the CDI specs are in step with the claims")
        return 0
    gone = cdi.remove_all(args.sysfs, directory)
    if args.json:
        json.dump({"schema": "pcipass/cdi-remove/1", "removed": [str(p) for p in gone]},
                  sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print("\n".join(f"removed {p}" for p in gone) or "no pcipass CDI spec to remove")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `cdi` verb to the `pcipass` parser."""
    p = sub.add_parser(
        "cdi", help="Container Device Interface specs of claimed groups: show, sync or remove",
        description="Each claimed vfio group has a CDI spec, written by claim and removed by release "
        f"before a device is given back: `podman run --device {cdi.KIND}=group-N`. show prints them; "
        "sync writes what is missing and removes stale ones (recover runs it too); remove takes them all away.")
    p.add_argument("cdi_verb", choices=("show", "sync", "remove"))
    p.add_argument("--dir", metavar="DIR",
                   help=f"the spec directory (default ${cdi.DIR_ENV}, else /var/run/cdi under the --sysfs root); "
                   "stale pcipass specs are also looked for in /etc/cdi and /var/run/cdi")
    p.add_argument("--sysfs", metavar="ROOT", default="/",
                   help="a tree under ROOT instead of this host (a synthetic or captured tree)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cdi)
