"""Fixtures: a vfio-user server serving a model (see served.py)."""

from __future__ import annotations

import pytest
from served import start, stop


@pytest.fixture
def edu_server(tmp_path):
    running = start(tmp_path, "edu")
    yield running
    stop(running)


@pytest.fixture
def scratch_server(tmp_path):
    running = start(tmp_path, "scratch")
    yield running
    stop(running)
