"""The README's two set-up commands are the ones CI runs, and go through the project's venv."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readmes_test_command():
    readme = ROOT.joinpath("README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("./bootstrap && ")]
    assert len(commands) == 2 and all(" .venv/bin/" in c for c in commands), commands
    ci = [line.strip() for line in ROOT.joinpath(".ci", "run").read_text().splitlines()]
    assert commands[1] in ci and ".ci/debian-root" in ci
