"""The journal (atomic, durable records) and the group lock (flock, names its holder)."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from pcipass.errors import PcipassError
from pcipass.host.transaction.journal import (
    CLAIM,
    IN_PROGRESS,
    DeviceRecord,
    GroupLock,
    Journal,
    Record,
    Step,
    state_dir,
)


def _record(key: str = "2") -> Record:
    return Record(key=key, group=2, target="vfio", op=CLAIM, state=IN_PROGRESS,
                  devices=[DeviceRecord("0000:02:0d.0", "edu-drv", None),
                           DeviceRecord("0000:01:00.0", "pcieport", None, is_bridge=True)],
                  steps=[Step("override-set", "0000:02:0d.0", "vfio-pci"), Step("probe", "0000:02:0d.0")])


def test_record_round_trips(tmp_path):
    j = Journal(tmp_path / "state")
    rec = _record()
    j.write(rec)
    back = j.read("2")
    assert back == rec
    assert [r.key for r in j.records()] == ["2"]
    assert not [p for p in (tmp_path / "state").iterdir() if p.name.endswith(".tmp")]


def test_remove_and_missing(tmp_path):
    j = Journal(tmp_path)
    assert j.read("7") is None and j.records() == []
    j.write(_record("7"))
    j.remove("7")
    j.remove("7")  # twice is fine
    assert j.read("7") is None


def test_damaged_record_is_a_clear_error(tmp_path):
    j = Journal(tmp_path)
    j.path("3").write_text("{not json")
    with pytest.raises(PcipassError) as e:
        j.records()
    assert e.value.code == "journal-damaged" and e.value.hint


def test_state_dir_under_sysfs_root_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("PCIPASS_STATE_DIR", raising=False)
    assert state_dir(str(tmp_path)) == tmp_path / "run/pcipass"
    assert str(state_dir("/")) == "/run/pcipass"
    monkeypatch.setenv("PCIPASS_STATE_DIR", str(tmp_path / "x"))
    assert state_dir("/") == tmp_path / "x"


def _hold(directory: str, ready, stop) -> None:
    with GroupLock(directory, "2"):
        ready.set()
        stop.wait(10)


def test_second_locker_is_refused_with_the_holder(tmp_path):
    ready, stop = multiprocessing.Event(), multiprocessing.Event()
    proc = multiprocessing.get_context("fork").Process(target=_hold, args=(str(tmp_path), ready, stop))
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(PcipassError) as e:
            GroupLock(tmp_path, "2").acquire()
        assert e.value.code == "group-locked"
        assert f"pid {proc.pid}" in e.value.message
        GroupLock(tmp_path, "3").acquire().release()  # another group is free
    finally:
        stop.set()
        proc.join(10)
    GroupLock(tmp_path, "2").acquire().release()  # free again once the holder is gone


def test_lock_is_dropped_when_the_holder_is_killed(tmp_path):
    pid = os.fork()
    if pid == 0:  # child: take the lock and die without releasing it
        GroupLock(tmp_path, "5").acquire()
        os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    GroupLock(tmp_path, "5").acquire().release()


def test_write_durably_replaces_whole_or_leaves_the_old_file_and_no_temporary(tmp_path):
    from pcipass.host.transaction.journal import unlink_durably, write_durably

    target = tmp_path / "spec.json"
    write_durably(target, b"one\n")
    write_durably(target, b"two\n")
    assert target.read_bytes() == b"two\n"
    blocker = tmp_path / "busy.json"  # a non-empty directory: the rename over it fails
    (blocker / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        write_durably(blocker, b"three\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.json", "spec.json"]
    assert unlink_durably(target) and not target.exists()
    assert not unlink_durably(target)
