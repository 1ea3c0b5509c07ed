"""The man page and the bash completion, both made from the command line's own parser.

    python -m pcipass.manual man  > share/man/man1/pcipass.1
    python -m pcipass.manual bash > share/bash-completion/completions/pcipass

The package installs both files (pyproject.toml's data-files) under its prefix; a unit
test keeps them equal to what this module makes. The parser is walked, not its --help
text, so that the output does not change with Python's help formatter.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from pcipass import __version__
from pcipass.cli import build_parser

MAN_PAGE = "share/man/man1/pcipass.1"
BASH_COMPLETION = "share/bash-completion/completions/pcipass"

ENVIRONMENT = {
    "PCIPASS_LAB_CACHE": "where the lab keeps its kernel, QEMU 11.1 and run directories "
    "(default: ~/.cache/pcipass/lab)",
    "PCIPASS_LAB_KERNEL": "a vmlinuz for the lab to boot instead of the cached Debian kernel "
    "(its modules in ../lib/modules/)",
    "PCIPASS_LAB_ACCEL": "kvm or tcg: skip the lab's KVM probe",
    "PCIPASS_VFIO_IOMMU": "container or iommufd: the VFIO backend pcipass.vfio (drive, serve) "
    "opens devices through (default auto: iommufd where /dev/iommu and the device's cdev exist)",
    "PCIPASS_CDI_DIR": "where claim writes each claimed vfio group's CDI spec and release removes it "
    "(default /var/run/cdi; set empty, no CDI specs are written)",
    "CI": "true: a lab test that cannot run fails instead of being skipped",
}


@dataclass
class Command:
    """One command path (`lab run`) as the parser declares it."""

    path: tuple[str, ...]
    help: str
    parser: argparse.ArgumentParser
    verbs: list[str] = field(default_factory=list)  # the sub-verbs, if it has any

    @property
    def options(self) -> list[argparse.Action]:
        return [a for a in self.parser._actions if a.option_strings]

    @property
    def positionals(self) -> list[argparse.Action]:
        return [a for a in self.parser._actions
                if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def commands(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = (),
             help: str = "") -> Iterator[Command]:
    """Every command path, the top level first, each before its sub-verbs."""
    parser = parser or build_parser()
    here = Command(path, help, parser)
    children: list[tuple[str, str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                here.verbs.append(name)
                children.append((name, helps.get(name, ""), sub))
    yield here
    for name, text, sub in children:
        yield from commands(sub, (*path, name), text)


def _value_kind(action: argparse.Action) -> str:
    """How a shell completes this argument's value: words:..., bdf, dir, file or any."""
    if action.choices:
        return "words:" + " ".join(str(c) for c in action.choices)
    if action.dest == "topology":
        from pcipass.lab.topology import TOPOLOGIES

        return "words:" + " ".join(TOPOLOGIES)
    metavar = str(action.metavar or action.dest).upper()
    if "BDF" in metavar:
        return "bdf"
    if metavar in ("ROOT", "DIR", "OUT"):
        return "dir"
    if metavar in ("FILE", "PATH", "SOCKET"):
        return "file"
    return "any"


# The man page (man(7) macros).

def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _option_heading(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} \\fI{_roff(str(action.metavar or action.dest.upper()))}\\fR"


def _positional_name(action: argparse.Action) -> str:
    if action.choices:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return str(action.metavar or action.dest.upper())


def man_page() -> str:
    parser = build_parser()
    everything = list(commands(parser))
    out = [
        '.\\" Made by `python -m pcipass.manual man` from pcipass\'s parser: do not edit.',
        f'.TH PCIPASS 1 "" "pcipass {__version__}" "User Commands"',
        ".SH NAME",
        "pcipass \\- PCI pass\\-through: see devices and IOMMU groups, judge them, claim them for "
        "VFIO or Xen, drive them, serve them to driver domains",
        ".SH SYNOPSIS",
        ".B pcipass",
        "[\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
        _roff(parser.description or ""),
        ".PP",
        "Commands that only read the host need no root; those that change it (claim, release, "
        "recover, boot apply) do. Every command that reads the host takes \\fB\\-\\-sysfs\\fR "
        "\\fIROOT\\fR, a captured (\\fBpcipass snapshot\\fR) or synthetic tree. "
        "\\fBpcipass\\fR \\fICOMMAND\\fR \\fB\\-\\-help\\fR says the same as this page for one command.",
        ".SH COMMANDS",
    ]
    for cmd in everything[1:]:
        words = " ".join(cmd.path)
        args = " ".join(f"[{_positional_name(a)}]" if a.nargs in ("?", "*", argparse.REMAINDER)
                        else _positional_name(a) for a in cmd.positionals)
        if cmd.verbs:
            args = "{" + ",".join(cmd.verbs) + "} ..."
        out += [f'.SS "pcipass {_roff(words)}{" " + _roff(args) if args else ""}"', _roff(cmd.help or "")]
        if cmd.parser.description and cmd.parser.description != cmd.help:
            out += [".PP", _roff(cmd.parser.description)]
        for action in [*cmd.positionals, *cmd.options]:
            if action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            heading = _option_heading(action) if action.option_strings else f"\\fI{_roff(_positional_name(action))}\\fR"
            out += [".TP", heading, _roff(action.help or "")]
    out += [".SH ENVIRONMENT"]
    for name, text in ENVIRONMENT.items():
        out += [".TP", f"\\fB{name}\\fR", _roff(text)]
    out += [
        ".SH EXIT STATUS",
        "0 on success; 1 when a check finds a blocking reason or a command fails (the error names "
        "what to do); 2 for bad input, which changes nothing.",
        ".SH SEE ALSO",
        "\\fBlspci\\fR(8), \\fBxl\\fR(1), \\fBqemu\\-system\\-x86_64\\fR(1); the README and docs/ of "
        "pcipass's source.",
        "",
    ]
    return "\n".join(out)


# The bash completion: a table per command path, and one function that reads the line.

def _bash_spec(cmd: Command) -> list[str]:
    lines = []
    if cmd.verbs:
        lines.append("verbs " + " ".join(cmd.verbs))
    for action in cmd.options:
        kind = "-" if action.nargs == 0 else _value_kind(action)
        lines += [f"opt {name} {kind}" for name in action.option_strings]
    for action in cmd.positionals:
        many = "+" if action.nargs in ("+", "*", argparse.REMAINDER) else ""
        lines.append(f"pos {_value_kind(action)}{many}")
    return lines


BASH_LOGIC = r'''
# The BDFs of this host (or of the tree named by --sysfs on the line).
_pcipass_bdfs()
{
    local root=$1 d
    for d in "$root"/sys/bus/pci/devices/*; do
        [[ -e $d ]] && printf '%s\n' "${d##*/}"
    done
}

_pcipass_complete_kind()
{
    local kind=${1%+} cur=$2 root=$3
    case $kind in
        words:*) COMPREPLY=($(compgen -W "${kind#words:}" -- "$cur")) ;;
        bdf) COMPREPLY=($(compgen -W "$(_pcipass_bdfs "$root")" -- "$cur")) ;;
        dir) COMPREPLY=($(compgen -d -- "$cur")) ;;
        file) COMPREPLY=($(compgen -f -- "$cur")) ;;
        *) COMPREPLY=() ;;
    esac
}

_pcipass()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    local path="" root="" i w kind npos=0 spec line
    local -a pos=()
    # Walk the words before the cursor: verbs deepen the path, an option's value is skipped,
    # anything else is a positional argument.
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        spec=$(_pcipass_spec "$path")
        if [[ $w == -* ]]; then
            kind=$(sed -n "s/^opt ${w//\//\\/} //p" <<<"$spec")
            if [[ -n $kind && $kind != - ]]; then
                ((i++))
                [[ $w == --sysfs ]] && root=${COMP_WORDS[i]}
            fi
        elif grep -qw -- "$w" <<<"$(sed -n 's/^verbs //p' <<<"$spec")"; then
            path=${path:+$path }$w
        else
            ((npos++))
        fi
    done
    spec=$(_pcipass_spec "$path")
    if [[ $prev == -* ]]; then
        kind=$(sed -n "s/^opt ${prev//\//\\/} //p" <<<"$spec")
        if [[ -n $kind && $kind != - ]]; then
            _pcipass_complete_kind "$kind" "$cur" "$root"
            return
        fi
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$(sed -n 's/^opt \([^ ]*\) .*/\1/p' <<<"$spec")" -- "$cur"))
        return
    fi
    line=$(sed -n 's/^verbs //p' <<<"$spec")
    if [[ -n $line ]]; then
        COMPREPLY=($(compgen -W "$line" -- "$cur"))
        return
    fi
    mapfile -t pos < <(sed -n 's/^pos //p' <<<"$spec")
    if ((${#pos[@]})); then
        # The last positional may take many words (BDF..., a command after --).
        ((npos >= ${#pos[@]})) && npos=$((${#pos[@]} - 1))
        kind=${pos[npos]}
        [[ $npos -lt ${#pos[@]} ]] && _pcipass_complete_kind "$kind" "$cur" "$root"
    fi
}
complete -F _pcipass pcipass
'''


def bash_completion() -> str:
    out = [
        "# bash completion for pcipass: its commands and options, and the BDFs of this host.",
        "# Made by `python -m pcipass.manual bash` from pcipass's parser: do not edit.",
        "",
        "# What each command path takes: verbs, options (with how their value is completed),",
        "# positional arguments.",
        "_pcipass_spec()",
        "{",
        "    case $1 in",
    ]
    for cmd in commands():
        out.append(f'        "{" ".join(cmd.path)}")')
        out.append("            printf '%s\\n' \\")
        out += [f"                '{line}' \\" for line in _bash_spec(cmd)]
        out[-1] = out[-1].removesuffix(" \\") + " ;;"
    out += ["    esac", "}", BASH_LOGIC.lstrip("\n")]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcipass.manual",
                                     description="print pcipass's man page or its bash completion")
    parser.add_argument("what", choices=("man", "bash"))
    args = parser.parse_args(argv)
    sys.stdout.write(man_page() if args.what == "man" else bash_completion())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
