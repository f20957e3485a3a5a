"""AcmeClient against a real Pebble (see conftest.py), plus a fault-injecting proxy for the CA
behaviours Pebble cannot produce (rate limits, 5xx, dropped connections)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import conftest
import pytest
from conftest import MemoryAccountStore
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fault_proxy import (  # proxy_fixture: the `proxy` fixture
    Fault,
    FaultProxy,
    proxy_fixture,  # noqa: F401
    rate_limited,
)
from pebble_server import PebbleInstance

from certbatch import acme_client
from certbatch.acme_client import AcmeClient, IssuedChain, _parse_retry_after
from certbatch.config import EAB, AcmeSettings, ChallengeSettings
from certbatch.errors import AcmeError, ChallengeError, DeadlineExceeded, RateLimited

HOOK = Path(__file__).resolve().parent.parent / "hooks" / "dns" / "challtestsrv.sh"


# -- helpers -------------------------------------------------------------------------------------

def unique(label: str = "host") -> str:
    """A fresh name: Pebble reuses valid authorizations, which would skip the challenge."""
    return f"{label}-{uuid.uuid4().hex[:10]}.example.com"


def new_key(kind: str = "ec") -> bytes:
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def settings_for(inst: PebbleInstance, directory: str | None = None, **kw: Any) -> AcmeSettings:
    return AcmeSettings(directory=directory or inst.directory_url, ca_bundle=inst.ca_bundle,
                        email="ops@example.com", timeout=10, **kw)


def standalone(inst: PebbleInstance) -> ChallengeSettings:
    return ChallengeSettings(type="http-01", standalone_address="127.0.0.1",
                             standalone_port=inst.http_port)


def dns_script(script: Path = HOOK, wait: float = 0.0) -> ChallengeSettings:
    return ChallengeSettings(type="dns-01", script=script, wait=wait)


def recording_script(tmp_path: Path, body: str = f'exec "{HOOK}" "$@"') -> tuple[Path, Path]:
    """A dns script that appends its argv to a log, then runs `body` (default: the real hook)."""
    log = tmp_path / "calls.log"
    script = tmp_path / "dns-hook.sh"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n{body}\n')
    script.chmod(0o755)
    return script, log


def calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def issue(client: AcmeClient, domains: Sequence[str], challenge: ChallengeSettings,
          key_pem: bytes | None = None, timeout: float = 30.0) -> IssuedChain:
    return client.issue(domains[0], domains, key_pem or new_key(), challenge,
                        time.monotonic() + timeout)


def check_chain(chain: IssuedChain, domains: Sequence[str], key_pem: bytes,
                inst: PebbleInstance) -> None:
    """Leaf covers the names, matches the key, and chains up to Pebble's root."""
    leaf = x509.load_pem_x509_certificate(chain.cert_pem)
    intermediates = x509.load_pem_x509_certificates(chain.chain_pem)
    assert chain.fullchain_pem == chain.cert_pem + chain.chain_pem
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(domains)
    key = serialization.load_pem_private_key(key_pem, None)
    assert leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    root = x509.load_pem_x509_certificate(inst.root_pem())
    path = [leaf, *intermediates, root]
    for cert, issuer in zip(path[:-1], path[1:], strict=True):
        cert.verify_directly_issued_by(issuer)


@pytest.fixture
def client(pebble: PebbleInstance, account_store: MemoryAccountStore) -> AcmeClient:
    return AcmeClient(settings_for(pebble), account_store)


@pytest.fixture
def dns_env(pebble: PebbleInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in pebble.env().items():
        monkeypatch.setenv(name, value)


# -- issuance with each challenge type -----------------------------------------------------------

def test_issue_webroot(client: AcmeClient, pebble: PebbleInstance, webroot_server: Path) -> None:
    domains = [unique("web"), unique("web")]
    key = new_key("rsa")
    chain = issue(client, domains, ChallengeSettings(type="http-01", webroot=webroot_server),
                  key)
    check_chain(chain, domains, key, pebble)
    assert list(webroot_server.iterdir()) == []  # tokens and the folders we made are gone


def test_issue_webroot_map_two_webroots_served_per_host(client: AcmeClient,
                                                        pebble: PebbleInstance,
                                                        tmp_path: Path) -> None:
    """webroot_map (issue 14): each name's token goes under its own webroot, and the web server
    serves each name from its own folder only (virtual hosts), so a misplaced token fails."""
    a, b, c = unique("site-a"), unique("site-b"), unique("site-c")
    roots = {a: tmp_path / "www-a", b: tmp_path / "www-b", c: tmp_path / "www-a"}
    (tmp_path / "www-a").mkdir()
    (tmp_path / "www-b").mkdir()
    key = new_key()
    challenge = ChallengeSettings(type="http-01", webroot=tmp_path / "www-a",
                                  webroot_map=((b, tmp_path / "www-b"),))
    with conftest.serve_by_host(pebble.http_port, roots) as seen:
        chain = issue(client, [a, b, c], challenge, key)
    check_chain(chain, [a, b, c], key, pebble)
    assert {host for host, path, status in seen
            if status == 200 and "/.well-known/acme-challenge/" in path} == {a, b, c}
    assert [list(root.iterdir()) for root in (tmp_path / "www-a", tmp_path / "www-b")] == \
        [[], []]  # every token and the folders we made are gone, in both webroots


def test_issue_standalone(client: AcmeClient, pebble: PebbleInstance) -> None:
    domains = [unique("standalone")]
    key = new_key()
    check_chain(issue(client, domains, standalone(pebble), key), domains, key, pebble)
    # The server is stopped once the last certificate using it is done: the port is free.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", pebble.http_port))


def test_issue_dns01_with_challtestsrv_hook(client: AcmeClient, pebble: PebbleInstance,
                                            dns_env: None) -> None:
    domains = [unique("dns")]
    key = new_key()
    chain = issue(client, domains, dns_script(), key)
    check_chain(chain, domains, key, pebble)


def test_wildcard_and_base_share_one_record(client: AcmeClient, pebble: PebbleInstance,
                                            dns_env: None, tmp_path: Path) -> None:
    base = unique("wild")
    domains = [base, f"*.{base}"]
    script, log = recording_script(tmp_path)
    key = new_key()
    chain = issue(client, domains, dns_script(script), key)
    check_chain(chain, domains, key, pebble)
    record = f"_acme-challenge.{base}."
    seen = calls(log)
    assert [c[0] for c in seen] == ["add", "add", "remove", "remove"]  # both values at once
    assert {tuple(c[1:3]) for c in seen} == {(base, record)}
    assert seen[0][3] != seen[1][3]  # one TXT value per authorization
    assert {c[3] for c in seen[2:]} == {seen[0][3], seen[1][3]}


def test_records_are_removed_while_the_order_is_finalized(
        client: AcmeClient, pebble: PebbleInstance, dns_env: None, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # `remove` takes two seconds here: the finalization does not wait for it, yet `issue`
    # does not return before it is done
    done = tmp_path / "done"
    script, _ = recording_script(
        tmp_path, f'[ "$1" = remove ] && sleep 2\n"{HOOK}" "$@" && echo "$1 done" >> "{done}"')
    domain = unique("overlap")
    caplog.set_level(logging.INFO, logger="certbatch")
    chain = issue(client, [domain], dns_script(script))
    assert done.read_text().splitlines() == ["add done", "remove done"]
    assert pebble.txt(f"_acme-challenge.{domain}.") == []
    assert chain.cert_pem
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(domain)]
    order = [next(i for i, line in enumerate(lines) if text in line)
             for text in ("all authorizations are valid", "finalizing the order",
                          "certificate issued", "TXT record(s) removed")]
    # finalized and downloaded while the script slept; logged removed after it woke
    assert order == sorted(order)


# -- accounts ------------------------------------------------------------------------------------

def test_account_is_registered_once_and_reused(pebble: PebbleInstance,
                                               account_store: MemoryAccountStore) -> None:
    client = AcmeClient(settings_for(pebble), account_store)
    issue(client, [unique()], standalone(pebble))
    issue(client, [unique()], standalone(pebble))
    assert (account_store.loads, account_store.saves) == (1, 1)
    key_pem, regr_json = account_store.accounts[pebble.directory_url]
    assert b"PRIVATE KEY" in key_pem and "PRIVATE" not in regr_json
    assert json.loads(regr_json)["body"]["contact"] == ["mailto:ops@example.com"]

    # A new process (new client, same store) loads the account instead of registering.
    again = AcmeClient(settings_for(pebble), account_store)
    issue(again, [unique()], standalone(pebble))
    assert (account_store.loads, account_store.saves) == (2, 1)


def test_concurrent_issues_share_one_account(pebble: PebbleInstance,
                                             account_store: MemoryAccountStore) -> None:
    client = AcmeClient(settings_for(pebble), account_store)
    with ThreadPoolExecutor(6) as pool:
        chains = list(pool.map(lambda _: issue(client, [unique("par")], standalone(pebble)),
                               range(6)))
    assert len(chains) == 6
    assert (account_store.loads, account_store.saves) == (1, 1)


def test_two_clients_in_one_process_register_one_account(
        pebble: PebbleInstance, account_store: MemoryAccountStore) -> None:
    # Several AcmeClient objects for one CA (e.g. created lazily by racing threads) must not
    # register one account each: their saves could mix one account's key with another's URL.
    clients = [AcmeClient(settings_for(pebble), account_store) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda c: issue(c, [unique("two")], standalone(pebble)), clients))
    assert account_store.saves == 1


def test_account_forgotten_by_ca_is_registered_again(
        pebble_factory: Callable[..., PebbleInstance],
        account_store: MemoryAccountStore) -> None:
    inst = pebble_factory()
    client = AcmeClient(settings_for(inst), account_store)
    issue(client, [unique()], standalone(inst))
    old_uri = json.loads(account_store.accounts[inst.directory_url][1])["uri"]

    # Pebble keeps nothing across a restart: our stored account is now unknown to the CA
    # (accountDoesNotExist). Four threads hit that at once; exactly one registers again.
    inst.restart_pebble()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: issue(client, [unique("rereg")], standalone(inst)), range(4)))
    assert account_store.saves == 2
    assert json.loads(account_store.accounts[inst.directory_url][1])["uri"] != old_uri

    # A fresh client loading the re-registered account from the store just works.
    issue(AcmeClient(settings_for(inst), account_store), [unique()], standalone(inst))
    assert account_store.saves == 2


def test_external_account_binding(pebble_factory: Callable[..., PebbleInstance],
                                  account_store: MemoryAccountStore) -> None:
    hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    inst = pebble_factory(config={"externalAccountBindingRequired": True,
                                  "externalAccountMACKeys": {"kid-1": hmac_key}})
    with pytest.raises(AcmeError) as err:
        AcmeClient(settings_for(inst), MemoryAccountStore()).connect()
    assert err.value.type == "urn:ietf:params:acme:error:externalAccountRequired"

    client = AcmeClient(settings_for(inst, eab=EAB(kid="kid-1", hmac_key=hmac_key)),
                        account_store)
    issue(client, [unique("eab")], standalone(inst))
    assert account_store.saves == 1


# -- robustness ----------------------------------------------------------------------------------

def test_survives_half_of_all_nonces_rejected(pebble_factory: Callable[..., PebbleInstance],
                                              account_store: MemoryAccountStore,
                                              caplog: pytest.LogCaptureFixture) -> None:
    inst = pebble_factory(PEBBLE_WFE_NONCEREJECT="50")
    client = AcmeClient(settings_for(inst), account_store)
    with caplog.at_level(logging.DEBUG, logger="certbatch.acme"), ThreadPoolExecutor(3) as pool:
        chains = list(pool.map(lambda _: issue(client, [unique("nonce")], standalone(inst)),
                               range(4)))
    assert len(chains) == 4
    assert sum("badNonce" in r.getMessage() for r in caplog.records) >= 5


def test_polls_do_not_sleep_a_second_per_step(client: AcmeClient,
                                              pebble: PebbleInstance) -> None:
    client.connect()
    t0 = time.monotonic()
    issue(client, [unique("fast")], standalone(pebble))
    # Authorization poll + order poll with a fixed 1 s sleep would take >= 2 s; with
    # PEBBLE_VA_NOSLEEP ours takes about half a second. Generous bound: benchmarks live elsewhere.
    assert time.monotonic() - t0 < 3.0


def test_servfail_fails_validation_with_the_cas_reason(
        client: AcmeClient, pebble: PebbleInstance, dns_env: None, tmp_path: Path) -> None:
    good, bad = unique("ok"), unique("servfail")
    script, log = recording_script(tmp_path)
    pebble.add_servfail(f"_acme-challenge.{bad}")
    try:
        with pytest.raises(AcmeError) as err:
            issue(client, [good, bad], dns_script(script))
    finally:
        pebble.clear_servfail(f"_acme-challenge.{bad}")
    # Pebble reports a failed TXT lookup as "unauthorized" (it never uses the "dns" type; see
    # the proxy test below for that): the CA's type and detail are passed on as they are.
    assert err.value.type == "urn:ietf:params:acme:error:unauthorized"
    assert str(err.value).startswith("urn:ietf:params:acme:error:unauthorized: Error retrieving "
                                     f"TXT records for DNS challenge (\"DNS lookup for "
                                     f"\\\"_acme-challenge.{bad}\\\" returned an unsuccessful")
    assert sorted(c[0] for c in calls(log)) == ["add", "add", "remove", "remove"]


def test_failing_dns_script_is_a_challenge_error(client: AcmeClient, tmp_path: Path) -> None:
    script, log = recording_script(
        tmp_path, 'if [ "$1" = add ]; then echo "step 1" >&2; echo "no API token" >&2; exit 3; fi')
    domain = unique("fail")
    with pytest.raises(ChallengeError) as err:
        issue(client, [domain], dns_script(script))
    assert str(err.value) == (f"dns script {script} add _acme-challenge.{domain}. "
                              f"exited with status 3: no API token")
    assert [c[0] for c in calls(log)] == ["add", "remove"]  # cleaned up all the same
    assert calls(log)[0][1:] == calls(log)[1][1:]


def test_deadline_while_dns_script_hangs(client: AcmeClient, tmp_path: Path) -> None:
    script, log = recording_script(tmp_path, 'if [ "$1" = add ]; then sleep 30; fi')
    client.connect()
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        issue(client, [unique("slow")], dns_script(script), timeout=1.5)
    assert time.monotonic() - t0 < 10  # the sleeping script (30 s) was killed, not waited for
    assert [c[0] for c in calls(log)] == ["add", "remove"]


def test_deadline_during_dns_wait(client: AcmeClient, pebble: PebbleInstance, dns_env: None,
                                  tmp_path: Path) -> None:
    script, log = recording_script(tmp_path)
    client.connect()
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        issue(client, [unique("wait")], dns_script(script, wait=60), timeout=1.0)
    assert time.monotonic() - t0 < 10  # not the 60 s wait
    assert [c[0] for c in calls(log)] == ["add", "remove"]


def test_unreachable_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acme_client, "TRANSIENT_BACKOFF", 0.05)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = AcmeClient(AcmeSettings(directory=f"https://127.0.0.1:{port}/dir", timeout=2),
                        MemoryAccountStore())
    with pytest.raises(AcmeError, match="cannot reach the CA .*connection refused"):
        client.connect()


# -- fault-injecting proxy (mocks CA behaviour Pebble lacks) -------------------------------------

@pytest.mark.parametrize("header, expected", [
    ("3600", "delta"),
    ("Wed, 21 Oct 2026 07:28:00 GMT", dt.datetime(2026, 10, 21, 7, 28, tzinfo=dt.timezone.utc)),
    ("Wed, 21 Oct 2065 07:28:00 GMT", "a year"),  # capped: never held back for ever
    (None, None),
])
def test_rate_limited_new_order(proxy: FaultProxy, pebble: PebbleInstance,
                                header: str | None, expected: object) -> None:
    # MOCK: Pebble enforces no rate limits, so the proxy answers new-order with a 429 problem.
    proxy.faults.append(rate_limited(header))
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    before = dt.datetime.now(dt.timezone.utc)
    with pytest.raises(RateLimited) as err:
        issue(client, [unique("limited")], standalone(pebble))
    assert err.value.detail == "too many new orders recently"
    assert err.value.type == "urn:ietf:params:acme:error:rateLimited"
    assert err.value.status == 429
    if expected == "delta":
        assert err.value.retry_after is not None
        delta = err.value.retry_after - before
        assert dt.timedelta(seconds=3590) < delta < dt.timedelta(seconds=3610)
    elif expected == "a year":
        assert err.value.retry_after is not None
        delta = err.value.retry_after - before
        assert dt.timedelta(days=366) - dt.timedelta(seconds=10) < delta \
            <= dt.timedelta(days=366, seconds=10)
    else:
        assert err.value.retry_after == expected
    assert proxy.count("POST", "/order-plz") == 1  # not retried


@pytest.mark.parametrize("fault", [
    Fault("POST", "/authZ/", 503, {"Retry-After": "0"}, b"upstream overloaded", times=2),
    Fault("POST", "/authZ/", 0, times=2),  # connection dropped without an answer
    Fault("POST", "/certZ/", 500, {"Content-Type": "application/problem+json"},
          b'{"type": "urn:ietf:params:acme:error:serverInternal", "detail": "oops"}'),
], ids=["503-on-authz-poll", "dropped-authz-poll", "500-on-download"])
def test_transient_errors_on_idempotent_requests_are_retried(
        proxy: FaultProxy, pebble: PebbleInstance, fault: Fault,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # MOCK: Pebble never fails like this; the proxy does it to the first POST-as-GET(s).
    monkeypatch.setattr(acme_client, "TRANSIENT_BACKOFF", 0.05)
    proxy.faults.append(fault)
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    issue(client, [unique("transient")], standalone(pebble))
    assert fault.hits == fault.times


SERVER_ERROR = (500, {"Content-Type": "application/problem+json"},
                b'{"type": "urn:ietf:params:acme:error:serverInternal", "detail": "oops"}')


@pytest.mark.parametrize("answer", [(0, {}, b""), SERVER_ERROR], ids=["dropped", "500"])
@pytest.mark.parametrize("reached", [False, True], ids=["lost-on-the-way", "answer-lost"])
def test_a_finalize_without_answer_is_sent_again_only_if_the_ca_did_not_take_it(
        proxy: FaultProxy, pebble: PebbleInstance, answer: tuple[int, dict[str, str], bytes],
        reached: bool) -> None:
    # MOCK: Pebble never fails like this. The proxy loses the first finalize before Pebble sees
    # it (the order stays ready: sent again), or passes it on and loses Pebble's answer (the
    # order is processing or valid: not sent again, which could fail or issue twice).
    status, headers, body = answer
    fault = Fault("POST", "/finalize-order/", status, headers, body, forward=reached)
    proxy.faults.append(fault)
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    domain = unique("finalize")
    key = new_key()
    chain = issue(client, [domain], standalone(pebble), key)
    check_chain(chain, [domain], key, pebble)
    assert fault.hits == 1
    sent = proxy.matching("POST", "/finalize-order/")
    # Pebble rejects some good nonces (PEBBLE_WFE_NONCEREJECT, 5 % by default): a forwarded
    # finalize it refused left the order ready, and sending it again is right then too; and a
    # badNonce on a later one is signed again (one more request). Pebble took exactly one.
    taken = reached and sent[0].forwarded == 200
    if taken:
        assert len(sent) == 1  # not sent again: the CA had it
    else:
        assert len(sent) >= 2
    assert sum(r.forwarded == 200 or (not r.faulted and r.status == 200) for r in sent) == 1


def test_a_finalize_refused_is_not_sent_again(proxy: FaultProxy, pebble: PebbleInstance) -> None:
    # MOCK: a 400 problem is the CA's answer, not a lost one
    proxy.faults.append(Fault("POST", "/finalize-order/", 400,
                              {"Content-Type": "application/problem+json"},
                              b'{"type": "urn:ietf:params:acme:error:badCSR", "detail": "no"}'))
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    with pytest.raises(AcmeError, match="badCSR: no"):
        issue(client, [unique("refused")], standalone(pebble))
    assert proxy.count("POST", "/finalize-order/") == 1


def test_failed_authorization_shows_the_challenge_error(proxy: FaultProxy,
                                                        pebble: PebbleInstance) -> None:
    # MOCK: Pebble never uses the "dns" problem type (Boulder does); the proxy answers the first
    # authorization poll (after the initial fetch) with what Boulder sends on a SERVFAIL.
    domain = unique("boulder")
    authz = {"status": "invalid", "identifier": {"type": "dns", "value": domain},
             "challenges": [{"type": "http-01", "url": "https://127.0.0.1/chalZ/x",
                             "token": "t" * 43, "status": "invalid", "error": {
                                 "type": "urn:ietf:params:acme:error:dns",
                                 "detail": f"DNS problem: SERVFAIL looking up A for {domain}"}}]}
    proxy.faults.append(Fault("POST", "/authZ/", 200, {"Content-Type": "application/json"},
                              json.dumps(authz).encode(), after=1))
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    with pytest.raises(AcmeError) as err:
        issue(client, [domain], standalone(pebble))
    assert str(err.value) == (f"urn:ietf:params:acme:error:dns: DNS problem: SERVFAIL looking "
                              f"up A for {domain}")
    assert err.value.type == "urn:ietf:params:acme:error:dns"


def test_server_error_on_new_order_is_not_retried(proxy: FaultProxy,
                                                  pebble: PebbleInstance) -> None:
    # MOCK: a 500 on a non-idempotent request; retrying could create a second order.
    proxy.faults.append(Fault("POST", "/order-plz", 500,
                              {"Content-Type": "application/problem+json"},
                              b'{"type": "urn:ietf:params:acme:error:serverInternal",'
                              b' "detail": "database on fire"}'))
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    with pytest.raises(AcmeError) as err:
        issue(client, [unique()], standalone(pebble))
    assert str(err.value) == "urn:ietf:params:acme:error:serverInternal: database on fire"
    assert err.value.status == 500
    assert proxy.count("POST", "/order-plz") == 1


def test_unauthorized_for_a_known_account_does_not_reregister(
        proxy: FaultProxy, pebble: PebbleInstance) -> None:
    # MOCK: "unauthorized" on new-order while the account is fine (a CA policy refusal). The
    # client asks the CA about its account (passed through to Pebble: it exists) and so keeps it.
    proxy.faults.append(Fault("POST", "/order-plz", 403,
                              {"Content-Type": "application/problem+json"},
                              b'{"type": "urn:ietf:params:acme:error:unauthorized",'
                              b' "detail": "policy forbids issuing for this name"}'))
    store = MemoryAccountStore()
    client = AcmeClient(settings_for(pebble, proxy.directory_url), store)
    with pytest.raises(AcmeError) as err:
        issue(client, [unique()], standalone(pebble))
    assert str(err.value) == ("urn:ietf:params:acme:error:unauthorized: policy forbids issuing "
                              "for this name")
    assert store.saves == 1
    assert proxy.count("POST", "/my-account/") >= 1  # the probe (more on a badNonce)


def test_a_hanging_ca_cannot_hold_a_request_past_the_deadline(
        proxy: FaultProxy, pebble: PebbleInstance) -> None:
    # MOCK: new-order takes 20 s to answer; the request timeout (10 s) is cut to the deadline.
    proxy.faults.append(Fault("POST", "/order-plz", 0, delay=20))
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    client.connect()
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline exceeded waiting for https://"):
        issue(client, [unique()], standalone(pebble), timeout=1.0)
    assert time.monotonic() - t0 < 6  # not the request timeout's 10 s


# -- the harness and pure helpers -------------------------------------------------------------

def test_parse_retry_after() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    assert _parse_retry_after("120", now) == now + dt.timedelta(seconds=120)
    assert _parse_retry_after("Fri, 01 Feb 2030 10:00:00 GMT", now) == dt.datetime(
        2030, 2, 1, 10, tzinfo=dt.timezone.utc)
    assert _parse_retry_after("Fri, 01 Feb 2030 12:00:00 +0200", now) == dt.datetime(
        2030, 2, 1, 10, tzinfo=dt.timezone.utc)
    for bad in (None, "", "soon", "-5", "1.5"):
        assert _parse_retry_after(bad, now) is None


def test_missing_pebble_skips_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    import conftest
    monkeypatch.setattr(conftest, "find_binaries", lambda: None)
    monkeypatch.delenv("CERTBATCH_REQUIRE_PEBBLE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install pebble"):
        conftest._require_pebble()
    monkeypatch.setenv("CERTBATCH_REQUIRE_PEBBLE", "1")
    with pytest.raises(pytest.fail.Exception, match="pebble not installed: apt-get install"):
        conftest._require_pebble()
