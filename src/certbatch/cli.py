"""The command line: parse options, call the core, render its report, return an exit code.

Exit codes (also in `certbatch --help` and the README): 0 success or nothing due; 1 a certificate
or the notify phase failed; 2 usage or configuration error; 75 another run holds the lock; 129,
130, 143 stopped by SIGHUP, SIGINT, SIGTERM (128 + the signal number, see interrupt.py).
"""

from __future__ import annotations

import datetime as dt
import gc
import io
import logging
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import config as config_mod
from . import interrupt, retire
from .checks import read_problems as _read_problems  # renew, status: light to import
from .errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CertbatchError,
    ConfigError,
    Interrupted,
    UsageError,
    exit_code_for,
    os_error_message,
)

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("certbatch.cli")

EXIT_CODES_HELP = """\b
Exit codes:
  0   success, or nothing was due
  1   a certificate or the notify phase failed
  2   usage or configuration error
  75  another certbatch run holds the lock (try later)
  129, 130, 143  stopped by SIGHUP, SIGINT (Ctrl-C), SIGTERM: hooks were
      stopped, unfinished certificates and targets count as failed and are
      retried by the next run"""


# -- options accepted both before and after the command name -------------------------------------

def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        root = ctx.find_root()
        if key == "verbose":  # -v counts, wherever it stands: `-v renew -v` is -vv
            root.meta[key] = root.meta.get(key, 0) + (value or 0)
        elif value not in (None, False, 0) or key not in root.meta:
            root.meta[key] = value
    return callback


def common_options(f: F) -> F:
    """-c/-v/-q/--log-file, valid on the group and on every command."""
    f = click.option("--log-file", type=click.Path(dir_okay=False), expose_value=False,
                     callback=_remember("log_file"),
                     help="Append timestamped log lines here (overrides logging.file).")(f)
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False,
                     callback=_remember("quiet"), help="Print errors only.")(f)
    f = click.option("-v", "--verbose", count=True, expose_value=False,
                     callback=_remember("verbose"),
                     help="More detail on stderr (-vv: debug, including ACME steps).")(f)
    f = click.option("-c", "--config", type=click.Path(dir_okay=False), expose_value=False,
                     callback=_remember("config"),
                     help="Config file (default: $CERTBATCH_CONFIG, ./certbatch.yaml, "
                          "/etc/certbatch/certbatch.yaml).")(f)
    return f


def _opt(ctx: click.Context, key: str) -> Any:
    return ctx.find_root().meta.get(key)


def load_settings(ctx: click.Context) -> config_mod.Settings:
    path = config_mod.find_config(_opt(ctx, "config"))
    from .config_cache import load_cached

    try:
        settings = load_cached(path, write=not _writes_nothing(ctx))
    except ConfigError as exc:
        if exc.key or exc.problem != "file not found":
            raise
        hint = config_mod.missing_config_hint(_opt(ctx, "config"))
        raise ConfigError(exc.file, "", f"file not found; {hint}") from None
    problem = setup_logging(ctx, settings)
    if problem:  # only a command that writes nothing goes on without its log file
        ctx.meta[_LOG_PROBLEM] = problem
        if ctx.info_name != "check":  # check lists it with its other problems
            err(f"certbatch: warning: {problem}; going on without it")
    log.info("certbatch %s %s: started (pid %d, config %s)", _version(), ctx.info_name,
             os.getpid(), settings.path)
    return settings


def _version() -> str:
    # A constant, not importlib.metadata: that import alone costs ~9 ms on every cron run.
    from . import __version__

    return __version__


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time: rich's live display swaps it for a proxy
    that prints above the progress line, and a stream captured earlier would garble that line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):
            return  # printed on stderr by the command itself
        self.stream = sys.stderr
        super().emit(record)


class _FileFormatter(logging.Formatter):
    """`2026-11-22T03:17:00.123+00:00 PID LEVEL logger: message` (local time, milliseconds)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return dt.datetime.fromtimestamp(record.created).astimezone().isoformat(
            timespec="milliseconds")


class _Redact(logging.Filter):
    """Replaces known secrets (the EAB HMAC key) in every message, whoever logged it."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(s in message for s in self.secrets):
                for s in self.secrets:
                    message = message.replace(s, "[redacted]")
                record.msg, record.args = message, None
        return True


class _LogFile(logging.FileHandler):
    """The log file, appended to. A new one is created 0600 whatever the umask (it names
    certificates, hooks and errors); an existing one keeps its mode. A write that fails (a full
    disk) is one warning on stderr, then the command goes on without the file: a traceback per
    log line ("--- Logging error ---") would bury the command's own message."""

    _failed = False

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.baseFilename, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            fd = os.open(self.baseFilename, flags)
        else:
            try:
                os.fchmod(fd, 0o600)  # the umask may have taken bits away (0277: 0400)
            except BaseException:
                os.close(fd)
                raise
        return open(fd, "a", encoding="utf-8")  # noqa: SIM115 - the handler closes it

    def emit(self, record: logging.LogRecord) -> None:
        if not self._failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)  # a bad log call: logging's own report
            return
        self._failed = True
        err(f"certbatch: warning: log file {os_error_message(exc, self.baseFilename)}; "
            f"not logging to it any more")


_OURS = "_certbatch_handler"  # marks the handlers setup_logging added (and may remove again)
_LOG_PROBLEM = "log_file_problem"  # ctx.meta: why a read-only command runs without its log file


def _writes_nothing(ctx: click.Context) -> bool:
    """status, check and the dry runs: they change nothing, so they can do without a log."""
    return ctx.info_name in ("status", "check") or bool(ctx.params.get("dry_run"))


def _unwritable(path: Path) -> str | None:
    """Why `path` could not be opened for appending (None: it could), without opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            return f"{parent} is not a folder" if parent.exists() else "No such file or directory"
        return None if os.access(parent, os.W_OK | os.X_OK) else "Permission denied"
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISDIR(st.st_mode):
        return "Is a directory"
    return None if os.access(path, os.W_OK) else "Permission denied"


def setup_logging(ctx: click.Context, settings: config_mod.Settings | None) -> str | None:
    """Log lines go to stderr with -v (INFO) or -vv (DEBUG), and to the log file (INFO; DEBUG
    with -vv). Nothing else is ever printed by logging: without a handler Python would print
    warnings and errors raw on stderr ("last resort"), a second copy of the errors the command
    prints itself, and noise in cron mail even with -q.

    A `logging.file` that cannot be opened stops renew and run-hook (ConfigError, exit 2); a
    command that writes nothing goes on without it, and this returns why. `--log-file` was asked
    for on the command line: it must work (UsageError, exit 2) whatever the command.
    """
    verbose = _opt(ctx, "verbose") or 0
    handlers: list[logging.Handler] = [logging.NullHandler()]
    log_problem = None
    if verbose:
        stderr = _StderrHandler()
        stderr.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        stderr.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handlers.append(stderr)
    log_file = _opt(ctx, "log_file") or (settings.log_file if settings else None)
    if log_file and not _opt(ctx, "log_file") and ctx.params.get("dry_run"):
        # A dry run writes nothing, not even a log line (only a --log-file given on its
        # command line is written): whether the file could be opened is found without
        # opening it.
        why = _unwritable(Path(log_file))
        if why:
            assert settings is not None
            log_problem = str(ConfigError(settings.path, "logging.file",
                                          f"cannot open {log_file}: {why}"))
        log_file = None
    if log_file:
        try:
            file_handler = _LogFile(log_file, encoding="utf-8")
        except OSError as exc:
            if _opt(ctx, "log_file"):
                raise UsageError(f"--log-file {log_file}: cannot open: "
                                 f"{exc.strerror or exc}") from None
            assert settings is not None
            problem = ConfigError(settings.path, "logging.file",
                                  f"cannot open {log_file}: {exc.strerror or exc}")
            if not _writes_nothing(ctx):
                raise problem from None
            log_problem = str(problem)
        else:
            file_handler.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
            file_handler.setFormatter(_FileFormatter(
                "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
            handlers.append(file_handler)
    from .dns.secrets import inline_secrets

    secrets = inline_secrets(settings) if settings else []  # EAB key, inline TSIG secrets
    for handler in handlers:
        setattr(handler, _OURS, True)
        handler.addFilter(_Redact(secrets))
    # The acme library logs every request and response (JWS payloads, including an external
    # account binding) at DEBUG: it stays capped at WARNING whatever -v says. Its warnings go
    # where ours go.
    # Our level is the most detailed one a handler shows: without -v or a log file, the log
    # calls of a run (dozens per certificate) return at once instead of building records that
    # only the NullHandler would see.
    shown = [h.level or logging.DEBUG for h in handlers  # NOTSET shows everything
             if not isinstance(h, logging.NullHandler)]
    ours = min(shown) if shown else logging.WARNING
    for name, level in (("certbatch", ours), ("acme", max(ours, logging.WARNING))):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        for handler in list(logger.handlers):
            if getattr(handler, _OURS, False):
                logger.removeHandler(handler)
                handler.close()
        for handler in handlers:
            logger.addHandler(handler)
    return log_problem


def out(line: str = "") -> None:
    click.echo(line)


def _silent(line: str = "") -> None:
    pass


def err(line: str) -> None:
    click.echo(line, err=True)


# -- commands -------------------------------------------------------------------------------------

@click.group(help=f"Renew TLS certificates over ACME in parallel, stage them, apply them in one "
                  f"batch.\n\n{EXIT_CODES_HELP}",
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), message="certbatch %(version)s")
@common_options
def cli() -> None:
    pass


@cli.command(epilog=EXIT_CODES_HELP)
@common_options
@click.option("--force", is_flag=True, help="Renew every selected certificate, due or not.")
@click.option("--only", "only", multiple=True, metavar="NAME",
              help="Only this certificate (repeatable).")
@click.option("--dry-run", is_flag=True,
              help="Print the decision for each certificate; no network, no writes.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Certificates issued in parallel (default: renewal.workers, 16).")
@click.option("--no-notify", is_flag=True,
              help="Stage renewed certificates but leave the notify phase to `run-hook`.")
@click.option("--jitter", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="Sleep a random 0..SECONDS before taking the run lock, only if something "
                   "needs an order (default: renewal.jitter, 0).")
@click.option("--wait", "wait", type=click.FloatRange(0), default=0, metavar="SECONDS",
              help="Wait up to SECONDS for another run's lock instead of exiting with 75.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON report on stdout (schema: docs/report.schema.json).")
@click.option("--metrics-file", type=click.Path(dir_okay=False), default=None,
              help="Write Prometheus textfile metrics here after the run (overrides "
                   "metrics.file).")
@click.pass_context
def renew(ctx: click.Context, force: bool, only: tuple[str, ...], dry_run: bool,
          workers: int | None, no_notify: bool, jitter: float | None, wait: float,
          as_json: bool, metrics_file: str | None) -> int:
    """Renew every certificate that is due, then apply the batch with one notify run."""
    from . import render
    from .runner import Runner, run_lock

    settings = load_settings(ctx)
    if dry_run:  # reads the state folder, and only that: one line per folder it cannot read
        state = settings.paths.state
        problems = _read_problems([state, state / "certs"])
        if problems:
            return _cannot_read(problems)
    quiet = bool(_opt(ctx, "quiet"))
    verbose = bool(_opt(ctx, "verbose"))
    tty = sys.stdout.isatty() and sys.stderr.isatty()
    progress = None
    if tty and not quiet and not as_json and not dry_run:
        progress = render.RichProgress(sys.stderr)
    runner = Runner(settings, progress)
    runner.select(only)  # an unknown --only name is a usage error before anything is written
    if dry_run:
        # Touches nothing: no lock file, no state, no network.
        report = runner.renew(force=force, only=only, dry_run=True)
        if as_json:
            out(render.dumps(render.report_to_dict(report)))
        else:
            for line in render.plan_lines(report):
                out(line)
        return EXIT_OK
    metrics_error = None
    delay = settings.renewal.jitter if jitter is None else jitter
    try:
        # With a jitter, the run stops after its decisions when something needs an order,
        # then sleeps without the lock (a manual renew or run-hook meanwhile is never blocked
        # by a sleeping cron run) and runs again; a run with nothing to order reads once.
        with run_lock(settings.paths.state, wait, "renew"):
            report = runner.renew(force=force, only=only, workers=workers, notify=not no_notify,
                                  jitter=0, defer_orders=delay > 0)
            if not report.deferred:
                metrics_error = _write_metrics(settings, runner, report, metrics_file)
        if report.deferred:
            _jitter_sleep(delay, sum(c.decision.needs_order for c in report.certificates))
            runner = Runner(settings, progress)  # a store of its own: the state is read again
            with run_lock(settings.paths.state, wait, "renew"):
                report = runner.renew(force=force, only=only, workers=workers,
                                      notify=not no_notify, jitter=0)
                metrics_error = _write_metrics(settings, runner, report, metrics_file)
    finally:
        if progress:
            progress.stop()
    # Errors first, the summary last: cron mails stdout and stderr merged (2>&1), and the
    # summary line must end the mail (click.echo flushes each line).
    if progress is None:
        for line in render.error_lines(report):
            err(f"certbatch: {line}")
    exit_code = report.exit_code
    if metrics_error:
        err(f"certbatch: {metrics_error}")
        exit_code = EXIT_FAILURE
    counts = render.summary_counts(report)
    log.info("renew: finished in %.1f s, exit code %d (%s)", report.duration, exit_code,
             ", ".join(f"{v} {k}" for k, v in counts.items()) or "no certificates")
    sys.stderr.flush()
    if as_json:
        out(render.dumps(render.report_to_dict(report)))
    elif progress is not None:
        progress.table(report)
    elif not quiet and (report.changed or verbose):
        for line in render.summary_lines(report, verbose):
            out(line)
    return exit_code


def _jitter_sleep(jitter: float, due: int) -> None:
    """cron's random delay, slept without the run lock (a manual `renew` or `run-hook`
    meanwhile is never blocked by a sleeping cron run), once a first pass under the lock found
    `due` certificates to order. SIGTERM, SIGINT, SIGHUP end the sleep at once (nothing is
    held, so the command exits with 128 + the signal)."""
    import random
    import time

    pause = random.uniform(0, jitter)
    log.info("jitter: sleeping %.1f s before taking the run lock (%d certificate%s to order)",
             pause, due, "s" * (due != 1))
    time.sleep(pause)


def _write_metrics(settings: config_mod.Settings, runner: Any, report: Any,
                   metrics_file: str | None) -> str | None:
    """Write the metrics file if one is asked for; the error line if it cannot be written
    (the renewals are done: they are reported, then the run fails, exit 1)."""
    metrics_path = metrics_file or settings.metrics_file
    if not metrics_path:
        return None
    from . import metrics

    try:
        metrics.write(Path(metrics_path), settings, runner.store, report)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        error = f"cannot write metrics file {metrics_path}: {exc.strerror}{where}"
        log.error("%s", error)
        return error
    return None


def _cannot_read(problems: list[str]) -> int:
    for p in problems:
        err(f"certbatch: error: {p}")
    return EXIT_USAGE


@cli.command()
@common_options
@click.argument("name", required=False, metavar="[NAME]")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx: click.Context, name: str | None, as_json: bool) -> int:
    """Show every configured certificate: expiry, days left, next renewal, last result.

    With NAME, everything known about that certificate: its live files, dates, renewal info,
    last attempt and error, backoff, pending entry and each notify target's state. The table
    cuts errors to the terminal's width (100 columns without one); NAME and --json do not.
    """
    import shutil

    from . import render
    from .report import spool_state, status_data, status_detail

    settings = load_settings(ctx)
    # Read only (no lock, nothing created): what cannot be read is one line each, and exit 2.
    state, spool = settings.paths.state, settings.paths.spool
    problems = _read_problems([state, state / "certs"], [spool, spool / "pending"])
    if problems:
        return _cannot_read(problems)
    if name is not None:
        detail, problems = status_detail(settings, name)
        if problems:
            return _cannot_read(problems)
        if as_json:
            out(render.dumps({"schema_version": render.REPORT_SCHEMA_VERSION,
                              "certificate": detail}))
        else:
            for line in render.detail_lines(detail):
                out(line)
        return EXIT_OK
    rows = status_data(settings)
    found = spool_state(settings)
    if found.problems:
        return _cannot_read(found.problems)
    pending = [p.name for p in found.pending]
    targets = [render.target_state_to_dict(t) for t in found.targets]
    if as_json:
        out(render.dumps({"schema_version": render.REPORT_SCHEMA_VERSION,
                          "certificates": rows,
                          "pending": pending,
                          "targets": targets}))
    else:
        width = shutil.get_terminal_size((render.STATUS_WIDTH, 24)).columns
        for line in render.status_rows(rows, width) + render.target_rows(targets, pending):
            out(line)
    return EXIT_OK


@cli.command("run-hook", epilog=EXIT_CODES_HELP)
@common_options
@click.option("--dry-run", is_flag=True,
              help="Print what each target would get and run, with its environment; run and "
                   "change nothing.")
@click.option("--target", "only_targets", multiple=True, metavar="NAME",
              help="Run only this notify target (repeatable).")
@click.option("--all", "all_live", is_flag=True,
              help="With --target: hand the target every live certificate, not only what is "
                   "pending (a new or rebuilt server).")
@click.option("--deploy", "deploy", metavar="NAME", default=None,
              help="Stage this stored certificate again through the deploy hooks instead; "
                   "every target applies it again.")
@click.option("--wait", "wait", type=click.FloatRange(0), default=0, metavar="SECONDS",
              help="Wait up to SECONDS for another run's lock instead of exiting with 75.")
@click.pass_context
def run_hook(ctx: click.Context, dry_run: bool, only_targets: tuple[str, ...], all_live: bool,
             deploy: str | None, wait: float) -> int:
    """Apply what is pending in the spool now (the notify phase), or re-stage one certificate.

    Each target gets what it has not applied yet; a target that fails keeps its entries and
    gets them again next time.
    """
    from . import render
    from .runner import Runner, run_lock

    if all_live and len(only_targets) != 1:
        raise UsageError("--all needs exactly one --target NAME")
    if deploy and (only_targets or all_live):
        raise UsageError("--deploy stages a certificate; it does not go with --target/--all")
    settings = load_settings(ctx)
    runner = Runner(settings)
    quiet = bool(_opt(ctx, "quiet"))
    if deploy:
        runner.select([deploy])  # usage error for an unknown name, before anything runs
    else:
        runner.select_targets(runner.targets(), only_targets)
    if dry_run:
        from .plans import deploy_plan, notify_plan

        lines = render.deploy_plan_lines(deploy_plan(runner, deploy)) if deploy else \
            render.notify_plan_lines(notify_plan(runner, only_targets, all_live))
        for line in lines:
            out(line)
        return EXIT_OK
    with run_lock(settings.paths.state, wait, "run-hook"):
        if deploy:
            result = runner.restage(deploy)
            if result.failed:
                err(f"certbatch: {result.name}: {result.error}")
                return EXIT_FAILURE
            if not quiet:
                out(f"{result.name}: staged (serial {result.serial}); run `certbatch run-hook` "
                    f"to apply")
            return EXIT_OK
        failures: list[str] = []
        if all_live:
            restaged, outcome = runner.bootstrap(only_targets[0])
            failures = [f"{r.name}: {r.error}" for r in restaged if r.failed]
        else:
            outcome = runner.run_notify(only_targets)
    for line in failures + render.notify_error_lines(outcome):
        err(f"certbatch: {line}")
    if outcome.batch_id is None:
        if not quiet:
            out("nothing pending")
        return EXIT_FAILURE if failures else EXIT_OK
    if not quiet:
        for line in render.notify_lines(outcome):
            out(line)
        if outcome.ok and not outcome.no_targets and not any(t.ran for t in outcome.targets):
            which = "the target run has" if len(outcome.targets) == 1 and only_targets else \
                "the targets run have" if only_targets else "every target has"
            out(f"nothing to apply: {which} everything pending")
    return EXIT_FAILURE if failures or not outcome.ok else EXIT_OK


@cli.command()
@common_options
@click.option("--online", is_flag=True, help="Also fetch the ACME directory, try each "
              "DNS provider once (add, see and remove a probe TXT value), and self-test each "
              "http-01 webroot (write a probe file, fetch it by each name, remove it).")
@click.pass_context
def check(ctx: click.Context, online: bool) -> int:
    """Validate the config and show certificates, hooks and paths; non-zero on any problem."""
    from .checks import CheckItem, run_check

    settings = load_settings(ctx)
    say = _silent if _opt(ctx, "quiet") else out  # -q: the problems only (on stderr)

    def show(item: CheckItem) -> None:  # as found: the online probes take a while
        if item.kind == "warning":
            err(f"certbatch: warning: {item.text}")
        else:
            say(item.text)

    report = run_check(settings, online, log_file=_opt(ctx, "log_file") or settings.log_file,
                       log_problem=ctx.meta.get(_LOG_PROBLEM), on_item=show)
    for p in report.problems:
        err(f"certbatch: problem: {p}")
    return EXIT_OK if report.ok else EXIT_FAILURE


@cli.command(epilog="""\b
Exit codes:
  0   revoked (also when the CA had revoked it already: it says so)
  1   the CA refused (its message is printed) or could not be reached
  2   unknown name, never issued, or a usage or configuration error
  75  another certbatch run holds the lock (try later)""")
@common_options
@click.argument("name")
@click.option("--reason", type=click.Choice(list(retire.REASONS)), default="unspecified",
              show_default=True,
              help="The revocation reason; keyCompromise signs the request with the "
                   "certificate's own key instead of the account.")
@click.option("--no-renew", is_flag=True,
              help="Leave it revoked: the next renew replaces it only when it is due.")
@click.option("--wait", "wait", type=click.FloatRange(0), default=0, metavar="SECONDS",
              help="Wait up to SECONDS for another run's lock instead of exiting with 75.")
@click.pass_context
def revoke(ctx: click.Context, name: str, reason: str, no_renew: bool, wait: float) -> int:
    """Revoke the live certificate NAME at the CA; the next renew replaces it."""
    from .runner import run_lock

    settings = load_settings(ctx)
    with run_lock(settings.paths.state, wait, "revoke"):
        done = retire.revoke(settings, name, reason, renew=not no_renew)
    what = f"{done.name}: serial {done.serial}"
    if done.already:
        line = f"{what} was already revoked at the CA ({done.detail or 'alreadyRevoked'})"
    else:
        line = f"{what} revoked at the CA (reason {done.reason}, signed with the " \
               f"{done.signed_with})"
    if not done.configured:
        line += f"; {done.name} is not in the config, so it is not renewed " \
                f"(`certbatch remove {done.name}` retires it)"
    elif done.renew:
        line += "; the next `certbatch renew` replaces it"
    else:
        due = f" ({done.due_at:%Y-%m-%d %H:%M}Z)" if done.due_at else ""
        line += f"; --no-renew: it stays live, revoked, until it is due{due}"
    if not _opt(ctx, "quiet"):
        out(line)
    log.info("%s", line)
    return EXIT_OK


@cli.command(epilog="""\b
Exit codes:
  0   removed
  1   something could not be deleted (named), or no confirmation given
  2   the name is still in the config, nothing has that name, no terminal
      to confirm on and no --yes, or a folder is not certbatch's own
  75  another certbatch run holds the lock (try later)""")
@common_options
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed without a "
                                          "terminal).")
@click.option("--wait", "wait", type=click.FloatRange(0), default=0, metavar="SECONDS",
              help="Wait up to SECONDS for another run's lock instead of exiting with 75.")
@click.pass_context
def remove(ctx: click.Context, name: str, yes: bool, wait: float) -> int:
    """Retire certificate NAME, no longer in the config: delete its state folder (keys
    included), its pending spool entry, its copies in the spool's applied batches and its
    name in the target ledgers."""
    from . import render
    from .runner import run_lock

    settings = load_settings(ctx)
    plan = retire.plan_removal(settings, name)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"remove {name} deletes its keys and certificates: confirm with "
                             f"--yes (there is no terminal to ask on)")
        out(f"certbatch remove {name} deletes:")
        for line in render.removal_lines(plan):
            out(f"  {line}")
        if not click.confirm(f"Remove {name}?", default=False):
            err("certbatch: nothing removed")
            return EXIT_FAILURE
    with run_lock(settings.paths.state, wait, "remove"):
        done = retire.remove(settings, name)
    line = f"{name}: removed ({'; '.join(render.removal_lines(done))})"
    if not _opt(ctx, "quiet"):
        out(line)
    log.info("%s", line)
    return EXIT_OK


@cli.group("acme-dns")
def acme_dns() -> None:
    """Accounts on an acme-dns server, for dns-01 with provider: acme-dns."""


@acme_dns.command("register", epilog="""\b
Exit codes:
  0   every domain has an account (registered now, or already in the file)
  1   the acme-dns server could not be reached or refused
  2   usage error: a bad domain or URL, an accounts file that is not
      acme-dns's JSON, no --api/--accounts-file and no certificate to take
      them from""")
@common_options
@click.argument("domains", nargs=-1, required=True, metavar="DOMAIN...")
@click.option("--api", metavar="URL", default=None,
              help="The acme-dns server (default: the 'api' of the config's certificate that "
                   "has DOMAIN).")
@click.option("--accounts-file", type=click.Path(dir_okay=False), default=None,
              help="Where the accounts are kept (default: that certificate's "
                   "'accounts_file'); other domains' accounts in it stay.")
@click.option("--allow-from", multiple=True, metavar="CIDR",
              help="Only these networks may update the account (acme-dns's allowfrom; "
                   "repeatable).")
@click.pass_context
def acme_dns_register(ctx: click.Context, domains: tuple[str, ...], api: str | None,
                      accounts_file: str | None, allow_from: tuple[str, ...]) -> int:
    """Register DOMAIN... with an acme-dns server and print the CNAME records to create.

    A domain and its wildcard share one account; a domain that already has one in the
    accounts file keeps it. See docs/dns.md.
    """
    from .dns.acmedns import configured, register

    if api is None or accounts_file is None:
        found = configured(load_settings(ctx), domains)
        api = api or found.api
        accounts = Path(accounts_file) if accounts_file else found.accounts_file
    else:
        setup_logging(ctx, None)
        accounts = Path(accounts_file)
    say = _silent if _opt(ctx, "quiet") else out
    cnames = []
    for reg in register(api, domains, accounts, allow_from):
        say(f"{reg.domain}: {'registered' if reg.new else 'already registered'}, account "
            f"{reg.fulldomain} in {accounts}")
        cnames.append(reg.cname)
    say("Create these DNS records (once; certbatch check --online tries them):")
    for line in cnames:
        out(line)
    return EXIT_OK


@cli.group("import")
def import_() -> None:
    """Take over another ACME client's accounts, certificates and settings."""


@import_.command("certbot", epilog="""\b
Exit codes:
  0   every selected lineage came over (or was there already)
  1   a lineage was not imported (each one says why)
  2   usage error: not a certbot folder, an unknown --only name, a config
      that cannot be read or added to
  75  a renew or run-hook holds the run lock (try later)""")
@common_options
@click.option("--from", "source", type=click.Path(file_okay=False), default="/etc/letsencrypt",
              show_default=True, help="certbot's config folder; it is only read.")
@click.option("--dry-run", is_flag=True,
              help="Print each action and the config it would write; write nothing.")
@click.option("--replace", is_flag=True,
              help="Overwrite certificates of the same name in the config and the state, and "
                   "certbatch's account for the CA.")
@click.option("--only", "only", multiple=True, metavar="NAME",
              help="Only this lineage (certbot's or certbatch's name; repeatable).")
@click.pass_context
def import_certbot(ctx: click.Context, source: str, dry_run: bool, replace: bool,
                   only: tuple[str, ...]) -> int:
    """Import certbot's lineages: account, certificates (no reissue) and settings.

    The certificates become certbatch's live ones, recorded as staged: the next `renew` has
    nothing to do for them until they are due. See docs/import-certbot.md.
    """
    from .migrate import apply, plan, report

    setup_logging(ctx, None)
    path = config_mod.find_config(_opt(ctx, "config"))
    the_plan = plan.build(Path(source), path, only, replace)
    say = _silent if _opt(ctx, "quiet") and not dry_run else out
    for line in report.plan_lines(the_plan, dry_run):
        say(line)
    if dry_run:
        if the_plan.config_text is None:
            out(f"{path} would not change")
        else:
            out(f"--- {path} would be:")
            out(the_plan.config_text.rstrip("\n"))
    else:
        for line in report.done_lines(the_plan, apply.apply(the_plan)):
            say(line)
    skipped = report.skipped_line(the_plan)
    if skipped:
        err(f"certbatch: {skipped}")
        return EXIT_FAILURE
    return EXIT_OK


# -- entry point: the one place that turns exceptions into exit codes ----------------------------

@cli.command(epilog="""\b
Exit codes:
  0   the config was written and the folders exist
  2   the config exists already (it is never replaced), --webroot with
      --dns-script, a bad --email or --domain, a folder that is not ours""")
@common_options
@click.option("--email", metavar="E", default=None, help="The ACME account's contact address.")
@click.option("--domain", "domains", multiple=True, metavar="D",
              help="A name for the first certificate (repeatable; the first names it). "
                   "Without: example names to replace.")
@click.option("--webroot", metavar="DIR", default=None,
              help="http-01 through this webroot (default /var/www/acme).")
@click.option("--dns-script", metavar="PATH", default=None,
              help="dns-01 through this script instead (adds and removes TXT records).")
@click.option("--staging", is_flag=True,
              help="Use Let's Encrypt's staging CA (default: production).")
@click.option("--state", metavar="DIR", default=None,
              help="The state folder (accounts, keys, certificates) instead of the default.")
@click.option("--spool", metavar="DIR", default=None,
              help="The spool folder (what waits for the targets) instead of the default.")
@click.option("--hooks", metavar="DIR", default=None,
              help="The hooks folder (deploy.d/, notify.d/) instead of the default.")
@click.pass_context
def init(ctx: click.Context, email: str | None, domains: tuple[str, ...], webroot: str | None,
         dns_script: str | None, staging: bool, state: str | None, spool: str | None,
         hooks: str | None) -> int:
    """Write a commented starter config (0600) and create its folders.

    The config goes to --config, else $CERTBATCH_CONFIG, else where certbatch looks for it;
    an existing file is never replaced. The state, spool and hooks folders (with deploy.d/
    and notify.d/) are created 0700: those given with --state, --spool and --hooks, else the
    system ones for a config in /etc/certbatch/, otherwise state/, spool/ and hooks/ beside
    the config. Nothing else is copied. It then prints the next commands and a cron line.
    Needs no network.
    """
    from . import init as init_mod

    setup_logging(ctx, None)
    result = init_mod.run(config_mod.find_config(_opt(ctx, "config")), email=email,
                          domains=domains, webroot=webroot, dns_script=dns_script,
                          staging=staging, state=state, spool=spool, hooks=hooks)
    say = _silent if _opt(ctx, "quiet") else out
    say(f"wrote {result.config} (mode 0600)")
    for folder in result.folders:
        say(f"{'created' if folder.created else 'kept   '} {folder.path}/")
    for note in result.notes:
        say(f"note: {note}")
    say("Next:")
    for command in result.next_commands:
        say(f"  {command}")
    say("Then renew from cron twice a day, e.g. in /etc/cron.d/certbatch:")
    say(f"  {result.cron_line}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Run the command line and exit. SIGTERM, SIGINT and SIGHUP are handled from the start
    (interrupt.py): they end it with one line, `certbatch: interrupted (SIGTERM)`, and exit
    128 + the signal number; renew and run-hook first stop their hooks and save their state.
    The handlers stay set until the process exits: a late signal is ignored, not a traceback."""
    interrupt.install()
    # What the imports made (modules, classes, functions) lives as long as the process: out of
    # the cyclic collector's sight, it is not walked again by every collection that loading a
    # large config and state triggers (a tenth of a run with nothing due over 10,000
    # certificates). Garbage made later is collected as usual, the youngest once per 50,000
    # new objects rather than 700: loading a state allocates hundreds of thousands that all
    # stay, and each collection before they settle walks them again.
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        try:
            _main(argv)
        finally:
            # As they were, for a caller in the same process (not unfrozen: at exit that would
            # have the interpreter's last collection walk every object once more).
            gc.set_threshold(*thresholds)
            interrupt.stopping()  # once this has run no signal raises any more
    except Interrupted as exc:
        name = interrupt.signal_name(exc.signum)
        err(f"certbatch: interrupted ({name})")
        if any(getattr(h, _OURS, False) for h in logging.getLogger("certbatch").handlers):
            log.warning("interrupted by %s: exit code %d", name, exc.exit_code,
                        extra={"file_only": True})
        sys.exit(exc.exit_code)


def _main(argv: list[str] | None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="certbatch", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code)
    except click.Abort:
        err("Aborted!")
        sys.exit(EXIT_FAILURE)
    except CertbatchError as exc:
        err(f"certbatch: error: {exc}")
        if any(getattr(h, _OURS, False) for h in logging.getLogger("certbatch").handlers):
            log.error("%s", exc, extra={"file_only": True})  # stderr has it already
        sys.exit(exit_code_for(exc))
    except OSError as exc:  # a lock file, a state or spool folder: one line naming the path
        err(f"certbatch: error: {os_error_message(exc)}")
        if any(getattr(h, _OURS, False) for h in logging.getLogger("certbatch").handlers):
            log.error("%s", os_error_message(exc), extra={"file_only": True})
        sys.exit(exit_code_for(exc))
    except KeyboardInterrupt:
        err("certbatch: interrupted")
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()

