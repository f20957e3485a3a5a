"""Crash-safe file system primitives shared by the store, the spool and the metrics writer."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .faults import point


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    """Create `path` (and parents) with `mode`, whatever the umask says.

    A folder that already exists keeps its mode: it is the operator's (pointing paths.spool at
    a shared 1777 folder must not lock everybody else out of it).
    """
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise
        return path
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace `path` with `data`: temp file in the same folder, fsync, chmod, rename, fsync folder.

    A reader sees the old content or the new, never a mix; on error the old file is untouched and
    no temp file is left behind.
    """
    if isinstance(data, str):
        data = data.encode()
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; set the final mode before the data lands so a key is never
        # readable by others, not even for an instant.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        point("atomic-write.synced")
        os.replace(tmp, path)
        point("atomic-write.renamed")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def write_new(path: Path, data: bytes | str, mode: int = 0o644, sync: bool = True) -> None:
    """Create `path` (which must not exist) inside a folder that is not visible yet, and fsync it.

    For building a fresh folder that is renamed into place afterwards: one fsync per file and one
    for the folder (see fsync_dir) instead of a rename and a folder fsync per file.
    """
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode)  # before the data: a key is never readable by others
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:  # False when the caller syncs the whole folder later
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` atomically (a new symlink renamed over the old one)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    point("symlink.created")
    try:
        os.replace(tmp, link)
        point("symlink.switched")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(link.parent)


class FileLock:
    """An exclusive flock on a lock file that is never deleted, also exclusive between threads.

    flock locks belong to an open file description, so two threads of one process that each open
    the file would both "get" it; a process-wide threading.Lock per path closes that gap. The PID
    of the holder is written into the file so a waiting process can name it. The kernel drops the
    flock when the holder dies, so a killed process never blocks the next one.
    """

    _thread_locks: dict[str, threading.Lock] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._guard:
            self._tlock = self._thread_locks.setdefault(str(path.resolve()), threading.Lock())
        self._fd: int | None = None

    def acquire(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Take the lock; wait at most `timeout` seconds (None: forever, 0: don't wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._tlock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            return False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except BaseException:
            self._tlock.release()
            raise
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    self._tlock.release()
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                self._tlock.release()
                return False
            time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            self._tlock.release()

    def holder_pid(self) -> int | None:
        """The PID written by the current holder, if any (best effort)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    @contextlib.contextmanager
    def held(self, timeout: float | None = None) -> Iterator[None]:
        if not self.acquire(timeout):
            raise TimeoutError(f"could not lock {self.path}")
        try:
            yield
        finally:
            self.release()
