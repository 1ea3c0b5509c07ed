"""The command line's verb table: each verb imports only its own part, and the table is true."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pcipass import cli


def _registered(module: str) -> set[str]:
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


@pytest.mark.parametrize("module", sorted(cli.VERBS))
def test_each_module_registers_exactly_the_verbs_the_table_gives_it(module: str) -> None:
    assert _registered(module) == set(cli.VERBS[module])


def test_a_verb_imports_only_the_part_that_owns_it() -> None:
    code = ("import sys; from pcipass import cli; cli.build_parser(['list', '--json']); "
            "print(sorted(m for m in sys.modules if m.startswith('pcipass.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert "pcipass.host.present.cli_inventory" in loaded
    assert not loaded & {"pcipass.host.present.cli_changes", "pcipass.host.transaction.claim", "pcipass.lab.cli",
                         "pcipass.drivers.cli", "pcipass.domain.cli"}


def test_help_without_a_verb_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for verbs in cli.VERBS.values():
        for verb in verbs:
            assert verb in err


def test_an_unknown_verb_is_refused_with_the_full_list(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["lsit"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'lsit'" in err and "'list'" in err and "'serve'" in err
