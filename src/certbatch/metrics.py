"""Prometheus textfile-collector output, written atomically after each run."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from .config import Settings
from .fsutil import atomic_write
from .runner import FAILED_OUTCOMES, RunReport
from .store import Store


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def render(settings: Settings, store: Store, report: RunReport,
           now: float | None = None) -> str:
    """The metrics text for this run (Prometheus text exposition format 0.0.4)."""
    now = time.time() if now is None else now
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:.15g}")

    expiry, success, ok, result = [], [], [], []
    outcomes = {c.name: c for c in report.certificates}
    for name in settings.certificates:
        lab = f'{{name="{_label(name)}"}}'
        this_run = outcomes.get(name)
        not_after: dt.datetime | None
        if this_run is not None and this_run.not_after is not None:
            # What the run knew after its work: no store read (10,000 certificates with
            # nothing due read nothing per certificate, see digest.py).
            not_after, last_success = this_run.not_after, this_run.last_success
            last = this_run.outcome
        else:  # not in this run (renew NAME), never issued, or its state unreadable
            stored = store.current(name)
            status = store.status(name)
            not_after = stored.not_after if stored else None
            last_success = status.last_success
            last = this_run.outcome if this_run else (status.last_result or "unknown")
        if not_after is not None:
            expiry.append((lab, not_after.timestamp()))
        if last_success:
            success.append((lab, last_success.timestamp()))
        ok.append((lab, 0.0 if last in FAILED_OUTCOMES else 1.0))
        result.append((f'{{name="{_label(name)}",result="{_label(last)}"}}', 1.0))
    metric("certbatch_certificate_expiry_timestamp_seconds", "gauge",
           "Expiry (notAfter) of the live certificate, as a Unix timestamp.", expiry)
    metric("certbatch_certificate_last_success_timestamp_seconds", "gauge",
           "Last time the certificate was renewed and staged successfully.", success)
    metric("certbatch_certificate_last_run_ok", "gauge",
           "1 if the certificate's last run did not fail, else 0.", ok)
    metric("certbatch_certificate_last_result", "gauge",
           "Outcome of the certificate's last run (label result).", result)
    metric("certbatch_spool_pending_certificates", "gauge",
           "Certificates staged in the spool and not yet applied by a notify hook.",
           [("", float(report.pending_after))])
    notify_ok = 0.0 if report.notify_failed else 1.0
    metric("certbatch_notify_ok", "gauge", "0 if the last notify phase failed, else 1.",
           [("", notify_ok)])
    t_success, t_waiting, t_ok = [], [], []
    for state in report.targets:
        lab = f'{{target="{_label(state.target.name)}"}}'
        if state.ledger.last_success:
            t_success.append((lab, state.ledger.last_success.timestamp()))
        t_waiting.append((lab, float(len(state.waiting))))
        t_ok.append((lab, 0.0 if state.failing else 1.0))
    metric("certbatch_target_last_success_timestamp_seconds", "gauge",
           "Last time the notify target applied its batch successfully.", t_success)
    metric("certbatch_target_pending_entries", "gauge",
           "Staged certificates the notify target has not applied yet.", t_waiting)
    metric("certbatch_target_last_run_ok", "gauge",
           "0 if the notify target's last run failed or it cannot run, else 1.", t_ok)
    metric("certbatch_run_duration_seconds", "gauge", "Wall time of the last run.",
           [("", round(report.duration, 3))])
    metric("certbatch_run_timestamp_seconds", "gauge", "When the last run finished.",
           [("", round(now, 3))])
    metric("certbatch_run_exit_code", "gauge", "Exit code of the last run.",
           [("", float(report.exit_code))])
    return "\n".join(lines) + "\n"


def write(path: Path, settings: Settings, store: Store, report: RunReport) -> None:
    """Replace the metrics file atomically (the collector may read it at any moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, render(settings, store, report), 0o644)
