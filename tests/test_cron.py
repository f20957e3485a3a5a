"""Cron-grade operation, through the real command: what a terminal shows, what cron mails, the log
file, jitter, `check` and `status --json`.

Every test runs `python -m certbatch` as a separate process, like cron or an operator would; the
terminal test gives it a real pseudo-terminal and replays what it wrote on a small screen model.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from cli_helpers import DNS_SCRIPT, REPO, NoCA, dns01, live, run, write_config

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
LOG_LINE = re.compile(rf"^({TIMESTAMP}) \d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) [a-z_.]+: (.*)$")


def failing_dns_script(path: Path, bad_domain: str, why: str = "") -> Path:
    """The challtestsrv script, except that it refuses one domain (a broken DNS API)."""
    path.write_text(f"""#!/bin/sh
if [ "$2" = "{bad_domain}" ]; then echo "DNS API refused {bad_domain}{why}" >&2; exit 1; fi
exec {DNS_SCRIPT} "$@"
""")
    path.chmod(0o755)
    return path


def hook(path: Path, body: str, executable: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def log_records(path: Path) -> list[tuple[dt.datetime, str]]:
    """(time, message) of every line of a log file; fails on a line that is not timestamped."""
    records = []
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line)
        assert m, f"log line without timestamp/level/logger: {line!r}"
        records.append((dt.datetime.fromisoformat(m.group(1)), m.group(3)))
    return records


# -- on a terminal ----------------------------------------------------------------------------

COLS, ROWS = 120, 40
CSI = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z])")


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 60
               ) -> tuple[int, str]:
    """Run certbatch with stdin, stdout and stderr on a COLS x ROWS pseudo-terminal; return its
    exit status and everything it wrote."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("CERTBATCH_CONFIG", "NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES",
                             "TERM", "CI")}
    full_env.update(env, TERM="xterm-256color")
    proc = subprocess.Popen([sys.executable, "-m", "certbatch", *args], stdin=slave,
                            stdout=slave, stderr=slave, env=full_env, start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None and not select.select([master], [], [], 0.2)[0]:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            raise AssertionError(f"certbatch {args} still running after {timeout} s")
        status = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return status, b"".join(chunks).decode("utf-8", errors="replace")


def final_screen(raw: str, width: int = COLS) -> list[str]:
    """Replay terminal output (the control sequences rich uses) and return every line as it
    finally stands, scrollback included. An escape sequence we don't model fails the test."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\x1b":
            m = CSI.match(raw, i)
            assert m, f"unexpected escape sequence {raw[i:i + 12]!r}"
            params, cmd = m.groups()
            n = int(params) if params.isdigit() else None
            if cmd == "A":
                row = max(0, row - (n or 1))
            elif cmd == "B":
                row += n or 1
            elif cmd == "C":
                col += n or 1
            elif cmd == "D":
                col = max(0, col - (n or 1))
            elif cmd == "G":
                col = (n or 1) - 1
            elif cmd == "K":
                while len(lines) <= row:
                    lines.append([])
                line = lines[row]
                if (n or 0) == 0:
                    del line[col:]
                elif n == 1:
                    line[:col] = [" "] * min(col, len(line))
                else:
                    line.clear()
            elif cmd in "mhl":
                pass  # colours, cursor shown/hidden
            else:
                raise AssertionError(f"unexpected escape sequence {m.group(0)!r}")
            i = m.end()
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
        elif ch in "\x07\x08":
            col = max(0, col - 1) if ch == "\x08" else col
        else:
            if col >= width:  # deferred auto-wrap, as terminals do
                row, col = row + 1, 0
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            line.extend(" " * (col - len(line)))
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    return [("".join(line)).rstrip() for line in lines]


def test_terminal_live_progress_then_a_clean_summary_table(tmp_path, pebble):
    # brackets in an error are text, not rich markup (this one used to crash the run)
    bad = failing_dns_script(tmp_path / "bad-dns.sh", "tty-bad.example.com", " [/zone] [emerg]")
    cfg = write_config(tmp_path, pebble, {
        "alpha": {"domains": ["tty-alpha.example.com"]},
        "bravo": {"domains": ["tty-bravo.example.com"]},
        "charlie": {"domains": ["tty-charlie.example.com"]},
        "broken": {"domains": ["tty-bad.example.com"]},
    }, defaults={"challenge": dns01(bad)})
    status, raw = run_in_pty(["-c", str(cfg), "renew"], pebble.env())
    assert status == 1, raw  # one certificate failed

    # The live display ran: description, done/total, and it counted to the end.
    assert "renewing" in raw and "4/4" in raw, raw
    # The failure was printed in red while the live display was up (redrawn below it after).
    red = re.search(r"\x1b\[31mbroken: failed: dns script ", raw)
    assert red and red.start() < raw.rindex("4/4"), raw

    screen = final_screen(raw)
    text = "\n".join(screen)
    # transient: no progress line is left over on the final screen
    assert not any(re.search(r"renewing|applying|\d/4 \d:\d\d:\d\d", line) for line in screen), text
    # exactly one copy of the error: no raw logging output next to rich's line
    assert sum("DNS API refused" in line for line in screen) == 2, text  # red line + table cell
    failure_line = next(i for i, line in enumerate(screen) if line.startswith("broken: failed:"))
    assert "refused tty-bad.example.com [/zone] [emerg]" in " ".join(screen[failure_line:]), text
    header = next(i for i, line in enumerate(screen)
                  if re.search(r"certificate\s*┃\s*outcome", line))
    assert failure_line < header, text  # printed during the run, the table comes after
    rows = {}
    for line in screen[header + 1:]:
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) >= 2 and cells[0]:
            rows[cells[0]] = cells[1]
    assert rows == {"alpha": "issued", "bravo": "issued", "charlie": "issued",
                    "broken": "failed"}, text
    assert screen[-1].startswith("4 certificates: 3 issued, 1 failed"), text
    # no notify target in this set-up: said in one line (it may wrap on this narrow screen)
    assert any(line.startswith("notify: no notify targets") for line in screen), text
    assert all(len(line) <= COLS for line in screen)


# -- not on a terminal (cron) -------------------------------------------------------------------

def test_cron_renewed_run_prints_a_short_summary_on_stdout_only(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, {
        "one": {"domains": ["cron-one.example.com"]},
        "two": {"domains": ["cron-two.example.com"]},
    })
    hook(tmp_path / "hooks" / "deploy.d" / "10-chatty", 'echo "deploying $CERTBATCH_NAME"')
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    # one line per renewed certificate, the batch, the totals: no per-step or hook noise
    assert len(lines) == 4, result.stdout
    assert lines[0].split()[:2] == ["one", "issued"] and lines[1].split()[:2] == ["two", "issued"]
    assert f"serial {live(tmp_path, 'one')['serial']}" in lines[0]
    assert lines[2].startswith("notify: no notify targets") and \
        "2 certificates marked applied without running anything" in lines[2]
    assert lines[3].startswith("2 certificates: 2 issued (")
    assert "deploying" not in result.stdout and "ordering" not in result.stdout

    # a single forced renewal: the same short shape, singular
    forced = run(["renew", "--force", "--only", "two"], cfg, pebble)
    assert forced.returncode == 0 and forced.stderr == ""
    assert [line.split()[:2] for line in forced.stdout.splitlines()[:1]] == [["two", "renewed"]]
    assert forced.stdout.splitlines()[-1].startswith("1 certificate: 1 renewed (")


def test_quiet_verbose_and_status_json(tmp_path, pebble):
    bad = failing_dns_script(tmp_path / "bad-dns.sh", "cron-bad.example.com")
    cfg = write_config(tmp_path, pebble, {
        "good": {"domains": ["cron-good.example.com"]},
        "bad": {"domains": ["cron-bad.example.com"]},
    }, defaults={"challenge": dns01(bad)})
    # --quiet: nothing on stdout, exactly one error line on stderr for the failed certificate
    quiet = run(["renew", "-q"], cfg, pebble)
    assert quiet.returncode == 1
    assert quiet.stdout == ""
    assert quiet.stderr.splitlines() == [
        f"certbatch: bad: failed: dns script {bad} add _acme-challenge.cron-bad.example.com. "
        f"exited with status 1: DNS API refused cron-bad.example.com"], quiet.stderr
    assert live(tmp_path, "good")["domains"] == ["cron-good.example.com"]
    # --quiet and a success: nothing at all
    ok = run(["renew", "-q", "--only", "good", "--force", "--no-notify"], cfg, pebble)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")

    # status --json: the fields docs/report.md documents, for an issued and a failed certificate,
    # and the certificate left pending by --no-notify
    status = run(["status", "--json"], cfg, pebble)
    assert status.returncode == 0 and status.stderr == ""
    data = json.loads(status.stdout)
    assert set(data) == {"schema_version", "certificates", "pending", "targets"}
    assert data["schema_version"] == 2 and data["pending"] == ["good"]
    assert data["targets"] == []
    documented = readme_status_fields()
    assert [set(c) for c in data["certificates"]] == [documented, documented]
    good, bad_row = data["certificates"]
    assert good["name"] == "good" and good["domains"] == ["cron-good.example.com"]
    assert good["serial"] == live(tmp_path, "good")["serial"]
    assert good["due"] is False and good["decision"] == "skip" and good["days_left"] > 30
    assert good["last_result"] == "renewed" and good["last_error"] is None
    for key in ("not_after", "due_at", "last_attempt", "last_success"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", good[key]), (key, good[key])
    assert good["rate_limited_until"] is None
    assert bad_row["name"] == "bad" and bad_row["serial"] is None
    assert bad_row["days_left"] is None and bad_row["not_after"] is None
    # Right after its failed order it backs off (a minute) before ordering again.
    assert bad_row["due"] is False and bad_row["decision"] == "backoff"
    assert bad_row["failed_orders"] == 1 and bad_row["next_attempt"] is not None
    assert bad_row["last_result"] == "failed" and "DNS API refused" in bad_row["last_error"]
    assert bad_row["last_success"] is None

    # -v: every decision on stderr, even with nothing due; this run's notify phase applies the
    # certificate --no-notify left pending
    verbose = run(["renew", "-v", "--only", "good"], cfg, pebble)
    assert verbose.returncode == 0, verbose.stderr
    assert re.search(r"^INFO good: skip \(due \d{4}-\d\d-\d\d", verbose.stderr, re.M), \
        verbose.stderr
    assert "good" in verbose.stdout and "not-due" in verbose.stdout
    assert re.search(r"^notify: no notify targets .*: 1 certificate marked applied without "
                     r"running anything$", verbose.stdout, re.M)


def readme_status_fields() -> set[str]:
    """The per-certificate fields docs/report.md's "JSON report" section lists for status
    --json."""
    text = " ".join((REPO / "docs" / "report.md").read_text().split())
    m = re.search(r"`certbatch status --json` prints.*?per certificate,(.*?)\.(?: |$)", text)
    assert m, "docs/report.md no longer documents status --json fields"
    fields = set(re.findall(r"`([a-z_]+)`", m.group(1)))
    assert len(fields) >= 10, fields
    return fields


# -- log file ------------------------------------------------------------------------------------

def test_log_file_has_every_step_and_no_secrets(tmp_path, pebble_factory):
    hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    inst = pebble_factory(config={"externalAccountBindingRequired": True,
                                  "externalAccountMACKeys": {"kid-cron": hmac_key}})
    bad = failing_dns_script(tmp_path / "bad-dns.sh", "log-bad.example.com")
    cfg = write_config(tmp_path, inst, {
        "site": {"domains": ["log-site.example.com"]},
        "bad": {"domains": ["log-bad.example.com"]},
    }, defaults={"challenge": dns01(bad)},
        acme={"eab": {"kid": "kid-cron", "hmac_key": hmac_key}},
        logging={"file": "logs/certbatch.log"})
    (tmp_path / "logs").mkdir()
    hook(tmp_path / "hooks" / "deploy.d" / "10-say", 'echo "deploy-hook says $CERTBATCH_NAME"')
    hook(tmp_path / "hooks" / "notify.d" / "50-say",
         'echo "notify-hook says $CERTBATCH_NAMES"; echo "a warning" >&2')
    result = run(["renew", "-vv"], cfg, inst)
    assert result.returncode == 1, result.stderr  # "bad" failed
    assert live(tmp_path, "site")["domains"] == ["log-site.example.com"]  # EAB account worked

    log_path = tmp_path / "logs" / "certbatch.log"
    records = log_records(log_path)
    messages = [msg for _, msg in records]
    text = "\n".join(messages)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, msg) for msg in messages)

    assert has(r"^certbatch \S+ renew: started"), text
    assert has(r"^site: issue \(no certificate yet\)$"), text  # the decision
    assert has(r"^site: ordering a certificate for log-site\.example\.com$"), text
    assert has(r"^site: finalizing the order$") and has(r"^site: certificate issued$"), text
    assert has(r"registered account"), text
    deploy = re.escape(str(tmp_path / "hooks" / "deploy.d" / "10-say"))
    notify = re.escape(str(tmp_path / "hooks" / "notify.d" / "50-say"))
    assert has(rf"^hook 10-say: starting {deploy} in "), text
    assert has(r"^hook 10-say: exit status 0 after \d+\.\d\d s$"), text
    assert has(r"^hook 10-say stdout: deploy-hook says site$"), text
    assert has(rf"^hook 50-say: starting {notify} in "), text
    assert has(r"^hook 50-say: exit status 0 after \d+\.\d\d s$"), text
    assert has(r"^hook 50-say stdout: notify-hook says site$"), text
    assert has(r"^hook 50-say stderr: a warning$"), text
    assert has(r"^bad: dns script .* exited with status 1: DNS API refused"), text  # the error
    assert has(r"^renew: finished in \d+\.\d s, exit code 1 \(1 issued, 1 failed\)$"), text

    raw = log_path.read_text()
    for output in (raw, result.stdout, result.stderr):
        assert "PRIVATE KEY" not in output
        assert hmac_key not in output
        assert hmac_key[:16] not in output
    # -vv also wrote the debug lines to stderr, with the same care
    assert "DEBUG" in result.stderr and "DEBUG" in raw


def test_log_file_that_cannot_be_opened_is_a_usage_error(tmp_path):
    cfg = write_config(tmp_path, NoCA(tmp_path), {"s": {"domains": ["s.example.com"]}})
    result = run(["--log-file", str(tmp_path / "no" / "such" / "dir.log"), "renew"], cfg)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "--log-file" in result.stderr
    assert not (tmp_path / "state").exists()


# -- jitter --------------------------------------------------------------------------------------

JITTER = re.compile(r"^jitter: sleeping (\d+\.\d) s before taking the run lock ")


def jitter_sleeps(records: list[tuple[dt.datetime, str]]) -> list[tuple[float, float]]:
    """(announced seconds, seconds until the next log line) for every jitter line."""
    found = []
    for i, (t, msg) in enumerate(records):
        m = JITTER.match(msg)
        if m:
            found.append((float(m.group(1)), (records[i + 1][0] - t).total_seconds()))
    return found


def test_jitter_only_when_something_is_due(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, {"j": {"domains": ["jitter.example.com"]}},
                       renewal={"jitter": 1})
    log_path = tmp_path / "run.log"

    # renewal.jitter from the config when --jitter is absent
    first = run(["renew", "--log-file", str(log_path)], cfg, pebble)
    assert first.returncode == 0, first.stderr
    sleeps = jitter_sleeps(log_records(log_path))
    assert len(sleeps) == 1 and 0 <= sleeps[0][0] <= 1.0, sleeps

    # nothing due: no sleep at all, even with a long jitter
    log_path.unlink()
    t0 = time.monotonic()
    idle = run(["renew", "--jitter", "30", "--log-file", str(log_path)], cfg, pebble)
    assert time.monotonic() - t0 < 3
    assert (idle.returncode, idle.stdout, idle.stderr) == (0, "", "")
    assert jitter_sleeps(log_records(log_path)) == []

    # something due: one sleep of 0..2 s, really taken, before the first ACME request
    log_path.unlink()
    t0 = time.monotonic()
    forced = run(["renew", "--force", "--jitter", "2", "--log-file", str(log_path)], cfg, pebble)
    elapsed = time.monotonic() - t0
    assert forced.returncode == 0, forced.stderr
    records = log_records(log_path)
    sleeps = jitter_sleeps(records)
    assert len(sleeps) == 1, sleeps
    announced, gap = sleeps[0]
    assert 0 <= announced <= 2.0
    assert gap >= announced - 0.1  # nothing happened during the announced sleep
    assert elapsed >= announced - 0.1
    at = next(i for i, (_, msg) in enumerate(records) if JITTER.match(msg))
    first_request = next(i for i, (_, msg) in enumerate(records)
                         if re.search(r"fetching ACME directory|ordering", msg))
    assert at < first_request, records

    # --jitter 0 overrides renewal.jitter
    log_path.unlink()
    now = run(["renew", "--force", "--jitter", "0", "--log-file", str(log_path)], cfg, pebble)
    assert now.returncode == 0, now.stderr
    assert jitter_sleeps(log_records(log_path)) == []


# -- certbatch check -----------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_check_lists_certificates_hooks_and_paths(tmp_path):
    cfg = write_config(tmp_path, NoCA(tmp_path), {
        "web": {"domains": ["web.example.com", "www.example.com"]},
        "api": {"domains": ["api.example.com"], "deploy": "/bin/true"},
    })
    hook(tmp_path / "hooks" / "notify.d" / "50-reload", "exit 0")
    hook(tmp_path / "hooks" / "notify.d" / "60-off.disabled", "exit 0", executable=False)
    hook(tmp_path / "hooks" / "notify.d" / "50-reload.bak", "exit 0")
    result = run(["check"], cfg)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout.splitlines()
    assert f"config: {cfg} (ok)" in out
    assert f"state: {tmp_path / 'state'} (will be created)" in out
    assert f"hooks: {tmp_path / 'hooks'} (exists)" in out
    assert "  web: web.example.com www.example.com [ec-p256, dns-01 script " \
           f"{DNS_SCRIPT} (per-record)]" in out
    assert any(line.startswith("  api: api.example.com") for line in out)
    assert "    deploy: /bin/true" in out
    assert any(line.startswith("deploy.d: 0 hooks") for line in out)
    assert any(line.startswith("notify.d: 1 hook will run") for line in out)
    assert "  50-reload (executable)" in out
    assert "  60-off.disabled (skipped: hidden or backup name)" in out
    assert "  50-reload.bak (skipped: hidden or backup name)" in out
    assert "notify targets: 1 (at most 4 at a time)" in out
    assert f"  50-reload: {tmp_path / 'hooks' / 'notify.d' / '50-reload'} [timeout 300 s]" in out
    assert not (tmp_path / "state").exists()  # check writes nothing

    # A notify.d file without its execute bit is a target that cannot run: a problem.
    hook(tmp_path / "hooks" / "notify.d" / "60-forgot", "exit 0", executable=False)
    broken = run(["check"], cfg)
    assert broken.returncode == 1
    assert broken.stderr == (f"certbatch: problem: {tmp_path / 'hooks/notify.d/60-forgot'}: "
                             "not executable (chmod +x it, or rename it to 60-forgot.disabled "
                             "to turn it off)\n")
    assert "  60-forgot (PROBLEM: not executable" in broken.stdout
    assert "  60-forgot: CANNOT RUN: " in broken.stdout


def test_check_quiet_prints_only_problems(tmp_path):
    down = NoCA(tmp_path, closed_port())
    cfg = write_config(tmp_path, down, {"web": {"domains": ["web.example"]}})
    ok = run(["-q", "check"], cfg)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    bad = run(["check", "--online", "-q"], cfg, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("certbatch: problem: acme directory: "), bad.stderr
    assert len(bad.stderr.splitlines()) == 1


def test_check_reports_a_folder_its_parent_does_not_let_us_create(tmp_path):
    """`check` as a user who may not write into the parent of a state folder that does not
    exist yet. As root (who may write anywhere) the check runs in a forked child that has
    dropped to uid 65534; the config lives in a world-readable folder for it."""
    import encodings.utf_8_sig  # noqa: F401 - imported before dropping root (config reading)
    import tempfile

    from certbatch import cli, config_cache, hooks, store  # noqa: F401 - likewise

    top = Path(tempfile.mkdtemp(prefix="certbatch-check-"))
    try:
        top.chmod(0o755)
        locked = top / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        anyone = top / "anyone"
        anyone.mkdir()
        cfg = write_config(top, NoCA(top), {"web": {"domains": ["web.example"]}},
                           paths={"state": str(locked / "state"),
                                  "spool": str(anyone / "spool"),
                                  "hooks": str(top / "hooks")})
        for path in (cfg, *top.rglob("*")):
            path.chmod(path.stat().st_mode | 0o555 if path.is_dir() else 0o644)
        locked.chmod(0o555)
        anyone.chmod(0o777)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery from here on, only os._exit
            code = 3
            try:
                # pytest captures sys.stdout/stderr: give the child real ones on the pipe
                sys.stdout = sys.stderr = open(write_fd, "w", closefd=False)  # noqa: SIM115
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    cli.main(["check", "-c", str(cfg)])
                    code = 0
                    sys.stdout.flush()
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 3
                    sys.stdout.flush()
                except BaseException:  # shown in the parent's assertion message
                    import traceback

                    traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd) as fh:
            output = fh.read()
        _, status = os.waitpid(pid, 0)
    finally:
        (top / "locked").chmod(0o755)
        import shutil

        shutil.rmtree(top, ignore_errors=True)
    assert os.waitstatus_to_exitcode(status) == 1, output
    assert f"state: {locked / 'state'} (CANNOT be created: {locked} is not writable)" in output
    assert (f"certbatch: problem: state folder {locked / 'state'} cannot be created: {locked} "
            "is not writable") in output
    assert f"spool: {top / 'anyone' / 'spool'} (will be created)" in output


def test_check_online(tmp_path, pebble):
    good = write_config(tmp_path / "good", pebble, {"s": {"domains": ["s.example.com"]}})
    result = run(["check", "--online"], good, pebble)
    assert result.returncode == 0, result.stderr
    assert f"acme directory reachable: {pebble.directory_url}" in result.stdout

    down = NoCA(tmp_path, closed_port())
    cfg = write_config(tmp_path / "down", down, {"s": {"domains": ["s.example.com"]}})
    result = run(["check", "--online"], cfg, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("certbatch: problem: acme directory: ")
    assert down.directory_url in lines[0]


def test_check_invalid_config_is_one_line_exit_2(tmp_path):
    cfg = write_config(tmp_path, NoCA(tmp_path), {"s": {"domains": ["s.example.com"]}},
                       renewal={"workers": 0})
    result = run(["check"], cfg)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and "renewal.workers" in lines[0], lines
