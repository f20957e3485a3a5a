"""ACME profiles (issue 11): `acme.profile` and `certificates.<name>.profile`.

Pebble 2.4 has no profiles, so the real `certbatch` command talks to Pebble through
`fault_proxy.FaultProxy` with `proxy.profiles` set: the proxy adds exactly what Pebble 2.4 lacks,
`meta.profiles` in the directory, and records every new-order JWS payload (to see the `profile`
field sent). Everything else is the real CA, which ignores the field.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import live, run, write_config
from fault_proxy import (  # proxy_fixture: the `proxy` fixture
    NEW_ORDER,
    FaultProxy,
    proxy_fixture,  # noqa: F401
)
from pebble_server import PebbleInstance
from test_cli import check_schema

from certbatch import config, renewal
from certbatch.config import CertificateSettings, ChallengeSettings
from certbatch.errors import ConfigError
from certbatch.store import CertStatus, StoredCert

REPO = Path(__file__).resolve().parent.parent
OFFERED = {"classic": "The same profile you know and love",
           "shortlived": "A short-lived certificate (6 days)",
           "tlsserver": "Only what TLS servers need (45 days)"}
UTC = dt.timezone.utc


def domain(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}.profiles.example.com"


def proxied_config(folder: Path, pebble: PebbleInstance, proxy: FaultProxy,
                   certificates: dict[str, Any], profile: str | None = None) -> Path:
    acme: dict[str, Any] = {"directory": proxy.directory_url}
    if profile is not None:
        acme["profile"] = profile
    return write_config(folder, pebble, certificates, acme=acme)


def order_profiles(proxy: FaultProxy, name: str) -> list[Any]:
    """The `profile` of each order for `name` the CA created ('-': the field was absent).
    Only created ones: Pebble refuses a few nonces at random, and the re-signed request of a
    badNonce retry would count twice."""
    return [r.payload.get("profile", "-") for r in proxy.matching("POST", NEW_ORDER)
            if name in r.identifiers and r.status == 201]


def report(result: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.stdout)
    check_schema(data, json.loads((REPO / "docs" / "report.schema.json").read_text()))
    return data


# -- end to end ----------------------------------------------------------------------------------

def test_profiles_sent_refused_and_changed(tmp_path: Path, pebble: PebbleInstance,
                                           proxy: FaultProxy) -> None:
    proxy.profiles = dict(OFFERED)
    d = {n: domain(n) for n in ("www", "api", "bad", "plain")}
    certs: dict[str, Any] = {
        "www": {"domains": [d["www"]]},  # acme.profile
        "api": {"domains": [d["api"]], "profile": "shortlived"},
        "bad": {"domains": [d["bad"]], "profile": "tlsservr"},
        "plain": {"domains": [d["plain"]]},
    }
    cfg = proxied_config(tmp_path, pebble, proxy, certs, profile="tlsserver")
    first = run(["renew", "--json"], cfg, pebble)
    assert first.returncode == 1, first.stderr
    # the unknown profile fails that certificate only, before any order, with the offered list
    assert ("certbatch: bad: failed: the CA offers no profile 'tlsservr' (offered: classic, "
            "shortlived, tlsserver)") in first.stderr.splitlines()
    assert order_profiles(proxy, d["bad"]) == []
    assert order_profiles(proxy, d["www"]) == ["tlsserver"]
    assert order_profiles(proxy, d["api"]) == ["shortlived"]
    assert order_profiles(proxy, d["plain"]) == ["tlsserver"]
    data = report(first)
    by_name = {c["name"]: c for c in data["certificates"]}
    assert {n: (c["outcome"], c["profile"]) for n, c in by_name.items()} == {
        "www": ("issued", "tlsserver"), "api": ("issued", "shortlived"),
        "bad": ("failed", "tlsservr"), "plain": ("issued", "tlsserver")}
    # each version records the profile it was ordered with
    assert live(tmp_path, "www")["profile"] == "tlsserver"
    assert live(tmp_path, "api")["profile"] == "shortlived"

    # status and status --json show the configured profile
    status = run(["status"], cfg, pebble)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].split()[:6] == ["NAME", "DOMAINS", "EXPIRES", "DAYS", "DUE", "PROFILE"]
    row = {line.split()[0]: line.split() for line in lines[1:5]}
    assert row["api"][5] == "shortlived" and row["www"][5] == "tlsserver"
    rows = {r["name"]: r for r in json.loads(run(["status", "--json"], cfg, pebble).stdout)
            ["certificates"]}
    assert rows["www"]["profile"] == "tlsserver" and rows["bad"]["profile"] == "tlsservr"

    # a changed profile reissues (the dry run says why), and only that certificate
    certs["www"]["profile"] = "classic"
    del certs["bad"]
    cfg = proxied_config(tmp_path, pebble, proxy, certs, profile="tlsserver")
    plan = run(["renew", "--dry-run"], cfg, pebble)
    assert plan.returncode == 0, plan.stderr
    decisions = {line.split()[0]: line.split(None, 2)[1:] for line in plan.stdout.splitlines()}
    assert decisions["www"] == ["reissue", "profile changed (tlsserver -> classic)"]
    assert decisions["api"][0] == "skip" and decisions["plain"][0] == "skip"
    second = run(["renew", "--json"], cfg, pebble)
    assert second.returncode == 0, second.stderr
    outcomes = {c["name"]: (c["decision"], c["outcome"]) for c in report(second)
                ["certificates"]}
    assert outcomes == {"www": ("reissue", "renewed"), "api": ("skip", "not-due"),
                        "plain": ("skip", "not-due")}
    assert order_profiles(proxy, d["www"]) == ["tlsserver", "classic"]
    assert live(tmp_path, "www")["profile"] == "classic"


def test_no_profile_configured_sends_none_and_a_ca_without_profiles(
        tmp_path: Path, pebble: PebbleInstance, proxy: FaultProxy) -> None:
    # Pebble 2.4 as it is: no meta.profiles. No profile configured: none sent, all issued.
    name = domain("old")
    cfg = proxied_config(tmp_path, pebble, proxy, {"old": {"domains": [name]}})
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 0, result.stderr
    assert order_profiles(proxy, name) == ["-"]
    assert live(tmp_path, "old")["profile"] is None
    # A certificate stored before profiles were recorded: meta.json without the key.
    meta_path = tmp_path / "state" / "certs" / "old" / "live" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["profile"]
    meta_path.write_text(json.dumps(meta))
    plan = run(["renew", "--dry-run"], cfg, pebble)
    assert plan.stdout.split()[1] == "skip", plan.stdout
    # configuring one when the CA offers none: that certificate fails, nothing is ordered
    cfg = proxied_config(tmp_path, pebble, proxy, {"old": {"domains": [name]}},
                         profile="classic")
    plan = run(["renew", "--dry-run"], cfg, pebble)
    assert plan.stdout.split(None, 2)[1:] == ["reissue",
                                              "profile changed (CA default -> classic)\n"]
    failed = run(["renew"], cfg, pebble)
    assert failed.returncode == 1
    assert "certbatch: old: failed: the CA offers no profile 'classic' (offered: none)" in \
        failed.stderr.splitlines()
    assert order_profiles(proxy, name) == ["-"]


def test_check_online_lists_profiles_and_fails_for_an_unknown_one(
        tmp_path: Path, pebble: PebbleInstance, proxy: FaultProxy) -> None:
    proxy.profiles = dict(OFFERED)
    certs: dict[str, Any] = {"www": {"domains": [domain("www")]}}
    cfg = proxied_config(tmp_path, pebble, proxy, certs, profile="tlsserver")
    ok = run(["check", "--online"], cfg, pebble)
    assert ok.returncode == 0, ok.stderr
    assert "acme profiles: 3" in ok.stdout.splitlines()
    assert "  tlsserver: Only what TLS servers need (45 days)" in ok.stdout.splitlines()
    assert "profile tlsserver" in ok.stdout

    certs["api"] = {"domains": [domain("api")], "profile": "shortlivd"}
    cfg = proxied_config(tmp_path, pebble, proxy, certs, profile="tlsserver")
    bad = run(["check", "--online"], cfg, pebble)
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        "certbatch: problem: api: profile: the CA offers no profile 'shortlivd' (offered: "
        "classic, shortlived, tlsserver)"]

    proxy.profiles = None  # Pebble as it is
    none = run(["check", "--online"], cfg, pebble)
    assert none.returncode == 1
    assert "acme profiles: none offered (the CA's default applies)" in none.stdout
    assert len(none.stderr.splitlines()) == 2 and "(offered: none)" in none.stderr


# -- config and the pure decision ----------------------------------------------------------------

def load(tmp_path: Path, text: str) -> config.Settings:
    path = tmp_path / "certbatch.yaml"
    path.write_text(text)
    return config.load(path)


BASE = """\
acme:
  directory: https://ca.example/dir
{acme}
defaults:
  challenge: {{type: http-01, standalone: {{}}}}
certificates:
  www:
    domains: [www.example.com]
{cert}
"""


def test_config_profiles(tmp_path: Path) -> None:
    s = load(tmp_path, BASE.format(acme="  profile: tlsserver", cert=""))
    assert s.acme.profile == "tlsserver" and s.certificates["www"].profile == "tlsserver"
    s = load(tmp_path, BASE.format(acme="  profile: tlsserver", cert="    profile: classic"))
    assert s.certificates["www"].profile == "classic"
    s = load(tmp_path, BASE.format(acme="", cert=""))
    assert s.acme.profile is None and s.certificates["www"].profile is None
    s = load(tmp_path, BASE.format(acme="  profile:", cert=""))  # null means absent
    assert s.certificates["www"].profile is None


@pytest.mark.parametrize(("acme", "cert", "key", "problem"), [
    ("  profile: 5", "", "acme.profile", "expected a string, got an integer (5)"),
    ("  profile: ''", "", "acme.profile", "must not be empty"),
    ("", "    profile: [classic]", "certificates.www.profile", "expected a string, got a list"),
    ("", "    profile: 'short lived'", "certificates.www.profile",
     "a profile name has no whitespace or control characters, got 'short lived'"),
    ("", "    profil: classic", "certificates.www.profil", "unknown key (did you mean 'profile'?)"),
])
def test_config_profile_errors(tmp_path: Path, acme: str, cert: str, key: str,
                               problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, BASE.format(acme=acme, cert=cert))
    assert str(err.value).startswith(f"{tmp_path / 'certbatch.yaml'}: {key}: {problem}")
    assert "\n" not in str(err.value)


def test_decision_profile_rules() -> None:
    now = dt.datetime(2026, 11, 29, tzinfo=UTC)
    stored = StoredCert(name="www", version="v1", folder=Path("/nonexistent"),
                        domains=("www.example.com",), key_type="ec-p256", serial="01",
                        not_before=now - dt.timedelta(days=1),
                        not_after=now + dt.timedelta(days=89), issued_at=now)
    status = CertStatus(staged_version="v1")

    def decide(configured: str | None, recorded: str | None) -> renewal.Decision:
        cert = CertificateSettings(name="www", domains=("www.example.com",), key="ec-p256",
                                   challenge=ChallengeSettings(type="dns-01"), profile=configured)
        return renewal.decide(cert, StoredCert(**{**stored.__dict__, "profile": recorded}),
                              status, now, None)

    assert decide(None, None).action == renewal.SKIP
    assert decide(None, "shortlived").action == renewal.SKIP  # no opinion: keep it
    assert decide("classic", "classic").action == renewal.SKIP
    changed = decide("shortlived", "classic")
    assert (changed.action, changed.reason) == (renewal.REISSUE,
                                                "profile changed (classic -> shortlived)")
    assert decide("classic", None).reason == "profile changed (CA default -> classic)"
