"""SIGTERM, SIGINT and SIGHUP: stop the work cleanly, then exit 128 + the signal number.

`install` (called by ``cli.main``, in the main thread) sets the handlers. They behave in one of
three modes:

* exit (the default): nothing runs that needs cleaning up (loading the config, `status`,
  `check`, dry runs, waiting for the run lock), so the handler raises `Interrupted` in the main
  thread at once and ``cli.main`` exits.
* graceful (while `run_lock` is held, see `graceful`): the handler only records the signal and
  wakes a watcher thread; it never raises, so no lock, file or child process is abandoned
  half-way. The watcher sets the stop event and sends SIGTERM to every running hook's process
  group (`hooks.terminate_all`; each `run_hook` call SIGKILLs what is left after
  hooks.KILL_GRACE and returns an interrupted result). The code checks `requested` between
  steps: the worker pool starts no new certificate, no new hook, dns script or target starts,
  the ACME client sends no new request, sleeps end early. When the work has drained (every hook
  process reaped, statuses saved, locks released), `run_lock` raises `Interrupted`.
* stopping: the command is exiting; further signals are ignored, so a second Ctrl-C never cuts
  the cleanup short.

Python runs signal handlers in the main thread only, between bytecodes: a handler must not take
a lock the main thread may hold (threading.Event.set, the hooks registry, logging). So the
handler only assigns a global and writes a byte to a pipe (neither takes a lock); the watcher
thread, which holds nothing else, does the rest.

Never SIG_IGN: hook processes inherit ignored signals, and could then not be stopped with
SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from .errors import Interrupted

log = logging.getLogger("certbatch.interrupt")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

EXIT, GRACEFUL, STOPPING = "exit", "graceful", "stopping"

_mode = EXIT
_signum: int | None = None  # the first signal received in graceful mode
_at: float | None = None  # when (time.monotonic()); set before _signum
_stop = threading.Event()  # set by the watcher (never by the handler): wakes sleepers
_wake_w: int | None = None  # the handler writes the signal number here
_installed: dict[int, object] = {}  # previous handlers, for uninstall


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum or signal.SIGINT).name
    except ValueError:
        return f"signal {signum}"


def requested() -> bool:
    """True once a signal asked the work to stop (cheap: check it between steps)."""
    return _signum is not None


def signal_number() -> int | None:
    return _signum


def requested_at() -> float | None:
    """When the stop was requested (time.monotonic()), if it was."""
    return _at if _signum is not None else None


def check(detail: str = "") -> None:
    """Raise `Interrupted` (with `detail`, e.g. "not started") if a stop was requested."""
    if _signum is not None:
        raise Interrupted(_signum, detail)


def error(detail: str = "") -> Interrupted:
    """The exception to raise for a step that a stop cut short (SIGINT if none is known)."""
    return Interrupted(_signum or signal.SIGINT, detail)


def wait(seconds: float) -> bool:
    """Sleep `seconds`, or less if a stop is requested meanwhile; True if it was."""
    if seconds > 0 and _signum is None:
        _stop.wait(seconds)
    return _signum is not None


# -- handlers --------------------------------------------------------------------------------

def _handler(signum: int, _frame: FrameType | None) -> None:
    global _mode, _signum, _at
    if _mode == EXIT:
        _mode = STOPPING
        raise Interrupted(signum)
    if _signum is None:
        _at = time.monotonic()
        _signum = signum
    if _wake_w is not None:
        with contextlib.suppress(OSError):  # a full pipe: the watcher is awake anyway
            os.write(_wake_w, bytes([signum]))


def _watch(read_fd: int) -> None:
    """The watcher thread: act on the signals the handler passes through the pipe."""
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data or 0 in data:  # closed, or uninstall's stop byte
            os.close(read_fd)
            return
        for signum in data:
            if not _stop.is_set():
                _stop.set()
                from . import hooks
                n = hooks.terminate_all()
                log.warning("%s received: stopping; no new certificate, hook or target starts; "
                            "%d running hook(s) sent SIGTERM (SIGKILL after %g s)",
                            signal_name(signum), n, hooks.KILL_GRACE)
            else:
                log.warning("%s received while stopping: ignored, the cleanup goes on",
                            signal_name(signum))


def install() -> None:
    """Set the handlers for SIGTERM, SIGINT and SIGHUP (main thread only) in exit mode."""
    global _wake_w
    if _installed:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    _wake_w = write_fd
    threading.Thread(target=_watch, args=(read_fd,), name="certbatch-signals",
                     daemon=True).start()
    for signum in SIGNALS:
        _installed[signum] = signal.signal(signum, _handler)


def uninstall() -> None:
    """Restore the previous handlers and reset the state (for in-process callers and tests)."""
    global _wake_w, _mode, _signum, _at
    for signum, previous in _installed.items():
        signal.signal(signum, previous)  # type: ignore[arg-type]
    _installed.clear()
    if _wake_w is not None:
        with contextlib.suppress(OSError):
            os.write(_wake_w, b"\0")
        os.close(_wake_w)
        _wake_w = None
    _mode, _signum, _at = EXIT, None, None
    _stop.clear()


def stopping() -> None:
    """The command is exiting: ignore further signals from now on."""
    global _mode
    _mode = STOPPING


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """Signals stop the work cleanly inside this block (see the module docstring); at its end,
    with every child gone, raise `Interrupted` if one came. Main thread only."""
    global _mode
    if _mode == STOPPING or threading.current_thread() is not threading.main_thread():
        yield  # already exiting, or not the command's own thread: nothing to switch
        return
    _mode = GRACEFUL
    try:
        yield
    finally:
        if _signum is not None:
            _mode = STOPPING
            raise Interrupted(_signum)
        _mode = EXIT
