"""Command-line verbs of the host part (see pcipass.cli).

Inventory and verdicts (list, groups, check, snapshot) live in cli_inventory;
verbs that change the host (claim, release, recover, status, boot, config) in
cli_changes.
"""

from __future__ import annotations

import argparse

from pcipass.host import cli_changes, cli_inventory


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cli_inventory.register(sub)
    cli_changes.register(sub)
