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
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
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


def sync_tree(top: Path) -> None:
    """fsync every file and folder under `top`: deploy hooks don't fsync what they write."""
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


class Staging:
    """The work folders of one spool (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / ".staging"
        self.pending_dir = root / "pending"
        self.prepare_lock = root / ".prepare.lock"

    def work_folder(self, name: str) -> Path:
        return self.dir / f"{name}.{token()}.tmp"

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

    def mark_ready(self, work: Path, name: str) -> str:
        """Rename a finished .tmp folder to .ready; returns its token. From here on the staging
        is complete: recovery would commit it."""
        tok = work.name[len(name) + 1:-len(".tmp")]
        point("staging.hooks-done")
        os.rename(work, self.dir / f"{name}.{tok}.ready")
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
        ready = self.dir / f"{name}.{tok}.ready"
        old = self.dir / f"{name}.{tok}.old"
        target = self.pending_dir / name
        if target.exists():
            self.check_replaceable(name)  # before the first rename: nothing is half done
            os.rename(target, old)
            point("staging.old-aside")
            fsync_dir(self.pending_dir)
            fsync_dir(self.dir)
        os.rename(ready, target)
        point("staging.committed")
        fsync_dir(self.dir)
        fsync_dir(self.pending_dir)
        remove(old)
        point("staging.old-removed")

    def recover(self) -> None:
        """Finish or discard what a crashed staging left in .staging/ (call with the spool lock).

        .ready and .old folders only exist under the lock, so they are a crash's leftovers.
        A .tmp folder may belong to a live staging that has not got the lock yet: it is deleted
        only when nobody is preparing (see _nobody_preparing).
        """
        groups: dict[tuple[str, str], set[str]] = {}
        for entry in sorted(os.listdir(self.dir)):
            st = os.lstat(self.dir / entry)
            if stat.S_ISLNK(st.st_mode):  # never ours: unlinked, what it names is untouched
                log.warning("spool: removing the symlink %s", self.dir / entry)
                os.unlink(self.dir / entry)
                continue
            why = safefs.problem(st)
            if why:
                log.warning("spool: leaving %s alone: it %s", self.dir / entry, why)
                continue
            parts = entry.rsplit(".", 2)
            if len(parts) != 3 or parts[2] not in STATES:
                log.warning("spool: removing unknown leftover %s", self.dir / entry)
                remove(self.dir / entry)
                continue
            groups.setdefault((parts[0], parts[1]), set()).add(parts[2])
        # Token order = staging order, so if several finished stagings of one name were left,
        # the latest is committed last and wins.
        idle: bool | None = None  # _nobody_preparing(), asked once, only if a .tmp is there
        for (name, tok), states in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if "tmp" in states:
                if idle is None:
                    idle = self._nobody_preparing()
                if idle:
                    log.warning("spool: discarding unfinished staging of %s", name)
                    remove(self.dir / f"{name}.{tok}.tmp")
            if "ready" in states:
                log.warning("spool: completing interrupted staging of %s", name)
                try:
                    self.commit(name, tok)
                except UnsafePath as exc:  # never replaces a foreign entry; never wedges
                    log.error("spool: discarding the staging of %s: %s", name, exc)
                    remove(self.dir / f"{name}.{tok}.ready")
            elif "old" in states:
                old = self.dir / f"{name}.{tok}.old"
                target = self.pending_dir / name
                if target.exists():
                    remove(old)
                else:  # only reachable if .ready vanished: keep what we have
                    log.warning("spool: restoring pending entry %s", name)
                    os.rename(old, target)
                    fsync_dir(self.pending_dir)
