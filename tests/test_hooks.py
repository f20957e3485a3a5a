"""certbatch.hooks: discovering hook programs and running them as real processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from nginx_server import gone  # reading /proc: shared with the nginx helper

from certbatch import hooks
from certbatch.errors import HookError
from certbatch.hooks import HookCommand, discover, from_config, run_hook


def script(path: Path, body: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    os.chmod(path, mode)
    return path


def wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- discover ---------------------------------------------------------------------------------

def test_discover_follows_run_parts_naming_rules(tmp_path: Path) -> None:
    d = tmp_path / "notify.d"
    for name in ["20-b", "10-a", "c.sh", "nginx", "x.y_z-1"]:
        script(d / name, "true\n")
    for name in [".hidden", "old~", "x.bak", "y.dpkg-old", "y.dpkg-new", "y.dpkg-dist",
                 "z.rpmnew", "z.rpmsave", "z.rpmorig"]:
        script(d / name, "true\n")
    script(d / "not-executable", "true\n", mode=0o644)
    (d / "subdir").mkdir()
    os.chmod(d / "subdir", 0o755)  # an executable folder is still not a hook
    os.symlink(d / "nginx", d / "linked")  # symlink to an executable file: a hook
    os.symlink(d / "missing", d / "dangling")

    found = discover(d)

    assert [h.name for h in found] == ["10-a", "20-b", "c.sh", "linked", "nginx", "x.y_z-1"]
    assert found[0].argv == (str(d.absolute() / "10-a"),)


def test_discover_missing_folder_has_no_hooks(tmp_path: Path) -> None:
    assert discover(tmp_path / "nope") == []


def test_discover_gives_absolute_paths_for_relative_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    script(tmp_path / "deploy.d" / "a", "true\n")
    monkeypatch.chdir(tmp_path)
    (hook,) = discover(Path("deploy.d"))
    assert Path(hook.argv[0]).is_absolute()


def test_from_config() -> None:
    assert from_config(None, "config:notify") == []
    assert from_config("systemctl reload nginx", "config:notify") == [
        HookCommand("config:notify", ("/bin/sh", "-c", "systemctl reload nginx"))]
    assert from_config(("/usr/bin/env", "A=1", "prog"), "config:deploy") == [
        HookCommand("config:deploy", ("/usr/bin/env", "A=1", "prog"))]
    with pytest.raises(ValueError):
        from_config((), "config:deploy")
    with pytest.raises(ValueError):
        from_config("  ", "config:deploy")


# -- run_hook ---------------------------------------------------------------------------------

def test_run_hook_env_cwd_and_os_environ_untouched(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_PARENT", "parent value")
    probe = tmp_path / "probe"
    hook = script(tmp_path / "h", f'env > "{probe}/env"\npwd > "{probe}/cwd"\n'
                                  f'cat > "{probe}/stdin"\n')
    probe.mkdir()
    cwd = tmp_path / "work dir"
    cwd.mkdir()
    before = dict(os.environ)

    result = run_hook(HookCommand("h", (str(hook),)),
                      {"CERTBATCH_NAME": "www", "CERTBATCH_DOMAINS": "a.test b.test"},
                      cwd, timeout=10)

    assert result.ok and result.returncode == 0 and not result.timed_out
    env = dict(line.split("=", 1) for line in (probe / "env").read_text().splitlines()
               if "=" in line)
    assert env["CERTBATCH_NAME"] == "www"
    assert env["CERTBATCH_DOMAINS"] == "a.test b.test"
    assert env["FROM_PARENT"] == "parent value"
    assert (probe / "cwd").read_text().strip() == str(cwd)
    assert (probe / "stdin").read_text() == ""  # stdin is /dev/null: the hook doesn't hang
    assert dict(os.environ) == before
    assert "CERTBATCH_NAME" not in os.environ


def test_run_hook_failure_captures_status_and_tails(tmp_path: Path) -> None:
    hook = script(tmp_path / "fail",
                  'i=1; while [ $i -le 30 ]; do\n'
                  '  echo "out $i"; echo "err $i" >&2; i=$((i+1))\n'
                  'done\n'
                  'echo "the real reason" >&2\nexit 3\n')

    result = run_hook(HookCommand("50-fail", (str(hook),)), {}, tmp_path, timeout=10)

    assert not result.ok and result.returncode == 3 and not result.timed_out
    assert result.stdout_tail.splitlines()[-1] == "out 30"
    assert len(result.stdout_tail.splitlines()) == hooks.TAIL_LINES
    assert result.stderr_tail.splitlines()[-1] == "the real reason"
    err = result.error()
    assert isinstance(err, HookError)
    assert (err.hook, err.returncode, err.timed_out) == ("50-fail", 3, False)
    assert "50-fail" in str(err) and "status 3" in str(err) and "the real reason" in str(err)


def test_run_hook_timeout_kills_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = script(tmp_path / "slow", f'sleep 100 &\necho $! > "{pidfile}"\nsleep 100\n')

    start = time.monotonic()
    result = run_hook(HookCommand("slow", (str(hook),)), {}, tmp_path, timeout=0.5)

    assert time.monotonic() - start < 5
    assert result.timed_out and not result.ok and result.returncode is None
    assert "timed out" in str(result.error())
    child = int(pidfile.read_text())
    assert wait_gone(child), "the hook's background child survived the timeout"


def test_run_hook_timeout_sigkills_a_hook_ignoring_sigterm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "KILL_GRACE", 0.3)
    pidfile = tmp_path / "child.pid"
    hook = script(tmp_path / "stubborn",
                  f"trap '' TERM\nsleep 100 &\necho $! > \"{pidfile}\"\n"
                  "while :; do sleep 0.1; done\n")

    result = run_hook(HookCommand("stubborn", (str(hook),)), {}, tmp_path, timeout=0.5)

    assert result.timed_out
    assert wait_gone(int(pidfile.read_text()))


def test_run_hook_timeout_applies_after_hook_closes_its_output(tmp_path: Path) -> None:
    hook = script(tmp_path / "quiet", "echo bye\nexec >/dev/null 2>&1\nsleep 100\n")
    start = time.monotonic()
    result = run_hook(HookCommand("quiet", (str(hook),)), {}, tmp_path, timeout=0.5)
    assert result.timed_out and result.stdout_tail == "bye"
    assert time.monotonic() - start < 5


def test_run_hook_big_output_does_not_deadlock(tmp_path: Path) -> None:
    hook = script(tmp_path / "loud",
                  "yes 'a line of output' | head -n 300000\n"
                  "yes 'an error line' | head -n 300000 >&2\n"
                  "head -c 100000 /dev/zero | tr '\\0' x\n")  # a long line with no newline

    result = run_hook(HookCommand("loud", (str(hook),)), {}, tmp_path, timeout=30)

    assert result.ok
    assert len(result.stdout_tail.splitlines()) == hooks.TAIL_LINES
    assert result.stderr_tail.splitlines()[-1] == "an error line"
    assert len(result.stdout_tail) < 10 * hooks.MAX_LINE * hooks.TAIL_LINES


def test_run_hook_does_not_wait_for_background_child_holding_stdout(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = script(tmp_path / "bg", f'sleep 30 &\necho $! > "{pidfile}"\necho done\n')
    try:
        start = time.monotonic()
        result = run_hook(HookCommand("bg", (str(hook),)), {}, tmp_path, timeout=20)
        assert result.ok and result.stdout_tail == "done"
        assert time.monotonic() - start < 5
    finally:
        os.kill(int(pidfile.read_text()), 9)


def test_run_hook_missing_program_is_a_failed_result(tmp_path: Path) -> None:
    result = run_hook(HookCommand("config:notify", (str(tmp_path / "nope"),)), {}, tmp_path, 5)
    assert not result.ok and result.returncode == 127
    assert "nope" in result.stderr_tail
    notexec = script(tmp_path / "notexec", "true\n", mode=0o644)
    result = run_hook(HookCommand("x", (str(notexec),)), {}, tmp_path, 5)
    assert not result.ok and result.returncode == 126


def test_run_hook_shell_string_from_config_gets_data_only_via_env(tmp_path: Path) -> None:
    (cmd,) = from_config('printf "%s" "$CERTBATCH_NAMES" > names.txt', "config:notify")
    result = run_hook(cmd, {"CERTBATCH_NAMES": "a b; rm -rf /"}, tmp_path, 5)
    assert result.ok
    assert (tmp_path / "names.txt").read_text() == "a b; rm -rf /"


def test_private_key_printed_by_a_hook_is_redacted(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    key = tmp_path / "privkey.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGSECRETSECRET\n"
                   "-----END PRIVATE KEY-----\n")
    hook = script(tmp_path / "debug", f'echo before; cat "{key}"; echo after; '
                                      f'cat "{key}" >&2; exit 1')
    with caplog.at_level("DEBUG", logger="certbatch"):
        result = run_hook(HookCommand("debug", (str(hook),)), {}, tmp_path, 10)
    assert result.stdout_tail.splitlines() == ["before", "[private key redacted]", "after"]
    assert "SECRET" not in result.stderr_tail and "SECRET" not in str(result.error())
    assert "SECRET" not in caplog.text and "[private key redacted]" in caplog.text


def test_redaction_covers_a_cut_off_key_and_ends_eventually(tmp_path: Path) -> None:
    cut = script(tmp_path / "cut", 'printf -- "-----BEGIN PRIVATE KEY-----\\nMIIsecretpartial"; '
                                   'exit 1')
    result = run_hook(HookCommand("cut", (str(cut),)), {}, tmp_path, 10)
    assert "secret" not in result.stdout_tail and result.stdout_tail == "[private key redacted]"
    # no END line: redaction stops after KEY_MAX_LINES, so the real error still shows
    endless = script(tmp_path / "endless", 'echo "-----BEGIN RSA PRIVATE KEY-----"; '
                     f'i=0; while [ $i -lt {hooks.KEY_MAX_LINES + 5} ]; do echo AAAA; '
                     'i=$((i+1)); done; echo "real error" >&1; exit 1')
    result = run_hook(HookCommand("endless", (str(endless),)), {}, tmp_path, 10)
    assert result.stdout_tail.splitlines()[-1] == "real error"
