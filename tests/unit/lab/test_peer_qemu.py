"""pcipass.lab.peer_qemu without the network: reading a Packages index and the closure of Depends."""

from __future__ import annotations

import pytest

from pcipass.errors import PcipassError
from pcipass.lab import peer_qemu

BACKPORTS = """\
Package: qemu-system-x86
Version: 1:11.1.3+ds-1~bpo13+1
Depends: libc6 (>= 2.38), libfoo1 | libfoo-alt, seabios (>> 1.17.0-1~),
 qemu-system-common (= 1:11.1.3+ds-1~bpo13+1), debconf | debconf-2.0
Filename: pool/main/q/qemu/qemu-system-x86_11.1.3+ds-1~bpo13+1_amd64.deb
SHA256: aa

Package: qemu-system-common
Version: 1:11.1.3+ds-1~bpo13+1
Depends: libc6, libbar0:any
Filename: pool/main/q/qemu/qemu-system-common_11.1.3+ds-1~bpo13+1_amd64.deb
SHA256: bb

Package: seabios
Version: 1.17.0-1~bpo13+1
Filename: pool/main/s/seabios/seabios_1.17.0-1~bpo13+1_all.deb
SHA256: cc
"""

TRIXIE = """\
Package: libc6
Version: 2.41-12
Pre-Depends: libgcc-s1
Filename: pool/main/g/glibc/libc6_2.41-12_amd64.deb
SHA256: dd

Package: libgcc-s1
Version: 14.2.0-19
Depends: gcc-14-base, libc6
Filename: pool/main/g/gcc-14/libgcc-s1_14.2.0-19_amd64.deb
SHA256: ee

Package: gcc-14-base
Version: 14.2.0-19
Filename: pool/main/g/gcc-14/gcc-14-base_14.2.0-19_amd64.deb
SHA256: ff

Package: libfoo-alt
Version: 1
Filename: pool/main/f/foo/libfoo-alt_1_amd64.deb
SHA256: 11

Package: libbar0
Version: 1
Filename: pool/main/b/bar/libbar0_1_amd64.deb
SHA256: 22

Package: seabios
Version: 1.16.3-2
Filename: pool/main/s/seabios/seabios_1.16.3-2_all.deb
SHA256: 33

Package: debconf
Version: 1.5.91
Filename: pool/main/d/debconf/debconf_1.5.91_all.deb
SHA256: 44
"""


def test_an_index_gives_files_hashes_and_dependency_alternatives():
    index = peer_qemu.parse_index(BACKPORTS)
    qemu = index["qemu-system-x86"]
    assert qemu.sha256 == "aa" and qemu.filename.endswith("_amd64.deb")
    # Versions and architecture qualifiers dropped, continuation lines joined, alternatives kept in order.
    assert qemu.depends == (("libc6",), ("libfoo1", "libfoo-alt"), ("seabios",), ("qemu-system-common",),
                            ("debconf", "debconf-2.0"))
    assert index["qemu-system-common"].depends == (("libc6",), ("libbar0",))


def test_the_closure_takes_backports_first_the_first_existing_alternative_and_libraries_only():
    indexes = [peer_qemu.parse_index(BACKPORTS), peer_qemu.parse_index(TRIXIE)]
    chosen = {p.name: p for p in peer_qemu.closure(indexes)}
    # libgcc-s1 through libc6's Pre-Depends; gcc-14-base and debconf are not libraries.
    assert sorted(chosen) == ["libbar0", "libc6", "libfoo-alt", "libgcc-s1", "qemu-system-common",
                              "qemu-system-x86", "seabios"]
    assert chosen["seabios"].version == "1.17.0-1~bpo13+1"


def test_another_qemu_version_in_backports_is_refused_before_any_download(monkeypatch):
    monkeypatch.setattr(peer_qemu, "VERSION", "10.1")
    with pytest.raises(PcipassError, match="not 10.1") as info:
        peer_qemu.closure([peer_qemu.parse_index(BACKPORTS)])
    assert "VERSION" in (info.value.hint or "")


def test_the_command_runs_qemu_through_the_prefixs_own_loader(tmp_path):
    for d in ("usr/lib/x86_64-linux-gnu", "usr/share/qemu", "usr/share/seabios"):
        (tmp_path / d).mkdir(parents=True)
    cmd = peer_qemu.PeerQemu(tmp_path).command("--version")
    assert cmd[:3] == [str(tmp_path / peer_qemu.LOADER), "--library-path", str(tmp_path / "usr/lib/x86_64-linux-gnu")]
    assert cmd[3] == str(tmp_path / peer_qemu.BINARY)
    assert cmd[4:] == ["-L", str(tmp_path / "usr/share/qemu"), "-L", str(tmp_path / "usr/share/seabios"), "--version"]


def test_missing_prefix_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("PCIPASS_LAB_CACHE", str(tmp_path))
    assert peer_qemu.find() is None
    with pytest.raises(PcipassError) as info:
        peer_qemu.require()
    assert "pcipass lab peer-qemu" in (info.value.hint or "")
