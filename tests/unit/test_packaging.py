"""The package as a user gets it: `python -m build` makes an sdist and, from that sdist, a wheel;
the wheel installed alone into a fresh venv (no index, nothing else in it) runs `pcipass list`,
`pcipass serve --model edu` and `import pcipass`, and brings the man page and bash completion."""

from __future__ import annotations

import email
import importlib.util
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

import pcipass
from pcipass import manual
from pcipass.domain import connect

ROOT = Path(__file__).resolve().parents[2]
SNAP = ROOT / "tests" / "data" / "lab-snapshot"
VERSION = pcipass.__version__


def _python_with_build(tmp_path_factory) -> str:
    """This Python if it has `build` (the venv bootstrap makes does), else a venv given it."""
    if importlib.util.find_spec("build") is not None:
        return sys.executable
    tools = tmp_path_factory.mktemp("tools") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True, timeout=120)
    subprocess.run([str(tools / "bin" / "python"), "-m", "pip", "install", "-q", "build>=1.0"], check=True,
                   timeout=300)
    return str(tools / "bin" / "python")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # Build isolation: setuptools comes from the index into a throwaway environment.
    done = subprocess.run([_python_with_build(tmp_path_factory), "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory):
    """A fresh venv holding the wheel and nothing else: no pip, no index to fetch from."""
    where = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    [wheel] = dist.glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "--python", str(where / "bin" / "python"),
                    "install", "--no-index", "-q", str(wheel)], check=True, timeout=300,
                   env=_outside_env())
    return where


def _outside_env() -> dict[str, str]:
    """This environment without what would let the source tree leak in."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(venv: Path, *argv: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120,
                          cwd=venv, env=_outside_env(), **kwargs)


def test_sdist_and_wheel_carry_the_version_the_code_says(dist):
    [sdist] = dist.glob("*.tar.gz")
    [wheel] = dist.glob("*.whl")
    assert sdist.name == f"pcipass-{VERSION}.tar.gz" and wheel.name == f"pcipass-{VERSION}-py3-none-any.whl"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "src/pcipass/cli.py", manual.MAN_PAGE, manual.BASH_COMPLETION} <= names
    with zipfile.ZipFile(wheel) as whl:
        meta = email.message_from_bytes(whl.read(f"pcipass-{VERSION}.dist-info/METADATA"))
        entry_points = whl.read(f"pcipass-{VERSION}.dist-info/entry_points.txt").decode()
        files = set(whl.namelist())
    assert meta["Version"] == VERSION and "pcipass = pcipass.cli:main" in entry_points
    # Nothing required: the test and lab tools are extras only.
    assert all("extra ==" in req for req in meta.get_all("Requires-Dist", [])), meta.get_all("Requires-Dist")
    assert f"pcipass-{VERSION}.data/data/{manual.MAN_PAGE}" in files
    assert f"pcipass-{VERSION}.data/data/{manual.BASH_COMPLETION}" in files


def test_the_installed_wheel_runs_alone(venv):
    found = _run(venv, "python", "-c", "import importlib.metadata as m, pcipass; "
                 "print(pcipass.__file__); print(sorted(d.metadata['Name'] for d in m.distributions()))")
    path, dists = found.stdout.splitlines()
    assert path.startswith(str(venv)) and dists == "['pcipass']", found
    assert _run(venv, "pcipass", "--version").stdout.strip() == f"pcipass {VERSION}"
    listing = _run(venv, "pcipass", "list", "--sysfs", str(SNAP))
    assert listing.returncode == 0 and "0000:00:1f.2" in listing.stdout, listing.stderr
    assert (venv / manual.MAN_PAGE).read_text() == (ROOT / manual.MAN_PAGE).read_text()
    assert (venv / manual.BASH_COMPLETION).read_text() == (ROOT / manual.BASH_COMPLETION).read_text()


def test_the_installed_wheel_serves_the_edu_model(venv, tmp_path):
    sock = tmp_path / "edu.sock"
    proc = subprocess.Popen([str(venv / "bin" / "pcipass"), "serve", "--model", "edu", "--socket", str(sock),
                             "--once"], stderr=subprocess.PIPE, text=True, cwd=venv, env=_outside_env())
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.02)
        with connect(sock) as dev:
            assert dev.region(0).read(0, 4) == 0x010000ED  # edu's identification register
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
