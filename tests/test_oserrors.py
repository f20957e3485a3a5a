"""OS errors under real conditions, through the real command: every one is one line naming the
path and the problem, never a traceback.

- a full disk: a real 256 KiB tmpfs mounted by the test and filled up with a file;
- a read-only file system: the same tmpfs remounted read-only;
- permissions: certbatch run as uid 65534 on root-owned 0700 state and spool folders;
- the log file: created 0600 whatever the umask; one that cannot be opened or written.

Mounting and dropping to uid 65534 need root (CAP_SYS_ADMIN for the mount): without it these
tests are skipped, or fail when CERTBATCH_REQUIRE_PEBBLE=1 says the whole suite must run.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import REPO, NoCA, live, probe_hook, probe_lines, run, write_config

NOBODY = 65534


def need(reason: str) -> None:
    """Skip for want of `reason`; fail instead when the suite is required to run everything as
    root (CERTBATCH_REQUIRE_PEBBLE=1, as scripts/test.sh sets)."""
    if os.environ.get("CERTBATCH_REQUIRE_PEBBLE") == "1" and os.geteuid() == 0:
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def open_folder() -> Iterator[Path]:
    """A folder everybody may enter (pytest's tmp_path is 0700 root), removed afterwards with
    whatever the test mounted in it."""
    path = Path(tempfile.mkdtemp(prefix="certbatch-oserr-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for mounted in sorted(_mounts_below(path), reverse=True):
            subprocess.run(["umount", "-l", mounted], capture_output=True)
        for p in [path, *path.rglob("*")]:  # make everything removable again
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def top() -> Iterator[Path]:
    with open_folder() as path:
        yield path


def _mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mounts") as fh:
        points = [line.split()[1] for line in fh]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


# -- a small disk ----------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str = "256k") -> Iterator[Path]:
    """A real tmpfs of `size` at `mountpoint` (its root 0755 root, like /var/lib)."""
    if os.geteuid() != 0:
        need("mounting a tmpfs needs root")
    mountpoint.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                            str(mountpoint)], capture_output=True, text=True)
        why = r.stderr.strip() if r.returncode else ""
    except OSError as exc:
        why = str(exc)
    if why:
        need(f"cannot mount a tmpfs (no CAP_SYS_ADMIN in this container?): {why}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` up to the last byte with one file; return it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with pytest.raises(OSError) as full, open(folder / "probe", "wb", buffering=0) as fh:
        fh.write(b"x")  # really full: not even one more byte
    assert full.value.errno == errno.ENOSPC
    (folder / "probe").unlink()
    return filler


def remount(mountpoint: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mountpoint)], check=True)


# -- running certbatch as uid 65534 ---------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _nobody_python() -> tuple[str, dict[str, str]] | str:
    """An interpreter uid 65534 can run certbatch with (ours, or the system's Python of the same
    version when ours lives under root's 0700 home), and its environment; or why there is none."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *site.getsitepackages()])}
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    tried = []
    for python in dict.fromkeys([sys.executable, f"/usr/bin/python{version}"]):
        try:
            probe = subprocess.run(
                [python, "-c", "import certbatch.cli, certbatch.runner, cryptography, yaml"],
                env=env, cwd="/", user=NOBODY, group=NOBODY, extra_groups=[],
                capture_output=True, text=True, timeout=60)
        except OSError as exc:
            tried.append(f"{python}: {exc.strerror}")
            continue
        if probe.returncode == 0:
            return python, env
        tried.append(f"{python}: {probe.stderr.strip().splitlines()[-1:]}")
    return f"no Python {version} that uid {NOBODY} can run certbatch with ({'; '.join(tried)})"


def as_nobody(args: list[str], config: Path, home: Path,
              **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`certbatch ARGS -c CONFIG` as uid/gid 65534 without supplementary groups, HOME `home`."""
    if os.geteuid() != 0:
        need("running certbatch as uid 65534 needs root")
    found = _nobody_python()
    if isinstance(found, str):
        need(found)
    assert not isinstance(found, str)
    python, env = found
    return subprocess.run([python, "-m", "certbatch", *args, "-c", str(config)],
                          env={**env, "HOME": str(home)}, cwd=home, user=NOBODY, group=NOBODY,
                          extra_groups=[], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, **kwargs)


def nobody_home(top: Path) -> Path:
    home = top / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    return home


# -- what every error must look like -------------------------------------------------------------

def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    for text in (result.stdout, result.stderr):
        assert "Traceback" not in text and "internal error" not in text, text
        assert "Errno" not in text, text  # the system's text, not Python's repr


def one_error(result: subprocess.CompletedProcess[str], code: int, *paths: Path) -> str:
    """The run exited with `code` and printed exactly one `certbatch: error: <path>: ...` line
    on stderr, naming one of `paths` (or a file below one)."""
    no_traceback(result)
    lines = result.stderr.splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("certbatch: error: "), lines[0]
    assert any(f" {p}:" in lines[0] or f" {p}/" in lines[0] for p in paths), (lines[0], paths)
    return lines[0]


def tree(folder: Path) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Every file below `folder`: mode, owner and content (a symlink's target), to show that
    nothing was changed."""
    found: dict[str, tuple[int, int, bytes | str | None]] = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        content: bytes | str | None = None
        if stat.S_ISLNK(st.st_mode):
            content = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            content = p.read_bytes()
        found[str(p.relative_to(folder))] = (st.st_mode, st.st_uid, content)
    return found


# -- permissions: uid 65534 on root's folders ---------------------------------------------------

def test_unprivileged_user_on_root_owned_state_and_spool(top):
    """Run as uid 65534 on the 0700 root folders of a root install: read-only commands say
    what they cannot read (exit 2), renew and run-hook stop before any work (exit 2), check
    lists the problems (exit 1); nothing is created or changed, and nothing is a traceback."""
    home = nobody_home(top)
    cfg = write_config(top / "etc", NoCA(top), {"web": {"domains": ["web.example.com"]}},
                       paths={"state": str(top / "state"), "spool": str(top / "spool"),
                              "hooks": str(top / "etc" / "hooks")})
    state, spool = top / "state", top / "spool"
    for folder in (state, spool, state / "certs", spool / "pending"):
        folder.mkdir(mode=0o700)
    before = tree(top)

    status = as_nobody(["status"], cfg, home)
    no_traceback(status)
    assert status.returncode == 2 and status.stdout == ""
    lines = status.stderr.splitlines()
    assert len(lines) == 2, status.stderr  # one line per folder it cannot read
    assert lines[0].startswith(f"certbatch: error: {state}: permission denied"), lines
    assert lines[1].startswith(f"certbatch: error: {spool}: permission denied"), lines
    assert f"uid {NOBODY}" in lines[0]  # says who we are: the usual mistake is not being root
    assert as_nobody(["status", "--json"], cfg, home).stderr == status.stderr

    one_error(as_nobody(["renew", "--dry-run"], cfg, home), 2, state)
    one_error(as_nobody(["run-hook", "--dry-run"], cfg, home), 2, spool)
    one_error(as_nobody(["renew"], cfg, home), 2, state)
    one_error(as_nobody(["renew", "--force", "--json"], cfg, home), 2, state)
    one_error(as_nobody(["run-hook"], cfg, home), 2, state)

    check = as_nobody(["check"], cfg, home)
    no_traceback(check)
    assert check.returncode == 1
    problems = check.stderr.splitlines()
    assert len(problems) == 2, check.stderr
    assert problems[0].startswith(f"certbatch: problem: state folder {state}: "), problems
    assert problems[1].startswith(f"certbatch: problem: spool folder {spool}: "), problems

    assert tree(top) == before  # no lock file, no folder, nothing


def test_unprivileged_user_whose_state_is_its_own_but_not_the_spool(top):
    """The state folder is the user's own, the spool root's: the run lock is taken, then the
    spool stops run-hook before anything runs (exit 2, one line naming it)."""
    home = nobody_home(top)
    probe = top / "probe"
    probe.mkdir(mode=0o777)
    probe.chmod(0o777)
    cfg = write_config(top / "etc", NoCA(top), {"web": {"domains": ["web.example.com"]}},
                       paths={"state": str(top / "state"), "spool": str(top / "spool"),
                              "hooks": str(top / "etc" / "hooks")})
    probe_hook(top / "etc" / "hooks" / "notify.d" / "reload", probe)
    (top / "state").mkdir(mode=0o700)
    os.chown(top / "state", NOBODY, NOBODY)
    (top / "spool").mkdir(mode=0o700)
    result = as_nobody(["run-hook"], cfg, home)
    one_error(result, 2, top / "spool")
    assert probe_lines(probe, "reload") == []


def test_one_unreadable_certificate_is_a_row_of_status_not_a_failure(top):
    cfg = write_config(top, NoCA(top), {"web": {"domains": ["web.example.com"]},
                                        "api": {"domains": ["api.example.com"]}})
    certs = top / "state" / "certs"
    certs.mkdir(parents=True)
    (certs / "web").symlink_to("web")  # a loop
    for args in (["status"], ["renew", "--dry-run"]):
        result = run(args, cfg)
        no_traceback(result)
        if args[0] == "renew" and result.returncode == 2:  # the store raised it as it is
            assert "symbolic links" in one_error(result, 2, certs / "web")
            continue
        assert (result.returncode, result.stderr) == (0, ""), (args, result.stderr)
        rows = {line.split()[0]: line for line in result.stdout.splitlines()}
        assert "error" in rows["web"] or "unreadable" in rows["web"], rows
        assert "issue" in rows["api"], rows
        if args[0] == "renew":
            assert f"{certs / 'web'}/" in rows["web"] and "symbolic links" in rows["web"], rows
    # status cuts long errors to the width; `status NAME` says all of it
    detail = run(["status", "web"], cfg)
    no_traceback(detail)
    assert f"{certs / 'web'}/" in detail.stdout and "symbolic links" in detail.stdout


# -- a full disk ---------------------------------------------------------------------------------

def test_full_disk_fails_one_line_keeps_everything_and_the_next_run_recovers(top, pebble):
    disk = top / "disk"
    probe = top / "probe"
    probe.mkdir()
    with tmpfs(disk):
        cfg = write_config(top / "etc", pebble, {"web": {"domains": ["web.disk.example.com"]}},
                           paths={"state": str(disk / "state"), "spool": str(disk / "spool"),
                                  "hooks": str(top / "etc" / "hooks")})
        probe_hook(top / "etc" / "hooks" / "notify.d" / "reload", probe)
        first = run(["renew", "--no-notify"], cfg, pebble)
        assert first.returncode == 0, first.stderr
        old = live(disk, "web")
        live_files = tree(disk / "state" / "certs")
        pending = tree(disk / "spool" / "pending")
        assert "web/meta.json" in pending

        filler = fill(disk)

        # Read-only commands work on a full disk.
        status = run(["status"], cfg, pebble)
        assert status.returncode == 0 and status.stderr == "", status.stderr
        assert "web" in status.stdout

        # A renewal: the full disk is found before the CA is asked for a certificate that
        # could not be stored. One line naming the state folder and the problem; the live
        # certificate and the pending entry are untouched.
        full = run(["renew", "--force", "--no-notify"], cfg, pebble)
        no_traceback(full)
        assert full.returncode == 1, full.stderr
        assert full.stderr == f"certbatch: error: {disk}/state: no space left on device\n"
        assert live(disk, "web") == old
        assert tree(disk / "state" / "certs") == live_files
        assert tree(disk / "spool" / "pending") == pending

        # The notify phase on a full disk: the hook may run, but it fails on one line and the
        # entry stays pending for the next run.
        notify = run(["run-hook"], cfg, pebble)
        assert "Traceback" not in notify.stderr and "internal error" not in notify.stderr
        assert notify.returncode == 1, notify.stderr
        assert len(notify.stderr.splitlines()) == 1, notify.stderr
        assert f"{disk}/spool/targets/reload/" in notify.stderr, notify.stderr
        assert notify.stderr.endswith(": no space left on device; 1 certificate stays pending "
                                      "for it: fix it, then run `certbatch run-hook`\n")
        assert tree(disk / "spool" / "pending") == pending
        assert tree(disk / "state" / "certs") == live_files

        # Space again: the next run applies what was pending and renews.
        filler.unlink()
        again = run(["renew", "--force"], cfg, pebble)
        assert again.returncode == 0, again.stderr
        assert again.stderr == ""
        assert live(disk, "web")["serial"] != old["serial"]
        assert probe_lines(probe, "reload"), "the notify hook never ran"
        assert not list((disk / "spool" / "pending").iterdir())
        assert json.loads(run(["status", "--json"], cfg, pebble).stdout)["pending"] == []


# -- a read-only file system ---------------------------------------------------------------------

def test_read_only_state_and_spool(top):
    disk = top / "disk"
    with tmpfs(disk):
        cfg = write_config(top / "etc", NoCA(top), {"web": {"domains": ["web.example.com"]}},
                           paths={"state": str(disk / "state"), "spool": str(disk / "spool"),
                                  "hooks": str(top / "etc" / "hooks")})
        for folder in ("state", "spool", "state/certs", "spool/pending"):
            (disk / folder).mkdir(mode=0o700)
        remount(disk, "ro")
        before = tree(disk)

        # Reading works: status and the dry runs need no write.
        status = run(["status"], cfg)
        assert (status.returncode, status.stderr) == (0, ""), status.stderr
        dry = run(["renew", "--dry-run"], cfg)
        assert (dry.returncode, dry.stderr) == (0, ""), dry.stderr
        assert "web" in dry.stdout and "issue" in dry.stdout
        hook_dry = run(["run-hook", "--dry-run"], cfg)
        assert (hook_dry.returncode, hook_dry.stdout, hook_dry.stderr) == (
            0, "nothing pending\n", "")

        # Writing stops before any work: one line, exit 2.
        line = one_error(run(["renew"], cfg), 2, disk / "state")
        assert line.endswith("read-only file system"), line
        one_error(run(["run-hook"], cfg), 2, disk / "state")

        check = run(["check"], cfg)
        no_traceback(check)
        assert check.returncode == 1
        assert check.stderr.splitlines() == [
            f"certbatch: problem: state folder {disk / 'state'} is not writable",
            f"certbatch: problem: spool folder {disk / 'spool'} is not writable"]
        assert tree(disk) == before


# -- the log file ------------------------------------------------------------------------------

def test_log_file_is_created_0600_whatever_the_umask_and_keeps_an_existing_mode(top):
    cfg = write_config(top, NoCA(top), {"web": {"domains": ["web.example.com"]}},
                       logging={"file": "./certbatch.log"})
    for umask in (0o000, 0o022, 0o277):
        (top / "certbatch.log").unlink(missing_ok=True)
        result = run(["status"], cfg, umask=umask)
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE((top / "certbatch.log").stat().st_mode) == 0o600, oct(umask)
        assert "status: started" in (top / "certbatch.log").read_text()
    (top / "certbatch.log").chmod(0o640)  # the operator's choice (e.g. for a log reader group)
    assert run(["check"], cfg, umask=0).returncode == 0
    assert stat.S_IMODE((top / "certbatch.log").stat().st_mode) == 0o640
    other = top / "other.log"
    assert run(["--log-file", str(other), "status"], cfg, umask=0).returncode == 0
    assert stat.S_IMODE(other.stat().st_mode) == 0o600


def test_log_file_that_cannot_be_opened_warns_read_only_commands_and_stops_the_others(top):
    cfg = write_config(top, NoCA(top), {"web": {"domains": ["web.example.com"]}},
                       logging={"file": "./no/such/folder/certbatch.log"})
    log = top / "no" / "such" / "folder" / "certbatch.log"
    warning = (f"certbatch: warning: {cfg}: logging.file: cannot open {log}: No such file or "
               f"directory; going on without it")
    for args in (["status"], ["status", "--json"], ["renew", "--dry-run"],
                 ["run-hook", "--dry-run"]):
        result = run(args, cfg)
        no_traceback(result)
        assert (result.returncode, result.stderr.splitlines()) == (0, [warning]), args
        assert result.stdout, args
    check = run(["check"], cfg)  # renew would stop: for check that is a problem
    assert check.returncode == 1
    assert check.stderr.splitlines() == [
        f"certbatch: problem: {cfg}: logging.file: cannot open {log}: No such file or "
        f"directory"]
    assert f"log file: {log} (CANNOT be opened)" in check.stdout.splitlines()
    for args in (["renew"], ["run-hook"]):
        result = run(args, cfg)
        line = one_error(result, 2, cfg)
        assert "logging.file: cannot open" in line
    assert not (top / "state").exists() and not (top / "spool").exists()


def test_log_file_on_a_full_disk_is_one_warning_and_the_command_goes_on(top):
    disk = top / "disk"
    with tmpfs(disk, "64k"):
        cfg = write_config(top, NoCA(top), {"web": {"domains": ["web.example.com"]}},
                           logging={"file": str(disk / "certbatch.log")})
        fill(disk)
        result = run(["status"], cfg)
        no_traceback(result)
        assert result.returncode == 0
        assert "web" in result.stdout
        assert result.stderr.splitlines() == [
            f"certbatch: warning: log file {disk / 'certbatch.log'}: no space left on device; "
            f"not logging to it any more"], result.stderr
