"""The `pcipass` command line: one subcommand per verb, registered by the part that owns it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pcipass import __version__
from pcipass.errors import PcipassError

# Each part owns its verbs: `register(subparsers)` adds them, each with
# `set_defaults(func=...)` taking the parsed args and returning an exit status.
PARTS = ("pcipass.host.cli", "pcipass.drivers.cli", "pcipass.domain.cli", "pcipass.lab.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="pcipass",
        description="PCI pass-through: see devices and IOMMU groups, judge them, "
        "claim them for VFIO or Xen, drive them, serve them to driver domains.",
    )
    parser.add_argument("--version", action="version", version=f"pcipass {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for part in PARTS:
        importlib.import_module(part).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except PcipassError as exc:
        print(f"pcipass: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pcipass: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
