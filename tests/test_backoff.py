"""Backoff after failed orders, and a 503 with Retry-After honoured like a 429, through the real
`certbatch` command against a real Pebble (the decision itself: tests/test_renewal.py).

The failing order is real: a dns-01 script that refuses to add the record (test_parallel's
recording wrapper), so each order is visible as a dns script call. Pebble never answers 503, so
that part puts `fault_proxy.FaultProxy` in front of it (MOCK: the new-order answers it fakes).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cli_helpers import dns01, live, run, write_config
from conftest import MemoryAccountStore
from fault_proxy import NEW_ORDER, Fault, FaultProxy, proxy_fixture  # noqa: F401
from pebble_server import PebbleInstance
from test_acme_client import issue, settings_for, standalone, unique
from test_parallel import (
    dns_calls,
    dns_wrapper,
    domain,
    error_line,
    outcomes,
    parse_ts,
    proxied_config,
    report_of,
)

from certbatch.acme_client import AcmeClient
from certbatch.errors import RateLimited

UTC = dt.timezone.utc


def status_json(folder: Path, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        (folder / "state" / "certs" / name / "status.json").read_text())
    return data


def adds(log: Path, name: str) -> int:
    """How many times the dns script was asked to add a record for `name` (one per order)."""
    return sum(1 for c in dns_calls(log) if c[:3] == ["begin", "add", name])


def test_failed_order_backs_off_until_forced(tmp_path: Path, pebble: PebbleInstance) -> None:
    bad, good = domain("bad"), domain("good")
    script, log = dns_wrapper(tmp_path, fail=bad)
    certs = {"bad": {"domains": [bad]}, "good": {"domains": [good]}}
    cfg = write_config(tmp_path, pebble, certs, defaults={"challenge": dns01(script)})

    before = dt.datetime.now(UTC)
    first = run(["renew"], cfg, pebble)
    assert first.returncode == 1, first.stderr
    assert "DNS API refused" in error_line(first.stderr, "bad")
    assert live(tmp_path, "good") and adds(log, bad) == 1
    st = status_json(tmp_path, "bad")
    assert st["failed_orders"] == 1
    next_at = parse_ts(str(st["next_attempt"]))
    assert before + dt.timedelta(seconds=59) <= next_at <= dt.datetime.now(UTC) + \
        dt.timedelta(seconds=61)

    # Right after: no order (the dns script is not called), and the run fails with the next
    # attempt time and the last error in its one stderr line; metrics say so too.
    metrics = tmp_path / "metrics.prom"
    second = run(["renew", "--metrics-file", str(metrics)], cfg, pebble)
    assert second.returncode == 1, second.stderr
    line = error_line(second.stderr, "bad")
    assert line.startswith(f"certbatch: bad: backoff: 1 failed order in a row; next attempt "
                           f"{next_at:%Y-%m-%d %H:%M}Z, or now with renew --force (last error: ")
    assert "DNS API refused" in line
    assert adds(log, bad) == 1
    assert 'certbatch_certificate_last_run_ok{name="bad"} 0' in metrics.read_text()
    assert 'certbatch_certificate_last_result{name="bad",result="backoff"} 1' \
        in metrics.read_text()
    assert status_json(tmp_path, "bad")["failed_orders"] == 1  # a backoff is no failed order

    report = report_of(run(["renew", "--json"], cfg, pebble))
    assert outcomes(report) == {"bad": "backoff", "good": "not-due"}
    assert report["exit_code"] == 1 and report["certificates"][0]["decision"] == "backoff"

    plan = run(["renew", "--dry-run"], cfg, pebble)
    assert plan.returncode == 0
    assert any(ln.split()[:2] == ["bad", "backoff"] for ln in plan.stdout.splitlines()), \
        plan.stdout
    shown = run(["status"], cfg, pebble)
    assert f"backoff until {next_at:%Y-%m-%d %H:%M}Z" in shown.stdout, shown.stdout
    rows = {c["name"]: c for c in json.loads(run(["status", "--json"], cfg, pebble)
                                             .stdout)["certificates"]}
    assert rows["bad"]["decision"] == "backoff" and rows["bad"]["failed_orders"] == 1
    assert rows["good"]["failed_orders"] == 0 and rows["good"]["next_attempt"] is None

    # --force orders again (and fails again: 10 minutes now) ...
    forced = run(["renew", "--force", "--only", "bad"], cfg, pebble)
    assert forced.returncode == 1 and adds(log, bad) == 2
    st = status_json(tmp_path, "bad")
    assert st["failed_orders"] == 2
    assert dt.timedelta(minutes=9) < parse_ts(str(st["next_attempt"])) - next_at \
        < dt.timedelta(minutes=11)
    # ... and once the DNS works, a successful order resets the count.
    script.write_text(script.read_text().replace(bad, "-"))
    fixed = run(["renew", "--force", "--only", "bad"], cfg, pebble)
    assert fixed.returncode == 0, fixed.stderr
    assert live(tmp_path, "bad")
    st = status_json(tmp_path, "bad")
    assert st["failed_orders"] == 0 and st["next_attempt"] is None


def test_503_with_retry_after_is_honoured_like_a_429(tmp_path: Path, pebble: PebbleInstance,
                                                     proxy: FaultProxy) -> None:
    unavailable, broken = domain("unavail"), domain("broken")
    # MOCK: Pebble never answers 503. The proxy answers the new-order of `unavailable` with 503
    # and Retry-After: 3600, that of `broken` with a bare 503; the rest reaches Pebble.
    faults = [Fault("POST", NEW_ORDER, 503, {"Retry-After": "3600"}, b"down for maintenance",
                    times=99, match=lambda r: unavailable in r.identifiers),
              Fault("POST", NEW_ORDER, 503, {}, b"overloaded", times=99,
                    match=lambda r: broken in r.identifiers)]
    proxy.faults.extend(faults)
    cfg = proxied_config(tmp_path, pebble, proxy, {"unavail": {"domains": [unavailable]},
                                                   "broken": {"domains": [broken]}})
    # A bare 503 is an ordinary failure (the backoff counts it).
    alone = run(["renew", "--only", "broken"], cfg, pebble)
    assert alone.returncode == 1, alone.stderr
    assert status_json(tmp_path, "broken")["failed_orders"] == 1
    assert [f.hits for f in faults] == [0, 1]

    before = dt.datetime.now(UTC)
    first = run(["renew", "--force", "--workers", "1"], cfg, pebble)
    assert first.returncode == 1, first.stderr
    line = error_line(first.stderr, "unavail")
    assert "HTTP 503" in line and "down for maintenance" in line and "not retried before" in line
    st = status_json(tmp_path, "unavail")
    until = parse_ts(str(st["rate_limited_until"]))
    hour = dt.timedelta(hours=1)
    assert before + hour - dt.timedelta(seconds=1) <= until <= dt.datetime.now(UTC) + hour
    assert st["failed_orders"] == 0  # the CA's wait, not the backoff
    # The CA said it is unavailable for an hour: nothing more is sent to it in this run, so
    # `broken` (ordered after it, one worker) fails at once with the CA's wait, not asked.
    assert [f.hits for f in faults] == [1, 1]
    assert "not asked again in this run" in error_line(first.stderr, "broken")
    assert parse_ts(str(status_json(tmp_path, "broken")["rate_limited_until"])) == until

    second = run(["renew", "--force", "--json"], cfg, pebble)
    assert outcomes(report_of(second)) == {"unavail": "rate-limited", "broken": "rate-limited"}
    assert [f.hits for f in faults] == [1, 1]  # neither is asked before the CA's time


def test_503_on_a_poll_with_a_long_retry_after_is_not_waited_out(
        pebble: PebbleInstance, proxy: FaultProxy) -> None:
    # MOCK: the proxy answers authorization fetches with 503 and Retry-After: 3600.
    fault = Fault("POST", "/authZ/", 503, {"Retry-After": "3600"}, b"busy", times=99)
    proxy.faults.append(fault)
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    with pytest.raises(RateLimited) as err:
        issue(client, [unique("busy")], standalone(pebble))
    assert err.value.status == 503 and err.value.retry_after is not None
    assert fault.hits == 1  # not retried: the wait is far past RETRY_AFTER_WAIT_MAX


def test_status_shows_the_next_attempt_while_held_back() -> None:
    """NEXT RENEWAL is the backoff's end (or the CA's Retry-After), not "-", while held back."""
    from certbatch import renewal
    from certbatch.config import CertificateSettings, ChallengeSettings
    from certbatch.store import CertStatus, StoredCert

    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    cert = CertificateSettings("www", ("www.example",), "ec-p256",
                               ChallengeSettings("http-01", standalone_port=80))
    stored = StoredCert("www", "v1", Path("/nonexistent"), ("www.example",), "ec-p256", "0a",
                        now - dt.timedelta(days=80), now + dt.timedelta(days=10),
                        now - dt.timedelta(days=80))
    backoff = CertStatus(staged_version="v1", failed_orders=2,
                         next_attempt=now + dt.timedelta(minutes=10))
    d = renewal.decide(cert, stored, backoff, now, None)
    assert (d.action, d.due_at, d.basis) == (renewal.BACKOFF, backoff.next_attempt, "backoff")
    limited = CertStatus(staged_version="v1", rate_limited_until=now + dt.timedelta(hours=1))
    d = renewal.decide(cert, stored, limited, now, None, force=True)
    assert (d.action, d.due_at, d.basis) == (renewal.RATE_LIMITED, limited.rate_limited_until,
                                             "rate-limit")
