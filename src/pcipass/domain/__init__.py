"""Driver domains: a vfio-user backend (pcipass serve) and frontend (connect)."""

from __future__ import annotations

from typing import Any


def connect(path: Any, timeout: float = 30.0, **options: Any) -> Any:
    """Connect to a vfio-user backend; returns a pcipass.device.Device (see domain.client)."""
    from pcipass.domain.client import connect as _connect

    return _connect(path, timeout, **options)


__all__ = ["connect"]
