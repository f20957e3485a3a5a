"""Turning reports into text, tables and JSON for the command layer (no click here)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from . import renewal
from .renewal import Decision
from .runner import FAILED_OUTCOMES, CertResult, Progress, RunReport
from .spool import NotifyOutcome, TargetState
from .store import iso

if TYPE_CHECKING:
    from .hooks import HookCommand
    from .plans import DeployPlan, NotifyPlan
    from .retire import Removal

REPORT_SCHEMA_VERSION = 2  # 2: per-target notify results and target states
FIX_HINT = "fix it, then run `certbatch run-hook`"


def ts(value: dt.datetime | None) -> str | None:
    return iso(value) if value else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def notify_to_dict(notify: NotifyOutcome | None) -> dict[str, Any] | None:
    if notify is None:
        return None
    return {
        "ran": notify.batch_id is not None,
        "batch_id": notify.batch_id,
        "names": list(notify.names),
        "ok": notify.ok,
        "error": str(notify.error) if notify.error else None,
        "no_targets": notify.no_targets,
        "applied": list(notify.applied),
        "damaged": [{"name": d.name, "problem": d.problem} for d in notify.damaged],
        "targets": [{
            "target": t.target,
            "ran": t.ran,
            "ok": t.ok,
            "names": list(t.names),
            "error": t.error,
            "returncode": t.result.returncode if t.result else None,
            "timed_out": t.result.timed_out if t.result else False,
            "duration_seconds": round(t.result.duration, 3) if t.result else 0.0,
        } for t in notify.targets],
        "hooks": [{"hook": r.hook, "returncode": r.returncode, "timed_out": r.timed_out,
                   "duration_seconds": round(r.duration, 3)} for r in notify.results],
    }


def target_state_to_dict(state: TargetState) -> dict[str, Any]:
    t, ledger = state.target, state.ledger
    return {
        "target": t.name,
        "source": t.source,
        "state": "problem" if t.problem else (ledger.last_result or "never-run"),
        "problem": t.problem,
        "waiting": len(state.waiting),
        "waiting_names": list(state.waiting),
        "last_attempt": ts(ledger.last_attempt),
        "last_success": ts(ledger.last_success),
        "last_error": ledger.last_error,
    }


def notify_lines(notify: NotifyOutcome) -> list[str]:
    """What a successful notify phase did, for stdout (failures: see notify_error_lines)."""
    if notify.batch_id is None:
        return []
    if notify.no_targets:
        return [f"notify: no notify targets (hooks/notify.d/ is empty, no hooks.targets or "
                f"hooks.notify): {_plural(len(notify.applied), 'certificate')} marked applied "
                f"without running anything"]
    ran = [t for t in notify.targets if t.ran and t.ok]
    if not ran:
        return []
    what = ", ".join(f"{t.target} ({len(t.names)})" for t in ran)
    return [f"notify: applied batch {notify.batch_id} to {what}"]


def notify_error_lines(notify: NotifyOutcome, known: Sequence[str] = ()) -> list[str]:
    """One line per failed target and per damaged entry not already reported in `known`."""
    lines = []
    for t in notify.failed_targets:
        stay = "stays" if len(t.names) == 1 else "stay"
        lines.append(f"notify failed for target {t.target}: {t.error}; "
                     f"{_plural(len(t.names), 'certificate')} {stay} pending for it: {FIX_HINT}")
    for d in notify.damaged:
        if d.name not in known:
            lines.append(f"{d.name}: staged entry damaged before it was applied ({d.problem}); "
                         f"staged again from the store by the next `certbatch renew`")
    return lines


def cert_to_dict(c: CertResult) -> dict[str, Any]:
    return {
        "name": c.name,
        "domains": list(c.domains),
        "decision": c.decision.action,
        "reason": c.decision.reason,
        "due_at": ts(c.decision.due_at),
        "outcome": c.outcome,
        "error": c.error,
        "serial": c.serial,
        "not_after": ts(c.not_after),
        "staged": c.staged,
        "duration_seconds": round(c.duration, 3),
        "profile": c.profile,
    }


def report_to_dict(report: RunReport) -> dict[str, Any]:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "started_at": ts(report.started_at),
        "duration_seconds": round(report.duration, 3),
        "dry_run": report.dry_run,
        "exit_code": report.exit_code,
        "summary": summary_counts(report),
        "certificates": [cert_to_dict(c) for c in report.certificates],
        "notify": notify_to_dict(report.notify),
        "notify_skipped": report.notify_skipped,
        "notify_error": report.notify_error,
        "pending_after": report.pending_after,
        "targets": [target_state_to_dict(t) for t in report.targets],
    }


def summary_counts(report: RunReport) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in report.certificates:
        counts[c.outcome] = counts.get(c.outcome, 0) + 1
    return counts


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


def decision_text(decision: Decision) -> str:
    """Why a certificate was ordered or staged, for people: "expires 2026-12-01 03:00Z",
    "asked for with --force", not the internal `force: forced`."""
    if decision.action == renewal.FORCE:
        return "asked for with --force"
    return decision.reason


def plan_lines(report: RunReport) -> list[str]:
    """`renew --dry-run`: one line per certificate with its decision."""
    width = max((len(c.name) for c in report.certificates), default=0)
    return [f"{c.name:<{width}}  {c.decision.action:<12}  {c.decision.reason}"
            for c in report.certificates]


def summary_lines(report: RunReport, verbose: bool = False) -> list[str]:
    """Short plain-text summary: every certificate that did something, then notify."""
    lines = []
    width = max((len(c.name) for c in report.certificates), default=0)
    for c in report.certificates:
        if c.outcome in FAILED_OUTCOMES:
            continue  # failures go to stderr, see error_lines
        if c.outcome in ("not-due", "rate-limited") and not verbose:
            continue
        detail = f"serial {c.serial}, expires {c.not_after:%Y-%m-%d}" if (
            c.serial and c.not_after and c.outcome not in ("not-due", "rate-limited")) \
            else c.decision.reason
        lines.append(f"{c.name:<{width}}  {c.outcome:<12}  {detail}")
    if report.notify is not None:
        lines.extend(notify_lines(report.notify))
    counts = summary_counts(report)
    total = ", ".join(f"{v} {k}" for k, v in counts.items())
    n_certs = len(report.certificates)
    lines.append(f"{n_certs} certificate{'s' if n_certs != 1 else ''}: {total} "
                 f"({report.duration:.1f} s)")
    return lines


SHOWN_NAMES = 5  # a cause that failed more certificates than this gives only their count


def failure_lines(failures: Sequence[CertResult]) -> list[str]:
    """One line per distinct cause: a certificate's own error as `NAME: OUTCOME: ERROR`; an error
    shared by several (the CA unreachable: every order failed at once with its text) as one
    `N certificates OUTCOME: ERROR` line, naming them when they are few. First-seen order."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    for c in failures:
        groups.setdefault((c.outcome, c.error), []).append(c.name)
    lines = []
    for (outcome, error), names in groups.items():
        if len(names) == 1:
            lines.append(f"{names[0]}: {outcome}: {error}")
            continue
        which = f" ({', '.join(names)})" if len(names) <= SHOWN_NAMES else ""
        lines.append(f"{_plural(len(names), 'certificate')}{which} {outcome}: {error}")
    return lines


def error_lines(report: RunReport, certificates: bool = True) -> list[str]:
    """stderr lines of a run: its failures (`certificates`: also those of the certificates,
    one line per distinct cause), then the notify phase's."""
    lines = failure_lines(report.failures) if certificates else []
    if report.notify is not None:
        lines.extend(notify_error_lines(report.notify, [c.name for c in report.failures]))
    if report.notify_error:
        lines.append(f"notify failed: {report.notify_error}; {FIX_HINT}")
    return lines


def _due_cell(row: dict[str, Any]) -> str:
    if row["decision"] == "backoff" and row.get("next_attempt"):
        at = row["next_attempt"]  # 2026-12-01T04:10:00Z
        return f"backoff until {at[:10]} {at[11:16]}Z"
    return str(row["decision"]) if row["due"] else "no"


def _next_renewal_cell(row: dict[str, Any]) -> str:
    """`2026-12-03 14:00Z (ARI)`: when the live certificate renews, by which rule."""
    at = row.get("next_renewal")
    if not at:
        return "-"
    return f"{at[:10]} {at[11:16]}Z ({row.get('next_renewal_basis') or '?'})"


def _minute(at: str | None) -> str:
    """`2026-11-29T03:00:12Z` -> `2026-11-29 03:00Z`."""
    return f"{at[:10]} {at[11:16]}Z" if at else "?"


def last_result_text(row: dict[str, Any]) -> str:
    """The last result for people: "renewal failed 2026-11-29 03:00Z: ...; the certificate
    from 2026-09-01 is still live", "renewed 2026-11-29 03:00Z"."""
    result, error, at = row["last_result"], row["last_error"], row.get("last_attempt")
    if not result:
        return "-"
    if result in ("error", "unreadable"):  # its state cannot be read (report.py)
        return f"{result}: {error}"
    still_live = f"; the certificate from {row['not_before'][:10]} is still live" \
        if row.get("serial") and row.get("not_before") else ""
    if result == "failed":
        what = "renewal failed" if row.get("serial") else "issuance failed"
        return f"{what} {_minute(at)}: {error}{still_live}"
    if error:  # not-staged, and whatever else carries an error
        return f"{result} {_minute(at)}: {error}{still_live}"
    words = {"restaged": "staged again"}
    return f"{words.get(result, result)} {_minute(at)}"


STATUS_WIDTH = 100  # `status` lines are cut to the terminal's width, to this without one
MIN_LAST_RESULT = 30  # the last column keeps at least this much, whatever the width


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 3, 0)] + "..."


DOMAINS_WIDTH = 40  # longer lists show their first name and a count (status NAME: all)


def _domains_cell(domains: Sequence[str]) -> str:
    joined = ",".join(domains)
    if len(joined) <= DOMAINS_WIDTH or len(domains) < 2:
        return joined
    return f"{domains[0]} (+{len(domains) - 1})"


def status_rows(rows: Sequence[dict[str, Any]], width: int | None = None) -> list[str]:
    """The `status` table; with `width`, each line's last column (the last result, which
    holds the errors) is cut to fit, and a line below says where the full text is."""
    headers = ["NAME", "DOMAINS", "EXPIRES", "DAYS", "DUE", "PROFILE", "NEXT RENEWAL",
               "LAST RESULT"]
    table = [headers] + [[
        r["name"], _domains_cell(r["domains"]),
        r["not_after"][:10] if r["not_after"] else "-",
        "-" if r["days_left"] is None else str(r["days_left"]),
        _due_cell(r),
        r["profile"] or "-",
        _next_renewal_cell(r),
        last_result_text(r),
    ] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers) - 1)]
    lines = []
    cut = False
    for row in table:
        head = "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  "
        last = row[-1]
        if width is not None:
            last = _cut(last, max(width - len(head), MIN_LAST_RESULT))
            cut = cut or last != row[-1]
        lines.append(head + last)
    if cut:
        lines.append("(cut to the width: `certbatch status NAME` shows everything about NAME)")
    # The CA explains a renewal window it moved (a revocation coming, say): worth reading.
    return lines + [f"{r['name']}: the CA explains its renewal window: {r['ari_explanation']}"
                    for r in rows if r.get("ari_explanation")]


def detail_lines(d: dict[str, Any]) -> list[str]:
    """`status NAME`: everything known about one certificate, one fact a line, nothing cut."""
    lines = [f"certificate: {d['name']}", f"domains: {' '.join(d['domains'])}",
             f"key: {d['key_type']}", f"profile: {d['profile'] or '(the CA default)'}"]
    live = d.get("live")
    if live is None:
        lines.append("live: none (not issued yet)")
    else:
        lines += [f"live: {live['folder']} (version {live['version']})"]
        lines += [f"  {name}: {path}" for name, path in live["files"].items()]
        lines += [f"serial: {d['serial']}",
                  f"valid: {_minute(d['not_before'])} to {_minute(d['not_after'])} "
                  f"({d['days_left']} days left)",
                  f"issued: {_minute(live['issued_at'])}"
                  + (f" with profile {live['profile']}" if live["profile"] else "")]
        if live["domains"] != d["domains"]:
            lines.append(f"live domains: {' '.join(live['domains'])} (the config changed: "
                         f"reissued by the next run)")
        if live["damaged"]:
            lines.append(f"damaged: {live['damaged']}")
        if live["account"]:
            lines.append(f"account: {live['account']}")
    lines.append(f"next renewal: {_next_renewal_cell(d)}")
    lines.append("decision now: backoff (see below)" if d["decision"] == "backoff" else
                 f"decision now: {d['decision']} ({d['reason']})")
    ari = d.get("ari")
    if ari:
        about = "" if ari["about_live"] else f" (about serial {ari['serial']}, not the live one)"
        if ari["unsupported"]:
            lines.append(f"renewal info (ARI): not offered by the CA{about}")
        elif ari["window_start"]:
            lines.append(f"renewal info (ARI): window {_minute(ari['window_start'])} to "
                         f"{_minute(ari['window_end'])}, renew at {_minute(ari['renew_at'])}, "
                         f"checked {_minute(ari['checked_at'])}{about}")
        else:
            lines.append(f"renewal info (ARI): no window known{about}")
        if ari["explanation"]:
            lines.append(f"  the CA explains: {ari['explanation']}")
        if ari["error"]:
            lines.append(f"  last request failed: {ari['error']}")
        lines.append(f"  next check: {_minute(ari['next_check'])}")
    lines.append(f"last result: {last_result_text(d)}")
    if d["last_success"]:
        lines.append(f"last success: {_minute(d['last_success'])}")
    if d["failed_orders"]:
        lines.append(f"backoff: {d['failed_orders']} failed order"
                     f"{'s' * (d['failed_orders'] != 1)} in a row; next order not before "
                     f"{_minute(d['next_attempt'])} (`renew --force` orders now)")
    if d["rate_limited_until"]:
        lines.append(f"rate-limited by the CA until {_minute(d['rate_limited_until'])}")
    r = d.get("revoked")
    if r:
        what = "the live certificate" if r["live"] else "an earlier certificate"
        then = ("the next `certbatch renew` replaces it" if r["renew"] and r["live"] else
                "not replaced before it is due (--no-renew)" if r["live"] else "replaced since")
        reason = f", reason {r['reason']}" if r["reason"] else ""
        lines.append(f"revoked: {what} (serial {r['serial']}) on {_minute(r['at'])}{reason}; "
                     f"{then}")
    p = d.get("pending")
    lines.append("pending: no" if p is None else
                 f"pending: serial {p['serial']}, staged {_minute(p['staged_at'])} in "
                 f"{p['folder']}")
    targets = d.get("targets") or []
    if not targets:
        lines.append("targets: none")
    for t in targets:
        if t["problem"]:
            state = f"CANNOT RUN: {t['problem']}"
        elif t["has_live"]:
            state = "has the live certificate"
        elif t["applied_serial"]:
            state = f"has serial {t['applied_serial']}"
        else:
            state = "has nothing of it yet"
        if t["waiting"]:
            state += ", the pending one waits for it"
        if t["state"] == "failed" and t["last_error"]:
            state += f"; its last run failed: {t['last_error']}"
        lines.append(f"target {t['target']}: {state}")
    return lines


def target_rows(states: Sequence[dict[str, Any]], pending: Sequence[str]) -> list[str]:
    """`status` below the certificates: what is pending and each target's state."""
    if not states and not pending:
        return []
    lines = [""]
    if pending:
        lines.append(f"pending: {_plural(len(pending), 'certificate')} staged and not yet "
                     f"applied by every target: {' '.join(pending)}")
    if not states:
        lines.append("targets: none (hooks/notify.d/ is empty, no hooks.targets or "
                     "hooks.notify)")
        return lines
    table = [["TARGET", "STATE", "WAITING", "LAST SUCCESS", "LAST ERROR"]] + [[
        s["target"], s["state"], str(s["waiting"]),
        s["last_success"] or "-",
        (s["problem"] or s["last_error"] or "-") if s["state"] != "ok" else "-",
    ] for s in states]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
                 + "  " + row[-1] for row in table)
    if any(s["state"] in ("failed", "problem") for s in states):
        lines.append(f"a target failed: {FIX_HINT}")
    return lines


class RichProgress(Progress):
    """A live display for terminals: done/total, certificates in flight, failures.

    Everything variable (names, errors) goes in as rich Text, never as markup: an error such as
    "[/etc/x]" must print as it is, not be read as a style tag.
    """

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(file=stream, highlight=False)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[current]}",
                                                            markup=False),
                            TextColumn("{task.fields[failed]}", style="red", markup=False),
                            console=self.console, transient=True)
        self.task: Any = None
        self.current: list[str] = []
        self.failed = 0
        self.causes: set[str | None] = set()  # the errors printed so far

    def planned(self, results: Sequence[CertResult]) -> None:
        total = sum(1 for r in results if r.decision.does_work)
        if total:
            self.bar.start()
            self.task = self.bar.add_task("renewing", total=total, current="", failed="")

    def _refresh(self) -> None:
        shown = ", ".join(self.current[:4]) + (" ..." if len(self.current) > 4 else "")
        failed = f"{self.failed} failed" if self.failed else ""
        self.bar.update(self.task, current=shown, failed=failed)

    def started(self, result: CertResult) -> None:
        if self.task is not None:
            self.current.append(result.name)
            self._refresh()

    def finished(self, result: CertResult) -> None:
        from rich.text import Text

        if self.task is None:
            return
        if result.name in self.current:
            self.current.remove(result.name)
        if result.failed:
            self.failed += 1
            # One line per cause: an unreachable CA fails every order with the same text;
            # the bar counts them, the table after the run lists each.
            if result.error not in self.causes:
                self.causes.add(result.error)
                self.console.print(Text(f"{result.name}: {result.outcome}: {result.error}",
                                        style="red"))
        self.bar.advance(self.task)
        self._refresh()

    def notifying(self, count: int) -> None:
        # Notify hooks (an nginx reload) may take a while: say so rather than show nothing.
        if self.task is not None:
            self.bar.update(self.task, description=f"applying {count} staged", current="")
            self.bar.refresh()

    def stop(self) -> None:
        if self.task is not None:
            self.bar.stop()
            self.task = None

    def table(self, report: RunReport) -> None:
        from rich.table import Table
        from rich.text import Text

        t = Table(title=None, show_lines=False)
        for col in ("certificate", "outcome", "expires", "serial"):
            t.add_column(col, no_wrap=True)
        t.add_column("detail", overflow="fold")  # long paths in errors: folded, never cut
        colors = {"failed": "red", "not-staged": "red", "backoff": "red", "issued": "green",
                  "renewed": "green", "restaged": "green", "rate-limited": "yellow"}
        for c in report.certificates:
            color = colors.get(c.outcome, "")
            detail = Text(c.error, style="red") if c.error else Text(
                c.decision.reason if c.outcome in ("not-due", "rate-limited")
                else decision_text(c.decision))
            t.add_row(Text(c.name), Text(c.outcome, style=color),
                      f"{c.not_after:%Y-%m-%d}" if c.not_after else "-", Text(c.serial or "-"),
                      detail)
        self.console.print(t)
        # certificate errors are in the table; the rest, then the summary: it comes last
        for line in error_lines(report, certificates=False):
            self.console.print(Text(line, style="red"))
        for line in summary_lines(report)[-2:]:
            if line.startswith("notify") or line[0].isdigit():
                self.console.print(Text(line))


# -- dry runs and removals: what a command would do, or did -----------------------------------

def hook_lines(commands: list[HookCommand], env: dict[str, str], none: str) -> list[str]:
    """Each hook a dry run would run, with the CERTBATCH_* variables it would get."""
    if not commands:
        return [none]
    lines = []
    for cmd in commands:
        lines.append(f"would run {cmd.name}: {' '.join(cmd.argv)}")
        lines.extend(env_lines(env))
    return lines


def env_lines(env: dict[str, str]) -> list[str]:
    return [f"      {k}={v}" for k, v in sorted(env.items())]


def notify_plan_lines(plan: NotifyPlan) -> list[str]:
    if plan.nothing_pending:
        return ["nothing pending"]
    lines = []
    if plan.restage_for is not None:
        live = plan.restage
        lines.append(f"would forget what {plan.restage_for} has applied and stage again "
                     f"{len(live)} live certificate{'s' * (len(live) != 1)} that "
                     f"{'are' if len(live) != 1 else 'is'} not pending: {' '.join(live)}")
    if plan.pending:
        lines.append(f"batch of {len(plan.pending)} pending certificate"
                     f"{'s' * (len(plan.pending) != 1)}:")
    for item in plan.pending:
        p = item.entry
        lines.append(f"  {p.name}  {' '.join(p.domains)}  expires {p.not_after:%Y-%m-%d}  "
                     f"serial {p.serial}")
        lines.append(f"    {p.folder}: {' '.join(item.files)}")
    if not plan.has_targets:
        return lines + ["no notify targets (hooks/notify.d/ is empty, no hooks.targets or "
                        "hooks.notify): the batch would be marked applied as is"]
    for t in plan.targets:
        if t.problem:
            lines.append(f"target {t.name}: CANNOT RUN: {t.problem}")
        elif not t.names or t.command is None:
            lines.append(f"target {t.name}: nothing to apply (it has every pending entry)")
        else:
            lines.append(f"target {t.name}: would run {' '.join(t.command.argv)} "
                         f"(timeout {t.timeout:g} s) with {len(t.names)} certificate"
                         f"{'s' * (len(t.names) != 1)}: {' '.join(t.names)}")
            lines.extend(env_lines(t.env))
    return lines


def deploy_plan_lines(plan: DeployPlan) -> list[str]:
    stored = plan.stored
    if stored is None:
        return [f"{plan.name}: not issued yet, nothing to stage"]
    lines = [f"would stage {plan.name} (serial {stored.serial}, expires "
             f"{stored.not_after:%Y-%m-%d}) from {stored.folder}"]
    return lines + hook_lines(plan.commands, plan.env, "no deploy hooks found (files are "
                                                        "copied into the spool only)")


def removal_lines(plan: Removal) -> list[str]:
    lines = []
    if plan.state_folder is not None:
        live = f"live certificate serial {plan.serial}, expires {plan.not_after:%Y-%m-%d}" \
            if plan.serial else "no readable live certificate"
        lines.append(f"{plan.state_folder} ({live}; every version and key)")
    if plan.pending is not None:
        lines.append(f"{plan.pending} (staged, not applied by every target yet)")
    if plan.targets:
        lines.append(f"its entry in the ledger of target{'s' * (len(plan.targets) > 1)} "
                     f"{', '.join(plan.targets)}")
    if plan.applied:
        n = len(plan.applied)
        lines.append(f"{n} cop{'ies' if n > 1 else 'y'} in {plan.applied[0].parent.parent} "
                     f"(the record of applied batches; keys included)")
    if plan.trashed:
        n = len(plan.trashed)
        lines.append(f"{n} cop{'ies' if n > 1 else 'y'} in {plan.trashed[0].parent.parent} "
                     f"(pruned batches not deleted yet; keys included)")
    return lines
