"""One runner per run name: ``outputs/<run>/.lock`` holds the pid and host of the run that owns it.

Why: two ``python -m mechlib.book params/x.yaml`` started at once (a second terminal, a re-sent
job) both did the full work on the same files, each overwriting the other's shards and notebooks.
The lock file is created with ``O_CREAT | O_EXCL`` — atomic on local filesystems, so exactly one
of two starters gets it — and the loser stops at once naming the holder. A runner killed with
SIGKILL cannot remove its lock; a lock whose pid is no longer alive *on this host* is therefore
stale and taken over with a note. A lock from another host is never taken over: its pid means
nothing here, so the user is told to delete it if that run is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".lock"
# A lock file that is empty or unreadable is normally one a starter has created but not yet
# written (a window of microseconds); older than this, it is debris and taken over.
UNREADABLE_GRACE_S = 10.0


class RunLockError(RuntimeError):
    """The run name is held by another live runner; the message names it."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started: str  # local time, for the message

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def _me() -> LockHolder:
    return LockHolder(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"))


def read_holder(path: Path) -> LockHolder | None:
    """The holder recorded in ``path``, or ``None`` when it is missing, empty or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(int(data["pid"]), str(data["host"]), str(data.get("started", "?")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (signal 0 checks without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _create(path: Path, me: LockHolder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"pid": me.pid, "host": me.host, "started": me.started}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _stale_reason(path: Path, holder: LockHolder | None, host: str) -> str | None:
    """Why the existing lock may be taken over, or ``None`` when its holder may still be running."""
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it vanished"
        return f"it is unreadable and {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
    if holder.host == host and not pid_alive(holder.pid):
        return f"its runner ({holder.describe()}) is no longer running"
    return None


def acquire(path: Path, run: str, note: Callable[[str], None] = print) -> LockHolder:
    """Take the lock at ``path`` for ``run`` or raise :class:`RunLockError` naming the holder.

    Two starters taking over the *same* stale lock at the same instant could both succeed (each
    removes the file, then one creates it after the other); that needs a dead runner and two new
    ones within microseconds, and is accepted to keep this small.
    """
    me = _me()
    for _ in range(3):
        if _create(path, me):
            return me
        holder = read_holder(path)
        reason = _stale_reason(path, holder, me.host)
        if reason is None:
            who = holder.describe() if holder else "a runner that is still writing its lock"
            hint = (
                "wait for it, or stop it"
                if holder is None or holder.host == me.host
                else f"if that run is gone, delete {path}"
            )
            raise RunLockError(f"run {run!r} is already running ({who}); {hint} — lock: {path}")
        note(f"[mechbook] note: taking over the lock of run {run!r}: {reason} ({path})")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    raise RunLockError(f"run {run!r}: could not take the lock {path} (another runner keeps re-creating it)")


def release(path: Path, holder: LockHolder) -> None:
    """Remove the lock if it is still ``holder``'s (never one another runner has since taken over)."""
    current = read_holder(path)
    if current is not None and (current.pid, current.host) == (holder.pid, holder.host):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def run_lock(run_root: Path, run: str, note: Callable[[str], None] = print) -> Iterator[LockHolder]:
    """Hold ``<run_root>/.lock`` for the body; released on return, error and Ctrl-C alike."""
    run_root.mkdir(parents=True, exist_ok=True)
    path = run_root / LOCK_NAME
    holder = acquire(path, run, note)
    try:
        yield holder
    finally:
        release(path, holder)
