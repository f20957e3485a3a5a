"""The renewal decision, table-driven with an injected `now`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from certbatch import renewal
from certbatch.config import CertificateSettings, ChallengeSettings
from certbatch.store import CertStatus, StoredCert

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 1, tzinfo=UTC)
DAY = dt.timedelta(days=1)


STAGED = CertStatus(staged_version="v1")  # the usual case: the live version was staged


def cert(domains=("a.example", "b.example"), key="ec-p256") -> CertificateSettings:
    return CertificateSettings(name="a", domains=tuple(domains), key=key,
                               challenge=ChallengeSettings(type="dns-01", script=Path("/bin/true")))


def stored(days: float = 90, domains=("a.example", "b.example"), key="ec-p256",
           version="v1") -> StoredCert:
    return StoredCert(name="a", version=version, folder=Path("/nonexistent"),
                      domains=tuple(domains),
                      key_type=key, serial="01", not_before=T0, not_after=T0 + days * DAY,
                      issued_at=T0)


@pytest.mark.parametrize("lifetime_days, now_offset_days, before_expiry, expected", [
    # 90-day certificate: due when a third (30 days) remains, i.e. from day 60
    (90, 59.9, None, renewal.SKIP),
    (90, 60.0, None, renewal.RENEW),
    (90, 89.0, None, renewal.RENEW),
    (90, 91.0, None, renewal.RENEW),  # expired
    # 6-day certificate (short-lived): due when half remains, i.e. from day 3
    (6, 2.9, None, renewal.SKIP),
    (6, 3.0, None, renewal.RENEW),
    # 9.9 days is still short-lived; 10 days is not (third: due at 6.67 days)
    (9.9, 4.9, None, renewal.SKIP),
    (9.9, 4.95, None, renewal.RENEW),
    (10, 6.0, None, renewal.SKIP),
    (10, 6.7, None, renewal.RENEW),
    # explicit before_expiry overrides the fraction rule
    (90, 59.0, dt.timedelta(days=14), renewal.SKIP),
    (90, 75.9, dt.timedelta(days=14), renewal.SKIP),
    (90, 76.0, dt.timedelta(days=14), renewal.RENEW),
])
def test_due_rule(lifetime_days, now_offset_days, before_expiry, expected):
    decision = renewal.decide(cert(), stored(lifetime_days), STAGED,
                              T0 + now_offset_days * DAY, before_expiry)
    assert decision.action == expected
    assert decision.needs_order == (expected == renewal.RENEW)


def test_missing_certificate_is_issued():
    d = renewal.decide(cert(), None, STAGED, T0, None)
    assert d.action == renewal.ISSUE and d.needs_order


@pytest.mark.parametrize("configured, reason_part", [
    (cert(domains=("a.example", "b.example", "c.example")), "added c.example"),
    (cert(domains=("a.example",)), "removed b.example"),
    (cert(key="rsa-2048"), "key type changed (ec-p256 -> rsa-2048)"),
])
def test_changed_certificate_is_reissued_even_when_not_due(configured, reason_part):
    d = renewal.decide(configured, stored(90), STAGED, T0 + DAY, None)
    assert d.action == renewal.REISSUE
    assert reason_part in d.reason


def test_domain_order_is_not_a_change():
    d = renewal.decide(cert(domains=("b.example", "a.example")), stored(90), STAGED,
                       T0 + DAY, None)
    assert d.action == renewal.SKIP


def test_force_renews_a_fresh_certificate():
    d = renewal.decide(cert(), stored(90), STAGED, T0 + DAY, None, force=True)
    assert d.action == renewal.FORCE and d.needs_order


def test_rate_limit_is_honoured_until_it_passes_even_with_force():
    status = CertStatus(rate_limited_until=T0 + 2 * DAY)
    during = renewal.decide(cert(), None, status, T0 + DAY, None, force=True)
    assert during.action == renewal.RATE_LIMITED and not during.does_work
    after = renewal.decide(cert(), None, status, T0 + 3 * DAY, None)
    assert after.action == renewal.ISSUE


def test_live_version_not_staged_is_restaged_without_an_order():
    """Deploy hooks failed, or the run died between storing and staging: the live version
    differs from the last staged one, and the next run stages it (no new order)."""
    for status in (CertStatus(), CertStatus(staged_version="v0")):
        d = renewal.decide(cert(), stored(90, version="v1"), status, T0 + DAY, None)
        assert d.action == renewal.RESTAGE and d.does_work and not d.needs_order
    d2 = renewal.decide(cert(), stored(90, version="v1"), STAGED, T0 + DAY, None)
    assert d2.action == renewal.SKIP


def test_due_and_unstaged_orders_anew():
    d = renewal.decide(cert(), stored(90), CertStatus(staged_version="v0"), T0 + 61 * DAY, None)
    assert d.action == renewal.RENEW


def test_rate_limit_does_not_hold_back_a_restage():
    status = CertStatus(rate_limited_until=T0 + 70 * DAY, staged_version="v0")
    d = renewal.decide(cert(), stored(90), status, T0 + 61 * DAY, None)
    assert d.action == renewal.RESTAGE
    staged = CertStatus(rate_limited_until=T0 + 70 * DAY, staged_version="v1")
    assert renewal.decide(cert(), stored(90), staged, T0 + 61 * DAY, None).action \
        == renewal.RATE_LIMITED


def test_before_expiry_longer_than_lifetime_does_not_renew_every_run():
    # 100 days before expiry of a 90-day certificate: clamped to half the lifetime
    assert renewal.decide(cert(), stored(90), STAGED, T0 + DAY,
                          dt.timedelta(days=100)).action == renewal.SKIP
    assert renewal.decide(cert(), stored(90), STAGED, T0 + 45 * DAY,
                          dt.timedelta(days=100)).action == renewal.RENEW


# -- backoff after failed orders (not rate limits) ---------------------------------------------

MINUTE = dt.timedelta(minutes=1)
DUE_NOW = T0 + 61 * DAY  # the 90-day certificate is due from day 60


def failed_orders(n: int, start: dt.datetime = DUE_NOW) -> tuple[CertStatus, list[dt.datetime]]:
    """A status after `n` failed orders, each made as soon as the backoff allowed; the times."""
    status = CertStatus(staged_version="v1", last_error="DNS API refused it")
    times, now = [], start
    for _ in range(n):
        renewal.record_order_failure(status, now)
        times.append(now)
        assert status.next_attempt is not None
        now = status.next_attempt
    return status, times


@pytest.mark.parametrize("failures, wait", [
    (1, MINUTE), (2, 10 * MINUTE), (3, 100 * MINUTE), (4, DAY), (5, DAY), (30, DAY),
])
def test_backoff_sequence(failures, wait):
    assert renewal.backoff_delay(failures) == wait
    status, times = failed_orders(failures)
    assert status.failed_orders == failures
    assert status.next_attempt == times[-1] + wait
    for configured, live in ((cert(), stored(90)), (cert(), None)):  # a renewal, a first issue
        during = renewal.decide(configured, live, status, status.next_attempt - dt.timedelta(
            seconds=1), None)
        assert during.action == renewal.BACKOFF and not during.does_work
        s = "s" if failures > 1 else ""
        assert during.reason == (f"{failures} failed order{s} in a row; next attempt "
                                 f"{status.next_attempt:%Y-%m-%d %H:%M}Z, or now with renew "
                                 f"--force (last error: DNS API refused it)")
        after = renewal.decide(configured, live, status, status.next_attempt, None)
        assert after.needs_order


@pytest.mark.parametrize("case, status, now, force, expected", [
    # --force skips the backoff ...
    ("force", failed_orders(3)[0], DUE_NOW + MINUTE, True, renewal.FORCE),
    # ... but never a rate limit's Retry-After, which also wins over the backoff.
    ("rate limit wins", CertStatus(staged_version="v1", failed_orders=2,
                                   next_attempt=DUE_NOW + 10 * MINUTE,
                                   rate_limited_until=DUE_NOW + DAY),
     DUE_NOW + MINUTE, False, renewal.RATE_LIMITED),
    ("rate limit wins with --force", CertStatus(staged_version="v1", failed_orders=2,
                                                next_attempt=DUE_NOW + 10 * MINUTE,
                                                rate_limited_until=DUE_NOW + DAY),
     DUE_NOW + MINUTE, True, renewal.RATE_LIMITED),
    # Not due: nothing to back off from (a failed forced order of a fresh certificate).
    ("not due", CertStatus(staged_version="v1", failed_orders=1, next_attempt=T0 + 2 * DAY),
     T0 + DAY, False, renewal.SKIP),
    # A restage needs no order, so the backoff does not hold it back.
    ("restage", CertStatus(staged_version="v0", failed_orders=1, next_attempt=DUE_NOW + DAY),
     DUE_NOW, False, renewal.RESTAGE),
    # Old status files: no count, no time.
    ("no backoff fields", CertStatus(staged_version="v1"), DUE_NOW, False, renewal.RENEW),
])
def test_backoff_against_force_rate_limits_and_restage(case, status, now, force, expected):
    assert renewal.decide(cert(), stored(90), status, now, None, force=force).action == expected


def test_a_successful_order_resets_the_backoff():
    status, _ = failed_orders(4)
    renewal.record_order_success(status)
    assert status.failed_orders == 0 and status.next_attempt is None
    assert renewal.decide(cert(), stored(90), status, DUE_NOW, None).action == renewal.RENEW
    # The next failure starts over at one minute.
    renewal.record_order_failure(status, DUE_NOW)
    assert status.next_attempt == DUE_NOW + MINUTE


def test_backoff_fields_persist_and_old_status_files_load():
    status, _ = failed_orders(2)
    again = CertStatus.from_json(status.to_json())
    assert again == status and again.failed_orders == 2
    old = CertStatus.from_json('{"last_result": "failed", "staged_version": "v1"}')
    assert old.failed_orders == 0 and old.next_attempt is None
