"""The `pcipass` command line: one subcommand per verb, registered by the part that owns it."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pcipass import __version__
from pcipass.errors import PcipassError

# Each module here owns the verbs listed with it: its `register(subparsers)` adds them,
# each with `set_defaults(func=...)` taking the parsed args and returning an exit status.
# A command imports only the module of its own verb (importing every part costs more
# than a small `list` does); `--help` and unknown verbs import them all.
VERBS = {
    "pcipass.host.present.cli_inventory": ("list", "groups", "check", "snapshot"),
    "pcipass.host.present.cli_changes": ("claim", "release", "recover", "status", "sriov", "boot",
                                          "config"),
    "pcipass.host.present.cli_cdi": ("cdi",),
    "pcipass.drivers.cli": ("drive",),
    "pcipass.domain.cli": ("serve",),
    "pcipass.lab.cli": ("lab",),
    "pcipass.k8s.cli": ("k8s",),
}


def _owner(argv: Sequence[str]) -> str | None:
    """The module owning the verb in `argv` (its first word that is not an option), if any."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    return next((module for module, verbs in VERBS.items() if verb in verbs), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`'s verb, or for every verb when `argv` is None or names none."""
    parser = argparse.ArgumentParser(
        prog="pcipass",
        description="PCI pass-through: see devices and IOMMU groups, judge them, "
        "claim them for VFIO or Xen, drive them, serve them to driver domains.",
    )
    parser.add_argument("--version", action="version", version=f"pcipass {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    owner = _owner(argv) if argv is not None else None
    for module in [owner] if owner else VERBS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
    except BrokenPipeError:
        # The reader went away (`pcipass groups | head`): stop quietly, as other tools do;
        # stdout goes to /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
