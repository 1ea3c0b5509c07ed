"""A vfio-user server on a real UNIX socket, in a thread, serving a model.

A module of its own (not conftest) so that tests import it by a name no other
directory shares.
"""

from __future__ import annotations

import threading

from pcipass import models
from pcipass.domain.backend import ModelBackend
from pcipass.domain.server import Server


class Running:
    def __init__(self, server: Server, thread: threading.Thread, model: models.Model, traces: list[str]) -> None:
        self.server, self.thread, self.model, self.traces = server, thread, model, traces
        self.path = server.path
        self.errors: list[BaseException] = []


def start(tmp_path, name: str = "edu", *, model: models.Model | None = None, **kwargs) -> Running:
    """Serve the model called `name`, or the `model` given (its name then names the socket)."""
    if model is None:
        model = models.create(name)
    name = model.name
    traces: list[str] = []
    server = Server(ModelBackend(model), tmp_path / f"{name}.sock", trace=traces.append, **kwargs)
    running = Running(server, None, model, traces)  # type: ignore[arg-type]

    def loop() -> None:
        try:
            while not server.stopping:
                server.serve_one(accept_timeout=0.05)
        except BaseException as exc:  # a crash of the server fails the test
            running.errors.append(exc)

    running.thread = threading.Thread(target=loop, daemon=True)
    running.thread.start()
    return running


def stop(running: Running) -> None:
    running.server.stopping = True
    running.thread.join(10)
    running.server.close()
    assert not running.thread.is_alive(), "the server did not stop"
    assert not running.errors, f"the server crashed: {running.errors!r}"
