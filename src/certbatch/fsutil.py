"""Crash-safe file system primitives shared by the store, the spool and the metrics writer."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from . import safefs
from .faults import point
from .locks import SharedLock


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


_PROC, _SYS = "/proc", "/sys"  # tests point these at fakes
_ordered: dict[int, bool] = {}  # st_dev -> ordered_journal's answer, asked once per device


def ordered_journal(*paths: Path) -> bool:
    """Whether all of `paths` are on one file system whose journal commits metadata changes in
    the order they were made: xfs, or ext3/ext4 with a journal. There an fsync returns only
    once every change made before it is durable too (ext4: its jbd2 transaction and all earlier
    ones; xfs: the log up to it), so a folder's fsync that a later fsync of the same step
    follows adds nothing. False whenever unsure: btrfs (an fsync persists what it syncs, not
    the changes before it), ext2 or ext4 without a journal, tmpfs, NFS, overlayfs, or a /proc
    or /sys that does not say. See docs/safety.md."""
    try:
        devices = {os.stat(p).st_dev for p in paths}
    except OSError:
        return False
    if len(devices) != 1:
        return False
    dev = devices.pop()
    known = _ordered.get(dev)
    if known is None:
        known = _ordered[dev] = _journal_orders(dev)
    return known


def _journal_orders(dev: int) -> bool:
    """ordered_journal for one device: its type from mountinfo; for ext3/4, a journal shows
    as a data= mode in /proc/fs/ext4/<device>/options (absent without one)."""
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    types = set()
    try:
        with open(f"{_PROC}/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                if sep and len(fields) > 2 and fields[2] == majmin and right.split():
                    types.add(right.split()[0])
    except OSError:
        return False
    if types == {"xfs"}:
        return True
    if not types or not types <= {"ext3", "ext4"}:
        return False
    try:
        name = os.path.basename(os.path.realpath(f"{_SYS}/dev/block/{majmin}"))
        with open(f"{_PROC}/fs/ext4/{name}/options", encoding="ascii",
                  errors="replace") as fh:
            return any(line.startswith("data=") for line in fh)
    except OSError:
        return False


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
        leftover = name.startswith(".") and name.endswith(".tmp")
        if not leftover and levels <= 1:
            continue  # no lstat: spool/applied/<batch>/ holds thousands of entries
        path = folder / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        own_dir = stat.S_ISDIR(st.st_mode) and safefs.problem(st) is None
        if leftover:
            with contextlib.suppress(OSError):
                if own_dir:
                    shutil.rmtree(path)
                elif not stat.S_ISDIR(st.st_mode):
                    os.unlink(path)
        elif own_dir and levels > 1:
            remove_leftovers(path, levels - 1)


class FileLock(SharedLock):
    """An exclusive lock on a lock file that is never deleted (the run lock): a
    locks.SharedLock that is only ever taken exclusively, with all it guarantees (two flocks,
    the file still at its path, the holder's PID in it, released by the kernel when the holder
    dies, threads of one process queued)."""

    def acquire(self, timeout: float | None = None, poll: float = 0.05,  # type: ignore[override]
                shared: bool = False) -> bool:
        """Take the lock exclusively; wait at most `timeout` seconds (None: forever, 0: don't
        wait)."""
        return super().acquire(timeout, shared=False, poll=poll)

    @contextlib.contextmanager
    def held(self, timeout: float | None = None, shared: bool = False) -> Iterator[None]:
        with super().held(timeout, shared=False):
            yield
