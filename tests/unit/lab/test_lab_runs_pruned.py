"""Old lab run directories are pruned; young ones and the newest few always stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pcipass.lab.pytest_plugin import prune_runs

DAY = 24 * 3600


def _run(runs: Path, name: str, age: float) -> Path:
    d = runs / name
    (d / "sub").mkdir(parents=True)
    (d / "lab.log").write_text("log")
    then = time.time() - age
    os.utime(d, (then, then))
    return d


def test_only_old_runs_beyond_the_newest_are_removed(tmp_path: Path) -> None:
    old = [_run(tmp_path, f"pytest-old{i}", (10 + i) * DAY) for i in range(5)]
    young = [_run(tmp_path, f"pytest-young{i}", 60 * i) for i in range(3)]
    other = _run(tmp_path, "run-keep", 30 * DAY)  # `lab run` dirs are not the plugin's

    gone = prune_runs(tmp_path, keep=4, max_age=2 * DAY)

    # The newest four are the three young and old0; old1..old4 are old and beyond them.
    assert sorted(gone) == sorted(old[1:])
    assert all(not d.exists() for d in old[1:])
    assert all(d.exists() for d in young + [old[0], other])


def test_a_young_run_stays_however_many_there_are(tmp_path: Path) -> None:
    young = [_run(tmp_path, f"pytest-{i}", i) for i in range(6)]
    assert prune_runs(tmp_path, keep=2, max_age=DAY) == []
    assert all(d.exists() for d in young)
