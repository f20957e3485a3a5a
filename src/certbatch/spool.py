"""The spool: a locked staging area where renewed certificates wait to be applied in one batch.

Layout (every folder 0700, whatever the umask)::

    <spool>/.lock              flock'ed while deploy hooks run, committing, recovering and
                               notifying; never deleted
    <spool>/.prepare.lock      shared-flock'ed by every staging that has a .tmp folder
    <spool>/.staging/          work folders: <name>.<token>.tmp (filled before .lock is
                               taken; deploy hooks run here),
                               <name>.<token>.ready (hooks succeeded), <name>.<token>.old
                               (the pending entry being replaced)
    <spool>/pending/<name>/    one folder per staged certificate, latest staging wins
    <spool>/batch.json         the batch being notified (present only while it runs or failed)
    <spool>/applied/<batch-id>/  entries of the last successful batches, with batch.json

Replacing ``pending/<name>`` is two renames on one file system: the old entry goes aside to
``.staging/<name>.<token>.old``, then ``<name>.<token>.ready`` becomes ``pending/<name>``, then the
old one is deleted. A crash between any two steps leaves either the old entry or the complete
new one (".ready" is only ever a finished staging); whoever next takes the lock finishes the
swap (recovery), so the latest successful staging always wins and is never lost.

The certificate's files are copied and fsync'ed into the ``.tmp`` folder before the spool lock is
taken, so the lock is only held for the deploy hooks and the renames: with hundreds of
certificates renewed in parallel, the stagings queue for the lock. From before its mkdir until its
folder is committed or removed, each such writer holds a shared flock on ``<spool>/.prepare.lock``
(a file: that works on NFS too); recovery deletes ``.tmp`` folders only when it can take that lock
exclusively, i.e. when nobody, in any process or thread, is between prepare and commit.
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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HookError, StoreError
from .fsutil import FileLock, atomic_write, ensure_dir, fsync_dir, write_new
from .hooks import HookCommand, HookResult, discover, run_hook
from .store import iso, parse_iso

log = logging.getLogger("certbatch.spool")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
BATCH_ID_RE = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{6}\Z")
BATCH_VERSION = 1
META_VERSION = 1


@dataclass(frozen=True)
class CertFiles:
    """A renewed certificate as the runner hands it in for staging."""

    name: str
    domains: tuple[str, ...]
    privkey_pem: bytes
    cert_pem: bytes
    chain_pem: bytes
    fullchain_pem: bytes
    serial: str  # hex
    not_before: dt.datetime  # tz-aware
    not_after: dt.datetime  # tz-aware


@dataclass(frozen=True)
class PendingEntry:
    """A staged certificate waiting for the next successful notify."""

    name: str
    domains: tuple[str, ...]
    serial: str
    not_after: dt.datetime
    staged_at: dt.datetime
    folder: Path


@dataclass
class StageOutcome:
    ok: bool
    results: list[HookResult] = field(default_factory=list)
    error: HookError | None = None


@dataclass
class NotifyOutcome:
    """`batch_id` is None (and `ok` True) when nothing was pending and no hook ran."""

    batch_id: str | None
    names: list[str]
    results: list[HookResult]
    ok: bool
    error: HookError | None


def _token() -> str:
    """Unique, time-sortable, dot-free suffix for work folders."""
    return f"{time.time_ns():020d}-{secrets.token_hex(3)}"


def _new_batch_id() -> str:
    now = dt.datetime.now(dt.timezone.utc)
    # Microseconds too: "keep the last 5" prunes by name, and two batches can share a second.
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond:06d}Z-{secrets.token_hex(3)}"


def _sync_tree(top: Path) -> None:
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


class Spool:
    """The staging area under `root`; hooks come from `hooks_dir`/deploy.d and /notify.d.

    `stage` and `notify` take `lock` themselves (waiting as long as needed) and are safe to call
    from several threads and processes; don't call them while holding `lock`.
    """

    def __init__(self, root: Path, hooks_dir: Path, deploy_timeout: float = 120,
                 notify_timeout: float = 300, keep_applied: int = 5) -> None:
        self.root = Path(root).absolute()  # hooks run with another cwd
        self.hooks_dir = Path(hooks_dir).absolute()
        self.deploy_timeout = deploy_timeout
        self.notify_timeout = notify_timeout
        self.keep_applied = keep_applied
        self.pending_dir = self.root / "pending"
        self.applied_dir = self.root / "applied"
        self.staging_dir = self.root / ".staging"
        self.batch_file = self.root / "batch.json"
        self.lock = FileLock(self.root / ".lock")
        self.prepare_lock = self.root / ".prepare.lock"

    # -- what hooks get (also used for dry-run display) --------------------------------------

    def deploy_commands(self, extra: Sequence[HookCommand] = ()) -> list[HookCommand]:
        """deploy.d hooks (sorted) then `extra`: the order stage() runs them in."""
        return discover(self.hooks_dir / "deploy.d") + list(extra)

    def notify_commands(self, extra: Sequence[HookCommand] = ()) -> list[HookCommand]:
        """notify.d hooks (sorted) then `extra`: the order notify() runs them in."""
        return discover(self.hooks_dir / "notify.d") + list(extra)

    def deploy_env(self, cert_name: str, domains: Sequence[str],
                   stage_dir: Path) -> dict[str, str]:
        stage_dir = Path(stage_dir)
        return {
            "CERTBATCH_NAME": cert_name,
            "CERTBATCH_DOMAINS": " ".join(domains),
            "CERTBATCH_STAGE_DIR": str(stage_dir),
            "CERTBATCH_KEY_FILE": str(stage_dir / "privkey.pem"),
            "CERTBATCH_CERT_FILE": str(stage_dir / "cert.pem"),
            "CERTBATCH_CHAIN_FILE": str(stage_dir / "chain.pem"),
            "CERTBATCH_FULLCHAIN_FILE": str(stage_dir / "fullchain.pem"),
            "CERTBATCH_SPOOL_DIR": str(self.root),
        }

    def notify_env(self, names: Sequence[str], failed_names: Sequence[str]) -> dict[str, str]:
        return {
            "CERTBATCH_SPOOL_DIR": str(self.root),
            "CERTBATCH_BATCH_FILE": str(self.batch_file),
            "CERTBATCH_NAMES": " ".join(names),
            "CERTBATCH_COUNT": str(len(names)),
            "CERTBATCH_FAILED_NAMES": " ".join(failed_names),
        }

    # -- locking and crash recovery ---------------------------------------------------------

    def _ensure_layout(self) -> None:
        for folder in (self.root, self.pending_dir, self.applied_dir, self.staging_dir):
            ensure_dir(folder, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_layout()
        if not self.lock.acquire(timeout=0):
            # Usually another worker thread of this run staging its certificate: debug only.
            log.debug("waiting for the spool lock %s (last taken by process %s)",
                      self.lock.path, self.lock.holder_pid() or "?")
            self.lock.acquire()
        try:
            self._recover()
            yield
        finally:
            self.lock.release()

    @contextlib.contextmanager
    def _preparing(self) -> Iterator[None]:
        """Hold .prepare.lock shared: while we have a .tmp folder, _recover leaves them all."""
        fd = os.open(self.prepare_lock, os.O_RDWR | os.O_CREAT, 0o600)
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
            fd = os.open(self.prepare_lock, os.O_RDWR)
        except FileNotFoundError:
            return True  # every staging creates it before its .tmp folder
        except OSError as exc:
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

    def _recover(self) -> None:
        """Finish or discard what a crashed staging left in .staging/ (called with the lock).

        .ready and .old folders only exist under the lock, so they are a crash's leftovers.
        A .tmp folder may belong to a live staging that has not got the lock yet: it is deleted
        only when nobody is preparing (see _nobody_preparing).
        """
        groups: dict[tuple[str, str], set[str]] = {}
        for entry in sorted(os.listdir(self.staging_dir)):
            parts = entry.rsplit(".", 2)
            if len(parts) != 3 or parts[2] not in ("tmp", "ready", "old"):
                log.warning("spool: removing unknown leftover %s", self.staging_dir / entry)
                self._remove(self.staging_dir / entry)
                continue
            groups.setdefault((parts[0], parts[1]), set()).add(parts[2])
        # Token order = staging order, so if several finished stagings of one name were left,
        # the latest is committed last and wins.
        idle: bool | None = None  # _nobody_preparing(), asked once, only if a .tmp is there
        for (name, token), states in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if "tmp" in states:
                if idle is None:
                    idle = self._nobody_preparing()
                if idle:
                    log.warning("spool: discarding unfinished staging of %s", name)
                    self._remove(self.staging_dir / f"{name}.{token}.tmp")
            if "ready" in states:
                log.warning("spool: completing interrupted staging of %s", name)
                self._commit(name, token)
            elif "old" in states:
                old = self.staging_dir / f"{name}.{token}.old"
                target = self.pending_dir / name
                if target.exists():
                    self._remove(old)
                else:  # only reachable if .ready vanished: keep what we have
                    log.warning("spool: restoring pending entry %s", name)
                    os.rename(old, target)
                    fsync_dir(self.pending_dir)

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _commit(self, name: str, token: str) -> None:
        """Make .staging/<name>.<token>.ready the pending entry of `name` (see module doc)."""
        ready = self.staging_dir / f"{name}.{token}.ready"
        old = self.staging_dir / f"{name}.{token}.old"
        target = self.pending_dir / name
        if target.exists():
            os.rename(target, old)
            fsync_dir(self.pending_dir)
            fsync_dir(self.staging_dir)
        os.rename(ready, target)
        fsync_dir(self.staging_dir)
        fsync_dir(self.pending_dir)
        self._remove(old)

    # -- staging ----------------------------------------------------------------------------

    def stage(self, cert: CertFiles, extra_deploy: Sequence[HookCommand] = ()) -> StageOutcome:
        """Copy `cert` into a fresh folder, run the deploy hooks there, then make it pending.

        Runs deploy.d hooks (sorted) then `extra_deploy`, stopping at the first failure; on
        failure the new folder is removed and any earlier pending/<name> stays as it was.
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
            with self._preparing():
                work = self._prepare(cert, meta)
                try:
                    with self._locked():
                        return self._stage_locked(cert, work, extra_deploy)
                finally:
                    self._remove(work)  # gone already if committed
        except OSError as exc:
            raise StoreError(f"spool {self.root}: staging {cert.name} failed: {exc}") from exc

    def _prepare(self, cert: CertFiles, meta: dict[str, object]) -> Path:
        """Write the certificate into a new .tmp work folder, fsync'ed, without the spool lock
        (the caller holds .prepare.lock shared)."""
        work = self.staging_dir / f"{cert.name}.{_token()}.tmp"
        work.mkdir(mode=0o700)
        try:
            os.chmod(work, 0o700)  # mkdir's mode is filtered by the umask
            write_new(work / "privkey.pem", cert.privkey_pem, 0o600)
            write_new(work / "cert.pem", cert.cert_pem, 0o644)
            write_new(work / "chain.pem", cert.chain_pem, 0o644)
            write_new(work / "fullchain.pem", cert.fullchain_pem, 0o644)
            meta["staged_at"] = iso(dt.datetime.now(dt.timezone.utc))
            write_new(work / "meta.json", json.dumps(meta, indent=2) + "\n", 0o644)
            fsync_dir(work)
        except BaseException:
            self._remove(work)
            raise
        return work

    def _stage_locked(self, cert: CertFiles, work: Path,
                      extra_deploy: Sequence[HookCommand]) -> StageOutcome:
        """Run the deploy hooks in `work` (prepared), then make it pending."""
        token = work.name[len(cert.name) + 1:-len(".tmp")]
        env = self.deploy_env(cert.name, cert.domains, work)
        results: list[HookResult] = []
        for cmd in self.deploy_commands(extra_deploy):
            result = run_hook(cmd, env, work, self.deploy_timeout)
            results.append(result)
            if not result.ok:
                log.warning("%s: deploy hook %s failed, staging discarded", cert.name, cmd.name)
                return StageOutcome(False, results, result.error())
        if results:
            _sync_tree(work)  # deploy hooks don't fsync what they write
        os.rename(work, work.with_name(f"{cert.name}.{token}.ready"))
        # From here on the staging is complete: recovery would finish it.
        self._commit(cert.name, token)
        log.info("%s: staged (serial %s)", cert.name, cert.serial)
        return StageOutcome(True, results, None)

    # -- pending entries and the notify phase -----------------------------------------------

    def pending(self) -> list[PendingEntry]:
        """The staged entries, sorted by name. Doesn't lock: a snapshot for display."""
        try:
            names = sorted(os.listdir(self.pending_dir))
        except FileNotFoundError:
            return []
        entries = []
        for name in names:
            folder = self.pending_dir / name
            if name.startswith(".") or not NAME_RE.match(name):
                continue
            try:
                meta = json.loads((folder / "meta.json").read_text())
                entries.append(PendingEntry(
                    name=name,
                    domains=tuple(meta["domains"]),
                    serial=str(meta["serial"]),
                    not_after=parse_iso(meta["not_after"]),
                    staged_at=parse_iso(meta["staged_at"]),
                    folder=folder,
                ))
            except (FileNotFoundError, NotADirectoryError):
                continue  # moved away meanwhile, or not an entry
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("spool: ignoring %s: unreadable meta.json (%s)", folder, exc)
        return entries

    def notify(self, extra_notify: Sequence[HookCommand] = (),
               failed_names: Sequence[str] = ()) -> NotifyOutcome:
        """Apply everything pending as one batch: batch.json, then each notify hook once.

        notify.d hooks (sorted) then `extra_notify` run with the lock held, stopping at the first
        failure. Success moves the entries to applied/<batch-id>/; failure leaves them all
        pending for the next call. Raises StoreError if the spool can't be written.
        """
        try:
            with self._locked():
                return self._notify_locked(extra_notify, failed_names)
        except OSError as exc:
            raise StoreError(f"spool {self.root}: notify failed: {exc}") from exc

    def _notify_locked(self, extra_notify: Sequence[HookCommand],
                       failed_names: Sequence[str]) -> NotifyOutcome:
        entries = self.pending()
        if not entries:
            log.info("spool: nothing pending, no notify hook run")
            return NotifyOutcome(None, [], [], True, None)
        batch_id = _new_batch_id()
        names = [e.name for e in entries]
        batch = {
            "version": BATCH_VERSION,
            "batch_id": batch_id,
            "created_at": iso(dt.datetime.now(dt.timezone.utc)),
            "spool_dir": str(self.root),
            "count": len(entries),
            "names": names,
            "failed_names": list(failed_names),
            "certificates": [
                {
                    "name": e.name,
                    "domains": list(e.domains),
                    "serial": e.serial,
                    "not_after": iso(e.not_after),
                    "staged_at": iso(e.staged_at),
                    "folder": str(e.folder),
                }
                for e in entries
            ],
        }
        batch_json = json.dumps(batch, indent=2) + "\n"
        atomic_write(self.batch_file, batch_json, 0o600)

        env = self.notify_env(names, failed_names)
        commands = self.notify_commands(extra_notify)
        if not commands:
            log.info("spool: no notify hooks configured; batch %s applied as is", batch_id)
        results: list[HookResult] = []
        for cmd in commands:
            result = run_hook(cmd, env, self.root, self.notify_timeout)
            results.append(result)
            if not result.ok:
                log.warning("spool: notify hook %s failed; %d certificate(s) stay pending",
                            cmd.name, len(names))
                return NotifyOutcome(batch_id, names, results, False, result.error())

        self._apply(batch_id, batch_json, names)
        log.info("spool: batch %s applied (%d certificate(s))", batch_id, len(names))
        return NotifyOutcome(batch_id, names, results, True, None)

    def _apply(self, batch_id: str, batch_json: str, names: Sequence[str]) -> None:
        """Move the notified entries to applied/<batch_id>/ and prune old batches.

        A crash in here leaves some entries pending: they are notified again next time, which
        re-installs identical files (hooks must be idempotent anyway).
        """
        dest = self.applied_dir / batch_id
        ensure_dir(dest, 0o700)
        atomic_write(dest / "batch.json", batch_json, 0o600)
        for name in names:
            os.rename(self.pending_dir / name, dest / name)
        fsync_dir(self.pending_dir)
        fsync_dir(dest)
        self.batch_file.unlink()
        fsync_dir(self.root)
        self._prune()

    def _prune(self) -> None:
        batches = []
        for entry in os.listdir(self.applied_dir):
            path = self.applied_dir / entry
            if BATCH_ID_RE.match(entry) and path.is_dir():
                # Ids sort by time to the second; the folder's mtime breaks ties.
                batches.append((entry[:16], path.stat().st_mtime_ns, path))
        batches.sort()
        for _, _, path in batches[: max(len(batches) - self.keep_applied, 0)]:
            shutil.rmtree(path, ignore_errors=True)

    def applied(self) -> list[str]:
        """Ids of the kept applied batches, oldest first."""
        try:
            entries = os.listdir(self.applied_dir)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if BATCH_ID_RE.match(e))
