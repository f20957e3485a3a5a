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

from cli_helpers import run, write_config

from certbatch.errors import LockBusy


class _Unreachable:
    """A CA nobody listens for (port 9, discard: connection refused on 127.0.0.1)."""

    def __init__(self, tmp_path: Path, port: int = 9) -> None:
        self.directory_url = f"https://127.0.0.1:{port}/dir"
        self.ca_bundle = tmp_path / "ca.pem"
        self.ca_bundle.write_text("")

    def env(self) -> dict[str, str]:
        return {}


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
    ca = _Unreachable(tmp_path)
    cfg = write_config(tmp_path, ca, {f"c{i}": {"domains": [f"c{i}.example.com"]}
                                      for i in range(7)})
    env = dict(os.environ)
    env.pop("CERTBATCH_CONFIG", None)
    # cron: stdout and stderr into one pipe (2>&1), no terminal
    proc = subprocess.run([sys.executable, "-m", "certbatch", "renew", "-c", str(cfg)],
                          env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout
    lines = proc.stdout.splitlines()
    errors = [line for line in lines if line.startswith("certbatch: ")]
    assert len(errors) == 1, lines
    assert re.match(r"certbatch: 7 certificates failed: .*127\.0\.0\.1:9", errors[0]), errors
    assert lines[-1].startswith("7 certificates: 7 failed ("), lines
    assert lines.index(errors[0]) < len(lines) - 1

    # --json: stdout is the report alone, every certificate with its own error
    js = run(["renew", "--json", "--force"], cfg, ca)
    data = json.loads(js.stdout)
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
    cfg = write_config(tmp_path, _Unreachable(tmp_path), {"j": {"domains": ["j.example.com"]}})
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
    cfg = write_config(tmp_path, _Unreachable(tmp_path), {"j": {"domains": ["j.example.com"]}})
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
