"""Pytest plugin: tests marked `lab` run inside the lab VM, one boot per topology per session.

Outside the VM, the first lab test boots the lab once and runs every selected
lab test of its topology there (`pytest @nodeids --lab-report FILE`); each
test's reports from inside are then replayed here, so pytest's counts outside
are the real outcomes inside. Inside the VM (PCIPASS_LAB_GUEST=1) lab tests
just run. Where the lab cannot boot they are skipped with the reason, except
in CI (CI=true), where that is a failure.

Mark a test `@pytest.mark.lab` (topology `default`) or
`@pytest.mark.lab(topology="seed")`; `xen=True` runs it in a Xen dom0, and
`append=("arg=...",)` adds kernel arguments (dom0's, under Xen), and `kernel="iommufd"`
boots a lab kernel of the project's own (pcipass.lab.kbuild) instead of Debian's. Each
distinct (topology, xen, append, kernel) is one boot.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from pcipass.errors import PcipassError

# Seconds for one boot's worth of lab tests. On a 2-core machine the default boot's other
# tests took 21 min inside the guest and the nested-QEMU consumer test 13 min in a boot of
# its own: together about 35, too close to the 45 this was.
LAB_TIMEOUT = 60 * 60
WHENS = ("setup", "call", "teardown")
# Each boot keeps its nodeids, report and log in a run directory under the lab cache, for
# reading after a failure; the oldest go once there are more than this many and they are
# this old (another session may still be writing a younger one).
KEEP_RUNS = 20
RUN_MAX_AGE = 2 * 24 * 3600


def prune_runs(runs: Path, keep: int = KEEP_RUNS, max_age: float = RUN_MAX_AGE) -> list[Path]:
    """Remove pytest run directories beyond the newest `keep` that are older than `max_age`
    seconds (by their last change); returns what went."""
    import shutil
    import time

    dirs = sorted(runs.glob("pytest-*"), key=lambda d: d.stat().st_mtime, reverse=True)
    gone = [d for d in dirs[keep:] if time.time() - d.stat().st_mtime > max_age]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


def in_guest() -> bool:
    return os.environ.get("PCIPASS_LAB_GUEST") == "1"


def in_ci() -> bool:
    """Under CI a test that cannot run (no lab, no peer) fails instead of being skipped."""
    return os.environ.get("CI") == "true"


def lab_kwargs(item: pytest.Item) -> dict[str, Any]:
    """The `lab` marks' arguments, the nearest mark's winning key by key: a parameter's
    `lab(kernel=...)` (a backend fixture's, say) keeps its module's topology and append."""
    kwargs: dict[str, Any] = {}
    for marker in reversed(list(item.iter_markers("lab"))):
        kwargs.update(marker.kwargs)
    return kwargs


def _topology(item: pytest.Item) -> str:
    return str(lab_kwargs(item).get("topology", "default"))


# One boot per group: (topology, xen, extra kernel arguments, lab kernel or None for Debian's).
Group = tuple[str, bool, tuple[str, ...], str | None]


def _group(item: pytest.Item) -> Group:
    kwargs = lab_kwargs(item)
    return (_topology(item), bool(kwargs.get("xen", False)), tuple(kwargs.get("append", ())),
            kwargs.get("kernel"))


def _describe(group: Group) -> str:
    topology, xen, append, kernel = group
    return (f"the '{topology}' topology" + (" under Xen" if xen else "")
            + (f" on the lab kernel {kernel}" if kernel else "")
            + (f" with {' '.join(append)}" if append else ""))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lab-report", metavar="FILE", default=None,
                     help="(used inside the lab) write each test's reports to FILE as JSON")


# ---- inside the guest: record every report ---------------------------------------------------

class Recorder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.reports: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        longrepr: Any = report.longrepr
        if isinstance(longrepr, tuple):
            longrepr = list(longrepr)
        elif longrepr is not None:
            longrepr = str(longrepr)
        self.reports[report.nodeid].append({
            "when": report.when, "outcome": report.outcome, "longrepr": longrepr,
            "duration": report.duration, "sections": list(report.sections),
            "wasxfail": getattr(report, "wasxfail", None),
        })

    def pytest_sessionfinish(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.reports, f)
        os.replace(tmp, self.path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Inside: a Xen test outside a dom0, or a Linux test in one, is skipped (`lab test --xen`),
    and so is a test for another lab kernel than the one booted (`lab test --kernel NAME`)."""
    if not in_guest():
        return
    xen_here = os.environ.get("PCIPASS_LAB_XEN") == "1"
    kernel_here = os.environ.get("PCIPASS_LAB_KERNEL_NAME", "debian")
    for item in items:
        if not item.get_closest_marker("lab"):
            continue
        _, xen, _, kernel = _group(item)
        if xen != xen_here:
            where = "a Xen dom0 (pcipass lab test --xen)" if not xen_here else "the Linux lab"
            item.add_marker(pytest.mark.skip(reason=f"runs in {where}"))
        elif (kernel or "debian") != kernel_here:
            where = f"pcipass lab test --kernel {kernel}" if kernel else "the lab on Debian's kernel"
            item.add_marker(pytest.mark.skip(reason=f"runs in {where}"))


def pytest_configure(config: pytest.Config) -> None:
    report = config.getoption("--lab-report")
    if report:
        config.pluginmanager.register(Recorder(report), "pcipass-lab-recorder")
    if not in_guest():
        config.pluginmanager.register(LabRunner(config), "pcipass-lab-runner")


# ---- outside: boot once per topology, replay the reports --------------------------------------

class LabRunner:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.pending: dict[Group, list[pytest.Item]] = defaultdict(list)
        self.results: dict[Group, dict[str, list[dict[str, Any]]]] = {}
        self.failure: dict[Group, str] = {}  # group -> why its boot produced no reports
        self.logs: list[Path] = []

    # Last, after -k and -m have deselected: a boot runs only the tests that were selected.
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        lab_items = [i for i in items if i.get_closest_marker("lab")]
        if not lab_items:
            return
        unavailable = self._unavailable()
        for item in lab_items:
            _, xen, _, kernel = _group(item)
            why = (unavailable or (self._xen_unavailable() if xen else None)
                   or (self._kernel_unavailable(kernel) if kernel else None))
            if why and not in_ci():
                item.add_marker(pytest.mark.skip(reason=f"the lab cannot boot here: {why}"))
            else:
                self.pending[_group(item)].append(item)

    @staticmethod
    def _unavailable() -> str | None:
        from pcipass.lab import kernel, vm

        try:
            vm.check_tools()
            kernel.require()
        except PcipassError as exc:
            return str(exc).replace("\n", " ")
        return None

    @staticmethod
    def _kernel_unavailable(name: str) -> str | None:
        from pcipass.lab import kernel

        try:
            kernel.require(name)
        except PcipassError as exc:
            return str(exc).replace("\n", " ")
        return None

    @staticmethod
    def _xen_unavailable() -> str | None:
        from pcipass.lab import kernel, xen

        try:
            xen.require(kernel.cache_dir())
        except PcipassError as exc:
            return str(exc).replace("\n", " ")
        return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        group = _group(item)
        if item not in self.pending.get(group, ()):
            return None
        if group not in self.results:
            self._boot(group)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self._reports(item, group):
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        # A test that ran here before this one may have left its module's fixtures set
        # up for us; tear down what the next item does not share, as pytest would.
        setup_state = getattr(item.session, "_setupstate", None)
        if setup_state is not None:
            setup_state.teardown_exact(nextitem)
        return True

    def _boot(self, group: Group) -> None:
        from pcipass.lab import kernel, vm
        from pcipass.lab import topology as topologies

        topology, xen, append, lab_kernel = group
        items = self.pending[group]
        runs = kernel.cache_dir() / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        prune_runs(runs)
        shared = Path(tempfile.mkdtemp(dir=runs, prefix="pytest-"))
        (shared / "nodeids.txt").write_text("".join(f"{i.nodeid}\n" for i in items))
        log = shared / "lab.log"
        self.logs.append(log)
        report = shared / "report.json"
        # Unbuffered and verbose: the log shows each test as it starts, for reading a long boot.
        command = [sys.executable, "-u", "-m", "pytest", "-p", "no:cacheprovider", "-v",
                   "--lab-report", str(report), f"@{shared / 'nodeids.txt'}"]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.write_line(f"lab: booting {_describe(group)} for {len(items)} lab "
                                f"tests (log: {log})")
        try:
            status = vm.run(command, topologies.get(topology), rwdirs=(shared,),
                            timeout=LAB_TIMEOUT, log=log, cwd=self.config.rootpath,
                            xen=xen, append=append, kernel=lab_kernel)
        except PcipassError as exc:
            self.results[group] = {}
            self.failure[group] = f"the lab could not boot: {exc}"
            return
        try:
            self.results[group] = json.loads(report.read_text())
        except (OSError, ValueError):
            self.results[group] = {}
            self.failure[group] = f"the lab run wrote no report (exit status {status})"

    def _reports(self, item: pytest.Item, group: Group) -> list[pytest.TestReport]:
        recorded = self.results[group].get(item.nodeid)
        keywords = {k: 1 for k in item.keywords}
        if not recorded:
            why = self.failure.get(group, "the lab run did not run this test")
            return [pytest.TestReport(item.nodeid, item.location, keywords, "failed",
                                      f"{why}\n{self._log_tail()}", "setup")]
        reports = []
        for r in recorded:
            longrepr = tuple(r["longrepr"]) if isinstance(r["longrepr"], list) else r["longrepr"]
            report = pytest.TestReport(item.nodeid, item.location, keywords, r["outcome"],
                                       longrepr, r["when"], [tuple(s) for s in r["sections"]],
                                       r["duration"])
            if r["wasxfail"] is not None:
                report.wasxfail = r["wasxfail"]  # type: ignore[attr-defined]
            reports.append(report)
        return reports

    def _log_tail(self, lines: int = 40) -> str:
        if not self.logs or not self.logs[-1].exists():
            return ""
        tail = self.logs[-1].read_text(errors="replace").splitlines()[-lines:]
        return "last lines of the lab log:\n" + "\n".join(tail)
