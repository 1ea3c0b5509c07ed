"""Command-line verbs of this part (see pcipass.cli)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this part's verbs to the `pcipass` parser."""
