"""The lint rules pyproject.toml names ([tool.ruff.lint]) hold over src and tests."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_ruff_is_clean_over_src_and_tests():
    # ruff comes with the test extras (bootstrap installs them); python -m finds this venv's.
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_two_test_modules_share_a_name():
    # The test folders have no __init__.py, so pytest imports each module by its bare name:
    # a second tests/**/test_x.py stops the whole run at collection ("import file mismatch").
    seen: dict[str, str] = {}
    clashes = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in files:
            if name.startswith("test_") and name.endswith(".py"):
                path = os.path.relpath(os.path.join(folder, name), ROOT)
                if name in seen:
                    clashes.append(f"{seen[name]} and {path}")
                seen.setdefault(name, path)
    assert not clashes, "rename one of each pair: " + "; ".join(clashes)
