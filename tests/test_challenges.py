"""The challenge solvers on their own (no CA needed), and the challtestsrv dns hook."""

from __future__ import annotations

import logging
import shutil
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pebble_server import PebbleInstance

from certbatch import challenges
from certbatch.challenges import (
    ChallengeResponse,
    DnsScriptSolver,
    StandaloneSolver,
    WebrootSolver,
    make_solver,
)
from certbatch.config import ChallengeSettings
from certbatch.errors import ChallengeError, DeadlineExceeded

HOOK = Path(__file__).resolve().parent.parent / "hooks" / "dns" / "challtestsrv.sh"


def http01(token: str, domain: str = "a.example.com") -> ChallengeResponse:
    return ChallengeResponse(type="http-01", domain=domain, token=token,
                             key_authorization=f"{token}.thumbprint")


def dns01(domain: str, value: str, wildcard: bool = False) -> ChallengeResponse:
    return ChallengeResponse(type="dns-01", domain=domain, token="tok", wildcard=wildcard,
                             key_authorization="tok.thumb", txt_value=value)


def soon(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(port: int, token: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}/.well-known/acme-challenge/{token}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


# -- make_solver ---------------------------------------------------------------------------------

def test_make_solver_picks_by_settings(tmp_path: Path) -> None:
    assert isinstance(make_solver(ChallengeSettings("http-01", webroot=tmp_path), "c"),
                      WebrootSolver)
    assert isinstance(make_solver(ChallengeSettings("http-01", standalone_address="127.0.0.1",
                                                    standalone_port=8080), "c"), StandaloneSolver)
    assert isinstance(make_solver(ChallengeSettings("dns-01", script=tmp_path / "s"), "c"),
                      DnsScriptSolver)
    with pytest.raises(ChallengeError):
        make_solver(ChallengeSettings("dns-01"), "c")


# -- webroot -------------------------------------------------------------------------------------

def test_webroot_writes_tokens_and_removes_what_it_created(tmp_path: Path) -> None:
    solver = WebrootSolver(tmp_path, "c")
    solver.prepare([http01("tok1"), http01("tok2", "b.example.com")], soon())
    folder = tmp_path / ".well-known" / "acme-challenge"
    assert (folder / "tok1").read_text() == "tok1.thumbprint"
    assert stat.S_IMODE((folder / "tok2").stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o755
    solver.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_webroot_keeps_folders_it_did_not_create(tmp_path: Path) -> None:
    folder = tmp_path / ".well-known" / "acme-challenge"
    folder.mkdir(parents=True)
    (tmp_path / ".well-known" / "security.txt").write_text("x")
    solver = WebrootSolver(tmp_path, "c")
    solver.prepare([http01("tok")], soon())
    solver.cleanup()
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_webroot_rejects_tokens_that_could_escape(tmp_path: Path) -> None:
    solver = WebrootSolver(tmp_path / "www", "c")
    (tmp_path / "www").mkdir()
    with pytest.raises(ChallengeError, match="not base64url"):
        solver.prepare([http01("../../etc/passwd")], soon())
    solver.cleanup()
    assert list((tmp_path / "www").iterdir()) == []


def test_webroot_unwritable_is_a_challenge_error(tmp_path: Path) -> None:
    (tmp_path / ".well-known").write_text("a file, not a folder")  # root may write anywhere
    with pytest.raises(ChallengeError, match="cannot write http-01 token"):
        WebrootSolver(tmp_path, "c").prepare([http01("tok")], soon())


def test_webroot_map_writes_each_token_under_its_names_webroot(tmp_path: Path) -> None:
    """webroot_map (issue 14): each name's token under its own webroot, the others under the
    default; cleanup removes every token and every folder the solver made, in each webroot."""
    a, b, default = tmp_path / "a", tmp_path / "b", tmp_path / "default"
    for root in (a, b, default):
        root.mkdir()
    (b / ".well-known").mkdir()  # b already has one: kept
    ch = ChallengeSettings("http-01", webroot=default, webroot_map=(
        ("a.example.com", a), ("b.example.com", b)))
    solver = make_solver(ch, "c")
    solver.prepare([http01("tokA", "a.example.com"), http01("tokB", "B.example.com"),
                    http01("tokC", "c.example.com")], soon())
    listing = {root.name: sorted(p.name for p in (root / ".well-known" / "acme-challenge")
                                 .iterdir()) for root in (a, b, default)}
    assert listing == {"a": ["tokA"], "b": ["tokB"], "default": ["tokC"]}
    assert (b / ".well-known" / "acme-challenge" / "tokB").read_text() == "tokB.thumbprint"
    solver.cleanup()
    assert [list(a.iterdir()), list(default.iterdir())] == [[], []]
    assert [p.name for p in b.iterdir()] == [".well-known"]
    assert list((b / ".well-known").iterdir()) == []


def test_webroot_map_checks_every_webroot_before_writing(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    ch = ChallengeSettings("http-01", webroot_map=(("a.example.com", tmp_path / "a"),
                                                   ("b.example.com", tmp_path / "nowhere")))
    assert challenges.setup_problem(ch) == f"webroot {tmp_path / 'nowhere'} does not exist"
    solver = make_solver(ch, "c")
    with pytest.raises(ChallengeError, match="nowhere does not exist"):
        solver.prepare([http01("tokA", "a.example.com"), http01("tokB", "b.example.com")],
                       soon())
    solver.cleanup()
    assert list((tmp_path / "a").iterdir()) == []  # nothing was written anywhere
    with pytest.raises(ChallengeError, match="no http-01 webroot for c.example.com"):
        solver.prepare([http01("tokC", "c.example.com")], soon())


# -- standalone ----------------------------------------------------------------------------------

def test_standalone_shares_one_server_per_port() -> None:
    port = free_port()
    first, second = StandaloneSolver("127.0.0.1", port, "a"), StandaloneSolver("127.0.0.1",
                                                                              port, "b")
    first.prepare([http01("tokA")], soon())
    second.prepare([http01("tokB")], soon())  # would fail with EADDRINUSE without sharing
    assert fetch(port, "tokA") == (200, "tokA.thumbprint")
    assert fetch(port, "tokB") == (200, "tokB.thumbprint")
    assert fetch(port, "nope")[0] == 404
    first.cleanup()
    assert fetch(port, "tokA")[0] == 404  # gone, but the server stays for the other user
    assert fetch(port, "tokB") == (200, "tokB.thumbprint")
    second.cleanup()
    with pytest.raises(OSError):  # the last user stopped it
        fetch(port, "tokB")
    first.cleanup()  # idempotent


def test_standalone_many_threads() -> None:
    port = free_port()
    errors: list[BaseException] = []

    def one(i: int) -> None:
        solver = StandaloneSolver("127.0.0.1", port, f"c{i}")
        try:
            solver.prepare([http01(f"tok{i}")], soon())
            assert fetch(port, f"tok{i}") == (200, f"tok{i}.thumbprint")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            solver.cleanup()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert challenges._servers == {}


def test_standalone_port_in_use_is_a_challenge_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        solver = StandaloneSolver("127.0.0.1", port, "c")
        with pytest.raises(ChallengeError, match=f"cannot listen on 127.0.0.1:{port}: "
                                                 "Address already in use"):
            solver.prepare([http01("tok")], soon())
        solver.cleanup()


# -- dns-01 script -------------------------------------------------------------------------------

def script(tmp_path: Path, body: str = "") -> tuple[Path, Path]:
    """A dns script logging argv and the CERTBATCH_* environment, then running `body`."""
    log = tmp_path / "calls.log"
    path = tmp_path / "hook.sh"
    path.write_text(
        "#!/bin/sh\n"
        f'printf "%s|%s|%s|%s|%s|%s|%s|%s\\n" "$1" "$2" "$3" "$4" "$CERTBATCH_ACTION" '
        f'"$CERTBATCH_DOMAIN" "$CERTBATCH_RECORD_NAME" "$CERTBATCH_RECORD_VALUE" >> "{log}"\n'
        f"{body}\n")
    path.chmod(0o755)
    return path, log


def logged(log: Path) -> list[list[str]]:
    return [line.split("|") for line in log.read_text().splitlines()] if log.exists() else []


def test_dns_script_contract_for_wildcard_and_base(tmp_path: Path) -> None:
    path, log = script(tmp_path)
    solver = DnsScriptSolver(path, "c")
    solver.prepare([dns01("example.com", "v1", wildcard=True), dns01("example.com", "v2")],
                   soon())
    record = "_acme-challenge.example.com."
    assert logged(log) == [
        ["add", "example.com", record, "v1", "add", "example.com", record, "v1"],
        ["add", "example.com", record, "v2", "add", "example.com", record, "v2"],
    ]  # both values present before the CA is asked to look
    solver.cleanup()
    assert [c[:4] for c in logged(log)[2:]] == [["remove", "example.com", record, "v1"],
                                                ["remove", "example.com", record, "v2"]]


def per_cert_script(tmp_path: Path, body: str = "") -> tuple[Path, Path]:
    """A dns script logging argv, CERTBATCH_RECORDS and whether the one-record variables are
    set, then running `body`."""
    log = tmp_path / "calls.log"
    path = tmp_path / "hook.sh"
    path.write_text(
        "#!/bin/sh\n"
        f'{{ printf "%s|" "$@"; printf "single=%s\\n" "${{CERTBATCH_DOMAIN+set}}"; '
        f'printf "%s" "$CERTBATCH_RECORDS"; }} >> "{log}"\n'
        f"{body}\n")
    path.chmod(0o755)
    return path, log


def test_dns_script_per_certificate_gets_all_records_in_one_call(tmp_path: Path) -> None:
    path, log = per_cert_script(tmp_path)
    solver = DnsScriptSolver(path, "c", per_certificate=True)
    solver.prepare([dns01("example.com", "v1", wildcard=True), dns01("example.com", "v2"),
                    dns01("www.example.com", "v3")], soon())
    base, www = "_acme-challenge.example.com.", "_acme-challenge.www.example.com."
    records = (f"example.com {base} v1\nexample.com {base} v2\n"
               f"www.example.com {www} v3\n")
    add = (f"add|example.com|{base}|v1|example.com|{base}|v2|www.example.com|{www}|v3|"
           f"single=\n{records}")
    assert log.read_text() == add
    solver.cleanup()
    assert log.read_text() == add + add.replace("add|", "remove|", 1)
    solver.cleanup()  # nothing left to remove: no further call
    assert log.read_text().count("remove|") == 1


def test_dns_script_per_record_also_gets_certbatch_records(tmp_path: Path) -> None:
    path, log = per_cert_script(tmp_path)
    solver = DnsScriptSolver(path, "c")
    solver.prepare([dns01("a.example", "v1")], soon())
    assert log.read_text() == ("add|a.example|_acme-challenge.a.example.|v1|single=set\n"
                               "a.example _acme-challenge.a.example. v1\n")


def test_dns_script_per_certificate_failure_names_every_record(tmp_path: Path) -> None:
    path, log = per_cert_script(tmp_path, 'echo "quota exceeded" >&2; exit 3')
    solver = DnsScriptSolver(path, "c", per_certificate=True)
    with pytest.raises(ChallengeError) as err:
        solver.prepare([dns01("a.example", "v1"), dns01("b.example", "v2")], soon())
    assert str(err.value) == (f"dns script {path} add _acme-challenge.a.example., "
                              f"_acme-challenge.b.example. exited with status 3: quota exceeded")
    solver.cleanup()  # the failed add may have half worked: remove both
    assert log.read_text().splitlines()[-3].startswith(
        "remove|a.example|_acme-challenge.a.example.|v1|b.example|")


def test_dns_script_data_is_never_interpreted_by_a_shell(tmp_path: Path) -> None:
    path, log = script(tmp_path)
    solver = DnsScriptSolver(path, "c")
    solver.prepare([dns01("x.example.com", "$(touch pwned);`id`")], soon())
    solver.cleanup()
    assert logged(log)[0][3] == "$(touch pwned);`id`"
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_dns_script_failure_names_script_status_and_last_stderr_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, log = script(tmp_path, 'echo "first" >&2; echo "  API said 403  " >&2; exit 7')
    solver = DnsScriptSolver(path, "c")
    with pytest.raises(ChallengeError) as err:
        solver.prepare([dns01("x.example.com", "v1")], soon())
    assert str(err.value) == (f"dns script {path} add _acme-challenge.x.example.com. exited "
                              f"with status 7: API said 403")
    with caplog.at_level(logging.WARNING, logger="certbatch.challenges"):
        solver.cleanup()  # the failed remove is logged, not raised
    assert [c[0] for c in logged(log)] == ["add", "remove"]
    assert "remove _acme-challenge.x.example.com. exited with status 7" in caplog.text


def test_dns_script_missing_or_not_executable(tmp_path: Path) -> None:
    with pytest.raises(ChallengeError) as err:
        DnsScriptSolver(tmp_path / "missing.sh", "c").prepare([dns01("a.example", "v")], soon())
    assert str(err.value) == f"dns script {tmp_path / 'missing.sh'} does not exist"
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(ChallengeError) as err:
        DnsScriptSolver(plain, "c").prepare([dns01("a.example", "v")], soon())
    assert str(err.value) == f"dns script {plain} is not executable (chmod +x it)"
    with pytest.raises(ChallengeError, match="is not a regular file"):
        DnsScriptSolver(tmp_path, "c").prepare([dns01("a.example", "v")], soon())


def test_dns_script_hanging_past_the_deadline_is_killed(tmp_path: Path) -> None:
    # The script's child (sleep) holds the output pipes: it must be killed as well.
    path, log = script(tmp_path, 'if [ "$1" = add ]; then sleep 30; fi')
    solver = DnsScriptSolver(path, "c")
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline exceeded while dns script"):
        solver.prepare([dns01("x.example.com", "v1")], soon(0.5))
    assert time.monotonic() - t0 < 10  # not the script's 30 s
    solver.cleanup()  # runs although the deadline has passed
    assert [c[0] for c in logged(log)] == ["add", "remove"]


def test_dns_script_own_timeout_is_a_challenge_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(challenges, "SCRIPT_TIMEOUT", 0.3)
    path, _ = script(tmp_path, "sleep 30")
    with pytest.raises(ChallengeError, match="timed out after 0.3 s"):
        DnsScriptSolver(path, "c").prepare([dns01("x.example.com", "v1")], soon())


# -- hooks/dns/challtestsrv.sh -------------------------------------------------------------------

def run_hook(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HOOK), *args], capture_output=True, text=True, timeout=30,
                          env=env)


@pytest.mark.parametrize("args", [
    ("add", "x.example.com", "_acme-challenge.x.example.com.", 'v"},{"host":"evil'),
    ("add", "x.example.com", "_acme-challenge.x.example.com.\n", "value"),
    ("add", "x example.com", "_acme-challenge.x.example.com.", "value"),
    ("list", "x.example.com", "_acme-challenge.x.example.com.", "value"),
    ("add", "x.example.com", "_acme-challenge.x.example.com."),
])
def test_challtestsrv_hook_rejects_bad_input(args: tuple[str, ...]) -> None:
    result = run_hook(*args, env={"PATH": "/usr/bin:/bin",
                                  "CERTBATCH_CHALLTESTSRV_URL": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert result.stderr.startswith("challtestsrv.sh: ")
    assert "curl" not in result.stderr  # refused before any request


def test_challtestsrv_hook_reports_http_errors() -> None:
    result = run_hook("add", "x.example.com", "_acme-challenge.x.example.com.", "value",
                      env={"PATH": "/usr/bin:/bin",
                           "CERTBATCH_CHALLTESTSRV_URL": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 1
    assert "add _acme-challenge.x.example.com. via http://127.0.0.1:" in result.stderr


def test_challtestsrv_hook_against_challtestsrv(pebble: PebbleInstance) -> None:
    env = {"PATH": "/usr/bin:/bin", **pebble.env()}
    for action in ("add", "add", "remove", "remove"):
        result = run_hook(action, "h.example.com", "_acme-challenge.h.example.com.",
                          "Zm9vYmFy_-", env=env)
        assert result.returncode == 0, result.stderr


def test_challtestsrv_hook_checks_every_record_before_any_request() -> None:
    # The second record is bad: nothing may be sent (the port is closed: any request fails
    # with a curl error instead).
    result = run_hook("add", "a.example.com", "_acme-challenge.a.example.com.", "value",
                      "b.example.com", "_acme-challenge.b.example.com.", "bad value",
                      env={"PATH": "/usr/bin:/bin",
                           "CERTBATCH_CHALLTESTSRV_URL": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 1
    assert result.stderr == "challtestsrv.sh: invalid TXT value (expected base64url): bad value\n"
    result = run_hook("add", "a.example.com", "_acme-challenge.a.example.com.", "value", "extra")
    assert result.returncode == 1 and "usage:" in result.stderr


def test_challtestsrv_hook_sets_several_records_in_one_call(pebble: PebbleInstance) -> None:
    env = {"PATH": "/usr/bin:/bin", **pebble.env()}
    records = ("m1.example.com", "_acme-challenge.m1.example.com.", "Zm9vYmFy_-",
               "m1.example.com", "_acme-challenge.m1.example.com.", "c2Vjb25k",
               "m2.example.com", "_acme-challenge.m2.example.com.", "dGhpcmQ")
    assert run_hook("add", *records, env=env).returncode == 0
    assert sorted(pebble.txt("_acme-challenge.m1.example.com.")) == ["Zm9vYmFy_-", "c2Vjb25k"]
    assert pebble.txt("_acme-challenge.m2.example.com.") == ["dGhpcmQ"]
    assert run_hook("remove", *records, env=env).returncode == 0
    assert pebble.txt("_acme-challenge.m1.example.com.") == []
    assert pebble.txt("_acme-challenge.m2.example.com.") == []


def test_challtestsrv_hook_remove_tries_every_record_then_fails() -> None:
    """A stand-in for challtestsrv's management API that refuses the first clear-txt: the
    script must still clear the second name, and then exit 1 naming the failure."""
    import http.server
    import json

    bodies: list[dict[str, str]] = []

    class Api(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(500 if len(bodies) == 1 else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_hook("remove", "a.example.com", "_acme-challenge.a.example.com.", "v1",
                          "b.example.com", "_acme-challenge.b.example.com.", "v2",
                          env={"PATH": "/usr/bin:/bin", "CERTBATCH_CHALLTESTSRV_URL":
                               f"http://127.0.0.1:{server.server_address[1]}"})
    finally:
        server.shutdown()
        server.server_close()
    assert bodies == [{"host": "_acme-challenge.a.example.com."},
                      {"host": "_acme-challenge.b.example.com."}]
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].endswith("failed (HTTP status 500)")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_challtestsrv_hook_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(HOOK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert HOOK.stat().st_mode & stat.S_IXUSR


def test_dns_script_leaving_a_detached_child_does_not_hold_us(tmp_path: Path) -> None:
    """A script that succeeds at once but leaves a daemon holding its output (setsid) must not
    keep certbatch waiting until the deadline, nor be reported as a timeout."""
    path, log = script(tmp_path, 'setsid sleep 8 &')
    solver = DnsScriptSolver(path, "c")
    t0 = time.monotonic()
    solver.prepare([dns01("x.example.com", "v1")], soon(30))
    assert time.monotonic() - t0 < 6  # the daemon sleeps 8 s; room for a loaded CI machine
    solver.cleanup()


def test_webroot_missing_is_a_challenge_error_and_nothing_is_created(tmp_path: Path) -> None:
    """Checked at run time (only this certificate fails), and the webroot is never created."""
    for webroot, what in ((tmp_path / "nowhere", "does not exist"),
                          (tmp_path / "file", "is not a folder")):
        if webroot.name == "file":
            webroot.write_text("")
        with pytest.raises(ChallengeError) as err:
            WebrootSolver(webroot, "c").prepare([http01("tok")], soon())
        assert str(err.value) == f"webroot {webroot} {what}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_stop_brings_the_cleanup_deadline_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Removals run after a signal too, but end within STOPPED_CLEANUP_TIMEOUT of it (dns
    scripts and DNS providers alike; tests/test_signals.py follows a real stop)."""
    now = time.monotonic()
    monkeypatch.setattr(challenges.interrupt, "requested_at", lambda: None)
    assert challenges.cleanup_deadline(now + 60) == now + 60
    monkeypatch.setattr(challenges.interrupt, "requested_at", lambda: now - 4)
    assert challenges.cleanup_deadline(now + 60) == now - 4 + challenges.STOPPED_CLEANUP_TIMEOUT
    assert challenges.cleanup_deadline(now + 1) == now + 1
