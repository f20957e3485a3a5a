"""dns-01 through the acme-dns provider, against a STAND-IN for acme-dns and Pebble validating
through it.

acme-dns has no Debian package: tests/acmedns_standin.py implements its documented REST API
(/register, /update with X-Api-User / X-Api-Key, the last 2 TXT values kept per account) and
serves the records over DNS with dnspython on 127.0.0.1, authoritative for `test.`. It also
answers the `_acme-challenge` CNAMEs the test adds, as the domain's owner would create them
after `certbatch acme-dns register`. Pebble resolves through it. The end-to-end case runs the
real `certbatch` command.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from acmedns_standin import AcmeDnsStandIn
from cli_helpers import live, run, write_config
from pebble_server import PebbleInstance, find_binaries, start_pebble

from certbatch.dns.acmedns import AcmeDnsError, AcmeDnsProvider, register
from certbatch.dns.provider import NotApplied, TxtRecord
from certbatch.errors import UsageError

OTHER_ENTRY = {"username": "u", "password": "kept-password", "subdomain": "s",
               "fulldomain": "s.auth.example.org", "allowfrom": []}


@dataclass
class AcmeDnsSetup:
    standin: AcmeDnsStandIn
    pebble: PebbleInstance  # resolves through the stand-in

    def challenge(self, accounts_file: Path) -> dict[str, Any]:
        return {"type": "dns-01", "provider": "acme-dns", "api": self.standin.api_url,
                "accounts_file": str(accounts_file), "resolver": self.standin.hostport,
                "nameserver_port": self.standin.port, "propagation_timeout": "20s"}

    def register(self, accounts_file: Path, *domains: str) -> Any:
        """`certbatch acme-dns register`, then the CNAMEs it printed created (as the owner
        of the domains would)."""
        result = run(["acme-dns", "register", *domains, "--api", self.standin.api_url,
                      "--accounts-file", str(accounts_file)], None, timeout=60)
        assert result.returncode == 0, result.stderr
        for line in result.stdout.splitlines():
            if " CNAME " in line:
                name, _, target = line.split()
                self.standin.cname(name, target)
        return result


@pytest.fixture(scope="session")
def acmedns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeDnsSetup]:
    if not find_binaries():
        if os.environ.get("CERTBATCH_REQUIRE_PEBBLE") == "1":
            pytest.fail("not installed: pebble (apt-get install pebble)")
        pytest.skip("not installed: pebble (apt-get install pebble)")
    standin = AcmeDnsStandIn()
    try:
        pebble = start_pebble(tmp_path_factory.mktemp("pebble-acmedns"),
                              dns_server=standin.hostport)
        try:
            yield AcmeDnsSetup(standin, pebble)
        finally:
            pebble.stop()
    finally:
        standin.stop()


def test_register_then_apex_and_wildcard_issue_and_a_wrong_password_fails_only_its_cert(
        tmp_path: Path, acmedns: AcmeDnsSetup) -> None:
    setup = acmedns
    accounts = tmp_path / "etc" / "acme-dns.json"
    accounts.parent.mkdir()
    accounts.write_text(json.dumps({"other.example.org": OTHER_ENTRY}))
    reg = setup.register(accounts, "a.acmedns.test", "*.a.acmedns.test")
    saved = json.loads(accounts.read_text())
    assert stat.S_IMODE(accounts.stat().st_mode) == 0o600
    assert saved["other.example.org"] == OTHER_ENTRY  # merged, not replaced
    account = saved["a.acmedns.test"]
    assert sorted(account) == ["allowfrom", "fulldomain", "password", "subdomain", "username"]
    # A name and its wildcard share one account; the CNAME to create is printed.
    assert reg.stdout.splitlines()[-2:] == [
        "Create these DNS records (once; certbatch check --online tries them):",
        f"_acme-challenge.a.acmedns.test. CNAME {account['fulldomain']}."]
    assert account["password"] not in reg.stdout + reg.stderr
    assert [p.name for p in accounts.parent.iterdir()] == ["acme-dns.json"]  # no temp file

    bad_accounts = tmp_path / "bad.json"
    setup.register(bad_accounts, "b.acmedns.test")
    bad = json.loads(bad_accounts.read_text())
    real_password = bad["b.acmedns.test"]["password"]
    bad["b.acmedns.test"]["password"] = wrong_password = "wrong-password-4f9a0c1d2e"
    bad_accounts.write_text(json.dumps(bad))
    cfg = write_config(tmp_path, setup.pebble, {
        "wild": {"domains": ["a.acmedns.test", "*.a.acmedns.test"],
                 "challenge": setup.challenge(accounts)},
        "bad": {"domains": ["b.acmedns.test"], "challenge": setup.challenge(bad_accounts)},
    }, logging={"file": str(tmp_path / "certbatch.log")})
    result = run(["-vv", "renew", "--json"], cfg, timeout=120)
    assert result.returncode == 1, result.stderr
    assert live(tmp_path, "wild")["domains"] == ["a.acmedns.test", "*.a.acmedns.test"]
    assert not (tmp_path / "state" / "certs" / "bad" / "live").exists()
    assert (f"2 dns-01 TXT value(s) added by acme-dns: {account['fulldomain']}."
            in result.stderr)
    assert "propagation check: every server answers" in result.stderr
    updated = [v for s, v in setup.standin.updates if s == account["subdomain"]]
    assert len(set(updated)) == 2 and set(setup.standin.values(account["subdomain"])) == set(
        updated)  # both values at once: the server keeps 2
    lines = [ln for ln in result.stderr.splitlines()
             if ln.startswith("certbatch: ") and "bad" in ln]
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith(f"HTTP 401: the server refused the account's username or password "
                             f"(accounts_file {bad_accounts}, b.acmedns.test)"), lines

    # register without --api/--accounts-file takes them from the config's certificate.
    again = run(["acme-dns", "register", "*.a.acmedns.test"], cfg, timeout=60)
    assert again.returncode == 0, again.stderr
    assert f"_acme-challenge.a.acmedns.test. CNAME {account['fulldomain']}." in again.stdout
    assert "a.acmedns.test: already registered" in again.stdout
    assert json.loads(accounts.read_text()) == saved

    online = run(["check", "--online"], cfg, setup.pebble, timeout=60)
    assert online.returncode == 1
    assert (f"dns-01 wild: probe TXT added at {account['fulldomain']}. (left in place: acme-dns "
            f"has no delete); seen on every authoritative server") in online.stdout
    assert "dns-01 bad: FAILED: acme-dns update of " in online.stdout
    assert setup.standin.updates[-1][1].startswith("certbatch-probe-")  # 43 characters: taken

    bad_accounts.chmod(0o644)
    check = run(["check"], cfg, timeout=60)
    assert check.returncode == 0, check.stderr
    assert (f"certbatch: warning: {bad_accounts} holds a secret and is readable by group or "
            f"others (mode 0644): chmod 600 it") in check.stderr
    assert f"provider acme-dns (api {setup.standin.api_url}, accounts in {accounts}" \
        in check.stdout
    status = run(["status", "--json"], cfg, timeout=60)
    assert status.returncode == 0
    for output in (result.stdout, result.stderr, (tmp_path / "certbatch.log").read_text(),
                   again.stdout + again.stderr, check.stdout + check.stderr, status.stdout,
                   online.stdout + online.stderr):
        for secret in (account["password"], real_password, wrong_password):
            assert secret not in output


def test_register_problems_are_one_line(tmp_path: Path, acmedns: AcmeDnsSetup) -> None:
    accounts = tmp_path / "acme-dns.json"
    usage = run(["acme-dns", "register", "not a domain", "--api", acmedns.standin.api_url,
                 "--accounts-file", str(accounts)], None, timeout=60)
    assert (usage.returncode, usage.stderr) == (2, "certbatch: error: not a domain name: "
                                                   "'not a domain'\n")
    plain = run(["acme-dns", "register", "x.acmedns.test", "--api", "http://auth.example.org",
                 "--accounts-file", str(accounts)], None, timeout=60)
    assert plain.returncode == 2 and "must be https://" in plain.stderr
    down = run(["acme-dns", "register", "x.acmedns.test", "--api", "http://127.0.0.1:9",
                "--accounts-file", str(accounts)], None, timeout=60)
    assert down.returncode == 1
    assert down.stderr == ("certbatch: error: acme-dns register at http://127.0.0.1:9: cannot "
                           "connect: Connection refused\n")
    noconfig = run(["acme-dns", "register", "x.acmedns.test"], tmp_path / "none.yaml",
                   timeout=60)
    assert noconfig.returncode == 2 and len(noconfig.stderr.splitlines()) == 1
    assert not accounts.exists()
    accounts.write_text("[]")
    with pytest.raises(UsageError, match="must hold a JSON object"):
        list(register(acmedns.standin.api_url, ["x.acmedns.test"], accounts))


def test_a_third_value_for_one_account_is_refused_and_a_missing_cname_named(
        tmp_path: Path, acmedns: AcmeDnsSetup) -> None:
    accounts = tmp_path / "acme-dns.json"
    regs = list(register(acmedns.standin.api_url, ["c.acmedns.test", "d.acmedns.test"],
                         accounts))
    full = regs[0].fulldomain
    provider = AcmeDnsProvider(acmedns.standin.api_url, accounts)
    deadline = time.monotonic() + 30
    values = [c * 43 for c in "abc"]
    provider.add(TxtRecord(full + ".", "test.", values[0]), deadline)
    provider.add(TxtRecord(full + ".", "test.", values[1]), deadline)
    with pytest.raises(NotApplied, match="would need a third TXT value"):
        provider.add(TxtRecord(full + ".", "test.", values[2]), deadline)
    subdomain = json.loads(accounts.read_text())["c.acmedns.test"]["subdomain"]
    assert acmedns.standin.values(subdomain) == values[:2]
    provider.remove(TxtRecord(full + ".", "test.", values[0]), deadline)  # no delete in acme-dns
    assert acmedns.standin.values(subdomain) == values[:2]
    # No CNAME at _acme-challenge.d.acmedns.test (the owner has not created it yet).
    with pytest.raises(NotApplied) as err:
        provider.add(TxtRecord("_acme-challenge.d.acmedns.test.", "test.", values[0]), deadline)
    assert str(err.value) == (
        f"_acme-challenge.d.acmedns.test. is not a CNAME to the acme-dns account's name "
        f"{regs[1].fulldomain}.: create the record _acme-challenge.d.acmedns.test. CNAME "
        f"{regs[1].fulldomain}.")


# -- review of issue 12: redirects, the shared accounts file --------------------------------------
# These need neither Pebble nor the stand-in: small local HTTP servers.

class _Recorder(BaseHTTPRequestHandler):
    """Answers every POST as the server's `answer` says; records (path, headers) first."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        server: Any = self.server
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        server.seen.append((self.path, dict(self.headers)))
        status, headers, body = server.answer
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


@contextlib.contextmanager
def http_server(status: int = 200, headers: dict[str, str] | None = None,
                body: bytes = b"{}") -> Iterator[Any]:
    """A local HTTP server on 127.0.0.1 with `.url` and `.seen` (every request it got)."""
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen, server.answer = [], (status, headers or {}, body)
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


ACCOUNT = {"username": "user-1", "password": "pw-SECRET-9c1e", "subdomain": "sub-1",
           "fulldomain": "sub-1.auth.example.org"}


@pytest.mark.parametrize("status", [307, 308, 302])
def test_a_redirect_is_not_followed_and_the_password_goes_nowhere_else(
        tmp_path: Path, status: int) -> None:
    accounts = tmp_path / "acme-dns.json"
    accounts.write_text(json.dumps({"a.example.org": ACCOUNT}))
    with http_server() as elsewhere, http_server(
            status, {"Location": f"{elsewhere.url.replace('127.0.0.1', 'localhost')}/update"}
    ) as api:
        provider = AcmeDnsProvider(api.url, accounts)
        with pytest.raises(NotApplied) as err:
            provider.add(TxtRecord("sub-1.auth.example.org.", "auth.example.org.", "v" * 43),
                         time.monotonic() + 10)
        assert str(err.value) == (f"acme-dns update of sub-1.auth.example.org at {api.url}: "
                                  f"HTTP {status}: redirected to localhost; not followed")
        assert [path for path, _ in api.seen] == ["/update"]
        assert api.seen[0][1]["X-Api-Key"] == ACCOUNT["password"]  # the configured server only
        with pytest.raises(AcmeDnsError, match=f"^acme-dns register at {api.url}: HTTP "
                                               f"{status}: redirected to localhost; not "
                                               f"followed$"):
            list(register(api.url, ["b.example.org"], accounts))
        assert elsewhere.seen == []  # nothing, neither the update nor the registration
    assert "pw-SECRET" not in str(err.value)
    assert json.loads(accounts.read_text()) == {"a.example.org": ACCOUNT}


def test_a_malformed_entry_fails_only_a_certificate_that_uses_it(tmp_path: Path) -> None:
    accounts = tmp_path / "acme-dns.json"
    accounts.write_text(json.dumps({
        "a.example.org": ACCOUNT,
        "broken.example.org": {"username": "u", "password": "", "subdomain": "s",
                               "fulldomain": "s.auth.example.org"},
        "junk.example.org": "not an account",
        "*.nofull.example.org": {"username": "u", "password": "p"}}))
    deadline = time.monotonic() + 10
    with http_server(200, {"Content-Type": "application/json"}, b'{"txt": "x"}') as api:
        provider = AcmeDnsProvider(api.url, accounts)  # the other entries do not stop it
        provider.add(TxtRecord("sub-1.auth.example.org.", "auth.example.org.", "v" * 43),
                     deadline)
        assert [(p, h["X-Api-User"]) for p, h in api.seen] == [("/update", "user-1")]
        for name, lacks in (("s.auth.example.org.", "password"),  # by its fulldomain
                            ("_acme-challenge.broken.example.org.", "password"),  # no CNAME
                            ("_acme-challenge.junk.example.org.",
                             "username, password, subdomain, fulldomain"),
                            ("_acme-challenge.nofull.example.org.", "subdomain, fulldomain")):
            domain = name.removeprefix("_acme-challenge.").rstrip(".")
            if domain == "s.auth.example.org":
                domain = "broken.example.org"
            with pytest.raises(NotApplied) as err:
                provider.add(TxtRecord(name, "example.org.", "w" * 43), deadline)
            assert str(err.value) == (f"accounts_file {accounts}: the account of {domain} "
                                      f"lacks {lacks}")
        assert len(api.seen) == 1
        with pytest.raises(NotApplied, match="no acme-dns account in"):
            provider.add(TxtRecord("_acme-challenge.c.example.org.", "example.org.", "w" * 43),
                         deadline)
