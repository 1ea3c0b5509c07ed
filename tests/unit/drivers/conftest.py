"""One body, every Device: a driver's tests run over each implementation of pcipass.device.Device
(the kernel's VFIO through the fake kernel, with either IOMMU backend, and the vfio-user
client), each serving the same pcipass model through the vfio-user server's ModelBackend, as
the kernel's VFIO selftests run one test body in every IOMMU mode through a fixture.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

sys.path[:0] = [os.path.join(os.path.dirname(__file__), d) for d in ("../vfio", "../domain")]

from fakekernel import ModelKernel  # noqa: E402
from served import start, stop  # noqa: E402

from pcipass import models  # noqa: E402
from pcipass.device import Device  # noqa: E402
from pcipass.domain import connect  # noqa: E402
from pcipass.domain.backend import ModelBackend  # noqa: E402
from pcipass.vfio import open_device  # noqa: E402

WAYS = ["vfio-container", "vfio-iommufd", "vfio-user"]


class Served:
    """A model behind one Device implementation. `open()` gives a new Device on it (a CLI closes
    its own); `left()` is what the device still has of its user: DMA mappings and routed vectors."""

    def __init__(self, way: str, model: models.Model, root: str) -> None:
        self.way, self.model = way, model
        self.devices: list[Device] = []
        os.makedirs(root, exist_ok=True)
        if way == "vfio-user":
            self.running = start(pathlib.Path(root), model=model)
            self.backend = self.running.server.backend
        else:
            self.backend = ModelBackend(model)
            self.kernel = ModelKernel(os.path.join(root, "kernel"), self.backend, cdev=way == "vfio-iommufd")

    def open(self) -> Device:
        if self.way == "vfio-user":
            dev = connect(self.running.path)
        else:
            dev = open_device(self.kernel.bdf, kernel=self.kernel.kernel, iommu=self.way.removeprefix("vfio-"))
        self.devices.append(dev)
        return dev

    def left(self) -> tuple[list, list]:
        maps = [(m.address, m.size) for m in self.backend.dma.maps]
        vectors = [(index, i) for index, fds in self.backend.irqs.triggers.items()
                   for i, fd in enumerate(fds) if fd is not None]
        return maps, vectors

    def close(self) -> None:
        for dev in self.devices:
            dev.close()
        if self.way == "vfio-user":
            stop(self.running)
        else:
            self.kernel.stop()


@pytest.fixture(params=WAYS)
def serve(request, tmp_path):
    """serve(model) -> Served: the model behind this run's Device implementation."""
    made: list[Served] = []

    def make(model: models.Model) -> Served:
        served = Served(request.param, model, str(tmp_path / f"served{len(made)}"))
        made.append(served)
        return served

    yield make
    for served in made:
        served.close()
