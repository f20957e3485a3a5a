"""dns-01 through the lexicon provider: lexicon's PowerDNS provider against a real PowerDNS
authoritative server, and a Pebble validating through that server.

One session-scoped `pdns_server` (sqlite3 backend, HTTP API with a key; tests/pdns_server.py)
serves pdns.test. (NS ns1.pdns.test. -> 127.0.0.1, the server itself) and test. (Pebble's CAA
lookups climb there). Pebble resolves through it, so its validation reads what lexicon wrote.
The end-to-end cases run the real `certbatch` command; nothing is mocked.

lexicon is optional: the cases that use it skip without it (CI installs it); the case about a
missing lexicon hides the installed one behind a module that fails to import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import dns01, live, run, write_config
from pdns_server import Pdns, find_pdns, start_pdns
from pebble_server import PebbleInstance, find_binaries, start_pebble

from certbatch.dns.provider import NotApplied, TxtRecord

HAVE_LEXICON = importlib.util.find_spec("lexicon") is not None
needs_lexicon = pytest.mark.skipif(
    not HAVE_LEXICON, reason="dns-lexicon is not installed (pip install 'certbatch[lexicon]'; "
                             "CI installs it)")
WRONG_TOKEN = "wrong-token-d3Jvbmcgd3Jvbmc"
ZONE = "pdns.test."


def _require() -> None:
    missing = [what for what, found in (
        ("pdns_server with the sqlite3 backend (apt-get install pdns-server "
         "pdns-backend-sqlite3 sqlite3)", find_pdns()),
        ("pebble (apt-get install pebble)", find_binaries())) if not found]
    if missing:
        if os.environ.get("CERTBATCH_REQUIRE_PEBBLE") == "1":
            pytest.fail(f"not installed: {', '.join(missing)}")
        pytest.skip(f"not installed: {', '.join(missing)}")


@dataclass
class PdnsSetup:
    pdns: Pdns
    pebble: PebbleInstance  # resolves through `pdns`
    env: dict[str, str]  # for certbatch: lexicon's public suffix cache in the test's folder

    def challenge(self, credentials_file: Path | None = None, **extra: Any) -> dict[str, Any]:
        """A dns-01 lexicon challenge through the PowerDNS API (inline credentials without a
        file)."""
        ch: dict[str, Any] = {
            "type": "dns-01", "provider": "lexicon", "lexicon_provider": "powerdns",
            "resolver": self.pdns.hostport, "nameserver_port": self.pdns.port,
            "propagation_timeout": "20s"}
        if credentials_file is None:
            ch["credentials"] = self.credentials()
        else:
            ch["credentials_file"] = str(credentials_file)
        return {**ch, **extra}

    def credentials(self, token: str | None = None) -> dict[str, str]:
        return {"auth_token": token or self.pdns.api_key, "pdns_server": self.pdns.api_url}

    def credentials_file(self, folder: Path, mode: int = 0o600) -> Path:
        path = folder / "powerdns.yaml"
        path.write_text("".join(f"{k}: {v}\n" for k, v in self.credentials().items()))
        path.chmod(mode)
        return path

    def txt_rrsets(self) -> list[str]:
        """The names of the TXT record sets in the zone, as the API has them."""
        zone = self.pdns.api("GET", f"/zones/{ZONE}").json()
        return [r["name"] for r in zone["rrsets"] if r["type"] == "TXT"]


@pytest.fixture(scope="session")
def pdns_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdnsSetup]:
    _require()
    pdns = start_pdns(tmp_path_factory.mktemp("pdns"), {
        ZONE: {"ns1": "127.0.0.1"}, "test.": {"ns1": "127.0.0.1"}})
    try:
        pebble = start_pebble(tmp_path_factory.mktemp("pebble-pdns"), dns_server=pdns.hostport)
        try:
            yield PdnsSetup(pdns, pebble, {
                "TLDEXTRACT_CACHE_PATH": str(tmp_path_factory.mktemp("tldextract"))})
        finally:
            pebble.stop()
    finally:
        pdns.stop()


def everything(result: Any, folder: Path) -> str:
    logs = "".join(p.read_text() for p in folder.glob("*.log"))
    return result.stdout + result.stderr + logs


@needs_lexicon
def test_apex_and_wildcard_issue_and_a_wrong_token_fails_only_its_certificate(
        tmp_path: Path, pdns_setup: PdnsSetup) -> None:
    setup = pdns_setup
    cfg = write_config(tmp_path, setup.pebble, {
        "wild": {"domains": ["w.pdns.test", "*.w.pdns.test"],
                 "challenge": setup.challenge(setup.credentials_file(tmp_path))},
        "badtoken": {"domains": ["bad.pdns.test"], "challenge": setup.challenge(
            credentials=setup.credentials(WRONG_TOKEN))},
    }, logging={"file": str(tmp_path / "certbatch.log")})
    cfg.chmod(0o600)
    result = run(["-vv", "renew", "--json"], cfg, env=setup.env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert live(tmp_path, "wild")["domains"] == ["w.pdns.test", "*.w.pdns.test"]
    assert not (tmp_path / "state" / "certs" / "badtoken" / "live").exists()
    # Both values were at one name at once (Pebble validated both), and both are gone.
    assert "2 dns-01 TXT value(s) added by lexicon: _acme-challenge.w.pdns.test." in result.stderr
    assert "propagation check: every server answers" in result.stderr
    assert setup.pdns.txt("_acme-challenge.w.pdns.test.") == set()
    assert setup.txt_rrsets() == []
    lines = [ln for ln in result.stderr.splitlines()
             if ln.startswith("certbatch: ") and "badtoken" in ln]
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith("lexicon powerdns add TXT _acme-challenge.bad.pdns.test.: HTTP 401 "
                             "Unauthorized: the provider refused the credentials"), lines
    report = {c["name"]: c for c in json.loads(result.stdout)["certificates"]}
    assert "HTTP 401" in report["badtoken"]["error"]

    check = run(["check"], cfg, env=setup.env, timeout=60)
    assert check.returncode == 0, check.stderr
    assert (f"provider lexicon (powerdns, zone (SOA lookup), credentials in "
            f"{tmp_path / 'powerdns.yaml'}, propagation check 20s") in check.stdout
    assert "credentials inline (auth_token, pdns_server)" in check.stdout
    status = run(["status"], cfg, env=setup.env, timeout=60)
    as_json = run(["status", "--json"], cfg, env=setup.env, timeout=60)
    assert status.returncode == 0 and as_json.returncode == 0
    for output in (everything(result, tmp_path), check.stdout + check.stderr,
                   status.stdout + status.stderr, as_json.stdout + as_json.stderr):
        assert setup.pdns.api_key not in output
        assert WRONG_TOKEN not in output


@needs_lexicon
def test_check_online_probes_through_lexicon(tmp_path: Path, pdns_setup: PdnsSetup) -> None:
    setup = pdns_setup
    cfg = write_config(tmp_path, setup.pebble, {
        "good": {"domains": ["probe.pdns.test", "*.probe.pdns.test"],
                 "challenge": setup.challenge(setup.credentials_file(tmp_path))},
        "bad": {"domains": ["probe2.pdns.test"],
                "challenge": setup.challenge(credentials=setup.credentials(WRONG_TOKEN))},
    })
    result = run(["check", "--online"], cfg, setup.pebble, env=setup.env, timeout=60)
    assert result.returncode == 1
    assert ("dns-01 good: probe TXT added and removed at _acme-challenge.probe.pdns.test.; "
            "seen on every authoritative server") in result.stdout
    assert ("dns-01 bad: FAILED: lexicon powerdns add TXT _acme-challenge.probe2.pdns.test.: "
            "HTTP 401 Unauthorized: the provider refused the credentials") in result.stdout
    problems = [ln for ln in result.stderr.splitlines() if ln.startswith("certbatch: problem:")]
    assert len(problems) == 1 and "bad: dns-01 probe: " in problems[0], result.stderr
    assert setup.txt_rrsets() == []
    assert setup.pdns.api_key not in result.stdout + result.stderr


@needs_lexicon
def test_two_values_at_one_name_and_only_one_removed(pdns_setup: PdnsSetup,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from certbatch.dns.lexicon import LexiconProvider

    for name, value in pdns_setup.env.items():  # lexicon's cache: not in the home folder
        monkeypatch.setenv(name, value)

    provider = LexiconProvider("powerdns", pdns_setup.credentials())
    name = "_acme-challenge.same.pdns.test."
    first, second = TxtRecord(name, ZONE, "v1"), TxtRecord(name, ZONE, "v2")
    deadline = time.monotonic() + 30
    provider.add(first, deadline)
    provider.add(second, deadline)
    try:
        assert pdns_setup.pdns.txt(name) == {"v1", "v2"}
        provider.remove(first, deadline)
        assert pdns_setup.pdns.txt(name) == {"v2"}
        provider.remove(first, deadline)  # gone already: not an error
    finally:
        provider.remove(second, deadline)
    assert pdns_setup.pdns.txt(name) == set()
    refused = LexiconProvider("powerdns", pdns_setup.credentials(WRONG_TOKEN))
    with pytest.raises(NotApplied) as err:
        refused.add(first, deadline)
    assert WRONG_TOKEN not in str(err.value) and "HTTP 401" in str(err.value)


@needs_lexicon
def test_check_lists_lexicon_setup_problems_and_readable_credentials(
        tmp_path: Path, pdns_setup: PdnsSetup) -> None:
    setup = pdns_setup
    shared = setup.credentials_file(tmp_path, mode=0o640)
    cfg = write_config(tmp_path, setup.pebble, {
        "shared": {"domains": ["s.pdns.test"], "challenge": setup.challenge(shared)},
        "nofile": {"domains": ["n.pdns.test"],
                   "challenge": setup.challenge(tmp_path / "missing.yaml")},
        "typo": {"domains": ["t.pdns.test"],
                 "challenge": setup.challenge(shared, lexicon_provider="powerdsn")},
    })
    cfg.chmod(0o600)
    result = run(["check"], cfg, env=setup.env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"certbatch: warning: {shared} holds a secret and is readable by group or others (mode "
        f"0640): chmod 600 it",
        f"certbatch: problem: nofile: credentials_file {tmp_path / 'missing.yaml'}: no such file "
        f"or directory",
        "certbatch: problem: typo: lexicon has no provider 'powerdsn' (did you mean "
        "'powerdns'?) (lexicon_provider)"], result.stderr


def test_without_lexicon_only_its_certificates_fail(tmp_path: Path, pebble: PebbleInstance
                                                   ) -> None:
    """lexicon hidden (a module of that name that fails to import comes first on the path):
    the lexicon certificate fails with one line naming the extra, the other one renews, and
    `check` lists it."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "lexicon.py").write_text("raise ImportError('hidden by the test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    cfg = write_config(tmp_path, pebble, {
        "lx": {"domains": ["lx.example.com"], "challenge": {
            "type": "dns-01", "provider": "lexicon", "lexicon_provider": "cloudflare",
            "credentials_file": str(tmp_path / "cloudflare.yaml")}},
        "other": {"domains": ["other.example.com"], "challenge": dns01()},
    })
    missing = ("provider lexicon needs dns-lexicon, which is not installed: "
               "pip install 'certbatch[lexicon]'")
    result = run(["renew"], cfg, pebble, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert live(tmp_path, "other")["domains"] == ["other.example.com"]
    assert [ln for ln in result.stderr.splitlines() if "lx" in ln] == [
        f"certbatch: lx: failed: {missing}"], result.stderr
    check = run(["check"], cfg, env=env, timeout=60)
    assert check.returncode == 1
    assert f"    challenge: CANNOT work: {missing}" in check.stdout
    assert f"certbatch: problem: lx: {missing}" in check.stderr


@needs_lexicon
def test_errors_never_carry_a_credential() -> None:
    """Whatever a provider raises, the line certbatch makes of it has no credential in it."""
    import requests

    from certbatch.dns.lexicon import LexiconProvider

    provider = LexiconProvider("powerdns", {"auth_token": WRONG_TOKEN, "region": "eu"})
    record = TxtRecord("_acme-challenge.x.pdns.test.", ZONE, "v")
    leaky = RuntimeError(f"bad answer for https://api.example/zones?key=abc123xyz with token "
                         f"{WRONG_TOKEN} in region eu")
    why, applied = provider._explain(leaky, record)
    assert why == ("RuntimeError: bad answer for https://api.example/zones?[...] with token "
                   "[redacted] in region eu") and applied
    refused = requests.ConnectionError(
        f"HTTPSConnectionPool(host='api.example', port=443): Max retries exceeded with url: "
        f"/v1?token={WRONG_TOKEN} (Caused by NewConnectionError(': Failed to establish a new "
        f"connection: [Errno 111] Connection refused'))")
    assert provider._explain(refused, record) == (
        "cannot connect to the provider's API: Connection refused", False)
