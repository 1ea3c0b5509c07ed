"""`pcipass drive nvme`: identify, --read hexdump, --write FILE, and bad flags refused early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pcipass.vfio
from pcipass.drivers.nvme_cli import hexdump, main
from pcipass.models.nvme import Nvme


@pytest.fixture
def fake(serve, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The NVMe model behind each Device implementation; `pcipass.vfio.open_device` opens it."""
    served = serve(Nvme(blocks=32, block_size=512, serial="PCIPASS0001", model="QEMU NVMe Ctrl"))
    served.opened = []

    def open_device(bdf: str, **kwargs: object):  # type: ignore[no-untyped-def]
        served.opened.append(bdf)
        return served.open()

    monkeypatch.setattr(pcipass.vfio, "open_device", open_device, raising=False)
    return served


def test_identify(fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["0000:03:00.0"]) == 0
    out = capsys.readouterr().out
    assert "model" in out and "QEMU NVMe Ctrl" in out and "PCIPASS0001" in out
    assert "interrupts" in out and "MSI-X" in out
    assert main(["0000:03:00.0", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["serial"] == "PCIPASS0001" and info["blocks"] == 32 and info["block_size"] == 512
    assert fake.left()[0] == []  # the controller was closed


def test_write_then_read_hexdump(
    fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "blocks"
    data.write_bytes(b"pcipass!" * 64 + bytes(512))
    assert main(["0000:03:00.0", "--write", "4", "--data", str(data)]) == 0
    assert "wrote 2 block(s) at LBA 4 (1024 bytes)" in capsys.readouterr().out
    assert fake.model.storage[4 * 512 : 6 * 512] == data.read_bytes()
    assert main(["0000:03:00.0", "--read", "4", "--count", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0] == "00000800  70 63 69 70 61 73 73 21  70 63 69 70 61 73 73 21  |pcipass!pcipass!|"
    )
    assert lines[1] == "*"
    assert lines[2].startswith("00000a00  00 00") and lines[3] == "*" and lines[4] == "00000c00"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "x"], "--data goes with --write"),
        (["--count", "3"], "--count goes with --read"),
        (["--write", "0"], "--write needs --data FILE"),
        (["--read", "-1"], "--read -1 is out of range"),
        (["--read", "0", "--count", "0"], "--count 0 is out of range"),
        (["--write", "0", "--data", "/nonexistent/file"], "cannot read --data"),
    ],
)
def test_bad_flags_fail_before_the_device_is_opened(
    fake, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["0000:03:00.0", *argv]) == 2
    assert message in capsys.readouterr().err
    assert fake.opened == []


def test_device_errors_are_reported_with_a_hint(
    fake, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["0000:03:00.0", "--read", "40"]) == 1
    err = capsys.readouterr().err
    assert "outside namespace 1" in err and "hint:" in err
    assert fake.left()[0] == []


def test_hexdump_short_tail() -> None:
    assert list(hexdump(b"AB", base=0x10)) == [
        "00000010  41 42" + " " * 43 + "  |AB|",  # the bars line up with full lines
        "00000012",
    ]
