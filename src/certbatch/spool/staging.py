"""The staging state machine: build an entry aside, make it pending in renames, recover.

Work folders live in ``<spool>/.staging/``: ``<name>.<token>.tmp`` (being filled; deploy hooks
run here), ``<name>.<token>.ready`` (hooks succeeded), ``<name>.<token>.old`` (the pending entry
being replaced).

Replacing ``pending/<name>`` is two renames on one file system: the old entry goes aside to
``.old``, then ``.ready`` becomes ``pending/<name>``, then the old one is deleted. A crash between
any two steps leaves either the old entry or the complete new one (".ready" is only ever a
finished staging); whoever next takes the spool lock finishes the swap (`recover`), so the latest
successful staging always wins and is never lost.

A ``.tmp`` folder is filled before the spool lock is taken. From before its mkdir until it is
committed or removed, its writer holds a shared flock on ``<spool>/.prepare.lock`` (a file: that
works on NFS too); recovery deletes ``.tmp`` folders only when it can take that lock exclusively,
i.e. when nobody, in any process or thread, is between prepare and commit.

Stagings hold the spool lock shared, so several run at once; two of the same name never do:
each holds ``<name>.lock`` here (an flock, see `name_lock`) while it runs its hooks and commits.
Whoever holds the spool lock exclusively recovers everything; a staging, before its hooks,
finishes what a crashed staging of its own name left (`recover(name)`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from .. import safefs
from ..errors import UnsafePath
from ..faults import point
from ..fsutil import fsync_dir

log = logging.getLogger("certbatch.spool")

STATES = ("tmp", "ready", "old")


def token() -> str:
    """Unique, time-sortable, dot-free suffix for work folders."""
    return f"{time.time_ns():020d}-{secrets.token_hex(3)}"


def remove(path: Path) -> None:
    """Delete a file, a symlink (not what it points at) or a whole folder of certbatch's own.

    shutil.rmtree works through folder descriptors and never follows a link inside the tree;
    a folder owned by another user is left alone (UnsafePath).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if st.st_uid != os.geteuid():
            raise UnsafePath(path, "is owned by another user: not deleted")
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sync_tree(top: Path, skip: Collection[str] = (), folders: bool = True) -> None:
    """fsync every file and folder under `top` (but the files named in `skip` at its top: hard
    links to files synced already): neither certbatch's copies nor what deploy hooks wrote are
    synced before. `folders=False`: the files only, where the journal commits in order and a
    later fsync makes the folders durable (fsutil.ordered_journal)."""
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or (dirpath == str(top) and name in skip):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if folders:
            fsync_dir(Path(dirpath))


_name_guard = threading.Lock()
_name_threads: dict[str, tuple[threading.Lock, int]] = {}  # lock path -> (lock, users)


@contextlib.contextmanager
def _thread_lock(key: str) -> Iterator[None]:
    """A process-wide lock per `key`, forgotten when nobody uses it (10,000 names come and
    go): threads of one process queue here instead of polling the flock."""
    with _name_guard:
        lock, users = _name_threads.get(key, (threading.Lock(), 0))
        _name_threads[key] = (lock, users + 1)
    try:
        with lock:
            yield
    finally:
        with _name_guard:
            lock, users = _name_threads[key]
            if users == 1:
                del _name_threads[key]
            else:
                _name_threads[key] = (lock, users - 1)


class Staging:
    """The work folders of one spool (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / ".staging"
        self.pending_dir = root / "pending"
        self.prepare_lock = root / ".prepare.lock"

    def folder(self, name: str, tok: str, state: str) -> Path:
        """The work folder ``<name>.<tok>.<state>`` (state: one of STATES)."""
        return self.dir / f"{name}.{tok}.{state}"

    def work_folder(self, name: str) -> Path:
        """A new folder for a staging of `name` to fill (not created here)."""
        return self.folder(name, token(), "tmp")

    def work_folder_shown(self, name: str) -> Path:
        """The folder a staging of `name` would fill, its random part shown as ``<token>``:
        where a dry run says the deploy hooks would run."""
        return self.folder(name, "<token>", "tmp")

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Hold .prepare.lock shared: while we have a .tmp folder, recover() leaves them all."""
        fd = safefs.open_file(self.prepare_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # drops the flock

    def _nobody_preparing(self) -> bool:
        """Whether no staging anywhere is between prepare and commit (so a .tmp is a leftover).

        Only an exclusive flock we actually get says so; any doubt keeps the leftovers.
        """
        try:
            fd = safefs.open_file(self.prepare_lock, os.O_RDWR)
        except FileNotFoundError:
            return True  # every staging creates it before its .tmp folder
        except (OSError, UnsafePath) as exc:
            log.debug("spool: cannot open %s (%s): keeping .tmp folders", self.prepare_lock, exc)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):
                log.debug("spool: cannot lock %s (%s): keeping .tmp folders",
                          self.prepare_lock, exc)
            return False
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def name_lock(self, name: str) -> Iterator[None]:
        """Hold ``.staging/<name>.lock`` exclusively, against stagings of `name` in any thread
        or process. Take it only while holding the spool lock shared: then no exclusive holder
        (recovery deletes leftover ones) is about. The holder deletes the file before it lets
        go; a waiter that then gets the deleted file's flock sees that and starts over.
        """
        path = self.dir / f"{name}.lock"
        with _thread_lock(str(path)):
            while True:
                fd = safefs.open_file(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's staging of this name
                    st = os.stat(path, follow_symlinks=False)
                    held = os.fstat(fd)
                    if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                        break
                except FileNotFoundError:
                    pass  # deleted by the holder we waited for
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)
            try:
                yield
            finally:
                try:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                finally:
                    os.close(fd)

    def mark_ready(self, work: Path, name: str) -> str:
        """Rename a finished .tmp folder to .ready; returns its token. From here on the staging
        is complete: recovery would commit it."""
        tok = work.name[len(name) + 1:-len(".tmp")]
        point("staging.hooks-done")
        os.rename(work, self.folder(name, tok, "ready"))
        point("staging.ready")
        return tok

    def check_replaceable(self, name: str) -> None:
        """Raise UnsafePath if pending/<name> exists and is not certbatch's own: another user's
        (or a linked) entry is never moved or deleted."""
        try:
            why = safefs.problem(os.lstat(self.pending_dir / name))
        except FileNotFoundError:
            return
        if why:
            raise UnsafePath(self.pending_dir / name, why + "; not replaced")

    def commit(self, name: str, tok: str) -> None:
        """Make .staging/<name>.<tok>.ready the pending entry of `name` (see module doc)."""
        ready = self.folder(name, tok, "ready")
        old = self.folder(name, tok, "old")
        target = self.pending_dir / name
        if target.exists():
            self.check_replaceable(name)  # before the first rename: nothing is half done
            os.rename(target, old)
            point("staging.old-aside")
        os.rename(ready, target)
        point("staging.committed")
        # One fsync makes the swap durable. ext4 and xfs: a rename is one journal transaction
        # covering both folders, and the journal commits in order. btrfs: the fsync logs
        # pending/'s entries and the folders its new entries name (not their content: synced
        # before, see Spool._seal). Each rename is replayed whole or not at all, and recovery
        # finishes any prefix of them.
        fsync_dir(self.pending_dir)
        remove(old)
        point("staging.old-removed")

    def recover(self, name: str | None = None) -> None:
        """Finish or discard what a crashed staging left in .staging/: with the spool lock held
        exclusively, everything; with `name`, only the .ready and .old folders of that name
        (call with the spool lock shared and the name's lock held).

        .ready and .old folders only exist while their staging holds its name's lock, so with
        that lock (or every lock) they are a crash's leftovers. A .tmp folder may belong to a
        live staging that has not got the lock yet: it is deleted only when nobody is preparing
        (see _nobody_preparing).
        """
        groups: dict[tuple[str, str], set[str]] = {}
        for entry in sorted(os.listdir(self.dir)):
            parts = entry.rsplit(".", 2)
            if name is not None and (len(parts) != 3 or parts[0] != name
                                     or parts[2] not in ("ready", "old")):
                continue  # another name's, its lock, or a .tmp: left to the exclusive holder
            try:
                st = os.lstat(self.dir / entry)
            except FileNotFoundError:
                continue  # another name's staging committed it meanwhile
            if stat.S_ISLNK(st.st_mode):  # never ours: unlinked, what it names is untouched
                log.warning("spool: removing the symlink %s", self.dir / entry)
                os.unlink(self.dir / entry)
                continue
            if stat.S_ISREG(st.st_mode) and entry.endswith(".lock"):
                # A name's lock (see name_lock) left by a killed staging: with every lock
                # held, nobody holds it.
                if safefs.problem(st, "file") is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.dir / entry)
                continue
            why = safefs.problem(st)
            if why:
                log.warning("spool: leaving %s alone: it %s", self.dir / entry, why)
                continue
            if len(parts) != 3 or parts[2] not in STATES:
                log.warning("spool: removing unknown leftover %s", self.dir / entry)
                remove(self.dir / entry)
                continue
            groups.setdefault((parts[0], parts[1]), set()).add(parts[2])
        # Token order = staging order, so if several finished stagings of one name were left,
        # the latest is committed last and wins.
        idle: bool | None = None  # _nobody_preparing(), asked once, only if a .tmp is there
        for (cert, tok), states in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if "tmp" in states:
                if idle is None:
                    idle = self._nobody_preparing()
                if idle:
                    log.warning("spool: discarding unfinished staging of %s", cert)
                    remove(self.folder(cert, tok, "tmp"))
            if "ready" in states:
                log.warning("spool: completing interrupted staging of %s", cert)
                try:
                    self.commit(cert, tok)
                except UnsafePath as exc:  # never replaces a foreign entry; never wedges
                    log.error("spool: discarding the staging of %s: %s", cert, exc)
                    remove(self.folder(cert, tok, "ready"))
            elif "old" in states:
                old = self.folder(cert, tok, "old")
                target = self.pending_dir / cert
                if target.exists():
                    remove(old)
                else:  # only reachable if .ready vanished: keep what we have
                    log.warning("spool: restoring pending entry %s", cert)
                    os.rename(old, target)
                    fsync_dir(self.pending_dir)
