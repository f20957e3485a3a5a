"""`certbatch check` never crashes: every path it looks at that cannot be used (a symlink loop, a
FIFO, a file where a folder belongs, a folder it may not read) is a problem line (exit 1),
never a traceback; the same paths stop status, renew and run-hook with one line each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import run, write_config
from test_oserrors import NOBODY, NoCA, as_nobody, no_traceback, nobody_home, one_error, open_folder

LOOP = "symlink loop (too many levels of symbolic links)"


@pytest.fixture
def top() -> Iterator[Path]:
    with open_folder() as path:
        yield path


def hook(path: Path, body: str = "exit 0") -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def problems(result) -> list[str]:
    no_traceback(result)
    assert result.returncode == 1, (result.returncode, result.stderr)
    return result.stderr.splitlines()


def test_check_lists_a_file_a_missing_parent_a_loop_and_a_fifo_as_problems(top):
    (top / "state").write_text("")  # a file where the state folder belongs
    (top / "plain").write_text("")
    cfg = write_config(top, NoCA(top), {"web": {"domains": ["web.example.com"]}},
                       paths={"state": "./state", "spool": "./plain/spool", "hooks": "./hooks"})
    notify = top / "hooks" / "notify.d"
    notify.rmdir()
    notify.symlink_to("notify.d")  # a loop
    os.mkfifo(top / "hooks" / "deploy.d" / "10-fifo")
    hook(top / "hooks" / "deploy.d" / "20-copy")

    result = run(["check"], cfg)
    assert problems(result) == [
        f"certbatch: problem: state folder {top / 'state'} is not a folder",
        f"certbatch: problem: spool folder {top / 'plain' / 'spool'}: not a directory",
        f"certbatch: problem: {top / 'hooks' / 'deploy.d' / '10-fifo'}: not a regular file",
        f"certbatch: problem: notify.d folder {notify}: {LOOP}",
    ]
    out = result.stdout.splitlines()
    assert f"state: {top / 'state'} (NOT A FOLDER)" in out
    assert f"notify.d: CANNOT be read: {notify}: {LOOP}" in out
    assert "  20-copy (executable)" in out
    assert "notify targets: unknown (notify.d cannot be read)" in out

    quiet = run(["check", "-q"], cfg)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (1, "", result.stderr)


def test_a_notify_d_loop_stops_every_command_that_needs_its_targets(top):
    cfg = write_config(top, NoCA(top), {"web": {"domains": ["web.example.com"]}})
    notify = top / "hooks" / "notify.d"
    notify.rmdir()
    notify.symlink_to("notify.d")
    for args in (["status"], ["run-hook", "--dry-run"], ["run-hook"], ["renew"],
                 ["renew", "--json"]):
        line = one_error(run(args, cfg), 2, notify)
        assert line.endswith(LOOP), (args, line)
    dry = run(["renew", "--dry-run"], cfg)  # needs no hooks
    assert (dry.returncode, dry.stderr) == (0, "")
    assert not (top / "spool").exists()


def test_check_notify_d_entries_a_fifo_a_loop_and_notify_d_itself_a_fifo(top):
    cfg = write_config(top, NoCA(top), {"web": {"domains": ["web.example.com"]}})
    notify = top / "hooks" / "notify.d"
    hook(notify / "50-reload")
    os.mkfifo(notify / "60-fifo")
    (notify / "70-loop").symlink_to("70-loop")
    result = run(["check"], cfg)
    lines = problems(result)
    assert lines[0] == f"certbatch: problem: {notify / '60-fifo'}: not a regular file"
    assert lines[1].startswith(f"certbatch: problem: {notify / '70-loop'}: cannot be read: ")
    assert len(lines) == 2, lines
    out = result.stdout.splitlines()
    assert "notify targets: 3 (at most 4 at a time)" in out
    assert f"  60-fifo: CANNOT RUN: {notify / '60-fifo'}: not a regular file" in out

    for entry in notify.iterdir():
        entry.unlink()
    notify.rmdir()
    os.mkfifo(notify)
    result = run(["check"], cfg)
    assert problems(result) == [
        f"certbatch: problem: notify.d folder {notify}: not a directory"]


def test_check_as_a_user_who_may_not_read_the_hooks(top):
    """uid 65534 with its own state and spool folders, and root's 0700 hooks folder (or only
    deploy.d): one problem each, the subfolders are not looked at, no traceback."""
    home = nobody_home(top)
    cfg = write_config(top / "etc", NoCA(top), {"web": {"domains": ["web.example.com"]}},
                       paths={"state": str(top / "state"), "spool": str(top / "spool"),
                              "hooks": str(top / "etc" / "hooks")})
    for folder in ("state", "spool"):
        (top / folder).mkdir(mode=0o700)
        os.chown(top / folder, NOBODY, NOBODY)
    hooks = top / "etc" / "hooks"
    hooks.chmod(0o700)
    result = as_nobody(["check"], cfg, home)
    assert problems(result) == [
        f"certbatch: problem: hooks folder {hooks}: permission denied (certbatch runs as "
        f"uid {NOBODY}, not as root)"]
    out = result.stdout.splitlines()
    assert f"state: {top / 'state'} (exists)" in out
    assert "deploy.d: not looked at (the hooks folder cannot be read)" in out
    assert "notify targets: unknown (notify.d cannot be read)" in out

    hooks.chmod(0o755)
    (hooks / "deploy.d").chmod(0o700)
    result = as_nobody(["check"], cfg, home)
    assert problems(result) == [
        f"certbatch: problem: deploy.d folder {hooks / 'deploy.d'}: permission denied "
        f"(certbatch runs as uid {NOBODY}, not as root)"]
    assert "notify targets: none (a batch is marked applied without running anything)" \
        in result.stdout.splitlines()


def test_check_and_status_never_print_an_acme_dns_password(tmp_path):
    """The api's user:password@ (refused by the loader, yet never printed) and the accounts
    file's password stay out of `check` and `status`."""
    from certbatch import checks, config

    secret = "pw-SECRET-0d6f2a"
    ch = config.ChallengeSettings(type="dns-01", provider="acme-dns",
                                  acme_dns=config.AcmeDnsSettings(
                                      api=f"https://certbatch:{secret}@auth.example.org",
                                      accounts_file=Path("/etc/certbatch/acme-dns.json")))
    assert checks.provider_text(ch) == ("api https://auth.example.org, accounts in "
                                        "/etc/certbatch/acme-dns.json")
    accounts = tmp_path / "acme-dns.json"
    accounts.write_text(f'{{"a.example.org": {{"username": "u", "password": "{secret}", '
                        f'"subdomain": "s", "fulldomain": "s.auth.example.org"}}}}')
    accounts.chmod(0o600)
    cfg = write_config(tmp_path, NoCA(tmp_path), {"a": {"domains": ["a.example.org"], "challenge": {
        "type": "dns-01", "provider": "acme-dns", "api": "http://127.0.0.1:9",
        "accounts_file": str(accounts)}}})
    check = run(["check"], cfg)
    assert check.returncode == 0, check.stderr
    assert f"provider acme-dns (api http://127.0.0.1:9, accounts in {accounts}" in check.stdout
    for args in (["status"], ["status", "--json"]):
        status = run(args, cfg)
        assert status.returncode == 0, status.stderr
        assert secret not in status.stdout + status.stderr
    assert secret not in check.stdout + check.stderr


def test_check_shows_a_webroot_map_and_a_missing_webroot_of_it_as_a_problem(tmp_path):
    """Issue 14: each webroot with the names it serves; a missing one fails that certificate
    alone (at run time) and `check` lists it, while the config still loads (`status` works)."""
    (tmp_path / "www-a").mkdir()
    cfg = write_config(tmp_path, NoCA(tmp_path), {"web": {
        "domains": ["a.example.org", "b.example.org", "c.example.org"],
        "challenge": {"type": "http-01", "webroot": "www-a",
                      "webroot_map": {"b.example.org": "www-b"}}}})
    result = run(["check"], cfg)
    assert problems(result) == [f"certbatch: problem: web: webroot {tmp_path / 'www-b'} does "
                                f"not exist"]
    lines = result.stdout.splitlines()
    i = lines.index("  web: a.example.org b.example.org c.example.org [ec-p256, http-01 "
                    "webroot_map]")
    assert lines[i + 1:i + 4] == [f"    webroot {tmp_path / 'www-a'}: a.example.org c.example.org",
                                  f"    webroot {tmp_path / 'www-b'}: b.example.org",
                                  f"    challenge: CANNOT work: webroot {tmp_path / 'www-b'} "
                                  f"does not exist"]
    status = run(["status"], cfg)
    assert status.returncode == 0, status.stderr


def test_check_is_a_core_function_that_returns_data(tmp_path):
    """`check` and the run-hook dry-run plans are core functions returning data that cli.py
    renders (in the order found: `on_item` sees each line and warning at once); the core,
    these included, never imports click."""
    import subprocess
    import sys

    from certbatch import checks, config

    code = ("import sys\n"
            "from certbatch import checks, plans, report, runner\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'click'))\n")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True)
    assert imported.stdout.strip() == "[]"

    cfg = write_config(tmp_path, NoCA(tmp_path), {"web": {"domains": ["web.example.com"]}})
    (tmp_path / "hooks/notify.d/apply").write_text("#!/bin/sh\n")  # not executable
    seen: list[checks.CheckItem] = []
    report = checks.run_check(config.load(cfg), on_item=seen.append)
    assert seen == report.items and report.warnings == []
    assert report.lines[:2] == [f"config: {cfg} (ok)", "acme directory: https://127.0.0.1:9/dir"]
    assert "  web: web.example.com [ec-p256, dns-01 script" in "\n".join(report.lines)
    assert not report.ok
    assert [p.split(": ")[0] for p in report.problems] == [str(tmp_path / "hooks/notify.d/apply")]
