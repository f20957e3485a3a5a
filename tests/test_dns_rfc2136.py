"""dns-01 through the rfc2136 provider, against real BIND 9 servers and Pebble validating there.

One session-scoped `named` on 127.0.0.1 (tests/dns_servers.py) serves three zones with a TSIG
key: dns1.test, dns2.test (target of a CNAME from dns1.test) and slow.test. A second named,
reached at 127.0.0.2 on the same port (through a Relay), is the second authoritative server of
slow.test; it gets each TXT change
only 3 s late (ZoneMirror copies them). Pebble resolves through the first named (CNAMEs
followed: it allows recursion for loopback clients), and a second Pebble through the second one,
so its validation fails for a challenge answered before that server has the record.

The end-to-end cases run the real `certbatch` command; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import live, run, write_config
from dns_servers import (
    Named,
    Relay,
    TsigKey,
    ZoneMirror,
    find_named,
    start_named,
    zone_file,
)
from pebble_server import PebbleInstance, find_binaries, start_pebble

from certbatch.challenges import ChallengeResponse, DnsScriptSolver
from certbatch.config import ChallengeSettings, Rfc2136Settings
from certbatch.dns.lookup import Lookup
from certbatch.dns.propagation import wait_until_visible
from certbatch.dns.provider import TxtRecord
from certbatch.dns.solver import DnsProviderSolver
from certbatch.errors import ChallengeError, DeadlineExceeded

MIRROR_DELAY = 3.0  # seconds the second server of slow.test lags behind
WRONG_SECRET = "d3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmc="


def _require() -> None:
    missing = [what for what, found in (("named (apt-get install bind9)", find_named()),
                                        ("pebble (apt-get install pebble)", find_binaries()))
               if not found]
    if missing:
        if os.environ.get("CERTBATCH_REQUIRE_PEBBLE") == "1":
            pytest.fail(f"not installed: {', '.join(missing)}")
        pytest.skip(f"not installed: {', '.join(missing)}")


@dataclass
class DnsSetup:
    key: TsigKey
    port: int
    main: Named  # 127.0.0.1: dns1.test, dns2.test, slow.test (the primary updates go to)
    second: Named  # 127.0.0.2: slow.test only, updated late by a ZoneMirror
    pebble: PebbleInstance  # resolves through `main`

    def challenge(self, secret_file: Path | None = None, **extra: Any) -> dict[str, Any]:
        """A dns-01 rfc2136 challenge for these servers (the inline secret without a file)."""
        ch: dict[str, Any] = {
            "type": "dns-01", "provider": "rfc2136", "server": self.main.hostport,
            "tsig_key": self.key.name, "resolver": self.main.hostport,
            "nameserver_port": self.port, "propagation_timeout": "20s"}
        if secret_file is None:
            ch["tsig_secret"] = self.key.secret
        else:
            ch["tsig_secret_file"] = str(secret_file)
        return {**ch, **extra}


@pytest.fixture(scope="session")
def dns_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsSetup]:
    _require()
    key = TsigKey.generate()
    slow = zone_file("slow.test.", {"ns1": "127.0.0.1", "ns2": "127.0.0.2"})
    # the port, free on 127.0.0.2 too, is the relay's there
    main = start_named(tmp_path_factory.mktemp("named-main"), "127.0.0.1", None, {
        "dns1.test.": zone_file("dns1.test.", {"ns1": "127.0.0.1"},
                                "_acme-challenge.cname CNAME target.dns2.test.\n"
                                "_acme-challenge.loop CNAME _acme-challenge.loop.dns1.test."),
        "dns2.test.": zone_file("dns2.test.", {"ns1": "127.0.0.1"}),
        "slow.test.": slow,
        # Pebble's CAA lookups climb to "test.": answered here, never sent to the internet.
        "test.": zone_file("test.", {"ns1": "127.0.0.1"}),
    }, key, recursion=True, free_on=("127.0.0.1", "127.0.0.2"))
    port = main.port
    second = relay = pebble = None
    try:
        second = start_named(tmp_path_factory.mktemp("named-second"), "127.0.0.1", None,
                             {"slow.test.": slow}, key)
        relay = Relay(("127.0.0.2", port), (second.address, second.port))
        pebble = start_pebble(tmp_path_factory.mktemp("pebble-dns"), dns_server=main.hostport)
        yield DnsSetup(key, port, main, second, pebble)
    finally:
        for server in (pebble, relay, second, main):
            if server is not None:
                server.stop()


@pytest.fixture(scope="session")
def pebble_second(dns_setup: DnsSetup, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[PebbleInstance]:
    """A Pebble that validates through the late second server of slow.test."""
    inst = start_pebble(tmp_path_factory.mktemp("pebble-dns2"),
                        dns_server=f"127.0.0.2:{dns_setup.port}")
    try:
        yield inst
    finally:
        inst.stop()


def secret_file(folder: Path, secret: str, mode: int = 0o600) -> Path:
    path = folder / "tsig.secret"
    path.write_text(f'key "certbatch." {{\n\talgorithm hmac-sha256;\n\tsecret "{secret}";\n}};\n')
    path.chmod(mode)
    return path


def everything(result: Any, folder: Path) -> str:
    logs = "".join(p.read_text() for p in folder.glob("*.log"))
    return result.stdout + result.stderr + logs


# -- end to end ------------------------------------------------------------------------------------

def test_apex_and_wildcard_issue_and_the_records_are_gone(tmp_path: Path,
                                                          dns_setup: DnsSetup) -> None:
    setup = dns_setup
    cfg = write_config(tmp_path, setup.pebble, {
        "wild": {"domains": ["w.dns1.test", "*.w.dns1.test"]}},
        defaults={"challenge": setup.challenge(secret_file(tmp_path, setup.key.secret))},
        logging={"file": str(tmp_path / "certbatch.log")})
    result = run(["-vv", "renew"], cfg, timeout=120)
    assert result.returncode == 0, result.stderr
    assert live(tmp_path, "wild")["domains"] == ["w.dns1.test", "*.w.dns1.test"]
    # Both values were at one name at once (Pebble validated both), and both are gone.
    assert "2 dns-01 TXT value(s) added by rfc2136: _acme-challenge.w.dns1.test." in result.stderr
    assert "propagation check: every server answers" in result.stderr
    assert setup.main.txt("_acme-challenge.w.dns1.test.") == set()
    assert setup.key.secret not in everything(result, tmp_path)


def test_one_broken_dns_setup_fails_only_its_certificate(tmp_path: Path,
                                                         dns_setup: DnsSetup) -> None:
    """Wrong TSIG secret, missing secret file, a dns script that is not executable: each fails
    its own certificate with one line; the good one renews; check lists them; status works."""
    setup = dns_setup
    noexec = tmp_path / "dns.sh"
    noexec.write_text("#!/bin/sh\nexit 0\n")
    cfg = write_config(tmp_path, setup.pebble, {
        "good": {"domains": ["good.dns1.test"], "challenge": setup.challenge()},
        "badkey": {"domains": ["badkey.dns1.test"],
                   "challenge": setup.challenge(tsig_secret=WRONG_SECRET)},
        "nofile": {"domains": ["nofile.dns1.test"],
                   "challenge": setup.challenge(tmp_path / "missing.secret")},
        "noexec": {"domains": ["noexec.dns1.test"],
                   "challenge": {"type": "dns-01", "script": str(noexec)}},
    }, logging={"file": str(tmp_path / "certbatch.log")})
    result = run(["-v", "renew", "--json"], cfg, timeout=120)
    assert result.returncode == 1, result.stderr
    assert live(tmp_path, "good")["domains"] == ["good.dns1.test"]
    for name in ("badkey", "nofile", "noexec"):
        assert not (tmp_path / "state" / "certs" / name / "live").exists()
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("certbatch: ")]
    assert any("badkey" in ln and "the TSIG signature was rejected: wrong tsig_secret for key "
               "certbatch." in ln for ln in lines), result.stderr
    assert any("nofile" in ln and f"tsig_secret_file {tmp_path / 'missing.secret'}: no such "
               "file" in ln for ln in lines), result.stderr
    assert any("noexec" in ln and "not executable" in ln for ln in lines), result.stderr
    assert WRONG_SECRET not in everything(result, tmp_path)
    assert setup.key.secret not in everything(result, tmp_path)
    report = {c["name"]: c for c in json.loads(result.stdout)["certificates"]}
    assert "TSIG signature was rejected" in report["badkey"]["error"]

    check = run(["check"], cfg, timeout=60)
    assert check.returncode == 1
    problems = [ln for ln in check.stderr.splitlines() if ln.startswith("certbatch: problem:")]
    assert sorted(ln.split()[2] for ln in problems) == ["noexec:", "nofile:"], check.stderr
    assert "    challenge: CANNOT work: dns script" in check.stdout
    status = run(["status"], cfg, timeout=60)
    assert status.returncode == 0 and "good" in status.stdout and "noexec" in status.stdout
    as_json = run(["status", "--json"], cfg, timeout=60)
    assert as_json.returncode == 0 and '"badkey"' in as_json.stdout
    for output in (check, status, as_json):
        assert setup.key.secret not in output.stdout + output.stderr
        assert WRONG_SECRET not in output.stdout + output.stderr


def test_cname_is_followed_into_the_other_zone(tmp_path: Path, dns_setup: DnsSetup) -> None:
    setup = dns_setup
    cfg = write_config(tmp_path, setup.pebble, {"cname": {"domains": ["cname.dns1.test"]}},
                       defaults={"challenge": setup.challenge()})
    result = run(["-vv", "renew"], cfg, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TXT target.dns2.test. added in zone dns2.test." in result.stderr
    assert setup.main.txt("target.dns2.test.") == set()  # removed again


def test_propagation_check_waits_for_the_late_server(tmp_path: Path, dns_setup: DnsSetup,
                                                     pebble_second: PebbleInstance) -> None:
    """Pebble asks only the second server. With the check the challenge is answered once that
    server has the record (it issues); with `propagation: none` at once (Pebble finds nothing)."""
    setup = dns_setup
    cfg = write_config(tmp_path, pebble_second, {
        "checked": {"domains": ["checked.slow.test"], "challenge": setup.challenge()},
        "unchecked": {"domains": ["unchecked.slow.test"],
                      "challenge": setup.challenge(propagation="none")},
    })
    with ZoneMirror(setup.main, setup.second, "slow.test.", MIRROR_DELAY) as mirror:
        start = time.monotonic()
        result = run(["renew"], cfg, timeout=120)
        took = time.monotonic() - start
    assert not mirror.errors, mirror.errors
    assert result.returncode == 1, result.stderr
    assert live(tmp_path, "checked")["domains"] == ["checked.slow.test"]
    assert not (tmp_path / "state" / "certs" / "unchecked" / "live").exists()
    failed = [ln for ln in result.stderr.splitlines() if "unchecked" in ln]
    assert failed and "_acme-challenge.unchecked.slow.test" in failed[0], result.stderr
    assert took >= MIRROR_DELAY
    reached = [name for _, name, values in mirror.applied if values]
    assert "_acme-challenge.checked.slow.test." in reached


# -- pieces, against the same servers --------------------------------------------------------------

def settings(setup: DnsSetup, **extra: Any) -> ChallengeSettings:
    return ChallengeSettings(
        type="dns-01", provider="rfc2136",
        rfc2136=Rfc2136Settings(("127.0.0.1", setup.port), setup.key.name, setup.key.secret,
                                zone=extra.pop("zone", None)),
        resolver=("127.0.0.1", setup.port), nameserver_port=setup.port,
        propagation_timeout=extra.pop("timeout", 10.0), **extra)


def response(domain: str, value: str) -> ChallengeResponse:
    return ChallengeResponse("dns-01", domain, "tok", "tok.thumb", value)


def test_two_certificates_at_one_name_never_clobber_each_other(dns_setup: DnsSetup) -> None:
    a = DnsProviderSolver(settings(dns_setup), "a")
    b = DnsProviderSolver(settings(dns_setup), "b")
    deadline = time.monotonic() + 30
    a.prepare([response("same.dns1.test", "va1"), response("same.dns1.test", "va2")], deadline)
    b.prepare([response("same.dns1.test", "vb")], deadline)
    assert dns_setup.main.txt("_acme-challenge.same.dns1.test.") == {"va1", "va2", "vb"}
    a.cleanup()
    assert dns_setup.main.txt("_acme-challenge.same.dns1.test.") == {"vb"}
    b.cleanup()
    assert dns_setup.main.txt("_acme-challenge.same.dns1.test.") == set()


def test_propagation_timeout_names_the_server_that_lacks_the_value(dns_setup: DnsSetup) -> None:
    """slow.test's second server never gets the value (no mirror running)."""
    lookup = Lookup(("127.0.0.1", dns_setup.port), dns_setup.port)
    record = TxtRecord("_acme-challenge.never.slow.test.", "slow.test.", "v")
    dns_setup.main.set_txt("slow.test.", record.name, {"v"})
    try:
        start = time.monotonic()
        with pytest.raises(ChallengeError) as err:
            wait_until_visible(lookup, [record], 1.5, start + 30, "t")
        assert 1.5 <= time.monotonic() - start < 5
        assert str(err.value) == ("propagation check gave up after 1.5 s: ns2.slow.test. "
                                  "(127.0.0.2) does not answer the new TXT value at "
                                  "_acme-challenge.never.slow.test.: has no TXT record there yet")
        with pytest.raises(DeadlineExceeded, match="deadline exceeded during the propagation"):
            wait_until_visible(lookup, [record], 60, time.monotonic() + 1.2, "t")
    finally:
        dns_setup.main.set_txt("slow.test.", record.name, set())


def test_cname_loop_and_zone_mismatch_are_one_line_errors(dns_setup: DnsSetup) -> None:
    deadline = time.monotonic() + 30
    with pytest.raises(ChallengeError, match="CNAME chain from _acme-challenge.loop.dns1.test. "
                                             "loops"):
        DnsProviderSolver(settings(dns_setup), "c").prepare(
            [response("loop.dns1.test", "v")], deadline)
    solver = DnsProviderSolver(settings(dns_setup, zone="dns1.test."), "c")
    with pytest.raises(ChallengeError, match=r"target.dns2.test. is not in zone dns1.test."):
        solver.prepare([response("cname.dns1.test", "v")], deadline)
    solver.cleanup()  # nothing was added: nothing to remove, no error
    assert solver.cleanup_problems == []


def test_check_online_probes_each_certificate(tmp_path: Path, dns_setup: DnsSetup) -> None:
    setup = dns_setup
    cfg = write_config(tmp_path, setup.pebble, {
        "good": {"domains": ["probe.dns1.test", "*.probe.dns1.test", "cname.dns1.test"],
                 "challenge": setup.challenge()},
        "badkey": {"domains": ["probe2.dns1.test"],
                   "challenge": setup.challenge(tsig_secret=WRONG_SECRET)},
    })
    result = run(["check", "--online"], cfg, setup.pebble, timeout=60)
    assert result.returncode == 1
    assert ("dns-01 good: probe TXT added and removed at _acme-challenge.probe.dns1.test., "
            "target.dns2.test.; seen on every authoritative server") in result.stdout
    assert "dns-01 badkey: FAILED: rfc2136 add TXT _acme-challenge.probe2.dns1.test." \
        in result.stdout
    problems = [ln for ln in result.stderr.splitlines() if ln.startswith("certbatch: problem:")]
    assert len(problems) == 1 and "badkey: dns-01 probe: " in problems[0]
    assert setup.main.txt("_acme-challenge.probe.dns1.test.") == set()
    assert setup.main.txt("target.dns2.test.") == set()


def test_check_warns_about_secrets_others_can_read(tmp_path: Path, dns_setup: DnsSetup) -> None:
    setup = dns_setup
    shared = secret_file(tmp_path, setup.key.secret, mode=0o640)
    cfg = write_config(tmp_path, setup.pebble, {
        "file": {"domains": ["f.dns1.test"], "challenge": setup.challenge(shared)},
        "inline": {"domains": ["i.dns1.test"], "challenge": setup.challenge()},
    })
    cfg.chmod(0o644)
    result = run(["check"], cfg, timeout=60)
    assert result.returncode == 0, result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("certbatch: warning:")]
    assert warnings == [
        f"certbatch: warning: {cfg} holds a secret and is readable by group or others (mode "
        f"0644): chmod 600 it",
        f"certbatch: warning: {shared} holds a secret and is readable by group or others (mode "
        f"0640): chmod 600 it"]
    assert setup.key.secret not in result.stdout + result.stderr
    cfg.chmod(0o600)
    shared.chmod(0o600)
    quiet = run(["check"], cfg, timeout=60)
    assert quiet.returncode == 0 and "warning" not in quiet.stderr


def test_propagation_check_serves_a_dns_script_too(tmp_path: Path, dns_setup: DnsSetup) -> None:
    """A dns script (dnspython's dynamic update; nsupdate is not installed here) with
    `propagation: check`: prepare() returns only once the late second server has the value."""
    setup = dns_setup
    script = tmp_path / "update.py"
    script.write_text(f"""#!{sys.executable}
import sys
import dns.query, dns.tsig, dns.update
action, _domain, name, value = sys.argv[1:5]
update = dns.update.UpdateMessage("slow.test.")
(update.add if action == "add" else update.delete)(name, *([1] if action == "add" else []),
                                                   "TXT", f'"{{value}}"')
update.use_tsig(dns.tsig.Key({setup.key.name!r}, {setup.key.secret!r}, dns.tsig.HMAC_SHA256))
sys.exit(dns.query.tcp(update, {setup.main.address!r}, port={setup.port}, timeout=5).rcode())
""")
    script.chmod(0o700)
    ch = ChallengeSettings(type="dns-01", script=script, propagation="check",
                           propagation_timeout=20, resolver=("127.0.0.1", setup.port),
                           nameserver_port=setup.port)
    solver = DnsScriptSolver(script, "s", challenge=ch)
    with ZoneMirror(setup.main, setup.second, "slow.test.", MIRROR_DELAY) as mirror:
        start = time.monotonic()
        try:
            solver.prepare([response("script.slow.test", "sv")], start + 60)
            took = time.monotonic() - start
            assert setup.second.txt("_acme-challenge.script.slow.test.") == {"sv"}
        finally:
            solver.cleanup()
    assert not mirror.errors, mirror.errors
    assert took >= MIRROR_DELAY
    assert setup.main.txt("_acme-challenge.script.slow.test.") == set()


def test_inline_secrets_are_redacted_from_log_lines(tmp_path: Path) -> None:
    """certbatch never logs a secret itself; the filter also catches one a library would log."""
    import logging

    from certbatch import config
    from certbatch.cli import _Redact
    from certbatch.dns.secrets import inline_secrets

    path = tmp_path / "certbatch.yaml"
    path.write_text(f"""
acme: {{directory: "https://ca.example/dir"}}
certificates:
  a: {{domains: [a.example.com], challenge: {{type: dns-01, provider: rfc2136,
      server: 192.0.2.1, tsig_key: k, tsig_secret: "{WRONG_SECRET}"}}}}
""")
    secrets = inline_secrets(config.load(path))
    assert secrets == [WRONG_SECRET]
    record = logging.LogRecord("acme", logging.DEBUG, __file__, 1, "sent %s", (WRONG_SECRET,),
                               None)
    _Redact(secrets).filter(record)
    assert record.getMessage() == "sent [redacted]"


def test_secret_files_plain_or_bind_clause_and_never_quoted(tmp_path: Path) -> None:
    from certbatch.dns.rfc2136 import read_secret

    plain = tmp_path / "plain"
    plain.write_text(f"  {WRONG_SECRET}\n")
    assert read_secret(plain) == WRONG_SECRET
    assert read_secret(secret_file(tmp_path, WRONG_SECRET)) == WRONG_SECRET  # tsig-keygen's
    bad = tmp_path / "bad"
    bad.write_text("hunter2 is my password\n")
    with pytest.raises(ChallengeError) as err:
        read_secret(bad)
    assert str(err.value) == (f"tsig_secret_file {bad} does not hold a base64 secret (nor a "
                              f"BIND key clause with one)")
    with pytest.raises(ChallengeError, match=r"tsig_secret_file .*: is a directory"):
        read_secret(tmp_path)


def test_a_missing_webroot_is_a_check_problem_not_a_config_error(tmp_path: Path) -> None:
    """Before, a missing webroot made the whole config invalid (exit 2, no status)."""
    from types import SimpleNamespace

    (tmp_path / "ca.pem").write_text("")
    ca = SimpleNamespace(directory_url="https://127.0.0.1:9/dir", ca_bundle=tmp_path / "ca.pem")
    cfg = write_config(tmp_path, ca, {
        "web": {"domains": ["web.example.com"],
                "challenge": {"type": "http-01", "webroot": str(tmp_path / "www")}},
        "other": {"domains": ["other.example.com"],
                  "challenge": {"type": "http-01", "standalone": {}}}})
    check = run(["check"], cfg, timeout=60)
    assert check.returncode == 1
    assert check.stderr.splitlines() == [
        f"certbatch: problem: web: webroot {tmp_path / 'www'} does not exist"]
    status = run(["status"], cfg, timeout=60)
    assert status.returncode == 0, status.stderr
