"""`pcipass lab ...`: set up, boot and use the lab (see pcipass.lab.vm)."""

from __future__ import annotations

import argparse
import sys

from pcipass.lab import kernel, topology, vm

DEFAULT_TOPOLOGY = "default"


def _topology_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", default=DEFAULT_TOPOLOGY, metavar="NAME",
                        help=f"a named PCI topology (default: {DEFAULT_TOPOLOGY}; "
                        "see `pcipass lab topologies`)")


def _xen_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--xen", action="store_true",
                        help="boot Xen (Debian's xen-hypervisor-4.17) with the kernel as its "
                        "PV dom0, xenstored and xl running; the command runs in dom0")


def _kernel_arg(parser: argparse.ArgumentParser, setup: bool = False) -> None:
    from pcipass.lab import kbuild

    what = ("build this lab kernel of the project's own (from Debian's kernel source, cached) "
            "instead of downloading Debian's" if setup else
            "boot this lab kernel of the project's own (built by `pcipass lab setup --kernel NAME`) "
            "instead of Debian's")
    parser.add_argument("--kernel", default=None, metavar="NAME", choices=kbuild.names(),
                        help=f"{what}; one of: {', '.join(kbuild.names())}")


def _command(args: argparse.Namespace) -> list[str]:
    return args.command[1:] if args.command[:1] == ["--"] else args.command


def cmd_setup(args: argparse.Namespace) -> int:
    vm.check_tools()
    if args.kernel:
        from pcipass.lab import kbuild

        kbuild.setup(args.kernel)
    else:
        kernel.setup()
    return 0


def cmd_peer_qemu(args: argparse.Namespace) -> int:
    from pcipass.lab import peer_qemu

    peer_qemu.fetch()
    return 0


def cmd_topologies(args: argparse.Namespace) -> int:
    for t in topology.TOPOLOGIES.values():
        print(f"{t.name:10} {t.summary}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    command = _command(args)
    if not command:
        print("pcipass lab run: give the command to run after --, e.g. "
              "pcipass lab run -- lspci -nn", file=sys.stderr)
        return 2
    return vm.run(command, topology.get(args.topology), timeout=args.timeout, xen=args.xen,
                  kernel=args.kernel)


def cmd_shell(args: argparse.Namespace) -> int:
    if args.xen:  # an interactive dom0 gets its Xen services from this, run by hand
        print("lab: in dom0, `python -m pcipass.lab.xen dom0 -- bash` starts xenstored and xl",
              file=sys.stderr)
    return vm.run(None, topology.get(args.topology), xen=args.xen, kernel=args.kernel)


def cmd_test(args: argparse.Namespace) -> int:
    pytest_args = _command(args)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "lab", *pytest_args]
    return vm.run(command, topology.get(args.topology), timeout=args.timeout, xen=args.xen,
                  kernel=args.kernel)


def cmd_demo(args: argparse.Namespace) -> int:
    return vm.run([sys.executable, "-m", "pcipass.lab.demo"], topology.get(args.topology),
                  timeout=args.timeout, xen=args.xen, kernel=args.kernel)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lab = sub.add_parser("lab", help="boot a real kernel under QEMU with an emulated IOMMU",
                         description="The lab: a real Linux kernel under QEMU (KVM if it works, "
                         "TCG otherwise) with an emulated Intel IOMMU and a chosen PCI topology; "
                         "the host's root is shared read-only, commands run inside as root.")
    verbs = lab.add_subparsers(dest="lab_command", metavar="VERB", required=True)

    p = verbs.add_parser("setup", help="check the tools and download the kernel into the cache")
    _kernel_arg(p, setup=True)
    p.set_defaults(func=cmd_setup)
    p = verbs.add_parser("peer-qemu", help="fetch QEMU 11.1 from trixie-backports into the cache (not "
                         "installed): the vfio-user client tests/interop runs against")
    p.set_defaults(func=cmd_peer_qemu)
    p = verbs.add_parser("topologies", help="list the named topologies")
    p.set_defaults(func=cmd_topologies)
    for name, func, text in (
        ("run", cmd_run, "boot, run CMD inside as root, exit with its status"),
        ("test", cmd_test, "run the lab tests (pytest -m lab) inside one VM"),
        ("demo", cmd_demo, "the main job end to end, narrated"),
    ):
        p = verbs.add_parser(name, help=text)
        _topology_arg(p)
        _xen_arg(p)
        _kernel_arg(p)
        p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="stop the guest after this long (exit status 124)")
        p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD... (run) or -- PYTEST_ARGS (test)")
        p.set_defaults(func=func)
    p = verbs.add_parser("shell", help="an interactive root shell in the lab")
    _topology_arg(p)
    _xen_arg(p)
    _kernel_arg(p)
    p.set_defaults(func=cmd_shell)
