"""The spool: a locked staging area where renewed certificates wait until every target has
applied them.

Layout (every folder 0700, whatever the umask)::

    <spool>/.lock              flock'ed shared by every staging while its deploy hooks run and it
                               commits, exclusively while recovering and applying; never deleted
    <spool>/.prepare.lock      shared-flock'ed by every staging that has a .tmp folder
    <spool>/.staging/          work folders of stagings, and <name>.lock of each running one
                               (see staging.py)
    <spool>/pending/<name>/    one folder per staged certificate, latest staging wins
    <spool>/targets/<target>/  each target's ledger.json, and the batch.json and names files it
                               was handed (kept after a failure; see ledger.py)
    <spool>/applied/<batch-id>/  entries every target has applied, with a batch.json record;
                               the last `keep_applied` batches are kept
    <spool>/.trash/<batch-id>.<token>/  an older batch, renamed here under the lock and deleted
                               after it by a process of its own (see `_prune`, `empty_trash`)

The certificate's files are copied into a work folder before the spool lock is taken. The deploy
hooks get those copies; once they ran, each public file (cert, chain, fullchain) they left
unchanged is replaced by a hard link to the same file in the store, which is on disk already, so
only the key, meta.json and what the hooks wrote need an fsync (see `_seal`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import interrupt, safefs
from ..config import HookSettings
from ..errors import CertbatchError, StoreError, UnsafePath, os_error_message
from ..faults import point
from ..fsutil import (
    atomic_write,
    ensure_dir,
    ensure_root,
    fsync_dir,
    ordered_journal,
    remove_leftovers,
    write_new,
)
from ..hooks import HookCommand, HookResult, discover, run_hook, scan
from ..locks import SharedLock
from ..store import Store, iso
from ..targets import Target, resolve
from . import bulk
from .apply import Batch, TargetOutcome, apply_all
from .entries import META_VERSION, NAME_RE, CertFiles, PendingEntry, entry_problem, read_pending
from .env import batch_json, deploy_env, notify_env
from .ledger import Ledger, Ledgers
from .staging import Staging, remove, sync_tree

log = logging.getLogger("certbatch.spool")

BATCH_ID_RE = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{6}\Z")
TRASH = ".trash"  # <spool>/.trash/: applied batches pruned, waiting to be deleted


@dataclass
class StageOutcome:
    ok: bool
    results: list[HookResult] = field(default_factory=list)
    error: CertbatchError | None = None


@dataclass
class Damaged:
    """A pending entry found broken before any target got it; removed from pending/."""

    name: str
    problem: str


@dataclass
class NotifyOutcome:
    """One notify phase. `batch_id` is None when nothing was pending and no target ran."""

    batch_id: str | None
    names: list[str] = field(default_factory=list)  # the pending entries it looked at
    targets: list[TargetOutcome] = field(default_factory=list)
    damaged: list[Damaged] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # left pending/: every target has them
    no_targets: bool = False  # nothing to apply to: the entries were marked applied as is

    @property
    def ok(self) -> bool:
        return not self.damaged and all(t.ok for t in self.targets)

    @property
    def failed_targets(self) -> list[TargetOutcome]:
        return [t for t in self.targets if not t.ok]

    @property
    def results(self) -> list[HookResult]:
        """The hook runs, in target order."""
        return [t.result for t in self.targets if t.result is not None]

    @property
    def error(self) -> CertbatchError | None:
        """The first failure: a HookError if a target's hook failed."""
        for t in self.failed_targets:
            if t.result is not None:
                return t.result.error()
            return CertbatchError(t.error or f"target {t.target} failed")
        if self.damaged:
            d = self.damaged[0]
            return CertbatchError(f"{d.name}: staged entry damaged: {d.problem}")
        return None


def _new_batch_id() -> str:
    now = dt.datetime.now(dt.timezone.utc)
    # Microseconds too: "keep the last 5" prunes by name, and two batches can share a second.
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond:06d}Z-{secrets.token_hex(3)}"


class Spool:
    """The staging area under `root`; hooks come from `hooks_dir`/deploy.d and /notify.d.

    `stage` and `notify` take `lock` themselves (waiting as long as needed) and are safe to call
    from several threads and processes; don't call them while holding `lock`. Stagings share
    the lock (at most `deploy_workers` of this object run deploy hooks at a time; None: no
    limit); `notify`, `forget` and recovery hold it alone. With `store`, staged files the
    hooks left unchanged become hard links to the store's (see `_seal`).
    """

    def __init__(self, root: Path, hooks_dir: Path, deploy_timeout: float = 120,
                 notify_timeout: float = 300, keep_applied: int = 5,
                 notify_workers: int = 4, deploy_workers: int | None = None,
                 store: Store | None = None) -> None:
        self.root = Path(root).absolute()  # hooks run with another cwd
        self.hooks_dir = Path(hooks_dir).absolute()
        self.deploy_timeout = deploy_timeout
        self.notify_timeout = notify_timeout
        self.notify_workers = notify_workers
        self.keep_applied = keep_applied
        self.pending_dir = self.root / "pending"
        self.applied_dir = self.root / "applied"
        self.trash_dir = self.root / TRASH
        self.staging = Staging(self.root)
        self.ledgers = Ledgers(self.root)
        self.lock = SharedLock(self.root / ".lock")
        self._layout_ok = False  # _ensure_layout checked the folders already
        self.store = store
        # deploy_workers 1 takes the lock exclusively per staging, as certbatch always did: one
        # staging at a time in every thread and process. More: a limit for this object (run).
        self._serial = deploy_workers == 1
        self._deploy_slots = threading.BoundedSemaphore(deploy_workers) \
            if deploy_workers and deploy_workers > 1 else None
        self._swept = False  # leftover temp files removed (once per Spool object: per run)
        self._trash_waiting = False  # .trash/ has something: empty it once the lock is free
        self._trash_here = False  # ... in this process (an earlier deleter did not finish)

    # -- what hooks get (also used for dry-run display) --------------------------------------

    def deploy_commands(self, extra: Sequence[HookCommand] = ()) -> list[HookCommand]:
        """deploy.d hooks (sorted) then `extra`: the order stage() runs them in."""
        return discover(self.hooks_dir / "deploy.d") + list(extra)

    def deploy_env(self, cert_name: str, domains: Sequence[str],
                   stage_dir: Path) -> dict[str, str]:
        return deploy_env(self.root, cert_name, domains, stage_dir)

    def deploy_folder_shown(self, cert_name: str) -> Path:
        """Where a staging of `cert_name` would run its deploy hooks, for a dry run to show
        (the random part of the name as ``<token>``)."""
        return self.staging.work_folder_shown(cert_name)

    def target_env(self, target: Target, names: Sequence[str]) -> dict[str, str]:
        """What `target` would get to apply `names` (its own env, then certbatch's variables),
        for a dry run to show."""
        return {**target.env, **notify_env(self.root, target.name,
                                           self.ledgers.folder(target.name), names, [])}

    def default_targets(self) -> list[Target]:
        """The notify.d files as targets, with this spool's timeout (no config entries)."""
        return resolve(self.hooks_dir, HookSettings(notify_timeout=self.notify_timeout))

    # -- locking and crash recovery ---------------------------------------------------------

    def _ensure_layout(self) -> None:
        """Create the spool's folders, or check that they are its own (safefs). Once per
        Spool: the check walks every parent folder of the root, and a run stages thousands."""
        if self._layout_ok:
            return
        ensure_root(self.root)
        for folder in (self.pending_dir, self.applied_dir, self.staging.dir, self.ledgers.dir):
            ensure_dir(folder, 0o700)
        self._layout_ok = True

    def check(self) -> None:
        """Create the spool's folders, or raise UnsafePath unless they and its lock files are
        its own (see safefs): run before any work."""
        self._ensure_layout()
        if os.path.lexists(self.trash_dir):
            safefs.check_dir(self.trash_dir)
        for path in (self.lock.path, self.staging.prepare_lock):
            try:
                why = safefs.problem(os.lstat(path), "file")
            except FileNotFoundError:
                continue
            if why:
                raise UnsafePath(path, why)

    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        """Hold the spool lock: exclusively, recovering first; or shared, for a staging (which
        recovers only its own name's leftovers: see _stage_locked)."""
        self._ensure_layout()
        if not self.lock.acquire(timeout=0, shared=shared):
            # Usually a notify, or stagings of another process: debug only.
            log.debug("waiting for the spool lock %s (last taken by process %s)",
                      self.lock.path, self.lock.holder_pid() or "?")
            self.lock.acquire(shared=shared)
        try:
            if not shared:
                self._recover()
            yield
        finally:
            self.lock.release()
            if self._trash_waiting:
                self._trash_waiting = False
                if self._trash_here:  # unless a deleter is at work after all
                    self._trash_here = False
                    with contextlib.suppress(OSError):  # best effort: the next run tries again
                        empty_trash(self.trash_dir, wait=False)
                else:
                    self._empty_trash_later()

    def _recover(self) -> None:
        """What crashed runs left (call holding the spool lock exclusively)."""
        self.staging.recover()
        # Earlier versions kept one batch.json for all notify hooks (each target has its
        # own now); a crash could also leave it behind.
        remove(self.root / "batch.json")
        # Temp files of a run killed while it wrote a ledger, a target's batch.json or
        # names, or an applied/ record: every writer there holds this lock. Once per run.
        # An applied/<batch>/ folder is not read (it may hold thousands of entries): a
        # batch.json temp file left in it goes when the batch is pruned.
        if not self._swept:
            remove_leftovers(self.ledgers.dir, levels=2)
            remove_leftovers(self.applied_dir)
            # Batches a run pruned but did not finish deleting (killed, or its deleting
            # process was: a service manager may kill what a run leaves behind, as systemd's
            # KillMode does): deleted by this run itself once the lock is released, so that
            # the trash cannot grow where no background process outlives a run.
            if _trash_left(self.trash_dir):
                log.info("spool: old applied batches left in %s; deleting them once the "
                         "spool lock is released", self.trash_dir)
                self._trash_waiting = self._trash_here = True
            self._swept = True

    # -- staging ----------------------------------------------------------------------------

    def stage(self, cert: CertFiles, extra_deploy: Sequence[HookCommand] = ()) -> StageOutcome:
        """Copy `cert` into a fresh folder, run the deploy hooks there, then make it pending.

        Runs deploy.d hooks (sorted) then `extra_deploy`, stopping at the first failure; on
        failure the new folder is removed and any earlier pending/<name> stays as it was.
        Stagings of other names run at the same time; one of the same name waits.
        Raises ValueError for an invalid name, StoreError if the spool can't be written.
        """
        if not NAME_RE.match(cert.name):
            raise ValueError(f"invalid certificate name {cert.name!r}")
        if any(not d or d != d.strip() or " " in d for d in cert.domains):
            raise ValueError(f"{cert.name}: invalid domain list {cert.domains!r}")
        meta = {
            "version": META_VERSION,
            "name": cert.name,
            "domains": list(cert.domains),
            "serial": cert.serial,
            "not_before": iso(cert.not_before),
            "not_after": iso(cert.not_after),
        }
        try:
            self._ensure_layout()
            with self.staging.preparing():
                work, written = self._prepare(cert, meta)
                try:
                    with self._locked(shared=not self._serial), \
                            self.staging.name_lock(cert.name):
                        return self._stage_locked(cert, work, written, extra_deploy)
                finally:
                    remove(work)  # gone already if committed
        except OSError as exc:
            raise StoreError(f"staging {cert.name} failed: "
                             f"{os_error_message(exc, self.root)}") from exc

    def _prepare(self, cert: CertFiles, meta: dict[str, object]
                 ) -> tuple[Path, dict[str, os.stat_result]]:
        """Write the certificate into a new .tmp work folder without the spool lock (the caller
        holds .prepare.lock shared); not synced yet (see `_seal`). Returns the folder and the
        lstat of each PEM file as written."""
        work = self.staging.work_folder(cert.name)
        work.mkdir(mode=0o700)
        written = {}
        try:
            os.chmod(work, 0o700)  # mkdir's mode is filtered by the umask
            for filename, data, mode in _pem_files(cert):
                write_new(work / filename, data, mode, sync=False)
                written[filename] = os.lstat(work / filename)
            meta["staged_at"] = iso(dt.datetime.now(dt.timezone.utc))
            write_new(work / "meta.json", json.dumps(meta, indent=2) + "\n", 0o644, sync=False)
        except BaseException:
            remove(work)
            raise
        return work, written

    def _stage_locked(self, cert: CertFiles, work: Path, written: dict[str, os.stat_result],
                      extra_deploy: Sequence[HookCommand]) -> StageOutcome:
        """Run the deploy hooks in `work` (prepared), check what they left, make it pending
        (holding the spool lock shared and the name's lock)."""
        # A staging of this name that a crash cut short after its hooks: committed before
        # ours, so that ours, the latest, wins.
        self.staging.recover(cert.name)
        broken = [f for f in scan(self.hooks_dir / "deploy.d") if f.state == "problem"]
        if broken:
            return StageOutcome(False, [], CertbatchError(
                f"deploy hook {broken[0].path}: {broken[0].why}; staging discarded"))
        env = self.deploy_env(cert.name, cert.domains, work)
        results: list[HookResult] = []
        with self._deploy_slots or contextlib.nullcontext():
            for cmd in self.deploy_commands(extra_deploy):
                result = run_hook(cmd, env, work, self.deploy_timeout)
                results.append(result)
                if not result.ok:
                    log.warning("%s: deploy hook %s failed, staging discarded", cert.name,
                                cmd.name)
                    return StageOutcome(False, results, result.error())
        if results:
            problem = entry_problem(work, cert.serial, cert.name)
            if problem:
                return StageOutcome(False, results, CertbatchError(
                    f"the deploy hooks left the staged files damaged ({problem}); staging "
                    f"discarded"))
        self._seal(cert, work, written)
        self.staging.check_replaceable(cert.name)  # before the point of no return
        tok = self.staging.mark_ready(work, cert.name)
        self.staging.commit(cert.name, tok)
        log.info("%s: staged (serial %s)", cert.name, cert.serial)
        return StageOutcome(True, results, None)

    def _seal(self, cert: CertFiles, work: Path, written: dict[str, os.stat_result]) -> None:
        """Make `work` durable before it becomes .ready, with as few fsyncs as that takes.

        Each public PEM file the hooks left exactly as written (same inode, size, times, mode and
        one link: a hook that edited, replaced, chmod'ed or linked it changed one of them) is
        replaced by a hard link to the stored version's file, already synced by the store; the
        hooks never had that link, so nothing they do can change the store's file. The private
        key stays a copy: it exists nowhere else, and damage done to a pending entry (a person,
        a script) must never reach it. The rest (the key, meta.json, what the hooks wrote or
        changed, and every copy if there is no stored file to link: another file system, no
        store) is fsync'ed, then the folders; where the journal commits in order, the folders
        are left to the fsync of pending/ that commits the entry (fsutil.ordered_journal).
        """
        source = self._stored_folder(cert)
        linked: set[str] = set()
        if source is not None:
            for filename, data, mode in _pem_files(cert):
                if filename not in LINKED:
                    continue
                try:
                    now = os.lstat(work / filename)
                except FileNotFoundError:
                    continue
                if _fingerprint(now) == _fingerprint(written[filename]) and \
                        _link_same(source / filename, work / filename, data, mode):
                    linked.add(filename)
                    point("staging.linked")
        sync_tree(work, skip=linked,
                  folders=not ordered_journal(work, self.staging.pending_dir))

    def _stored_folder(self, cert: CertFiles) -> Path | None:
        """The store's live version folder of `cert`, if it holds this serial."""
        if self.store is None:
            return None
        try:
            stored = self.store.current(cert.name)
        except (CertbatchError, OSError) as exc:
            log.debug("%s: staged files are copied: %s", cert.name, exc)
            return None
        if stored is None or stored.serial != cert.serial or stored.damaged:
            return None
        return stored.folder

    # -- pending entries and the notify phase -----------------------------------------------

    def pending(self) -> list[PendingEntry]:
        """The staged entries, sorted by name. Doesn't lock: a snapshot for display."""
        return read_pending(self.pending_dir)

    def notify(self, targets: Sequence[Target] | None = None, failed_names: Sequence[str] = (),
               only: Sequence[str] = ()) -> NotifyOutcome:
        """Apply what is pending: each target gets what its ledger lacks, in parallel.

        `targets` are all current targets (default: the notify.d files); `only` names the ones
        to run now (default: all). An entry leaves pending/ for applied/<batch-id>/ once every
        current target has applied it. Raises StoreError if the spool can't be written.
        """
        if targets is None:
            targets = self.default_targets()
        try:
            with self._locked():
                return self._notify_locked(list(targets), failed_names, only)
        except OSError as exc:
            raise StoreError(f"notify failed: {os_error_message(exc, self.root)}") from exc

    def restage_all(self, target: str, targets: Sequence[Target], items: Sequence[bulk.BulkItem],
                    load: bulk.Load, workers: int
                    ) -> tuple[list[bulk.BulkResult], NotifyOutcome | None]:
        """`run-hook --target TARGET --all` in one exclusive hold of the spool lock: forget what
        TARGET applied, stage every item that was issued and is not pending in bulk (bulk.py;
        `load` reads an item's stored set; `workers`: deploy hooks of that many certificates
        at once), then the notify phase for TARGET alone, which does not check again the
        entries the bulk staging just checked. The outcome is None when a signal came before
        the notify phase. A certificate whose stored state cannot be read fails alone (its
        result is `unreadable`; it is among the targets' CERTBATCH_FAILED_NAMES). Raises
        StoreError if the spool can't be written."""
        try:
            with self._locked():
                self.ledgers.forget(target)
                done = bulk.restage(self, items, load, workers)
                if interrupt.requested():
                    return done, None
                failed = [r.name for r in done if not r.ok]
                checked = {r.name: r.entry for r in done if r.entry is not None}
                return done, self._notify_locked(list(targets), failed, [target], checked)
        except OSError as exc:
            raise StoreError(f"restaging failed: {os_error_message(exc, self.root)}") from exc

    def _notify_locked(self, targets: list[Target], failed_names: Sequence[str],
                       only: Sequence[str], checked: Mapping[str, PendingEntry] | None = None
                       ) -> NotifyOutcome:
        """The notify phase (holding the spool lock exclusively). `checked`: entries staged
        and checked in this hold of the lock, neither read nor checked again."""
        self.ledgers.drop_removed([t.name for t in targets])
        broken: list[tuple[str, str]] = []
        entries = read_pending(self.pending_dir, broken, checked)
        damaged = [self._drop(name, problem) for name, problem in broken]
        if not entries and damaged:
            return NotifyOutcome(_new_batch_id(), damaged=damaged)
        if not entries:
            log.info("spool: nothing pending, no target run")
            return NotifyOutcome(None)
        batch = Batch(_new_batch_id(), self.root, list(failed_names))
        if not targets:
            log.warning("spool: no notify targets; %d certificate(s) marked applied as is",
                        len(entries))
            self._move_applied(batch, entries)
            return NotifyOutcome(batch.batch_id, [e.name for e in entries],
                                 applied=[e.name for e in entries], no_targets=True)
        loaded = {t.name: self.ledgers.load(t.name) for t in targets}
        running = [t for t in targets if not only or t.name in only]
        entries, found = self._check_entries(entries, [loaded[t.name] for t in running],
                                             checked or {})
        damaged += found
        outcomes = apply_all(batch, running, entries, self.ledgers, loaded, self.notify_workers)
        done = [e for e in entries if not any(loaded[t.name].waiting([e]) for t in targets)]
        self._move_applied(batch, done)
        outcome = NotifyOutcome(batch.batch_id, [e.name for e in entries], outcomes, damaged,
                                [e.name for e in done])
        log.info("spool: batch %s: %d target(s) ran, %d failed; %d certificate(s) applied "
                 "everywhere, %d still pending", batch.batch_id,
                 sum(t.ran for t in outcomes), len(outcome.failed_targets), len(done),
                 len(entries) - len(done))
        return outcome

    def _check_entries(self, entries: list[PendingEntry], ledgers: list[Ledger],
                       checked: Mapping[str, PendingEntry]
                       ) -> tuple[list[PendingEntry], list[Damaged]]:
        """Verify every entry one of `ledgers` is waiting for, but the `checked` ones (staged
        and checked in this hold of the lock); a damaged one leaves pending/ (its certificate
        is still in the store: the runner stages it again next run)."""
        sound, damaged = [], []
        for entry in entries:
            problem = None
            if checked.get(entry.name) is not entry and \
                    any(ledger.waiting([entry]) for ledger in ledgers):
                problem = entry_problem(entry.folder, entry.serial)
            if problem is None:
                sound.append(entry)
            else:
                damaged.append(self._drop(entry.name, problem))
        return sound, damaged

    def _drop(self, name: str, problem: str) -> Damaged:
        """Remove a damaged entry of our own from pending/ (its certificate is still in the
        store: the runner has it staged again by the next run)."""
        log.error("spool: %s: staged entry damaged (%s); removed, it is staged again from "
                  "the store by the next run", name, problem)
        remove(self.pending_dir / name)
        fsync_dir(self.pending_dir)
        return Damaged(name, problem)

    def _move_applied(self, batch: Batch, entries: Sequence[PendingEntry]) -> None:
        """Move entries every target has applied to applied/<batch_id>/ and prune old batches.

        A crash in here leaves some entries pending: the ledgers say every target has them, so
        the next notify moves them without running anything.
        """
        if not entries:
            return
        dest = self.applied_dir / batch.batch_id
        ensure_dir(dest, 0o700)
        atomic_write(dest / "batch.json", batch_json(batch.batch_id, None, self.root, entries,
                                                     batch.failed_names, batch.records), 0o600)
        into = f"{dest}/"  # strings: 10,000 renames after a run-hook --all
        for entry in entries:
            os.rename(entry.folder, into + entry.name)
            point("apply.entry-moved")
        fsync_dir(self.pending_dir)
        fsync_dir(dest)
        point("apply.moved")
        self._prune()

    def _prune(self) -> None:
        """Keep the last `keep_applied` batches of our own (ids sort by time, to the µs).

        An older batch is renamed into .trash/ (one atomic rename: it is in applied/ or out of
        it, never half deleted there) and deleted once the spool lock is released, by a process
        of its own (`_empty_trash_later`): deleting 10,000 entries (60,000 files) took 10-35 s
        on the reference VM's disk, the notify phase and the lock held all along. The rename
        is not synced: a power cut that undoes it puts the batch back in applied/, and the next
        prune renames it again. What a killed run or deleter leaves in .trash/ is never read as
        a batch or an entry, and the next run that locks the spool deletes it (`_recover`).
        """
        batches = sorted(e for e in os.listdir(self.applied_dir) if BATCH_ID_RE.match(e)
                         and safefs.problem(os.lstat(self.applied_dir / e)) is None)
        old = batches[: max(len(batches) - self.keep_applied, 0)]
        if not old:
            return
        try:
            ensure_dir(self.trash_dir, 0o700)
            for batch_id in old:
                # The token: never onto a folder of the same name (a rename undone by a power
                # cut, and the batch renamed again).
                os.rename(self.applied_dir / batch_id,
                          self.trash_dir / f"{batch_id}.{secrets.token_hex(3)}")
                point("prune.moved")
                self._trash_waiting = True
        except (CertbatchError, OSError) as exc:
            # Housekeeping after every target has applied: it never fails the notify phase.
            # The batch stays in applied/, and the next prune tries again.
            log.warning("spool: cannot prune applied batches into %s: %s", self.trash_dir,
                        os_error_message(exc) if isinstance(exc, OSError) else exc)

    def _empty_trash_later(self) -> None:
        """Start a process of its own (a new session, in the background, niced; the run does
        not wait for it, and it holds no lock of the run's: its file descriptors are closed)
        that deletes what .trash/ holds (`empty_trash`). Where none can be started, it is
        deleted here (the spool lock is released already)."""
        pkg = str(Path(__file__).resolve().parents[2])  # the folder with certbatch/ in it
        try:
            # The child forks and exits at once: the grandchild, reparented, deletes, and no
            # zombie is left to this process, which waits only for that first exit.
            subprocess.run([sys.executable, "-c", _EMPTIER, str(self.trash_dir), pkg],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd="/", start_new_session=True,
                           timeout=30, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("spool: no process to delete %s (%s); deleting it now", self.trash_dir,
                      exc)
            with contextlib.suppress(OSError):  # best effort: the next run tries again
                empty_trash(self.trash_dir, wait=False)

    def applied(self) -> list[str]:
        """Ids of the kept applied batches, oldest first."""
        try:
            entries = os.listdir(self.applied_dir)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if BATCH_ID_RE.match(e))

    # -- targets' state ---------------------------------------------------------------------

    def forget(self, target: str | None = None, name: str | None = None) -> None:
        """Make `target` (or every target) apply `name` (or everything) again."""
        with self._locked():
            self.ledgers.forget(target, name)

    def retire(self, name: str) -> tuple[bool, list[str]]:
        """Drop every trace of a certificate that is gone from the config (`certbatch remove`):
        its pending entry (no target gets it any more), its name in every ledger, and its
        copies in applied/ (keys included). Returns whether a pending entry was removed, and
        the targets whose ledger named it. Raises UnsafePath for an entry that is not
        certbatch's own (nothing is deleted through a link)."""
        if not NAME_RE.match(name):
            raise ValueError(f"invalid certificate name {name!r}")
        with self._locked():
            entry = self.pending_dir / name
            had_entry = os.path.lexists(entry)
            if had_entry:
                self._delete_entry(entry, name)
            targets = [t for t in self.ledgers.known() if name in self.ledgers.load(t).applied]
            for target in targets:
                self.ledgers.forget(target, name)
            for copy in self.applied_copies(name):
                self._delete_entry(copy, name)
            self._delete_trashed(name)
            return had_entry, targets

    def applied_copies(self, name: str) -> list[Path]:
        """`name`'s entries in the kept applied/ batches, oldest first."""
        return [self.applied_dir / b / name for b in self.applied()
                if os.path.lexists(self.applied_dir / b / name)]

    def trashed_copies(self, name: str) -> list[Path]:
        """`name`'s entries in pruned batches that wait in .trash/ to be deleted (UnsafePath
        if .trash/ is not certbatch's own folder)."""
        try:
            safefs.check_dir(self.trash_dir)
            batches = sorted(os.listdir(self.trash_dir))
        except FileNotFoundError:
            return []
        return [self.trash_dir / b / name for b in batches
                if os.path.lexists(self.trash_dir / b / name)]

    def _delete_trashed(self, name: str) -> None:
        """Delete `name`'s entries in the pruned batches that wait in .trash/, keys included,
        now: the process deleting them may have been killed. It may also be deleting them at
        this moment (it does not take the spool lock): what it deleted first is not an error."""
        try:
            safefs.check_dir(self.trash_dir)  # never through a link someone put there
            batches = os.listdir(self.trash_dir)
        except FileNotFoundError:
            return
        for batch in batches:
            copy = self.trash_dir / batch / name
            try:
                if not stat.S_ISDIR(os.lstat(self.trash_dir / batch).st_mode) or \
                        not os.path.lexists(copy):
                    continue
                safefs.check_dir(self.trash_dir / batch)
                safefs.check_dir(copy)
            except FileNotFoundError:
                continue
            while os.path.lexists(copy):  # again if the deleter took a file from under it
                try:
                    shutil.rmtree(copy)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StoreError(f"entry {copy} not all deleted: "
                                     f"{os_error_message(exc)}") from exc

    def _delete_entry(self, entry: Path, name: str) -> None:
        """Delete a pending or applied entry of certbatch's own (UnsafePath otherwise): aside
        first (no target sees it after this rename), then deleted; whatever cannot be deleted
        is an error naming it, not a silent leftover key."""
        safefs.check_dir(entry.parent)
        safefs.check_dir(entry)
        grave = self.staging.dir / f"{name}.retired.tmp"
        try:
            remove(grave)
            os.rename(entry, grave)
            fsync_dir(entry.parent)
            shutil.rmtree(grave)
        except OSError as exc:
            raise StoreError(f"entry {entry} not all deleted: {os_error_message(exc)}") from exc

    def target_states(self, targets: Sequence[Target]) -> list[TargetState]:
        """Each target's ledger and what waits for it. Doesn't lock: a snapshot for display."""
        entries = self.pending()
        return [TargetState(t, ledger, [e.name for e in ledger.waiting(entries)])
                for t in targets for ledger in [self.ledgers.load(t.name)]]


LINKED = ("cert.pem", "chain.pem", "fullchain.pem")  # public: the store can get them again


def _trash_left(trash: Path) -> bool:
    try:
        with os.scandir(trash) as it:
            return any(True for _ in it)
    except OSError:  # none, or not a folder (Spool.check says so; a prune warns)
        return False


def empty_trash(trash: Path | str, wait: bool = True) -> None:
    """Delete what `trash` (<spool>/.trash/) holds: batches `Spool._prune` renamed there.

    Runs in a process of its own (`_EMPTIER`), without the spool lock: nothing reads the trash,
    and a prune only adds to it. Two of these take turns (a flock on the folder); the one that
    waited deletes what came meanwhile. Never follows a link: a folder of certbatch's own is
    deleted by shutil.rmtree (through folder descriptors), anything else is unlinked; a crash
    halfway leaves part of a folder here, which the next run deletes. Best effort: what cannot
    be deleted stays, tried again by the next run. `wait` False: return at once if another
    one is at work (it deletes what is there when it is done, and what came meanwhile).
    """
    try:
        fd = os.open(trash, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if safefs.problem(os.fstat(fd)) is not None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        failed: set[str] = set()
        while names := [n for n in os.listdir(fd) if n not in failed]:
            for name in names:
                if interrupt.requested():  # deleting in a run (not the background process)
                    return  # a stop ends it: the rest waits for the next run
                path = os.path.join(trash, name)
                try:
                    st = os.lstat(path)
                    if stat.S_ISDIR(st.st_mode) and safefs.problem(st) is None:
                        point("trash.deleting")
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    failed.add(name)
    finally:
        os.close(fd)


# What the deleting process runs: fork (the parent exits at once, see _empty_trash_later), nice.
# argv[2], last on the path, finds this certbatch where a run found it by its folder.
_EMPTIER = """import os, sys
if os.fork():
    os._exit(0)
os.nice(10)
sys.path.append(sys.argv[2])
from certbatch.spool.spool import empty_trash
empty_trash(sys.argv[1])
"""


def _pem_files(cert: CertFiles) -> tuple[tuple[str, bytes, int], ...]:
    """(file name, content, mode) of the four PEM files, as the store keeps them too."""
    return (("privkey.pem", cert.privkey_pem, 0o600), ("cert.pem", cert.cert_pem, 0o644),
            ("chain.pem", cert.chain_pem, 0o644), ("fullchain.pem", cert.fullchain_pem, 0o644))


def _fingerprint(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
            st.st_nlink, st.st_uid, st.st_gid)


def _link_same(src: Path, dest: Path, data: bytes, mode: int) -> bool:
    """Replace `dest` with a hard link to `src` if that is a regular file of ours with `mode`
    and exactly `data`; False (nothing changed) if it cannot be: another file system, too many
    links, a different file."""
    tmp = dest.with_name(f".{dest.name}.link")
    try:
        os.link(src, tmp, follow_symlinks=False)  # a symlink is linked as such: refused below
    except OSError as exc:
        log.debug("%s: not linked, kept as a copy: %s", dest, os.strerror(exc.errno or 0))
        return False
    try:
        fd = safefs.open_file(tmp)  # no link followed; a regular file of ours
        try:
            st = os.fstat(fd)
            with os.fdopen(os.dup(fd), "rb") as fh:
                same = stat.S_IMODE(st.st_mode) == mode and fh.read(len(data) + 1) == data
        finally:
            os.close(fd)
        if same:
            os.replace(tmp, dest)
            return True
        log.debug("%s: the stored file differs; kept as a copy", dest)
    except (OSError, CertbatchError) as exc:
        log.debug("%s: not linked, kept as a copy: %s", dest, exc)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return False


@dataclass
class TargetState:
    target: Target
    ledger: Ledger
    waiting: list[str]

    @property
    def failing(self) -> bool:
        return self.target.problem is not None or self.ledger.last_result == "failed"

