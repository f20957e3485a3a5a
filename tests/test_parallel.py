"""Parallel renewal through the real `certbatch` command against a real Pebble.

Many certificates at once with some failing (dns script error, SERVFAIL), half of all nonces
rejected, a deadline passing for one certificate, a CA rate limit with Retry-After for one
certificate, and one directory fetch / one account shared by all workers.

Pebble enforces no rate limits and says nothing about who asked for what, so the last two tests
put `fault_proxy.FaultProxy` (a TLS proxy that records requests and can answer some itself)
between certbatch and Pebble; everything else is the real CA.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

from cli_helpers import DNS_SCRIPT, dns01, live, probe_hook, probe_lines, run, write_config
from fault_proxy import (  # proxy_fixture: the `proxy` fixture
    BAD_NONCE,
    DIRECTORY,
    NEW_ACCOUNT,
    NEW_ORDER,
    RATE_LIMITED,
    FaultProxy,
    proxy_fixture,  # noqa: F401
    rate_limited,
)
from pebble_server import PebbleInstance

UTC = dt.timezone.utc


def domain(label: str) -> str:
    """A fresh name per call, so no test sees another's authorizations or TXT records."""
    return f"{label}-{uuid.uuid4().hex[:8]}.par.example.com"


def dns_wrapper(folder: Path, *, fail: str | None = None, hang: str | None = None,
                pause: float = 0.0) -> tuple[Path, Path]:
    """A dns-01 script around hooks/dns/challtestsrv.sh that records every call.

    Each call appends ``begin <action> <domain> <t>`` and, when it returns, ``end <action>
    <domain> <t> <status>`` to the log (t: wall clock, ns resolution). `add` for `fail` exits 1
    with an error on stderr (a DNS API refusing it); `add` for `hang` sleeps 30 s (its pid goes
    to <log>.pid) and never gets to the real script; every other `add` first sleeps `pause`
    seconds, so that certificates in flight at once overlap visibly. Returns (script, log).
    """
    log = folder / "dns-calls.log"
    script = folder / "dns-wrapper.sh"
    q = shlex.quote
    script.write_text(f"""#!/bin/sh
log={q(str(log))}
echo "begin $1 $2 $(date +%s.%N)" >> "$log"
if [ "$1" = add ] && [ "$2" = {q(fail or '-')} ]; then
    echo "DNS API refused $2: zone is locked" >&2
    echo "end $1 $2 $(date +%s.%N) 1" >> "$log"
    exit 1
fi
if [ "$1" = add ] && [ "$2" = {q(hang or '-')} ]; then
    sleep 30 &
    echo $! > "$log.pid"
    wait $!
fi
if [ "$1" = add ]; then sleep {pause:g}; fi
rc=0
{q(str(DNS_SCRIPT))} "$@" || rc=$?
echo "end $1 $2 $(date +%s.%N) $rc" >> "$log"
exit $rc
""")
    script.chmod(0o755)
    return script, log


def dns_calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def intervals(log: Path, action: str) -> dict[str, tuple[float, float]]:
    """domain -> (begin, end) of its finished `action` calls."""
    begins: dict[str, float] = {}
    spans: dict[str, tuple[float, float]] = {}
    for kind, act, name, t, *_ in dns_calls(log):
        if act != action:
            continue
        if kind == "begin":
            begins[name] = float(t)
        elif name in begins:
            spans[name] = (begins[name], float(t))
    return spans


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one instant."""
    events = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans])
    # at equal times, ends (-1) sort before begins (+1): touching intervals do not overlap
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def notify_probe(folder: Path) -> Path:
    """A notify hook recording its environment, and a copy of batch.json, in folder/probes."""
    probes = folder / "probes"
    probes.mkdir(exist_ok=True)
    probe_hook(folder / "hooks" / "notify.d" / "50-apply", probes,
               extra=f'cp "$CERTBATCH_BATCH_FILE" {shlex.quote(str(probes))}/batch-seen.json')
    return probes


def report_of(result: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["outcome"] for c in report["certificates"]}


def error_line(stderr: str, name: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"certbatch: {name}: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def parse_ts(value: str) -> dt.datetime:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def proxied_config(folder: Path, pebble: PebbleInstance, proxy: FaultProxy,
                   certificates: dict[str, Any], **sections: Any) -> Path:
    """write_config, with acme.directory pointing at the proxy (Pebble's TLS certificate)."""
    return write_config(folder, pebble, certificates,
                        acme={"directory": proxy.directory_url}, **sections)


# -- 1. twenty certificates, eight workers, two failures -----------------------------------------

def test_twenty_certificates_eight_workers_two_fail(tmp_path: Path,
                                                     pebble: PebbleInstance) -> None:
    names = [f"c{i:02d}" for i in range(1, 21)]
    domains = {n: domain(n) for n in names}
    script_fails, dns_servfails = "c07", "c14"
    script, log = dns_wrapper(tmp_path, fail=domains[script_fails], pause=0.3)
    cfg = write_config(tmp_path, pebble, {n: {"domains": [d]} for n, d in domains.items()},
                       defaults={"challenge": dns01(script)}, renewal={"workers": 8})
    probes = notify_probe(tmp_path)
    logfile = tmp_path / "certbatch.log"

    servfail_record = f"_acme-challenge.{domains[dns_servfails]}"
    pebble.add_servfail(servfail_record)
    try:
        result = run(["renew", "--workers", "8", "--json", "--log-file", str(logfile)], cfg,
                     pebble)
    finally:
        pebble.clear_servfail(servfail_record)

    assert result.returncode == 1, result.stderr
    failed = {script_fails, dns_servfails}
    good = [n for n in names if n not in failed]
    report = report_of(result)
    assert report["exit_code"] == 1
    got = outcomes(report)
    assert {n: got[n] for n in good} == dict.fromkeys(good, "issued")
    assert {n: got[n] for n in failed} == dict.fromkeys(failed, "failed")
    assert all(c["staged"] == (c["name"] in good) for c in report["certificates"])
    for n in good:
        assert live(tmp_path, n)["domains"] == [domains[n]]
    for n in failed:
        assert not (tmp_path / "state" / "certs" / n / "live").exists()

    # One notify for the whole batch: the 18 renewed, the 2 failures named beside them.
    calls = probe_lines(probes, "50-apply")
    assert len(calls) == 1
    assert sorted(calls[0]["CERTBATCH_NAMES"].split()) == good
    assert calls[0]["CERTBATCH_COUNT"] == "18"
    assert sorted(calls[0]["CERTBATCH_FAILED_NAMES"].split()) == sorted(failed)
    batch = json.loads((probes / "batch-seen.json").read_text())
    assert sorted(c["name"] for c in batch["certificates"]) == good
    assert report["notify"]["ok"] and sorted(report["notify"]["names"]) == good
    assert report["pending_after"] == 0

    # Each failure on stderr with its reason: the script's own words, the CA's problem type.
    line = error_line(result.stderr, script_fails)
    assert f"DNS API refused {domains[script_fails]}: zone is locked" in line
    assert "exited with status 1" in line
    line = error_line(result.stderr, dns_servfails)
    # Pebble reports a TXT lookup that fails as "unauthorized" (test_acme_client.py too).
    assert "urn:ietf:params:acme:error:unauthorized" in line
    assert servfail_record in line
    # and no error line for a certificate that worked
    assert not [n for n in good if f"certbatch: {n}: " in result.stderr], result.stderr
    log_text = logfile.read_text()
    assert f"{script_fails}: dns script" in log_text and f"{dns_servfails}: urn:" in log_text

    # The parallelism is real, and bounded by --workers: each certificate's dns `add` call
    # lasts >= 0.3 s; with 8 workers several run at the same time, never more than 8.
    adds = intervals(log, "add")
    assert set(adds) == set(domains.values())
    overlap = max_overlap(list(adds.values()))
    assert 2 <= overlap <= 8, sorted(adds.values())
    # and every added record was removed again, the failed ones included
    assert set(intervals(log, "remove")) == set(domains.values())


# -- 2. half of all nonces rejected --------------------------------------------------------------

def test_half_of_all_nonces_rejected(tmp_path: Path, pebble_factory: Any) -> None:
    inst = pebble_factory(PEBBLE_WFE_NONCEREJECT="50")
    names = [f"n{i}" for i in range(1, 7)]
    cfg = write_config(tmp_path, inst, {n: {"domains": [domain(n)]} for n in names})
    logfile = tmp_path / "certbatch.log"
    result = run(["renew", "--workers", "4", "--json", "-vv", "--log-file", str(logfile)],
                 cfg, inst)
    assert result.returncode == 0, result.stderr
    assert outcomes(report_of(result)) == dict.fromkeys(names, "issued")
    for n in names:
        assert live(tmp_path, n)
    # the CA really did reject nonces, and certbatch retried them (debug lines in the log)
    assert logfile.read_text().count("badNonce") >= 3


# -- 3. a deadline passes for one certificate ----------------------------------------------------

def test_deadline_for_one_certificate_others_renewed(tmp_path: Path,
                                                      pebble: PebbleInstance) -> None:
    names = ["slow", "d1", "d2", "d3"]
    domains = {n: domain(n) for n in names}
    script, log = dns_wrapper(tmp_path, hang=domains["slow"])
    cfg = write_config(tmp_path, pebble, {n: {"domains": [d]} for n, d in domains.items()},
                       defaults={"challenge": dns01(script)},
                       renewal={"deadline": "3s", "workers": 4})
    probes = notify_probe(tmp_path)
    t0 = time.monotonic()
    result = run(["renew", "--json"], cfg, pebble, timeout=60)
    wall = time.monotonic() - t0

    assert result.returncode == 1, result.stderr
    assert wall < 20, f"the run took {wall:.1f} s: the 30 s dns script was waited for"
    report = report_of(result)
    assert outcomes(report) == {"slow": "failed", "d1": "issued", "d2": "issued",
                                "d3": "issued"}
    slow = next(c for c in report["certificates"] if c["name"] == "slow")
    assert "deadline exceeded" in slow["error"] and slow["duration_seconds"] < 10
    assert "deadline exceeded" in error_line(result.stderr, "slow")
    assert not (tmp_path / "state/certs/slow/live").exists()

    # The hanging script (and its `sleep 30` child) was killed at the deadline ...
    pid = int(Path(f"{log}.pid").read_text())
    stat = Path(f"/proc/{pid}/stat")
    # gone, or a zombie nobody reaped yet (init in a container may not reap)
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    # ... and the record it may have half added was removed all the same.
    slow_calls = [c[:3] + c[4:] for c in dns_calls(log) if c[2] == domains["slow"]]
    assert slow_calls == [["begin", "add", domains["slow"]],
                          ["begin", "remove", domains["slow"]],
                          ["end", "remove", domains["slow"], "0"]]

    calls = probe_lines(probes, "50-apply")
    assert len(calls) == 1
    assert calls[0]["CERTBATCH_NAMES"].split() == ["d1", "d2", "d3"]
    assert calls[0]["CERTBATCH_FAILED_NAMES"] == "slow"


# -- 4. 429 with Retry-After for one certificate -------------------------------------------------

def test_rate_limit_with_retry_after_is_honoured_even_with_force(
        tmp_path: Path, pebble: PebbleInstance, proxy: FaultProxy) -> None:
    limited = domain("limited")
    # MOCK: Pebble has no rate limits. The proxy answers new-order requests asking for
    # `limited` (identifiers read from the JWS payload) with 429, Retry-After: 3600 and an
    # RFC 7807 rateLimited problem; everything else reaches Pebble.
    fault = rate_limited("3600", match=lambda r: limited in r.identifiers,
                         detail=f"too many certificates already issued for {limited}")
    proxy.faults.append(fault)
    certs: dict[str, Any] = {"limited": {"domains": [limited]},
                             "ok1": {"domains": [domain("ok1")]},
                             "ok2": {"domains": [domain("ok2")]}}
    cfg = proxied_config(tmp_path, pebble, proxy, certs)

    before = dt.datetime.now(UTC)
    first = run(["renew"], cfg, pebble)
    after = dt.datetime.now(UTC)
    assert first.returncode == 1, first.stderr
    line = error_line(first.stderr, "limited")
    assert RATE_LIMITED in line and f"too many certificates already issued for {limited}" in line
    assert live(tmp_path, "ok1") and live(tmp_path, "ok2")
    assert not (tmp_path / "state/certs/limited/live").exists()
    assert len(proxy.orders_for(limited)) == fault.hits == 1  # a 429 is not retried

    # Run 2, same proxy, one more certificate configured: `limited` is skipped quietly, without
    # a request reaching new-order; the new one is issued; nothing failed.
    certs["ok3"] = {"domains": [domain("ok3")]}
    proxied_config(tmp_path, pebble, proxy, certs)
    second = run(["renew", "--json"], cfg, pebble)
    assert second.returncode == 0, second.stderr
    assert second.stderr == ""
    assert outcomes(report_of(second)) == {"limited": "rate-limited", "ok1": "not-due",
                                           "ok2": "not-due", "ok3": "issued"}
    assert len(proxy.orders_for(limited)) == 1

    status = run(["status", "--json"], cfg, pebble)
    assert status.returncode == 0, status.stderr
    rows = {c["name"]: c for c in json.loads(status.stdout)["certificates"]}
    until = parse_ts(rows["limited"]["rate_limited_until"])
    hour = dt.timedelta(seconds=3600)
    assert before + hour - dt.timedelta(seconds=1) <= until <= after + hour
    assert rows["limited"]["decision"] == "rate-limited"
    assert rows["ok1"]["rate_limited_until"] is None

    # --force renews the others, but the CA's rate limit is still honoured (README).
    forced = run(["renew", "--force", "--json"], cfg, pebble)
    assert forced.returncode == 0, forced.stderr
    assert outcomes(report_of(forced)) == {"limited": "rate-limited", "ok1": "renewed",
                                           "ok2": "renewed", "ok3": "renewed"}
    assert len(proxy.orders_for(limited)) == 1


# -- 5. one directory fetch and one account for all workers ---------------------------------------

def test_one_directory_fetch_and_one_account_for_all_workers(
        tmp_path: Path, pebble: PebbleInstance, proxy: FaultProxy) -> None:
    # MOCK-free: the proxy only passes requests through to Pebble and counts them.
    names = [f"w{i:02d}" for i in range(1, 11)]
    cfg = proxied_config(tmp_path, pebble, proxy, {n: {"domains": [domain(n)]} for n in names})
    result = run(["renew", "--workers", "8", "--json"], cfg, pebble)
    assert result.returncode == 0, result.stderr
    assert outcomes(report_of(result)) == dict.fromkeys(names, "issued")

    assert proxy.count("GET", DIRECTORY) == 1
    # Pebble rejects ~5% of nonces by default: a newAccount POST answered badNonce is retried
    # by the client and is not a second account. Exactly one was accepted.
    signups = proxy.matching("POST", NEW_ACCOUNT)
    accepted = [r for r in signups if r.status == 201]
    assert len(accepted) == 1, [(r.status, r.problem) for r in signups]
    others = [(r.status, r.problem) for r in signups if r is not accepted[0]]
    assert all(problem == BAD_NONCE for _, problem in others), others
    # Every worker's orders were signed by that one account ...
    orders = proxy.matching("POST", NEW_ORDER)
    assert len({tuple(r.identifiers) for r in orders}) == 10
    assert {r.kid for r in orders} == {accepted[0].location}
    # ... which is the one account stored.
    accounts = list((tmp_path / "state" / "accounts").iterdir())
    assert len(accounts) == 1
    regr = json.loads(json.loads((accounts[0] / "account.json").read_text())["regr"])
    assert regr["uri"] == accepted[0].location

