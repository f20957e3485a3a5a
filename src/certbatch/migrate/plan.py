"""What `certbatch import certbot` would do: per lineage, imported or skipped and why; the
account per CA; the config text. Reads only (the certbot folder, the config, the state).

Decisions, in order, for each lineage of renewal/*.conf (or of --only):
  1. its files must read (renewal conf, the live/ links into archive/, the key matching the
     certificate), its names be DNS names and its key a type certbatch orders;
  2. `autorenew = False` and expired certificates are not imported;
  3. it must be on the config's CA (acme.directory); without a config, all lineages on one CA;
  4. its account: one certbot account per CA becomes certbatch's (two need a choice: --only);
  5. its challenge must map (else "configure the challenge of NAME by hand");
  6. its name must be free: an existing entry or stored certificate is refused unless
     --replace, except the same certificate (same serial: already imported), or an entry with
     the same names and nothing stored yet (adopted: the entry is kept, the certificate
     imported);
  7. the config with the new entries must load; an entry it refuses is not imported.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..errors import ConfigError, StoreError, UsageError, os_error_message
from ..store import Store, StoredCert
from . import configfile, mapping, yamltext
from .certbot import Account, CertbotDir, Unreadable
from .configfile import ExistingConfig

IMPORT = "import"  # certificate into the state, entry into the config
ADOPT = "adopt"  # certificate into the state, the config's own entry kept
ENTRY_ONLY = "entry"  # the state has this very certificate already: entry into the config
DONE = "done"  # already imported (same serial stored, entry present): nothing to do
SKIP = "skip"


@dataclass
class LineagePlan:
    lineage: str  # certbot's name
    name: str  # certbatch's name
    action: str = SKIP
    why: str = ""  # for SKIP: the reason; else a short description
    domains: tuple[str, ...] = ()
    key_type: str = ""
    serial: str = ""
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    server: str | None = None
    account_id: str | None = None
    ordered_by: str | None = None  # the URL of the certbot account that ordered it
    pems: dict[str, bytes] = field(default_factory=dict, repr=False)
    mapped: mapping.Mapped = field(default_factory=mapping.Mapped)
    replaces: bool = False  # an existing entry or stored certificate is replaced

    @property
    def writes_state(self) -> bool:
        return self.action in (IMPORT, ADOPT)

    @property
    def writes_entry(self) -> bool:
        return self.action in (IMPORT, ENTRY_ONLY)

    def entry(self) -> dict[str, Any]:
        return {"domains": list(self.domains), **self.mapped.entry}

    def skip(self, why: str) -> None:
        self.action, self.why = SKIP, why


@dataclass
class AccountPlan:
    account: Account
    action: str  # "import" (written), "present" (certbatch has it), "kept" (certbatch keeps
    why: str = ""  # its own, see why)


@dataclass
class Plan:
    source: Path
    config_path: Path
    config_exists: bool
    directory: str | None
    state: Path
    lineages: list[LineagePlan]
    account: AccountPlan | None = None
    config_text: str | None = None  # the new config text; None: the config is not written
    hooks: list[str] = field(default_factory=list)  # renewal-hooks/ suggestions

    @property
    def skipped(self) -> list[LineagePlan]:
        return [lp for lp in self.lineages if lp.action == SKIP]

    @property
    def new_files(self) -> list[mapping.NewFile]:
        return [f for lp in self.lineages if lp.writes_entry for f in lp.mapped.files]


def build(source: Path, config_path: Path, only: tuple[str, ...] = (), replace: bool = False,
          now: dt.datetime | None = None) -> Plan:
    """The plan. UsageError when `source` is not a certbot folder, --only names no lineage, or
    the existing config cannot be read."""
    now = now or dt.datetime.now(dt.timezone.utc)
    certbot = CertbotDir(source)
    problem = certbot.check()
    if problem:
        raise UsageError(problem)
    config = ExistingConfig(config_path)
    lineages = _select(certbot, only)
    plan = Plan(source=source, config_path=config_path, config_exists=config.exists,
                directory=config.directory, state=config.state, lineages=lineages)
    import_dir = Path(os.path.abspath(config_path)).parent / "certbot-import"
    for lp in lineages:
        _read(certbot, lp, now, import_dir)
    _choose_ca(plan)
    _choose_account(plan, certbot, replace)
    _check_names(plan, config, replace)
    for lp in lineages:
        if lp.writes_entry and lp.mapped.challenge_problem:
            lp.skip(lp.mapped.challenge_problem)
    _compose(plan, config)
    try:
        hook_files = certbot.hook_files()
    except Unreadable as exc:
        plan.hooks.append(f"renewal-hooks/: {exc}")
    else:
        where = {"pre": "no counterpart (certbatch needs no server stopped with a webroot)",
                 "deploy": "deploy.d/ (per certificate, CERTBATCH_* variables)",
                 "post": "notify.d/ or hooks.targets (once per batch)"}
        for phase, names in hook_files.items():
            for name in names:
                plan.hooks.append(f"renewal-hooks/{phase}/{name}: {where[phase]}")
    return plan


# -- reading -------------------------------------------------------------------------------------

def _select(certbot: CertbotDir, only: tuple[str, ...]) -> list[LineagePlan]:
    try:
        names = certbot.lineages()
    except OSError as exc:
        raise UsageError(os_error_message(exc)) from None
    plans, taken = [], set()
    # Names certbatch accepts as they are first: a lineage keeps its own name when it can.
    for lineage in sorted(names, key=lambda n: mapping.certbatch_name(n) != n):
        name = base = mapping.certbatch_name(lineage)
        n = 2
        while name in taken:  # two lineages that map to one name: number the second
            suffix = f"-{n}"
            name, n = base[:mapping.NAME_MAX - len(suffix)] + suffix, n + 1
        taken.add(name)
        plans.append(LineagePlan(lineage, name))
    plans.sort(key=lambda lp: (lp.lineage.lower(), lp.lineage))
    if only:
        unknown = [o for o in only if not any(o in (lp.lineage, lp.name) for lp in plans)]
        if unknown:
            raise UsageError(f"no certbot lineage named {', '.join(unknown)} in "
                             f"{certbot.root / 'renewal'}")
        plans = [lp for lp in plans if lp.lineage in only or lp.name in only]
    return plans


def _read(certbot: CertbotDir, lp: LineagePlan, now: dt.datetime, import_dir: Path) -> None:
    from cryptography import x509

    from .. import crypto
    from ..errors import CertificateCheckError

    try:
        conf = certbot.read_conf(lp.lineage)
        files = certbot.read_files(lp.lineage)
    except Unreadable as exc:
        return lp.skip(str(exc))
    lp.pems = files.pems
    try:
        info = crypto.check_pair(files.pems["fullchain.pem"], files.pems["privkey.pem"])
        cert = x509.load_pem_x509_certificates(files.pems["cert.pem"])[0]
        if format(cert.serial_number, "x") != info.serial:
            return lp.skip("cert.pem and fullchain.pem hold different certificates")
        lp.domains = mapping.domains_of(cert)
        lp.key_type = mapping.key_type(files.pems["privkey.pem"])
    except (CertificateCheckError, ValueError) as exc:
        return lp.skip(f"live/{lp.lineage}/: {exc}")
    lp.serial, lp.not_before, lp.not_after = info.serial, info.not_before, info.not_after
    lp.server, lp.account_id = conf.get("server"), conf.get("account")
    lp.mapped = mapping.map_lineage(lp.name, lp.lineage, conf, lp.domains, lp.key_type,
                                    import_dir)
    if not conf.flag("autorenew", True):
        return lp.skip(f"autorenew = False in renewal/{lp.lineage}.conf: certbot does not "
                       f"renew it, so certbatch does not take it over")
    if info.not_after <= now:
        return lp.skip(f"expired {info.not_after:%Y-%m-%d %H:%M}Z: issue it anew with "
                       f"certbatch")
    if not lp.server or not lp.account_id:
        missing = "server" if not lp.server else "account"
        return lp.skip(f"renewal/{lp.lineage}.conf names no {missing}")
    lp.action = IMPORT
    if lp.name != lp.lineage:
        lp.mapped.notes.insert(0, f"certbot's name {lp.lineage!r} is not a certbatch name: "
                                  f"imported as {lp.name}")


# -- CA and account ------------------------------------------------------------------------------

def _choose_ca(plan: Plan) -> None:
    live = [lp for lp in plan.lineages if lp.action == IMPORT]
    servers = sorted({str(lp.server) for lp in live})
    if plan.directory is None:
        if len(servers) == 1:
            plan.directory = servers[0]
        elif servers:
            listed = "; ".join(f"{s}: {' '.join(lp.lineage for lp in live if lp.server == s)}"
                               for s in servers)
            for lp in live:
                lp.skip(f"needs a choice: the lineages use {len(servers)} CAs ({listed}); "
                        f"import one CA per config, choosing with --only")
            return
    for lp in live:
        if lp.server and lp.server.rstrip("/") != str(plan.directory).rstrip("/"):
            lp.skip(f"on the CA {lp.server}, the config's is {plan.directory}: import it "
                    f"into another config (with its own paths.state)")


def _choose_account(plan: Plan, certbot: CertbotDir, replace: bool) -> None:
    live = [lp for lp in plan.lineages if lp.action == IMPORT]
    if not live or plan.directory is None:
        return
    accounts: dict[str, Account] = {}
    for lp in live:
        if lp.account_id in accounts:
            continue
        try:
            accounts[str(lp.account_id)] = certbot.read_account(str(lp.server),
                                                                str(lp.account_id))
        except Unreadable as exc:
            for other in live:
                if other.account_id == lp.account_id:
                    other.skip(f"its account {lp.account_id}: {exc}")
    live = [lp for lp in live if lp.action == IMPORT]
    if not accounts or not live:
        return
    existing = _certbatch_account(plan.state, plan.directory)
    by_uri = {a.uri: a for a in accounts.values()}
    chosen: Account | None
    if existing is not None and existing in by_uri:
        plan.account = AccountPlan(by_uri[existing], "present")
        chosen = by_uri[existing]
    elif len(accounts) == 1:
        only = next(iter(accounts.values()))
        if existing is None or replace:
            why = "replaces certbatch's account " + existing if existing else ""
            plan.account = AccountPlan(only, "import", why)
            chosen = only
        else:
            plan.account = AccountPlan(only, "kept", f"certbatch keeps its own account "
                                                     f"{existing} (--replace takes certbot's)")
            chosen = None
    else:
        listed = "; ".join(f"{a.id} ({a.uri}): "
                           f"{' '.join(lp.lineage for lp in live if lp.account_id == a.id)}"
                           for a in accounts.values())
        for lp in live:
            lp.skip(f"needs a choice: {len(accounts)} certbot accounts on this CA ({listed}); "
                    f"import the lineages of one account first (--only), the others after it")
        return
    for lp in live:
        lp.ordered_by = accounts[str(lp.account_id)].uri
        if chosen is None or lp.ordered_by != chosen.uri:
            lp.mapped.notes.append(f"ordered by account {lp.ordered_by}, renews under "
                                   f"certbatch's (ARI's `replaces` is not sent for its first "
                                   f"renewal)")


def _certbatch_account(state: Path, directory: str) -> str | None:
    """The URL of certbatch's account for `directory`, if it has one."""
    try:
        stored = Store(state).load_account(directory)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    if stored is None or not stored[1]:
        return None
    try:
        uri = json.loads(stored[1]).get("uri")
    except (ValueError, AttributeError):
        return None
    return uri if isinstance(uri, str) else None


# -- names ---------------------------------------------------------------------------------------

def _check_names(plan: Plan, config: ExistingConfig, replace: bool) -> None:
    store = Store(plan.state)
    for lp in plan.lineages:
        if lp.action != IMPORT:
            continue
        try:
            stored: StoredCert | None = store.current(lp.name)
        except StoreError as exc:
            stored = None
            if not replace:
                lp.skip(f"the state's {lp.name} cannot be read ({exc}): --replace to "
                        f"overwrite it")
                continue
        entry = config.certificates.get(lp.name)
        same_cert = stored is not None and stored.serial == lp.serial
        # certbatch renewed it since it was imported: certbot's older copy never replaces it
        newer = stored is not None and not same_cert and lp.not_after is not None \
            and stored.not_after > lp.not_after
        same_names = isinstance(entry, dict) and isinstance(entry.get("domains"), list) \
            and {str(d).lower() for d in entry["domains"]} == set(lp.domains)
        if same_names and (same_cert or newer):
            lp.action, lp.why = DONE, "already imported" + (
                f" (certbatch has renewed it since: serial {stored.serial})"
                if newer and stored else "")
        elif newer and stored:
            lp.skip(f"certbatch's certificate {lp.name} is newer (serial {stored.serial}, "
                    f"expires {stored.not_after:%Y-%m-%d}): not replaced by certbot's")
        elif entry is not None:
            if same_names and stored is None:
                lp.action, lp.why = ADOPT, f"certificates.{lp.name} in the config is kept"
                _differences(lp, entry, config)
            elif replace:
                lp.replaces = True
            else:
                lp.skip(f"certificates.{lp.name} exists in {plan.config_path}"
                        f"{'' if same_names else ' with other domains'}: --replace to "
                        f"overwrite it")
        elif stored is not None:
            if same_cert:
                lp.action, lp.why = ENTRY_ONLY, "the state has this certificate already"
            elif replace:
                lp.replaces = True
            else:
                lp.skip(f"the state already has a certificate {lp.name} (serial "
                        f"{stored.serial}): --replace to overwrite it")


def _differences(lp: LineagePlan, entry: dict[str, Any], config: ExistingConfig) -> None:
    """Notes for a kept entry that asks for another key type or profile than the certificate
    has: the first renew reissues it."""
    key = entry.get("key") or config.defaults.get("key") or config_mod.DEFAULT_KEY_TYPE
    if key != lp.key_type:
        lp.mapped.notes.append(f"the entry asks for key {key}, the certificate has "
                               f"{lp.key_type}: the first renew reissues it")
    profile = entry.get("profile") or config.profile
    if profile and profile != lp.mapped.entry.get("profile"):
        lp.mapped.notes.append(f"the entry asks for profile {profile}: the first renew "
                               f"reissues it")


# -- the config ----------------------------------------------------------------------------------

def _compose(plan: Plan, config: ExistingConfig) -> None:
    """The new config text, each new entry checked by loading it: an entry the loader refuses
    (a webroot that does not exist, a provider this certbatch lacks) is not imported."""
    while True:
        entries = [(lp.name, lp.entry(), _comments(plan, lp))
                   for lp in plan.lineages if lp.writes_entry]
        if not entries:
            plan.config_text = None
            return
        try:
            if config.exists:
                text = yamltext.add_entries(config.text, entries,
                                            {lp.name for lp in plan.lineages if lp.replaces
                                             and lp.name in config.certificates})
            else:
                text = yamltext.new_file(
                    [f"certbatch configuration, made by `certbatch import certbot` from "
                     f"{plan.source}", "Reference: docs/configuration.md in certbatch's source."],
                    {"acme": {"directory": plan.directory}}, entries)
        except yamltext.TextEditError as exc:
            raise UsageError(f"{plan.config_path}: cannot add the certificates: {exc}; add "
                             f"them by hand (see --dry-run)") from None
        try:
            configfile.load_text(text, plan.config_path, plan.new_files)
        except ConfigError as exc:
            culprit = _entry_of(exc.key, [lp for lp in plan.lineages if lp.writes_entry])
            if culprit is None:
                raise UsageError(f"the config would not load: {exc}") from None
            culprit.skip(f"certbatch would refuse its settings: {exc.key}: {exc.problem}")
            continue
        plan.config_text = text
        return


def _entry_of(key: str, lineages: list[LineagePlan]) -> LineagePlan | None:
    """The lineage whose new entry a config error's key path is in (names may hold dots)."""
    found = [lp for lp in lineages
             if key == f"certificates.{lp.name}" or key.startswith(
                 (f"certificates.{lp.name}.", f"certificates.{lp.name}["))]
    return max(found, key=lambda lp: len(lp.name), default=None)


def _comments(plan: Plan, lp: LineagePlan) -> list[str]:
    return [f"certbot lineage {lp.lineage} ({plan.source}/renewal/{lp.lineage}.conf)"] + \
        [f"  {n}" for n in lp.mapped.notes]
