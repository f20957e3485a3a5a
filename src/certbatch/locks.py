"""A shared/exclusive lock on a lock file that is never deleted, between threads and processes.

The spool's lock (`<spool>/.lock`): stagings hold it shared, so the deploy hooks of different
certificates run side by side; recovery, `forget` and the notify phase hold it exclusively, so
they never see half a staging. The run lock (fsutil.FileLock) is one only ever taken
exclusively.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import safefs


def _flock(fd: int, op: int, deadline: float | None, poll: float) -> bool:
    """flock `fd` with `op` (LOCK_SH or LOCK_EX), polling until `deadline` (None: forever);
    False if not got."""
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def _wait(cond: threading.Condition, deadline: float | None) -> bool:
    """Wait on `cond` (held) until notified or `deadline`; False once the deadline passed."""
    if deadline is None:
        cond.wait()
        return True
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    cond.wait(left)
    return True


@dataclass
class _Process:
    """This process's hold on one lock file, shared by all its threads."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    readers: int = 0  # threads holding it shared
    writer: bool = False  # a thread holds it exclusively, or is taking the flocks for that
    writers_waiting: int = 0
    taking: bool = False  # a thread is taking the flocks shared for the process
    fds: tuple[int, int] | None = None  # (folder, file), flock'ed while anybody holds it


class SharedLock:
    """A lock on a lock file, shared or exclusive, between threads and processes.

    Two flocks make it: one on the lock file's folder, one on the file. The folder's cannot be
    escaped by deleting or replacing the file; after the flocks, the path must still name the
    file locked, or it starts over. The file is opened without following a link and never
    truncated. The kernel drops the flocks when the holder dies.

    In a process, one pair of flocks serves all threads: the first shared holder takes them
    shared and the last one to leave drops them; an exclusive holder takes them exclusively.
    Threads queue on a condition with writers first (a waiting exclusive holder keeps new
    shared ones out, so a stream of stagings cannot starve a notify). Between processes flock
    decides, without a queue: a process that wants it exclusively gets it once no other
    process holds it shared, at the latest when that process's stagings end.

    The holder's PID is written into the file for messages. Shared holders each write theirs
    when they come and leave it, so the file names the last one that came (still a holder, or
    the last one); an exclusive holder blanks it when it leaves.
    """

    _processes: dict[str, _Process] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._guard:
            key = os.path.realpath(path)  # never raises, unlike resolve() on a symlink loop
            self._proc = self._processes.setdefault(key, _Process())

    def acquire(self, timeout: float | None = None, shared: bool = False,
                poll: float = 0.05) -> bool:
        """Take the lock; wait at most `timeout` seconds (None: forever, 0: don't wait)."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
        return self._acquire_shared(deadline, poll) if shared else \
            self._acquire_exclusive(deadline, poll)

    def _acquire_shared(self, deadline: float | None, poll: float) -> bool:
        p = self._proc
        with p.cond:
            while p.writer or p.writers_waiting or p.taking:
                if not _wait(p.cond, deadline):
                    return False
            if p.readers:  # the process holds the flocks shared already
                p.readers += 1
                return True
            p.taking = True
        return self._take(fcntl.LOCK_SH, deadline, poll)

    def _acquire_exclusive(self, deadline: float | None, poll: float) -> bool:
        p = self._proc
        with p.cond:
            p.writers_waiting += 1
            try:
                while p.writer or p.readers or p.taking:
                    if not _wait(p.cond, deadline):
                        p.cond.notify_all()  # shared waiters held back by us may go now
                        return False
            finally:
                p.writers_waiting -= 1
            p.writer = True
        return self._take(fcntl.LOCK_EX, deadline, poll)

    def _take(self, op: int, deadline: float | None, poll: float) -> bool:
        """Take the flocks for the process (the caller set `taking` or `writer`)."""
        p = self._proc
        fds = None
        try:
            fds = self._lock_both(op, deadline, poll)
        finally:
            with p.cond:
                if op == fcntl.LOCK_SH:
                    p.taking = False
                    p.readers = 1 if fds else 0
                else:
                    p.writer = fds is not None
                p.fds = fds
                p.cond.notify_all()
        if fds is None:
            return False
        # Best effort (a full disk must not stop a run): the PID only names the holder.
        with contextlib.suppress(OSError):
            os.pwrite(fds[1], f"{os.getpid():<20}\n".encode(), 0)
        return True

    def _lock_both(self, op: int, deadline: float | None, poll: float
                   ) -> tuple[int, int] | None:
        """(folder fd, file fd), both flock'ed with `op`, the file still at its path; None
        after the deadline."""
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not _flock(dir_fd, op, deadline, poll):
                os.close(dir_fd)
                return None
            while True:
                fd = safefs.open_file(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    if not _flock(fd, op, deadline, poll):
                        os.close(fd)
                        os.close(dir_fd)
                        return None
                    if self._still_at_path(fd):
                        return dir_fd, fd
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)  # removed or replaced while we waited: lock the file there now
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(dir_fd)
            raise

    def _still_at_path(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        """Leave the lock, in the mode this thread took it."""
        p = self._proc
        with p.cond:
            if p.writer:
                exclusive = True
                p.writer = False
            elif p.readers:
                exclusive = False
                p.readers -= 1
                if p.readers:
                    return
            else:
                return  # not held
            fds, p.fds = p.fds, None
            try:
                if fds is not None:
                    dir_fd, fd = fds
                    try:
                        if exclusive:
                            with contextlib.suppress(OSError):
                                os.pwrite(fd, b" " * 20 + b"\n", 0)  # no holder now
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    finally:
                        os.close(fd)
                        os.close(dir_fd)
            finally:
                p.cond.notify_all()

    def holder_pid(self) -> int | None:
        """The PID written by the current (or, when shared, the last) holder, if any."""
        try:
            text = safefs.read_text(self.path).strip()
        except Exception:  # noqa: BLE001 - best effort: a name for a message
            return None
        return int(text) if text.isdigit() else None

    @contextlib.contextmanager
    def held(self, timeout: float | None = None, shared: bool = False) -> Iterator[None]:
        if not self.acquire(timeout, shared):
            raise TimeoutError(f"could not lock {self.path}")
        try:
            yield
        finally:
            self.release()
