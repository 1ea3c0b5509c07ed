"""Fixtures: synthetic sysfs trees (pcipass.host.fixtures.synthetic) and the Host over them."""

from __future__ import annotations

import pytest

from pcipass.host.fixtures import synthetic
from pcipass.host.model.sysfs import Host
from pcipass.host.transaction.crash import CRASH_ENV


@pytest.fixture(autouse=True)
def _no_state_env(monkeypatch):
    """Every test finds its journal under its own tree's root and crashes nowhere, whatever the
    developer's shell exports."""
    monkeypatch.delenv("PCIPASS_STATE_DIR", raising=False)
    monkeypatch.delenv(CRASH_ENV, raising=False)


@pytest.fixture
def seed_tree(tmp_path):
    return synthetic.seed_layout(str(tmp_path / "seed"))


@pytest.fixture
def seed_host(seed_tree):
    return Host(seed_tree.root)
