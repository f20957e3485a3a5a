"""What `check` verifies, as data: the config's folders and log file, each certificate (its
challenge setup, live files, how often cron must run), the hook folders and notify targets, and
with `online` the CA's directory and profiles, each DNS provider and each http-01 webroot.

`run_check` returns a `CheckReport`: the lines of the report and the warnings in the order
they were found, and the problems (any problem fails `check`). It never prints; the command
line renders the report, and can show each item as it is found (the online probes take a
while) by passing `on_item`.

Also here: `read_problems`, what keeps a command that only reads from reading the state or
spool. Only light modules are imported at the top (the command line imports this at start).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .config import CertificateSettings, ChallengeSettings, Settings
from .errors import CertbatchError, Interrupted, os_error_message

if TYPE_CHECKING:
    from .store import Store


# -- reading the state and spool ------------------------------------------------------------------

def read_problem(folder: Path) -> str | None:
    """Why a command that only reads cannot read `folder` (`<path>: <what>`), or None; a
    folder that does not exist yet is fine (nothing was stored there yet)."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink loop, a parent we may not enter, a file as a parent
        return os_error_message(exc, folder)
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder}: not a folder"
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
    except OSError as exc:
        return os_error_message(exc, folder)
    return None


def read_problems(*trees: list[Path]) -> list[str]:
    """`read_problem` of each tree (a folder, then folders in it): its first problem, if any."""
    problems = []
    for tree in trees:
        for folder in tree:
            why = read_problem(folder)
            if why:
                problems.append(why)
                break
    return problems


# -- the report -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckItem:
    """One thing `check` says, in order: a line of the report, or a warning (worth reading,
    not a failure)."""

    kind: Literal["line", "warning"]
    text: str


@dataclass
class CheckReport:
    items: list[CheckItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each one fails `check`
    on_item: Callable[[CheckItem], None] | None = field(default=None, repr=False,
                                                        compare=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def lines(self) -> list[str]:
        return [i.text for i in self.items if i.kind == "line"]

    @property
    def warnings(self) -> list[str]:
        return [i.text for i in self.items if i.kind == "warning"]

    def line(self, text: str) -> None:
        self._add(CheckItem("line", text))

    def warn(self, text: str) -> None:
        self._add(CheckItem("warning", text))

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def _add(self, item: CheckItem) -> None:
        self.items.append(item)
        if self.on_item is not None:
            self.on_item(item)


def run_check(settings: Settings, online: bool = False, log_file: str | Path | None = None,
              log_problem: str | None = None,
              on_item: Callable[[CheckItem], None] | None = None) -> CheckReport:
    """Check `settings` as `certbatch check [--online]` does. `log_file` is the log file in
    use (the config's or --log-file), `log_problem` why it could not be opened (None: it
    could). `on_item` sees each line and warning as soon as it is found. An interruption
    (SIGTERM during a probe) is raised, not reported."""
    from .dns.secrets import exposure_warnings

    report = CheckReport(on_item=on_item)
    for warning in exposure_warnings(settings):
        report.warn(warning)
    report.line(f"config: {settings.path} (ok)")
    report.line(f"acme directory: {settings.acme.directory}")
    state_ok, hooks_ok = _check_folders(settings, report)
    if log_file:
        report.line(f"log file: {log_file} ({'CANNOT be opened' if log_problem else 'ok'})")
        if log_problem:
            report.problem(log_problem)
    _check_certificates(settings, report, state_ok)
    notify_ok = _check_hook_folders(settings, report, hooks_ok)
    _check_targets(settings, report, notify_ok)
    if online:
        _check_acme(settings, report)
        _probe_dns(settings, report)
        _probe_webroots(settings, report)
    return report


# -- folders --------------------------------------------------------------------------------------

def _check_folders(settings: Settings, report: CheckReport) -> tuple[bool, bool]:
    """The state, spool and hooks folders; whether state and hooks can be used."""
    hooks_ok = state_ok = True
    for label, path in (("state", settings.paths.state), ("spool", settings.paths.spool),
                        ("hooks", settings.paths.hooks)):
        state, problem = check_folder(label, path)
        if problem:
            report.problem(problem)
            hooks_ok = hooks_ok and label != "hooks"
            state_ok = state_ok and label != "state"
        report.line(f"{label}: {path} ({state})")
    return state_ok, hooks_ok


def check_folder(label: str, path: Path) -> tuple[str, str | None]:
    """What `check` says about the state, spool or hooks folder, and the problem with it (None:
    fine). State and spool must be folders certbatch can write, or create; hooks one it can
    read (a missing one is fine: no hooks)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if label == "hooks":
            return "missing (no hooks will run)", None
        # It will be created below its nearest existing parent, which must be writable.
        for parent in path.parents:
            try:
                os.stat(parent)
            except FileNotFoundError:
                continue
            except OSError as exc:
                why = os_error_message(exc, parent)
                return (f"CANNOT be created: {why}",
                        f"{label} folder {path} cannot be created: {why}")
            if os.access(parent, os.W_OK | os.X_OK):
                break
            return (f"CANNOT be created: {parent} is not writable",
                    f"{label} folder {path} cannot be created: {parent} is not writable")
        return "will be created", None
    except OSError as exc:  # a symlink loop, a parent we may not enter, a file as a parent
        why = os_error_message(exc, path)
        return f"CANNOT be used: {why}", f"{label} folder {why}"
    if not stat.S_ISDIR(st.st_mode):
        return "NOT A FOLDER", f"{label} folder {path} is not a folder"
    unreadable = read_problem(path)
    if unreadable:
        return f"exists, NOT READABLE: {unreadable}", f"{label} folder {unreadable}"
    if label != "hooks" and not os.access(path, os.W_OK | os.X_OK):
        return "exists, NOT WRITABLE", f"{label} folder {path} is not writable"
    if label != "hooks":
        from . import safefs
        from .errors import UnsafePath
        try:
            safefs.check_root(path)
        except UnsafePath as exc:
            return f"exists, NOT SAFE: {exc.why}", f"{label} folder {exc}"
    return "exists", None


# -- certificates ---------------------------------------------------------------------------------

def _check_certificates(settings: Settings, report: CheckReport, state_ok: bool) -> None:
    """One line per certificate and its challenge; setup and live-file problems; cron advice
    for a short-lived one (a warning). The live files are not looked at when the state
    folder cannot be used (that is one problem already)."""
    from .challenges import setup_problem
    from .store import Store

    report.line(f"certificates: {len(settings.certificates)}")
    store = Store(settings.paths.state)  # one: its index is read once, not per certificate
    for cert in settings.certificates.values():
        profile = f", profile {cert.profile}" if cert.profile else ""
        report.line(f"  {cert.name}: {' '.join(cert.domains)} "
                    f"[{cert.key}{profile}, {challenge_text(cert.challenge)}]")
        for line in webroot_lines(cert):
            report.line(line)
        if cert.deploy:
            report.line(f"    deploy: {command_text(cert.deploy)}")
        setup = setup_problem(cert.challenge)  # fails this certificate alone when it renews
        if setup:
            report.line(f"    challenge: CANNOT work: {setup}")
            report.problem(f"{cert.name}: {setup}")
        live = live_problem(store, cert.name) if state_ok else None
        if live:
            report.line(f"    live: {live}")
            report.problem(f"{cert.name}: {live}")
        advice = cron_advice(settings, store, cert.name) if state_ok and not live else None
        if advice:
            report.warn(f"{cert.name}: {advice}")


def challenge_text(ch: ChallengeSettings) -> str:
    """How a certificate's challenge is answered, for its line in `check`."""
    wait = f", wait {ch.wait:g}s" if ch.wait else ""
    return ch.type + (
        " webroot_map" if ch.webroot_map else
        f" webroot {ch.webroot}" if ch.webroot else
        f" standalone {ch.standalone_address}:{ch.standalone_port}" if ch.standalone else
        f" script {ch.script} ({ch.calls}{wait}{propagation_text(ch)})" if ch.script else
        f" provider {ch.provider} ({provider_text(ch)}{wait}{propagation_text(ch)})")


def provider_text(ch: ChallengeSettings) -> str:
    """The provider's settings for `check`, never its secret."""
    lx, adns, s = ch.lexicon, ch.acme_dns, ch.rfc2136
    if lx is not None:
        creds = (f"credentials in {lx.credentials_file}" if lx.credentials_file else
                 f"credentials inline ({', '.join(k for k, _ in lx.credentials or ())})")
        return f"{lx.provider}, zone {lx.zone or '(SOA lookup)'}, {creds}"
    if adns is not None:
        from .dns.acmedns import _public  # the loader refuses user:password@; never print one
        return f"api {_public(adns.api)}, accounts in {adns.accounts_file}"
    if s is None:
        return "-"
    where = f"server {s.server[0]}:{s.server[1]}, zone {s.zone or '(SOA lookup)'}"
    secret = f"secret in {s.tsig_secret_file}" if s.tsig_secret_file else "secret inline"
    return f"{where}, key {s.tsig_key} {s.tsig_algorithm}, {secret}"


def propagation_text(ch: ChallengeSettings) -> str:
    if ch.propagation != "check":
        return ""
    resolver = f", resolver {ch.resolver[0]}:{ch.resolver[1]}" if ch.resolver else ""
    return f", propagation check {ch.propagation_timeout:g}s{resolver}"


def webroot_lines(cert: CertificateSettings) -> list[str]:
    """With a webroot_map, each webroot and the names it serves (certificate order)."""
    ch = cert.challenge
    if not ch.webroot_map:
        return []
    names: dict[Path | None, list[str]] = {}
    for domain in cert.domains:
        names.setdefault(ch.webroot_for(domain), []).append(domain)
    return [f"    webroot {root}: {' '.join(ds)}" for root, ds in names.items()]


def command_text(spec: str | tuple[str, ...]) -> str:
    """A config hook command as an operator would type it (a list shell-quoted, not a tuple)."""
    import shlex

    return spec if isinstance(spec, str) else shlex.join(spec)


def live_problem(store: Store, name: str) -> str | None:
    """What is wrong with a certificate's live files, fully checked (None: fine or none yet)."""
    try:
        stored = store.current(name, verify=True)
    except CertbatchError as exc:
        return f"CANNOT be read: {exc}"
    except OSError as exc:
        return f"CANNOT be read: {os_error_message(exc)}"
    if stored is not None and stored.damaged:
        return f"DAMAGED ({stored.damaged}): the next `certbatch renew` reissues it"
    return None


def cron_advice(settings: Settings, store: Store, name: str) -> str | None:
    """How often cron must run for a short-lived live certificate (None: daily is plenty)."""
    from .renewal import cron_advice as advice

    with contextlib.suppress(CertbatchError, OSError):  # live_problem has said why
        stored = store.current(name)
        if stored is not None:
            return advice(stored.not_before, stored.not_after, settings.renewal.before_expiry)
    return None


# -- hooks and targets ----------------------------------------------------------------------------

def _check_hook_folders(settings: Settings, report: CheckReport, hooks_ok: bool) -> bool:
    """deploy.d and notify.d, each file and whether it will run; whether notify.d could be
    read."""
    from .hooks import scan

    notify_ok = hooks_ok
    for phase in ("deploy.d", "notify.d"):
        folder = settings.paths.hooks / phase
        if not hooks_ok:
            report.line(f"{phase}: not looked at (the hooks folder cannot be read)")
            continue
        try:
            files = scan(folder)
        except OSError as exc:  # a symlink loop, a file, a folder we may not read
            why = os_error_message(exc, folder)
            report.line(f"{phase}: CANNOT be read: {why}")
            report.problem(f"{phase} folder {why}")
            notify_ok = notify_ok and phase != "notify.d"
            continue
        n_run = sum(f.state == "run" for f in files)
        report.line(f"{phase}: {n_run} hook{'s' * (n_run != 1)} will run ({folder})")
        for f in files:
            if f.state == "run":
                report.line(f"  {f.name} (executable)")
            elif f.state == "skip":
                report.line(f"  {f.name} (skipped: {f.why})")
            else:
                report.line(f"  {f.name} (PROBLEM: {f.why})")
                report.problem(f"{f.path}: {f.why}")
    return notify_ok


def _check_targets(settings: Settings, report: CheckReport, notify_ok: bool) -> None:
    """The notify targets (notify.d and hooks.targets), each with its command or why it
    cannot run."""
    from .targets import Target, resolve

    targets: list[Target] = []
    try:
        if notify_ok:
            targets = resolve(settings.paths.hooks, settings.hooks, settings.path)
    except OSError as exc:  # notify.d changed since it was read
        notify_ok = False
        report.problem(f"notify.d folder {os_error_message(exc)}")
    if not notify_ok:
        report.line("notify targets: unknown (notify.d cannot be read)")
    elif targets:
        report.line(f"notify targets: {len(targets)} (at most {settings.hooks.notify_workers} "
                    f"at a time)")
    else:
        report.line("notify targets: none (a batch is marked applied without running "
                    "anything)")
    for t in targets:
        env = f", env {' '.join(sorted(t.env))}" if t.env else ""
        how = f"CANNOT RUN: {t.problem}" if t.problem or t.command is None else (
            f"{command_text(t.command.argv)} [timeout {t.timeout:g} s{env}]")
        report.line(f"  {t.name}: {how}")
        if t.problem and t.problem not in report.problems:  # e.g. a name no target can have
            report.problem(t.problem)


# -- online ---------------------------------------------------------------------------------------

def _check_acme(settings: Settings, report: CheckReport) -> None:
    """The CA's directory and the profiles it offers; a certificate's profile it refuses."""
    from .acme_client import AcmeClient
    from .store import Store

    try:
        client = AcmeClient(settings.acme, Store(settings.paths.state))
        meta = client.directory_info()
        report.line(f"acme directory reachable: {meta}")
        offered = client.profiles()
        report.line(f"acme profiles: {len(offered)}" if offered else
                    "acme profiles: none offered (the CA's default applies)")
        for name, description in sorted(offered.items()):
            report.line(f"  {name}: {' '.join(description.split()) or '-'}")
        for cert in settings.certificates.values():
            refused = cert.profile and client.profile_problem(cert.profile)
            if refused:
                report.problem(f"{cert.name}: profile: {refused}")
    except CertbatchError as exc:
        report.problem(f"acme directory: {exc}")
    except OSError as exc:  # e.g. acme.ca_bundle cannot be read
        report.problem(f"acme directory: {os_error_message(exc)}")


def _probe_dns(settings: Settings, report: CheckReport) -> None:
    """Each certificate with a DNS provider adds, sees and removes a probe TXT value; one line
    per certificate."""
    import time

    from .dns.solver import probe

    for cert in settings.certificates.values():
        if cert.challenge.provider is None:
            continue
        deadline = time.monotonic() + min(settings.renewal.deadline,
                                          cert.challenge.propagation_timeout + 30)
        try:
            result = probe(cert.challenge, cert.name, cert.domains, deadline)
        except CertbatchError as exc:  # ChallengeError, DeadlineExceeded, Interrupted
            if isinstance(exc, Interrupted):
                raise
            report.line(f"dns-01 {cert.name}: FAILED: {exc}")
            report.problem(f"{cert.name}: dns-01 probe: {exc}")
        else:
            report.line(f"dns-01 {cert.name}: {result}")


def _probe_webroots(settings: Settings, report: CheckReport) -> None:
    """Each http-01 webroot serves a probe file by each name; one line per domain, with the
    file's path and the URL. A name this host cannot reach is a warning (the CA, from outside,
    may); a wrong answer is a problem."""
    from .webroot_probe import OK, WARNING, probe_all

    for cert, results in probe_all(list(settings.certificates.values())):
        if isinstance(results, CertbatchError):
            if isinstance(results, Interrupted):
                raise results
            report.line(f"http-01 {cert.name}: FAILED: {results}")
            report.problem(f"{cert.name}: http-01 probe: {results}")
            continue
        for p in results:
            where = f"{p.url} (file {p.path})"
            if p.level == OK:
                report.line(f"http-01 {cert.name} {p.domain}: ok, {p.detail}: {where}")
            elif p.level == WARNING:
                report.line(f"http-01 {cert.name} {p.domain}: UNREACHABLE from here: {where}")
                report.warn(f"{cert.name}: http-01 {p.domain}: {p.detail}: {where}")
            else:
                report.line(f"http-01 {cert.name} {p.domain}: FAILED: {where}")
                report.problem(f"{cert.name}: http-01 {p.domain}: {p.detail}: {where}")
