"""Crash-safe file system primitives shared by the store, the spool and the metrics writer."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from . import safefs
from .faults import point


def ensure_root(path: Path) -> Path:
    """Create a state or spool root (and missing parents) 0700, or check the existing one: it
    must be ours and not writable by others, and so must be the way to it (safefs.check_root).
    """
    try:
        os.mkdir(path, 0o700)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)  # e.g. /var/lib: the operator's folders
        os.mkdir(path, 0o700)
    except FileExistsError:
        safefs.check_root(path)
        return path
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    safefs.check_root(path)
    return path


ensure_dir = safefs.ensure_dir  # a folder inside a root: created 0700, or checked to be ours


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644, durable: bool = True
                 ) -> None:
    """Replace `path` with `data`: temp file in the same folder, fsync, chmod, rename, fsync folder.

    A reader sees the old content or the new, never a mix; on error the old file is untouched and
    no temp file is left behind. `durable=False` skips both fsyncs: still atomic for readers,
    but a power cut may leave the old content, or on some file systems an empty file; only for
    files whose loss costs nothing but work done again (a certificate's status.json).
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
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        point("atomic-write.synced")
        os.replace(tmp, path)
        point("atomic-write.renamed")
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _name_it(exc, path)
        raise
    if durable:
        fsync_dir(directory)


def _name_it(exc: BaseException, path: Path) -> None:
    """Raise an OSError of a write (which names no file) again, naming `path`."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def probe_space(folder: Path, size: int = 65536) -> None:
    """Write and fsync `size` bytes in `folder`, then remove them: a full disk or quota shows
    up as an OSError naming the folder before a run asks the CA for certificates it could not
    store."""
    fd, tmp = tempfile.mkstemp(prefix=".space.", suffix=".tmp", dir=folder)
    try:
        os.write(fd, b"\0" * size)
        os.fsync(fd)
    except OSError as exc:
        _name_it(exc, folder)
        raise
    finally:
        os.close(fd)
        os.unlink(tmp)


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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _name_it(exc, path)
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


def remove_leftovers(folder: Path, levels: int = 1) -> None:
    """Delete the temp files and folders (`.*.tmp`) that writers killed mid-write left in
    `folder` (atomic_write, atomic_symlink, a store version being written), and with `levels` >
    1 in its subfolders too, that many levels down. Call it only while holding the lock that
    every writer of these folders holds: then none of them is alive.

    Never follows a link: a temp file or symlink is unlinked, a temp folder deleted only if it
    is certbatch's own, and only folders of its own are searched (safefs.problem). Best effort:
    what cannot be examined or deleted stays.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = folder / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        own_dir = stat.S_ISDIR(st.st_mode) and safefs.problem(st) is None
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                if own_dir:
                    shutil.rmtree(path)
                elif not stat.S_ISDIR(st.st_mode):
                    os.unlink(path)
        elif own_dir and levels > 1:
            remove_leftovers(path, levels - 1)


def _flock(fd: int, deadline: float | None, poll: float) -> bool:
    """flock `fd` exclusively, polling until `deadline` (None: forever); False if not got."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(poll)


class FileLock:
    """An exclusive lock on a lock file that is never deleted, also exclusive between threads.

    Two flocks make it: one on the lock file's folder and one on the file itself. The folder's
    cannot be escaped by deleting or replacing the file (a second run that made a new file
    there still waits for the folder); the file's names the holder: its PID is written into it
    so a waiting process can say who it waits for. Threads of one process first queue on a
    process-wide threading.Lock per path (flock would exclude them too, as each opens the file
    anew, but by polling). The kernel drops the flocks when the holder dies, so a killed
    process never blocks the next one.
    """

    _thread_locks: dict[str, threading.Lock] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._guard:
            key = os.path.realpath(path)  # never raises, unlike resolve() on a symlink loop
            self._tlock = self._thread_locks.setdefault(key, threading.Lock())
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def acquire(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Take the lock; wait at most `timeout` seconds (None: forever, 0: don't wait).

        The file is opened without following a link and must be a regular file of ours; it is
        never truncated (a link planted in its place could point anywhere). After the flock,
        the path must still name the file we locked: if it was removed or replaced meanwhile,
        start over.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._tlock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            return False
        try:
            fds = self._lock_both(deadline, poll)
        except BaseException:
            self._tlock.release()
            raise
        if fds is None:
            self._tlock.release()
            return False
        self._dir_fd, self._fd = fds
        # Best effort (a full disk must not stop a run): the PID only names the holder.
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, f"{os.getpid():<20}\n".encode(), 0)
        return True

    def _lock_both(self, deadline: float | None, poll: float) -> tuple[int, int] | None:
        """(folder fd, file fd), both flock'ed, the file still at its path; None after the
        deadline."""
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not _flock(dir_fd, deadline, poll):
                os.close(dir_fd)
                return None
            while True:
                fd = safefs.open_file(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    if not _flock(fd, deadline, poll):
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
        if self._fd is None or self._dir_fd is None:
            return
        fd, dir_fd, self._fd, self._dir_fd = self._fd, self._dir_fd, None, None
        try:
            with contextlib.suppress(OSError):
                os.pwrite(fd, b" " * 20 + b"\n", 0)  # no holder now
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            os.close(dir_fd)
            self._tlock.release()

    def holder_pid(self) -> int | None:
        """The PID written by the current holder, if any (best effort)."""
        try:
            text = safefs.read_text(self.path).strip()
        except Exception:  # noqa: BLE001 - best effort: a name for a message
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
