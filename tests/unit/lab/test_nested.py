"""pcipass.lab.nested without booting: the guest's /init, the PVH kernel, reading the results."""

from __future__ import annotations

import lzma
import subprocess

import pytest

from pcipass.errors import PcipassError
from pcipass.lab import initramfs, nested
from pcipass.lab import kernel as lab_kernel
from pcipass.lab.kernel import Kernel
from pcipass.lab.pytest_plugin import in_ci


def _lab_kernel() -> Kernel:
    try:
        return lab_kernel.require()
    except PcipassError as exc:
        if in_ci():
            pytest.fail(f"CI: {exc}")
        pytest.skip(exc.message)


def test_the_guest_init_is_valid_shell(tmp_path):
    kernel = _lab_kernel()
    shell, files = nested.NvmeExchange.new().checks(kernel)
    init = nested.init_script(shell, nested.EDU_CHECKS)
    script = tmp_path / "init"
    script.write_text(init)
    done = subprocess.run([str(initramfs.BUSYBOX), "sh", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert init.startswith("#!/bin/busybox sh\n") and init.endswith("poweroff -f\n")
    # The nvme modules (initramfs.kernel_modules) and the block the guest writes beside them.
    names = [name for name, *_ in files]
    assert names[-3:] == ["nvme-core.ko", "nvme.ko", nested.GUEST_BLOCK_FILE]
    assert names.index("t10-pi.ko") < names.index("nvme-core.ko")
    assert "insmod /$m; done" in init and " ".join(names[:-1]) in init


def test_pvh_kernel_is_the_elf_inside_the_bzimage(tmp_path):
    elf = b"\x7fELF" + bytes(range(256)) * 16
    image = tmp_path / "boot" / "vmlinuz-9.9"
    image.parent.mkdir()
    image.write_bytes(b"MZ setup code" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"trailing padding")
    kernel = Kernel(image, "9.9")
    out = nested.pvh_kernel(kernel, tmp_path)
    assert out.read_bytes() == elf and out.name == "vmlinux-9.9"
    image.write_bytes(b"no payload here")
    with pytest.raises(PcipassError):
        nested.pvh_kernel(kernel, tmp_path / "boot")


def test_results_read_back():
    results = {"edu-0000:00:10.0-ident": "0x010000ED", "edu-0000:00:10.0-liveness": "0xEDCBA987",
               "edu-0000:00:10.1-ident": "0xFFFFFFFF"}
    assert nested.edu_results(results) == {"0000:00:10.0": ("0x010000ED", "0xEDCBA987"),
                                           "0000:00:10.1": ("0xFFFFFFFF", None)}
    exchange = nested.NvmeExchange.new()
    good = {"nvme-read": nested.sha256(exchange.host_block), "nvme-wrote": nested.sha256(exchange.guest_block)}
    assert exchange.mismatches(good) == []
    assert len(exchange.mismatches({**good, "nvme-read": nested.sha256(bytes(nested.BLOCK))})) == 1
