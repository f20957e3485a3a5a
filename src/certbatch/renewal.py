"""The renewal decision: (configured certificate, stored certificate, status, now) -> what to do.

Pure: no I/O, no clock; the caller passes `now`. That keeps `renew --dry-run` and `status` exactly
in step with what `renew` does.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from .config import CertificateSettings
from .store import CertStatus, StoredCert

ISSUE = "issue"  # never issued
REISSUE = "reissue"  # domains or key type changed since the last issuance
RENEW = "renew"  # due by the renewal rule
FORCE = "force"  # --force
RESTAGE = "restage"  # renewed earlier, deploy hooks failed: stage again without a new order
SKIP = "skip"  # not due
RATE_LIMITED = "rate-limited"  # the CA asked us to wait

SHORT_LIVED = dt.timedelta(days=10)


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str
    due_at: dt.datetime | None = None  # when the stored certificate becomes due

    @property
    def needs_order(self) -> bool:
        """True when a new ACME order is needed."""
        return self.action in (ISSUE, REISSUE, RENEW, FORCE)

    @property
    def does_work(self) -> bool:
        return self.needs_order or self.action == RESTAGE


def due_time(not_before: dt.datetime, not_after: dt.datetime,
             before_expiry: dt.timedelta | None) -> dt.datetime:
    """When a certificate becomes due: `before_expiry` ahead of expiry if set, else when a third
    of its lifetime remains (half for certificates shorter than 10 days), as CAs advise."""
    if before_expiry is not None:
        return not_after - before_expiry
    lifetime = not_after - not_before
    fraction = 2 if lifetime < SHORT_LIVED else 3
    return not_after - lifetime / fraction


def decide(cert: CertificateSettings, stored: StoredCert | None, status: CertStatus,
           now: dt.datetime, before_expiry: dt.timedelta | None,
           force: bool = False) -> Decision:
    """What `renew` does with one certificate now."""
    if status.rate_limited_until and status.rate_limited_until > now:
        # Honoured even with --force: asking again only extends the CA's penalty.
        return Decision(RATE_LIMITED,
                        f"rate-limited by the CA until {status.rate_limited_until:%Y-%m-%d %H:%M}Z")
    if stored is None:
        return Decision(ISSUE, "no certificate yet")
    due_at = due_time(stored.not_before, stored.not_after, before_expiry)
    if set(stored.domains) != set(cert.domains):
        added = sorted(set(cert.domains) - set(stored.domains))
        removed = sorted(set(stored.domains) - set(cert.domains))
        parts = ([f"added {', '.join(added)}"] if added else []) + (
            [f"removed {', '.join(removed)}"] if removed else [])
        return Decision(REISSUE, f"domains changed ({'; '.join(parts)})", due_at)
    if stored.key_type != cert.key:
        return Decision(REISSUE, f"key type changed ({stored.key_type} -> {cert.key})", due_at)
    if force:
        return Decision(FORCE, "forced", due_at)
    if now >= stored.not_after:
        return Decision(RENEW, f"expired {stored.not_after:%Y-%m-%d %H:%M}Z", due_at)
    if now >= due_at:
        return Decision(RENEW, f"expires {stored.not_after:%Y-%m-%d %H:%M}Z", due_at)
    if status.unstaged_version and status.unstaged_version == stored.version:
        return Decision(RESTAGE, "renewed earlier but not staged (deploy hook failed)", due_at)
    return Decision(SKIP, f"due {due_at:%Y-%m-%d}", due_at)
