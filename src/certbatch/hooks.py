"""Finding and running hook programs.

A hook is an external program: an executable file in ``deploy.d/`` or ``notify.d/`` (found by
`discover`, with run-parts' naming rules) or a command from the config file (`from_config`).
`run_hook` runs one in its own process group with a timeout, hands data over only through
environment variables, and keeps the last lines of its output for messages and logs.

Every running hook's process group is in a registry, so that a signal to certbatch stops them
all (`terminate_all`, called by the interrupt watcher): once a stop is requested no hook starts,
and each running `run_hook` call SIGKILLs what is left of its group after KILL_GRACE and
returns an interrupted result.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import selectors
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import interrupt
from .errors import HookError

log = logging.getLogger("certbatch.hooks")

TAIL_LINES = 20  # lines of stdout/stderr kept per hook run
MAX_LINE = 2000  # characters kept of one line (a hook may print megabytes without a newline)
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL to the hook's process group
DRAIN_GRACE = 1.0  # seconds to wait for EOF after the hook exited (a background child may hold
#                    its stdout open; we stop reading rather than wait for that child)

# Names run-parts and package managers use for backups and leftovers: never run them as hooks.
_SKIP = re.compile(r"^\.|~$|\.bak$|\.disabled$|\.dpkg-[a-z]+$|\.rpm[a-z]*$")


# Every variable certbatch sets for a hook: a hook's own settings (hooks.targets.*.env) may not
# use these names, and an inherited value of one never reaches a hook (a left-out name list
# must not be replaced by a stale one from certbatch's own environment).
RESERVED_ENV = frozenset({
    "CERTBATCH_NAME", "CERTBATCH_DOMAINS", "CERTBATCH_STAGE_DIR", "CERTBATCH_KEY_FILE",
    "CERTBATCH_CERT_FILE", "CERTBATCH_CHAIN_FILE", "CERTBATCH_FULLCHAIN_FILE",
    "CERTBATCH_SPOOL_DIR", "CERTBATCH_TARGET", "CERTBATCH_BATCH_FILE", "CERTBATCH_NAMES_FILE",
    "CERTBATCH_COUNT", "CERTBATCH_NAMES", "CERTBATCH_NAMES_TRUNCATED", "CERTBATCH_FAILED_NAMES",
    "CERTBATCH_FAILED_NAMES_TRUNCATED",
    # dns-01 scripts (challenges.py)
    "CERTBATCH_DOMAIN", "CERTBATCH_RECORD_NAME", "CERTBATCH_RECORD_VALUE", "CERTBATCH_RECORDS",
})


@dataclass(frozen=True)
class HookCommand:
    """One hook to run: `name` for messages, `argv` to execute (argv[0] absolute for files)."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class HookResult:
    """How one hook run ended; `returncode` is None only when we killed it (a timeout, or
    `interrupted`: certbatch got a signal, and the hook was stopped or never started)."""

    hook: str
    argv: tuple[str, ...]
    returncode: int | None
    timed_out: bool
    duration: float
    stdout_tail: str
    stderr_tail: str
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and not self.interrupted and self.returncode == 0

    def error(self) -> HookError:
        """The exception describing this (failed) run."""
        return HookError(self.hook, self.returncode, self.timed_out, self.stderr_tail,
                         self.interrupted)


def skipped_name(name: str) -> bool:
    """True for names run-parts would skip: hidden, editor and package-manager leftovers."""
    return bool(_SKIP.search(name))


@dataclass(frozen=True)
class HookFile:
    """One entry of a hooks folder and what certbatch makes of it.

    `state` is "run" (an executable file), "skip" (a hidden or backup name, a sub-folder) or
    "problem" (looks like a hook but cannot run: not executable, a dangling symlink); `why`
    says why for the last two.
    """

    name: str
    path: Path
    state: str
    why: str = ""

    @property
    def command(self) -> HookCommand:
        return HookCommand(name=self.name, argv=(str(self.path),))


def scan(directory: Path) -> list[HookFile]:
    """Every entry of `directory` (symlinks followed), sorted by name, with its state.

    Names starting with "." or ending in "~", ".bak", ".disabled", ".dpkg-*" or ".rpm*" are
    skipped, as are sub-folders; a file that is not executable, or a dangling symlink, is a
    problem: it was meant to run and does not. A missing folder has no hooks.
    """
    try:
        names = sorted(os.listdir(directory), key=os.fsencode)
    except FileNotFoundError:
        return []
    if not names:
        return []  # nothing to trust: the walk of the folders on the way is not needed
    base = directory.absolute()  # hooks run with another cwd: argv[0] must be absolute
    unsafe = _untrusted(os.stat(directory)) or _unsafe_way(directory)
    found = []
    for name in names:
        path = base / name
        if skipped_name(name):
            found.append(HookFile(name, path, "skip", "hidden or backup name"))
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            found.append(HookFile(name, path, "problem", "dangling symlink"))
            continue
        except OSError as exc:  # a symlink loop, a permission problem
            found.append(HookFile(name, path, "problem", f"cannot be read: {exc.strerror}"))
            continue
        if stat.S_ISDIR(st.st_mode):
            found.append(HookFile(name, path, "skip", "a folder"))
        elif unsafe or _untrusted(st) or _unsafe_way(path):
            # Whoever can change a hook, or a folder on the way to it (a symlinked hook's real
            # folder too), runs code as us (root, from cron).
            where = f"its folder {base} {unsafe}" if unsafe else f"it {_untrusted(st)}" \
                if _untrusted(st) else _unsafe_way(path)
            found.append(HookFile(name, path, "problem", f"not run: {where}"))
        elif not stat.S_ISREG(st.st_mode):
            found.append(HookFile(name, path, "problem", "not a regular file"))
        elif not os.access(path, os.X_OK):
            found.append(HookFile(name, path, "problem",
                                  "not executable (chmod +x it, or rename it to "
                                  f"{name}.disabled to turn it off)"))
        else:
            found.append(HookFile(name, path, "run"))
    return found


def _unsafe_way(path: Path) -> str:
    """Why another user could swap the file `path` names (a folder or link on the way to its
    real location is theirs, or writable by others), or ""."""
    from . import safefs
    from .errors import UnsafePath

    try:
        safefs.check_parents(path)
    except UnsafePath as exc:
        return str(exc)
    return ""


def _untrusted(st: os.stat_result) -> str:
    """Why another user could change a hook or its folder with this stat, or ""."""
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def discover(directory: Path) -> list[HookCommand]:
    """The hooks of `directory` that run (see `scan`), in name order."""
    return [f.command for f in scan(directory) if f.state == "run"]


def from_config(spec: str | Sequence[str] | None, label: str) -> list[HookCommand]:
    """The hook a config entry names: a string runs via ``/bin/sh -c``, a list as argv.

    The string is the operator's own text; certbatch never puts data into it (hooks read data
    from CERTBATCH_* environment variables), so running it through the shell is safe.
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError(f"{label}: empty hook command")
        return [HookCommand(name=label, argv=("/bin/sh", "-c", spec))]
    argv = tuple(spec)
    if not argv or not argv[0]:
        raise ValueError(f"{label}: empty hook command")
    return [HookCommand(name=label, argv=argv)]


KEY_MAX_LINES = 120  # lines redacted after a BEGIN ... PRIVATE KEY line at the most


class _Tail:
    """The last TAIL_LINES lines of a byte stream, fed in arbitrary chunks."""

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.partial = b""
        self.in_key = False  # inside a PEM private key block the hook printed
        self.key_lines = 0

    def feed(self, data: bytes) -> None:
        *complete, self.partial = (self.partial + data).split(b"\n")
        for raw in complete:
            line = raw[:MAX_LINE].decode(errors="replace")
            # A hook that prints a key file (debugging with cat) must not put the key into
            # logs or error messages: keep one marker line instead of the block.
            if "-----BEGIN" in line and "PRIVATE KEY-----" in line:
                self.in_key, self.key_lines = True, 0
                self.lines.append("[private key redacted]")
            if self.in_key:
                self.key_lines += 1
                # An RSA-4096 key is about 52 lines: a block without END must not swallow
                # the hook's real error message after it.
                if ("-----END" in line and "PRIVATE KEY-----" in line) \
                        or self.key_lines > KEY_MAX_LINES:
                    self.in_key = False
                continue
            self.lines.append(line)
        # An endless line must not grow without bound: keep only its beginning.
        self.partial = self.partial[: MAX_LINE * 4]

    def text(self) -> str:
        lines = list(self.lines)
        if self.partial and not self.in_key:
            lines.append(self.partial[:MAX_LINE].decode(errors="replace"))
        return "\n".join(lines[-TAIL_LINES:])


def _pump(sel: selectors.BaseSelector, tails: dict[int, _Tail], wait: float) -> None:
    """Read whatever the pipes have within `wait` seconds; unregister pipes at EOF."""
    for key, _ in sel.select(max(wait, 0)):
        fd = key.fd
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if data:
            tails[fd].feed(data)
        else:
            sel.unregister(fd)


# -- the registry of running hooks -----------------------------------------------------------
#
# pid (= process group id) -> when SIGTERM was sent to the group (None: not yet). A hook is in
# it from its start until just before it is reaped, so its group id can't have been reused by
# an unrelated process when terminate_all signals it: the leader is only tested for exit with
# WNOWAIT (`_exited`) until then.
_running: dict[int, float | None] = {}
_spared: set[int] = set()  # cleanups a stop lets finish (run_hook's after_stop): not signalled
_running_lock = threading.Lock()


def _sigterm(pid: int) -> float:
    """SIGTERM group `pid` unless that was done already (caller holds _running_lock); when."""
    sent = _running.get(pid)
    if sent is None:
        sent = time.monotonic()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        if pid in _running:
            _running[pid] = sent
    return sent


def terminate_all() -> int:
    """SIGTERM every running hook's process group (a signal stops certbatch), but for the
    cleanups a stop lets finish (`run_hook`'s after_stop, bounded by its own time); how many.
    Each `run_hook` call sends SIGKILL to what is left of its group KILL_GRACE seconds later."""
    with _running_lock:
        stopped = [pid for pid in _running if pid not in _spared]
        for pid in stopped:
            _sigterm(pid)
        return len(stopped)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the hook's process has ended, without reaping it (see the registry above)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the hook's whole process group, then SIGKILL what is left after KILL_GRACE.

    The group id is the hook's PID; we don't reap the hook before the final SIGKILL (waitid
    with WNOWAIT), so that id cannot have been reused by an unrelated process meanwhile. If
    terminate_all sent the SIGTERM already, the grace counts from then.
    """
    with _running_lock:
        deadline = _sigterm(proc.pid) + KILL_GRACE
    while time.monotonic() < deadline and not _exited(proc):
        # The leader has ended: its children may ignore SIGTERM, stop waiting.
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_hook(cmd: HookCommand, env: Mapping[str, str], cwd: Path, timeout: float,
             after_stop: float | None = None) -> HookResult:
    """Run one hook and wait for it at most `timeout` seconds.

    The child gets os.environ plus `env` (os.environ itself is never touched: hooks run from
    worker threads), stdin from /dev/null, `cwd` as working directory and its own session, so a
    timeout kills the hook and everything it started. A hook that cannot be started counts as
    failed with status 127 (not found) or 126 (not executable), as in the shell.

    Once certbatch is interrupted (see interrupt.py) no hook starts, and a running one is
    stopped like a timed-out one: both give an `interrupted` result at once. A hook that had
    already exited keeps its status, but what it left running in its group is killed too.
    `after_stop`: a cleanup that runs all the same (a dns-01 `remove`): started after a stop
    too, and given up to that many seconds after the stop (within `timeout`) before it is
    killed as timed out.
    """
    child_env = {k: v for k, v in os.environ.items() if k not in RESERVED_ENV}
    child_env.update(env)
    start = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    if interrupt.requested() and after_stop is None:
        failed = HookResult(cmd.name, cmd.argv, None, False, 0.0, "",
                            "not started: certbatch was interrupted", interrupted=True)
    else:
        log.info("hook %s: starting %s in %s", cmd.name, " ".join(cmd.argv), cwd)
        # Started outside _running_lock: 16 workers start their dns and deploy hooks side by
        # side, not one fork at a time. A stop requested before the hook is in the registry
        # (terminate_all does not see it) is seen by _wait's first look, which stops it.
        try:
            proc = subprocess.Popen(
                cmd.argv, cwd=cwd, env=child_env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                close_fds=True, umask=0o077,  # what a hook creates is private by default
            )
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            failed = HookResult(cmd.name, cmd.argv, code, False, time.monotonic() - start,
                                "", f"cannot run {cmd.argv[0]}: {exc.strerror or exc}")
        else:
            with _running_lock:
                _running[proc.pid] = None
                if after_stop is not None:
                    _spared.add(proc.pid)
    if proc is None:
        _log_result(failed)
        return failed
    ended = False
    try:
        timed_out, interrupted, out, err = _wait(proc, start, timeout, after_stop)
        ended = True
    finally:
        if not ended:  # a bug in here must not leave the hook running or us waiting for it
            _kill_group(proc)
        with _running_lock:  # out of the registry, then reaped: its group id may be reused
            _running.pop(proc.pid, None)
            _spared.discard(proc.pid)
        returncode = proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    result = HookResult(
        hook=cmd.name, argv=cmd.argv, returncode=None if timed_out or interrupted else returncode,
        timed_out=timed_out, duration=time.monotonic() - start, stdout_tail=out.text(),
        stderr_tail=err.text(), interrupted=interrupted,
    )
    _log_result(result)
    return result


def _wait(proc: subprocess.Popen[bytes], start: float, timeout: float,
          after_stop: float | None = None) -> tuple[bool, bool, _Tail, _Tail]:
    """run_hook's part while the hook runs: read its output until it ends, times out or a stop
    is requested (then kill its group). Leaves the hook unreaped. (timed_out, interrupted,
    stdout tail, stderr tail)."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Tail(), _Tail()
    tails = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    timed_out = interrupted = kill = False
    with selectors.DefaultSelector() as sel:
        for fd in tails:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        deadline = start + timeout
        exited_at: float | None = None
        while True:
            if exited_at is None and _exited(proc):
                exited_at = time.monotonic()  # it ended before this
            now = time.monotonic()
            if after_stop is not None and interrupt.requested():
                deadline = min(deadline, (interrupt.requested_at() or now) + after_stop)
            elif interrupt.requested():
                # Stop it, or what it left running in its group if it has ended. Seen to end
                # only after the stop was requested, it may have ended of our SIGTERM (trapped,
                # with any status): interrupted, not done.
                stopped_at = interrupt.requested_at() or 0.0
                interrupted, kill = exited_at is None or exited_at >= stopped_at, True
                break
            if exited_at is not None:
                if not sel.get_map() or now - exited_at >= DRAIN_GRACE:
                    break
                wait = exited_at + DRAIN_GRACE - now
            elif now >= deadline:
                timed_out = kill = True
                break
            else:
                wait = deadline - now
            # Wake up regularly: the hook may exit while a background child keeps its pipes
            # open, or close its pipes and keep running; and a stop may be requested.
            if sel.get_map():
                _pump(sel, tails, min(0.1, wait))
            else:
                if after_stop is None:
                    interrupt.wait(min(0.02, wait))
                else:
                    time.sleep(min(0.02, wait))
        if kill:
            _kill_group(proc)
            drain_until = time.monotonic() + 0.2
            while sel.get_map() and time.monotonic() < drain_until:
                _pump(sel, tails, drain_until - time.monotonic())
    return timed_out, interrupted, out, err


def _log_result(result: HookResult) -> None:
    level = logging.INFO if result.ok else logging.WARNING
    if result.interrupted:
        how = ("stopped, process group killed" if result.duration else "not started") + \
            ": certbatch was interrupted"
    elif result.timed_out:
        how = "timed out, process group killed"
    elif result.returncode is not None and result.returncode < 0:
        how = f"killed by signal {-result.returncode}"
    else:
        how = f"exit status {result.returncode}"
    log.log(level, "hook %s: %s after %.2f s", result.hook, how, result.duration)
    for stream, tail in (("stdout", result.stdout_tail), ("stderr", result.stderr_tail)):
        for line in tail.splitlines():
            log.log(level, "hook %s %s: %s", result.hook, stream, line)
