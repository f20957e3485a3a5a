"""ACME (RFC 8555) issuance: the only module of certbatch that talks to the CA.

One `AcmeClient` is shared by all worker threads: it fetches the directory once and loads or
registers one account per directory URL. acme's `ClientNetwork` is not thread-safe (nonce pool,
`account` attribute, requests.Session), so every `issue()` call gets its own network object
carrying the shared account key and registration.

Robustness, all in the helpers below `issue()`:
  * badNonce: the request is signed again with a fresh nonce (the one in the error reply).
  * connection errors, timeouts and 5xx answers to idempotent requests (directory GET, POST-as-GET
    polls and downloads) are retried a few times with backoff; every request has a timeout.
  * rateLimited / HTTP 429 raise RateLimited at once, with the CA's Retry-After. So does a 503
    with a Retry-After (the CA is unavailable and said until when): on an idempotent request
    after the retries above, or at once when its wait exceeds RETRY_AFTER_WAIT_MAX or the
    deadline; the runner stores the time and asks no earlier. A 503 without one is an error.
  * a finalize with no answer (a network error, a 5xx) is not sent again blindly: the order's
    status says whether the CA took it (still "ready": sent once more).
  * an account the CA no longer knows is registered again (once, by one thread), saved, and the
    request retried.
  * polls start after 0.05 s and back off exponentially up to 5 s, honour Retry-After, and never
    sleep past the deadline.
Errors leave this module as certbatch exceptions only (AcmeError, RateLimited, ChallengeError,
DeadlineExceeded), never as acme, josepy or requests exceptions.

The wire: acme's ClientNetwork signs, and holds nonces and the HTTP session; _Network/_Conn reuse
one session and nonce pool per thread through its non-public `session`, `_nonces` and
`_send_request`. Rather than own that layer, certbatch pins acme 5.x and josepy 2.x (pyproject)
and tests/test_acme_internals.py fails loudly if an upgrade changes those internals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import josepy as jose
import requests
from acme import errors as acme_errors
from acme import messages
from acme.client import ClientNetwork
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from . import httpenv, interrupt, pacer
from .challenges import DNS01, ChallengeResponse, Solver, make_solver
from .config import AcmeSettings, ChallengeSettings
from .errors import AcmeError, CertbatchError, DeadlineExceeded, RateLimited
from .retry_after import parse_retry_after as _parse_retry_after

log = logging.getLogger("certbatch.acme")

USER_AGENT = "certbatch (acme-python)"
ERROR_PREFIX = "urn:ietf:params:acme:error:"
# Each badNonce costs one round trip and the CA tells us to retry. RFC 8555 has no limit; 10
# keeps a CA that rejects half of all nonces (Pebble's PEBBLE_WFE_NONCEREJECT=50) from failing
# one request in 64, as a limit of 5 would.
BAD_NONCE_RETRIES = 10
TRANSIENT_RETRIES = 3  # network errors / 5xx on idempotent requests
TRANSIENT_BACKOFF = 0.5  # seconds before the first such retry, doubled each time
# A 503's Retry-After longer than this is not waited out within the run: RateLimited.
RETRY_AFTER_WAIT_MAX = 60.0
POLL_FIRST = 0.05  # seconds before the first poll: CAs often finish validating within ms
POLL_FACTOR = 1.6
POLL_MAX = 5.0
ACCOUNT_GONE = ("accountDoesNotExist", "unauthorized")


@dataclass(frozen=True)
class IssuedChain:
    cert_pem: bytes  # leaf only
    chain_pem: bytes  # intermediates (may be empty bytes)
    fullchain_pem: bytes  # leaf + intermediates
    account: str = ""  # the URL of the account that ordered it


class AccountStore(Protocol):
    def load_account(self, directory_url: str) -> tuple[bytes, str | None] | None: ...

    def save_account(self, directory_url: str, key_pem: bytes, regr_json: str) -> None: ...


@dataclass(frozen=True)
class _Account:
    """An account key with its registration (uri = the "kid" of every signed request)."""

    key: jose.JWK
    alg: jose.JWASignature
    regr: messages.RegistrationResource

    @property
    def uri(self) -> str:
        return str(self.regr.uri)


# One lock per directory URL for the whole process, so that even two AcmeClient objects for the
# same CA never register two accounts at once (their saves could interleave in the store).
_account_locks: dict[str, threading.Lock] = {}
_account_locks_guard = threading.Lock()


def _account_lock(directory_url: str) -> threading.Lock:
    with _account_locks_guard:
        return _account_locks.setdefault(directory_url, threading.Lock())


class AcmeClient:
    """Issues certificates from one ACME directory; safe to share between threads."""

    def __init__(self, settings: AcmeSettings, accounts: AccountStore) -> None:
        self.settings = settings
        self.accounts = accounts
        self._lock = _account_lock(settings.directory)  # guards _directory and _account
        self._directory: messages.Directory | None = None
        self._account: _Account | None = None
        self._local = threading.local()
        # One pace for every thread's requests to this CA (see pacer.py).
        self.pacer = pacer.Pacer()
        self._kinds: dict[str, str] = {}  # endpoint URL -> pacer class, from the directory

    def _thread_state(self) -> Any:
        """This thread's HTTP session and nonce pool (requests.Session is not thread-safe)."""
        state = self._local
        if not hasattr(state, "session"):
            state.session = httpenv.session(self.settings.directory)
            state.nonces = set()
        return state

    # -- the protocol ----------------------------------------------------------------------------

    def issue(self, name: str, domains: Sequence[str], key_pem: bytes,
              challenge: ChallengeSettings, deadline: float,
              profile: str | None = None, replaces: str | None = None,
              replaces_account: str | None = None) -> IssuedChain:
        """Order, validate and download a certificate for `domains` with the key `key_pem`.

        `deadline` is a time.monotonic() value. `profile`: the ACME profile to order with
        (None: the CA's default); one the directory does not offer fails before any order.
        `replaces`: the ARI identifier of the certificate this one replaces, ordered by the
        account `replaces_account` (None: not recorded); sent only when the CA offers ARI
        and the account is the one in use (RFC 9773 section 5). Challenge responses are always
        cleaned up.
        """
        domains = list(dict.fromkeys(domains))
        with _acme_errors(name):
            # Account: directory and account are shared by every certificate of the run.
            self._connect(name, deadline)
            if profile is not None:
                _check_profile(self._current_directory, profile)
            csr = _make_csr(key_pem, domains)
            with _Conn(self, name, deadline, self._current_account) as conn:
                # New order for all names at once.
                log.info("%s: ordering a certificate for %s%s", name, ", ".join(domains),
                         f" with profile {profile}" if profile else "")
                replaces = self._replaces(name, replaces, replaces_account)
                order_url, order = _new_order_replacing(conn, domains, profile, replaces)

                # Authorizations: choose our challenge type; valid (reused) ones need nothing.
                todo = _pending_challenges(conn, order, challenge.type)
                log.info("%s: %d of %d authorization(s) need a %s challenge", name, len(todo),
                         len(order.authorizations), challenge.type)

                solver = make_solver(challenge, name)
                try:
                    # Challenges: publish ALL responses before answering any (wildcard and
                    # base name share one TXT record name), let DNS settle, then answer.
                    solver.prepare([t.response for t in todo], deadline)
                    if todo and challenge.type == DNS01 and challenge.wait > 0:
                        log.info("%s: waiting %g s for DNS propagation", name, challenge.wait)
                        _sleep(conn, challenge.wait, "waiting for DNS propagation")
                    for t in todo:
                        _answer(conn, t.challenge)
                    _poll_authorizations(conn, [t.authz_url for t in todo])
                    log.info("%s: all authorizations are valid", name)
                except BaseException:
                    solver.cleanup()
                    raise

                # Finalize with our CSR and wait for the CA to issue, then download the chain;
                # meanwhile the responses, needed no more, are removed.
                with _cleaning_up(solver, name):
                    log.info("%s: finalizing the order", name)
                    cert_url = _finalize(conn, order_url, order, csr)
                    chain = _download(conn, cert_url)
                    log.info("%s: certificate issued", name)
                return dataclasses.replace(chain, account=conn.account.uri)

    def _replaces(self, name: str, cert_id: str | None, account: str | None) -> str | None:
        """`cert_id` if the order may name it in `replaces`, else None (see issue())."""
        if cert_id is None:
            return None
        try:
            self._current_directory["renewalInfo"]
        except KeyError:
            return None  # a CA without ARI may refuse the unknown field
        if account is not None and account != self._current_account.uri:
            log.info("%s: not sending replaces: the certificate was ordered by account %s, "
                     "not %s", name, account, self._current_account.uri)
            return None
        return cert_id

    def revoke(self, cert_pem: bytes, reason: int, key_pem: bytes | None = None,
               name: str = "acme", deadline: float | None = None) -> None:
        """Revoke a certificate (RFC 8555 section 7.6) with the CRL reason code `reason`.

        Signed with the account (kid), or with `key_pem`, the certificate's own private key (a
        jwk header: proof of holding the key, what keyCompromise calls for). The account must
        be stored already: a new one could not revoke what another ordered. Not retried after
        a network error (the request may have been processed). AcmeError carries the CA's
        problem type, e.g. ``...:alreadyRevoked``.
        """
        deadline = time.monotonic() + 120 if deadline is None else deadline
        with _acme_errors(name):
            try:
                cert = x509.load_pem_x509_certificate(cert_pem)
            except ValueError as exc:
                raise AcmeError(f"the certificate to revoke does not parse: {exc}") from None
            if key_pem is None:
                if self.accounts.load_account(self.settings.directory) is None:
                    raise AcmeError(f"no ACME account for {self.settings.directory} in the "
                                    f"state folder: nothing to sign the revocation with")
                self._connect(name, deadline)
                account, key = self._current_account, None
            else:
                self._get_directory(name, deadline)
                account, key = None, _jwk_from_pem(key_pem, "the certificate's private key")
            try:
                url = self._current_directory["revokeCert"]
            except KeyError:
                raise AcmeError(f"the CA's directory {self.settings.directory} offers no "
                                f"revokeCert") from None
            log.info("%s: revoking serial %x (reason %d), signed with %s", name,
                     cert.serial_number, reason,
                     f"account {account.uri}" if account else "the certificate's key")
            with _Conn(self, name, deadline, account, key=key) as conn:
                conn.request("POST", url, messages.Revocation(certificate=cert, reason=reason))
            log.info("%s: revoked", name)

    # -- directory and account -------------------------------------------------------------------

    def connect(self) -> None:
        """Fetch the directory and load or register the account, once (thread-safe)."""
        with _acme_errors("acme"):
            self._connect("acme", math.inf)

    def directory_info(self) -> str:
        """Fetch the directory (no account needed) and describe it in one line."""
        with _acme_errors("acme"):
            # bounded, so `check --online` against a dead CA answers within seconds
            directory = self._get_directory("acme", time.monotonic() + 15)
        meta = directory.meta
        parts = [self.settings.directory]
        if meta.terms_of_service:
            parts.append(f"terms of service {meta.terms_of_service}")
        if meta.external_account_required:
            parts.append("external account binding required")
        return ", ".join(parts)

    def profiles(self) -> dict[str, str]:
        """The profiles the CA's directory offers (name -> description; {} for none). Fetches
        the directory (within 15 s) unless it is known already."""
        with _acme_errors("acme"):
            return _offered_profiles(self._get_directory("acme", time.monotonic() + 15))

    def profile_problem(self, profile: str) -> str | None:
        """Why the CA would refuse to order with `profile` (None: it offers it)."""
        try:
            with _acme_errors("acme"):
                _check_profile(self._get_directory("acme", time.monotonic() + 15), profile)
        except _UnknownProfile as exc:
            return str(exc)
        return None

    def _connect(self, name: str, deadline: float) -> None:
        with self._lock:
            if self._account is not None:
                return
            self._directory = self._get_directory(name, deadline)
            stored = self.accounts.load_account(self.settings.directory)
            account = _stored_account(name, stored) if stored else None
            if account is None:
                key_pem = stored[0] if stored else None
                account = self._register(name, deadline, key_pem)
            else:
                log.info("%s: using account %s", name, account.uri)
            self._account = account

    def _get_directory(self, name: str, deadline: float) -> messages.Directory:
        if self._directory is not None:
            return self._directory
        log.info("%s: fetching ACME directory %s", name, self.settings.directory)
        with _Conn(self, name, deadline, account=None) as conn:
            response = conn.request("GET", self.settings.directory, idempotent=True)
            try:
                directory = messages.Directory.from_json(response.json())
                for resource in ("newNonce", "newAccount", "newOrder"):
                    directory[resource]
            except (ValueError, KeyError, jose.DeserializationError) as exc:
                raise AcmeError(f"{self.settings.directory} is not an ACME directory: "
                                f"{exc}") from exc
        self._directory = directory
        self._kinds = {directory["newNonce"]: pacer.NEW_NONCE,
                       directory["newAccount"]: pacer.NEW_ACCOUNT,
                       directory["newOrder"]: pacer.NEW_ORDER}
        return directory

    @property
    def offers_ari(self) -> bool:
        """Whether the CA's directory (fetched already) has renewalInfo (RFC 9773)."""
        return self._directory is not None and "renewalInfo" in self._directory.to_partial_json()

    def endpoint_kind(self, url: str) -> str:
        """The pacer's class of a request to `url`."""
        return self._kinds.get(url, pacer.OTHER)

    def _register(self, name: str, deadline: float, key_pem: bytes | None = None
                  ) -> _Account:
        """Create an account (with `key_pem`, else a new P-256 key) and save it."""
        if key_pem is None:
            private = ec.generate_private_key(ec.SECP256R1())
            key_pem = private.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        key, alg = _jwk_from_pem(key_pem)
        directory = self._directory
        assert directory is not None
        eab = None
        if self.settings.eab is not None:
            try:
                eab = messages.ExternalAccountBinding.from_data(
                    account_public_key=key.public_key(), kid=self.settings.eab.kid,
                    hmac_key=self.settings.eab.hmac_key, directory=directory)
            except (ValueError, TypeError, jose.Error) as exc:
                raise AcmeError(f"unusable external account binding for kid "
                                f"{self.settings.eab.kid}: {type(exc).__name__}") from None
        body = messages.NewRegistration.from_data(
            email=self.settings.email, terms_of_service_agreed=True,
            external_account_binding=eab)
        log.info("%s: registering a new ACME account%s", name,
                 f" for {self.settings.email}" if self.settings.email else "")
        with _Conn(self, name, deadline, account=None, key=(key, alg)) as conn:
            response = conn.request("POST", directory["newAccount"], body)
        location = response.headers.get("Location")
        if not location:
            raise AcmeError("the CA created an account but sent no Location for it")
        jobj = response.json()
        # Some CAs echo the binding; it is a one-time proof, not part of the account to keep.
        jobj.pop("externalAccountBinding", None)
        regr = messages.RegistrationResource(
            body=messages.Registration.from_json(jobj), uri=location,
            terms_of_service=directory.meta.terms_of_service)
        self.accounts.save_account(self.settings.directory, key_pem, regr.json_dumps())
        log.info("%s: registered account %s", name, location)
        return _Account(key, alg, regr)

    def _replace_account(self, stale: _Account, name: str, deadline: float) -> _Account:
        """A new account for one the CA forgot; only the first thread to ask registers it."""
        with self._lock:
            if self._account is not None and self._account is not stale:
                return self._account  # another thread already registered a new one
            stored = self.accounts.load_account(self.settings.directory)
            fresh = _stored_account(name, stored) if stored else None
            if fresh is not None and fresh.uri != stale.uri:
                self._account = fresh  # another AcmeClient of this process did it
                return fresh
            log.warning("%s: the CA no longer knows account %s; registering a new one", name,
                        stale.uri)
            self._account = self._register(name, deadline)
            return self._account

    @property
    def _current_account(self) -> _Account:
        assert self._account is not None, "connect() first"
        return self._account

    @property
    def _current_directory(self) -> messages.Directory:
        assert self._directory is not None, "connect() first"
        return self._directory


# -- protocol steps ------------------------------------------------------------------------------

class _UnknownProfile(AcmeError):
    """A configured profile the CA's directory does not list."""


def _offered_profiles(directory: messages.Directory) -> dict[str, str]:
    """meta.profiles (draft-ietf-acme-profiles): profile name -> description."""
    profiles = directory.meta.profiles  # josepy makes it a frozendict, a Mapping
    if not isinstance(profiles, Mapping):
        return {}
    return {str(k): str(v) for k, v in profiles.items()}


def _check_profile(directory: messages.Directory, profile: str) -> None:
    offered = _offered_profiles(directory)
    if profile not in offered:
        raise _UnknownProfile(f"the CA offers no profile {profile!r} (offered: "
                              f"{', '.join(sorted(offered)) or 'none'})")


class _NewOrder(messages.NewOrder):
    """acme's NewOrder plus RFC 9773's `replaces` (acme 5.x has no such field); omitted when
    None, like `profile`, so CAs without ARI see plain RFC 8555 orders."""

    replaces: str | None = jose.field("replaces", omitempty=True)


# Problems that mean "not with this `replaces`" (RFC 9773 section 5: already replaced, another
# account's certificate, an identifier the CA cannot parse or does not know).
REPLACES_REFUSED = ("alreadyReplaced", "conflict", "malformed", "unauthorized")


def _new_order_replacing(conn: _Conn, domains: Sequence[str], profile: str | None,
                         replaces: str | None) -> tuple[str, messages.Order]:
    """A new order naming `replaces`; if the CA refuses it for that, once more without."""
    if replaces is None:
        return _new_order(conn, domains, profile)
    try:
        return _new_order(conn, domains, profile, replaces)
    except RateLimited:
        raise
    except AcmeError as exc:
        code = (exc.type or "")[len(ERROR_PREFIX):] if (exc.type or "").startswith(
            ERROR_PREFIX) else ""
        if code not in REPLACES_REFUSED and "replace" not in str(exc).lower():
            raise
        log.warning("%s: the CA refused the order replacing %s (%s); ordering again without "
                    "replaces", conn.name, replaces, exc)
    return _new_order(conn, domains, profile)


def _new_order(conn: _Conn, domains: Sequence[str], profile: str | None = None,
               replaces: str | None = None) -> tuple[str, messages.Order]:
    identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=d) for d in domains]
    # acme's NewOrder carries `profile` (omitted when None, as RFC 8555 CAs expect).
    response = conn.request("POST", conn.directory["newOrder"],
                            _NewOrder(identifiers=identifiers, profile=profile,
                                      replaces=replaces))
    order = messages.Order.from_json(response.json())
    order_url = response.headers.get("Location")
    if not order_url:
        raise AcmeError("the CA created an order but sent no Location for it")
    log.debug("%s: order %s is %s", conn.name, order_url, order.status.name)
    return order_url, order


@dataclass(frozen=True)
class _Todo:
    """An authorization to prove: the challenge we picked and what to publish for it."""

    authz_url: str
    challenge: messages.ChallengeBody
    response: ChallengeResponse


def _pending_challenges(conn: _Conn, order: messages.Order, ctype: str) -> list[_Todo]:
    """One _Todo per authorization that is not valid yet."""
    todo = []
    for authz_url in order.authorizations:
        authz = messages.Authorization.from_json(conn.post_as_get(authz_url).json())
        domain = authz.identifier.value
        label = f"*.{domain}" if authz.wildcard else domain
        if authz.status == messages.STATUS_VALID:
            log.debug("%s: %s is already authorized", conn.name, label)
            continue
        if authz.status != messages.STATUS_PENDING:
            raise _authorization_failed(label, authz)
        challb = next((c for c in authz.challenges if getattr(c.chall, "typ", None) == ctype),
                      None)
        if challb is None:
            offered = ", ".join(str(c.to_partial_json().get("type")) for c in authz.challenges)
            raise AcmeError(f"the CA offers no {ctype} challenge for {label} "
                            f"(offered: {offered or 'none'})")
        key = conn.account.key
        todo.append(_Todo(authz_url, challb, ChallengeResponse(
            type=ctype, domain=domain, wildcard=bool(authz.wildcard),
            token=challb.chall.encode("token"),
            key_authorization=challb.chall.key_authorization(key),
            txt_value=challb.chall.validation(key) if ctype == DNS01 else "")))
    return todo


def _answer(conn: _Conn, challb: messages.ChallengeBody) -> None:
    if challb.status != messages.STATUS_PENDING:
        return  # already answered (e.g. a reused pending authorization): just poll
    log.debug("%s: answering challenge %s", conn.name, challb.uri)
    # Answering twice is harmless (the CA ignores it), so network errors may be retried.
    conn.request("POST", challb.uri, challb.chall.response(conn.account.key), idempotent=True)


def _poll_authorizations(conn: _Conn, urls: Sequence[str]) -> None:
    """Poll until every authorization is valid; raise on the first invalid one."""
    pending = list(urls)
    backoff = _Backoff(conn, "waiting for the CA to validate the challenges")
    while pending:
        backoff.sleep()
        for url in list(pending):
            response = conn.post_as_get(url)
            authz = messages.Authorization.from_json(response.json())
            label = f"*.{authz.identifier.value}" if authz.wildcard else authz.identifier.value
            if authz.status == messages.STATUS_VALID:
                log.debug("%s: %s is valid", conn.name, label)
                pending.remove(url)
            elif authz.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                backoff.retry_after(response)
            else:
                raise _authorization_failed(label, authz)


def _finalize(conn: _Conn, order_url: str, order: messages.Order,
              csr: x509.CertificateSigningRequest) -> str:
    """Send the CSR and poll the order until the certificate is ready; return its URL.

    A finalize is not idempotent, so it is not resent blindly after a network error or a
    5xx: the order (a poll is idempotent) says whether the CA took it. Still "ready": it did
    not, and the CSR is sent once more; "processing" or "valid": it did, and the order is
    polled as usual."""
    request = messages.CertificateRequest(csr=csr)
    try:
        response = conn.request("POST", order.finalize, request)
    except RateLimited:
        raise
    except AcmeError as exc:
        if exc.type == ERROR_PREFIX + "orderNotReady":
            # The CA has not yet noticed the valid authorizations: wait for "ready", retry.
            log.debug("%s: order not ready yet: %s", conn.name, exc.detail)
            _poll_order(conn, order_url, until=(messages.STATUS_READY,))
        elif isinstance(exc, _Unreachable) or (exc.status or 0) >= 500:
            log.info("%s: finalizing failed (%s); asking the CA whether it took the order",
                     conn.name, exc)
            current = _poll_order(conn, order_url, until=(
                messages.STATUS_READY, messages.STATUS_PROCESSING, messages.STATUS_VALID))
            if current.status != messages.STATUS_READY:
                return _issued(conn, order_url, current)
        else:
            raise
        response = conn.request("POST", order.finalize, request)
    return _issued(conn, order_url, messages.Order.from_json(response.json()))


def _issued(conn: _Conn, order_url: str, order: messages.Order) -> str:
    """The certificate URL of a finalized order (polled until it is valid)."""
    if order.status != messages.STATUS_VALID or not order.certificate:
        order = _poll_order(conn, order_url, until=(messages.STATUS_VALID,))
    if not order.certificate:
        raise AcmeError(f"order {order_url} is valid but has no certificate URL")
    return str(order.certificate)


def _poll_order(conn: _Conn, order_url: str, until: tuple[messages.Status, ...]
                ) -> messages.Order:
    backoff = _Backoff(conn, "waiting for the CA to issue the certificate")
    while True:
        backoff.sleep()
        response = conn.post_as_get(order_url)
        order = messages.Order.from_json(response.json())
        log.debug("%s: order is %s", conn.name, order.status.name)
        if order.status in until:
            return order
        if order.status == messages.STATUS_INVALID:
            if order.error is not None:
                raise _to_acme_error(order.error, about=f"order {order_url}")
            raise AcmeError(f"the CA marked order {order_url} invalid without saying why")
        if order.status not in (messages.STATUS_PENDING, messages.STATUS_READY,
                                messages.STATUS_PROCESSING):
            raise AcmeError(f"order {order_url} is unexpectedly {order.status.name}")
        backoff.retry_after(response)


def _download(conn: _Conn, cert_url: str) -> IssuedChain:
    log.debug("%s: downloading %s", conn.name, cert_url)
    response = conn.post_as_get(cert_url, accept="application/pem-certificate-chain")
    try:
        certs = x509.load_pem_x509_certificates(response.content)
    except ValueError as exc:
        raise AcmeError(f"the CA sent a certificate chain that does not parse: {exc}") from exc
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in certs]
    leaf, chain = pems[0], b"".join(pems[1:])
    return IssuedChain(cert_pem=leaf, chain_pem=chain, fullchain_pem=leaf + chain)


# -- one thread's connection: retries, nonces, deadline ------------------------------------------

class _Unreachable(AcmeError):
    """No answer to a request that is not retried as such (it may have reached the CA)."""


class _Problem(Exception):
    """A non-2xx answer from the CA, with what we need to decide about retrying."""

    def __init__(self, response: requests.Response) -> None:
        self.status = response.status_code
        self.retry_after = response.headers.get("Retry-After")
        self.type: str | None = None
        try:
            jobj = response.json()
        except ValueError:
            jobj = None
        if isinstance(jobj, dict) and (jobj.get("type") or jobj.get("detail")):
            self.type = jobj.get("type")
            self.detail = str(jobj.get("detail") or jobj.get("title") or "")
            for sub in jobj.get("subproblems") or []:
                if isinstance(sub, dict):
                    ident = (sub.get("identifier") or {}).get("value", "?")
                    self.detail += f"; {ident}: {sub.get('type')}: {sub.get('detail')}"
        else:
            text = " ".join(response.text.split())[:200]
            self.detail = f"HTTP {self.status} {response.reason}" + (f": {text}" if text else "")
        super().__init__(self.detail)

    @property
    def code(self) -> str | None:
        if self.type and self.type.startswith(ERROR_PREFIX):
            return self.type[len(ERROR_PREFIX):]
        return None

    @property
    def unavailable_until(self) -> dt.datetime | None:
        """A 503 with a usable Retry-After: when the CA said to come back (else None)."""
        return _parse_retry_after(self.retry_after) if self.status == 503 else None

    def error(self, url: str) -> AcmeError:
        if self.status == 429 or self.code == "rateLimited":
            return RateLimited(self.detail, _parse_retry_after(self.retry_after),
                               type=self.type or ERROR_PREFIX + "rateLimited",
                               status=self.status)
        until = self.unavailable_until
        if until is not None:  # honoured like a 429: a stored wait, not retried before it
            detail = self.detail if self.detail.startswith("HTTP 503") \
                else f"HTTP 503: {self.detail}"
            return RateLimited(f"{detail} ({url}, Retry-After {self.retry_after})", until,
                               type=self.type, status=503)
        detail = self.detail if self.type else f"{url}: {self.detail}"
        return AcmeError(detail, type=self.type, status=self.status)


class _Network(ClientNetwork):
    """ClientNetwork that turns every non-2xx answer into _Problem and keeps its nonce."""

    deadline = math.inf  # set by _Conn: no request may outlive it
    request_timeout = 30.0  # set by _Conn: AcmeSettings.timeout
    client: AcmeClient | None = None  # set by _Conn: its pacer and endpoint classes

    def __del__(self) -> None:
        pass  # ClientNetwork closes its session here; ours is the thread's, shared (see _Conn)

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any
                      ) -> requests.Response:
        # Paces, and bounds, the requests acme makes on its own too (the HEAD for a nonce).
        kind = self.client.endpoint_kind(url) if self.client else pacer.OTHER
        if self.client is not None:
            self._pace(self.client.pacer, kind, url)
        remaining = max(self.deadline - time.monotonic(), 0.01)
        kwargs["timeout"] = min(kwargs.get("timeout") or self.request_timeout, remaining)
        response = super()._send_request(method, url, *args, **kwargs)
        if self.client is not None and response.status_code in (429, 503):
            self._note_pause(self.client.pacer, kind, url, response)
        if response.status_code >= 400:
            # Error replies carry a fresh nonce: keep it, a badNonce retry then needs no HEAD.
            with contextlib.suppress(acme_errors.Error):
                if self.REPLAY_NONCE_HEADER in response.headers:
                    self._add_nonce(response)
            raise _Problem(response)
        return response

    def _pace(self, pace: pacer.Pacer, kind: str, url: str) -> None:
        """Wait for the pacer's slot; wait out a pause the CA asked for if it is short enough
        (RETRY_AFTER_WAIT_MAX, and within the deadline), else raise RateLimited at once."""
        while True:
            try:
                delay = pace.reserve(kind)
            except pacer.Paused as paused:
                left = (paused.until - dt.datetime.now(dt.timezone.utc)).total_seconds()
                if left > RETRY_AFTER_WAIT_MAX or time.monotonic() + left >= self.deadline:
                    raise RateLimited(f"{paused.reason} (not asked again in this run; {url})",
                                      paused.until) from None
                self._wait(left, url)
                continue
            self._wait(delay, url)
            return

    def _wait(self, seconds: float, url: str) -> None:
        """Sleep `seconds`, not past the deadline (DeadlineExceeded); a signal ends it
        (Interrupted)."""
        if seconds <= 0:
            return
        if time.monotonic() + seconds >= self.deadline:
            raise DeadlineExceeded(f"deadline exceeded waiting to request {url}")
        if interrupt.wait(seconds):
            raise interrupt.error(f"waiting to request {url}")

    @staticmethod
    def _note_pause(pace: pacer.Pacer, kind: str, url: str,
                    response: requests.Response) -> None:
        """A 503 with Retry-After pauses every request to the CA for the rest of the run; a
        429 with one pauses its endpoint class, except new-order (see pacer.py)."""
        until = _parse_retry_after(response.headers.get("Retry-After"))
        if until is None:
            return
        if response.status_code == 503:
            pace.pause(None, until, f"the CA is unavailable (HTTP 503 from {url})")
        elif kind != pacer.NEW_ORDER:
            pace.pause(kind, until, f"rate-limited by the CA (HTTP 429 from {url})")


class _Conn:
    """One issuance's own connection to the CA (own nonces and HTTP session), shared account."""

    def __init__(self, client: AcmeClient, name: str, deadline: float, account: _Account | None,
                 key: tuple[jose.JWK, jose.JWASignature] | None = None) -> None:
        """`account` signs with its kid; without one, `key` (if any) signs with a jwk header."""
        self.client = client
        self.name = name
        self.deadline = deadline
        self._account = account
        settings = client.settings
        verify = httpenv.verify(settings.ca_bundle)
        if key is None and self._account is not None:
            key = (self._account.key, self._account.alg)
        self.net = _Network(key=key[0] if key else None, alg=key[1] if key else jose.RS256,
                            account=self._account.regr if self._account else None,
                            verify_ssl=verify, user_agent=USER_AGENT,
                            timeout=math.ceil(settings.timeout))
        self.net.deadline, self.net.request_timeout = deadline, settings.timeout
        self.net.client = client
        # Each worker thread keeps one HTTP session (kept-alive TLS connection) and its pool of
        # nonces across the certificates it issues: no new handshake and nonce request each time.
        state = client._thread_state()
        self.net.session.close()
        self.net.session, self.net._nonces = state.session, state.nonces

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # the session belongs to the thread, see __init__

    @property
    def account(self) -> _Account:
        assert self._account is not None
        return self._account

    @property
    def directory(self) -> messages.Directory:
        return self.client._current_directory

    def post_as_get(self, url: str, accept: str | None = None) -> requests.Response:
        return self.request("POST", url, None, idempotent=True, accept=accept)

    def request(self, method: str, url: str, obj: jose.JSONDeSerializable | None = None, *,
                idempotent: bool = False, accept: str | None = None,
                may_reregister: bool = True) -> requests.Response:
        """GET, or POST `obj` signed (None: POST-as-GET), with the retries described above."""
        bad_nonces = transient = 0
        reregistered = False
        while True:
            self._check_deadline(url)
            try:
                if method == "GET":
                    return self.net.get(url)
                headers = {"Content-Type": self.net.JOSE_CONTENT_TYPE}
                if accept:
                    headers["Accept"] = accept
                return self.net.post(url, obj, new_nonce_url=self.directory["newNonce"],
                                     headers=headers)
            except _Problem as problem:
                if problem.code == "badNonce" and bad_nonces < BAD_NONCE_RETRIES:
                    bad_nonces += 1
                    log.debug("%s: badNonce from %s, retrying (%d)", self.name, url, bad_nonces)
                    continue
                if (may_reregister and not reregistered and self._account is not None
                        and self._account_is_gone(problem)):
                    reregistered = True
                    self._use(self.client._replace_account(self._account, self.name,
                                                           self.deadline))
                    continue
                if idempotent and problem.status >= 500 and transient < TRANSIENT_RETRIES \
                        and not self._wait_too_long(problem):
                    transient += 1
                    self._pause_before_retry(transient, problem.retry_after, url, str(problem))
                    continue
                raise problem.error(url) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                if time.monotonic() >= self.deadline:
                    raise DeadlineExceeded(f"deadline exceeded waiting for {url}") from None
                if idempotent and transient < TRANSIENT_RETRIES:
                    transient += 1
                    self._pause_before_retry(transient, None, url, _describe(exc))
                    continue
                raise _Unreachable(f"cannot reach the CA at {url}: {_describe(exc)}") from None
            except requests.RequestException as exc:
                raise AcmeError(f"request to {url} failed: {_describe(exc)}") from None
            except acme_errors.Error as exc:  # e.g. a missing or malformed Replay-Nonce
                raise AcmeError(f"unusable answer from {url}: {exc}") from None

    def _check_deadline(self, url: str) -> None:
        # Each request's timeout is cut to what is left (_Network); none starts after it, nor
        # once certbatch is interrupted (one already sent finishes within its timeout).
        interrupt.check(f"before requesting {url}")
        if time.monotonic() >= self.deadline:
            raise DeadlineExceeded(f"deadline exceeded before requesting {url}")

    def _wait_too_long(self, problem: _Problem) -> bool:
        """A 503 whose Retry-After is not to be waited out in this run (see the top)."""
        until = problem.unavailable_until
        if until is None:
            return False
        wait = (until - dt.datetime.now(dt.timezone.utc)).total_seconds()
        return wait > RETRY_AFTER_WAIT_MAX or time.monotonic() + wait >= self.deadline

    def _pause_before_retry(self, attempt: int, retry_after: str | None, url: str,
                            why: str) -> None:
        delay = TRANSIENT_BACKOFF * 2 ** (attempt - 1)
        delay = max(delay, _retry_after_seconds(retry_after) or 0.0)
        log.info("%s: %s: %s; retry %d/%d in %.1f s", self.name, url, why, attempt,
                 TRANSIENT_RETRIES, delay)
        _sleep(self, delay, f"retrying {url}")

    def _account_is_gone(self, problem: _Problem) -> bool:
        if problem.code == "accountDoesNotExist":
            return True
        if problem.code != "unauthorized":
            return False
        # "unauthorized" also means "not your resource": ask about the account itself.
        try:
            self.request("POST", self.account.uri, None, idempotent=True, may_reregister=False)
        except AcmeError as exc:
            return exc.type in {ERROR_PREFIX + code for code in ACCOUNT_GONE}
        return False

    def _use(self, account: _Account) -> None:
        self._account = account
        self.net.key, self.net.alg, self.net.account = account.key, account.alg, account.regr


class _Backoff:
    """Poll delays: POLL_FIRST, then x POLL_FACTOR up to POLL_MAX; Retry-After wins if longer."""

    def __init__(self, conn: _Conn, what: str) -> None:
        self.conn = conn
        self.what = what
        self.delay = POLL_FIRST
        self._requested = 0.0

    def retry_after(self, response: requests.Response) -> None:
        seconds = _retry_after_seconds(response.headers.get("Retry-After"))
        if seconds is not None:
            self._requested = max(self._requested, seconds)

    def sleep(self) -> None:
        delay = max(self.delay, self._requested)
        self._requested = 0.0
        self.delay = min(self.delay * POLL_FACTOR, POLL_MAX)
        _sleep(self.conn, delay, self.what)


def _sleep(conn: _Conn, seconds: float, what: str) -> None:
    """Sleep, unless that would end past the deadline: then raise DeadlineExceeded at once.
    A stop request (a signal) ends the sleep early with Interrupted."""
    remaining = conn.deadline - time.monotonic()
    if seconds >= remaining:
        raise DeadlineExceeded(f"deadline exceeded {what} (next step in "
                               f"{seconds:.1f} s, {max(remaining, 0):.1f} s left)")
    if interrupt.wait(seconds):
        raise interrupt.error(what)


# -- small helpers -------------------------------------------------------------------------------

@contextlib.contextmanager
def _acme_errors(name: str) -> Iterator[None]:
    """Let certbatch errors through; turn whatever else the CA's answers provoke into AcmeError."""
    try:
        yield
    except CertbatchError:
        raise
    except (acme_errors.Error, jose.Error, requests.RequestException, ValueError,
            KeyError) as exc:
        raise AcmeError(f"unexpected answer from the CA: {type(exc).__name__}: {exc}") from exc


def _stored_account(name: str, stored: tuple[bytes, str | None]) -> _Account | None:
    key_pem, regr_json = stored
    key, alg = _jwk_from_pem(key_pem)
    if not regr_json:
        return None
    try:
        regr = messages.RegistrationResource.json_loads(regr_json)
    except (ValueError, jose.DeserializationError) as exc:
        log.warning("%s: stored account registration is unreadable (%s); registering again",
                    name, exc)
        return None
    return _Account(key, alg, regr)


def _jwk_from_pem(key_pem: bytes, what: str = "the stored ACME account key"
                  ) -> tuple[jose.JWK, jose.JWASignature]:
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise AcmeError(f"{what} is unreadable: {exc}") from None
    if isinstance(private, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=private), jose.RS256
    if isinstance(private, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}
        if private.curve.name in algs:
            return jose.JWKEC(key=private), algs[private.curve.name]
    raise AcmeError(f"unsupported ACME account key type: {type(private).__name__}")


@contextlib.contextmanager
def _cleaning_up(solver: Solver, name: str) -> Iterator[None]:
    """Run `solver.cleanup()` in a thread of its own while the block runs, and wait for it at
    the end, whatever happens. Once every authorization is valid the responses are not needed,
    and removing them (a dns script or a DNS provider's API, 0.1 s or more) takes about as
    long as the CA's finalization: overlapped, a certificate is issued that much sooner, and
    its records are still gone when `issue` returns."""
    def cleanup() -> None:
        try:
            solver.cleanup()
        except Exception:  # noqa: BLE001 - it never raises; if it did, not in a bare thread
            log.exception("%s: removing the challenge responses failed", name)

    worker = threading.Thread(target=cleanup, name=f"{name}-cleanup", daemon=True)
    worker.start()
    try:
        yield
    finally:
        worker.join()


def _make_csr(key_pem: bytes, domains: Sequence[str]
              ) -> x509.CertificateSigningRequest:
    if not domains:
        raise CertbatchError("no domain names to order")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertbatchError(f"unreadable certificate key: {exc}") from None
    if not isinstance(private, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise CertbatchError(f"certificate keys must be RSA or EC, "
                             f"not {type(private).__name__}")
    builder = x509.CertificateSigningRequestBuilder()
    if len(domains[0]) <= 64:  # the CN's length limit; the SAN is what counts anyway
        builder = builder.subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
    return builder.sign(private, hashes.SHA256())


def _authorization_failed(label: str, authz: messages.Authorization) -> AcmeError:
    """The CA's reason: the error of the failed challenge, if it gave one."""
    for challb in authz.challenges:
        if challb.error is not None:
            return _to_acme_error(challb.error, about=label)
    return AcmeError(f"authorization for {label} is {authz.status.name}")


def _to_acme_error(error: messages.Error, about: str = "") -> AcmeError:
    """AcmeError with the CA's type and detail; `about` is appended unless the detail says it."""
    detail = error.detail or error.title or error.description or "no detail given"
    for sub in error.subproblems or ():
        ident = sub.identifier.value if sub.identifier else "?"
        detail += f"; {ident}: {sub.typ}: {sub.detail}"
    if about and about not in detail:
        detail += f" ({about})"
    if error.typ == ERROR_PREFIX + "rateLimited":
        return RateLimited(detail, None)
    return AcmeError(detail, type=error.typ)


def _retry_after_seconds(value: str | None) -> float | None:
    now = dt.datetime.now(dt.timezone.utc)
    when = _parse_retry_after(value, now)
    return None if when is None else max((when - now).total_seconds(), 0.0)


def _describe(exc: BaseException) -> str:
    """A short reason for a requests exception (its repr nests several layers of urllib3)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error (check acme.ca_bundle)"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        for marker in ("Connection refused", "Name or service not known",
                       "Temporary failure in name resolution", "Connection reset",
                       "Network is unreachable", "No route to host", "RemoteDisconnected"):
            if marker in text:
                return marker.lower()
        return "connection failed"
    return type(exc).__name__

