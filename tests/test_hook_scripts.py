"""The shipped hook scripts (hooks/): shellcheck, behaviour, and nginx end to end.

Two ways of running them:
- as certbatch runs them: copied into a hooks folder and driven by Spool.stage and Spool.notify
  (the older tests below);
- directly, as a notify target, with real_servers.run_notify_hook: an environment built from
  scratch with the target contract (the names only in CERTBATCH_NAMES_FILE, CERTBATCH_NAMES
  absent with CERTBATCH_NAMES_TRUNCATED=1, CERTBATCH_TARGET), on a spool folder the test lays
  out with real_servers.write_spool. These don't depend on certbatch's internals.
nginx is real here (nginx_server.py), and so is a stand-in nginx for a 2,000-name batch. The
HAProxy, Apache and Postfix/Dovecot tests here point the scripts' program/command settings at
small recording stand-in scripts, to check exactly what they run; test_real_servers.py runs the
same scripts against the real servers.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs12
from nginx_server import NGINX_BIN, Issued, NginxServer, TestCA, self_signed
from real_servers import run_notify_hook, write_spool

from certbatch.spool import Spool

REPO = Path(__file__).resolve().parent.parent
HOOKS = REPO / "hooks"
SHIPPED = sorted(p for d in ("deploy.d", "notify.d") for p in (HOOKS / d).iterdir())


def shell_scripts() -> list[Path]:
    """Every shell script under hooks/ and scripts/ (by extension or shebang)."""
    found = []
    for top in (REPO / "hooks", REPO / "scripts"):
        if not top.is_dir():
            continue
        for path in sorted(top.rglob("*")):
            if not path.is_file():
                continue
            with path.open("rb") as fh:
                first = fh.readline()
            if path.suffix in (".sh", ".bash") or (first.startswith(b"#!") and (
                    first.rstrip().endswith((b"sh", b"bash", b"dash")))):
                found.append(path)
    return found


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", "--external-sources", str(script)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SHIPPED, ids=lambda p: p.name)
def test_shipped_scripts_are_executable_and_documented(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR
    lines = script.read_text().splitlines()
    assert lines[0] in ("#!/bin/sh", "#!/bin/bash")
    header = "\n".join(line for line in lines[1:40] if line.startswith("#"))
    assert f"certbatch {script.parent.name[:-2]} hook" in header
    assert "Reads (set by certbatch)" in header and "Settings" in header


# -- helpers ----------------------------------------------------------------------------------

def make_spool(tmp_path: Path, deploy: Sequence[str] = (), notify: Sequence[str] = ()) -> Spool:
    """A spool whose hooks folder holds copies of the named shipped scripts."""
    hooks_dir = tmp_path / "hooks"
    for kind, names in (("deploy.d", deploy), ("notify.d", notify)):
        (hooks_dir / kind).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(HOOKS / kind / name, hooks_dir / kind / name)
    return Spool(tmp_path / "spool", hooks_dir, deploy_timeout=30, notify_timeout=30)


def stand_in(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


# -- deploy.d ---------------------------------------------------------------------------------

def test_combined_pem(tmp_path: Path, ca: TestCA) -> None:
    spool = make_spool(tmp_path, deploy=["combined-pem"])
    issued = ca.issue(["www.test", "test"], serial=0x1234)
    files = issued.cert_files("www")
    # A key without its final newline must still give a parseable file.
    files = dataclasses.replace(files, privkey_pem=files.privkey_pem.rstrip(b"\n"))

    assert spool.stage(files).ok

    combined = spool.root / "pending" / "www" / "combined.pem"
    assert mode(combined) == 0o600
    data = combined.read_bytes()
    key = load_pem_private_key(data, None)
    chain = x509.load_pem_x509_certificates(data)
    assert [c.serial_number for c in chain] == [0x1234, ca.cert.serial_number]
    assert chain[0].public_key() == key.public_key()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize("password", [b"s3cret pass", None])
def test_pkcs12(tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch,
                password: bytes | None) -> None:
    if password is not None:
        pw_file = tmp_path / "p12 password"
        pw_file.write_bytes(password + b"\n")
        monkeypatch.setenv("PKCS12_PASSWORD_FILE", str(pw_file))
    else:
        monkeypatch.delenv("PKCS12_PASSWORD_FILE", raising=False)
    spool = make_spool(tmp_path, deploy=["pkcs12"])
    issued = ca.issue(["app.test"], serial=0xBEEF)

    outcome = spool.stage(issued.cert_files("app"))

    assert outcome.ok, outcome.error
    p12 = spool.root / "pending" / "app" / "cert.p12"
    assert mode(p12) == 0o600
    loaded = pkcs12.load_pkcs12(p12.read_bytes(), password or b"")
    assert loaded.cert is not None and loaded.key is not None
    assert loaded.cert.certificate.serial_number == 0xBEEF
    assert loaded.cert.friendly_name == b"app"
    assert loaded.key.public_key() == loaded.cert.certificate.public_key()
    assert [c.certificate.serial_number for c in loaded.additional_certs] == [
        ca.cert.serial_number]


def test_pkcs12_failure_fails_the_staging(tmp_path: Path, ca: TestCA,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PKCS12_PASSWORD_FILE", str(tmp_path / "missing"))
    spool = make_spool(tmp_path, deploy=["pkcs12"])
    outcome = spool.stage(ca.issue(["app.test"]).cert_files("app"))
    assert not outcome.ok and outcome.error is not None and outcome.error.hook == "pkcs12"
    assert spool.pending() == []


# -- nginx, end to end ------------------------------------------------------------------------

SERVER_NAMES = ["a.test", "b.test", "c.test"]
OLD_SERIALS = {"a.test": 0x1001, "b.test": 0x1002, "c.test": 0x1003}
NEW_SERIALS = {"a.test": 0x2001, "b.test": 0x2002, "c.test": 0x2003}


@pytest.fixture
def nginx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NginxServer]:
    if not os.access(NGINX_BIN, os.X_OK):
        pytest.skip(f"{NGINX_BIN} is not installed")
    cert_dir = tmp_path / "nginx certs"  # a space: the hook must quote its paths
    for name in SERVER_NAMES:
        self_signed([name], serial=OLD_SERIALS[name]).install(cert_dir / name)
    server = NginxServer(tmp_path / "nginx", cert_dir, SERVER_NAMES)
    with server:
        for key, value in server.hook_env().items():
            monkeypatch.setenv(key, value)  # the hook inherits certbatch's environment
        monkeypatch.delenv("NGINX_RELOAD_CMD", raising=False)
        yield server


def wait_reloads(server: NginxServer, n: int, timeout: float = 5) -> int:
    deadline = time.monotonic() + timeout
    while server.reload_count() < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a second, unwanted reload would show up by now
    return server.reload_count()


def test_nginx_batch_installs_and_reloads_once(tmp_path: Path, nginx: NginxServer,
                                               ca: TestCA) -> None:
    for name in SERVER_NAMES:
        assert nginx.served_serial(name) == OLD_SERIALS[name]
    old_key = (nginx.cert_dir / "a.test" / "privkey.pem").read_bytes()
    spool = make_spool(tmp_path, notify=["nginx"])
    for name in SERVER_NAMES:
        assert spool.stage(ca.issue([name], serial=NEW_SERIALS[name]).cert_files(name)).ok
    assert nginx.reload_count() == 0

    out = spool.notify()

    assert out.ok, out.error and out.error.stderr_tail
    assert out.names == SERVER_NAMES
    assert wait_reloads(nginx, 1) == 1
    for name in SERVER_NAMES:
        assert nginx.wait_for_serial(name, NEW_SERIALS[name]) == NEW_SERIALS[name]
    a = nginx.cert_dir / "a.test"
    assert mode(a / "privkey.pem") == 0o600 and mode(a / "fullchain.pem") == 0o644
    assert (a / "privkey.pem.prev").read_bytes() == old_key  # the previous file is kept
    assert mode(a / "privkey.pem.prev") == 0o600
    assert sorted(os.listdir(a)) == ["fullchain.pem", "fullchain.pem.prev", "privkey.pem",
                                     "privkey.pem.prev"]  # no temp files left
    assert spool.pending() == []


def test_mismatched_entry_never_reaches_nginx(tmp_path: Path, nginx: NginxServer,
                                              ca: TestCA) -> None:
    """certbatch checks every entry before a target gets it: a key that does not match its
    certificate is removed from the batch (and restaged from the store by the next run), the
    rest is applied. (The hook's own rollback on `nginx -t` failing is tested directly in
    test_nginx_names_file_real_server.)"""
    spool = make_spool(tmp_path, notify=["nginx"])
    good = {n: ca.issue([n], serial=NEW_SERIALS[n]) for n in SERVER_NAMES}
    other = ca.issue(["x.test"])
    broken = dataclasses.replace(good["b.test"], key_pem=other.key_pem)  # key of another cert
    for name in ("a.test", "c.test"):
        assert spool.stage(good[name].cert_files(name)).ok
    assert spool.stage(broken.cert_files("b.test")).ok  # no deploy hook ran: nothing checked

    out = spool.notify()

    assert not out.ok and [(d.name, d.problem) for d in out.damaged] == [
        ("b.test", "the certificate does not match the private key")]
    assert out.targets[0].ok and out.targets[0].names == ["a.test", "c.test"]
    assert wait_reloads(nginx, 1) == 1
    for name in ("a.test", "c.test"):
        assert nginx.wait_for_serial(name, NEW_SERIALS[name]) == NEW_SERIALS[name]
    assert nginx.served_serial("b.test") == OLD_SERIALS["b.test"]
    assert spool.pending() == []


def test_nginx_reload_command_override(tmp_path: Path, nginx: NginxServer, ca: TestCA,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "reload.log"
    monkeypatch.setenv("NGINX_RELOAD_CMD", f"echo custom >> '{log}'; exit 3")
    spool = make_spool(tmp_path, notify=["nginx"])
    assert spool.stage(ca.issue(["a.test"]).cert_files("a.test")).ok

    out = spool.notify()

    assert log.read_text() == "custom\n"
    assert not out.ok  # a failed reload keeps the batch (the files stay installed)
    assert out.error is not None and "files are installed" in out.error.stderr_tail
    assert nginx.reload_count() == 0
    assert [e.name for e in spool.pending()] == ["a.test"]


# -- haproxy, apache, postfix-dovecot with stand-in programs ----------------------------------

def test_haproxy(tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.log"
    verdict = tmp_path / "check-exit"
    verdict.write_text("0")
    haproxy = stand_in(tmp_path / "bin" / "haproxy",
                       f'echo "haproxy $*" >> "{calls}"\n'
                       f'code=$(cat "{verdict}")\n'
                       '[ "$code" = 0 ] || echo "[ALERT] (1) : config : invalid cert" >&2\n'
                       'exit "$code"\n')
    cert_dir = tmp_path / "haproxy certs"
    monkeypatch.setenv("HAPROXY_BIN", str(haproxy))
    monkeypatch.setenv("HAPROXY_CERT_DIR", str(cert_dir))
    monkeypatch.setenv("HAPROXY_CONF", "/etc/haproxy/test.cfg")
    monkeypatch.setenv("HAPROXY_RELOAD_CMD", f'echo reload >> "{calls}"')
    spool = make_spool(tmp_path, deploy=["combined-pem"], notify=["haproxy"])
    v1 = {n: ca.issue([f"{n}.test"]) for n in ("web", "api")}
    for n, issued in v1.items():
        assert spool.stage(issued.cert_files(n)).ok

    assert spool.notify().ok

    assert calls.read_text().splitlines() == ["haproxy -c -f /etc/haproxy/test.cfg", "reload"]
    for n, issued in v1.items():
        pem = cert_dir / f"{n}.pem"
        assert mode(pem) == 0o600
        assert pem.read_bytes() == issued.key_pem + issued.fullchain_pem
    assert sorted(os.listdir(cert_dir)) == ["api.pem", "web.pem"]  # backups live elsewhere

    # Second batch: one replaced, one new; the check fails -> everything back as it was.
    v2_web = ca.issue(["web.test"])
    assert spool.stage(v2_web.cert_files("web")).ok
    assert spool.stage(ca.issue(["new.test"]).cert_files("new")).ok
    verdict.write_text("1")
    out = spool.notify()
    assert not out.ok and out.error is not None and "invalid cert" in str(out.error)
    assert (cert_dir / "web.pem").read_bytes() == v1["web"].key_pem + v1["web"].fullchain_pem
    assert sorted(os.listdir(cert_dir)) == ["api.pem", "web.pem"]
    assert calls.read_text().count("reload") == 1

    verdict.write_text("0")
    assert spool.notify().ok
    assert (cert_dir / "web.pem").read_bytes() == v2_web.key_pem + v2_web.fullchain_pem
    backup = Path(f"{cert_dir}.prev") / "web.pem"
    assert backup.read_bytes() == v1["web"].key_pem + v1["web"].fullchain_pem
    assert calls.read_text().count("reload") == 2


def test_apache(tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.log"
    verdict = tmp_path / "configtest-exit"
    verdict.write_text("0")
    apachectl = stand_in(tmp_path / "bin" / "apachectl",
                         f'echo "apachectl $*" >> "{calls}"\n'
                         f'if [ "$1" = configtest ]; then exit "$(cat "{verdict}")"; fi\n')
    cert_dir = tmp_path / "apache"
    monkeypatch.setenv("APACHECTL", str(apachectl))
    monkeypatch.setenv("APACHE_CERT_DIR", str(cert_dir))
    monkeypatch.delenv("APACHE_RELOAD_CMD", raising=False)
    spool = make_spool(tmp_path, notify=["apache"])
    v1 = ca.issue(["www.test"])
    assert spool.stage(v1.cert_files("www")).ok

    assert spool.notify().ok
    assert calls.read_text().splitlines() == ["apachectl configtest", "apachectl graceful"]
    assert (cert_dir / "www" / "fullchain.pem").read_bytes() == v1.fullchain_pem
    assert mode(cert_dir / "www" / "privkey.pem") == 0o600

    # A key that doesn't match its certificate is refused before anything is touched.
    v2 = ca.issue(["www.test"])
    assert spool.stage(dataclasses.replace(v2, key_pem=v1.key_pem).cert_files("www")).ok
    out = spool.notify()
    assert not out.ok and out.error is not None and "does not match" in str(out.error)
    assert calls.read_text().count("configtest") == 1

    # configtest fails -> the previous files come back.
    assert spool.stage(v2.cert_files("www")).ok
    verdict.write_text("1")
    assert not spool.notify().ok
    assert (cert_dir / "www" / "fullchain.pem").read_bytes() == v1.fullchain_pem
    assert (cert_dir / "www" / "privkey.pem").read_bytes() == v1.key_pem
    assert calls.read_text().count("graceful") == 1


def test_postfix_dovecot(tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.log"
    cert_dir = tmp_path / "mail"
    monkeypatch.setenv("MAIL_CERT_DIR", str(cert_dir))
    monkeypatch.setenv("POSTFIX_RELOAD_CMD", f'echo postfix >> "{calls}"')
    monkeypatch.setenv("DOVECOT_RELOAD_CMD", f'echo dovecot >> "{calls}"')
    spool = make_spool(tmp_path, notify=["postfix-dovecot"])
    issued = {n: ca.issue([f"{n}.test"]) for n in ("mx", "imap")}
    for n, i in issued.items():
        assert spool.stage(i.cert_files(n)).ok

    assert spool.notify().ok

    assert calls.read_text().splitlines() == ["postfix", "dovecot"]  # once for the batch
    for n, i in issued.items():
        assert (cert_dir / n / "fullchain.pem").read_bytes() == i.fullchain_pem
        assert (cert_dir / n / "privkey.pem").read_bytes() == i.key_pem
        assert mode(cert_dir / n / "privkey.pem") == 0o600

    # An empty command skips that reload; a mismatched key changes nothing.
    monkeypatch.setenv("DOVECOT_RELOAD_CMD", "")
    bad = dataclasses.replace(ca.issue(["mx.test"]), key_pem=issued["imap"].key_pem)
    assert spool.stage(bad.cert_files("mx")).ok
    assert not spool.notify().ok
    assert (cert_dir / "mx" / "fullchain.pem").read_bytes() == issued["mx"].fullchain_pem
    assert spool.stage(ca.issue(["mx.test"]).cert_files("mx")).ok
    assert spool.notify().ok
    assert calls.read_text().splitlines() == ["postfix", "dovecot", "postfix"]


# -- webhook ----------------------------------------------------------------------------------

class _Recorder(http.server.BaseHTTPRequestHandler):
    status = 200
    requests: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append((self.path, dict(self.headers), body))
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"server says hi")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook_server() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"requests": [], "status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/certs?x=1", handler
    finally:
        server.shutdown()
        server.server_close()


def test_webhook(tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch,
                 webhook_server: tuple[str, type[_Recorder]]) -> None:
    url, handler = webhook_server
    token = tmp_path / "token"
    token.write_text("t0ken-123\n")
    monkeypatch.setenv("CERTBATCH_WEBHOOK_URL", url)
    monkeypatch.setenv("CERTBATCH_WEBHOOK_TOKEN_FILE", str(token))
    spool = make_spool(tmp_path, notify=["webhook"])
    assert spool.stage(ca.issue(["www.test"]).cert_files("www")).ok

    handler.status = 503
    out = spool.notify()
    assert not out.ok and out.error is not None and "HTTP 503" in str(out.error)
    assert [e.name for e in spool.pending()] == ["www"]

    handler.status = 204
    out = spool.notify()
    assert out.ok, out.error
    path, headers, body = handler.requests[-1]
    assert path == "/certs?x=1"
    assert headers["Authorization"] == "Bearer t0ken-123"
    assert headers["Content-Type"] == "application/json"
    assert out.batch_id is not None
    sent = json.loads(body)  # the target's own batch file
    assert (sent["target"], sent["batch_id"], sent["names"]) == ("webhook", out.batch_id, ["www"])
    applied = json.loads((spool.root / "applied" / out.batch_id / "batch.json").read_bytes())
    assert sent["certificates"] == applied["certificates"]


def test_webhook_without_token_and_unreachable(tmp_path: Path, ca: TestCA,
                                               monkeypatch: pytest.MonkeyPatch,
                                               webhook_server: tuple[str, type[_Recorder]]
                                               ) -> None:
    url, handler = webhook_server
    monkeypatch.delenv("CERTBATCH_WEBHOOK_TOKEN_FILE", raising=False)
    monkeypatch.setenv("CERTBATCH_WEBHOOK_URL", url)
    spool = make_spool(tmp_path, notify=["webhook"])
    assert spool.stage(ca.issue(["www.test"]).cert_files("www")).ok
    assert spool.notify().ok
    assert "Authorization" not in handler.requests[-1][1]

    assert spool.stage(ca.issue(["www.test"]).cert_files("www")).ok
    monkeypatch.setenv("CERTBATCH_WEBHOOK_URL", "http://127.0.0.1:9/")  # discard port: refused
    out = spool.notify()
    assert not out.ok and out.error is not None and "request to" in str(out.error)



# -- the notify-target contract: names from CERTBATCH_NAMES_FILE, run directly ---------------

INSTALLERS = ["nginx", "haproxy", "apache", "postfix-dovecot"]


def recorder(path: Path, log: Path, fail_on: str = "") -> Path:
    """A stand-in program: appends "<name> <args>" to `log`; fails if its args are `fail_on`."""
    return stand_in(path, f'echo "{path.name} $*" >> "{log}"\n'
                          f'if [ "$*" = "{fail_on}" ]; then\n'
                          '    echo "[emerg] [ALERT] stand-in check failed" >&2; exit 1\n'
                          'fi\n')


def stand_in_settings(script: str, tmp_path: Path,
                      fail_on: str = "") -> tuple[dict[str, str], Path]:
    """Settings pointing `script` at recording stand-ins; returns them and its cert folder."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    cert_dir = tmp_path / f"{script} certs"
    if script == "nginx":
        return {"NGINX_BIN": str(recorder(bin_dir / "nginx", log, fail_on)),
                "NGINX_CERT_DIR": str(cert_dir)}, cert_dir
    if script == "haproxy":
        return {"HAPROXY_BIN": str(recorder(bin_dir / "haproxy", log, fail_on)),
                "HAPROXY_CERT_DIR": str(cert_dir), "HAPROXY_CONF": "/x/haproxy.cfg",
                "HAPROXY_RELOAD_CMD": f'echo reload >> "{log}"'}, cert_dir
    if script == "apache":
        return {"APACHECTL": str(recorder(bin_dir / "apachectl", log, fail_on)),
                "APACHE_CERT_DIR": str(cert_dir)}, cert_dir
    return {"MAIL_CERT_DIR": str(cert_dir), "POSTFIX_RELOAD_CMD": f'echo postfix >> "{log}"',
            "DOVECOT_RELOAD_CMD": f'echo dovecot >> "{log}"'}, cert_dir


def installed(script: str, cert_dir: Path, name: str) -> dict[str, bytes]:
    if script == "haproxy":
        return {"pem": (cert_dir / f"{name}.pem").read_bytes()}
    return {f: (cert_dir / name / f).read_bytes() for f in ("fullchain.pem", "privkey.pem")}


def expected(script: str, issued: Issued) -> dict[str, bytes]:
    if script == "haproxy":
        return {"pem": issued.key_pem + issued.fullchain_pem}
    return {"fullchain.pem": issued.fullchain_pem, "privkey.pem": issued.key_pem}


EXPECTED_CALLS = {
    "nginx": ["nginx -t", "nginx -s reload"],
    "haproxy": ["haproxy -c -f /x/haproxy.cfg", "reload"],
    "apache": ["apachectl configtest", "apachectl graceful"],
    "postfix-dovecot": ["postfix", "dovecot"],
}


@pytest.mark.parametrize("script", INSTALLERS)
def test_names_file_only(script: str, tmp_path: Path, ca: TestCA) -> None:
    """Names only in CERTBATCH_NAMES_FILE (no CERTBATCH_NAMES): all installed, one reload."""
    settings, cert_dir = stand_in_settings(script, tmp_path)
    batch = {n: ca.issue([f"{n}.example"]) for n in ("api", "www", "mail.x-1")}
    spool = write_spool(tmp_path / "spool", batch)

    proc = run_notify_hook(script, spool, sorted(batch), settings, target="t-1")

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{script} hook (t-1): installed api mail.x-1 www;")
    assert (tmp_path / "calls.log").read_text().splitlines() == EXPECTED_CALLS[script]
    for name, issued in batch.items():
        assert installed(script, cert_dir, name) == expected(script, issued)
    if script == "haproxy":
        assert sorted(os.listdir(cert_dir)) == ["api.pem", "mail.x-1.pem", "www.pem"]
    else:
        assert sorted(os.listdir(cert_dir)) == ["api", "mail.x-1", "www"]  # no temp folder


@pytest.mark.parametrize("script", INSTALLERS)
def test_legacy_names_variable(script: str, tmp_path: Path, ca: TestCA) -> None:
    """From a certbatch without CERTBATCH_NAMES_FILE: the names come from CERTBATCH_NAMES."""
    settings, cert_dir = stand_in_settings(script, tmp_path)
    batch = {n: ca.issue([f"{n}.example"]) for n in ("a", "b")}
    spool = write_spool(tmp_path / "spool", batch)

    proc = run_notify_hook(script, spool, ["b", "a"], settings, legacy_names=True)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{script} hook: installed a b;")
    for name, issued in batch.items():
        assert installed(script, cert_dir, name) == expected(script, issued)


@pytest.mark.parametrize("script", INSTALLERS)
@pytest.mark.parametrize("bad", ["../up", "a b", "-rf", "Www", "*", "x/y", ".hidden", "ok\r",
                                 "tab\there", "$(reboot)"])
def test_invalid_name_in_names_file_changes_nothing(script: str, bad: str, tmp_path: Path,
                                                    ca: TestCA) -> None:
    settings, cert_dir = stand_in_settings(script, tmp_path)
    spool = write_spool(tmp_path / "spool", {"good": ca.issue(["good.example"])})
    (spool / "x").mkdir()  # something a "*" would match, were it globbed

    proc = run_notify_hook(script, spool, ["good", bad], settings)

    assert proc.returncode == 1
    shown = bad.replace("\r", "\n")  # text=True reads a CR as a line break
    assert proc.stderr.endswith(f"{script} hook: invalid name '{shown}'\n"), proc.stderr
    assert not cert_dir.exists() and not (tmp_path / "calls.log").exists()


@pytest.mark.parametrize("script", INSTALLERS)
def test_glob_in_legacy_names_is_not_expanded(script: str, tmp_path: Path, ca: TestCA) -> None:
    settings, cert_dir = stand_in_settings(script, tmp_path)
    spool = write_spool(tmp_path / "spool", {"good": ca.issue(["good.example"])})

    proc = run_notify_hook(script, spool, ["good", "p*"], settings, legacy_names=True)

    assert proc.returncode == 1  # "p*" would match "pending" in the working directory
    assert proc.stderr.strip().splitlines()[-1] == f"{script} hook: invalid name 'p*'"
    assert not cert_dir.exists()


@pytest.mark.parametrize("script", INSTALLERS)
def test_names_file_edge_cases(script: str, tmp_path: Path, ca: TestCA) -> None:
    """Repeats and blank lines are harmless; a last line without its newline still counts."""
    settings, cert_dir = stand_in_settings(script, tmp_path)
    batch = {n: ca.issue([f"{n}.example"]) for n in ("a", "b", "c")}
    spool = write_spool(tmp_path / "spool", batch)
    names_file = tmp_path / "names"
    names_file.write_text("b\n\na\nb\nc")  # no final newline
    settings = {**settings, "CERTBATCH_NAMES_FILE": str(names_file)}

    proc = subprocess.run([str(HOOKS / "notify.d" / script)], cwd=spool, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={"PATH": os.environ["PATH"], **settings,
                               "CERTBATCH_SPOOL_DIR": str(spool)})

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{script} hook: installed a b c;")
    assert (tmp_path / "calls.log").read_text().splitlines() == EXPECTED_CALLS[script]
    for name, issued in batch.items():
        assert installed(script, cert_dir, name) == expected(script, issued)


@pytest.mark.parametrize("script", INSTALLERS)
def test_unreadable_or_absent_names(script: str, tmp_path: Path) -> None:
    settings, cert_dir = stand_in_settings(script, tmp_path)
    spool = tmp_path / "spool"
    (spool / "pending").mkdir(parents=True)
    base = {"PATH": os.environ["PATH"], **settings, "CERTBATCH_SPOOL_DIR": str(spool)}
    for extra, message in (
            ({"CERTBATCH_NAMES_TRUNCATED": "1"},
             "CERTBATCH_NAMES_FILE is not set: run this from certbatch"),
            ({"CERTBATCH_NAMES_FILE": str(tmp_path / "nope")},
             f"cannot read CERTBATCH_NAMES_FILE '{tmp_path / 'nope'}'"),
            ({"CERTBATCH_NAMES_FILE": str(tmp_path)},  # a folder
             f"cannot read CERTBATCH_NAMES_FILE '{tmp_path}'")):
        proc = subprocess.run([str(HOOKS / "notify.d" / script)], cwd=spool, env=base | extra,
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1] == f"{script} hook: {message}"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    proc = subprocess.run([str(HOOKS / "notify.d" / script)], cwd=spool, capture_output=True,
                          env=base | {"CERTBATCH_NAMES_FILE": str(empty)}, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"{script} hook: the batch has no names"
    assert not cert_dir.exists()


@pytest.mark.parametrize("script", ["nginx", "haproxy", "apache"])  # (postfix: no check)
def test_names_file_rollback_with_stand_ins(script: str, tmp_path: Path, ca: TestCA) -> None:
    """The server's check fails: every replaced file comes back, every new one goes."""
    fail_on = {"nginx": "-t", "haproxy": "-c -f /x/haproxy.cfg", "apache": "configtest"}[script]
    settings, cert_dir = stand_in_settings(script, tmp_path, fail_on=fail_on)
    v1 = {n: ca.issue([f"{n}.example"]) for n in ("a", "b")}
    assert run_notify_hook(script, write_spool(tmp_path / "s1", v1), ["a", "b"],
                           {**settings, "HAPROXY_BIN": "true", "NGINX_BIN": "true",
                            "APACHECTL": "true"}).returncode == 0
    before = {n: installed(script, cert_dir, n) for n in v1}
    v2 = {n: ca.issue([f"{n}.example"]) for n in ("a", "c")}  # a replaced, c new

    proc = run_notify_hook(script, write_spool(tmp_path / "s2", v2), ["a", "c"], settings)

    assert proc.returncode == 1
    assert "previous certificate files restored" in proc.stderr
    assert {n: installed(script, cert_dir, n) for n in v1} == before
    assert sorted(os.listdir(cert_dir)) == (["a.pem", "b.pem"] if script == "haproxy"
                                            else ["a", "b"])


def test_nginx_names_file_2000_names(tmp_path: Path, ca: TestCA) -> None:
    """A batch too big for CERTBATCH_NAMES: 2,000 names of 64 characters, in a few seconds."""
    settings, cert_dir = stand_in_settings("nginx", tmp_path)
    issued = ca.issue(["big.example"])  # the stand-in nginx doesn't read them: one will do
    names = [f"{i:04d}-" + "x" * 59 for i in range(2000)]
    assert all(len(n) == 64 for n in names) and len(" ".join(names)) > 64 * 1024
    write_spool(tmp_path / "spool", {names[0]: issued})
    for name in names[1:]:  # the same files for every name: hard links are quicker to make
        shutil.copytree(tmp_path / "spool" / "pending" / names[0],
                        tmp_path / "spool" / "pending" / name, copy_function=os.link)
    started = time.monotonic()

    proc = run_notify_hook("nginx", tmp_path / "spool", names, settings, timeout=120)

    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "nginx hook: installed 2000 certificates; nginx reloaded"
    assert (tmp_path / "calls.log").read_text().splitlines() == ["nginx -t", "nginx -s reload"]
    assert sorted(os.listdir(cert_dir)) == names
    for name in (names[0], names[999], names[-1]):
        assert installed("nginx", cert_dir, name) == expected("nginx", issued)
        assert mode(cert_dir / name / "privkey.pem") == 0o600
        assert mode(cert_dir / name / "fullchain.pem") == 0o644
    assert elapsed < 30, f"{elapsed:.1f} s for 2,000 names"


def test_nginx_names_file_real_server(tmp_path: Path, ca: TestCA) -> None:
    """Real nginx, names from the file: a broken batch is rolled back, the fixed one served."""
    if not os.access(NGINX_BIN, os.X_OK):
        pytest.skip(f"{NGINX_BIN} is not installed")
    cert_dir = tmp_path / "nginx certs"
    for name in SERVER_NAMES:
        self_signed([name], serial=OLD_SERIALS[name]).install(cert_dir / name)
    with NginxServer(tmp_path / "nginx", cert_dir, SERVER_NAMES) as server:
        before = {p: p.read_bytes() for p in cert_dir.rglob("*.pem")}
        good = {n: ca.issue([n], serial=NEW_SERIALS[n]) for n in SERVER_NAMES}
        other = ca.issue(["x.test"])
        batch = {**good, "x.test": other,
                 "b.test": dataclasses.replace(good["b.test"], key_pem=other.key_pem)}
        names = sorted(batch)

        proc = run_notify_hook("nginx", write_spool(tmp_path / "bad", batch), names,
                               server.hook_env(), target="front")

        assert proc.returncode == 1
        assert "key values mismatch" in proc.stderr  # nginx's own message
        assert "nginx hook (front): nginx -t failed: " in proc.stderr.strip().splitlines()[-1]
        assert {p: p.read_bytes() for p in cert_dir.rglob("*.pem")} == before
        assert not (cert_dir / "x.test").exists()
        assert wait_reloads(server, 1, timeout=0.5) == 0

        batch["b.test"] = good["b.test"]
        proc = run_notify_hook("nginx", write_spool(tmp_path / "good", batch), names,
                               server.hook_env(), target="front")

        assert proc.returncode == 0, proc.stderr
        assert wait_reloads(server, 1) == 1
        for name in SERVER_NAMES:
            assert server.wait_for_serial(name, NEW_SERIALS[name]) == NEW_SERIALS[name]


def test_webhook_names_file_only(tmp_path: Path, ca: TestCA,
                                 webhook_server: tuple[str, type[_Recorder]]) -> None:
    """The webhook posts the target's own batch file; it needs no names variable."""
    url, handler = webhook_server
    spool = write_spool(tmp_path / "spool", {"www": ca.issue(["www.example"])})

    proc = run_notify_hook("webhook", spool, ["www"], {"CERTBATCH_WEBHOOK_URL": url},
                           target="hooks-api")

    assert proc.returncode == 0, proc.stderr
    assert "webhook hook (hooks-api):" in proc.stdout
    (path, headers, body) = handler.requests[-1]
    sent = json.loads(body)
    assert sent["names"] == ["www"] and sent["target"] == "hooks-api"
    assert body == (tmp_path / "spool-target-hooks-api" / "batch.json").read_bytes()
