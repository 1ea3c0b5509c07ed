"""initramfs.kernel_modules: a module and its dependencies, each after what it needs."""

from __future__ import annotations

import pytest

from pcipass.lab import initramfs


def _module(path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6.1\0")


def test_dependencies_come_first_once_each(tmp_path):
    _module(tmp_path / "drivers/nvme/host/nvme.ko", "nvme-core")
    _module(tmp_path / "drivers/nvme/host/nvme-core.ko", "t10-pi")
    _module(tmp_path / "block/t10-pi.ko", "crc-t10dif,crc64-rocksoft")
    _module(tmp_path / "lib/crc-t10dif.ko", "crct10dif_common")
    _module(tmp_path / "crypto/crct10dif_common.ko", "")
    _module(tmp_path / "lib/crc64-rocksoft.ko", "crc64")
    _module(tmp_path / "lib/crc64.ko", "")
    _module(tmp_path / "drivers/pci/xen-pcifront.ko", "")
    entries = initramfs.kernel_modules(tmp_path, ["xen-pcifront", "nvme", "crc64"])
    assert [e[0] for e in entries] == ["xen-pcifront.ko", "crct10dif_common.ko", "crc-t10dif.ko", "crc64.ko",
                                       "crc64-rocksoft.ko", "t10-pi.ko", "nvme-core.ko", "nvme.ko"]
    assert all(e[1] == initramfs.FILE for e in entries)
    assert entries[-1][2] == (tmp_path / "drivers/nvme/host/nvme.ko").read_bytes()


def test_a_missing_dependency_is_named_with_who_needs_it(tmp_path):
    _module(tmp_path / "nvme.ko", "nvme-core")
    with pytest.raises(FileNotFoundError, match="nvme_core .*nvme"):
        initramfs.kernel_modules(tmp_path, ["nvme"])


def test_modules_order_names_the_files_when_the_kernel_has_one(tmp_path):
    _module(tmp_path / "kernel/drivers/nvme/host/nvme.ko", "")
    _module(tmp_path / "kernel/drivers/pci/xen-pcifront.ko", "")
    (tmp_path / "modules.order").write_text("kernel/drivers/nvme/host/nvme.ko\n")
    assert [e[0] for e in initramfs.kernel_modules(tmp_path, ["nvme"])] == ["nvme.ko"]
    with pytest.raises(FileNotFoundError, match="xen_pcifront"):  # not in modules.order: not looked for
        initramfs.kernel_modules(tmp_path, ["xen-pcifront"])
