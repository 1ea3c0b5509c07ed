"""Fixtures: synthetic sysfs trees (pcipass.host.fixtures.synthetic) and the Host over them."""

from __future__ import annotations

import pytest

from pcipass.host.fixtures import synthetic
from pcipass.host.model.sysfs import Host


@pytest.fixture
def seed_tree(tmp_path):
    return synthetic.seed_layout(str(tmp_path / "seed"))


@pytest.fixture
def seed_host(seed_tree):
    return Host(seed_tree.root)
