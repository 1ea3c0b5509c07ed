"""The Xen lab's host side, without booting: vng's QEMU command turned into Xen's multiboot
form, the QEMU wrapper vng runs, the missing-packages error, and the plugin's boot groups."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pcipass.errors import PcipassError
from pcipass.lab import pytest_plugin, xen

VNG_ARGS = [
    "-m", "2G", "-cpu", "max",
    "-chardev", "file,id=console,path=/dev/null",
    "-chardev", "file,id=stdout,path=/proc/self/fd/1",
    "-kernel", "/cache/boot/vmlinuz-6.1",
    "-append", "virtme_console=ttyS0 console=ttyS0 earlyprintk=serial,ttyS0,115200 "
               "rootflags=version=9p2000.L,trans=virtio intel_iommu=on",
    "-initrd", "/proc/self/fd/5",
    "-machine", "q35,kernel-irqchip=split",
]


def _opt(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_linux_boot_becomes_xen_with_the_kernel_as_dom0():
    out = xen.multiboot_args(VNG_ARGS, Path("/cache/xen/xen-4.17-amd64"), serial_log="/run/x.log")
    assert _opt(out, "-kernel") == "/cache/xen/xen-4.17-amd64"
    assert _opt(out, "-append") == " ".join(xen.XEN_ARGS)
    assert "iommu=1" in _opt(out, "-append").split()
    assert _opt(out, "-cpu") == "qemu64" and out.count("-cpu") == 1
    modules = _opt(out, "-initrd")
    # Two modules: the kernel with its arguments (commas doubled), then the initramfs.
    assert modules == ("/cache/boot/vmlinuz-6.1 virtme_console=hvc0 console=hvc0 earlyprintk=xen "
                       "rootflags=version=9p2000.L,,trans=virtio intel_iommu=on,/proc/self/fd/5")
    # The serial console (Xen's) goes to the log; vng's other chardevs are untouched.
    assert "file,id=console,path=/run/x.log" in out
    assert "file,id=stdout,path=/proc/self/fd/1" in out
    assert _opt(out, "-machine") == "q35,kernel-irqchip=split"


def test_without_a_serial_log_the_console_is_left_alone():
    out = xen.multiboot_args(VNG_ARGS, Path("/x"))
    assert "file,id=console,path=/dev/null" in out


def test_a_command_without_a_kernel_is_refused():
    with pytest.raises(PcipassError) as e:
        xen.multiboot_args(["-m", "2G"], Path("/x"))
    assert e.value.code == "lab-xen-args"
    with pytest.raises(PcipassError):
        xen.multiboot_args(["-kernel"], Path("/x"))


def test_a_dom0_command_line_xen_would_cut_is_refused():
    args = list(VNG_ARGS)
    args[args.index("-append") + 1] = "x" * xen.DOM0_CMDLINE_MAX
    with pytest.raises(PcipassError) as e:
        xen.multiboot_args(args, Path("/x"))
    assert e.value.code == "lab-xen-cmdline"


def test_missing_packages_name_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(xen, "XEN_GZ", tmp_path / "xen-4.17-amd64.gz")
    with pytest.raises(PcipassError) as e:
        xen.require(tmp_path)
    assert e.value.code == "lab-no-xen"
    assert "apt-get install xen-hypervisor-4.17-amd64 xen-utils-4.17" in e.value.hint
    assert not (tmp_path / "xen").exists()  # nothing was written


def test_require_gunzips_xen_once(tmp_path, monkeypatch):
    import gzip

    gz = tmp_path / "xen-4.17-amd64.gz"
    gz.write_bytes(gzip.compress(b"\x7fELF xen"))
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "xl").write_text("")
    monkeypatch.setattr(xen, "XEN_GZ", gz)
    monkeypatch.setattr(xen, "XEN_TOOLS", tools)
    image = xen.require(tmp_path / "cache")
    assert image.read_bytes() == b"\x7fELF xen"
    before = image.stat().st_mtime_ns
    assert xen.require(tmp_path / "cache") == image and image.stat().st_mtime_ns == before


def test_the_wrapper_passes_a_probe_straight_to_qemu(tmp_path):
    # vng runs `QEMU --version` first: the wrapper must be a transparent QEMU for it.
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho \"fake qemu $*\"\n")
    fake.chmod(0o755)
    script = xen.qemu_wrapper(tmp_path, str(fake), tmp_path / "xen")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout == "fake qemu --version\n"
    out = subprocess.run([str(script), *VNG_ARGS], capture_output=True, text=True, check=True)
    assert f"-kernel {tmp_path / 'xen'}" in out.stdout and "-cpu qemu64" in out.stdout
    config = json.loads((tmp_path / "xen.json").read_text())
    assert config["serial_log"] == str(tmp_path / "xen-serial.log")


def test_plugin_boots_once_per_topology_xen_and_arguments():
    class Item:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def iter_markers(self, name):  # nearest first, as pytest gives them
            return iter([pytest.mark.lab(**self.kwargs).mark] if name == "lab" else [])

    assert pytest_plugin._group(Item()) == ("default", False, (), None)
    assert pytest_plugin._group(Item(topology="seed", xen=True, append=("a=1",))) == ("seed", True, ("a=1",), None)
    assert pytest_plugin._group(Item(kernel="iommufd")) == ("default", False, (), "iommufd")
    assert pytest_plugin._group(Item(xen=True)) != pytest_plugin._group(Item())
    assert pytest_plugin._group(Item(kernel="iommufd")) != pytest_plugin._group(Item())
    assert "under Xen" in pytest_plugin._describe(("seed", True, (), None))
    assert "on the lab kernel iommufd" in pytest_plugin._describe(("default", False, (), "iommufd"))
