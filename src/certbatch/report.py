"""What `certbatch status` shows, as data: one row per certificate, one certificate in detail,
the spool's pending entries and the notify targets' states. Read only: no lock, nothing written,
no network. The command layer renders it (render.py); `--json` prints it as it is.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from .config import CertificateSettings, Settings
from .errors import StoreError, os_error_message
from .renewal import ERROR, Decision
from .runner import Runner, utcnow
from .spool import TargetState
from .spool.entries import PendingEntry
from .store import CertStatus, StoredCert, iso

LIVE_FILES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")


def _ts(value: dt.datetime | None) -> str | None:
    return iso(value) if value else None


def _state(runner: Runner, cert: CertificateSettings, now: dt.datetime
           ) -> tuple[Decision, StoredCert | None, CertStatus]:
    """decide() on the live files; one certificate whose state cannot be read is an `error`
    (or `unreadable`) row, it never hides the others."""
    try:
        return runner.decide(cert, now, verify=True)
    except (StoreError, OSError) as exc:
        if isinstance(exc, OSError):
            why, result = os_error_message(exc, runner.store.cert_dir(cert.name)), "unreadable"
        else:
            why, result = str(exc), "error"
        return Decision(ERROR, why), None, CertStatus(last_result=result, last_error=why)


def _row(cert: CertificateSettings, decision: Decision, stored: StoredCert | None,
         status: CertStatus, now: dt.datetime) -> dict[str, Any]:
    days = None if stored is None else int((stored.not_after - now).total_seconds() // 86400)
    return {
        "name": cert.name,
        "domains": list(cert.domains),
        "serial": stored.serial if stored else None,
        "not_before": _ts(stored.not_before) if stored else None,
        "not_after": _ts(stored.not_after) if stored else None,
        "days_left": days,
        "due": decision.does_work,
        "decision": decision.action,
        "reason": decision.reason,
        "due_at": _ts(decision.due_at),
        "last_result": status.last_result,
        "last_error": status.last_error,
        "last_attempt": _ts(status.last_attempt),
        "last_success": _ts(status.last_success),
        "rate_limited_until": _ts(status.rate_limited_until),
        "failed_orders": status.failed_orders,
        "next_attempt": _ts(status.next_attempt),
        "profile": cert.profile,
        # when the live certificate is to be renewed, and by which rule (renewal.py)
        "next_renewal": _ts(decision.due_at),
        "next_renewal_basis": decision.basis,
        "ari_explanation": status.ari.explanation if status.ari and stored
        and status.ari.serial == stored.serial else None,
    }


def status_data(settings: Settings, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """`status`: one row per configured certificate (the fields the README lists)."""
    runner = Runner(settings)
    now = now or utcnow()
    return [_row(cert, *_state(runner, cert, now), now)
            for cert in settings.certificates.values()]


@dataclass
class SpoolState:
    """The spool as `status` shows it: pending entries and each target's state; `problems`:
    what could not be read (one line each)."""

    pending: list[PendingEntry] = field(default_factory=list)
    targets: list[TargetState] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def spool_state(settings: Settings, runner: Runner | None = None) -> SpoolState:
    runner = runner or Runner(settings)
    state = SpoolState()
    try:
        found = runner.targets()
    except OSError as exc:  # the hooks folder (notify.d: the targets)
        found = []
        state.problems.append(os_error_message(exc))
    try:
        state.pending = runner.spool.pending()
        state.targets = runner.spool.target_states(found)
    except (OSError, StoreError) as exc:
        spool = settings.paths.spool
        state.problems.append(os_error_message(exc, spool) if isinstance(exc, OSError)
                              else str(exc))
    return state


def status_detail(settings: Settings, name: str, now: dt.datetime | None = None
                  ) -> tuple[dict[str, Any], list[str]]:
    """`status NAME`: everything known about one certificate (its row, and the live files'
    paths and dates, the renewal info, the backoff, its pending entry, each target's ledger),
    and the problems met reading the spool. UsageError for a name not in the config."""
    runner = Runner(settings)
    cert = runner.select([name])[0]
    now = now or utcnow()
    decision, stored, status = _state(runner, cert, now)
    detail = _row(cert, decision, stored, status, now)
    live_dir = runner.store.cert_dir(name) / "live"
    detail["live"] = None if stored is None else {
        "folder": str(live_dir),
        "files": {f: str(live_dir / f) for f in LIVE_FILES},
        "version": stored.version,
        "domains": list(stored.domains),
        "key_type": stored.key_type,
        "issued_at": _ts(stored.issued_at),
        "profile": stored.profile,
        "account": stored.account,
        "damaged": stored.damaged,
    }
    detail["key_type"] = cert.key
    detail["staged_version"] = status.staged_version
    # certbatch revoke: which serial, when, why, and whether the next run replaces it
    detail["revoked"] = None if status.revoked_serial is None else {
        "serial": status.revoked_serial, "at": _ts(status.revoked_at),
        "reason": status.revoked_reason, "renew": status.revoked_renew,
        "live": stored is not None and stored.serial == status.revoked_serial}
    ari = status.ari
    detail["ari"] = None if ari is None else {
        **ari.to_dict(), "about_live": stored is not None and ari.serial == stored.serial}
    spool = spool_state(settings, runner)
    entry = next((e for e in spool.pending if e.name == name), None)
    detail["pending"] = None if entry is None else {
        "serial": entry.serial, "not_after": _ts(entry.not_after),
        "staged_at": _ts(entry.staged_at), "folder": str(entry.folder)}
    detail["targets"] = [_target_detail(t, name, stored) for t in spool.targets]
    return detail, spool.problems


def _target_detail(state: TargetState, name: str, stored: StoredCert | None) -> dict[str, Any]:
    """One target's ledger as far as this certificate goes."""
    applied = state.ledger.applied.get(name)
    return {
        "target": state.target.name,
        "state": "problem" if state.target.problem else (state.ledger.last_result
                                                         or "never-run"),
        "problem": state.target.problem,
        "applied_serial": applied,
        "has_live": stored is not None and applied == stored.serial,
        "waiting": name in state.waiting,
        "last_success": _ts(state.ledger.last_success),
        "last_error": state.ledger.last_error,
    }

