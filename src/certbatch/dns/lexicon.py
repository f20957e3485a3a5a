"""The lexicon provider: a DNS provider's API through dns-lexicon (`certbatch[lexicon]`).

lexicon is optional. It is imported when a certificate uses it, never by the rest of certbatch;
without it such a certificate fails with one line saying how to install it, and `check` lists it.

Adding is lexicon's `create_record` with the value as content, removing is `delete_record` with
that content, so the other values at the name (the wildcard's, another certificate's) stay. The
zone lexicon is told is the one certbatch found (SOA lookup, or `zone`), not lexicon's guess
from the public suffix list. Some providers (PowerDNS among them) read the record set and write
it back whole: the changes to one zone are made one at a time within a run.

lexicon's providers call their APIs without timeouts: each change runs in a worker thread that
is waited for at most OP_TIMEOUT (and never past the deadline). A change that did not return in
time may still happen: the solver removes its value like any other.

Secrets: no message contains a credential. lexicon's errors are reduced to what went wrong (an
HTTP status, a connection refused) and scrubbed of every credential value, and lexicon's own log
lines are dropped (some providers log their requests, tokens included).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ChallengeError, DeadlineExceeded, os_error_message
from .provider import NotApplied, TxtRecord

log = logging.getLogger("certbatch.dns")

INSTALL = "pip install 'certbatch[lexicon]'"
OP_TIMEOUT = 30.0  # seconds per change (lexicon may make several API requests for one)
TTL = 60  # seconds, as for rfc2136
_OPTION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_QUERY_RE = re.compile(r"(https?://[^\s?'\"]*)\?[^\s'\"]*")

_zone_locks: dict[tuple[str, str], threading.Lock] = {}
_zone_locks_guard = threading.Lock()
_logging_quieted = False


def unavailable(provider: str) -> str | None:
    """Why lexicon cannot serve `provider` here (None: it can): not installed, no such
    provider, or the provider's own packages missing."""
    try:
        import lexicon.client  # noqa: F401 - the import is the check
    except ImportError:
        return f"provider lexicon needs dns-lexicon, which is not installed: {INSTALL}"
    try:
        # lexicon 3's list of its providers; Client checks the name too, when it is used.
        from lexicon._private.discovery import find_providers
    except ImportError:  # pragma: no cover - a later lexicon: the name is checked when used
        return None
    providers = find_providers()
    if provider not in providers:
        import difflib

        close = difflib.get_close_matches(provider, providers, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"lexicon has no provider {provider!r}{hint} (lexicon_provider)"
    if not providers[provider]:
        return (f"lexicon provider {provider} needs more packages: "
                f"pip install 'dns-lexicon[{provider}]'")
    return None


def read_credentials(path: Path) -> dict[str, str]:
    """The provider's options in `path`: a YAML (or JSON) mapping of option names to values.
    No message quotes the content: it is mostly secrets."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ChallengeError(f"credentials_file {os_error_message(exc, path)}") from exc
    except UnicodeDecodeError as exc:
        raise ChallengeError(f"credentials_file {path} is not UTF-8 text") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ChallengeError(f"credentials_file {path} is not valid YAML or JSON{where}") from None
    if not isinstance(data, dict) or not data:
        raise ChallengeError(f"credentials_file {path} must hold a mapping of the provider's "
                             f"options (auth_token: ...)")
    out = {}
    for name, value in data.items():
        if not isinstance(name, str) or not _OPTION_RE.fullmatch(name):
            raise ChallengeError(f"credentials_file {path}: an option name is not a simple "
                                 f"name (letters, digits, _ . -)")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ChallengeError(f"credentials_file {path}: {name}: expected a string")
        out[name.replace("-", "_")] = str(value)
    return out


class LexiconProvider:
    """Changes through lexicon's `provider` with its options `credentials`."""

    def __init__(self, provider: str, credentials: Mapping[str, str]) -> None:
        self.provider = provider
        self._credentials = dict(credentials)
        _quiet_lexicon_logging()

    def add(self, record: TxtRecord, deadline: float) -> None:
        def create(ops: Any) -> None:
            if ops.create_record("TXT", record.name.rstrip("."), record.value) is False:
                raise ChallengeError("the provider reported a failure")

        self._change(create, f"add TXT {record.name}", record, deadline)

    def remove(self, record: TxtRecord, deadline: float) -> None:
        def delete(ops: Any) -> None:
            ops.delete_record(rtype="TXT", name=record.name.rstrip("."), content=record.value)

        self._change(delete, f"remove TXT {record.name}", record, deadline)

    def _change(self, change: Callable[[Any], None], what: str, record: TxtRecord,
                deadline: float) -> None:
        where = f"lexicon {self.provider} {what}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline exceeded before {where}")
        lock = _zone_lock(self.provider, record.zone)
        outcome: dict[str, BaseException | None] = {}

        def work() -> None:
            try:
                with lock, self._client(record.zone) as ops:
                    change(ops)
                outcome["error"] = None
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = exc

        worker = threading.Thread(target=work, name=f"lexicon {what}", daemon=True)
        worker.start()
        worker.join(min(OP_TIMEOUT, remaining))
        if "error" not in outcome:
            # The thread is left to finish on its own: lexicon offers no way to stop it.
            if remaining < OP_TIMEOUT:
                raise DeadlineExceeded(f"deadline exceeded during {where}")
            raise ChallengeError(f"{where}: no answer after {OP_TIMEOUT:g} s")
        exc = outcome["error"]
        if exc is None:
            log.debug("%s: done", where)
            return
        why, applied = self._explain(exc, record)
        raise (ChallengeError if applied else NotApplied)(f"{where}: {why}") from None

    def _client(self, zone: str) -> Any:
        from lexicon.client import Client
        from lexicon.config import ConfigResolver, DictConfigSource

        domain = zone.rstrip(".")
        config = ConfigResolver().with_dict({
            "provider_name": self.provider, "domain": domain, "delegated": domain, "ttl": TTL,
            self.provider: dict(self._credentials)})
        client = Client(config)
        # Client guesses the zone from the public suffix list (wrong for a zone below a
        # registered domain, or a private TLD); the zone certbatch found goes first.
        client.config.add_config_source(DictConfigSource({"domain": domain}), 0)
        return client

    def _explain(self, exc: BaseException, record: TxtRecord) -> tuple[str, bool]:
        """(one line without a secret, whether the change may have happened)."""
        import requests

        if isinstance(exc, ChallengeError):
            return str(exc), True
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            status, reason = exc.response.status_code, exc.response.reason or ""
            text = f"HTTP {status} {reason}".rstrip()
            if status in (401, 403):
                return f"{text}: the provider refused the credentials", False
            if status == 404:
                return f"{text} (does the account have zone {record.zone}?)", False
            return text, status >= 500
        if isinstance(exc, requests.Timeout):
            return "the provider's API did not answer in time", True
        if isinstance(exc, requests.ConnectionError):
            found = _ERRNO_RE.search(str(exc))
            return (f"cannot connect to the provider's API"
                    f"{': ' + found.group(1).strip() if found else ''}"), False
        name = type(exc).__name__
        text = self._scrub(" ".join(str(exc).split()))
        if len(text) > 300:
            text = text[:297] + "..."
        # lexicon's own errors (unknown provider, authentication, a missing option) come
        # before any change.
        from lexicon.exceptions import LexiconError

        return (f"{name}: {text}" if text else name), not isinstance(
            exc, (LexiconError, AttributeError, ValueError))

    def _scrub(self, text: str) -> str:
        for value in sorted(self._credentials.values(), key=len, reverse=True):
            if len(value) >= 4:
                text = text.replace(value, "[redacted]")
        return _QUERY_RE.sub(r"\1?[...]", text)  # query strings often carry an API key


def _zone_lock(provider: str, zone: str) -> threading.Lock:
    with _zone_locks_guard:
        return _zone_locks.setdefault((provider, zone), threading.Lock())


def _quiet_lexicon_logging() -> None:
    """Drop the log lines of lexicon and of the libraries it calls: some providers log their
    requests with the token in them. lexicon also logs through the root logger, and a first
    root-level call without a handler would install one printing to stderr (basicConfig)."""
    global _logging_quieted
    if _logging_quieted:
        return
    _logging_quieted = True
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    for name in ("lexicon", "tldextract", "filelock"):
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.addHandler(logging.NullHandler())
