"""The renewal decision: (configured certificate, stored certificate, status, now) -> what to do.

Pure: no I/O, no clock; the caller passes `now`. That keeps `renew --dry-run` and `status` exactly
in step with what `renew` does.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from . import ari
from .config import CertificateSettings
from .store import CertStatus, StoredCert

ISSUE = "issue"  # never issued
REISSUE = "reissue"  # domains, key type or profile changed, live files damaged, or revoked
RENEW = "renew"  # due by the renewal rule
FORCE = "force"  # --force
RESTAGE = "restage"  # renewed earlier, deploy hooks failed: stage again without a new order
SKIP = "skip"  # not due
RATE_LIMITED = "rate-limited"  # the CA asked us to wait
BACKOFF = "backoff"  # the last orders failed: wait before the next (not with --force)
ERROR = "error"  # the stored state of this certificate cannot be read

SHORT_LIVED = dt.timedelta(days=10)

# The wait after 1, 2, 3 consecutive failed orders, then BACKOFF_MAX after each further one
# (Let's Encrypt's integration guide: about 1 minute, 10 minutes, 100 minutes, then once a day).
BACKOFF_STEPS = (dt.timedelta(minutes=1), dt.timedelta(minutes=10), dt.timedelta(minutes=100))
BACKOFF_MAX = dt.timedelta(days=1)


def backoff_delay(failed_orders: int) -> dt.timedelta:
    """How long to wait before ordering again after `failed_orders` (>= 1) failures in a row."""
    if failed_orders < 1:
        return dt.timedelta(0)
    return BACKOFF_STEPS[failed_orders - 1] if failed_orders <= len(BACKOFF_STEPS) \
        else BACKOFF_MAX


def record_order_failure(status: CertStatus, now: dt.datetime) -> None:
    """An order failed (not a rate limit): count it and set the next attempt time."""
    status.failed_orders += 1
    status.next_attempt = now + backoff_delay(status.failed_orders)


def record_order_success(status: CertStatus) -> None:
    status.failed_orders, status.next_attempt = 0, None


def _backoff(status: CertStatus, now: dt.datetime) -> Decision | None:
    """The BACKOFF decision while the next attempt time lies ahead, else None."""
    if status.failed_orders < 1 or status.next_attempt is None or status.next_attempt <= now:
        return None
    n = status.failed_orders
    reason = (f"{n} failed order{'s' * (n != 1)} in a row; next attempt "
              f"{status.next_attempt:%Y-%m-%d %H:%M}Z, or now with renew --force")
    if status.last_error:
        reason += f" (last error: {status.last_error})"
    return Decision(BACKOFF, reason, status.next_attempt, BASIS_BACKOFF)


class Decision(NamedTuple):
    """What to do with one certificate, and why. (A named tuple: a run with nothing due makes
    one per certificate from the digest, and a frozen dataclass takes four times as long.)"""

    action: str
    reason: str
    due_at: dt.datetime | None = None  # when the stored certificate becomes due
    basis: str | None = None  # what set due_at: BASIS_ARI, BASIS_BEFORE_EXPIRY, BASIS_LIFETIME

    @property
    def needs_order(self) -> bool:
        """True when a new ACME order is needed."""
        return self.action in (ISSUE, REISSUE, RENEW, FORCE)

    @property
    def does_work(self) -> bool:
        return self.needs_order or self.action == RESTAGE


BASIS_ARI = "ARI"  # the CA's renewal window (RFC 9773)
BASIS_BEFORE_EXPIRY = "before_expiry"  # renewal.before_expiry
BASIS_LIFETIME = "lifetime"  # a third of the lifetime left (half for short-lived ones)
BASIS_BACKOFF = "backoff"  # held back after failed orders: the next attempt
BASIS_RATE_LIMIT = "rate-limit"  # held back by the CA's Retry-After


def next_renewal(stored: StoredCert, status: CertStatus, before_expiry: dt.timedelta | None,
                 use_ari: bool = True) -> tuple[dt.datetime, str]:
    """When the stored certificate is to be renewed, and by which rule: the time chosen in the
    CA's ARI window when there is one for this certificate (it decides over the others), else
    the expiry rule (`due_time`)."""
    state = ari.usable(status.ari, stored.serial) if use_ari else None
    if state is not None and state.renew_at is not None:
        return state.renew_at, BASIS_ARI
    basis = BASIS_BEFORE_EXPIRY if before_expiry is not None else BASIS_LIFETIME
    return due_time(stored.not_before, stored.not_after, before_expiry), basis


def due_time(not_before: dt.datetime, not_after: dt.datetime,
             before_expiry: dt.timedelta | None) -> dt.datetime:
    """When a certificate becomes due: `before_expiry` ahead of expiry if set, else when a third
    of its lifetime remains (half for certificates shorter than 10 days), as CAs advise.

    A `before_expiry` as long as the lifetime would renew on every run (and soon hit the CA's
    duplicate-certificate limit), so the due time is never before half the lifetime.
    """
    lifetime = not_after - not_before
    if before_expiry is not None:
        return max(not_after - before_expiry, not_before + lifetime / 2)
    fraction = 2 if lifetime < SHORT_LIVED else 3
    return not_after - lifetime / fraction


CRON_ATTEMPTS = 4  # cron runs wanted between a certificate's due time and its expiry


def cron_advice(not_before: dt.datetime, not_after: dt.datetime,
                before_expiry: dt.timedelta | None) -> str | None:
    """A warning when a certificate renews more often than once a day, saying how often cron
    must run so that CRON_ATTEMPTS runs fall between its due time and its expiry (room for a
    failed attempt or two); None for the usual lifetimes."""
    due = due_time(not_before, not_after, before_expiry)
    interval, slack = due - not_before, not_after - due
    if interval >= dt.timedelta(days=1):
        return None
    every = max(slack / CRON_ATTEMPTS, dt.timedelta(minutes=1))
    return (f"renews every {_span(interval)} (lifetime {_span(not_after - not_before)}): "
            f"run `certbatch renew` from cron at least every {_span(every)}")


def _span(t: dt.timedelta) -> str:
    minutes = int(t.total_seconds() // 60)
    if minutes >= 48 * 60:
        return f"{minutes // 1440} days"
    if minutes >= 120:
        return f"{minutes // 60} hours"
    return f"{minutes} minutes"


def decide(cert: CertificateSettings, stored: StoredCert | None, status: CertStatus,
           now: dt.datetime, before_expiry: dt.timedelta | None,
           force: bool = False, use_ari: bool = True) -> Decision:
    """What `renew` does with one certificate now. `use_ari`: follow the CA's renewal window
    stored in `status` (renewal.ari)."""
    limited = status.rate_limited_until is not None and status.rate_limited_until > now
    rate_limited = Decision(RATE_LIMITED, f"rate-limited by the CA until "
                            f"{status.rate_limited_until:%Y-%m-%d %H:%M}Z",
                            status.rate_limited_until, BASIS_RATE_LIMIT) if limited else None
    # A rate limit wins over the backoff (even with --force); --force skips the backoff.
    held = rate_limited or (None if force else _backoff(status, now))
    if stored is None:
        return held or Decision(ISSUE, "no certificate yet")
    due_at, basis = next_renewal(stored, status, before_expiry, use_ari)
    order = _order_reason(cert, stored, status, now, due_at, basis, force)
    if order is not None and held is None:
        return order
    if status.staged_version != stored.version:
        # Needs no CA, so a rate limit does not hold it back.
        return Decision(RESTAGE, "stored but not staged yet (deploy hook failed or run "
                                 "interrupted)", due_at, basis)
    if order is not None and held is not None:
        # A rate limit is honoured even with --force: asking again only extends the penalty.
        return held
    if basis == BASIS_ARI:
        assert status.ari is not None
        reason = ari.describe(status.ari, now)
    else:
        reason = f"due {due_at:%Y-%m-%d}"
    return rate_limited or Decision(SKIP, reason, due_at, basis)


def _order_reason(cert: CertificateSettings, stored: StoredCert, status: CertStatus,
                  now: dt.datetime, due_at: dt.datetime, basis: str, force: bool
                  ) -> Decision | None:
    """The decision if the stored certificate needs a new order, else None."""
    if stored.damaged:
        return Decision(REISSUE, f"live files damaged ({stored.damaged})", due_at, basis)
    if status.revoked_renew and status.revoked_serial == stored.serial:
        when = f" {status.revoked_at:%Y-%m-%d %H:%M}Z" if status.revoked_at else ""
        why = f" ({status.revoked_reason})" if status.revoked_reason else ""
        return Decision(REISSUE, f"revoked{when}{why}", due_at, basis)
    if set(stored.domains) != set(cert.domains):
        added = sorted(set(cert.domains) - set(stored.domains))
        removed = sorted(set(stored.domains) - set(cert.domains))
        parts = ([f"added {', '.join(added)}"] if added else []) + (
            [f"removed {', '.join(removed)}"] if removed else [])
        return Decision(REISSUE, f"domains changed ({'; '.join(parts)})", due_at, basis)
    if stored.key_type != cert.key:
        return Decision(REISSUE, f"key type changed ({stored.key_type} -> {cert.key})", due_at,
                        basis)
    # No profile configured: whatever the CA chose is fine. A version stored without one (or
    # before certbatch recorded profiles) has the CA's default, which a configured one replaces.
    if cert.profile is not None and stored.profile != cert.profile:
        return Decision(REISSUE, f"profile changed ({stored.profile or 'CA default'} -> "
                                 f"{cert.profile})", due_at, basis)
    if force:
        return Decision(FORCE, "forced", due_at, basis)
    if now >= stored.not_after:  # whatever ARI said
        return Decision(RENEW, f"expired {stored.not_after:%Y-%m-%d %H:%M}Z", due_at, basis)
    if now >= due_at:
        if basis == BASIS_ARI:
            assert status.ari is not None
            return Decision(RENEW, ari.describe(status.ari, now), due_at, basis)
        return Decision(RENEW, f"expires {stored.not_after:%Y-%m-%d %H:%M}Z", due_at, basis)
    return None


def quiet_until(stored: StoredCert | None, status: CertStatus, decision: Decision,
                now: dt.datetime, before_expiry: dt.timedelta | None,
                use_ari: bool = True) -> dt.datetime | None:
    """Until when `decide` keeps giving `decision` (with the same reason) and `renew` has no
    renewal info to ask for, if nothing but the clock changes: the first time any comparison
    they make with `now` turns. None when the certificate needs work, or a look, now.

    Each such comparison is "a stored time <= now" (or <), which turns once, at that time;
    so the decision holds until the earliest of those times that lies ahead."""
    if decision.does_work or decision.action == ERROR or stored is None or stored.damaged:
        return None
    times = [stored.not_after, status.rate_limited_until, status.next_attempt,
             next_renewal(stored, status, before_expiry, use_ari)[0]]
    if use_ari:
        if now < stored.not_after and ari.needs_check(status.ari, stored.serial, now):
            return None  # renew asks the CA's renewal info now
        if status.ari is not None:
            times += [status.ari.next_check, status.ari.renew_at]
    ahead = [t for t in times if t is not None and t > now]
    return min(ahead) if ahead else None
