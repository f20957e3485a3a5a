"""Carrying out an import plan: the files it writes next to the config, certbatch's account,
the certificates (each as its live version, recorded as staged), then the config file.

The state is written under the run lock (no renew runs meanwhile), the config last and
atomically: if anything fails before, the config is unchanged and running the import again
finishes the job (a certificate already in the state with the same serial only gets its entry).
The certbot folder is only read.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .. import safefs
from ..fsutil import atomic_write, fsync_dir
from ..store import CertStatus, Store
from .plan import Plan

log = logging.getLogger("certbatch.import")

NEW_CONFIG_MODE = 0o600  # it may come to hold secrets (a TSIG key, an EAB key)


@dataclass
class Applied:
    certificates: list[str] = field(default_factory=list)  # names written into the state
    account: str | None = None  # the account URL written, if one was
    files: list[Path] = field(default_factory=list)
    config_written: bool = False


def apply(plan: Plan, now: dt.datetime | None = None) -> Applied:
    """Write what `plan` says. OSError and StoreError go to the caller (the command makes one
    line of them); nothing in the certbot folder is touched."""
    from ..runner import run_lock

    now = now or dt.datetime.now(dt.timezone.utc)
    done = Applied()
    account = plan.account is not None and plan.account.action == "import"
    if not (account or plan.config_text is not None
            or any(lp.writes_state for lp in plan.lineages)):
        return done  # nothing to write: not even the lock file
    with run_lock(plan.state, 0, "import certbot"):
        store = Store(plan.state)
        store.check()
        if plan.config_text is not None:  # what the new entries name, before the state
            _config_folder(plan.config_path)
            for f in plan.new_files:
                _own_folder(f.path.parent)
                atomic_write(f.path, f.content, f.mode)
                done.files.append(f.path)
        if account and plan.account is not None:
            a = plan.account.account
            store.save_account(str(plan.directory), a.key_pem, a.regr_json)
            log.info("imported certbot account %s (%s) for %s", a.id, a.uri, plan.directory)
            done.account = a.uri
        for lp in plan.lineages:
            if not lp.writes_state:
                continue
            assert lp.not_before is not None and lp.not_after is not None
            stored = store.save_certificate(
                lp.name, key_type=lp.key_type, domains=lp.domains,
                privkey_pem=lp.pems["privkey.pem"], cert_pem=lp.pems["cert.pem"],
                chain_pem=lp.pems["chain.pem"], fullchain_pem=lp.pems["fullchain.pem"],
                serial=lp.serial, not_before=lp.not_before, not_after=lp.not_after,
                issued_at=lp.not_before, profile=lp.mapped.entry.get("profile"),
                account=lp.ordered_by)
            # Staged: the hosts already use this very certificate (certbot put it there), so
            # the first renew has nothing to do; `run-hook --target T --all` hands it over.
            store.save_status(lp.name, CertStatus(last_result="imported", last_success=now,
                                                  staged_version=stored.version))
            done.certificates.append(lp.name)
            log.info("%s: imported certbot lineage %s (serial %s) as version %s", lp.name,
                     lp.lineage, lp.serial, stored.version)
        if plan.config_text is not None:
            mode = NEW_CONFIG_MODE
            if plan.config_exists:
                mode = stat.S_IMODE(os.stat(plan.config_path).st_mode)
            atomic_write(plan.config_path, plan.config_text, mode)
            done.config_written = True
            log.info("wrote %s (%d certificate entries from certbot)", plan.config_path,
                     sum(lp.writes_entry for lp in plan.lineages))
    return done


def _config_folder(config_path: Path) -> None:
    folder = Path(os.path.abspath(config_path)).parent
    if not folder.is_dir():
        os.makedirs(folder, 0o755, exist_ok=True)


def _own_folder(folder: Path) -> None:
    """The folder for the scripts and secrets the import writes: created 0700; an existing one
    must be certbatch's own (safefs.check_dir: a real folder, not a link, not writable by
    others)."""
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        safefs.check_dir(folder)  # ours, a real folder, not writable by others
        return
    os.chmod(folder, 0o700)
    fsync_dir(folder.parent)
