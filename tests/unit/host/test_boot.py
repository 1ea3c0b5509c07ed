"""boot show/apply/check over a temporary root, with the lab's layout as sysfs."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcipass.cli import main
from pcipass.errors import PcipassError, UsageError
from pcipass.host.fixtures import synthetic
from pcipass.host.transaction import boot


@pytest.fixture(autouse=True)
def _no_state(tmp_path, monkeypatch):
    monkeypatch.setenv("PCIPASS_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def sysfs(tmp_path):
    return synthetic.seed_layout(str(tmp_path / "sys")).root


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "etc/default").mkdir(parents=True)
    (r / "etc/default/grub").write_text(
        'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX="intel_iommu=on vfio-pci.ids=dead:beef"\n')
    return str(r)


def policy(root: str, text: str) -> None:
    os.makedirs(os.path.join(root, "etc/pcipass"), exist_ok=True)
    with open(os.path.join(root, boot.POLICY), "w") as f:
        f.write(text)


def read(root: str, rel: str) -> str:
    with open(os.path.join(root, rel)) as f:
        return f.read()


@pytest.mark.parametrize("text,want", [
    ("(02:0d.0)", ["0000:02:0d.0"]),
    ("(0000:02:0d.0)(03:00.0)", ["0000:02:0d.0", "0000:03:00.0"]),
    ("(1:02:1f.7) (AB:0.*)", ["0001:02:1f.7", "0000:ab:00.*"]),
])
def test_parse_hide(text, want):
    assert boot.parse_hide(text) == want


@pytest.mark.parametrize("text", ["", "02:0d.0", "(02:0d.8)", "(02:20.0)", "(02:0d.0", "(02:0d.0)x",
                                  "(12345:02:0d.0)", "(g2:0d.0)"])
def test_parse_hide_garbage_is_a_clear_error(text):
    with pytest.raises(UsageError) as e:
        boot.parse_hide(text)
    assert e.value.code == "bad-pciback-hide" and "(02:0d.0)" in e.value.hint


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F),
                          st.integers(0, 7)), min_size=1, max_size=6))
def test_format_then_parse_round_trips(items):
    bdfs = [f"{d:04x}:{b:02x}:{s:02x}.{f}" for d, b, s, f in items]
    assert boot.parse_hide(boot.format_hide(bdfs)) == bdfs


def test_policy_errors_name_the_line():
    with pytest.raises(PcipassError) as e:
        boot.parse_policy("mode vfio\nhide 0000:03:00.0\nhide zz\n")
    assert ":3:" in e.value.message and e.value.code == "bad-boot-policy"
    for bad in ("mode kvm", "hide 03:00.0 colour=red", "hide 03:00.0\nhide 0000:03:00.0", "hidden 03:00.0"):
        with pytest.raises(PcipassError):
            boot.parse_policy(bad)


def test_apply_vfio_ids_softdep_and_udev_for_twins(root, sysfs):
    policy(root, "# hide the NVMe and both edu functions behind the bridge\n"
                 "hide 03:00.0\nhide 0000:02:0d.0\nhide 0000:02:0d.1\n")
    out, changed = boot.apply(root, sysfs)
    assert changed == sorted([boot.GRUB_DEFAULT, boot.MODPROBE, boot.UDEV])
    grub = read(root, boot.GRUB_DEFAULT)
    # The standalone edu (0000:00:0a.0) is a twin the host keeps: edu goes by address, not by ID.
    assert 'GRUB_CMDLINE_LINUX="intel_iommu=on vfio-pci.ids=1b36:0010"\n' in grub
    assert 'GRUB_CMDLINE_LINUX_DEFAULT="quiet"' in grub and "dead:beef" not in grub
    assert "softdep nvme pre: vfio-pci\n" in read(root, boot.MODPROBE)
    rules = read(root, boot.UDEV)
    assert 'KERNEL=="0000:02:0d.0", ATTR{driver_override}="vfio-pci"' in rules
    assert 'KERNEL=="0000:02:0d.1"' in rules and "0000:00:0a.0" not in rules
    assert any("0000:00:0a.0" in n for n in out.notes)
    assert boot.apply(root, sysfs)[1] == []  # idempotent


def test_apply_all_edus_goes_by_id_and_drops_the_rules(root, sysfs):
    policy(root, "hide 02:0d.0\nhide 02:0d.1\n")
    boot.apply(root, sysfs)
    assert os.path.exists(os.path.join(root, boot.UDEV))
    policy(root, "hide 02:0d.0\nhide 02:0d.1\nhide 00:0a.0\n")
    _, changed = boot.apply(root, sysfs)
    assert boot.UDEV in changed and not os.path.exists(os.path.join(root, boot.UDEV))
    assert "vfio-pci.ids=1234:11e8" in read(root, boot.GRUB_DEFAULT)


def test_apply_xen_and_pciback_modes(root, sysfs):
    policy(root, "mode xen\nhide 03:00.0\nhide 02:0d.0\n")
    boot.apply(root, sysfs)
    grub = read(root, boot.GRUB_DEFAULT)
    assert 'GRUB_CMDLINE_LINUX="intel_iommu=on xen-pciback.hide=(0000:03:00.0)(0000:02:0d.0)"' in grub
    assert "softdep nvme pre: xen-pciback" in read(root, boot.MODPROBE)
    assert not os.path.exists(os.path.join(root, boot.UDEV))
    policy(root, "mode pciback\nhide 03:00.0\n")
    boot.apply(root, sysfs)
    assert 'GRUB_CMDLINE_LINUX="intel_iommu=on pciback.hide=(0000:03:00.0)"' in read(root, boot.GRUB_DEFAULT)


def test_empty_policy_removes_what_pcipass_owns(root, sysfs):
    policy(root, "hide 03:00.0\n")
    boot.apply(root, sysfs)
    policy(root, "")
    boot.apply(root, sysfs)
    assert 'GRUB_CMDLINE_LINUX="intel_iommu=on"' in read(root, boot.GRUB_DEFAULT)
    assert not os.path.exists(os.path.join(root, boot.MODPROBE))


def test_grub_without_the_line_and_single_quotes(tmp_path, sysfs):
    r = str(tmp_path / "r")
    policy(r, "hide 03:00.0\n")
    boot.apply(r, sysfs)
    assert read(r, boot.GRUB_DEFAULT) == 'GRUB_CMDLINE_LINUX="vfio-pci.ids=1b36:0010"\n'
    with open(os.path.join(r, boot.GRUB_DEFAULT), "w") as f:
        f.write("GRUB_CMDLINE_LINUX='a b'\n")
    boot.apply(r, sysfs)
    assert read(r, boot.GRUB_DEFAULT) == "GRUB_CMDLINE_LINUX='a b vfio-pci.ids=1b36:0010'\n"


def test_device_missing_from_sysfs_needs_ids(root, sysfs):
    policy(root, "hide 0000:07:00.0\n")
    with pytest.raises(PcipassError) as e:
        boot.apply(root, sysfs)
    assert e.value.code == "boot-unknown-device" and "ids=" in e.value.hint
    policy(root, "hide 0000:07:00.0 ids=10DE:1DB6 driver=nouveau\n")
    boot.apply(root, sysfs)
    assert "vfio-pci.ids=10de:1db6" in read(root, boot.GRUB_DEFAULT)
    assert "softdep nouveau pre: vfio-pci" in read(root, boot.MODPROBE)


def test_device_already_on_vfio_gets_its_driver_from_modules_alias(root, tmp_path):
    t = synthetic.seed_layout(str(tmp_path / "s2"))
    t.write("sys/bus/pci/devices/0000:03:00.0/driver_override", "vfio-pci\n")
    os.unlink(os.path.join(t.devices["0000:03:00.0"].path, "driver"))
    t.bind("0000:03:00.0", "vfio-pci")
    t.write("proc/sys/kernel/osrelease", "6.1.0-test\n")
    t.write("lib/modules/6.1.0-test/modules.alias",
            "alias pci:v*d*sv*sd*bc*sc*i* vfio_pci\nalias pci:v*d*sv*sd*bc01sc08i02* nvme\n")
    policy(root, "hide 03:00.0\n")
    boot.apply(root, t.root)
    assert "softdep nvme pre: vfio-pci" in read(root, boot.MODPROBE)


def test_check_follows_apply_and_the_boot_loader(root, sysfs):
    policy(root, "hide 03:00.0\nhide 02:0d.0\nhide 02:0d.1\n")
    data = boot.check(root, sysfs)
    assert not data["ok"] and "policy-not-applied" in [f["code"] for f in data["findings"]]
    boot.apply(root, sysfs)
    os.makedirs(os.path.join(root, "boot/grub"))
    with open(os.path.join(root, "boot/grub/grub.cfg"), "w") as f:
        f.write("menuentry 'Debian' {\n\tlinux /vmlinuz root=/dev/sda1 intel_iommu=on vfio-pci.ids=dead:beef\n}\n")
    data = boot.check(root, sysfs)
    codes = [f["code"] for f in data["findings"]]
    assert "grub-cfg-stale" in codes and not data["ok"]
    with open(os.path.join(root, "boot/grub/grub.cfg"), "w") as f:
        f.write("menuentry 'Debian' {\n\tlinux /vmlinuz intel_iommu=on vfio-pci.ids=1b36:0010\n}\n")
    data = boot.check(root, sysfs)
    assert data["ok"], data["findings"]
    nxt = {d["bdf"]: (d["now"], d["next_boot"]) for d in data["devices"]}
    assert nxt["0000:03:00.0"] == ("nvme", "vfio-pci")
    assert nxt["0000:02:0d.0"] == (None, "vfio-pci")
    assert "0000:00:0a.0" not in nxt  # the twin stays with the host
    assert [f["code"] for f in data["findings"]] == ["differs-now"] * 3


def test_check_flags_a_twin_an_id_wide_argument_would_catch(root, sysfs):
    with open(os.path.join(root, boot.GRUB_DEFAULT), "w") as f:
        f.write('GRUB_CMDLINE_LINUX="vfio-pci.ids=1234:11e8 xen-pciback.hide=(02:0d.0)junk"\n')
    policy(root, "hide 02:0d.0\n")
    data = boot.check(root, sysfs)
    codes = [f["code"] for f in data["findings"]]
    assert codes.count("twin-caught") == 2 and "bad-pciback-hide" in codes


def test_cli_boot_verbs(root, sysfs, capsys):
    policy(root, "hide 03:00.0\n")
    args = ["--root", root, "--sysfs", sysfs]
    assert main(["boot", "show", *args]) == 0
    out = capsys.readouterr().out
    assert "vfio-pci.ids=1b36:0010" in out and "apply would change" in out
    assert main(["boot", "apply", *args]) == 0
    assert "update-grub" in capsys.readouterr().out
    assert main(["boot", "apply", *args]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["boot", "check", "--json", *args]) == 0  # no grub.cfg under this root to disagree
    assert json.loads(capsys.readouterr().out)["schema"] == "pcipass/boot-check/1"


def test_udev_rule_takes_the_device_whoever_probed_it_first():
    rule = boot.udev_rule("0000:00:10.0")
    assert rule.startswith('ACTION=="add", SUBSYSTEM=="pci", KERNEL=="0000:00:10.0", '
                           'ATTR{driver_override}="vfio-pci", ') and rule.endswith("\n")
    # Loading vfio-pci binds it (at boot nothing else may load it); if a driver was quicker
    # than udevd, the device is taken from it and probed again (the lab proves both).
    assert 'RUN{builtin}+="kmod load vfio-pci"' in rule
    assert "echo %k > driver/unbind" in rule and "echo %k > /sys/bus/pci/drivers_probe" in rule
    assert "$" not in rule  # udev would substitute it
    assert rule.count("\n") == 1
