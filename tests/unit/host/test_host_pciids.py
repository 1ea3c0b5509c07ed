"""The pci.ids parser, on a small file written here and on the system's database."""

from __future__ import annotations

import os

import pytest

from pcipass.host.model.pciids import PciIds

SAMPLE = b"""#
#\tList of PCI ID's
#
0001  SafeNet (wrong ID)
1234  Technical Corp.
# a comment inside a vendor
\t1111  QEMU Virtual Video Controller
\t\t1af4 1100  QEMU Virtual Machine
\t11e8  Education device
1b36  Red Hat, Inc.
\t0010  QEMU NVM Express Controller
\t\t1af4 1100  QEMU Virtual Machine
ffff  Illegal Vendor ID

# List of known device classes, subclasses and programming interfaces

C 01  Mass storage controller
\t08  Non-Volatile memory controller
\t\t01  NVMHCI
\t\t02  NVM Express
C 06  Bridge
\t04  PCI bridge
\t\t00  Normal decode
"""


@pytest.fixture
def ids():
    return PciIds(data=SAMPLE)


def test_vendor_device_subsystem(ids):
    assert ids.vendor(0x1234) == "Technical Corp."
    assert ids.vendor(0x0001) == "SafeNet (wrong ID)"
    assert ids.vendor(0xFFFF) == "Illegal Vendor ID"
    assert ids.device(0x1234, 0x11E8) == "Education device"
    assert ids.device(0x1B36, 0x0010) == "QEMU NVM Express Controller"
    assert ids.subsystem(0x1B36, 0x0010, 0x1AF4, 0x1100) == "QEMU Virtual Machine"


def test_unknown_ids_are_none(ids):
    assert ids.vendor(0x4242) is None
    assert ids.device(0x1234, 0x4242) is None
    assert ids.device(0x4242, 0x0001) is None
    assert ids.subsystem(0x1234, 0x11E8, 0x1AF4, 0x1100) is None
    assert ids.pci_class(0xFF0000) == (None, None, None)


def test_vendor_line_of_a_class_code_is_not_a_vendor(ids):
    # "C 01" must not be found as vendor 0x0c01 or similar; classes live apart.
    assert ids.vendor(0x0C01) is None


def test_classes(ids):
    assert ids.pci_class(0x010802) == ("Mass storage controller", "Non-Volatile memory controller", "NVM Express")
    assert ids.pci_class(0x010803) == ("Mass storage controller", "Non-Volatile memory controller", None)
    assert ids.pci_class(0x017700) == ("Mass storage controller", None, None)
    assert ids.class_name(0x060400) == "PCI bridge"
    assert ids.class_name(0x010000) == "Mass storage controller"


def test_missing_database_gives_no_names(tmp_path):
    ids = PciIds(str(tmp_path / "nope"))
    assert not ids.available and ids.vendor(0x8086) is None and ids.class_name(0x020000) is None


def test_gzipped_database(tmp_path):
    import gzip

    path = tmp_path / "pci.ids.gz"
    path.write_bytes(gzip.compress(SAMPLE))
    assert PciIds(str(path)).device(0x1234, 0x11E8) == "Education device"


@pytest.mark.skipif(not os.path.exists("/usr/share/misc/pci.ids"), reason="Debian's pci.ids package is not installed")
def test_system_database_knows_the_lab_devices():
    ids = PciIds("/usr/share/misc/pci.ids")
    assert ids.vendor(0x1B36) == "Red Hat, Inc."
    assert ids.device(0x1B36, 0x0010) == "QEMU NVM Express Controller"
    assert ids.device(0x8086, 0x10D3) == "82574L Gigabit Network Connection"
    assert ids.class_name(0x020000) == "Ethernet controller"
