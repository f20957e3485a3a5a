"""ACME Renewal Information (RFC 9773) and `replaces` (issue 11).

Pebble 2.4 has no ARI, so the real `certbatch` command talks to Pebble through
`fault_proxy.FaultProxy` with `proxy.ari` set: the proxy (MOCK for what Pebble 2.4 lacks) adds
`renewalInfo` to the directory and answers GET /renewal-info/<id> with the windows and
Retry-After the test sets, and records each request and new-order payload. Orders, challenges
and certificates are the real Pebble's; it ignores the `replaces` field.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run, write_config
from fault_proxy import (  # proxy_fixture: the `proxy` fixture
    NEW_ORDER,
    RENEWAL_INFO,
    AriAnswer,
    Fault,
    FaultProxy,
    proxy_fixture,  # noqa: F401
)
from pebble_server import PebbleInstance

from certbatch import ari, renewal
from certbatch.config import CertificateSettings, ChallengeSettings
from certbatch.store import CertStatus, StoredCert, iso

UTC = dt.timezone.utc


def domain(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}.ari.example.com"


def ari_config(folder: Path, pebble: PebbleInstance, proxy: FaultProxy,
               certificates: dict[str, Any], **sections: Any) -> Path:
    return write_config(folder, pebble, certificates,
                        acme={"directory": proxy.directory_url}, **sections)


def cert_id(folder: Path, name: str) -> str:
    return ari.cert_id((folder / "state" / "certs" / name / "live" / "cert.pem").read_bytes())


def serial(folder: Path, name: str) -> str:
    meta: dict[str, Any] = json.loads(
        (folder / "state" / "certs" / name / "live" / "meta.json").read_text())
    return str(meta["serial"])


def status_file(folder: Path, name: str) -> Path:
    return folder / "state" / "certs" / name / "status.json"


def ari_requests(proxy: FaultProxy, cid: str | None = None) -> int:
    return proxy.count("GET", f"{RENEWAL_INFO}/{cid or ''}")


def orders(proxy: FaultProxy, name: str) -> list[dict[str, Any]]:
    """Payloads of the new orders for `name` the CA created (a badNonce retry re-sends one)."""
    return [r.payload for r in proxy.matching("POST", NEW_ORDER)
            if name in r.identifiers and r.status == 201]


def window(start: dt.timedelta, end: dt.timedelta, **kw: Any) -> AriAnswer:
    now = dt.datetime.now(UTC)
    return AriAnswer(iso(now + start), iso(now + end), **kw)


def outcomes(result: Any) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["decision"], c["outcome"])
            for c in json.loads(result.stdout)["certificates"]}


def age_ari(folder: Path, name: str) -> None:
    """Make the stored next check lie in the past (as if its Retry-After had passed)."""
    path = status_file(folder, name)
    data = json.loads(path.read_text())
    data["ari"]["next_check"] = iso(dt.datetime.now(UTC) - dt.timedelta(seconds=1))
    path.write_text(json.dumps(data))


# -- end to end ----------------------------------------------------------------------------------

def test_ari_windows_replaces_and_cached_checks(tmp_path: Path, pebble: PebbleInstance,
                                                proxy: FaultProxy) -> None:
    proxy.ari = {}
    d = {n: domain(n) for n in ("opened", "later")}
    cfg = ari_config(tmp_path, pebble, proxy, {n: {"domains": [d[n]]} for n in d})
    first = run(["renew"], cfg, pebble)
    assert first.returncode == 0, first.stderr
    assert [o.get("replaces") for o in orders(proxy, d["opened"])] == [None]  # nothing replaced
    ids = {n: cert_id(tmp_path, n) for n in d}
    old_serial = serial(tmp_path, "opened")

    # "opened": its window lies in the past; "later": in 10 days, ask again in an hour.
    proxy.ari = {ids["opened"]: window(-dt.timedelta(hours=2), -dt.timedelta(hours=1)),
                 ids["later"]: window(dt.timedelta(days=10), dt.timedelta(days=11),
                                      retry_after="3600",
                                      explanation="https://ca.example/why")}
    second = run(["renew", "--json", "-v"], cfg, pebble)
    assert second.returncode == 0, second.stderr
    assert outcomes(second) == {"opened": ("renew", "renewed"), "later": ("skip", "not-due")}
    assert ari_requests(proxy, ids["opened"]) == 1 and ari_requests(proxy, ids["later"]) == 1
    # the renewal names the certificate it replaces
    assert [o.get("replaces") for o in orders(proxy, d["opened"])] == [None, ids["opened"]]
    assert serial(tmp_path, "opened") != old_serial
    reasons = {c["name"]: c["reason"] for c in json.loads(second.stdout)["certificates"]}
    assert reasons["opened"].startswith("ARI window opened ")
    assert reasons["later"].startswith("ARI renewal at ")
    # the CA's explanation is logged (a warning: it usually means something is up)
    assert "WARNING later: the CA explains its renewal window: https://ca.example/why" \
        in second.stderr
    stored = json.loads(status_file(tmp_path, "later").read_text())["ari"]
    chosen = dt.datetime.fromisoformat(stored["renew_at"].replace("Z", "+00:00"))
    now = dt.datetime.now(UTC)
    assert now + dt.timedelta(days=9, hours=23) < chosen < now + dt.timedelta(days=11)
    next_check = dt.datetime.fromisoformat(stored["next_check"].replace("Z", "+00:00"))
    assert dt.timedelta(minutes=55) < next_check - now <= dt.timedelta(hours=1)

    # Retry-After 3600: the next run asks nothing about "later" (and "opened"'s new
    # certificate is unknown to the proxy: a 404, then the lifetime rule)
    before = ari_requests(proxy, ids["later"])
    third = run(["renew", "--json"], cfg, pebble)
    assert third.returncode == 0, third.stderr
    assert ari_requests(proxy, ids["later"]) == before
    assert outcomes(third) == {"opened": ("skip", "not-due"), "later": ("skip", "not-due")}
    again = json.loads(status_file(tmp_path, "later").read_text())["ari"]
    assert again["renew_at"] == stored["renew_at"]  # the choice is kept
    new_opened = json.loads(status_file(tmp_path, "opened").read_text())["ari"]
    assert "HTTP 404" in new_opened["error"] and new_opened["renew_at"] is None

    # status shows the next renewal and where it comes from
    rows = {r["name"]: r for r in json.loads(run(["status", "--json"], cfg, pebble).stdout)
            ["certificates"]}
    assert rows["later"]["next_renewal"] == stored["renew_at"]
    assert rows["later"]["next_renewal_basis"] == "ARI"
    assert rows["later"]["ari_explanation"] == "https://ca.example/why"
    assert rows["opened"]["next_renewal_basis"] == "lifetime"
    text = run(["status"], cfg, pebble).stdout.splitlines()
    assert text[0].split()[6:8] == ["NEXT", "RENEWAL"]
    later_row = next(line for line in text if line.startswith("later "))
    assert f"{stored['renew_at'][:10]} {stored['renew_at'][11:16]}Z (ARI)" in later_row
    assert "later: the CA explains its renewal window: https://ca.example/why" in text

    # the CA moves the window into the past (a mass revocation coming): followed at the next
    # check; the dry run (offline) already says so once the data is there
    proxy.ari[ids["later"]] = window(-dt.timedelta(hours=3), -dt.timedelta(minutes=1))
    age_ari(tmp_path, "later")
    asked = ari_requests(proxy)
    plan = run(["renew", "--dry-run"], cfg, pebble)
    assert ari_requests(proxy) == asked  # offline: the cached (old) window
    plans = {line.split()[0]: line.split()[1:3] for line in plan.stdout.splitlines()}
    assert plans["later"] == ["skip", "ARI"]  # "ARI renewal at <the old choice>"
    fourth = run(["renew", "--json"], cfg, pebble)
    assert fourth.returncode == 0, fourth.stderr
    assert outcomes(fourth)["later"] == ("renew", "renewed")
    assert orders(proxy, d["later"])[-1]["replaces"] == ids["later"]


def test_dry_run_uses_cached_data_and_says_so(tmp_path: Path, pebble: PebbleInstance,
                                              proxy: FaultProxy) -> None:
    proxy.ari = {}
    name = domain("dry")
    cfg = ari_config(tmp_path, pebble, proxy, {"dry": {"domains": [name]}})
    assert run(["renew"], cfg, pebble).returncode == 0
    cid = cert_id(tmp_path, "dry")
    proxy.ari = {cid: window(-dt.timedelta(days=2), -dt.timedelta(days=1))}
    # no cached window yet: the dry run asks nothing and falls back to the lifetime rule
    plan = run(["renew", "--dry-run"], cfg, pebble)
    assert plan.stdout.split()[1] == "skip" and ari_requests(proxy) == 0
    # a window cached by a run that renews nothing (--only another, say): store it directly
    path = status_file(tmp_path, "dry")
    data = json.loads(path.read_text())
    data["ari"] = ari.answered(None, serial(tmp_path, "dry"),
                               dt.datetime(2026, 11, 1, 3, 0, tzinfo=UTC),
                               dt.datetime(2026, 11, 1, 3, 0, tzinfo=UTC), None, None,
                               dt.datetime.now(UTC)).to_dict()
    path.write_text(json.dumps(data))
    plan = run(["renew", "--dry-run"], cfg, pebble)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.split(None, 2)[1:] == ["renew", "ARI window opened 2026-11-01 03:00Z\n"]
    assert ari_requests(proxy) == 0


def test_replaces_refused_is_retried_without(tmp_path: Path, pebble: PebbleInstance,
                                             proxy: FaultProxy) -> None:
    proxy.ari = {}
    name = domain("refused")
    cfg = ari_config(tmp_path, pebble, proxy, {"refused": {"domains": [name]}})
    assert run(["renew"], cfg, pebble).returncode == 0
    cid = cert_id(tmp_path, "refused")
    problem = {"type": "urn:ietf:params:acme:error:alreadyReplaced",
               "detail": "certificate already replaced", "status": 409}
    proxy.faults.append(Fault(
        "POST", NEW_ORDER, 409, {"Content-Type": "application/problem+json"},
        json.dumps(problem).encode(),
        match=lambda r: isinstance(r.payload, dict) and "replaces" in r.payload))
    result = run(["renew", "--force", "--json", "-v"], cfg, pebble)
    assert result.returncode == 0, result.stderr
    assert outcomes(result) == {"refused": ("force", "renewed")}
    sent = [r.payload.get("replaces") for r in proxy.matching("POST", NEW_ORDER)
            if name in r.identifiers and r.status in (201, 409)]
    assert sent[-2:] == [cid, None]
    assert "the CA refused the order replacing" in result.stderr
    assert "alreadyReplaced" in result.stderr


def test_no_ari_at_the_ca_off_by_config_and_a_slow_ca(tmp_path: Path, pebble: PebbleInstance,
                                                      proxy: FaultProxy) -> None:
    name = domain("plain")
    certs = {"plain": {"domains": [name]}}
    cfg = ari_config(tmp_path, pebble, proxy, certs)
    assert run(["renew"], cfg, pebble).returncode == 0  # Pebble as it is: no renewalInfo
    # the directory the order used has no renewalInfo: remembered for 6 hours at once
    state = json.loads(status_file(tmp_path, "plain").read_text())["ari"]
    assert state["unsupported"] is True and state["serial"] == serial(tmp_path, "plain")
    second = run(["renew", "--force"], cfg, pebble)
    assert second.returncode == 0, second.stderr
    # no replaces to a CA without ARI
    assert [o.get("replaces") for o in orders(proxy, name)] == [None, None]
    third = run(["renew"], cfg, pebble)
    assert third.returncode == 0
    assert json.loads(status_file(tmp_path, "plain").read_text())["ari"]["unsupported"] is True
    # ... so a run with nothing due did not even fetch the directory
    assert proxy.count("GET", "/dir") == 2  # the two ordering runs

    # renewal.ari: false: no renewal info, no replaces, even when the CA offers ARI
    proxy.ari = {"*": window(-dt.timedelta(hours=2), -dt.timedelta(hours=1))}
    off = ari_config(tmp_path, pebble, proxy, certs, renewal={"ari": False})
    age_ari(tmp_path, "plain")
    result = run(["renew", "--json"], off, pebble)
    assert result.returncode == 0 and outcomes(result)["plain"] == ("skip", "not-due")
    assert ari_requests(proxy) == 0
    assert run(["renew", "--force"], off, pebble).returncode == 0
    assert orders(proxy, name)[-1].get("replaces") is None

    # a CA whose renewal info hangs: the run ends by renewal.deadline, the lifetime rule decides
    proxy.faults.append(Fault("GET", RENEWAL_INFO, 0, delay=20, times=5))
    slow = ari_config(tmp_path, pebble, proxy, certs, renewal={"deadline": "2s"})
    t0 = time.monotonic()
    result = run(["renew", "--json"], slow, pebble)
    took = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert outcomes(result)["plain"] == ("skip", "not-due")
    assert took < 15, took  # not the 20 s the CA hangs (room for a loaded CI machine)
    state = json.loads(status_file(tmp_path, "plain").read_text())["ari"]
    assert state["error"] and state["renew_at"] is None


# -- the pure parts ------------------------------------------------------------------------------

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def stored_cert(serial: str = "0a1b") -> StoredCert:
    return StoredCert(name="www", version="v1", folder=Path("/nonexistent"),
                      domains=("www.example.com",), key_type="ec-p256", serial=serial,
                      not_before=NOW - dt.timedelta(days=10),
                      not_after=NOW + dt.timedelta(days=80),
                      issued_at=NOW - dt.timedelta(days=10))


CERT = CertificateSettings(name="www", domains=("www.example.com",), key="ec-p256",
                           challenge=ChallengeSettings(type="http-01", standalone_port=80))


def state(start: dt.timedelta, end: dt.timedelta, serial: str = "0a1b",
          seed: int = 1) -> ari.AriState:
    return ari.answered(None, serial, NOW + start, NOW + end, None, None, NOW,
                        random.Random(seed))


def decide(status: CertStatus, now: dt.datetime = NOW, use_ari: bool = True,
           stored: StoredCert | None = None) -> renewal.Decision:
    stored = stored or stored_cert()
    status.staged_version = stored.version
    return renewal.decide(CERT, stored, status, now, None, use_ari=use_ari)


def test_decisions_follow_the_window_and_fall_back() -> None:
    future = state(dt.timedelta(days=3), dt.timedelta(days=4))
    d = decide(CertStatus(ari=future))
    assert d.action == renewal.SKIP and d.basis == renewal.BASIS_ARI
    assert d.due_at == future.renew_at and d.reason.startswith("ARI renewal at 2026-12-0")
    # the chosen time passes: renew, though the lifetime rule would wait for weeks
    later = (future.renew_at or NOW) + dt.timedelta(seconds=1)
    d = decide(CertStatus(ari=future), later)
    assert (d.action, d.reason) == (renewal.RENEW, "ARI window opened 2026-12-02 12:00Z")
    # a window after the lifetime rule's due time: ARI decides (later than the rule)
    late = state(dt.timedelta(days=60), dt.timedelta(days=61))
    assert decide(CertStatus(ari=late), NOW + dt.timedelta(days=55)).action == renewal.SKIP
    # ... but not once the certificate has expired
    assert decide(CertStatus(ari=late), NOW + dt.timedelta(days=81)).reason.startswith(
        "expired")
    # no window, a window about another certificate, or ARI off: the lifetime rule
    for status, use in ((CertStatus(), True),
                        (CertStatus(ari=state(-dt.timedelta(days=2), -dt.timedelta(days=1),
                                              serial="other")), True),
                        (CertStatus(ari=state(-dt.timedelta(days=2), -dt.timedelta(days=1))),
                         False),
                        (CertStatus(ari=ari.failed(None, "0a1b", "HTTP 500", NOW)), True),
                        (CertStatus(ari=ari.unsupported("0a1b", NOW)), True)):
        d = decide(status, use_ari=use)
        assert (d.action, d.basis) == (renewal.SKIP, renewal.BASIS_LIFETIME), status


def test_window_choice_is_uniform_kept_and_replaced_when_moved() -> None:
    start, end = NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=2)
    picks = [ari.answered(None, "s", start, end, None, None, NOW, random.Random(i)).renew_at
             for i in range(200)]
    assert all(p is not None and start <= p <= end for p in picks)
    hours = sorted(int(((p or NOW) - start).total_seconds() // 3600) for p in picks)
    assert hours[0] < 3 and hours[-1] > 20 and 8 < hours[100] < 16  # spread over the window
    first = ari.answered(None, "s", start, end, None, None, NOW, random.Random(1))
    # the same window later: the same choice; a moved one: a new choice inside it
    same = ari.answered(first, "s", start, end, None, "60", NOW, random.Random(2))
    assert same.renew_at == first.renew_at
    moved = ari.answered(first, "s", start - dt.timedelta(days=1), start, None, None, NOW,
                         random.Random(2))
    assert moved.renew_at != first.renew_at
    assert start - dt.timedelta(days=1) <= (moved.renew_at or NOW) <= start
    # a failed request keeps the known window, next check in 6 hours
    kept = ari.failed(first, "s", "timed out", NOW)
    assert kept.renew_at == first.renew_at and kept.next_check == NOW + dt.timedelta(hours=6)
    assert ari.failed(first, "other", "x", NOW).renew_at is None


@pytest.mark.parametrize(("retry_after", "expected"), [
    ("3600", dt.timedelta(hours=1)),
    ("1", dt.timedelta(minutes=1)),  # clamped up
    ("864000", dt.timedelta(days=1)),  # clamped down
    (None, dt.timedelta(hours=6)),
    ("soon", dt.timedelta(hours=6)),
    ("Sun, 29 Nov 2026 14:00:00 GMT", dt.timedelta(hours=2)),
])
def test_next_check_clamps_retry_after(retry_after: str | None, expected: dt.timedelta) -> None:
    assert ari.next_check(retry_after, NOW) == NOW + expected


@pytest.mark.parametrize("body", [
    {}, {"suggestedWindow": {}}, {"suggestedWindow": {"start": "2026-01-02T00:00:00Z"}},
    {"suggestedWindow": {"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}},
    {"suggestedWindow": {"start": "tomorrow", "end": "2026-01-01T00:00:00Z"}},
    {"suggestedWindow": {"start": "2026-01-01T00:00:00", "end": "2026-01-02T00:00:00"}},
    [], "x",
])
def test_malformed_windows_are_refused(body: Any) -> None:
    with pytest.raises(ValueError):
        ari.parse_window(body)


def test_cert_id_matches_the_rfc_example_and_acme(pebble: PebbleInstance,
                                                  tmp_path: Path) -> None:
    """RFC 9773 section 4.1's example, and acme's own encoder as a cross-check."""
    from acme.client import _renewal_info_path_component
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    aki = bytes.fromhex("69886B6AEE0A3D5FBC6AC5E42B9B1B3C8C25AA7E")  # not the RFC's; its form
    for serial_number in (0x87654321, 0x7F, 0x80, 0xFF00, 1, 2**159 - 1):
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([])).issuer_name(x509.Name([]))
                .public_key(key.public_key()).serial_number(serial_number)
                .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
                .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
                .sign(key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        assert ari.cert_id(pem) == _renewal_info_path_component(cert)
    # RFC 9773 4.1: keyIdentifier 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4,
    # serial 00:87:65:43:21 -> "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([])).issuer_name(x509.Name([]))
            .public_key(key.public_key()).serial_number(0x87654321)
            .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
            .sign(key, hashes.SHA256()))
    assert ari.cert_id(cert.public_bytes(serialization.Encoding.PEM)) == \
        "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def test_status_files_round_trip_and_old_ones_load() -> None:
    status = CertStatus(last_result="renewed", ari=state(dt.timedelta(days=1),
                                                         dt.timedelta(days=2)))
    assert CertStatus.from_json(status.to_json()) == status
    old = json.loads(status.to_json())
    del old["ari"]
    assert CertStatus.from_json(json.dumps(old)).ari is None
    old["ari"] = {"serial": 5}  # damaged: only the renewal info is forgotten
    loaded = CertStatus.from_json(json.dumps(old))
    assert loaded.ari is None and loaded.last_result == "renewed"


# -- short-lived certificates: how often cron must run -------------------------------------------

def test_check_warns_when_cron_must_run_more_than_daily(tmp_path: Path) -> None:
    """A 12-hour certificate in the store (made here: Pebble issues 5-year ones) makes `check`
    say how often cron must run; a 6-day one (Let's Encrypt's shortlived) does not."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from certbatch.store import Store

    store = Store(tmp_path / "state")
    now = dt.datetime.now(UTC).replace(microsecond=0)
    for name, lifetime in (("tiny", dt.timedelta(hours=12)), ("six", dt.timedelta(days=6))):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, f"{name}.test")])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(7)
                .not_valid_before(now).not_valid_after(now + lifetime)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{name}.test")]),
                               critical=False)
                .sign(key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        store.save_certificate(
            name, key_type="ec-p256", domains=(f"{name}.test",),
            privkey_pem=key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()),
            cert_pem=pem, chain_pem=b"", fullchain_pem=pem, serial="07", not_before=now,
            not_after=now + lifetime, issued_at=now)
    cfg = tmp_path / "certbatch.yaml"
    cfg.write_text("acme: {directory: https://ca.example/dir}\n"
                   "paths: {state: ./state, spool: ./spool, hooks: ./hooks}\n"
                   "defaults: {challenge: {type: http-01, standalone: {}}}\n"
                   "certificates:\n  tiny: {domains: [tiny.test]}\n"
                   "  six: {domains: [six.test]}\n")
    result = run(["check"], cfg)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "certbatch: warning: tiny: renews every 6 hours (lifetime 12 hours): run "
        "`certbatch renew` from cron at least every 90 minutes"]


def test_cron_advice() -> None:
    assert renewal.cron_advice(NOW, NOW + dt.timedelta(days=6), None) is None
    assert renewal.cron_advice(NOW, NOW + dt.timedelta(days=90), None) is None
    assert renewal.cron_advice(NOW, NOW + dt.timedelta(hours=24), None) == (
        "renews every 12 hours (lifetime 24 hours): run `certbatch renew` from cron at least "
        "every 3 hours")
    # before_expiry moves the due time (never before half the lifetime), and the interval
    assert renewal.cron_advice(NOW, NOW + dt.timedelta(hours=36), dt.timedelta(hours=30)) == (
        "renews every 18 hours (lifetime 36 hours): run `certbatch renew` from cron at least "
        "every 4 hours")
    assert renewal.cron_advice(NOW, NOW + dt.timedelta(days=2), dt.timedelta(hours=12)) is None


# -- review fixes: odd answers from the CA ------------------------------------------------------

@pytest.mark.parametrize("value", [
    "99999999999999", "\u00b2", "1e9", "-5", "9" * 5000, "Fri, 01 Feb 99999 10:00:00 GMT",
    "Fri, 31 Dec 9999 23:59:59 GMT", "\x00"])
def test_retry_after_values_never_raise(value: str) -> None:
    from certbatch.retry_after import parse_retry_after

    when = parse_retry_after(value, NOW)
    assert when is None or NOW <= when <= NOW + dt.timedelta(days=366)
    assert NOW + dt.timedelta(minutes=1) <= ari.next_check(value, NOW) \
        <= NOW + dt.timedelta(days=1)


def test_fractional_windows_keep_their_choice() -> None:
    body = {"suggestedWindow": {"start": "2026-12-01T03:00:00.333333Z",
                                "end": "2026-12-02T03:00:00.5+00:00"}}
    start, end, _ = ari.parse_window(body)
    assert (start, end) == (dt.datetime(2026, 12, 1, 3, 0, tzinfo=UTC),
                            dt.datetime(2026, 12, 2, 3, 0, tzinfo=UTC))
    first = ari.answered(None, "s", start, end, None, None, NOW, random.Random(1))
    stored = ari.AriState.from_dict(json.loads(json.dumps(first.to_dict())))
    again = ari.answered(stored, "s", *ari.parse_window(body)[:2], None, None, NOW,
                         random.Random(2))
    assert again.renew_at == first.renew_at  # the same window, read again: the same choice
    # nanoseconds and a lower-case z, as some CAs write them
    body = {"suggestedWindow": {"start": "2026-12-01T03:00:00.123456789z",
                                "end": "2026-12-01T04:00:00-02:00"}}
    assert ari.parse_window(body)[1] == dt.datetime(2026, 12, 1, 6, 0, tzinfo=UTC)


@pytest.mark.parametrize(("url", "kept"), [
    ("https://ca.example/why", True),
    ("http://ca.example/why?x=1", True),
    ("https://ca.example/\x1b[31mred", False),
    ("https://ca.example/a\nb", False),
    ("javascript:alert(1)", False),
    ("https://" + "a" * 600, False),
])
def test_only_plain_explanation_urls_are_kept(url: str, kept: bool) -> None:
    body = {"suggestedWindow": {"start": "2026-12-01T03:00:00Z",
                                "end": "2026-12-02T03:00:00Z"}, "explanationURL": url}
    assert ari.parse_window(body)[2] == (url if kept else None)


def test_a_503_from_renewal_info_stops_the_rest(pebble: PebbleInstance,
                                                proxy: FaultProxy) -> None:
    # MOCK (what Pebble 2.4 lacks): the proxy's renewal info answers the first request with
    # 503 and Retry-After: 600. Nothing more is asked in that run; every certificate's next
    # check is the CA's time, and the fetcher hands the wait on (the runner to its pacer).
    proxy.ari = {"*": window(dt.timedelta(days=1), dt.timedelta(days=2))}
    proxy.faults.append(Fault("GET", RENEWAL_INFO, 503, {"Retry-After": "600"}, b"busy"))
    fetcher = ari.Fetcher(proxy.directory_url, str(pebble.ca_bundle), 5, 1,
                          time.monotonic() + 30)
    now = dt.datetime.now(UTC)
    queries = [ari.Query(f"c{i}", f"0{i}", f"id{i}", None) for i in range(4)]
    states = fetcher.fetch_all(queries, now)
    assert ari_requests(proxy) == 1
    assert fetcher.paused is not None
    assert dt.timedelta(seconds=590) < fetcher.paused[0] - now <= dt.timedelta(seconds=600)
    assert all(s.next_check == fetcher.paused[0] and s.error for s in states.values())
