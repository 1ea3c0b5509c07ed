"""`pcipass serve` as a separate process, and its usage errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

import pcipass
from pcipass.cli import main
from pcipass.domain import connect


def wait_for(path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)


def pcipass_env():
    """Run the pcipass under test, wherever the installed one points."""
    src = os.path.dirname(os.path.dirname(pcipass.__file__))
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_serve_a_model_in_its_own_process(tmp_path):
    sock = tmp_path / "edu.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pcipass", "serve", "--model", "edu", "--socket", str(sock),
                             "--once", "--trace", "--mode", "0660"], stderr=subprocess.PIPE, text=True,
                            env=pcipass_env())
    try:
        wait_for(sock, proc)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        with connect(sock) as dev:
            assert dev.region(0).read(0, 4) == 0x010000ED
            dev.config_write(4, 2, 0x0002)
            dev.config_write(4, 2, 0x0000)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "serving model edu" in err
        assert "REFUSED turning off memory decode" in err and "XSA-120" in err
        assert not sock.exists()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("argv, words", [
    (["serve", "--socket", "x"], "exactly one of BDF or --model"),
    (["serve", "0000:00:0a.0", "--model", "edu", "--socket", "x"], "exactly one"),
    (["serve", "--model", "edu", "--socket", "x", "--mode", "rw"], "not an octal mode"),
    (["serve", "--model", "nope", "--socket", "x"], "no model named"),
])
def test_usage_errors(argv, words, capsys, tmp_path):
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path, capsys):
    path = tmp_path / "precious"
    path.write_text("keep me")
    assert main(["serve", "--model", "edu", "--socket", str(path)]) == 2
    assert "not a socket" in capsys.readouterr().err and path.read_text() == "keep me"


def test_drive_edu_through_the_socket(edu_server, capsys):
    assert main(["drive", "edu", "--socket", str(edu_server.path)]) == 0
    out = capsys.readouterr().out
    assert "12! = 479001600" in out and "all checks passed" in out
