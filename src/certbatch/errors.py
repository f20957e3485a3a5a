"""certbatch's exceptions: each carries its data and its process exit code.

The command layer maps an exception to an exit code through `exit_code_for`, the one place that
does so. Per-certificate failures are caught by the runner and recorded, so only errors that stop
the whole run reach the command layer.
"""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import os as _os
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL from sysexits.h: cron wrappers know it means "try later"
EXIT_SIGNAL = 128  # + the signal number: 129 SIGHUP, 130 SIGINT, 143 SIGTERM (as a shell says)


class CertbatchError(Exception):
    """Base class: a failure with a message meant for the operator."""

    exit_code = EXIT_FAILURE


class ConfigError(CertbatchError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = EXIT_USAGE

    def __init__(self, file: Path | str, key: str, problem: str) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(f"{where}: {problem}")


class UsageError(CertbatchError):
    """The command line asks for something impossible (e.g. --only with an unknown name)."""

    exit_code = EXIT_USAGE


class LockBusy(CertbatchError):
    """Another certbatch process holds the run lock."""

    exit_code = EXIT_LOCKED

    def __init__(self, path: Path, holder_pid: int | None,
                 holder: dict[str, str] | None = None) -> None:
        self.path = path
        self.holder_pid = holder_pid
        self.holder = holder or {}  # what the holder wrote in `.running`: command, started_at
        if holder_pid is None:
            super().__init__(f"another certbatch run is in progress (another process holds "
                             f"{path})")
            return
        what = [f"pid {holder_pid}"]
        if self.holder.get("command"):
            what.append(self.holder["command"])
        since = self.holder.get("started_at", "")
        if since:  # 2026-11-29T03:00:12Z: the time, and the day if it is not today's
            today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
            what.append(f"running since {since[11:] if since[:10] == today else since}")
        super().__init__(f"another certbatch ({', '.join(what)}) holds the lock {path}; "
                         f"try again later")


class StoreError(CertbatchError):
    """Reading or writing the state folder failed."""


class UnsafePath(StoreError):
    """A file or folder certbatch would use is a symlink it did not make, not its own, or
    writable by others: it is neither read, written nor deleted (exit 2 before any work)."""

    exit_code = EXIT_USAGE

    def __init__(self, path: Path | str, why: str) -> None:
        self.path = str(path)
        self.why = why
        super().__init__(f"{self.path}: {why}")


class AcmeError(CertbatchError):
    """The ACME server refused a request or could not be reached.

    `type` is the RFC 8555 problem type (e.g. ``urn:ietf:params:acme:error:dns``) when the CA sent
    one, and `detail` its human-readable text.
    """

    def __init__(self, detail: str, type: str | None = None, status: int | None = None) -> None:
        self.type = type
        self.detail = detail
        self.status = status
        super().__init__(f"{type}: {detail}" if type else detail)


class RateLimited(AcmeError):
    """The CA answered rateLimited (HTTP 429), or 503 with a Retry-After; do not retry before
    `retry_after`."""

    def __init__(self, detail: str, retry_after: _dt.datetime | None,
                 type: str | None = "urn:ietf:params:acme:error:rateLimited",
                 status: int | None = 429) -> None:
        self.retry_after = retry_after
        super().__init__(detail, type=type, status=status)


class ChallengeError(CertbatchError):
    """Setting up or cleaning up a challenge response failed (webroot, standalone, dns script)."""


class CertificateCheckError(CertbatchError):
    """The CA's certificate does not parse, match the key, or cover the requested names."""


class DeadlineExceeded(CertbatchError):
    """A certificate took longer than its deadline."""


class HookError(CertbatchError):
    """A hook program failed or timed out."""

    def __init__(self, hook: str, returncode: int | None, timed_out: bool,
                 stderr_tail: str = "", interrupted: bool = False) -> None:
        self.hook = hook
        self.returncode = returncode
        self.timed_out = timed_out
        self.stderr_tail = stderr_tail
        self.interrupted = interrupted  # certbatch got a signal: stopped, or never started
        if interrupted:
            what = "stopped: certbatch was interrupted"
        elif timed_out:
            what = "timed out"
        elif returncode is not None and returncode < 0:
            what = f"killed by signal {-returncode}"
        else:
            what = f"exited with status {returncode}"
        msg = f"hook {hook} {what}"
        last = stderr_tail.strip().splitlines()[-1:] if stderr_tail else []
        if last:
            msg += f": {last[0]}"
        super().__init__(msg)


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP stopped a step (a certificate, a hook) or the whole command.

    A BaseException, like KeyboardInterrupt: no `except Exception` may take it for a failure of
    its own and go on. The runner records it per certificate ("interrupted"); at the command
    level the process exits 128 + `signum` (EXIT_SIGNAL) after its children are gone.
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        self.detail = detail
        self.exit_code = EXIT_SIGNAL + signum
        super().__init__(f"interrupted: {detail}" if detail else "interrupted")


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that ended a command.

    An OSError that reaches the command layer happened before any work (the runner records
    errors during the work per certificate): a path that cannot be used as configured (see
    SETUP_ERRNOS) exits 2, anything else (a full disk, an I/O error) 1.
    """
    if isinstance(exc, (CertbatchError, Interrupted)):
        return exc.exit_code
    if isinstance(exc, OSError):
        return EXIT_USAGE if exc.errno in SETUP_ERRNOS else EXIT_FAILURE
    return EXIT_FAILURE


# -- OS errors as one line ------------------------------------------------------------------------

# Errors that say a configured path cannot be used as it is: permissions, a read-only file
# system, a symlink loop, a file where a folder belongs. The operator must fix something: exit 2.
SETUP_ERRNOS = frozenset({_errno.EACCES, _errno.EPERM, _errno.EROFS, _errno.ELOOP,
                          _errno.ENOTDIR, _errno.EISDIR, _errno.EEXIST, _errno.ENAMETOOLONG})

_WHAT = {_errno.ELOOP: "symlink loop (too many levels of symbolic links)"}


def os_error_message(exc: OSError, path: Path | str | None = None) -> str:
    """`<path>: <what>` for an OS error, on one line: the file the error names (else `path`),
    and the system's text (`permission denied`, `no space left on device`, ...)."""
    where: object = exc.filename if exc.filename is not None else path
    if exc.filename is not None and exc.filename2 is not None:
        where = f"{_name(exc.filename)} -> {_name(exc.filename2)}"
    what = _WHAT.get(exc.errno or 0) or exc.strerror or str(exc) or type(exc).__name__
    what = what[:1].lower() + what[1:]
    if exc.errno in (_errno.EACCES, _errno.EPERM) and _os.geteuid() != 0:
        what += f" (certbatch runs as uid {_os.geteuid()}, not as root)"
    return f"{_name(where)}: {what}" if where is not None else what


def _name(path: object) -> str:
    if isinstance(path, (str, bytes, _os.PathLike)):
        return _os.fsdecode(path).replace("\n", "?")  # one line, whatever the file is called
    return str(path)
