"""The lab's command line and its errors, without booting (one test boots: the exit status)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcipass.cli import main
from pcipass.lab import guest, kernel, topology, vm


def test_topologies_lists_the_named_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "topologies"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["seed", "drivers", "default", "sriov"]


def test_a_topology_that_needs_the_peer_qemu_boots_on_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from pcipass.lab import peer_qemu, topology, vm

    prefix = tmp_path / "peer"
    for rel in (peer_qemu.BINARY, peer_qemu.LOADER):
        (prefix / rel).parent.mkdir(parents=True, exist_ok=True)
    # A stand-in loader that prints what it was given, as the real one would pass it on.
    (prefix / peer_qemu.LOADER).write_text("#!/bin/sh\necho \"$QEMU_MODULE_DIR\" \"$@\"\n")
    (prefix / peer_qemu.LOADER).chmod(0o755)
    (prefix / peer_qemu.BINARY).write_text("")
    monkeypatch.setattr(peer_qemu, "prefix_dir", lambda: prefix)
    monkeypatch.setenv("PCIPASS_LAB_ACCEL", "tcg")
    monkeypatch.setattr(vm, "check_tools", lambda: {"qemu": "qemu", "vng": "vng", "depmod": "depmod"})
    monkeypatch.setattr(vm.lab_kernel, "require", lambda name=None: type("K", (), {"image": "bzImage", "release": "6.1"})())
    monkeypatch.setattr(vm, "accel", lambda qemu, kernel: vm.Accel("tcg", "test"))
    cmd, _ = vm.vng_command(topology.get("sriov"), tmp_path, command=["true"])
    [qemu] = [a.split("=", 1)[1] for a in cmd if a.startswith("--qemu=")]
    assert "igb,bus=rp4,netdev=net1" in cmd[cmd.index(next(a for a in cmd if a.startswith("--qemu-opts=")))]
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(prefix / "usr/lib/x86_64-linux-gnu/qemu")
    assert out[1] == "--library-path"
    assert str(prefix / peer_qemu.BINARY) in out and out[-1] == "--version"
    cmd, _ = vm.vng_command(topology.get("seed"), tmp_path, command=["true"])
    assert not any(a.startswith("--qemu=") for a in cmd)  # Debian's QEMU: vng's own choice


def test_unknown_topology_is_refused_with_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "run", "--topology", "nope", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "unknown lab topology 'nope'" in err and "default, drivers, seed" in err


def test_default_is_the_union_of_seed_and_drivers(tmp_path: Path) -> None:
    default = topology.get("default")
    assert default.devices == topology.get("seed").devices + topology.get("drivers").devices
    args = default.qemu_args(tmp_path)
    assert args.count("-device") == len(default.devices)
    image = tmp_path / "nvm0.img"
    assert image.stat().st_size == 64 << 20 and f"file={image}" in " ".join(args)


def test_missing_qemu_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    monkeypatch.setattr(vm.sys, "executable", str(tmp_path / "python3"))
    monkeypatch.setattr(vm.shutil, "which", lambda name, path=None: None)
    assert main(["lab", "run", "--", "true"]) == 1
    assert "apt-get install qemu-system-x86" in capsys.readouterr().err


def test_missing_kernel_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PCIPASS_LAB_CACHE", str(tmp_path))
    monkeypatch.delenv("PCIPASS_LAB_KERNEL", raising=False)
    monkeypatch.setattr(vm, "check_tools", lambda: {"qemu": "q", "vng": "v", "depmod": "d"})
    assert main(["lab", "run", "--", "true"]) == 1
    assert "pcipass lab setup" in capsys.readouterr().err


def test_kernel_found_in_cache_and_by_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PCIPASS_LAB_CACHE", str(tmp_path))
    monkeypatch.delenv("PCIPASS_LAB_KERNEL", raising=False)
    assert kernel.find() is None
    boot = tmp_path / "kernels" / "linux-image-6.1.0-9-amd64" / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(b"")
    found = kernel.find()
    assert found is not None and found.release == "6.1.0-9-amd64"
    assert found.modules == boot.parent / "lib" / "modules" / "6.1.0-9-amd64"
    monkeypatch.setenv("PCIPASS_LAB_KERNEL", str(tmp_path / "missing"))
    with pytest.raises(kernel.PcipassError, match="is not a file"):
        kernel.find()


def test_guest_wrapper_returns_the_command_status(capsys: pytest.CaptureFixture[str]) -> None:
    status = guest.main(["--topology", "seed", "--host-start", "0", "--",
                         sys.executable, "-c", "import os, sys; "
                         "sys.exit(7 if os.environ['PCIPASS_LAB_GUEST'] == '1' else 1)"])
    assert status == 7
    assert "lab: guest up" in capsys.readouterr().err
    assert guest.main(["--topology", "seed", "--host-start", "0", "--", "/nonexistent/cmd"]) == 127


def test_accel_is_forced_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCIPASS_LAB_ACCEL", "tcg")
    k = kernel.Kernel(Path("/nonexistent/vmlinuz-x"), "x")
    assert vm.accel("qemu", k).name == "tcg"


def _lab_ready() -> str | None:
    try:
        vm.check_tools()
        kernel.require()
    except kernel.PcipassError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(os.environ.get("PCIPASS_LAB_GUEST") == "1", reason="boots a VM: not from inside one")
def test_lab_run_passes_the_exit_status_and_output_back() -> None:
    why = _lab_ready()
    if why and os.environ.get("CI") != "true":
        pytest.skip(f"the lab cannot boot here: {why}")
    done = subprocess.run(
        [sys.executable, "-m", "pcipass", "lab", "run", "--topology", "seed", "--",
         "sh", "-c", "echo out-$(id -u); echo err >&2; exit 7"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 7, done.stderr
    assert "out-0" in done.stdout  # ran as root, stdout came back on stdout
    assert "err" in done.stderr and "lab: guest up" in done.stderr
