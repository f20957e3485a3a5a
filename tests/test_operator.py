"""An operator's day two (issue 15): one stderr line per failure cause with the summary last,
the jitter slept before the run lock, an exit-75 message that names the holder, `status` for
people (and `status NAME`), and `check --online` self-testing http-01 webroots."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli_helpers import NoCA, run, write_config

from certbatch.errors import LockBusy


def certbatch(args: list[str], cfg: Path, **kwargs: object) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("CERTBATCH_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "certbatch", *args, "-c", str(cfg)],
                            env=env, stdin=subprocess.DEVNULL, text=True,
                            **kwargs)  # type: ignore[call-overload]


def wait_until(what: str, check, proc: subprocess.Popen[str] | None = None,
               timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.05)


# -- one line per failure cause, the summary last -------------------------------------------------

def test_an_unreachable_ca_is_one_line_and_the_summary_comes_last_with_2_to_1(tmp_path):
    # Three runs, each in a folder of its own and all at once: each spends ~3.5 s in the CA
    # retries (the backoff between connection attempts), which need not add up.
    env = dict(os.environ)
    env.pop("CERTBATCH_CONFIG", None)
    runs = {}
    for label, args in (("plain", ["renew"]), ("verbose", ["renew", "-v", "--force"]),
                        ("json", ["renew", "--json", "--force"])):
        folder = tmp_path / label
        folder.mkdir()
        cfg = write_config(folder, NoCA(folder), {f"c{i}": {"domains": [f"c{i}.example.com"]}
                                                  for i in range(7)})
        # cron: stdout and stderr into one pipe (2>&1), no terminal; --json: stdout alone
        runs[label] = subprocess.Popen(
            [sys.executable, "-m", "certbatch", *args, "-c", str(cfg)], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if label == "json" else subprocess.STDOUT, text=True)
    out = {}
    for label, proc in runs.items():
        out[label] = proc.communicate(timeout=120)[0]
        assert proc.returncode == 1, out[label]

    lines = out["plain"].splitlines()
    errors = [line for line in lines if line.startswith("certbatch: ")]
    assert len(errors) == 1, lines
    assert re.match(r"certbatch: 7 certificates failed: .*127\.0\.0\.1:9", errors[0]), errors
    assert lines[-1].startswith("7 certificates: 7 failed ("), lines
    assert lines.index(errors[0]) < len(lines) - 1

    # -v: the log lines on stderr come before the summary too
    lines = out["verbose"].splitlines()
    assert any(line.startswith("INFO renew: finished") for line in lines), lines
    assert lines[-1].startswith("7 certificates: 7 failed ("), lines

    # --json: stdout is the report alone, every certificate with its own error
    data = json.loads(out["json"])
    assert [c["outcome"] for c in data["certificates"]] == ["failed"] * 7
    assert all(c["error"] for c in data["certificates"])


def test_failure_lines_group_identical_errors_and_keep_distinct_ones():
    import datetime as dt

    from certbatch import render
    from certbatch.renewal import Decision
    from certbatch.runner import CertResult, RunReport

    def failed(name: str, error: str) -> CertResult:
        return CertResult(name, (f"{name}.example.com",), Decision("renew", "due"),
                          outcome="failed", error=error)

    report = RunReport(started_at=dt.datetime.now(dt.timezone.utc))
    report.certificates = [failed("a", "CA down"), failed("b", "own problem"),
                           failed("c", "CA down")]
    assert render.error_lines(report) == ["2 certificates (a, c) failed: CA down",
                                          "b: failed: own problem"]
    report.certificates = [failed(f"n{i}", "CA down") for i in range(200)]
    assert render.error_lines(report) == ["200 certificates failed: CA down"]


# -- the jitter sleep comes before the run lock; exit 75 names the holder ------------------------

def test_a_sleeping_cron_run_blocks_nobody_and_sigterm_ends_its_sleep(tmp_path):
    cfg = write_config(tmp_path, NoCA(tmp_path), {"j": {"domains": ["j.example.com"]}})
    log = tmp_path / "cron.log"
    sleeper = certbatch(["renew", "--jitter", "600", "--log-file", str(log)], cfg,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until("the cron run sleeps",
                   lambda: log.exists() and "jitter: sleeping" in log.read_text(), sleeper)
        # a manual run meanwhile is not blocked (no exit 75)
        manual = run(["run-hook"], cfg)
        assert (manual.returncode, manual.stdout) == (0, "nothing pending\n"), manual.stderr
        assert not (tmp_path / "state" / ".running").exists()
        sleeper.send_signal(signal.SIGTERM)
        out, err = sleeper.communicate(timeout=10)
    finally:
        if sleeper.poll() is None:
            os.killpg(sleeper.pid, signal.SIGKILL)
            sleeper.wait()
    assert (sleeper.returncode, out, err) == (143, "", "certbatch: interrupted (SIGTERM)\n")
    assert "fetching ACME directory" not in log.read_text()  # it never got to the CA


HOLD = """
import sys, time
from pathlib import Path
from certbatch.runner import run_lock
with run_lock(Path(sys.argv[1]), 0, "renew"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_exit_75_says_which_command_holds_the_lock_and_since_when(tmp_path):
    cfg = write_config(tmp_path, NoCA(tmp_path), {"j": {"domains": ["j.example.com"]}})
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "state")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        marker = json.loads((tmp_path / "state" / ".running").read_text())
        assert marker["pid"] == holder.pid and marker["command"] == "renew"
        for args in (["renew"], ["run-hook"]):
            busy = run(args, cfg)
            assert busy.returncode == 75, busy.stderr
            assert re.fullmatch(
                rf"certbatch: error: another certbatch \(pid {holder.pid}, renew, running "
                rf"since \d\d:\d\d:\d\dZ\) holds the lock {re.escape(str(tmp_path))}/state/"
                rf"\.lock; try again later\n", busy.stderr), busy.stderr
    finally:
        holder.kill()
        holder.wait()
    assert run(["run-hook"], cfg).returncode == 0  # free again; the killed run's marker stays
    assert not (tmp_path / "state" / ".running").exists()  # ...until the next run ends


def test_a_marker_that_is_not_the_holders_names_nobody(tmp_path):
    busy = LockBusy(tmp_path / ".lock", 123, None)
    assert str(busy) == f"another certbatch (pid 123) holds the lock {tmp_path}/.lock; " \
                        f"try again later"
    assert "another certbatch run is in progress" in str(LockBusy(tmp_path / ".lock", None))


# -- status for people; status NAME ---------------------------------------------------------------

LONG = ("the provider said no, at length; " * 6).strip()


def _refusing_dns_script(path: Path, domain: str) -> Path:
    from cli_helpers import DNS_SCRIPT

    path.write_text(f"""#!/bin/sh
if [ "$2" = "{domain}" ]; then
  echo "DNS API refused {domain}: {'the provider said no, at length; ' * 6}" >&2; exit 1
fi
exec {DNS_SCRIPT} "$@"
""")
    path.chmod(0o755)
    return path


def test_status_words_a_failed_renewal_and_status_name_tells_everything(tmp_path, pebble):
    from cli_helpers import dns01
    from test_cron import readme_status_fields

    cfg = write_config(tmp_path, pebble, {"site": {"domains": ["st-site.example.com"]},
                                          "other": {"domains": ["st-other.example.com"]}})
    first = run(["renew", "--no-notify"], cfg, pebble)
    assert first.returncode == 0, first.stderr
    # a name added that the DNS API refuses: its reissue fails, the old certificate stays (a
    # name Pebble validated before would be reused without a challenge)
    bad = _refusing_dns_script(tmp_path / "refuse.sh", "st-new.example.com")
    cfg = write_config(tmp_path, pebble, {
        "site": {"domains": ["st-site.example.com", "st-new.example.com"]},
        "other": {"domains": ["st-other.example.com"]}}, defaults={"challenge": dns01(bad)})
    failed = run(["renew", "--only", "site", "--no-notify"], cfg, pebble)
    assert failed.returncode == 1

    table = run(["status"], cfg, pebble, env={"COLUMNS": ""})  # no terminal: 100 columns
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    site = next(line for line in lines if line.startswith("site "))
    head = site.index("renewal failed")  # the last column keeps 30 characters at least
    assert len(site) == max(100, head + 30) and site.endswith("..."), site
    assert re.search(r"renewal failed \d{4}-\d\d-\d\d", site), site
    assert re.search(r"^other .* issued \d{4}-\d\d-\d\d \d\d:\d\dZ$", table.stdout, re.M)
    assert "`certbatch status NAME` shows everything" in table.stdout
    assert "force" not in table.stdout

    wide = run(["status"], cfg, pebble, env={"COLUMNS": "1000"})
    site = next(line for line in wide.stdout.splitlines() if line.startswith("site "))
    assert re.search(r"renewal failed .*DNS API refused st-new\.example\.com.*; the "
                     r"certificate from \d{4}-\d\d-\d\d is still live$", site), site

    detail = run(["status", "site"], cfg, pebble)
    assert detail.returncode == 0, detail.stderr
    text = detail.stdout
    live = tmp_path / "state" / "certs" / "site" / "live"
    for name in ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"):
        assert f"  {name}: {live / name}\n" in text
    meta = json.loads((live / "meta.json").read_text())
    assert f"serial: {meta['serial']}\n" in text
    assert LONG in text  # the whole error
    assert re.search(r"^backoff: 1 failed order in a row; next order not before ", text, re.M)
    assert re.search(r"^pending: serial [0-9a-f]+, staged ", text, re.M), text  # --no-notify
    assert "targets: none" in text

    js = json.loads(run(["status", "site", "--json"], cfg, pebble).stdout)["certificate"]
    assert js["live"]["files"]["fullchain.pem"] == str(live / "fullchain.pem")
    assert LONG in js["last_error"]
    assert js["pending"]["serial"] == meta["serial"] and js["failed_orders"] == 1

    rows = json.loads(run(["status", "--json"], cfg, pebble).stdout)["certificates"]
    assert [set(r) for r in rows] == [readme_status_fields()] * 2
    assert rows[0]["not_before"][:10] == meta["not_before"][:10]

    unknown = run(["status", "nope"], cfg, pebble)
    assert unknown.returncode == 2 and "nope" in unknown.stderr


# -- check --online self-tests http-01 webroots (a real nginx) ------------------------------------

class _WebrootNginx:
    """The real nginx of the nginx tests (nginx_server.NginxServer) serving `webroot` over
    plain HTTP on a free port on 127.0.0.1, and on `extra_port` too (80: where the CA, and so
    `check --online`, connects)."""

    def __init__(self, workdir: Path, webroot: Path, extra_port: int | None = None) -> None:
        from nginx_server import NginxServer, _q

        class Server(NginxServer):
            def _config(self) -> str:
                extra = f"listen 127.0.0.1:{extra_port};" if extra_port else ""
                return f"""{self._config_head()}    server {{
        listen 127.0.0.1:{self.port};
        {extra}
        server_name localhost;
        location /.well-known/acme-challenge/ {{ root {_q(webroot)}; default_type text/plain; }}
    }}
}}
"""

        self.server = Server(workdir, workdir, [])

    def __enter__(self):
        return self.server.start()

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def _http01(webroot: Path) -> dict:
    return {"type": "http-01", "webroot": str(webroot)}


def _nginx_or_skip() -> None:
    import pytest
    from nginx_server import NGINX_BIN

    if not os.access(NGINX_BIN, os.X_OK):
        pytest.skip("nginx is not installed")


def test_webroot_probe_ok_wrong_webroot_and_unreachable_name(tmp_path):
    """The core: each name's result, the file's path and URL; the probe files are removed."""
    from certbatch import config
    from certbatch.webroot_probe import OK, PROBLEM, WARNING, probe_all

    _nginx_or_skip()
    served, wrong = tmp_path / "www", tmp_path / "elsewhere"
    served.mkdir()
    wrong.mkdir()
    (wrong / ".well-known").mkdir()  # already there: kept
    cfg = write_config(tmp_path, NoCA(tmp_path), {
        "good": {"domains": ["localhost"], "challenge": _http01(served)},
        "wrong": {"domains": ["localhost"], "challenge": _http01(wrong)},
        "far": {"domains": ["no-such-name.invalid"], "challenge": _http01(served)},
        "dns": {"domains": ["d.example.com"]}})  # dns-01: not probed
    settings = config.load(cfg)
    with _WebrootNginx(tmp_path / "nginx", served) as nginx:
        results = probe_all(list(settings.certificates.values()), timeout=3, port=nginx.port)
    by_name = {cert.name: res for cert, res in results}
    assert sorted(by_name) == ["far", "good", "wrong"]
    (good,), (bad,), (far,) = by_name["good"], by_name["wrong"], by_name["far"]
    assert isinstance(good, type(bad))
    assert good.level == OK and good.path.parent == served / ".well-known" / "acme-challenge"
    assert good.url == f"http://localhost:{nginx.port}/.well-known/acme-challenge/" \
                       f"{good.path.name}"
    assert bad.level == PROBLEM and "HTTP 404" in bad.detail and str(wrong) in bad.detail
    assert bad.path.parent == wrong / ".well-known" / "acme-challenge"
    assert far.level == WARNING and "cannot reach its own name" in far.detail
    # always removed, and the folders certbatch made with them; a folder that was there stays
    assert sorted(p.name for p in served.iterdir()) == []
    assert sorted(str(p.relative_to(wrong)) for p in wrong.rglob("*")) == [".well-known"]


def test_check_online_reports_each_name_with_path_and_url(tmp_path, pebble):
    """The command, by the names as the CA would fetch them (port 80 on 127.0.0.1)."""
    import pytest

    _nginx_or_skip()
    served, wrong = tmp_path / "www", tmp_path / "elsewhere"
    served.mkdir()
    wrong.mkdir()
    cfg = write_config(tmp_path, pebble, {
        "good": {"domains": ["localhost"], "challenge": _http01(served)},
        "far": {"domains": ["no-such-name.invalid"], "challenge": _http01(served)}})
    try:
        nginx_cm = _WebrootNginx(tmp_path / "nginx", served, extra_port=80)
        nginx_cm.__enter__()
    except RuntimeError as exc:  # port 80 taken on this machine
        pytest.skip(f"nginx cannot listen on 127.0.0.1:80: {exc}")
    try:
        ok = run(["check", "--online"], cfg, pebble)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert re.search(r"^http-01 good localhost: ok, the probe file came back: "
                         r"http://localhost/\.well-known/acme-challenge/[\w-]+ \(file "
                         + re.escape(str(served)) + r"/\.well-known/acme-challenge/[\w-]+\)$",
                         ok.stdout, re.M), ok.stdout
        assert re.search(r"^certbatch: warning: far: http-01 no-such-name\.invalid: this host "
                         r"cannot reach its own name .*http://no-such-name\.invalid/", ok.stderr,
                         re.M), ok.stderr
        # the same name through a webroot nginx does not serve: a problem, exit 1
        cfg = write_config(tmp_path, pebble, {
            "good": {"domains": ["localhost"], "challenge": _http01(wrong)}})
        bad = run(["check", "--online"], cfg, pebble)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert re.search(r"^certbatch: problem: good: http-01 localhost: HTTP 404 Not Found: "
                         r"the web server does not serve " + re.escape(str(wrong)) +
                         r" for localhost: http://localhost/\.well-known/acme-challenge/[\w-]+ "
                         r"\(file " + re.escape(str(wrong)), bad.stderr, re.M), bad.stderr
    finally:
        nginx_cm.__exit__(None, None, None)
    assert list(served.iterdir()) == [] and list(wrong.iterdir()) == []


def test_the_live_display_prints_each_failure_cause_once():
    import io

    from certbatch import render
    from certbatch.renewal import Decision
    from certbatch.runner import CertResult

    stream = io.StringIO()
    progress = render.RichProgress(stream)
    results = [CertResult(f"c{i}", (f"c{i}.example.com",), Decision("renew", "due"))
               for i in range(4)]
    progress.planned(results)
    for i, r in enumerate(results):
        r.outcome, r.error = "failed", "CA down" if i < 3 else "own problem"
        progress.finished(r)
    progress.stop()
    text = stream.getvalue()
    assert text.count("CA down") == 1 and "c0: failed: CA down" in text
    assert "c3: failed: own problem" in text and progress.failed == 4


def test_webroot_probe_uses_each_names_webroot_of_a_webroot_map(tmp_path):
    from certbatch import config
    from certbatch.webroot_probe import OK, PROBLEM, probe_all

    _nginx_or_skip()
    served, other = tmp_path / "www", tmp_path / "other"
    served.mkdir()
    other.mkdir()
    cfg = write_config(tmp_path, NoCA(tmp_path), {
        "right": {"domains": ["localhost"], "challenge": {
            "type": "http-01", "webroot_map": {"localhost": str(served)}}},
        "wrong": {"domains": ["localhost"], "challenge": {
            "type": "http-01", "webroot": str(served),
            "webroot_map": {"localhost": str(other)}}}})
    settings = config.load(cfg)
    with _WebrootNginx(tmp_path / "nginx", served) as nginx:
        results = dict((c.name, r) for c, r in probe_all(
            list(settings.certificates.values()), timeout=3, port=nginx.port))
    (right,), (wrong,) = results["right"], results["wrong"]
    assert right.level == OK and right.path.parent == served / ".well-known/acme-challenge"
    assert wrong.level == PROBLEM and wrong.path.parent == other / ".well-known/acme-challenge"
    assert list(served.iterdir()) == [] and list(other.iterdir()) == []


def test_status_name_shows_each_targets_ledger(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, {"t": {"domains": ["st-target.example.com"]}})
    hook = tmp_path / "hooks" / "notify.d" / "10-ok"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    first = run(["renew"], cfg, pebble)
    assert first.returncode == 0, first.stderr
    later = tmp_path / "hooks" / "notify.d" / "20-new"  # a target added since
    later.write_text("#!/bin/sh\nexit 0\n")
    later.chmod(0o755)
    text = run(["status", "t"], cfg, pebble).stdout
    assert "pending: no\n" in text
    assert "target 10-ok: has the live certificate\n" in text, text
    assert "target 20-new: has nothing of it yet\n" in text, text
    js = json.loads(run(["status", "t", "--json"], cfg, pebble).stdout)["certificate"]
    serial = json.loads((tmp_path / "state/certs/t/live/meta.json").read_text())["serial"]
    assert [(t["target"], t["applied_serial"], t["has_live"]) for t in js["targets"]] == [
        ("10-ok", serial, True), ("20-new", None, False)]
