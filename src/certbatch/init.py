"""`certbatch init`: a commented starter config and the folders it names, nothing else.

The text is validated with config.loads before anything is written; an existing config file is
never replaced (UsageError, exit 2). The config file is created 0600 (it may hold an EAB key or
DNS credentials later), atomically and without ever overwriting: written to a temp file in its
folder, then hard-linked to its name (link fails if the name exists, even in a race). The state,
spool and hooks folders (and hooks/deploy.d, hooks/notify.d) are created 0700, or checked to be
ours when they exist (fsutil.ensure_root/ensure_dir). No hook script or example is copied.

Where the folders go: with the config in /etc/certbatch/, the system defaults (/var/lib/certbatch,
/var/spool/certbatch, /etc/certbatch/hooks); with a config anywhere else, `state/`, `spool/` and
`hooks/` beside it (a trial setup in a folder of one's own, no root needed), written as paths
relative to the config's folder; --state, --spool and --hooks choose others (written absolute).

The core returns an InitResult; the command layer (cli.py) prints it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import config as config_mod
from . import fsutil
from .errors import ConfigError, UsageError

LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
SYSTEM_CONFIG_DIR = Path("/etc/certbatch")
DEFAULT_WEBROOT = "/var/www/acme"
CONFIG_MODE = 0o600
PLACEHOLDER_DOMAINS = ("example.com", "www.example.com")


@dataclass(frozen=True)
class Folder:
    path: Path
    created: bool  # False: it was there already (and passed the same checks)


@dataclass(frozen=True)
class InitResult:
    config: Path
    folders: list[Folder]
    next_commands: list[str]  # check --online, renew --dry-run, renew
    cron_line: str
    notes: list[str] = field(default_factory=list)  # what the operator still has to do


def run(config_path: Path, *, email: str | None = None, domains: tuple[str, ...] = (),
        webroot: str | None = None, dns_script: str | None = None,
        staging: bool = False, state: str | None = None, spool: str | None = None,
        hooks: str | None = None) -> InitResult:
    """Write a starter config at `config_path` and create the folders it names. `state`,
    `spool`, `hooks`: folders of one's choice instead of the defaults (see the module doc)."""
    if webroot and dns_script:
        raise UsageError("--webroot and --dns-script exclude each other: a certificate proves "
                         "its names one way (give one)")
    config_path = Path(os.path.abspath(config_path))
    # Given on the command line, relative to the working directory; in the config a relative
    # path would be relative to the config's folder: write them absolute.
    webroot = os.path.abspath(webroot) if webroot else None
    dns_script = os.path.abspath(dns_script) if dns_script else None
    if os.path.lexists(config_path):
        raise UsageError(f"{config_path} exists; certbatch init never replaces a config "
                         f"(edit it, or give another path with --config)")
    if config_path.parent == SYSTEM_CONFIG_DIR:
        defaults = (config_mod.DEFAULT_STATE, config_mod.DEFAULT_SPOOL, config_mod.DEFAULT_HOOKS)
    else:
        defaults = (Path("state"), Path("spool"), Path("hooks"))
    # Given ones are relative to the working directory, like --webroot: written absolute.
    state, spool, hooks = (os.path.abspath(given) if given else str(default)
                           for given, default in zip((state, spool, hooks), defaults, strict=True))
    text = render(email=email, domains=domains, webroot=webroot, dns_script=dns_script,
                  staging=staging, state=state, spool=spool, hooks=hooks)
    try:
        settings = config_mod.loads(text, config_path)
    except ConfigError as exc:  # a bad --email or --domain: name the option, not the text
        raise UsageError(f"the config would be invalid: {exc.key}: {exc.problem}") from None

    _make_parents(config_path.parent)
    folders = []
    for root in (settings.paths.state, settings.paths.spool, settings.paths.hooks):
        folders.append(_folder(root, fsutil.ensure_root))
    for sub in ("deploy.d", "notify.d"):
        folders.append(_folder(settings.paths.hooks / sub, fsutil.ensure_dir))
    _write_new(config_path, text)

    notes = []
    if not domains:
        notes.append(f"the certificate 'www' names {' and '.join(PLACEHOLDER_DOMAINS)}: "
                     f"put your own names in {config_path} first")
    if not dns_script:
        first = next(iter(settings.certificates.values())).challenge.webroot
        if first is not None and not first.is_dir():
            notes.append(f"the webroot {first} does not exist yet: create it and have the web "
                         f"server answer /.well-known/acme-challenge/ from it (README, quick "
                         f"start)")
    if not email:
        notes.append("no acme.email: the CA has no address to write to (add one if you like)")
    with_config = "" if config_path == SYSTEM_CONFIG_DIR / "certbatch.yaml" else \
        f" -c {shlex.quote(str(config_path))}"
    commands = [f"certbatch{with_config} check --online",
                f"certbatch{with_config} renew --dry-run",
                f"certbatch{with_config} renew"]
    # cron's PATH is /usr/bin:/bin: the line names certbatch by its full path
    cron = (f"17 3,15 * * *   root   {_program()} -c {shlex.quote(str(config_path))} renew "
            f"--jitter 3600")
    return InitResult(config_path, folders, commands, cron, notes)


def _program() -> str:
    """How cron can start this certbatch: the full path of the `certbatch` on PATH, else this
    Python running the package."""
    found = shutil.which("certbatch")
    if found:
        return shlex.quote(os.path.abspath(found))
    return f"{shlex.quote(sys.executable)} -m certbatch"


def _make_parents(folder: Path) -> None:
    """Create the config's folder and missing parents 0755 whatever the umask (like
    /etc/certbatch: the state, spool and hooks roots below it are checked for other users'
    write access on the way to them)."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        os.mkdir(path, 0o755)
        os.chmod(path, 0o755)


def _folder(path: Path, make: Callable[[Path], object]) -> Folder:
    existed = os.path.lexists(path)
    make(path)
    return Folder(path, created=not existed)


def _write_new(path: Path, text: str) -> None:
    """Create `path` with `text`, mode 0600, durably; never replace an existing file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, CONFIG_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if the name exists: no overwrite, even in a race
        except FileExistsError:
            raise UsageError(f"{path} exists; certbatch init never replaces a config") from None
        fsutil.fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _certificate_name(domains: tuple[str, ...]) -> str:
    """The first domain, without a wildcard's `*.`, lowercased, cut to the 64 characters a
    certificate name may have (without a trailing dot or hyphen)."""
    return domains[0].lower().removeprefix("*.")[:64].rstrip(".-")


def _yaml_str(value: str) -> str:
    """A YAML scalar that reads back as exactly `value`: plain when it is a simple word or
    path, else a JSON string (JSON strings are YAML)."""
    if re.fullmatch(r"[A-Za-z0-9/][A-Za-z0-9._/@+-]*", value) and \
            yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def render(*, email: str | None, domains: tuple[str, ...], webroot: str | None,
           dns_script: str | None, staging: bool, state: str, spool: str, hooks: str) -> str:
    """The starter config's text."""
    directory = LETSENCRYPT_STAGING if staging else LETSENCRYPT
    other = LETSENCRYPT if staging else LETSENCRYPT_STAGING
    other_name = "production" if staging else "staging (untrusted certificates, high limits)"
    if dns_script:
        challenge = ("  # dns-01: the script adds and removes _acme-challenge TXT records\n"
                     "  # (`<script> add|remove <domain> <record-name> <value>`; "
                     "docs/challenges.md).\n"
                     "  challenge:\n"
                     "    type: dns-01\n"
                     f"    script: {_yaml_str(dns_script)}\n"
                     "    # wait: 60s                        # pause for DNS to propagate\n")
    else:
        challenge = ("  # http-01: certbatch writes <webroot>/.well-known/acme-challenge/<token>;"
                     "\n  # the web server must answer http://<name>/.well-known/acme-challenge/ "
                     "from it, on port 80.\n"
                     "  challenge:\n"
                     "    type: http-01\n"
                     f"    webroot: {_yaml_str(webroot or DEFAULT_WEBROOT)}\n")
    if domains:
        name = _certificate_name(domains)
        cert = (f"  {_yaml_str(name)}:\n"
                f"    domains: [{', '.join(_yaml_str(d) for d in domains)}]\n")
    else:
        cert = ("  # An example: replace the names with your own (the name `www` is yours to "
                "choose).\n"
                "  www:\n"
                f"    domains: [{', '.join(PLACEHOLDER_DOMAINS)}]\n")
    paths = "".join(
        f"  {key}: {_yaml_str(value):<28} # {note}\n" for key, value, note in (
            ("state", state, "account, keys, certificates (0700)"),
            ("spool", spool, "renewed certificates waiting for the targets"),
            ("hooks", hooks, "deploy.d/ and notify.d/ hook programs")))
    email_line = (f"  email: {_yaml_str(email)}\n" if email
                  else "  # email: hostmaster@example.com  # the ACME account's contact\n")
    return f"""\
# certbatch configuration, written by `certbatch init`.
# Every key is explained in docs/configuration.md; `certbatch check` validates this file.
# Relative paths are relative to this file's folder. Durations: 30 (seconds), 45s, 10m, 12h, 30d.
# This file is 0600: it may hold an EAB key or DNS credentials later.

acme:
  # The CA's ACME directory. Let's Encrypt {other_name}:
  #   {other}
  directory: {directory}
{email_line}  # timeout: 30s                       # each HTTP request to the CA
  # profile: tlsserver                 # an ACME profile; `check --online` lists the CA's

paths:
{paths}
renewal:
  # Unset: renew when a third of the lifetime is left, or when the CA's renewal window (ARI)
  # says so. docs/renewal.md tells how certbatch decides.
  # before_expiry: 30d
  workers: 16                          # certificates renewed in parallel
  deadline: 10m                        # the most one certificate may take

hooks:
  # After the renewals every target gets, in one batch, the certificates it has not applied yet.
  # Each file in <hooks>/notify.d/ is a target; so is each entry below. See docs/hooks.md.
  # The shipped nginx hook, pointed at your own paths (README, quick start):
  # targets:
  #   nginx:
  #     command: [/usr/local/lib/certbatch/hooks/nginx]
  #     env: {{NGINX_CERT_DIR: /etc/nginx/certs, NGINX_RELOAD_CMD: "systemctl reload nginx"}}
  notify_timeout: 5m                   # each target run

# logging:
#   file: /var/log/certbatch.log       # timestamped lines of every run
# metrics:
#   file: /var/lib/node_exporter/textfile/certbatch.prom   # docs/metrics.md

defaults:
  key: ec-p256                         # or ec-p384, rsa-2048, rsa-3072, rsa-4096
{challenge}
certificates:
  # name: {{domains: [...]}}; a certificate may set its own key, challenge, deploy, profile.
{cert}"""
