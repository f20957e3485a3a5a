"""HTTP Retry-After (RFC 9110 section 10.2.3), as the CA sends it on 429s, 503s and ARI."""

from __future__ import annotations

import datetime as dt
import email.utils

MAX_SECONDS = 366 * 86400


def parse_retry_after(value: str | None, now: dt.datetime | None = None
                      ) -> dt.datetime | None:
    """Retry-After (delta-seconds or HTTP-date) as an aware UTC datetime; None if unusable."""
    if not value:
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is true too
        # capped: a CA's absurd number must not overflow the date or int() (a year is plenty)
        seconds = MAX_SECONDS if len(value) > 10 else min(int(value), MAX_SECONDS)
        return now + dt.timedelta(seconds=seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" in the date means UTC without saying so
        when = when.replace(tzinfo=dt.timezone.utc)
    # a date in 9999 must not hold a certificate back for ever (see the seconds above)
    return min(when.astimezone(dt.timezone.utc), now + dt.timedelta(seconds=MAX_SECONDS))
