"""config xl / qemu / libvirt; libvirt's XML checked by libvirt's own virt-xml-validate."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess

import pytest

from pcipass.cli import main
from pcipass.errors import PcipassError, UsageError
from pcipass.host.fixtures import synthetic
from pcipass.host.model.sysfs import Host
from pcipass.host.present import config


@pytest.fixture
def tree(tmp_path):
    t = synthetic.seed_layout(str(tmp_path / "seed"))
    # A GPU with its audio function: a two-function device on a root port.
    t.add("0000:05:00.0", 0x10DE, 0x1DB6, 0x030000, parent="0000:00:0c.0", driver="nouveau", group=9,
          multifunction=True)
    t.add("0000:05:00.1", 0x10DE, 0x10F2, 0x040300, parent="0000:00:0c.0", driver="snd_hda_intel", group=9)
    return t


def test_placement_keeps_functions_together():
    p = config.place(["02:0d.1", "03:00.0", "02:0d.0"], 0x10)
    got = [(str(x.host), x.slot, x.function, x.multifunction) for x in p]
    assert got == [("0000:02:0d.0", 0x10, 0, True), ("0000:02:0d.1", 0x10, 1, False),
                   ("0000:03:00.0", 0x11, 0, False)]
    # Without function 0 the functions are renumbered from 0, so the guest sees the slot.
    p = config.place(["05:00.2", "05:00.3"], 0x10)
    assert [(x.function, x.multifunction) for x in p] == [(0, True), (1, False)]


def test_placement_refusals():
    for bad in ([], ["02:0d.0", "0000:02:0d.0"], ["nonsense"]):
        with pytest.raises(UsageError):
            config.place(bad, 0x10)
    with pytest.raises(UsageError):
        config.place(["02:0d.0", "03:00.0"], 0x1F)  # the second slot would be 0x20


def test_xl_line_with_every_option(tree):
    line = config.xl(["03:00.0", "05:00.0", "05:00.1"], host=Host(tree.root), vslot=0x1d, permissive=True,
                     msitranslate=False, seize=True, power_mgmt=True, rdm_policy="relaxed")
    assert line == ("pci = [ '0000:03:00.0,vslot=1d,permissive=1,msitranslate=0,seize=1,power_mgmt=1,"
                    "rdm_policy=relaxed', '0000:05:00.*,vslot=1e,permissive=1,msitranslate=0,seize=1,"
                    "power_mgmt=1,rdm_policy=relaxed' ]")
    assert config.xl(["03:00.0"]) == "pci = [ '0000:03:00.0' ]"


def test_xl_refuses_a_subset_of_a_multifunction_device_and_bad_policy(tree):
    tree.add("0000:05:00.2", 0x10DE, 0x1AD8, 0x0C0330, parent="0000:00:0c.0", group=9)
    with pytest.raises(UsageError) as e:
        config.xl(["05:00.0", "05:00.1"], host=Host(tree.root))
    assert "0000:05:00.2" in e.value.message
    with pytest.raises(UsageError):
        config.xl(["05:00.0"], rdm_policy="loose")


def test_qemu_arguments(tree):
    args = config.qemu(["05:00.1", "05:00.0", "0000:03:00.0"], first_slot=0x8)
    assert args == [
        "-device", "vfio-pci,host=0000:05:00.0,id=hostdev0,bus=pcie.0,addr=0x08.0,multifunction=on",
        "-device", "vfio-pci,host=0000:05:00.1,id=hostdev1,bus=pcie.0,addr=0x08.1",
        "-device", "vfio-pci,host=0000:03:00.0,id=hostdev2,bus=pcie.0,addr=0x09.0",
    ]
    with pytest.raises(UsageError):
        config.qemu(["03:00.0"], bus="pcie.0,x=1")


def test_libvirt_elements():
    xml = config.libvirt(["02:0d.0", "02:0d.1"], managed=False)
    assert xml.count("<hostdev mode='subsystem' type='pci' managed='no'>") == 2
    assert "<address domain='0x0000' bus='0x02' slot='0x0d' function='0x1'/>" in xml
    assert "slot='0x10' function='0x0' multifunction='on'/>" in xml
    assert "slot='0x10' function='0x1'/>" in xml


VALIDATE = shutil.which("virt-xml-validate")


@pytest.mark.skipif(VALIDATE is None or shutil.which("xmllint") is None,
                    reason="virt-xml-validate needs: apt-get install libvirt-clients libxml2-utils")
@pytest.mark.parametrize("managed,driver", [(True, "vfio"), (False, "vfio"), (True, "xen")])
def test_libvirt_domain_is_valid_for_libvirt(tmp_path, managed, driver):
    doc = config.libvirt_domain(config.libvirt(["0000:02:0d.0", "0000:02:0d.1", "0000:03:00.0"],
                                               managed=managed, driver=driver), kind="kvm" if driver == "vfio" else "xen")
    path = tmp_path / "domain.xml"
    path.write_text(doc)
    p = subprocess.run([VALIDATE, str(path), "domain"], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    # The check can fail: a hostdev without its source is refused.
    path.write_text(doc.replace("<source>", "<sourcex>").replace("</source>", "</sourcex>"))
    assert subprocess.run([VALIDATE, str(path), "domain"], capture_output=True, check=False).returncode != 0


@pytest.mark.skipif(VALIDATE is None or shutil.which("xmllint") is None,
                    reason="virt-xml-validate needs: apt-get install libvirt-clients libxml2-utils")
def test_cli_whole_domain_with_direct_kernel_boot_is_valid_for_libvirt(tree, tmp_path, capsys):
    assert main(["config", "libvirt", "03:00.0", "--managed", "no", "--domain", "tiny", "--domain-type", "qemu",
                 "--memory", "128", "--kernel", "/boot/vmlinuz", "--initrd", "/tmp/init.cpio",
                 "--cmdline", "console=ttyS0 quiet", "--console-log", "/tmp/console.log",
                 "--sysfs", tree.root]) == 0
    doc = capsys.readouterr().out
    assert doc.startswith('<domain type="qemu">') and doc.rstrip().endswith("</domain>")
    for part in ("<memory unit='MiB'>128</memory>", "<kernel>/boot/vmlinuz</kernel>",
                 "<initrd>/tmp/init.cpio</initrd>", "<cmdline>console=ttyS0 quiet</cmdline>",
                 '<source path="/tmp/console.log"/>', "managed='no'",
                 "<address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>"):
        assert part in doc, part
    path = tmp_path / "tiny.xml"
    path.write_text(doc)
    p = subprocess.run([VALIDATE, str(path), "domain"], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    # Without a console file: a pty, for virsh console; the default type is kvm.
    assert main(["config", "libvirt", "03:00.0", "--domain", "g", "--sysfs", tree.root]) == 0
    doc = capsys.readouterr().out
    assert doc.startswith('<domain type="kvm">') and "<serial type='pty'/>" in doc and "<kernel>" not in doc


def test_cli_whole_domain_paths_made_absolute(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "libvirt", "03:00.0", "--domain", "g", "--kernel", "vmlinuz", "--sysfs", tree.root]) == 0
    assert f"<kernel>{tmp_path}/vmlinuz</kernel>" in capsys.readouterr().out


@pytest.mark.parametrize("args,says", [
    (["--memory", "128"], "add --domain NAME"),
    (["--domain", "g", "--initrd", "/i"], "--kernel PATH"),
    (["--domain", "g", "--memory", "0"], "MiB"),
])
def test_cli_whole_domain_bad_flags_refused(tree, capsys, args, says):
    assert main(["config", "libvirt", "03:00.0", *args, "--sysfs", tree.root]) != 0
    out = capsys.readouterr()
    assert out.out == "" and says in out.err


def test_libvirt_domain_refuses_relative_paths_and_unknown_types():
    with pytest.raises(UsageError, match="absolute"):
        config.libvirt_domain("", kernel="vmlinuz")
    with pytest.raises(UsageError, match="domain type"):
        config.libvirt_domain("", kind="lxc")


def test_cli_config(tree, capsys):
    assert main(["config", "xl", "03:00.0", "--seize", "--no-permissive", "--sysfs", tree.root]) == 0
    assert capsys.readouterr().out == "pci = [ '0000:03:00.0,permissive=0,seize=1' ]\n"
    assert main(["config", "qemu", "02:0d.0", "02:0d.1", "--slot", "1a", "--json", "--sysfs", tree.root]) == 0
    assert json.loads(capsys.readouterr().out)["args"][1].endswith("addr=0x1a.0,multifunction=on")
    assert main(["config", "libvirt", "03:00.0", "--domain", "g1", "--sysfs", tree.root]) == 0
    assert "<name>g1</name>" in capsys.readouterr().out
    assert main(["config", "qemu", "0000:09:00.0", "--sysfs", tree.root]) == 1  # unknown device
    assert "no PCI device 0000:09:00.0" in capsys.readouterr().err


def test_cli_unknown_device_is_refused(tree):
    with pytest.raises(PcipassError) as e:
        import argparse

        from pcipass.host.present import cli_changes
        cli_changes.cmd_config(argparse.Namespace(sysfs=tree.root, bdfs=["0000:09:00.0"], consumer="xl"))
    assert e.value.code == "unknown-bdf"


def test_config_qemu_says_on_stderr_what_is_not_ready_and_the_command_that_fixes_it(tree, capsys):
    # Not claimed: QEMU could not open it.
    assert main(["config", "qemu", "03:00.0", "--sysfs", tree.root]) == 0
    out, err = capsys.readouterr()
    assert out == "-device vfio-pci,host=0000:03:00.0,id=hostdev0,bus=pcie.0,addr=0x10.0\n"  # as ever
    assert err == ("warning: 0000:03:00.0 is not claimed (driver nvme, not vfio-pci): QEMU cannot open it; "
                   "run pcipass claim 0000:03:00.0\n")
    # Claimed, but only part of its group named: the command that names the whole group.
    for bdf in ("0000:02:0d.0", "0000:02:0d.1", "0000:03:00.0"):
        tree.bind(bdf, "vfio-pci")
    assert main(["config", "qemu", "02:0d.1", "--sysfs", tree.root]) == 0
    out, err = capsys.readouterr()
    assert out == "-device vfio-pci,host=0000:02:0d.1,id=hostdev0,bus=pcie.0,addr=0x10.0\n"
    assert err.splitlines() == [
        "warning: the VM gets only part of IOMMU group 2: 0000:02:0d.0 is not named",
        "warning: to give it the whole group: pcipass config qemu 0000:02:0d.1 0000:02:0d.0",
    ]
    # The whole group (the bridge stays on the host) and another, all claimed: nothing to say.
    assert main(["config", "qemu", "02:0d.0", "02:0d.1", "03:00.0", "--sysfs", tree.root]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    # One line: pasted, or as $(pcipass config qemu ...), the shell splits it into QEMU's arguments.
    assert out.count("\n") == 1 and shlex.split(out) == config.qemu(["02:0d.0", "02:0d.1", "03:00.0"])


def test_vfio_warnings_name_each_group_once_and_xen_claims(tree):
    host = Host(tree.root)
    tree.bind("0000:02:0d.0", "pciback")
    tree.bind("0000:02:0d.1", "pciback")
    got = config.vfio_warnings(Host(tree.root), ["02:0d.0", "02:0d.1", "05:00.0"])
    assert got == [
        "0000:02:0d.0 is claimed for Xen (pciback), not VFIO: run pcipass release 0000:02:0d.0 "
        "&& pcipass claim 0000:02:0d.0 --for vfio",
        "0000:05:00.0 is not claimed (driver nouveau, not vfio-pci): QEMU cannot open it; "
        "run pcipass claim 0000:05:00.0",
        "the VM gets only part of IOMMU group 9: 0000:05:00.1 is not named",
        "to give it the whole group: pcipass config qemu 0000:02:0d.0 0000:02:0d.1 0000:05:00.0 0000:05:00.1",
    ]
    assert host.device("03:00.0").driver == "nvme"  # nothing changed
