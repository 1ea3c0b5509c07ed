"""`pcipass list | groups | check | snapshot` over synthetic trees, text and --json."""

from __future__ import annotations

import json
import os

import pytest

from pcipass.cli import main
from pcipass.host.fixtures import synthetic


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def test_list_json_schema_and_fields(capsys, seed_tree):
    code, doc = run_json(capsys, "list", "--sysfs", seed_tree.root)
    assert code == 0 and doc["schema"] == "pcipass/list/1"
    assert doc["iommu"] == {"enabled": True, "units": ["dmar0"], "groups": 9, "cmdline": ["intel_iommu=on"]}
    devs = {d["bdf"]: d for d in doc["devices"]}
    assert len(devs) == 11
    nvme = devs["0000:03:00.0"]
    assert nvme["vendor_id"] == "1b36" and nvme["device_id"] == "0010"
    assert nvme["subsystem_vendor_id"] == "1af4" and nvme["subsystem_device_id"] == "1100"
    assert nvme["class"] == "010802" and nvme["driver"] == "nvme" and nvme["iommu_group"] == 4
    assert nvme["kind"] == "endpoint" and nvme["pcie_type"] == "endpoint" and nvme["parent"] == "0000:00:0b.0"
    assert nvme["reset_methods"] == ["flr", "bus"] and nvme["numa_node"] is None
    assert nvme["capabilities"] == ["pm", "msi", "exp"]
    assert devs["0000:01:00.0"]["kind"] == "bridge" and devs["0000:01:00.0"]["pcie_type"] == "pcie-to-pci-bridge"
    assert devs["0000:00:02.0"]["boot_vga"] is True


def test_list_names_come_from_pci_ids(capsys, seed_tree, tmp_path):
    ids = tmp_path / "pci.ids"
    ids.write_text("1b36  Red Hat, Inc.\n\t0010  QEMU NVM Express Controller\n\t\t1af4 1100  QEMU Virtual Machine\n"
                   "1af4  Red Hat, Inc.\n\nC 01  Mass storage controller\n\t08  Non-Volatile memory controller\n"
                   "\t\t02  NVM Express\n")
    _, doc = run_json(capsys, "list", "--sysfs", seed_tree.root, "--pci-ids", str(ids))
    nvme = next(d for d in doc["devices"] if d["bdf"] == "0000:03:00.0")
    assert (nvme["vendor"], nvme["device"], nvme["subsystem"]) == ("Red Hat, Inc.", "QEMU NVM Express Controller",
                                                                   "QEMU Virtual Machine")
    assert (nvme["class_name"], nvme["subclass_name"], nvme["prog_if_name"]) == (
        "Mass storage controller", "Non-Volatile memory controller", "NVM Express")
    edu = next(d for d in doc["devices"] if d["bdf"] == "0000:00:0a.0")
    assert edu["vendor"] is None and edu["device"] is None
    code, out, _ = run(capsys, "list", "--sysfs", seed_tree.root, "--pci-ids", str(ids))
    assert code == 0 and "QEMU NVM Express Controller" in out and "0000:02:0d.1" in out


def test_list_sriov_links(capsys, tmp_path):
    t = synthetic.sriov(str(tmp_path), vfs=2)
    _, doc = run_json(capsys, "list", "--sysfs", t.root)
    devs = {d["bdf"]: d for d in doc["devices"]}
    assert devs["0000:01:00.0"]["sriov"] == {"physfn": None, "virtfns": ["0000:01:02.0", "0000:01:02.1"],
                                             "vf_groups": [2, 3], "totalvfs": 64, "numvfs": 2}
    assert devs["0000:01:02.1"]["sriov"]["physfn"] == "0000:01:00.0"
    _, out, _ = run(capsys, "list", "--sysfs", t.root)
    assert "(2 VFs, groups 2, 3)" in out and "(VF of 0000:01:00.0)" in out


def test_check_shows_pf_to_vf_links_and_judges_a_vf_as_itself(capsys, tmp_path):
    t = synthetic.sriov(str(tmp_path), vfs=2)
    code, doc = run_json(capsys, "check", "01:02.1", "--sysfs", t.root)
    v = doc["verdict"]
    assert code == 0 and v["bdf"] == "0000:01:02.1" and v["iommu_group"] == 3
    assert [m["bdf"] for m in v["members"]] == ["0000:01:02.1"]  # the VF's own group, not the PF's
    assert v["sriov"] == {"physfn": {"bdf": "0000:01:00.0", "driver": "i40e", "iommu_group": 1}, "vfs": []}
    [vf] = [r for r in v["reasons"] if r["code"] == "sriov-vf"]
    assert vf["details"]["physfn_group"] == 1 and vf["details"]["vf_token"] is False
    code, doc = run_json(capsys, "check", "01:00.0", "--sysfs", t.root)
    assert doc["verdict"]["sriov"]["vfs"] == [{"bdf": "0000:01:02.0", "driver": "iavf", "iommu_group": 2},
                                              {"bdf": "0000:01:02.1", "driver": "iavf", "iommu_group": 3}]
    [pf] = [r for r in doc["verdict"]["reasons"] if r["code"] == "sriov-pf-with-vfs"]
    assert "pcipass sriov 0000:01:00.0 --vfs 0" in pf["hint"] and pf["details"]["groups"] == [2, 3]
    _, out, _ = run(capsys, "check", "01:02.0", "--sysfs", t.root)
    assert "SR-IOV: a virtual function of 0000:01:00.0 (driver i40e, IOMMU group 1)" in out
    _, out, _ = run(capsys, "check", "01:00.0", "--sysfs", t.root)
    assert "SR-IOV: 2 virtual functions:" in out and "0000:01:02.1  iavf        IOMMU group 3" in out
    # A VF whose PF is on vfio-pci needs the PF user's VF token to be opened: check says so.
    from pcipass.host.transaction.simulated import SimulatedKernel

    w = SimulatedKernel(t.root)
    w.unbind("0000:01:00.0")
    w.override_set("0000:01:00.0", "vfio-pci")
    w.modprobe(None, "vfio-pci")
    w.probe("0000:01:00.0")
    _, doc = run_json(capsys, "check", "01:02.0", "--sysfs", t.root)
    [vf] = [r for r in doc["verdict"]["reasons"] if r["code"] == "sriov-vf"]
    assert vf["details"]["vf_token"] is True and "VF token" in vf["message"]


def test_list_says_when_the_iommu_is_off(capsys, tmp_path):
    t = synthetic.seed_layout(str(tmp_path), iommu=False)
    code, out, _ = run(capsys, "list", "--sysfs", t.root)
    assert code == 0 and "IOMMU is off" in out
    code, out, _ = run(capsys, "groups", "--sysfs", t.root)
    assert code == 0 and "no IOMMU groups" in out


def test_groups_json(capsys, seed_tree):
    code, doc = run_json(capsys, "groups", "--sysfs", seed_tree.root)
    assert code == 0 and doc["schema"] == "pcipass/groups/1"
    g2 = next(g for g in doc["groups"] if g["group"] == 2)
    assert [m["bdf"] for m in g2["members"]] == ["0000:01:00.0", "0000:02:0d.0", "0000:02:0d.1"]
    assert g2["ok"] is True
    assert any(r["code"] == "behind-pcie-to-pci-bridge" and r["device"] == "0000:01:00.0" for r in g2["reasons"])
    g1 = next(g for g in doc["groups"] if g["group"] == 1)
    assert g1["ok"] is False and g1["reasons"][0]["code"] == "boot-vga"


def test_groups_text_one_line_a_group_and_all_with_verbose(capsys, seed_tree):
    code, out, _ = run(capsys, "groups", "--sysfs", seed_tree.root)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["GROUP", "VERDICT", "DEVICES"]
    assert len(lines) == 1 + len(os.listdir(os.path.join(seed_tree.root, "sys/kernel/iommu_groups")))
    row = {line.split()[0]: line for line in lines[1:]}
    assert row["2"].split()[1:5] == ["ok", "0000:01:00.0", "0000:02:0d.0", "0000:02:0d.1"]
    assert row["1"].split()[1] == "blocked" and "[boot-vga]" in row["1"]
    code, out, _ = run(capsys, "groups", "-v", "--sysfs", seed_tree.root)
    assert code == 0 and "group 2: ok, 3 devices" in out and "group 1: blocked" in out and "what to do" in out


def test_check_ok_and_blocked_exit_codes(capsys, seed_tree):
    code, out, _ = run(capsys, "check", "02:0d.0", "--sysfs", seed_tree.root)
    assert code == 0 and "0000:01:00.0" in out and "can be passed through together with 0000:02:0d.1" in out
    code, out, _ = run(capsys, "check", "01:00.0", "--sysfs", seed_tree.root)
    assert code == 1 and "[is-bridge]" in out and "what to do" in out


def test_check_json(capsys, tmp_path):
    t = synthetic.switch_without_acs(str(tmp_path))
    code, doc = run_json(capsys, "check", "0000:03:00.0", "--sysfs", t.root)
    assert code == 0 and doc["schema"] == "pcipass/check/1"
    v = doc["verdict"]
    assert v["bdf"] == "0000:03:00.0" and v["ok"] is True and v["iommu_group"] == 2
    acs = next(r for r in v["reasons"] if r["code"] == "upstream-port-without-acs")
    assert acs["severity"] == "warning" and acs["details"]["missing"] == "RR CR"


def test_check_unknown_and_malformed(capsys, seed_tree):
    code, doc = run_json(capsys, "check", "07:00.0", "--sysfs", seed_tree.root)
    assert code == 1 and doc["verdict"]["reasons"][0]["code"] == "unknown-bdf"
    code, out, _ = run(capsys, "check", "07:00.0", "--sysfs", seed_tree.root)
    assert code == 1 and "pcipass list" in out
    code, _, err = run(capsys, "check", "bogus", "--sysfs", seed_tree.root)
    assert code == 2 and "hint" in err


def test_bad_sysfs_root(capsys, tmp_path):
    code, _, err = run(capsys, "list", "--sysfs", str(tmp_path))
    assert code == 1 and "sys/bus/pci/devices" in err


@pytest.mark.parametrize("layout", ["seed_layout", "switch_without_acs", "sriov", "multifunction_without_acs"])
def test_snapshot_round_trip(capsys, tmp_path, layout):
    t = getattr(synthetic, layout)(str(tmp_path / "src"))
    if layout == "seed_layout":
        t.add_block("nvme1n1", "03:00.0", partitions=("nvme1n1p1",), holders=("dm-3",))
        t.mount("/dev/nvme1n1p1", "/data")
    out = str(tmp_path / "snap")
    code, manifest = run_json(capsys, "snapshot", out, "--sysfs", t.root)
    assert code == 0 and manifest["schema"] == "pcipass/snapshot/1" and manifest["devices"] == len(t.devices)
    for verb in (["list"], ["groups"]):
        _, a = run_json(capsys, *verb, "--sysfs", t.root)
        _, b = run_json(capsys, *verb, "--sysfs", out)
        a.pop("sysfs_root"), b.pop("sysfs_root")
        assert a == b
    for bdf in t.devices:
        _, a = run_json(capsys, "check", bdf, "--sysfs", t.root)
        _, b = run_json(capsys, "check", bdf, "--sysfs", out)
        assert a["verdict"] == b["verdict"]


def test_snapshot_keeps_only_what_is_read(capsys, tmp_path):
    t = synthetic.seed_layout(str(tmp_path / "src"))
    open(os.path.join(t.devices["0000:03:00.0"].path, "resource0"), "w").write("BAR")
    open(t.p("proc/secret"), "w").write("x")
    out = str(tmp_path / "snap")
    run(capsys, "snapshot", out, "--sysfs", t.root)
    files = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    assert not any(f.endswith("resource0") for f in files) and "proc/secret" not in files
    assert "proc/cmdline" in files


def test_snapshot_refuses_a_non_empty_directory(capsys, seed_tree, tmp_path):
    out = tmp_path / "snap"
    out.mkdir()
    (out / "keep").write_text("mine")
    code, _, err = run(capsys, "snapshot", str(out), "--sysfs", seed_tree.root)
    assert code == 1 and "not empty" in err
    assert os.listdir(out) == ["keep"]


def test_snapshot_lspci_reads_it(capsys, seed_tree, tmp_path):
    import shutil
    import subprocess

    if not shutil.which("lspci"):
        pytest.skip("pciutils (lspci) is not installed")
    out = str(tmp_path / "snap")
    run(capsys, "snapshot", out, "--sysfs", seed_tree.root)
    res = subprocess.run(["lspci", "-n", "-D", "-A", "linux-sysfs", "-O", f"sysfs.path={out}/sys/bus/pci"],
                         capture_output=True, text=True, check=True)
    assert "0000:03:00.0 0108: 1b36:0010" in res.stdout
    assert len(res.stdout.splitlines()) == 11


def test_snapshot_of_a_xen_dom0_keeps_xens_boot_log(capsys, tmp_path):
    t = synthetic.seed_layout(str(tmp_path / "src"), iommu=False)
    t.xen_dom0()
    t.write("var/log/xen/console/hypervisor.log", "(XEN) Intel VT-d ... \n(XEN) I/O virtualisation enabled\n")
    out = str(tmp_path / "snap")
    run(capsys, "snapshot", out, "--sysfs", t.root)
    _, a = run_json(capsys, "check", "02:0d.0", "--sysfs", t.root)
    _, b = run_json(capsys, "check", "02:0d.0", "--sysfs", out)
    assert a["verdict"] == b["verdict"]
    assert "xen-iommu-on" in [r["code"] for r in b["verdict"]["reasons"]]


def test_snapshot_keeps_which_iommu_the_firmware_describes(capsys, tmp_path):
    t = synthetic.seed_layout(str(tmp_path / "src"), iommu=False)
    t.write("proc/cpuinfo", "vendor_id\t: AuthenticAMD\n")
    t.write("sys/firmware/acpi/tables/DMAR", "DMAR\x00binary")
    out = str(tmp_path / "snap")
    run(capsys, "snapshot", out, "--sysfs", t.root)
    assert os.path.getsize(os.path.join(out, "sys/firmware/acpi/tables/DMAR")) == 0  # only that it exists
    _, b = run_json(capsys, "check", "00:0a.0", "--sysfs", out)
    [off] = [r for r in b["verdict"]["reasons"] if r["code"] == "iommu-off"]
    assert off["details"]["kernel_arg"] == "intel_iommu=on"
