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
