"""The check of what the CA sent, before it replaces anything (keys, names, validity)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from nginx_server import TestCA

from certbatch import crypto
from certbatch.acme_client import AcmeClient, IssuedChain
from certbatch.config import load
from certbatch.errors import CertificateCheckError
from certbatch.runner import FAILED, Runner
from certbatch.store import CertStatus, Store

NAMES = ("a.example.com", "b.example.com")


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_generate_key_types(key_type: str) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(crypto.generate_key(key_type), None)
    size = getattr(key, "key_size", None) or key.curve.key_size  # type: ignore[union-attr]
    assert size == {"ec-p256": 256, "ec-p384": 384, "rsa-2048": 2048}[key_type]


def test_good_chain_passes_and_reports_the_leaf(ca: TestCA) -> None:
    issued = ca.issue(list(NAMES), serial=0xABC)
    info = crypto.check_issued(issued.fullchain_pem, issued.key_pem, NAMES)
    assert info.serial == "abc" and set(info.names) == set(NAMES)
    leaf, chain = crypto.split_fullchain(issued.fullchain_pem)
    assert leaf == issued.cert_pem and chain == issued.chain_pem


def test_certificate_for_another_key_is_refused(ca: TestCA) -> None:
    issued, other = ca.issue(list(NAMES)), ca.issue(list(NAMES))
    with pytest.raises(CertificateCheckError, match="does not match the private key"):
        crypto.check_issued(issued.fullchain_pem, other.key_pem, NAMES)


def test_certificate_missing_a_name_is_refused(ca: TestCA) -> None:
    issued = ca.issue(["a.example.com"])
    with pytest.raises(CertificateCheckError, match="does not cover b.example.com"):
        crypto.check_issued(issued.fullchain_pem, issued.key_pem, NAMES)


def test_garbage_and_expired_are_refused(ca: TestCA) -> None:
    issued = ca.issue(list(NAMES))
    with pytest.raises(CertificateCheckError, match="does not parse"):
        crypto.check_issued(b"<html>oops</html>", issued.key_pem, NAMES)
    later = issued.not_after + dt.timedelta(days=1)
    with pytest.raises(CertificateCheckError, match="not valid now"):
        crypto.check_issued(issued.fullchain_pem, issued.key_pem, NAMES, now=later)


def test_a_bad_chain_from_the_ca_keeps_the_old_certificate_live(
        tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    """MOCK: Pebble never sends a wrong certificate, so the CA's answer is replaced here by a
    certificate for another key; everything after it (check, store, status) is real."""
    (tmp_path / "ca.pem").write_text("")
    cfg = tmp_path / "certbatch.yaml"
    cfg.write_text("acme: {directory: https://ca.invalid/dir, ca_bundle: ./ca.pem}\n"
                   "paths: {state: ./state, spool: ./spool, hooks: ./hooks}\n"
                   "defaults: {challenge: {type: dns-01, script: /bin/true}}\n"
                   f"certificates: {{site: {{domains: [{', '.join(NAMES)}]}}}}\n")
    old = ca.issue(list(NAMES), serial=0x01D)
    store = Store(tmp_path / "state")
    stored = store.save_certificate(
        "site", key_type="ec-p256", domains=NAMES, privkey_pem=old.key_pem,
        cert_pem=old.cert_pem, chain_pem=old.chain_pem, fullchain_pem=old.fullchain_pem,
        serial="1d", not_before=old.not_before, not_after=old.not_after,
        issued_at=old.not_before)
    store.save_status("site", CertStatus(staged_version=stored.version))
    wrong = ca.issue(list(NAMES))  # right names, but signed for a key certbatch never made

    monkeypatch.setattr(AcmeClient, "connect", lambda self: None)
    monkeypatch.setattr(AcmeClient, "issue", lambda self, *a, **k: IssuedChain(
        wrong.cert_pem, wrong.chain_pem, wrong.fullchain_pem))
    report = Runner(load(cfg)).renew(force=True, notify=False)

    result = report.certificates[0]
    assert result.outcome == FAILED and "does not match the private key" in (result.error or "")
    current = store.current("site")
    assert current is not None and current.serial == "1d"
    assert store.read_files(current)["privkey.pem"] == old.key_pem
    assert store.status("site").last_result == FAILED
