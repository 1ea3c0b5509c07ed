"""The man page and the bash completion the package installs: current with the parser, and
working (man renders the page; bash completes verbs, options, values and this tree's BDFs)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from pcipass import manual

ROOT = Path(__file__).resolve().parents[2]
SNAP = ROOT / "tests" / "data" / "lab-snapshot"


@pytest.mark.parametrize("path, make", [(manual.MAN_PAGE, manual.man_page),
                                        (manual.BASH_COMPLETION, manual.bash_completion)])
def test_installed_file_is_what_the_parser_makes(path, make):
    what = "man" if path == manual.MAN_PAGE else "bash"
    assert (ROOT / path).read_text() == make(), (
        f"{path} is stale: run `python -m pcipass.manual {what} > {path}` and commit it")


def test_man_page_names_every_command_and_option():
    page = manual.man_page()
    for cmd in list(manual.commands())[1:]:
        assert f'.SS "pcipass {" ".join(cmd.path)}'.replace("-", "\\-") in page
        for action in cmd.options:
            for name in action.option_strings:
                if name not in ("-h", "--help"):
                    assert f"\\fB{name}\\fR".replace("-", "\\-") in page, (cmd.path, name)


def test_groff_renders_the_page_without_a_warning():
    # groff-base (bootstrap installs it) is what man-db renders pages with.
    out = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-P-c", "-rLL=100n", str(ROOT / manual.MAN_PAGE)],
                         capture_output=True, text=True, check=True)
    assert out.stderr == ""
    text = re.sub(".\b", "", out.stdout)
    assert "PCIPASS(1)" in text and "pcipass groups" in text and "--verbose" in text and "\\" not in text


def _complete(*words: str, cwd: Path = ROOT) -> list[str]:
    script = (f"source {ROOT / manual.BASH_COMPLETION}\n"
              'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _pcipass; printf "%s\\n" "${COMPREPLY[@]}"\n')
    done = subprocess.run(["bash", "-c", script, "bash", "pcipass", *words], capture_output=True, text=True,
                          cwd=cwd, check=True)
    assert done.stderr == ""
    return [w for w in done.stdout.splitlines() if w]


def test_bash_completes_verbs_options_and_values():
    assert _complete("") == ["list", "groups", "check", "snapshot", "claim", "release", "recover", "status",
                             "sriov", "boot", "config", "cdi", "drive", "serve", "lab", "k8s"]
    assert _complete("gr") == ["groups"]
    assert _complete("sriov", "0000:00:10.0", "--autoprobe", "") == ["on", "off"]
    assert _complete("lab", "") == ["setup", "peer-qemu", "topologies", "run", "test", "demo", "shell"]
    assert _complete("lab", "run", "--topology", "") == ["seed", "drivers", "default", "sriov"]
    assert _complete("claim", "--for", "") == ["vfio", "xen"]
    assert _complete("config", "") == ["xl", "qemu", "libvirt"]
    assert "--verbose" in _complete("groups", "--") and "--json" in _complete("groups", "--")
    assert _complete("groups", "--sysfs", "tests/data/lab-s") == ["tests/data/lab-snapshot"]


def test_bash_completes_the_bdfs_of_the_tree_named_or_this_host():
    bdfs = sorted(os.listdir(SNAP / "sys/bus/pci/devices"))
    assert _complete("check", "--sysfs", str(SNAP), "") == bdfs
    assert _complete("check", "--sysfs", str(SNAP), "0000:00:1f") == ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"]
    # config takes many BDFs, after its consumer.
    assert _complete("config", "xl", "--sysfs", str(SNAP), "0000:00:1f.0", "0000:03") == ["0000:03:00.0"]
    here = sorted(os.listdir("/sys/bus/pci/devices")) if os.path.isdir("/sys/bus/pci/devices") else []
    assert _complete("check", "") == here
