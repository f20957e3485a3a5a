"""Restaging many stored certificates at once (`run-hook --target NAME --all`).

A staging of one certificate (spool.py) takes the spool lock shared and its name's lock, recovers
its name's leftovers and makes 4 fsyncs. For 10,000 certificates that is 40,000 fsyncs; here the
whole batch is written first and made durable at once, under one exclusive hold of the spool
lock (the caller's; nobody else stages or recovers meanwhile, so no name locks):

1. **Prepare**, in this thread (more threads only add switching: Python's lock, and the folder
   lock of ``.staging/`` that every mkdir takes) and, from `SPLIT_MIN` certificates on, in a
   forked helper process too (a second CPU; see `_Helper`): for each certificate its stored
   set read from the store (by the process that takes it: reading 10,000 costs about 1 s),
   then a work folder ``.staging/<name>.<token>.tmp`` with ``privkey.pem`` and ``meta.json``
   written without an fsync, and ``cert.pem``, ``chain.pem``, ``fullchain.pem`` hard links to
   the stored files (synced by the store when it wrote them; copies where they cannot be
   linked). The files are read through those links, so what is checked (key and certificate
   parse and match, the serial) is exactly what the entry holds: each entry is checked once,
   here. With deploy hooks (no helper), the stored sets are read first, each folder gets
   copies instead, the hooks run in it (up to `workers` certificates at once), then the entry
   is checked and each public file they left as it was becomes a link (as in spool.py).
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
import pickle
import signal
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
SPLIT_MIN = 1000  # entries from which a helper process prepares some (a fork costs ~20 ms)
CHUNK = 50  # entries a process takes at a time
MAX_CHUNKS = 8192  # chunk numbers the queue pipe holds (4 bytes each, in its 64 KiB)


# How a certificate's stored set is read (the store's `current`): None if it was never issued;
# CertbatchError if its state cannot be read (that certificate fails alone).
Load = Callable[[str], StoredCert | None]


@dataclass(frozen=True)
class BulkItem:
    """A configured certificate to stage again (its stored set is read when it is taken), and
    its own deploy command (deploy.d comes first)."""

    name: str
    deploy: tuple[HookCommand, ...] = ()


@dataclass
class BulkResult:
    """How restaging one certificate went. `serial`, `domains`, `not_after`: its stored set's,
    once read. `unreadable`: its stored state could not be read (`error` says why).
    `interrupted`: stopped by a signal (its hook, or it never started)."""

    name: str
    serial: str = ""
    domains: tuple[str, ...] = ()
    not_after: dt.datetime | None = None
    ok: bool = False
    error: str | None = None
    unreadable: bool = False
    results: list[HookResult] = field(default_factory=list)
    interrupted: bool = False
    entry: PendingEntry | None = None  # the pending entry made, once it is
    issued: bool | None = None  # None: not read (yet); False: never issued, no result


@dataclass
class _Work:
    """A prepared work folder: where it is and which of its files need an fsync without
    syncfs (those that are not links to stored files). Paths are strings: 10,000 of them."""

    result: BulkResult
    folder: str
    unsynced: list[str]
    not_after: dt.datetime  # the stored certificate's


def restage(spool: Spool, items: Sequence[BulkItem], load: Load, workers: int
            ) -> list[BulkResult]:
    """Stage every item that was issued and whose name is not pending, in bulk (see the module
    doc): their results in the order of `items`, then those of the pending ones whose stored
    state cannot be read (`unreadable`). Each item's stored set is read with `load` by the
    process that takes it. Call holding the spool lock exclusively. `workers`: deploy hooks of
    that many certificates at once. Raises OSError if the batch cannot be made durable or
    published (what is not pending yet is discarded by the next recovery)."""
    pending = {e.name for e in read_pending(spool.pending_dir)}
    todo = [i for i in items if i.name not in pending]
    results = [BulkResult(i.name) for i in todo]
    # Not staged again, but read all the same: one whose state is unreadable fails.
    failed = [r for r in (BulkResult(i.name) for i in items if i.name in pending)
              if _load(load, r) is None and r.unreadable]
    if not todo:
        return failed
    broken = [f for f in scan(spool.hooks_dir / "deploy.d") if f.state == "problem"]
    if broken:
        for r in results:
            if _load(load, r) is not None:
                r.error = f"deploy hook {broken[0].path}: {broken[0].why}; staging discarded"
        return _issued(results) + failed
    deploy_d = spool.deploy_commands()
    # One token for the whole batch: the names make the work folders unique.
    tok, staged_at = token(), iso(dt.datetime.now(dt.timezone.utc))
    if deploy_d or any(i.deploy for i in todo):  # each certificate's hooks in a thread
        prepared = _prepare_hooked(spool, todo, results, load, tok, staged_at, deploy_d,
                                   workers)
    else:
        prepared = _prepare_plain(spool, todo, results, load, tok, staged_at)
    for r in results:
        if r.ok or r.error is not None or r.issued is False:
            continue
        if r.issued is None and _load(load, r) is None:  # never taken: read for the report
            continue
        r.error, r.interrupted = "not started", True  # a signal came first
    if prepared:
        # Everything in pending/ now, readable as an entry or not: under the exclusive lock
        # nobody else adds to it, so one listing replaces an lstat per entry.
        _publish(spool, prepared, parse_iso(staged_at), set(os.listdir(spool.pending_dir)))
    return _issued(results) + failed


def _issued(results: list[BulkResult]) -> list[BulkResult]:
    """`results` but those of certificates never issued (nothing to stage, nothing to say)."""
    return [r for r in results if r.issued is not False]


def _load(load: Load, result: BulkResult) -> StoredCert | None:
    """The stored set of `result`'s certificate, what the report needs of it noted in `result`;
    None if it was never issued (`issued` False) or cannot be read (`unreadable`)."""
    try:
        stored = load(result.name)
    except CertbatchError as exc:
        result.error, result.unreadable = str(exc), True
        return None
    result.issued = stored is not None
    if stored is not None:
        result.serial, result.domains = stored.serial, stored.domains
        result.not_after = stored.not_after
    return stored


def _prepare_hooked(spool: Spool, todo: Sequence[BulkItem], results: Sequence[BulkResult],
                    load: Load, tok: str, staged_at: str, deploy_d: Sequence[HookCommand],
                    workers: int) -> list[_Work]:
    """Prepare with deploy hooks: each certificate's hooks in a thread, `workers` at once (the
    stored sets read first, here: the hooks take the time)."""
    prepared: list[_Work] = []
    guard = threading.Lock()
    jobs = iter([(item, result, stored) for item, result in zip(todo, results, strict=True)
                 if (stored := _load(load, result)) is not None])

    def worker() -> None:
        while not interrupt.requested():
            with guard:
                job = next(jobs, None)
            if job is None:
                return
            item, result, stored = job
            work = _prepare_one(spool, stored, result, tok, staged_at,
                                [*deploy_d, *item.deploy])
            if work is not None:
                point("bulk.prepared")
                with guard:
                    prepared.append(work)

    threads = max(1, min(workers, len(todo)))
    with ThreadPoolExecutor(threads, thread_name_prefix="certbatch-deploy") as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    return prepared


def _prepare_plain(spool: Spool, todo: Sequence[BulkItem], results: Sequence[BulkResult],
                   load: Load, tok: str, staged_at: str) -> list[_Work]:
    """Read and prepare without deploy hooks, in chunks of entries: in this process alone, or
    with a forked helper when there are many (see `_Helper`). The prepared folders in the
    order of `todo`."""
    size = max(CHUNK, -(-len(todo) // MAX_CHUNKS))
    chunks = [range(i, min(i + size, len(todo))) for i in range(0, len(todo), size)]
    works: dict[int, _Work] = {}
    mine = set()

    def take(c: int) -> None:
        mine.add(c)
        for i in chunks[c]:
            if interrupt.requested():
                break
            work = _read_and_prepare(spool, load, results[i], tok, staged_at)
            if work is not None:
                point("bulk.prepared")
                works[i] = work

    helper = None
    if len(todo) >= SPLIT_MIN:
        # The first chunk here, before the fork: what its reads load (the store's index,
        # 11 MB of JSON for 10,000 certificates: 0.2 s) the helper has without loading it.
        take(0)
        if not interrupt.requested():
            helper = _Helper.start(spool, todo, results, load, tok, staged_at, chunks, 1)
    try:
        for c in (helper.chunks() if helper else range(len(mine), len(chunks))):
            take(c)
    except BaseException:
        if helper:
            helper.kill()
        raise
    if helper:
        for i, work in helper.finish(chunks, mine):
            point("bulk.prepared")
            works[i] = work
    return [works[i] for i in sorted(works)]


class _Helper:
    """A forked copy of this process that prepares some of the chunks (Python runs one thread
    at a time: a second process is the way to use a second CPU). Each process takes the next
    chunk number from a pipe filled before the fork, so a busy CPU does less of the work.

    The helper reads the stored sets of its chunks, as this process does, fills their work
    folders in .staging/ and reports how each went (and what the results need of the stored
    set); it never syncs or publishes. It shares the spool lock (the fork copies the locked
    descriptors) and dies with this process (PR_SET_PDEATHSIG), so a crash leaves nothing
    but work folders, which the next exclusive holder of the lock discards. Chunks it took
    and did not report (it died) are read and prepared here again. Its reads of the store
    use the store's index (state/index.json, as loaded before the fork); what it adds to the
    index is lost with it: a cache, which this process saves at the end with what it read
    itself (the next run reads the rest from the meta.json files, and caches it).
    """

    def __init__(self, pid: int, queue: int, report: int, todo: Sequence[BulkItem],
                 results: Sequence[BulkResult], spool: Spool, load: Load, tok: str,
                 staged_at: str) -> None:
        self.pid, self.queue, self.report = pid, queue, report
        self.todo, self.results, self.spool, self.load = todo, results, spool, load
        self.tok, self.staged_at = tok, staged_at

    @classmethod
    def start(cls, spool: Spool, todo: Sequence[BulkItem], results: Sequence[BulkResult],
              load: Load, tok: str, staged_at: str, chunks: Sequence[range], first: int
              ) -> _Helper | None:
        """Fork the helper, the chunks from `first` on left to take; None (all is done here)
        where that is not safe or possible."""
        others = [t for t in threading.enumerate()
                  if t is not threading.current_thread() and t.name != "certbatch-signals"]
        if others or not hasattr(os, "fork") or _prctl() is None:
            return None  # a thread could hold a lock the child would find held forever
        queue_r, queue_w = os.pipe()
        numbers = b"".join(struct.pack("=I", c) for c in range(first, len(chunks)))
        try:
            os.set_blocking(queue_w, False)  # a pipe may hold only 4 KiB (pipe-user-pages-soft)
            written = os.write(queue_w, numbers)
        except OSError:
            written = 0
        finally:
            os.close(queue_w)
        if written != len(numbers):
            os.close(queue_r)
            return None
        report_r, report_w = os.pipe()
        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            log.debug("bulk: no helper process: %s", exc)
            for fd in (queue_r, report_r, report_w):
                os.close(fd)
            return None
        if pid == 0:  # the helper: never returns
            code = 1
            try:
                os.close(report_r)
                code = _helper_main(parent, queue_r, report_w, spool, results, load, tok,
                                    staged_at, chunks)
            except BaseException:
                log.warning("bulk: the helper process failed", exc_info=True)
            finally:
                os._exit(code)
        os.close(report_w)
        return cls(pid, queue_r, report_r, todo, results, spool, load, tok, staged_at)

    def chunks(self) -> Iterator[int]:
        """The chunk numbers for this process, until none is left (or a signal came)."""
        while not interrupt.requested():
            chunk = _take(self.queue)
            if chunk is None:
                return
            yield chunk

    def kill(self) -> None:
        """Stop the helper at once (this process failed): its work folders are discarded by
        the next exclusive holder of the spool lock."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.report)
        os.close(self.queue)

    def finish(self, chunks: Sequence[range], mine: set[int]) -> list[tuple[int, _Work]]:
        """Wait for the helper; what it prepared, with `results` updated. Chunks it did not
        report are prepared here (after a signal: left as not started)."""
        if interrupt.requested():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)  # its handler stops it after one entry
        data = bytearray()
        while chunk := os.read(self.report, 1 << 16):
            data += chunk
        os.close(self.report)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.queue)
        code = os.waitstatus_to_exitcode(status)
        try:
            report = pickle.loads(data) if code == 0 else None  # noqa: S301 - our own fork's
        except (pickle.UnpicklingError, EOFError, ValueError):
            report = None
        done: list[tuple[int, _Work]] = []
        if report is None:
            log.warning("bulk: the helper process failed (%s): its certificates are prepared "
                        "here", f"exit {code}" if code >= 0 else f"signal {-code}")
            for c in range(len(chunks)):
                if c in mine:
                    continue
                for i in chunks[c]:
                    remove(Path(_folder(self.spool, self.todo[i].name, self.tok)))
                    if interrupt.requested():
                        continue
                    work = _read_and_prepare(self.spool, self.load, self.results[i], self.tok,
                                             self.staged_at)
                    if work is not None:
                        done.append((i, work))
            return done
        for i, issued, serial, domains, not_after, ok, error, unreadable, interrupted, \
                unsynced in report:
            result = self.results[i]
            result.issued, result.serial, result.domains = issued, serial, domains
            result.not_after, result.ok, result.error = not_after, ok, error
            result.unreadable, result.interrupted = unreadable, interrupted
            if ok:
                folder = _folder(self.spool, result.name, self.tok)
                done.append((i, _Work(result, folder, unsynced, not_after)))
        return done


def _helper_main(parent: int, queue: int, report: int, spool: Spool,
                 results: Sequence[BulkResult], load: Load, tok: str, staged_at: str,
                 chunks: Sequence[range]) -> int:
    """The helper process's work (see `_Helper`); its exit code."""
    stop = []
    for signum in interrupt.SIGNALS:  # its own flag: the parent's handler wakes its watcher
        signal.signal(signum, lambda *_: stop.append(1))
    prctl = _prctl()
    if prctl is None or prctl(1, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        return 1  # PR_SET_PDEATHSIG: it dies with the parent (which may be gone already)
    rows = []
    # interrupt.requested(): a signal between the fork and the handlers above ran the
    # inherited one, which set the flag this process inherited too
    while not stop and not interrupt.requested() and (chunk := _take(queue)) is not None:
        for i in chunks[chunk]:
            if stop or interrupt.requested():
                break
            r = results[i]
            work = _read_and_prepare(spool, load, r, tok, staged_at)
            rows.append((i, r.issued, r.serial, r.domains, r.not_after, r.ok, r.error,
                         r.unreadable, r.interrupted, work.unsynced if work else []))
    data = memoryview(pickle.dumps(rows, pickle.HIGHEST_PROTOCOL))
    while data:
        data = data[os.write(report, data):]
    return 0


def _take(queue: int) -> int | None:
    """The next chunk number from the queue pipe; None when it is empty. A read of 4 bytes is
    never split between readers (less than PIPE_BUF)."""
    data = os.read(queue, 4)
    return struct.unpack("=I", data)[0] if len(data) == 4 else None


def _prctl() -> Any:
    """libc's prctl(2); None where there is none (not Linux): then no helper is forked."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _folder(spool: Spool, name: str, tok: str) -> str:
    return f"{spool.staging.dir}/{name}.{tok}.tmp"  # as Staging.folder() names it


def _read_and_prepare(spool: Spool, load: Load, result: BulkResult, tok: str, staged_at: str
                      ) -> _Work | None:
    """Read one stored set and fill its work folder (no deploy hooks); None if it cannot be
    staged (`result` says why) or was never issued."""
    stored = _load(load, result)
    return None if stored is None else _prepare_one(spool, stored, result, tok, staged_at, ())


def _prepare_one(spool: Spool, stored: StoredCert, result: BulkResult, tok: str,
                 staged_at: str, commands: Sequence[HookCommand]) -> _Work | None:
    """Fill one work folder (and run its deploy hooks); None, with `result` saying why, if it
    cannot be staged."""
    if stored.damaged:
        result.error = f"the stored files are damaged ({stored.damaged}); `certbatch renew` " \
                       f"issues it again"
        return None
    folder = _folder(spool, stored.name, tok)
    try:
        os.mkdir(folder, 0o700)
    except OSError as exc:
        result.error = os_error_message(exc, folder)
        return None
    try:
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
        work = _Work(result, folder, [], stored.not_after)
        meta = _meta_json(stored, staged_at)
        problem = _fill_hooked(spool, work, stored, meta, commands) if commands else \
            _fill(work, stored, meta)
    except (OSError, CertbatchError) as exc:
        problem = os_error_message(exc, folder) if isinstance(exc, OSError) else str(exc)
    if problem is None:
        result.ok = True
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


def _publish(spool: Spool, prepared: list[_Work], staged_at: dt.datetime, present: set[str]
             ) -> None:
    """Make every prepared folder durable, then pending (see the module doc). `present`: the
    names in pending/."""
    try:
        # The entries' records are made while the sync waits on the disk (it lets go of
        # Python's lock): 10,000 of them take 80 ms.
        with ThreadPoolExecutor(1, thread_name_prefix="certbatch-sync") as pool:
            syncing = pool.submit(_sync, spool.staging.dir, prepared)
            entries = [PendingEntry(w.result.name, w.result.domains, w.result.serial,
                                    w.not_after, staged_at, spool.pending_dir / w.result.name)
                       for w in prepared]
            syncing.result()
    except BaseException:
        for work in prepared:  # nothing of this batch is pending: not one half entry
            remove(Path(work.folder))
        raise
    point("bulk.synced")
    pending = f"{spool.pending_dir}/"
    for work, entry in zip(prepared, entries, strict=True):
        name = work.result.name
        try:
            if name in present:
                # Pending, but not readable as an entry: replaced as a staging replaces it, old
                # entry aside first; never another user's. (One that appeared since the listing
                # makes the rename below fail, unless it is an empty folder.)
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
        work.result.entry = entry
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
            f'  "not_before": "{iso(stored.not_before)}",\n'  # ASCII: no quoting
            f'  "not_after": "{iso(stored.not_after)}",\n'
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

