"""One run of certbatch: decide, issue in parallel, stage, notify once. Returns a report.

The runner never prints; the command layer renders its report. The ACME stack is imported only
when some certificate needs a new order, so a run with nothing due stays fast.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import ari, httpenv, interrupt, renewal, safefs
from .config import CertificateSettings, Settings
from .digest import Digest, Stamps
from .errors import (
    EXIT_FAILURE,
    EXIT_OK,
    CertbatchError,
    HookError,
    Interrupted,
    LockBusy,
    RateLimited,
    UsageError,
    os_error_message,
)
from .fsutil import FileLock, ensure_root, probe_space
from .hooks import HookCommand, from_config
from .renewal import Decision
from .spool import CertFiles, NotifyOutcome, Spool, TargetState
from .spool.bulk import BulkItem, BulkResult
from .store import CertStatus, Store, StoredCert, iso
from .targets import Target, resolve

if TYPE_CHECKING:
    from .acme_client import AcmeClient

log = logging.getLogger("certbatch.runner")

# Outcomes of one certificate in a run.
ISSUED = "issued"
RENEWED = "renewed"
RESTAGED = "restaged"
NOT_DUE = "not-due"
RATE_LIMITED = "rate-limited"
FAILED = "failed"
NOT_STAGED = "not-staged"  # renewed and stored, but a deploy hook failed
PLANNED = "planned"  # --dry-run
BACKOFF = "backoff"  # the last orders failed and the backoff has not passed: no order
FAILED_OUTCOMES = (FAILED, NOT_STAGED, BACKOFF)
_QUIET_OUTCOMES = {renewal.RATE_LIMITED: RATE_LIMITED, renewal.BACKOFF: BACKOFF}  # else NOT_DUE

# A 429 without Retry-After: wait this long before asking again.
DEFAULT_RATE_LIMIT_WAIT = dt.timedelta(hours=1)


WorkItem = tuple[CertificateSettings, "CertResult", "StoredCert | None", CertStatus]


def _ari_id(cert_pem: bytes) -> str | None:
    """The ARI identifier of a certificate just issued (None: it has no usable AKI)."""
    try:
        return ari.cert_id(cert_pem)
    except ValueError:
        return None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class CertResult:
    """One certificate's decision and outcome in a run."""

    name: str
    domains: tuple[str, ...]
    decision: Decision
    outcome: str = PLANNED
    error: str | None = None
    serial: str | None = None
    not_after: dt.datetime | None = None
    staged: bool = False
    duration: float = 0.0
    profile: str | None = None  # the configured ACME profile (None: the CA's default)
    last_success: dt.datetime | None = None  # from its status, after this run (metrics)

    @property
    def failed(self) -> bool:
        return self.outcome in FAILED_OUTCOMES


@dataclass
class RunReport:
    started_at: dt.datetime
    dry_run: bool = False
    certificates: list[CertResult] = field(default_factory=list)
    notify: NotifyOutcome | None = None  # None: notify phase not run (dry-run, --no-notify)
    notify_skipped: str | None = None
    notify_error: str | None = None  # the notify phase could not run at all (broken spool)
    duration: float = 0.0
    pending_after: int = 0  # entries left in the spool after the run
    targets: list[TargetState] = field(default_factory=list)  # after the notify phase
    interrupted: int | None = None  # the signal that stopped the run, if one did
    # renew(defer_orders=True) found certificates to order and did nothing else: the caller
    # sleeps its jitter without the run lock, then runs again
    deferred: bool = False

    @property
    def failures(self) -> list[CertResult]:
        return [c for c in self.certificates if c.outcome in FAILED_OUTCOMES]  # (10,000s)

    @property
    def notify_failed(self) -> bool:
        return self.notify_error is not None or (self.notify is not None and not self.notify.ok)

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return Interrupted(self.interrupted).exit_code
        return EXIT_FAILURE if self.failures or self.notify_failed else EXIT_OK

    @property
    def changed(self) -> bool:
        """Whether the run did anything worth telling a cron mail about."""
        return any(c.outcome not in (NOT_DUE, RATE_LIMITED, PLANNED) for c in self.certificates) \
            or (self.notify is not None and self.notify.batch_id is not None)


class Progress:
    """Callbacks for a live display; the default does nothing."""

    def planned(self, results: Sequence[CertResult]) -> None: ...
    def started(self, result: CertResult) -> None: ...
    def finished(self, result: CertResult) -> None: ...
    def notifying(self, count: int) -> None: ...


@contextlib.contextmanager
def run_lock(state_dir: Path, wait: float | None = 0,
             command: str | None = None) -> Iterator[None]:
    """One renew or run-hook per state folder. `wait`: seconds to wait (0: fail at once).

    While it is held, `<state>/.running` says who holds it (one JSON line: pid, `command`,
    started_at), which a run that finds the lock busy puts in its message (LockBusy).

    While it is held, SIGTERM, SIGINT and SIGHUP stop the work cleanly (interrupt.graceful):
    the block runs on until every hook is stopped and every status saved, the lock is released
    (hook processes are gone by then, so two notify hooks never overlap), then Interrupted is
    raised.
    """
    ensure_root(state_dir)
    lock = FileLock(state_dir / ".lock")
    marker = state_dir / ".running"
    if not lock.acquire(timeout=wait):
        pid = lock.holder_pid()
        raise LockBusy(lock.path, pid, _lock_holder(marker, pid))
    with interrupt.graceful():  # outside: Interrupted is raised after the release
        try:
            # `.running` outlives only a run that did not end (SIGKILL, power loss): then,
            # and only then, sweep the temp files such a run may have left.
            if os.path.lexists(marker):
                Store(state_dir).sweep()
            fd = safefs.open_file(marker, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                with contextlib.suppress(OSError):  # best effort: it only names the holder
                    os.ftruncate(fd, 0)
                    holder = {"pid": os.getpid(), "command": command,
                              "started_at": iso(utcnow())}
                    os.write(fd, json.dumps(holder).encode() + b"\n")
            finally:
                os.close(fd)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(marker)
        finally:
            lock.release()


def _lock_holder(marker: Path, pid: int | None) -> dict[str, str] | None:
    """What the run lock's holder wrote in `.running` (command, started_at), if it is the
    holder's (`pid`): a marker left by a killed run, or not written yet, names nobody."""
    try:
        data = json.loads(safefs.read_bytes(marker)[:4096])
    except Exception:  # noqa: BLE001 - best effort: a name for a message
        return None
    if not isinstance(data, dict) or pid is None or data.get("pid") != pid:
        return None
    return {k: str(data[k])[:100] for k in ("command", "started_at") if data.get(k)}


class Runner:
    def __init__(self, settings: Settings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.store = Store(settings.paths.state)
        self.spool = Spool(settings.paths.spool, settings.paths.hooks,
                           deploy_timeout=settings.hooks.deploy_timeout,
                           notify_timeout=settings.hooks.notify_timeout,
                           notify_workers=settings.hooks.notify_workers,
                           deploy_workers=settings.hooks.deploy_workers, store=self.store)
        self.progress = progress or Progress()
        self._client: AcmeClient | None = None
        self._ca_pause: tuple[dt.datetime, str] | None = None  # a 429/503 wait seen by ARI

    # -- selection and decisions ---------------------------------------------------------------

    def select(self, only: Sequence[str] = ()) -> list[CertificateSettings]:
        certs = self.settings.certificates
        unknown = [n for n in only if n not in certs]
        if unknown:
            raise UsageError(f"no certificate named {', '.join(unknown)} in {self.settings.path}")
        return [c for n, c in certs.items() if not only or n in only]

    def decide(self, cert: CertificateSettings, now: dt.datetime, force: bool = False,
               verify: bool = False) -> tuple[Decision, StoredCert | None, CertStatus]:
        """`verify`: parse the live files (status, check) instead of the cheap check."""
        stored = self.store.current(cert.name, verify)
        status = self.store.status(cert.name)
        decision = renewal.decide(cert, stored, status, now,
                                  self.settings.renewal.before_expiry, force,
                                  self.settings.renewal.ari)
        return decision, stored, status

    # -- the run -------------------------------------------------------------------------------

    def renew(self, *, force: bool = False, only: Sequence[str] = (), dry_run: bool = False,
              workers: int | None = None, notify: bool = True, jitter: float | None = None,
              sleep: Callable[[float], object] = interrupt.wait,
              defer_orders: bool = False) -> RunReport:
        """Renew what is due, stage it, and run the notify phase once.

        `defer_orders`: when some certificate needs an order, stop after the decisions (renewal
        info refreshed and saved, nothing else done) with `report.deferred`; the caller sleeps
        its jitter without the run lock and runs again (a run with nothing to order reads the
        state once, under the lock, and goes on as usual).

        Interrupted (a signal, see interrupt.py): certificates not started yet are not started
        (and keep their status: they are due next run), the ones in flight fail with
        "interrupted", the notify phase is skipped; `report.interrupted` is the signal.
        """
        t0 = time.monotonic()
        now = utcnow()
        report = RunReport(started_at=now, dry_run=dry_run)
        # Config mistakes about targets, and folders that are not ours, stop the run before
        # any work (exit 2).
        targets = self.targets() if notify and not dry_run else []
        if not dry_run:
            self.preflight()
        work: list[WorkItem] = []
        loaded: list[tuple[CertificateSettings, StoredCert | None, CertStatus]] = []
        rules = self.settings.renewal
        # What earlier runs found quiet and is unchanged is taken as it is (digest.py); the
        # rest gets a full look.
        digest = None if force else Digest(self.settings.paths.state, rules.before_expiry,
                                           rules.ari)
        stamps: dict[str, Stamps | None] = {}
        now_s = now.timestamp()
        for cert in self.select(only):
            if digest is not None:
                cached = digest.lookup(cert, now_s)
                if cached is not None:
                    result = CertResult(cert.name, cert.domains, cached[0], serial=cached[1],
                                        not_after=cached[2], profile=cert.profile,
                                        last_success=cached[3])
                    self._quiet_outcome(result, dry_run)
                    report.certificates.append(result)
                    continue
                stamps[cert.name] = digest.stamps(cert.name)
            try:
                stored = self.store.current(cert.name)
                loaded.append((cert, stored, self.store.status(cert.name)))
            except CertbatchError as exc:
                # Damaged state of one certificate: that one fails, the others go on.
                result = CertResult(cert.name, cert.domains,
                                    Decision(renewal.ERROR, str(exc)), outcome=FAILED,
                                    error=str(exc), profile=cert.profile)
                report.certificates.append(result)
                log.error("%s: %s", cert.name, exc)
                if digest is not None:
                    digest.drop(cert.name)
        ari_changed: set[str] = set()
        if not dry_run and not force and self.settings.renewal.ari:
            queries, ari_changed = self._ari_queries(loaded, now)
            # No jitter before these: light GETs (CDN-cached at Let's Encrypt), and a run
            # with nothing due must not sleep.
            if queries:
                ari_changed |= self._refresh_ari(queries, loaded, now)
        for cert, stored, status in loaded:
            decision = renewal.decide(cert, stored, status, now,
                                      self.settings.renewal.before_expiry, force,
                                      self.settings.renewal.ari)
            result = CertResult(cert.name, cert.domains, decision, profile=cert.profile,
                                last_success=status.last_success)
            if stored:
                result.serial, result.not_after = stored.serial, stored.not_after
            if not decision.does_work:
                self._quiet_outcome(result, dry_run)
            else:
                log.info("%s: %s (%s)", cert.name, decision.action, decision.reason)
            report.certificates.append(result)
            if digest is not None:
                if stored is not None and cert.name not in ari_changed:
                    # (a status written by this run is recorded by the next one)
                    digest.record(cert, stamps.get(cert.name), decision, stored, status,
                                  renewal.quiet_until(stored, status, decision, now,
                                                      rules.before_expiry, rules.ari))
                else:
                    digest.drop(cert.name)
            if decision.does_work:
                work.append((cert, result, stored, status))
            elif cert.name in ari_changed:  # work items save their status when done
                try:
                    self.store.save_status(cert.name, status)
                except OSError as exc:
                    log.error("%s: could not save status: %s", cert.name, exc)
        if defer_orders and not dry_run and any(r.decision.needs_order for _, r, _, _ in work):
            for cert, _, _, status in work:  # what renewal info said, kept for the next pass
                if cert.name in ari_changed:
                    with contextlib.suppress(OSError):
                        self.store.save_status(cert.name, status)
            self._save_caches(digest)
            report.deferred = True
            report.duration = time.monotonic() - t0
            return report
        self._tell(self.progress.planned, report.certificates)
        if dry_run:
            report.duration = time.monotonic() - t0
            return report

        if any(r.decision.needs_order for _, r, _, _ in work):
            # A full disk or quota must stop the run before the CA issues what cannot be
            # stored (the OSError names the folder: exit 1).
            probe_space(self.settings.paths.state)
            probe_space(self.settings.paths.spool)
            self._jitter(jitter, sleep)
            if not interrupt.requested():
                work = self._connect_or_fail(work)
        self._run_pool(work, workers or self.settings.renewal.workers)

        if notify and interrupt.requested():
            report.notify_skipped = "interrupted"
            log.warning("notify phase skipped: interrupted")
        elif notify:
            failed = [r.name for r in report.certificates if r.failed]
            try:
                pending = self.spool.pending()
                if pending:
                    self._tell(self.progress.notifying, len(pending))
                report.notify = self.spool.notify(targets, failed)
                self._restage_damaged(report.notify, report.certificates)
            except (CertbatchError, OSError) as exc:
                # The spool itself is broken: a notify failure, reported like one (exit 1).
                report.notify_error = f"spool {self.settings.paths.spool}: {exc}"
                log.error("notify phase failed: %s", report.notify_error)
            with contextlib.suppress(CertbatchError, OSError):
                report.targets = self.spool.target_states(targets)
        else:
            report.notify_skipped = "--no-notify"
            with contextlib.suppress(CertbatchError, OSError):  # what waits: status, metrics
                report.targets = self.spool.target_states(self.targets())
        with contextlib.suppress(CertbatchError, OSError):
            report.pending_after = len(self.spool.pending())
        self._save_caches(digest)
        report.interrupted = interrupt.signal_number()
        report.duration = time.monotonic() - t0
        return report

    @staticmethod
    def _quiet_outcome(result: CertResult, dry_run: bool) -> None:
        """Set the outcome of a certificate with no work to do, and log its decision."""
        decision = result.decision
        if not dry_run:
            result.outcome = _QUIET_OUTCOMES.get(decision.action, NOT_DUE)
            if result.outcome == BACKOFF:
                # A failure of this run too (exit 1), with no work done; the status keeps the
                # error of the last order.
                result.error = decision.reason
        log.info("%s: %s (%s)", result.name, decision.action, decision.reason)

    def _save_caches(self, digest: Digest | None) -> None:
        """Write back the state index and the digest (under the run lock, at a run's end)."""
        if self.store.index.loaded:
            self.store.index.save(keep=self.settings.certificates)
        if digest is not None:
            digest.save(keep=self.settings.certificates)

    def _run_pool(self, work: Sequence[WorkItem], workers: int) -> None:
        """Process the work items, at most `workers` at a time."""
        if work:
            with ThreadPoolExecutor(max_workers=min(max(1, workers), len(work)),
                                    thread_name_prefix="certbatch") as pool:
                list(pool.map(lambda item: self._process(*item), work))

    def _jitter(self, jitter: float | None, sleep: Callable[[float], object]) -> None:
        """Sleep the random jitter before the first order."""
        delay = self.settings.renewal.jitter if jitter is None else jitter
        if delay > 0:
            pause = random.uniform(0, delay)
            log.info("jitter: sleeping %.1f s before the first ACME request", pause)
            sleep(pause)

    def _ari_queries(self, loaded: Sequence[tuple[CertificateSettings, StoredCert | None,
                                                  CertStatus]],
                     now: dt.datetime) -> tuple[list[ari.Query], set[str]]:
        """The certificates whose renewal info is to be asked for now: live, usable, not
        expired (renewed anyway), and their next check has come; and the names of those that
        cannot be asked about (their status says why, and when to try again)."""
        queries = []
        unaskable = set()
        for cert, stored, status in loaded:
            if stored is None or stored.damaged or now >= stored.not_after \
                    or not ari.needs_check(status.ari, stored.serial, now):
                continue
            try:
                cert_id = stored.ari_id or ari.cert_id(safefs.read_bytes(stored.path("cert.pem")))
            except (ValueError, OSError) as exc:
                # Cannot be asked about: the expiry rule decides, asked again in 6 hours.
                why = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
                status.ari = ari.failed(status.ari, stored.serial, f"no ARI identifier: {why}",
                                        now)
                unaskable.add(cert.name)
                continue
            queries.append(ari.Query(cert.name, stored.serial, cert_id, status.ari))
        return queries, unaskable

    def _refresh_ari(self, queries: Sequence[ari.Query],
                     loaded: Sequence[tuple[CertificateSettings, StoredCert | None,
                                            CertStatus]],
                     now: dt.datetime) -> set[str]:
        """Ask the CA's renewal info for `queries` in parallel (at most renewal.workers at
        once, none past renewal.deadline); store the answers in the statuses. Returns the
        names whose status changed."""
        acme = self.settings.acme
        fetcher = ari.Fetcher(acme.directory, httpenv.verify(acme.ca_bundle),
                              acme.timeout, self.settings.renewal.workers,
                              time.monotonic() + self.settings.renewal.deadline,
                              interrupt.requested)
        states = fetcher.fetch_all(queries, now)
        log.info("ARI: asked about %d certificate%s", len(queries), "s" * (len(queries) != 1))
        if fetcher.paused is not None:  # the CA's wait holds for the orders of this run too
            self._ca_pause = fetcher.paused
            log.warning("ARI: %s; no request to the CA before %s", fetcher.paused[1],
                        fetcher.paused[0].strftime("%Y-%m-%d %H:%M:%SZ"))
        for cert, _, status in loaded:
            if cert.name in states:
                status.ari = states[cert.name]
        return set(states)

    def _connect_or_fail(self, work: list[WorkItem]) -> list[WorkItem]:
        """Fetch the directory and the account once, before the pool. If the CA cannot be
        reached, every certificate that needs an order fails at once with that error, instead
        of each worker retrying (and timing out) in turn; restaging still goes ahead."""
        try:
            self._acme().connect()
            return work
        except Interrupted:
            return work  # not started: each certificate says so (_process)
        except CertbatchError as exc:
            error = str(exc)  # already names the CA's URL
            limited = exc if isinstance(exc, RateLimited) else None
            if limited is not None:
                until = limited.retry_after or utcnow() + DEFAULT_RATE_LIMIT_WAIT
                error = f"{exc} (not retried before {until:%Y-%m-%d %H:%M:%S}Z)"
            log.error("%s", error)
        remaining = []
        for cert, result, stored, status in work:
            if not result.decision.needs_order:
                remaining.append((cert, result, stored, status))
                continue
            result.outcome, result.error = FAILED, error
            if limited is not None:
                status.rate_limited_until = until
            else:
                renewal.record_order_failure(status, utcnow())
            status.last_attempt = utcnow()
            status.last_result, status.last_error = FAILED, error
            with contextlib.suppress(OSError):
                self.store.save_status(cert.name, status)
            self._tell(self.progress.finished, result)
        return remaining

    def _acme(self) -> AcmeClient:
        # Imported here, not at module level: a run with nothing due never loads the ACME stack.
        if self._client is None:
            from .acme_client import AcmeClient
            self._client = AcmeClient(self.settings.acme, self.store)
            if self._ca_pause is not None:
                self._client.pacer.pause(None, *self._ca_pause)
        return self._client

    def _process(self, cert: CertificateSettings, result: CertResult,
                 stored: StoredCert | None, status: CertStatus) -> None:
        """Issue (if needed) and stage one certificate; record everything in `result`/status."""
        if interrupt.requested():
            # Never started: its status stays as it was, so it is just as due next run.
            result.outcome, result.error = FAILED, "interrupted: not started"
            self._tell(self.progress.finished, result)
            return
        t0 = time.monotonic()
        self._tell(self.progress.started, result)
        status.last_attempt = utcnow()
        ordering = False  # an exception while True: the order failed (see the backoff)
        try:
            if result.decision.needs_order:
                ordering = True
                stored = self._issue(cert, stored)
                ordering = False
                result.outcome = ISSUED if result.decision.action == renewal.ISSUE else RENEWED
                status.rate_limited_until = None
                renewal.record_order_success(status)
                if self.settings.renewal.ari and not self._acme().offers_ari:
                    # Known from the directory just used: no request next run to learn it.
                    status.ari = ari.unsupported(stored.serial, utcnow())
            else:
                result.outcome = RESTAGED
            assert stored is not None
            result.serial, result.not_after = stored.serial, stored.not_after
            self._stage(cert, stored, result)
            if result.staged:
                status.staged_version = stored.version
                status.last_success = utcnow()
            else:  # the next run stages it again, also when a restage by hand failed
                status.staged_version = None
        except Interrupted as exc:
            # Nothing half-written: the store and the spool are crash-safe; a certificate stored
            # but not staged is staged by the next run ("restage"), one not stored is due.
            if result.outcome != PLANNED:  # stopped while staging (see above)
                status.staged_version = None
            result.outcome, result.error = FAILED, str(exc)
            ordering = False  # cut short by a signal: not a failed order
        except RateLimited as exc:
            until = exc.retry_after or utcnow() + DEFAULT_RATE_LIMIT_WAIT
            status.rate_limited_until = until
            result.outcome = FAILED
            result.error = f"{exc} (not retried before {until:%Y-%m-%d %H:%M:%S}Z)"
            ordering = False  # the CA's Retry-After is the wait, not the backoff
        except CertbatchError as exc:
            result.outcome = FAILED
            result.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one certificate's bug must not stop the others
            result.outcome = FAILED
            if isinstance(exc, OSError):  # the store could not write: a full disk, read-only
                from .errors import os_error_message
                result.error = os_error_message(exc, self.settings.paths.state)
            else:
                log.exception("%s: unexpected error", cert.name)
                result.error = f"internal error: {type(exc).__name__}: {exc}"
        if ordering and not interrupt.requested():  # a signal's doing is not the CA's
            renewal.record_order_failure(status, utcnow())
        result.duration = time.monotonic() - t0
        status.last_result = result.outcome
        status.last_error = result.error
        result.last_success = status.last_success
        if result.error:
            log.error("%s: %s", cert.name, result.error)
        else:
            log.info("%s: %s in %.1f s", cert.name, result.outcome, result.duration)
        try:
            self.store.save_status(cert.name, status)
        except OSError as exc:
            log.error("%s: could not save status: %s", cert.name, exc)
        self._tell(self.progress.finished, result)

    @staticmethod
    def _tell(callback: Callable[..., None], *args: object) -> None:
        """A progress display is cosmetic: its errors must never end a run."""
        try:
            callback(*args)
        except Exception:  # noqa: BLE001
            log.debug("progress display failed", exc_info=True)

    def preflight(self) -> None:
        """Raise UnsafePath (exit 2) unless the state and spool folders are certbatch's own."""
        self.store.check()
        self.spool.check()

    def targets(self) -> list[Target]:
        """The current notify targets (notify.d files, hooks.targets, hooks.notify)."""
        return resolve(self.settings.paths.hooks, self.settings.hooks, self.settings.path)

    def _restage_damaged(self, outcome: NotifyOutcome, results: Sequence[CertResult]) -> None:
        """A damaged pending entry was removed: make the next run stage it again from the
        store, and fail this run's result of that certificate."""
        by_name = {r.name: r for r in results}
        for d in outcome.damaged:
            with contextlib.suppress(CertbatchError, OSError):
                status = self.store.status(d.name)
                status.staged_version = None
                status.last_result, status.last_error = NOT_STAGED, f"staged entry damaged: " \
                    f"{d.problem}"
                self.store.save_status(d.name, status)
            if d.name in by_name:
                r = by_name[d.name]
                r.outcome, r.staged = NOT_STAGED, False
                r.error = (f"staged entry damaged before it was applied ({d.problem}); staged "
                           f"again from the store by the next run")

    @staticmethod
    def deploy_hooks(cert: CertificateSettings) -> list[HookCommand]:
        """The certificate's `deploy` command (the spool adds deploy.d/ before it)."""
        return from_config(cert.deploy, "config:deploy")

    def _issue(self, cert: CertificateSettings, old: StoredCert | None) -> StoredCert:
        """Order a new certificate with a new key, check it, store it (the old set stays on any
        failure). `old`: the live certificate it replaces (ARI's `replaces`), if any."""
        from . import crypto

        key_pem = crypto.generate_key(cert.key)
        deadline = time.monotonic() + self.settings.renewal.deadline
        replaces = None
        if old is not None and self.settings.renewal.ari:
            try:
                replaces = old.ari_id or ari.cert_id(safefs.read_bytes(old.path("cert.pem")))
            except (ValueError, OSError) as exc:  # e.g. damaged live files: order without
                log.info("%s: ordering without replaces: %s", cert.name, exc)
        issued = self._acme().issue(cert.name, cert.domains, key_pem, cert.challenge, deadline,
                                    cert.profile, replaces, old.account if old else None)
        info = crypto.check_issued(issued.fullchain_pem, key_pem, cert.domains)
        return self.store.save_certificate(
            cert.name, key_type=cert.key, domains=cert.domains, privkey_pem=key_pem,
            cert_pem=issued.cert_pem, chain_pem=issued.chain_pem,
            fullchain_pem=issued.fullchain_pem, serial=info.serial,
            not_before=info.not_before, not_after=info.not_after, issued_at=utcnow(),
            profile=cert.profile, account=issued.account or None, ari_id=_ari_id(issued.cert_pem))

    def _stage(self, cert: CertificateSettings, stored: StoredCert, result: CertResult) -> None:
        """Stage the stored set; any failure here leaves it stored but "not-staged", so the next
        run stages it again without a new order."""
        try:
            outcome = self.spool.stage(self.cert_files(stored), self.deploy_hooks(cert))
            error = None if outcome.ok else str(outcome.error)
        except (CertbatchError, OSError) as exc:
            error = str(exc)
        else:
            if isinstance(outcome.error, HookError) and outcome.error.interrupted:
                what = "renewed and stored" if result.decision.needs_order else "stored"
                raise interrupt.error(f"{what}, not staged (deploy hook {outcome.error.hook} "
                                      f"stopped); the next run stages it")
        if error is None:
            result.staged = True
        else:
            result.outcome = NOT_STAGED
            what = "renewed" if result.decision.needs_order else "stored"
            result.error = f"{what}, not staged: {error}"

    def cert_files(self, stored: StoredCert) -> CertFiles:
        files = self.store.read_files(stored)
        return CertFiles(
            name=stored.name, domains=stored.domains, privkey_pem=files["privkey.pem"],
            cert_pem=files["cert.pem"], chain_pem=files["chain.pem"],
            fullchain_pem=files["fullchain.pem"], serial=stored.serial,
            not_before=stored.not_before, not_after=stored.not_after)

    # -- run-hook ------------------------------------------------------------------------------

    def run_notify(self, only: Sequence[str] = ()) -> NotifyOutcome:
        """The notify phase now, on whatever is pending (an operator's `run-hook`); `only`
        runs just these targets."""
        targets = self.targets()
        self.select_targets(targets, only)
        self.preflight()
        interrupt.check()
        outcome = self.spool.notify(targets, (), only)
        self._restage_damaged(outcome, ())
        return outcome

    @staticmethod
    def select_targets(targets: Sequence[Target], only: Sequence[str]) -> None:
        """Refuse an unknown target name (usage error, exit 2)."""
        known = {t.name for t in targets}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise UsageError(f"no notify target named {', '.join(unknown)} (targets: "
                             f"{', '.join(sorted(known)) or 'none'})")

    def bootstrap(self, target: str) -> tuple[list[CertResult], NotifyOutcome]:
        """`run-hook --target NAME --all`: hand one target every live certificate.

        Its ledger is cleared, every live certificate that is not pending is staged again in
        bulk (spool/bulk.py; through the deploy hooks, if any), then only that target runs.
        Other targets that already have those serials are not run again for them. Only the
        status of a certificate that failed is written (reading 10,000 would cost more than
        the staging): one whose earlier staging had failed is staged once more by the next
        renew, which records it.
        """
        targets = self.targets()
        self.select_targets(targets, [target])
        self.preflight()
        decision = Decision(renewal.RESTAGE, f"run-hook --target {target} --all")
        certs = self.settings.certificates
        # The stored sets are read by the bulk staging, by whichever of its processes takes
        # each; one whose state is unreadable fails alone, the others are still handed over.
        items = [BulkItem(cert.name, tuple(self.deploy_hooks(cert))) for cert in certs.values()]
        workers = self.settings.hooks.deploy_workers or self.settings.renewal.workers
        done, outcome = self.spool.restage_all(target, targets, items, self.store.current,
                                               workers)
        results = [self._restaged(r, certs[r.name].domains, decision) for r in done]
        self.store.index.save(keep=certs)
        if outcome is None:  # a signal came before the notify phase
            interrupt.check()
            raise interrupt.error()
        self._restage_damaged(outcome, results)
        return results, outcome

    def _restaged(self, done: BulkResult, domains: tuple[str, ...], decision: Decision
                  ) -> CertResult:
        """The result of one certificate restaged in bulk; the status of a failed one saved.
        `domains`: the configured ones, for one whose stored state could not be read."""
        if done.unreadable:  # its status is not written: its state could not be read
            return CertResult(done.name, domains, decision, FAILED, done.error)
        result = CertResult(done.name, done.domains, decision, RESTAGED, serial=done.serial,
                            not_after=done.not_after, staged=done.ok)
        if done.ok:
            return result
        result.outcome = FAILED if done.interrupted else NOT_STAGED
        result.error = f"interrupted: stored, not staged ({done.error}); the next run " \
            f"stages it" if done.interrupted else f"stored, not staged: {done.error}"
        log.error("%s: %s", done.name, result.error)
        status = self.store.status(done.name)
        status.staged_version = None  # the next renew stages it
        status.last_attempt = utcnow()
        status.last_result, status.last_error = result.outcome, result.error
        try:
            self.store.save_status(done.name, status)
        except OSError as exc:
            log.error("%s: could not save status: %s", done.name, exc)
        return result

    def restage(self, name: str) -> CertResult:
        """Stage one stored certificate again through the deploy hooks (`run-hook --deploy`)."""
        cert = self.select([name])[0]
        self.preflight()
        stored = self.store.current(name)
        if stored is None:
            raise UsageError(f"certificate {name} has not been issued yet; run `certbatch renew`")
        status = self.store.status(name)
        result = CertResult(name, stored.domains,
                            Decision(renewal.RESTAGE, "requested with run-hook --deploy"))
        self._process(cert, result, stored, status)
        interrupt.check()  # its status says so; the command says only "interrupted"
        if result.staged:  # asked for by hand: every target applies it again
            self.spool.forget(name=name)
        return result
