"""Finding and running hook programs.

A hook is an external program: an executable file in ``deploy.d/`` or ``notify.d/`` (found by
`discover`, with run-parts' naming rules) or a command from the config file (`from_config`).
`run_hook` runs one in its own process group with a timeout, hands data over only through
environment variables, and keeps the last lines of its output for messages and logs.
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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import HookError

log = logging.getLogger("certbatch.hooks")

TAIL_LINES = 20  # lines of stdout/stderr kept per hook run
MAX_LINE = 2000  # characters kept of one line (a hook may print megabytes without a newline)
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL to the hook's process group
DRAIN_GRACE = 1.0  # seconds to wait for EOF after the hook exited (a background child may hold
#                    its stdout open; we stop reading rather than wait for that child)

# Names run-parts and package managers use for backups and leftovers: never run them as hooks.
_SKIP = re.compile(r"^\.|~$|\.bak$|\.disabled$|\.dpkg-[a-z]+$|\.rpm[a-z]*$")


@dataclass(frozen=True)
class HookCommand:
    """One hook to run: `name` for messages, `argv` to execute (argv[0] absolute for files)."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class HookResult:
    """How one hook run ended; `returncode` is None only when it was killed after a timeout."""

    hook: str
    argv: tuple[str, ...]
    returncode: int | None
    timed_out: bool
    duration: float
    stdout_tail: str
    stderr_tail: str

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.returncode == 0

    def error(self) -> HookError:
        """The exception describing this (failed) run."""
        return HookError(self.hook, self.returncode, self.timed_out, self.stderr_tail)


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
    base = directory.absolute()  # hooks run with another cwd: argv[0] must be absolute
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
        elif not stat.S_ISREG(st.st_mode):
            found.append(HookFile(name, path, "problem", "not a regular file"))
        elif not os.access(path, os.X_OK):
            found.append(HookFile(name, path, "problem",
                                  "not executable (chmod +x it, or rename it to "
                                  f"{name}.disabled to turn it off)"))
        else:
            found.append(HookFile(name, path, "run"))
    return found


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


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the hook's whole process group, then SIGKILL what is left after KILL_GRACE.

    The group id is the hook's PID; we don't reap the hook before the final SIGKILL (waitid
    with WNOWAIT), so that id cannot have been reused by an unrelated process meanwhile.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break  # the leader has ended; its children may ignore SIGTERM: stop waiting
        except ChildProcessError:
            break
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_hook(cmd: HookCommand, env: Mapping[str, str], cwd: Path, timeout: float) -> HookResult:
    """Run one hook and wait for it at most `timeout` seconds.

    The child gets os.environ plus `env` (os.environ itself is never touched: hooks run from
    worker threads), stdin from /dev/null, `cwd` as working directory and its own session, so a
    timeout kills the hook and everything it started. A hook that cannot be started counts as
    failed with status 127 (not found) or 126 (not executable), as in the shell.
    """
    child_env = dict(os.environ)
    child_env.update(env)
    log.info("hook %s: starting %s in %s", cmd.name, " ".join(cmd.argv), cwd)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd.argv, cwd=cwd, env=child_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            close_fds=True, umask=0o077,  # what a hook creates is private unless it says so
        )
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        result = HookResult(cmd.name, cmd.argv, code, False, time.monotonic() - start, "",
                            f"cannot run {cmd.argv[0]}: {exc.strerror or exc}")
        _log_result(result)
        return result

    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Tail(), _Tail()
    tails = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    timed_out = False
    with selectors.DefaultSelector() as sel:
        for fd in tails:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        deadline = start + timeout
        exited_at: float | None = None
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None:
                if not sel.get_map() or now - exited_at >= DRAIN_GRACE:
                    break
                wait = exited_at + DRAIN_GRACE - now
            elif now >= deadline:
                timed_out = True
                break
            else:
                wait = deadline - now
            # Wake up regularly: the hook may exit while a background child keeps its pipes
            # open, or close its pipes and keep running.
            if sel.get_map():
                _pump(sel, tails, min(0.1, wait))
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=min(0.1, wait))
        if timed_out:
            _kill_group(proc)
            drain_until = time.monotonic() + 0.2
            while sel.get_map() and time.monotonic() < drain_until:
                _pump(sel, tails, drain_until - time.monotonic())
        returncode = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    result = HookResult(
        hook=cmd.name, argv=cmd.argv, returncode=None if timed_out else returncode,
        timed_out=timed_out, duration=time.monotonic() - start,
        stdout_tail=out.text(), stderr_tail=err.text(),
    )
    _log_result(result)
    return result


def _log_result(result: HookResult) -> None:
    level = logging.INFO if result.ok else logging.WARNING
    if result.timed_out:
        how = "timed out, process group killed"
    elif result.returncode is not None and result.returncode < 0:
        how = f"killed by signal {-result.returncode}"
    else:
        how = f"exit status {result.returncode}"
    log.log(level, "hook %s: %s after %.2f s", result.hook, how, result.duration)
    for stream, tail in (("stdout", result.stdout_tail), ("stderr", result.stderr_tail)):
        for line in tail.splitlines():
            log.log(level, "hook %s %s: %s", result.hook, stream, line)
