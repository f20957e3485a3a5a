"""The acme-dns provider, and registering accounts with an acme-dns server.

acme-dns (https://github.com/joohoi/acme-dns) is a small DNS server with an HTTP API made for
dns-01. An account owns one name, its `fulldomain` (`<subdomain>.<the server's zone>`), and may
set the TXT values there; the domain's owner makes `_acme-challenge.<domain>` a CNAME to it once.
The certificate host then holds a password that can change one TXT record, nothing else.

The server keeps the last 2 TXT values of an account; an update replaces the older one, and
there is no delete. So a name and its wildcard (two values at one name) work in one
certificate; a third value for the same account in one certificate would push out the first and
is refused here. Removing is a no-op: a value left behind is worthless once its authorization is
done, and the next updates replace it.

The accounts file is the JSON that acme-dns clients share (lego, certbot's acme-dns hook, ...):
`{"example.com": {"username": ..., "password": ..., "subdomain": ..., "fulldomain": ...,
"allowfrom": [...]}}`, keyed by the domain without `*.`. `register` adds to it (0600, atomic).
No message contains a password.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ChallengeError, DeadlineExceeded, UsageError, os_error_message
from .provider import NotApplied, TxtRecord

if TYPE_CHECKING:
    from ..config import AcmeDnsSettings, Settings

log = logging.getLogger("certbatch.dns")

UPDATE_TIMEOUT = 10.0  # seconds per update (less when the deadline is closer)
REGISTER_TIMEOUT = 30.0  # seconds per registration
KEPT_VALUES = 2  # acme-dns keeps this many TXT values per account
_FIELDS = ("username", "password", "subdomain", "fulldomain")
_DOMAIN_RE = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)+"
                        r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


class AcmeDnsError(ChallengeError):
    """The acme-dns server could not be reached, or refused a request."""


@dataclass(frozen=True)
class Account:
    domain: str  # the key in the accounts file: the domain without `*.`
    username: str
    password: str
    subdomain: str
    fulldomain: str  # without the trailing dot, as acme-dns writes it

    def __repr__(self) -> str:  # never the password
        return f"Account({self.domain!r}, fulldomain={self.fulldomain!r})"


@dataclass(frozen=True)
class Registration:
    """One domain of `register`: its account's name, and whether it was registered now."""

    domain: str
    fulldomain: str
    new: bool

    @property
    def cname(self) -> str:
        """The record the domain's owner must create, in zone-file form."""
        return f"_acme-challenge.{self.domain}. CNAME {self.fulldomain}."


def read_accounts(path: Path, error: type[Exception] = ChallengeError) -> dict[str, Any]:
    """The accounts file as a mapping (domain -> entry); a missing file is empty. Entries are
    checked by `accounts()`, so an entry `register` does not use stays as it is."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise error(f"accounts_file {os_error_message(exc, path)}") from exc
    except UnicodeDecodeError:
        raise error(f"accounts_file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        raise error(f"accounts_file {path} is not JSON") from None
    if not isinstance(data, dict):
        raise error(f"accounts_file {path} must hold a JSON object: domain -> account") from None
    return data


def accounts(path: Path) -> tuple[dict[str, Account], dict[str, str]]:
    """The usable accounts in `path` by domain, and what is wrong with each malformed entry (by
    its domain, and by its fulldomain when it has one); ChallengeError when the file itself
    cannot be used. The file is shared: a malformed entry fails only a certificate that uses
    it. No message quotes a value."""
    try:
        path.stat()
    except FileNotFoundError:
        raise ChallengeError(f"accounts_file {path}: no such file (certbatch acme-dns register "
                             f"DOMAIN... creates it)") from None
    except OSError as exc:
        raise ChallengeError(f"accounts_file {os_error_message(exc, path)}") from None
    out: dict[str, Account] = {}
    broken: dict[str, str] = {}
    for domain, entry in read_accounts(path).items():
        name = domain.lower().removeprefix("*.").rstrip(".")
        missing = [f for f in _FIELDS if not isinstance(entry, dict)
                   or not isinstance(entry.get(f), str) or not entry[f]]
        if missing:
            problem = (f"accounts_file {path}: the account of {name} lacks "
                       f"{', '.join(missing)}")
            broken[name] = problem
            if isinstance(entry, dict) and isinstance(entry.get("fulldomain"), str):
                broken.setdefault(entry["fulldomain"].lower().rstrip("."), problem)
            continue
        out[name] = Account(name, entry["username"], entry["password"], entry["subdomain"],
                            entry["fulldomain"].lower().rstrip("."))
    return out, broken


class AcmeDnsProvider:
    """Updates to the acme-dns server at `api` with the accounts of `accounts_file`."""

    keeps_values = True  # no delete: remove() does nothing (the solver says so in its log)

    def __init__(self, api: str, accounts_file: Path) -> None:
        self.api = api
        self.accounts_file = accounts_file
        self._accounts, self._broken = accounts(accounts_file)
        self._by_fulldomain = {a.fulldomain: a for a in self._accounts.values()}
        self._values: dict[str, list[str]] = {}  # fulldomain -> values set by this certificate

    def add(self, record: TxtRecord, deadline: float) -> None:
        account = self._account(record)
        values = self._values.setdefault(account.fulldomain, [])
        if record.value in values:
            return
        if len(values) >= KEPT_VALUES:
            raise NotApplied(f"acme-dns account {account.fulldomain} would need a third TXT "
                             f"value in this certificate and the server keeps only the last "
                             f"{KEPT_VALUES}: give each name its own account (certbatch "
                             f"acme-dns register)")
        self._update(account, record.value, deadline)
        values.append(record.value)

    def remove(self, record: TxtRecord, deadline: float) -> None:
        log.debug("acme-dns has no delete: the value at %s stays until replaced", record.name)

    def _account(self, record: TxtRecord) -> Account:
        name = record.name.lower().rstrip(".")
        if name in self._by_fulldomain:
            return self._by_fulldomain[name]
        domain = name.removeprefix("_acme-challenge.")
        for key in (name, domain):  # the entry this record would use is malformed
            if key in self._broken and key not in self._accounts:
                raise NotApplied(self._broken[key])
        if domain in self._accounts and domain != name:
            full = self._accounts[domain].fulldomain
            raise NotApplied(f"{record.name} is not a CNAME to the acme-dns account's name "
                             f"{full}.: create the record _acme-challenge.{domain}. CNAME "
                             f"{full}.")
        raise NotApplied(f"no acme-dns account in {self.accounts_file} for {record.name} (nor "
                         f"one whose fulldomain it is): certbatch acme-dns register DOMAIN")

    def _update(self, account: Account, value: str, deadline: float) -> None:
        import requests

        where = f"acme-dns update of {account.fulldomain} at {_public(self.api)}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline exceeded before {where}")
        try:
            response = requests.post(
                f"{self.api}/update", json={"subdomain": account.subdomain, "txt": value},
                headers={"X-Api-User": account.username, "X-Api-Key": account.password},
                timeout=min(UPDATE_TIMEOUT, remaining),
                allow_redirects=False)  # a redirect would take X-Api-Key to another host
        except requests.Timeout as exc:
            if remaining < UPDATE_TIMEOUT:
                raise DeadlineExceeded(f"deadline exceeded during {where}") from exc
            raise ChallengeError(f"{where}: no answer after {UPDATE_TIMEOUT:g} s") from None
        except requests.RequestException as exc:
            raise NotApplied(f"{where}: {_connect_problem(exc)}") from None
        if response.status_code == 200:
            log.debug("%s: done", where)
            return
        if 300 <= response.status_code < 400:
            raise NotApplied(f"{where}: {_redirected(response, self.api)}")
        if response.status_code in (401, 403):
            raise NotApplied(f"{where}: HTTP {response.status_code}: the server refused the "
                             f"account's username or password (accounts_file "
                             f"{self.accounts_file}, {account.domain})")
        problem = _error_field(response)
        raise NotApplied(f"{where}: HTTP {response.status_code}{problem}")


# -- registering -----------------------------------------------------------------------------------

def register(api: str, domains: Sequence[str], accounts_file: Path,
             allow_from: Sequence[str] = ()) -> Iterator[Registration]:
    """Register an account for each domain that has none in `accounts_file`, saving each
    one as soon as the server has made it; yield every domain's account (new or kept).

    UsageError for bad input (exit 2), AcmeDnsError when the server fails (exit 1).
    """
    api = api.strip().rstrip("/")
    problem = api_problem(api)
    if problem:
        raise UsageError(f"--api: {problem}")
    names = []
    for domain in domains:
        name = domain.strip().lower().rstrip(".").removeprefix("*.")
        if not (name.isascii() and len(name) <= 253 and _DOMAIN_RE.fullmatch(name)):
            raise UsageError(f"not a domain name: {domain!r}")
        names.append(name)
    existing = read_accounts(accounts_file, UsageError)  # a file we cannot use: before any call
    for name in dict.fromkeys(names):
        entry = existing.get(name)
        if isinstance(entry, dict) and isinstance(entry.get("fulldomain"), str):
            yield Registration(name, entry["fulldomain"].rstrip("."), new=False)
            continue
        account = _register_one(api, allow_from)
        existing = read_accounts(accounts_file, UsageError)  # another writer may have added
        existing[name] = account
        _save(accounts_file, existing)
        log.info("acme-dns: registered %s as %s at %s", name, account["fulldomain"],
                 _public(api))
        yield Registration(name, account["fulldomain"].rstrip("."), new=True)


def api_problem(api: str) -> str | None:
    """What is wrong with an acme-dns URL (None: fine), by the config loader's rule."""
    from ..config import acme_dns_api_problem

    return acme_dns_api_problem(api)


def _register_one(api: str, allow_from: Sequence[str]) -> dict[str, Any]:
    import requests

    where = f"acme-dns register at {_public(api)}"
    try:
        response = requests.post(f"{api}/register",
                                 json={"allowfrom": list(allow_from)} if allow_from else None,
                                 timeout=REGISTER_TIMEOUT, allow_redirects=False)
    except requests.Timeout:
        raise AcmeDnsError(f"{where}: no answer after {REGISTER_TIMEOUT:g} s") from None
    except requests.RequestException as exc:
        raise AcmeDnsError(f"{where}: {_connect_problem(exc)}") from None
    if 300 <= response.status_code < 400:
        raise AcmeDnsError(f"{where}: {_redirected(response, api)}")
    if response.status_code not in (200, 201):
        raise AcmeDnsError(f"{where}: HTTP {response.status_code}{_error_field(response)}")
    try:
        account = response.json()
    except ValueError:
        account = None
    if not (isinstance(account, dict) and all(
            isinstance(account.get(f), str) and account[f] for f in _FIELDS)):
        raise AcmeDnsError(f"{where}: the answer is not an acme-dns account (username, "
                           f"password, subdomain, fulldomain)")
    return {f: account[f] for f in (*_FIELDS, "allowfrom") if f in account}


def _save(path: Path, data: dict[str, Any]) -> None:
    from ..fsutil import atomic_write

    if not path.parent.is_dir():
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o600)


def _public(api: str) -> str:
    """The URL without user:password@ (never in a message). The config refuses an `api` that
    holds one; this keeps a message safe whatever it is handed."""
    from ..config import _without_userinfo

    return _without_userinfo(api)


def _redirected(response: Any, api: str) -> str:
    """A 3xx answer, for its message: the host it names (never a path, query or user:password:
    the API's own URL may hold one), and that it was not followed."""
    from urllib.parse import urljoin, urlsplit

    location = response.headers.get("Location")
    if not location:
        return f"HTTP {response.status_code}: a redirect without a location; not followed"
    try:
        host = urlsplit(urljoin(api + "/", location)).hostname
    except ValueError:
        host = None
    if not (host and re.fullmatch(r"[\w.:-]{1,253}", host)):
        host = "an unusable location"
    return f"HTTP {response.status_code}: redirected to {host}; not followed"


def _connect_problem(exc: BaseException) -> str:
    found = _ERRNO_RE.search(str(exc))
    return f"cannot connect{': ' + found.group(1).strip() if found else ''}"


def _error_field(response: Any) -> str:
    """acme-dns answers errors as {"error": "bad_txt"}: that word, or nothing."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    return f": {error}" if isinstance(error, str) and re.fullmatch(r"[\w -]{1,60}", error) else ""


def configured(settings: Settings, domains: Sequence[str]) -> AcmeDnsSettings:
    """The acme-dns server and accounts file of the certificates that have `domains` (for
    `register` without --api / --accounts-file); UsageError unless exactly one fits."""
    found: dict[AcmeDnsSettings, None] = {}
    for domain in domains:
        name = domain.strip().lower().rstrip(".").removeprefix("*.")
        here = [c.challenge.acme_dns for c in settings.certificates.values()
                if c.challenge.acme_dns is not None
                and name in (d.removeprefix("*.") for d in c.domains)]
        if not here:
            raise UsageError(f"{domain} is in no certificate with provider: acme-dns in "
                             f"{settings.path}: give --api and --accounts-file")
        found.update(dict.fromkeys(s for s in here if s is not None))
    if len(found) > 1:
        raise UsageError("these domains' certificates use different acme-dns servers or "
                         "accounts files: register them one by one, or give --api and "
                         "--accounts-file")
    return next(iter(found))
