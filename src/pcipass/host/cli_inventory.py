"""Host verbs (see pcipass.host.cli)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add these verbs to the `pcipass` parser."""
