"""Command-line verbs of this part (see pcipass.cli): `pcipass drive NAME BDF [driver flags]`.

`drive` only dispatches: each driver module exposes `main(argv) -> int` and
parses its own flags, so adding a driver is one line in DRIVERS.
"""

from __future__ import annotations

import argparse
import importlib

# driver name -> module with main(argv) -> exit status
DRIVERS = {
    "edu": "pcipass.drivers.edu",
    "nvme": "pcipass.drivers.nvme_cli",
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this part's verbs to the `pcipass` parser."""
    p = sub.add_parser("drive", help="run a reference driver on a device bound to vfio-pci",
                       description="Run a reference driver (pcipass.drivers) on a device bound to vfio-pci. "
                       "`pcipass drive NAME --help` shows the driver's own flags.")
    p.add_argument("driver", choices=sorted(DRIVERS), help="which driver")
    p.add_argument("args", nargs=argparse.REMAINDER, help="BDF and the driver's flags")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(DRIVERS[args.driver])
    return int(module.main(list(args.args)) or 0)
