"""Command-line verbs of this part (see pcipass.cli): `pcipass serve`."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from pcipass.errors import NeedsRoot, UsageError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this part's verbs to the `pcipass` parser."""
    p = sub.add_parser(
        "serve", help="serve a claimed device (or an emulated one) to an unprivileged frontend over vfio-user",
        description="A vfio-user backend on a UNIX socket, one client at a time. Configuration space goes "
        "through a pciback-style policy; DMA reaches only what the client maps; interrupts land on the "
        "client's eventfds. When a client goes, its memory and interrupts are released and the device is "
        "reset before the next one.")
    p.add_argument("bdf", nargs="?", help="a device claimed for VFIO (pcipass claim BDF)")
    p.add_argument("--model", help="serve an emulated device instead (edu, nvme, scratch)")
    p.add_argument("--socket", required=True, metavar="PATH", help="where to listen")
    p.add_argument("--permissive", action="store_true",
                   help="pass writes to configuration bytes no field lists (as pciback's permissive mode)")
    p.add_argument("--quirks", metavar="FILE",
                   help="extra pass-through fields per device: lines 'VENDOR:DEVICE OFFSET SIZE [MASK]'")
    p.add_argument("--trace", action="store_true", help="print every policy decision and protocol event")
    p.add_argument("--owner", metavar="USER", help="give the socket to this user (the frontend's)")
    p.add_argument("--mode", default="0600", help="the socket's mode, octal (default 0600)")
    p.add_argument("--once", action="store_true", help="serve one client, then exit")
    p.add_argument("--no-map-bars", action="store_true",
                   help="never offer BARs for mmap: every access goes by message")
    p.add_argument("--send-timeout", type=float, default=5.0, metavar="S",
                   help="drop a client that does not read a reply for this long (default 5)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    from pcipass.domain.backend import Backend
    from pcipass.domain.policy import load_quirks
    from pcipass.domain.server import Server

    if bool(args.bdf) == bool(args.model):
        raise UsageError("serve needs exactly one of BDF or --model NAME",
                         hint="pcipass serve 0000:00:0a.0 --socket PATH, or pcipass serve --model edu --socket PATH")
    try:
        mode = int(args.mode, 8)
    except ValueError:
        raise UsageError(f"--mode {args.mode!r} is not an octal mode", hint="e.g. --mode 0660") from None
    if mode & ~0o777:
        raise UsageError(f"--mode {args.mode} has bits beyond 0777", hint="e.g. --mode 0660")
    if args.owner and os.geteuid() != 0:
        raise NeedsRoot("serve --owner")
    quirks = load_quirks(args.quirks) if args.quirks else []
    backend: Backend
    if args.model:
        from pcipass import models
        from pcipass.domain.backend import ModelBackend

        backend = ModelBackend(models.create(args.model))
    else:
        from pcipass.domain.vfio_backend import VfioBackend

        backend = VfioBackend(args.bdf, map_bars=not args.no_map_bars)

    def trace(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        server = Server(backend, args.socket, permissive=args.permissive, quirks=quirks,
                        trace=trace if args.trace else None, owner=args.owner, mode=mode,
                        send_timeout=args.send_timeout)
    except BaseException:
        backend.close()
        raise
    signal.signal(signal.SIGTERM, _stop)
    how = f" (VFIO backend {backend.dev.container.kind})" if args.bdf else ""  # type: ignore[attr-defined]
    print(f"pcipass: serving {backend.name}{how} on {args.socket}", file=sys.stderr, flush=True)
    try:
        if args.once:
            server.serve_one()
        else:
            server.serve_forever()
    except SystemExit:
        pass
    finally:
        server.close()
    return 0


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)
