"""A client-side pace for requests to the CA, shared by every worker thread of a run.

With 16 workers a run can send requests faster than a CA allows from one address. Let's
Encrypt's per-IP limits are 20/s for new-nonce, 5/s for new-account, 300/s for new-order and
250/s for everything else; staying under them costs nothing at certbatch's usual rates, and
going over them gets 503s for everyone on the host. Each endpoint class has a token bucket
(a fifth of a second's worth of burst) that requests wait for.

The CA's own word wins for the rest of the run: a 503 with Retry-After pauses every request to
it, and a 429 with Retry-After pauses the endpoint class it came from (not new-order, whose 429s
are per domain or per account: one certificate's limit must not stop the others; the runner
stores those per certificate). A pause longer than the caller can wait raises at once, without
asking the CA again.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable

NEW_NONCE, NEW_ACCOUNT, NEW_ORDER, OTHER = "new-nonce", "new-account", "new-order", "other"
# Requests per second (Let's Encrypt's per-IP limits, 2026).
RATES = {NEW_NONCE: 20.0, NEW_ACCOUNT: 5.0, NEW_ORDER: 300.0, OTHER: 250.0}
BURST_SECONDS = 0.2  # a bucket holds this many seconds' worth of requests (at least one)


class Paused(Exception):
    """The CA asked for a pause longer than the caller may wait: `until`, `reason`."""

    def __init__(self, until: dt.datetime, reason: str) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason


class Pacer:
    """Token buckets per endpoint class plus the pauses the CA asked for; thread-safe."""

    def __init__(self, rates: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)
                 ) -> None:
        self.rates = dict(rates or RATES)
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        self._tokens = {k: self._capacity(k) for k in self.rates}
        self._filled = {k: clock() for k in self.rates}
        self._paused: dict[str, tuple[dt.datetime, str]] = {}  # class ("*": all) -> until, why

    def _capacity(self, kind: str) -> float:
        return max(1.0, self.rates[kind] * BURST_SECONDS)

    def reserve(self, kind: str) -> float:
        """Take one request slot of `kind`; the seconds to wait before sending (0: now).

        Raises Paused while the CA's pause for it is on; the caller decides whether to wait
        (pause_left) or give up."""
        with self._lock:
            pause = self._pause_for(kind)
            if pause is not None:
                raise Paused(*pause)
            rate = self.rates.get(kind, self.rates[OTHER])
            kind = kind if kind in self.rates else OTHER
            t = self._clock()
            tokens = min(self._capacity(kind), self._tokens[kind] + (t - self._filled[kind])
                         * rate)
            self._filled[kind] = t
            self._tokens[kind] = tokens - 1  # may go negative: a queue of reservations
            return 0.0 if tokens >= 1 else (1 - tokens) / rate

    def _pause_for(self, kind: str) -> tuple[dt.datetime, str] | None:
        now = self._now()
        found = None
        for key in ("*", kind):
            entry = self._paused.get(key)
            if entry is not None and entry[0] > now and (found is None or entry[0] > found[0]):
                found = entry
        return found

    def pause(self, kind: str | None, until: dt.datetime, reason: str) -> None:
        """Pause `kind` (None: every request) until `until`, for the rest of the run."""
        key = "*" if kind is None else kind
        with self._lock:
            old = self._paused.get(key)
            if old is None or until > old[0]:
                self._paused[key] = (until, reason)

    def pause_left(self, kind: str) -> float:
        """Seconds the CA's pause for `kind` has left (0: none)."""
        with self._lock:
            pause = self._pause_for(kind)
        return 0.0 if pause is None else (pause[0] - self._now()).total_seconds()
