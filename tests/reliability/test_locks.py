"""The run lock: a lock left by a process that is gone never needs a hand delete forever. On
this host a dead pid is stale; from another host, a lock whose heartbeat (its mtime, refreshed
by the holder) is older than the stale age is taken over; `--break-lock` takes over any lock."""

from __future__ import annotations

import os
import time

import pytest

from factmem.cli import main
from factmem.errors import FactmemError
from factmem.rundir import RunLock, lock_path

from .test_bad_inputs import write_config

HOUR = 3600.0


def put_lock(root, text: str, age_s: float = 0.0):
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_a_lock_from_another_host_with_a_stale_heartbeat_is_taken_over(tmp_path, caplog):
    root = tmp_path / "run"
    put_lock(root, "123@other-host\nheartbeat 30\n", age_s=HOUR)
    with RunLock(root):
        assert lock_path(root).read_text().startswith(f"{os.getpid()}@")
    assert "removing stale lock" in caplog.text and "123@other-host" in caplog.text
    assert "no heartbeat for 60 minutes" in caplog.text


def test_a_live_lock_from_another_host_is_refused_naming_the_ways_out(tmp_path):
    root = tmp_path / "run"
    put_lock(root, "123@other-host\nheartbeat 30\n", age_s=5)
    with pytest.raises(FactmemError, match=r"in use by process 123@other-host .*heartbeat 5 s "
                       r"ago.*taken over once it is 10 minutes old.*--break-lock"):
        RunLock(root).acquire()
    assert lock_path(root).read_text().startswith("123@other-host")


def test_a_lock_without_heartbeat_from_another_host_needs_break_lock(tmp_path, caplog):
    """Written by a factmem from before heartbeats: its age says nothing."""
    root = tmp_path / "run"
    put_lock(root, "123@other-host\n", age_s=HOUR)
    with pytest.raises(FactmemError, match="--break-lock"):
        RunLock(root).acquire()
    with RunLock(root, break_lock=True):
        pass
    assert "--break-lock given" in caplog.text and not lock_path(root).exists()


def test_an_empty_lock_left_by_a_crash_is_stale_once_old(tmp_path):
    root = tmp_path / "run"
    put_lock(root, "", age_s=5)  # another process between creating the file and writing it
    with pytest.raises(FactmemError, match="in use"):
        RunLock(root).acquire()
    put_lock(root, "", age_s=HOUR)
    with RunLock(root):
        pass


def test_the_holder_refreshes_its_heartbeat_and_stops_on_release(tmp_path):
    root = tmp_path / "run"
    lock = RunLock(root, heartbeat_s=0.05)
    lock.acquire()
    path = lock_path(root)
    assert path.read_text().splitlines()[1] == "heartbeat 0.05"
    old = time.time() - HOUR
    os.utime(path, (old, old))
    deadline = time.time() + 10
    while path.stat().st_mtime < time.time() - 60:
        assert time.time() < deadline, "the heartbeat never refreshed the lock"
        time.sleep(0.02)
    lock.release()
    assert not path.exists() and not lock.beating()


def test_break_lock_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    root = tmp_path / "runs" / "tiny"
    put_lock(root, "123@other-host\nheartbeat 30\n")
    assert main(["run", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--break-lock" in err, err
    assert main(["run", str(cfg), "--no-progress", "--break-lock"]) == 0
    assert not lock_path(root).exists() and (root / "default" / "seed0" / "accuracy.json").is_file()
