"""`pcipass drive nvme BDF`: identify a controller, read blocks as a hexdump, write a file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from pcipass.drivers.nvme import NvmeController
from pcipass.errors import PcipassError, UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bdf", metavar="BDF", help="the controller, bound to vfio-pci")
    parser.add_argument("--nsid", type=int, default=1, help="namespace to use (default: 1)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--read", type=int, metavar="LBA", help="read blocks and hexdump them")
    action.add_argument("--write", type=int, metavar="LBA", help="write --data FILE from this LBA")
    parser.add_argument("--count", type=int, default=1, help="blocks to --read (default: 1)")
    parser.add_argument("--data", metavar="FILE", help="what to --write (whole blocks)")
    parser.add_argument("--no-irq", action="store_true", help="poll for completions, no MSI-X")
    parser.add_argument("--json", action="store_true", help="print Identify as JSON")


def _check(args: argparse.Namespace) -> bytes | None:
    """Validate the flags before touching the device; return the data to write."""
    if args.write is None and args.data is not None:
        raise UsageError(
            "--data goes with --write", hint="pcipass drive nvme BDF --write LBA --data FILE"
        )
    if args.read is None and args.count != 1:
        raise UsageError(
            "--count goes with --read", hint="pcipass drive nvme BDF --read LBA --count N"
        )
    for flag, value in (("--read", args.read), ("--write", args.write), ("--count", args.count)):
        if value is not None and value < (1 if flag == "--count" else 0):
            raise UsageError(
                f"{flag} {value} is out of range", hint=f"{flag} takes a number >= 0, --count >= 1"
            )
    if args.write is None:
        return None
    if args.data is None:
        raise UsageError(
            "--write needs --data FILE", hint="pcipass drive nvme BDF --write LBA --data FILE"
        )
    try:
        with open(args.data, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(
            f"cannot read --data {args.data}: {exc.strerror}", hint="give a readable file"
        ) from exc


def hexdump(data: bytes, base: int = 0) -> Iterator[str]:
    """Lines in the manner of `hexdump -C`, runs of identical lines folded into '*'."""
    previous = None
    folded = False
    for offset in range(0, len(data), 16):
        line = data[offset : offset + 16]
        if line == previous:
            if not folded:
                yield "*"
                folded = True
            continue
        previous, folded = line, False
        hexes = (
            " ".join(f"{b:02x}" for b in line[:8]) + "  " + " ".join(f"{b:02x}" for b in line[8:])
        )
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in line)
        yield f"{base + offset:08x}  {hexes:<48}  |{text}|"
    yield f"{base + len(data):08x}"


def run(args: argparse.Namespace) -> int:
    data = _check(args)
    from pcipass.vfio import open_device

    device = open_device(args.bdf)
    try:
        with NvmeController(device, nsid=args.nsid, interrupts=not args.no_irq) as nvme:
            info = nvme.describe()
            if args.read is not None:
                block = nvme.block_size
                for line in hexdump(nvme.read(args.read, args.count), args.read * block):
                    print(line)
            elif data is not None:
                nvme.write(args.write, data)
                blocks = len(data) // nvme.block_size
                print(
                    f"{args.bdf}: wrote {blocks} block(s) at LBA {args.write} ({len(data)} bytes)"
                )
            elif args.json:
                json.dump(info, sys.stdout, indent=2)
                print()
            else:
                width = max(len(key) for key in info)
                for key, value in info.items():
                    print(f"{key:<{width}}  {value}")
    finally:
        device.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run without the `pcipass` dispatcher (python -m pcipass.drivers.nvme_cli BDF ...)."""
    parser = argparse.ArgumentParser(prog="pcipass drive nvme", description=__doc__)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except PcipassError as exc:
        print(f"pcipass: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
