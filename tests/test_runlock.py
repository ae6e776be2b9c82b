"""The run-name lock: one holder at a time, stale locks taken over, always released."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mechlib.paths import REPO_ROOT
from mechlib.runlock import LOCK_NAME, RunLockError, acquire, read_holder, release, run_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (pids are not reused at once)


def test_second_acquire_fails_naming_the_holder(tmp_path):
    notes: list[str] = []
    with run_lock(tmp_path, "r1", notes.append) as me:
        assert read_holder(tmp_path / LOCK_NAME) == me
        with pytest.raises(
            RunLockError,
            match=rf"run 'r1' is already running \(pid {os.getpid()} on "
            rf"{socket.gethostname()}, started .*\).*lock: {tmp_path}",
        ):
            acquire(tmp_path / LOCK_NAME, "r1", notes.append)
    assert not (tmp_path / LOCK_NAME).exists() and notes == []


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_note(tmp_path):
    lock = tmp_path / LOCK_NAME
    dead = _dead_pid()
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "earlier"}))
    notes: list[str] = []
    with run_lock(tmp_path, "r1", notes.append) as me:
        assert me.pid == os.getpid() and read_holder(lock) == me
    assert len(notes) == 1 and f"pid {dead}" in notes[0] and "no longer running" in notes[0]
    assert not lock.exists()


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.example", "started": "earlier"}))
    with pytest.raises(RunLockError, match=rf"on elsewhere.example.*if that run is gone, delete {lock}"):
        acquire(lock, "r1", lambda _: None)
    assert lock.exists()


def test_unreadable_lock_is_respected_while_fresh_and_taken_over_when_old(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text("")
    with pytest.raises(RunLockError, match="still writing its lock"):
        acquire(lock, "r1", lambda _: None)
    old = time.time() - 3600
    os.utime(lock, (old, old))
    notes: list[str] = []
    me = acquire(lock, "r1", notes.append)
    assert read_holder(lock) == me and "unreadable" in notes[0]
    release(lock, me)
    assert not lock.exists()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_released_on_error_and_ctrl_c(tmp_path, exc):
    with pytest.raises(type(exc)), run_lock(tmp_path, "r1", lambda _: None):
        raise exc
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_leaves_a_lock_another_runner_took_over(tmp_path):
    lock = tmp_path / LOCK_NAME
    me = acquire(lock, "r1", lambda _: None)
    lock.write_text(json.dumps({"pid": os.getpid() + 1, "host": me.host, "started": "now"}))
    release(lock, me)
    assert lock.exists()


def test_a_lock_held_by_another_process_then_killed(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from mechlib.runlock import run_lock\n"
        "with run_lock(Path(sys.argv[1]), 'r1'):\n    print('held', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunLockError, match=f"pid {child.pid} on"):
            acquire(tmp_path / LOCK_NAME, "r1", lambda _: None)
    finally:
        child.kill()  # SIGKILL: no finally runs, the lock stays behind
        child.wait()
    notes: list[str] = []
    with run_lock(tmp_path, "r1", notes.append):
        assert f"pid {child.pid}" in notes[0]
