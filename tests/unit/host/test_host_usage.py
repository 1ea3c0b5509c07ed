"""Disks and interfaces the host uses, from /proc files in the kernel's formats."""

from __future__ import annotations

from pcipass.host.fixtures import synthetic
from pcipass.host.model.sysfs import Host
from pcipass.host.model.usage import HostUse, pci_function_of


def test_pci_function_is_the_last_address_in_the_path():
    path = "/sys/devices/pci0000:00/0000:00:0b.0/0000:03:00.0/nvme/nvme0/nvme0n1"
    assert pci_function_of(path) == "0000:03:00.0"
    assert pci_function_of("/sys/devices/virtual/block/loop0") is None


def test_ipv6_link_local_is_not_an_address_and_routes_are_parsed(tmp_path):
    t = synthetic.seed_layout(str(tmp_path))
    t.write("proc/net/if_inet6",
            "fe80000000000000505400fffe123456 02 40 20 80 enp4s0\n"
            "20010db8000000000000000000000001 02 40 00 80 enp4s0\n"
            "00000000000000000000000000000001 01 80 10 80 lo\n")
    t.write("proc/net/ipv6_route",
            "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 "
            "00000000000000000000000000000000 00000100 00000001 00000000 00000001 enp4s0\n"
            "20010db8000000000000000000000000 40 00000000000000000000000000000000 00 "
            "00000000000000000000000000000000 00000100 00000001 00000000 00000001 enp4s0\n")
    use = HostUse(Host(t.root))
    [nic] = use.net["0000:04:00.0"]
    assert nic.addresses == ["2001:db8::1/64"]
    assert nic.routes == ["2001:db8::/64"]
    assert not nic.in_use  # down
    assert "2001:db8::1/64" in nic.describe()


def test_mount_points_with_spaces_and_partitions(tmp_path):
    t = synthetic.seed_layout(str(tmp_path))
    t.add_block("nvme1n1", "03:00.0", partitions=("nvme1n1p1",))
    t.mount("/dev/nvme1n1p1", "/mnt/my\\040disk")
    disks = {b.disk: b for b in HostUse(Host(t.root)).block["0000:03:00.0"]}
    assert disks["nvme1n1"].mounts == [("/dev/nvme1n1p1", "/mnt/my disk")] and disks["nvme1n1"].in_use
    assert not disks["nvme0n1"].in_use
