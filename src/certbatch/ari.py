"""ACME Renewal Information (RFC 9773): when the CA wants a certificate renewed.

The CA's directory names a `renewalInfo` URL; GET <renewalInfo>/<certificate identifier>
answers a `suggestedWindow` (start, end), maybe an `explanationURL`, and a Retry-After saying
when to ask again. certbatch keeps what it learnt per certificate in its status (`AriState`), so
a run asks only for certificates whose next check has come: a run with nothing due and fresh
data makes no request at all.

The renewal time is chosen uniformly at random inside the window, once per distinct window
(RFC 9773 section 4.2), and kept: a moved window (the CA announcing a mass revocation, say)
replaces the choice. Fetching uses plain HTTPS GETs (no account, no signature), so a run that
only refreshes renewal info never loads the ACME stack.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("certbatch.ari")

# Retry-After is clamped to this range (RFC 9773 section 4.3 lets a client do so); without one,
# or after a failed request, the next check is DEFAULT_CHECK later.
MIN_CHECK = dt.timedelta(minutes=1)
MAX_CHECK = dt.timedelta(days=1)
DEFAULT_CHECK = dt.timedelta(hours=6)


def cert_id(cert_pem: bytes) -> str:
    """The ARI certificate identifier: base64url(AKI keyIdentifier) "." base64url(serial's
    DER content octets), both unpadded (RFC 9773 section 4.1). ValueError if the certificate
    has no usable Authority Key Identifier."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise ValueError("the certificate has no Authority Key Identifier") from None
    if not aki.key_identifier:
        raise ValueError("the certificate's Authority Key Identifier has no key identifier")
    serial = cert.serial_number
    # DER INTEGER content: big-endian two's complement, a leading zero byte when the top bit
    # is set (serials are positive).
    serial_bytes = serial.to_bytes(serial.bit_length() // 8 + 1, "big")
    return f"{_b64(aki.key_identifier)}.{_b64(serial_bytes)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class AriState:
    """What the CA last said about renewing one certificate (stored in its status.json)."""

    serial: str  # the certificate this is about; a new certificate starts afresh
    next_check: dt.datetime  # do not ask again before this
    window_start: dt.datetime | None = None  # None: no window known (no ARI, or not answered)
    window_end: dt.datetime | None = None
    renew_at: dt.datetime | None = None  # chosen uniformly inside the window
    explanation: str | None = None  # the CA's explanationURL
    checked_at: dt.datetime | None = None  # the last successful answer
    error: str | None = None  # why the last request failed (None: it did not)
    unsupported: bool = False  # the CA's directory has no renewalInfo

    _TIMES = ("next_check", "window_start", "window_end", "renew_at", "checked_at")

    def to_dict(self) -> dict[str, Any]:
        from .store import iso

        data: dict[str, Any] = {}
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            data[key] = iso(value) if isinstance(value, dt.datetime) else value
        return data

    @classmethod
    def from_dict(cls, data: Any) -> AriState:
        """Raises ValueError or TypeError for anything but what to_dict wrote."""
        if not isinstance(data, dict) or not isinstance(data.get("serial"), str):
            raise ValueError("ari is not an object with a serial")
        values: dict[str, Any] = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in cls._TIMES:  # every status.json of every run: no import, no strptime
            if values.get(key) is not None:
                values[key] = dt.datetime.fromisoformat(values[key].replace("Z", "+00:00"))
        if values.get("next_check") is None:
            raise ValueError("ari has no next_check")
        return cls(**values)

    @property
    def window(self) -> tuple[dt.datetime, dt.datetime] | None:
        if self.window_start is None or self.window_end is None:
            return None
        return self.window_start, self.window_end


def usable(state: AriState | None, serial: str) -> AriState | None:
    """`state` if it is about certificate `serial` and holds a chosen renewal time."""
    if state is None or state.serial != serial or state.renew_at is None:
        return None
    return state


def needs_check(state: AriState | None, serial: str, now: dt.datetime) -> bool:
    return state is None or state.serial != serial or state.next_check <= now


def next_check(retry_after: str | None, now: dt.datetime) -> dt.datetime:
    """When to ask again: the CA's Retry-After clamped to [MIN_CHECK, MAX_CHECK], else
    DEFAULT_CHECK."""
    from .retry_after import parse_retry_after

    when = parse_retry_after(retry_after, now)
    if when is None:
        return now + DEFAULT_CHECK
    return min(max(when, now + MIN_CHECK), now + MAX_CHECK)


# RFC 3339 date-time; the fraction is dropped (times are kept to the second, so that the same
# window read again compares equal), and Python 3.10's fromisoformat takes no "Z" nor any
# fraction but 3 or 6 digits.
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(?:\.\d+)?(Z|z|[+-]\d\d:\d\d)")
# An explanation is shown on terminals and in logs: a plain, printable URL only.
_EXPLANATION = re.compile(r"https?://[\x21-\x7e]{1,500}")


def _time(text: Any) -> dt.datetime:
    m = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not an RFC 3339 time with a time zone: {str(text)[:40]!r}")
    zone = "+00:00" if m[3] in "Zz" else m[3]
    return dt.datetime.fromisoformat(f"{m[1]}T{m[2]}{zone}").astimezone(dt.timezone.utc)


def parse_window(body: Any) -> tuple[dt.datetime, dt.datetime, str | None]:
    """(start, end, explanationURL) of a renewalInfo answer, times to the second; ValueError
    if malformed. An explanation that is not a plain printable http(s) URL is dropped."""
    try:
        window = body["suggestedWindow"]
        start, end = _time(window["start"]), _time(window["end"])
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise ValueError(f"no usable suggestedWindow ({type(exc).__name__}: {exc})") from None
    if end < start:
        raise ValueError("suggestedWindow ends before it starts")
    explanation = body.get("explanationURL")
    if not isinstance(explanation, str) or not _EXPLANATION.fullmatch(explanation):
        explanation = None
    return start, end, explanation


def answered(old: AriState | None, serial: str, start: dt.datetime, end: dt.datetime,
             explanation: str | None, retry_after: str | None, now: dt.datetime,
             rng: random.Random | None = None) -> AriState:
    """The state after the CA answered a window: the earlier choice is kept while the window is
    the same, else a new time is drawn from it."""
    same = old is not None and old.serial == serial and old.window == (start, end) \
        and old.renew_at is not None
    if same:
        assert old is not None
        renew_at = old.renew_at
    else:
        # to the second, as status.json keeps it
        renew_at = (start + (end - start) * (rng or random).random()).replace(microsecond=0)
        if old is not None and old.serial == serial and old.window is not None:
            log.info("%s: the CA moved the renewal window to %s .. %s", serial, _t(start),
                     _t(end))
    return AriState(serial=serial, next_check=next_check(retry_after, now), window_start=start,
                    window_end=end, renew_at=renew_at, explanation=explanation, checked_at=now)


def failed(old: AriState | None, serial: str, error: str, now: dt.datetime,
           retry_at: dt.datetime | None = None) -> AriState:
    """The state after a failed request: a window already known for this certificate stays
    (the CA said it), the next check is DEFAULT_CHECK later, or `retry_at` (the CA's own
    Retry-After, clamped)."""
    keep = old if old is not None and old.serial == serial else AriState(serial, now)
    return replace(keep, next_check=retry_at or now + DEFAULT_CHECK, error=error,
                   unsupported=False)


def unsupported(serial: str, now: dt.datetime) -> AriState:
    return AriState(serial=serial, next_check=now + DEFAULT_CHECK, unsupported=True)


def _t(t: dt.datetime) -> str:
    """2026-12-01 03:00Z (isoformat: strftime costs more, and runs for every certificate)."""
    return t.astimezone(dt.timezone.utc).isoformat(" ", "minutes")[:16] + "Z"


def describe(state: AriState, now: dt.datetime) -> str:
    """One line for a decision or status: "ARI window opened 2026-12-01 03:00Z" etc."""
    if state.renew_at is None or state.window_start is None:
        return "no ARI window"
    if state.renew_at <= now:
        return f"ARI window opened {_t(state.window_start)}"
    return f"ARI renewal at {_t(state.renew_at)} (window {_t(state.window_start)} .. " \
           f"{_t(state.window_end or state.window_start)})"


# -- fetching ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    """One certificate to ask about."""

    name: str
    serial: str
    cert_id: str
    old: AriState | None


class Fetcher:
    """GETs renewal info over HTTPS, several at once, each bounded by `timeout`, the whole
    batch by `deadline` (a time.monotonic() value): what has not answered by then counts as
    failed and is asked again at the next check."""

    def __init__(self, directory_url: str, verify: Any, timeout: float, workers: int,
                 deadline: float, stop: Callable[[], bool] = lambda: False) -> None:
        self.directory_url = directory_url
        self.verify = verify
        self.timeout = timeout
        self.workers = max(1, workers)
        self.deadline = deadline
        self.stop = stop
        self._local = threading.local()
        self._lock = threading.Lock()
        # (until, why) once the CA answered 429 or 503 with a Retry-After: no more requests
        # in this run; the runner passes it on to the ACME client's pacer.
        self.paused: tuple[dt.datetime, str] | None = None

    def _pause(self, response: Any, url: str, now: dt.datetime) -> None:
        from .retry_after import parse_retry_after

        when = parse_retry_after(response.headers.get("Retry-After"), now)
        if when is None:
            return
        until = min(max(when, now + MIN_CHECK), now + MAX_CHECK)
        with self._lock:
            if self.paused is None or until > self.paused[0]:
                self.paused = (until, f"the CA asked to wait (HTTP {response.status_code} from "
                                      f"{url})")

    def _get(self, url: str) -> Any:
        from . import httpenv  # requests: only a run that has renewal info to refresh

        if not hasattr(self._local, "session"):
            self._local.session = httpenv.session(self.directory_url)
            self._local.session.headers["User-Agent"] = "certbatch (ari)"
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the run's deadline for renewal info passed")
        return self._local.session.get(url, timeout=min(self.timeout, remaining),
                                       verify=self.verify)

    def renewal_info_url(self) -> str | None:
        """The directory's renewalInfo URL (None: the CA offers no ARI). Raises on failure."""
        response = self._get(self.directory_url)
        response.raise_for_status()
        url = response.json().get("renewalInfo")
        return url if isinstance(url, str) and url else None

    def fetch_all(self, queries: Sequence[Query], now: dt.datetime,
                  rng: random.Random | None = None) -> dict[str, AriState]:
        """name -> new state for every query (failures included, see `failed`)."""
        try:
            base = self.renewal_info_url()
        except Exception as exc:  # noqa: BLE001 - ARI is advice: any failure means fallback
            why = f"cannot read the ACME directory: {_describe(exc)}"
            log.info("ARI: %s", why)
            return {q.name: failed(q.old, q.serial, why, now) for q in queries}
        if base is None:
            return {q.name: unsupported(q.serial, now) for q in queries}
        results: dict[str, AriState] = {}
        pool = ThreadPoolExecutor(max_workers=min(self.workers, len(queries)) or 1,
                                  thread_name_prefix="certbatch-ari")
        try:
            futures = {pool.submit(self._one, base.rstrip("/"), q, now, rng): q
                       for q in queries}
            wait(futures, timeout=max(self.deadline - time.monotonic(), 0))
            for future, q in futures.items():
                if future.done() and future.exception() is None:
                    results[q.name] = future.result()
                else:
                    results[q.name] = failed(q.old, q.serial, "no answer before the deadline",
                                             now)
        finally:
            # Requests still running end within their timeout; nobody waits for them.
            pool.shutdown(wait=False, cancel_futures=True)
        return results

    def _one(self, base: str, q: Query, now: dt.datetime, rng: random.Random | None
             ) -> AriState:
        if self.stop():
            return failed(q.old, q.serial, "interrupted", now)
        with self._lock:
            paused = self.paused
        if paused is not None:  # the CA said to wait: nothing more is sent in this run
            return failed(q.old, q.serial, paused[1], now, retry_at=paused[0])
        url = f"{base}/{q.cert_id}"
        try:
            response = self._get(url)
            if response.status_code in (429, 503):
                self._pause(response, url, now)
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            start, end, explanation = parse_window(response.json())
            state = answered(q.old, q.serial, start, end, explanation,
                             response.headers.get("Retry-After"), now, rng)
        except Exception as exc:  # noqa: BLE001 - see fetch_all
            why = f"{url}: {_describe(exc)}"
            log.info("%s: ARI: %s", q.name, why)
            with self._lock:
                until = self.paused[0] if self.paused else None
            return failed(q.old, q.serial, why, now, retry_at=until)
        if explanation and (q.old is None or q.old.explanation != explanation):
            log.warning("%s: the CA explains its renewal window: %s", q.name, explanation)
        return state


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    name = type(exc).__name__
    if "timed out" in text.lower() or "timeout" in name.lower():
        return "timed out"
    if "Connection refused" in text:
        return "connection refused"
    return f"{name}: {text[:200]}" if text else name
