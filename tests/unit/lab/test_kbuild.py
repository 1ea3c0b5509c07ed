"""The lab kernels of the project's own (pcipass.lab.kbuild), without building one: the config
fragment, the cache key, finding a build, and the lab choosing it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcipass.cli import main
from pcipass.errors import PcipassError
from pcipass.lab import kbuild, kernel, vm


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PCIPASS_LAB_CACHE", str(tmp_path))
    return tmp_path


def _fake_build(cache: Path, name: str, version: str = "6.12.117-1~deb12u1") -> Path:
    image = cache / "built" / f"{name}-{version}-{kbuild.config_hash(name)}" / "boot" / "vmlinuz-6.12.117-iommufd"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    return image


def test_the_iommufd_fragment_asks_for_both_backends_and_no_iommu_mode() -> None:
    assert "iommufd" in kbuild.names()
    settings = dict(kbuild.wanted("iommufd"))
    for key in ("CONFIG_IOMMUFD", "CONFIG_VFIO_DEVICE_CDEV", "CONFIG_VFIO_NOIOMMU", "CONFIG_VFIO_CONTAINER",
                "CONFIG_VFIO_PCI", "CONFIG_INTEL_IOMMU", "CONFIG_PVH", "CONFIG_BLK_DEV_NVME", "CONFIG_E1000E",
                "CONFIG_9P_FS", "CONFIG_VIRTIO_FS", "CONFIG_OVERLAY_FS", "CONFIG_DEVTMPFS"):
        assert settings[key] == "y", key
    assert "CONFIG_MODULES" not in settings  # allnoconfig leaves modules off: all built in


def test_missing_settings_names_what_a_dependency_refused() -> None:
    full = "".join(f"{k}={v}\n" for k, v in kbuild.wanted("iommufd") if v != "n")
    assert kbuild.missing_settings("iommufd", full) == []
    cut = full.replace("CONFIG_IOMMUFD=y\n", "").replace("CONFIG_PVH=y\n", "CONFIG_PVH=m\n")
    assert sorted(kbuild.missing_settings("iommufd", cut)) == ["CONFIG_IOMMUFD=y (got unset)",
                                                              "CONFIG_PVH=y (got m)"]
    assert kbuild.missing_settings("iommufd", full + "CONFIG_UEVENT_HELPER=y\n") == [
        "CONFIG_UEVENT_HELPER should be off, is y"]


def test_unknown_lab_kernel_names_the_known_ones() -> None:
    with pytest.raises(PcipassError) as exc:
        kbuild.config_fragment("nope")
    assert exc.value.code == "lab-unknown-kernel" and "iommufd" in (exc.value.hint or "")


def test_a_build_is_found_only_with_todays_config(cache: Path) -> None:
    assert kernel.find("iommufd") is None
    with pytest.raises(PcipassError) as exc:
        kernel.require("iommufd")
    assert "pcipass lab setup --kernel iommufd" in (exc.value.hint or "")
    stale = cache / "built" / "iommufd-6.12.117-1~deb12u1-000000000000" / "boot" / "vmlinuz-6.12.117-iommufd"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    assert kernel.find("iommufd") is None  # another config: built again
    image = _fake_build(cache, "iommufd")
    found = kernel.require("iommufd")
    assert found.image == image and found.release == "6.12.117-iommufd"
    assert found.modules == image.parent.parent / "lib" / "modules" / "6.12.117-iommufd"
    assert kernel.find() is None  # Debian's kernel is looked for apart, as before


def test_setup_builds_nothing_when_the_build_is_cached(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = _fake_build(cache, "iommufd")
    monkeypatch.setattr(kbuild, "source_version", lambda: "6.12.117-1~deb12u1")
    monkeypatch.setattr(kbuild, "_unpack_source", lambda work: pytest.fail("built again"))
    assert kbuild.setup("iommufd").image == image


def test_setup_without_apt_lists_takes_a_cached_build(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_source() -> str:
        raise PcipassError("apt knows no linux-source-6.12", hint="apt-get update")

    monkeypatch.setattr(kbuild, "source_version", no_source)
    with pytest.raises(PcipassError):
        kbuild.setup("iommufd")
    image = _fake_build(cache, "iommufd", "6.12.1-1")
    assert kbuild.setup("iommufd").image == image


def test_the_lab_boots_the_named_kernel_and_tells_the_guest(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    from pcipass.lab import topology

    image = _fake_build(cache, "iommufd")
    monkeypatch.setenv("PCIPASS_LAB_ACCEL", "tcg")
    monkeypatch.setattr(vm, "check_tools", lambda: {"qemu": "qemu", "vng": "vng", "depmod": "depmod"})
    cmd, _ = vm.vng_command(topology.get("seed"), tmp_path, command=["true"], kernel_name="iommufd")
    assert cmd[cmd.index("--run") + 1] == str(image)
    assert "--kernel iommufd" in cmd[-1]


def test_lab_verbs_take_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["lab", "run", "--kernel", "nope", "--", "true"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
