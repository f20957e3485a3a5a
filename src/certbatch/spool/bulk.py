"""Restaging many stored certificates at once (`run-hook --target NAME --all`).

A staging of one certificate (spool.py) takes the spool lock shared and its name's lock, recovers
its name's leftovers and makes 4 fsyncs. For 10,000 certificates that is 40,000 fsyncs; here the
whole batch is written first and made durable at once, under one exclusive hold of the spool
lock (the caller's; nobody else stages or recovers meanwhile, so no name locks):

1. **Prepare**, in this thread (more threads only add switching: Python's lock, and the folder
   lock of ``.staging/`` that every mkdir takes): for each certificate a work folder
   ``.staging/<name>.<token>.tmp`` with ``privkey.pem`` and ``meta.json`` written without an
   fsync, and ``cert.pem``, ``chain.pem``, ``fullchain.pem`` hard links to the stored files
   (synced by the store when it wrote them; copies where they cannot be linked). The files are
   read through those links, so what is checked (key and certificate parse and match, the
   serial) is exactly what the entry holds: each entry is checked once, here. With deploy
   hooks, the folder gets copies instead, the hooks run in it (up to `workers` certificates at
   once), then the entry is checked and each public file they left as it was becomes a link
   (as in spool.py).
2. **Sync** everything written at once: one syncfs(2) of the spool's file system on Linux 5.8 or
   later (which reports write errors); elsewhere an fsync of every file that is not a link and
   of every work folder, 16 at a time.
3. **Publish**: each work folder is renamed to ``pending/<name>``, then ``pending/`` and
   ``.staging/`` are synced once.

A crash before a folder's rename leaves it in ``.staging/`` as a ``.tmp`` folder, which the next
exclusive holder of the spool lock discards (the certificate is not pending: `--all` again hands
it over); after it, the entry is complete and on disk. No half entry is ever pending.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import interrupt, safefs
from ..errors import CertbatchError, UnsafePath, os_error_message
from ..faults import point
from ..fsutil import fsync_dir
from ..hooks import HookCommand, HookResult, run_hook, scan
from ..store import StoredCert, iso, parse_iso
from .entries import META_VERSION, PendingEntry, entry_problem, read_pending
from .staging import remove, token

if TYPE_CHECKING:
    from .spool import Spool

log = logging.getLogger("certbatch.spool")

PUBLIC = ("cert.pem", "chain.pem", "fullchain.pem")  # linked to the store's files
SYNC_THREADS = 16  # fsyncs at once where there is no syncfs


@dataclass(frozen=True)
class BulkItem:
    """A stored certificate to stage again, and its own deploy command (deploy.d comes first)."""

    stored: StoredCert
    deploy: tuple[HookCommand, ...] = ()


@dataclass
class BulkResult:
    """How restaging one certificate went. `interrupted`: stopped by a signal (its hook, or it
    never started)."""

    name: str
    serial: str
    ok: bool = False
    error: str | None = None
    results: list[HookResult] = field(default_factory=list)
    interrupted: bool = False
    entry: PendingEntry | None = None  # the pending entry made, once it is


@dataclass
class _Work:
    """A prepared work folder: where it is and which of its files need an fsync without
    syncfs (those that are not links to stored files). Paths are strings: 10,000 of them."""

    result: BulkResult
    stored: StoredCert
    folder: str
    unsynced: list[str]


def restage(spool: Spool, items: Sequence[BulkItem], workers: int) -> list[BulkResult]:
    """Stage `items` whose name is not pending, in bulk (see the module doc); the results of
    those, in the order of `items`. Call holding the spool lock exclusively. `workers`: deploy
    hooks of that many certificates at once. Raises OSError if the batch cannot be made
    durable or published (what is not pending yet is discarded by the next recovery)."""
    pending = {e.name for e in read_pending(spool.pending_dir)}
    todo = [i for i in items if i.stored.name not in pending]
    results = [BulkResult(i.stored.name, i.stored.serial) for i in todo]
    if not todo:
        return results
    broken = [f for f in scan(spool.hooks_dir / "deploy.d") if f.state == "problem"]
    if broken:
        for r in results:
            r.error = f"deploy hook {broken[0].path}: {broken[0].why}; staging discarded"
        return results
    deploy_d = spool.deploy_commands()
    hooked = bool(deploy_d) or any(i.deploy for i in todo)
    # One token for the whole batch: the names make the work folders unique.
    tok, staged_at = token(), iso(dt.datetime.now(dt.timezone.utc))
    prepared: list[_Work] = []
    guard = threading.Lock()
    jobs = iter(zip(todo, results, strict=True))

    def worker() -> None:
        while not interrupt.requested():
            with guard:
                job = next(jobs, None)
            if job is None:
                return
            item, result = job
            work = _prepare_one(spool, item, result, tok, staged_at, [*deploy_d, *item.deploy])
            if work is not None:
                with guard:
                    prepared.append(work)

    if hooked:  # each certificate's hooks in a thread, `workers` at once
        threads = max(1, min(workers, len(todo)))
        with ThreadPoolExecutor(threads, thread_name_prefix="certbatch-deploy") as pool:
            for future in [pool.submit(worker) for _ in range(threads)]:
                future.result()
    else:  # Python and the file system's locks: more threads only add switching
        worker()
    for r in results:
        if not r.ok and r.error is None:  # never started: a signal came first
            r.error, r.interrupted = "not started", True
    if prepared:
        _publish(spool, prepared, parse_iso(staged_at))
    return results


def _prepare_one(spool: Spool, item: BulkItem, result: BulkResult, tok: str, staged_at: str,
                 commands: Sequence[HookCommand]) -> _Work | None:
    """Fill one work folder (and run its deploy hooks); None, with `result` saying why, if it
    cannot be staged."""
    stored = item.stored
    if stored.damaged:
        result.error = f"the stored files are damaged ({stored.damaged}); `certbatch renew` " \
                       f"issues it again"
        return None
    folder = f"{spool.staging.dir}/{stored.name}.{tok}.tmp"  # as Staging.folder() names it
    try:
        os.mkdir(folder, 0o700)
    except OSError as exc:
        result.error = os_error_message(exc, folder)
        return None
    try:
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
        work = _Work(result, stored, folder, [])
        meta = _meta_json(stored, staged_at)
        problem = _fill_hooked(spool, work, stored, meta, commands) if commands else \
            _fill(work, stored, meta)
    except (OSError, CertbatchError) as exc:
        problem = os_error_message(exc, folder) if isinstance(exc, OSError) else str(exc)
    if problem is None:
        result.ok = True
        point("bulk.prepared")
        return work
    result.error = result.error or problem
    remove(Path(folder))
    return None


def _fill(work: _Work, stored: StoredCert, meta: bytes) -> str | None:
    """No deploy hooks: link the public files, copy the key, write meta.json, and check what
    the folder holds. The problem, or None."""
    data = {}
    source = f"{stored.folder}/"
    for name in PUBLIC:
        dest = f"{work.folder}/{name}"
        try:
            os.link(source + name, dest, follow_symlinks=False)  # a symlink: refused below
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                raise
            log.debug("%s: not linked, copied: %s", dest, os.strerror(exc.errno or 0))
            _create(dest, safefs.read_bytes(source + name), 0o644)
            work.unsynced.append(dest)
        if name == "chain.pem":  # not checked but for being there: not read
            st = os.lstat(dest)
            why = safefs.problem(st, "file", links_ok=True)
            if why:
                raise UnsafePath(dest, why)
        else:
            data[name], st = _read(dest)
        if stat.S_IMODE(st.st_mode) != 0o644:  # the stored file was chmod'ed: a copy of ours
            content = data.get(name) or _read(dest)[0]
            os.unlink(dest)
            _create(dest, content, 0o644)
            work.unsynced.append(dest)
    # The key is never linked: damage done to a pending entry must never reach the store.
    data["privkey.pem"] = _read(source + "privkey.pem")[0]
    for name, content, mode in (("privkey.pem", data["privkey.pem"], 0o600),
                                ("meta.json", meta, 0o644)):
        _create(f"{work.folder}/{name}", content, mode)
        work.unsynced.append(f"{work.folder}/{name}")
    for name in ("privkey.pem", "cert.pem", "fullchain.pem"):
        if not data[name]:
            return f"{name} is empty"
    from .. import crypto  # cryptography: only when something is staged

    return crypto.set_problem(data, stored.serial)


def _fill_hooked(spool: Spool, work: _Work, stored: StoredCert, meta: bytes,
                 commands: Sequence[HookCommand]) -> str | None:
    """With deploy hooks: copies for the hooks to work on, the hooks, the check of what they
    left, then links for the public files they left as they were (see spool.py's `_seal`)."""
    folder = Path(work.folder)
    files = {name: safefs.read_bytes(stored.path(name)) for name in ("privkey.pem", *PUBLIC)}
    written = {}
    for name, data in files.items():
        _create(folder / name, data, 0o600 if name == "privkey.pem" else 0o644)
        written[name] = _fingerprint(os.lstat(folder / name))
    _create(folder / "meta.json", meta, 0o644)
    env = spool.deploy_env(stored.name, stored.domains, folder)
    result = work.result
    for cmd in commands:
        hook = run_hook(cmd, env, folder, spool.deploy_timeout)
        result.results.append(hook)
        if not hook.ok:
            log.warning("%s: deploy hook %s failed, staging discarded", stored.name, cmd.name)
            result.interrupted = hook.interrupted
            result.error = str(hook.error())
            return result.error
    problem = entry_problem(folder, stored.serial, stored.name)
    if problem:
        return f"the deploy hooks left the staged files damaged ({problem}); staging discarded"
    linked = set()
    for name in PUBLIC:
        with contextlib.suppress(FileNotFoundError):
            if _fingerprint(os.lstat(folder / name)) == written[name] and \
                    _link_stored(stored.path(name), folder / name, files[name]):
                linked.add(name)
    for dirpath, _dirs, names in os.walk(folder):  # what the hooks wrote, and our copies
        work.unsynced += [os.path.join(dirpath, n) for n in names
                          if not (dirpath == work.folder and n in linked)
                          and not os.path.islink(os.path.join(dirpath, n))]
        if dirpath != work.folder:
            work.unsynced.append(dirpath)
    return None


def _publish(spool: Spool, prepared: list[_Work], staged_at: dt.datetime) -> None:
    """Make every prepared folder durable, then pending (see the module doc)."""
    try:
        _sync(spool.staging.dir, prepared)
    except BaseException:
        for work in prepared:  # nothing of this batch is pending: not one half entry
            remove(Path(work.folder))
        raise
    point("bulk.synced")
    pending = f"{spool.pending_dir}/"
    for work in prepared:
        name = work.result.name
        try:
            if os.path.lexists(pending + name):
                # Pending, but not readable as an entry (or it appeared meanwhile): replaced as
                # a staging replaces it, old entry aside first; never another user's.
                tok = os.path.basename(work.folder)[len(name) + 1:-len(".tmp")]
                spool.staging.check_replaceable(name)
                os.rename(work.folder, spool.staging.folder(name, tok, "ready"))
                spool.staging.commit(name, tok)
            else:
                os.rename(work.folder, pending + name)
        except (OSError, UnsafePath) as exc:
            work.result.ok = False
            work.result.error = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
            remove(Path(work.folder))
            continue
        stored = work.stored
        work.result.entry = PendingEntry(name, stored.domains, stored.serial, stored.not_after,
                                         staged_at, spool.pending_dir / name)
        point("bulk.committed")
    fsync_dir(spool.pending_dir)
    fsync_dir(spool.staging.dir)
    point("bulk.published")
    staged = sum(w.result.ok for w in prepared)
    log.info("spool: %d certificate%s staged again in bulk", staged, "s" * (staged != 1))


def _sync(staging_dir: Path, prepared: Sequence[_Work]) -> None:
    """Everything the prepared folders hold, and their names, on disk (see the module doc)."""
    if _syncfs(staging_dir):
        return
    paths = [p for w in prepared for p in (*w.unsynced, w.folder)] + [staging_dir]
    with ThreadPoolExecutor(min(SYNC_THREADS, len(paths))) as pool:
        list(pool.map(_fsync, paths))


def _syncfs(folder: Path) -> bool:
    """syncfs(2) the file system holding `folder`; False where that cannot be relied on: not
    Linux, or a kernel before 5.8, whose syncfs does not report write errors."""
    if not _syncfs_reports_errors():
        return False
    import ctypes  # only here: not needed by anything else

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            if code == errno.ENOSYS:
                return False
            raise OSError(code, os.strerror(code), str(folder))
    finally:
        os.close(fd)
    return True


def _syncfs_reports_errors() -> bool:
    uname = os.uname()
    if uname.sysname != "Linux":
        return False
    try:
        major, minor = (int(x) for x in uname.release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: str | Path, data: bytes, mode: int) -> None:
    """A new file of ours in a work folder (never an existing one, never through a link), its
    mode set before any data: a key is never readable by others. Not synced (see `_sync`)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _read(path: str | Path) -> tuple[bytes, os.stat_result]:
    """The content of a file of ours, and its stat: safefs.open_file's checks (no link
    followed; a regular file of ours, not writable by others, any number of links since it
    is only read) on one fstat, and one read for a file that does not grow meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(path, "is a symlink (certbatch never follows links in its own "
                                   "folders)") from exc
        raise
    try:
        st = os.fstat(fd)
        why = safefs.problem(st, "file", links_ok=True)
        if why:
            raise UnsafePath(path, why)
        want = st.st_size + 1  # one more: a short read is the end
        data = os.read(fd, want)
        if len(data) == want:  # it grew meanwhile: read on to the end
            chunks = [data]
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data, st
    finally:
        os.close(fd)


def _meta_json(stored: StoredCert, staged_at: str) -> bytes:
    """The entry's meta.json, byte for byte as a staging of one certificate writes it
    (json.dumps(meta, indent=2) and a newline), from a template: indent= makes json use its
    pure-Python encoder, 5 times slower (0.5 s for 10,000)."""
    quote = json.encoder.encode_basestring_ascii  # json.dumps's own function for a str
    domains = "[\n    " + ",\n    ".join(map(quote, stored.domains)) + "\n  ]" \
        if stored.domains else "[]"
    return (f'{{\n  "version": {META_VERSION},\n  "name": {quote(stored.name)},\n'
            f'  "domains": {domains},\n  "serial": {quote(stored.serial)},\n'
            f'  "not_before": {quote(iso(stored.not_before))},\n'
            f'  "not_after": {quote(iso(stored.not_after))},\n'
            f'  "staged_at": {quote(staged_at)}\n}}\n').encode()


def _fingerprint(st: os.stat_result) -> tuple[int, ...]:
    """What a hook changes when it touches a file in any way (see spool.py's `_seal`)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
            st.st_nlink, st.st_uid, st.st_gid)


def _link_stored(src: Path, dest: Path, data: bytes) -> bool:
    """Replace `dest` with a hard link to the stored `src` if that is a regular file of ours,
    0644, holding exactly `data`; False (nothing changed) otherwise."""
    tmp = dest.with_name(f".{dest.name}.link")
    try:
        os.link(src, tmp, follow_symlinks=False)
        same, st = _read(tmp)
        if same == data and stat.S_IMODE(st.st_mode) == 0o644:
            os.replace(tmp, dest)
            return True
    except (OSError, CertbatchError) as exc:
        log.debug("%s: not linked, kept as a copy: %s", dest, exc)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return False

