"""Retiring certificates: `certbatch revoke` and `certbatch remove`.

revoke: the live certificate of a name is revoked at the CA (RFC 8555 section 7.6), signed with
the account, or with the certificate's own key for keyCompromise; its status records the
revoked serial, so that the next run reissues it (renewal.decide: "revoked ...") unless the
operator said not to.

remove: a certificate gone from the config leaves the state and the spool: its folder
`<state>/certs/<name>` (first renamed aside in one step, then deleted without following any
link), its pending entry, its name in every target's ledger and its entry in the state index.

Both change the state as a renew does: call them holding the run lock (runner.run_lock). Like the
runner, this module never prints and never imports click; the ACME stack is imported only by
`revoke`, and the state and spool modules only when called (the command line imports REASONS
at start).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import safefs
from .errors import AcmeError, RateLimited, StoreError, UsageError, os_error_message

if TYPE_CHECKING:
    from .acme_client import AcmeClient
    from .config import Settings
    from .spool import Spool

# RFC 5280 CRLReason codes a subscriber may ask for (the others are the CA's own).
REASONS = {"unspecified": 0, "keyCompromise": 1, "affiliationChanged": 3, "superseded": 4,
           "cessationOfOperation": 5}
KEY_SIGNED = "keyCompromise"  # signed with the certificate's key: proof of holding it
ALREADY_REVOKED = "urn:ietf:params:acme:error:alreadyRevoked"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")  # the config's rule for certificate names


def _check_name(name: str) -> None:
    """A name that cannot be a certificate's (and could name a path elsewhere) is refused."""
    if not NAME_RE.match(name):
        raise UsageError(f"invalid certificate name {name!r}: lower-case letters, digits, "
                         f"'.', '_' and '-', starting with a letter or digit")


# -- revoke ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Revocation:
    """What `revoke` did."""

    name: str
    serial: str
    not_after: dt.datetime
    reason: str
    signed_with: str  # "account" | "certificate's key"
    already: bool  # the CA had revoked it already (its answer in `detail`)
    renew: bool  # the next run reissues it
    configured: bool  # the name is in the config (else it is never renewed)
    due_at: dt.datetime | None = None  # with renew False: when the run renews it anyway
    detail: str = ""


def revoke(settings: Settings, name: str, reason: str = "unspecified", renew: bool = True,
           client: AcmeClient | None = None, now: dt.datetime | None = None) -> Revocation:
    """Revoke the live certificate of `name` at the CA and record it in its status.

    Also a name no longer in the config, as long as its state folder holds a certificate.
    `renew`: the next `renew` reissues it at once (else when it is due). The CA's
    alreadyRevoked is not an error: the revocation is recorded, `already` says so. Raises
    UsageError for an unknown name or one never issued, AcmeError when the CA refuses.
    """
    from . import renewal
    from .store import Store

    if reason not in REASONS:
        raise UsageError(f"unknown revocation reason {reason!r} (one of {', '.join(REASONS)})")
    _check_name(name)
    store = Store(settings.paths.state)
    store.check()
    cert = settings.certificates.get(name)
    stored = store.current(name)
    if stored is None:
        if cert is not None:
            raise UsageError(f"{name} has no certificate yet: nothing to revoke")
        raise UsageError(f"no certificate named {name} in {settings.path} or in "
                         f"{store.root / 'certs'}")
    cert_pem = _read(stored.path("cert.pem"))
    _check_serial(name, cert_pem, stored.serial)
    key_pem = _read(stored.path("privkey.pem")) if reason == KEY_SIGNED else None
    if client is None:
        from .acme_client import AcmeClient

        client = AcmeClient(settings.acme, store)
    already, detail = False, ""
    try:
        client.revoke(cert_pem, REASONS[reason], key_pem, name)
    except RateLimited:
        raise
    except AcmeError as exc:
        if exc.type != ALREADY_REVOKED:
            refused = AcmeError(f"the CA refused to revoke {name} (serial {stored.serial}): "
                                f"{exc}", status=exc.status)
            refused.type = exc.type  # the message has it already
            raise refused from None
        already, detail = True, exc.detail
    now = now or dt.datetime.now(dt.timezone.utc)
    status = store.status(name)
    same = status.revoked_serial == stored.serial
    if not (already and same):
        status.revoked_at = now
        # alreadyRevoked: the CA kept the reason it has, which we may not know.
        status.revoked_reason = None if already else reason
    status.revoked_serial = stored.serial
    status.revoked_renew = renew and cert is not None
    # synced: after a power cut nothing could tell the next run to replace the revoked one
    store.save_status(name, status, durable=True)
    due_at = None
    if cert is not None and not renew:
        due_at, _ = renewal.next_renewal(stored, status, settings.renewal.before_expiry,
                                         settings.renewal.ari)
    return Revocation(name, stored.serial, stored.not_after, reason,
                      "certificate's key" if key_pem else "account", already,
                      status.revoked_renew, cert is not None, due_at, detail)


def _read(path: Path) -> bytes:
    try:
        return safefs.read_bytes(path)
    except OSError as exc:
        raise StoreError(os_error_message(exc, path)) from exc


def _check_serial(name: str, cert_pem: bytes, serial: str) -> None:
    """The live cert.pem must be the certificate its meta.json describes."""
    from cryptography import x509

    try:
        found = format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")
    except ValueError as exc:
        raise StoreError(f"{name}: the live cert.pem does not parse: {exc}") from None
    if found != serial:
        raise StoreError(f"{name}: the live cert.pem has serial {found}, not {serial} as "
                         f"recorded: not revoking it")


# -- remove ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Removal:
    """What `remove` deletes (or deleted)."""

    name: str
    state_folder: Path | None  # <state>/certs/<name>, if there is one
    serial: str | None = None  # its live certificate, if readable
    not_after: dt.datetime | None = None
    pending: Path | None = None  # <spool>/pending/<name>, if there is one
    targets: list[str] = field(default_factory=list)  # ledgers that name it
    applied: list[Path] = field(default_factory=list)  # its copies in <spool>/applied/<batch>/
    trashed: list[Path] = field(default_factory=list)  # ... in pruned batches, not deleted yet


def plan_removal(settings: Settings, name: str) -> Removal:
    """What `remove` would delete; reads only. UsageError (exit 2) for a name still in the
    config, or one that nothing in the state or spool has; UnsafePath for a folder that is not
    certbatch's own."""
    from .store import Store

    _check_name(name)
    if name in settings.certificates:
        raise UsageError(f"{name} is still in the config ({settings.path}): remove it from "
                         f"there first, then run `certbatch remove {name}`")
    store = Store(settings.paths.state)
    folder = store.cert_dir(name)
    serial = not_after = None
    if os.path.lexists(folder):
        safefs.check_dir(store.root / "certs")
        safefs.check_dir(folder)
        try:
            stored = store.current(name)
        except StoreError:
            stored = None  # removed all the same
        if stored is not None:
            serial, not_after = stored.serial, stored.not_after
    spool = _spool(settings)
    pending = spool.pending_dir / name
    if os.path.lexists(pending):  # refused before anything is deleted
        safefs.check_dir(spool.pending_dir)
        safefs.check_dir(pending)
    targets = [t for t in spool.ledgers.known() if name in spool.ledgers.load(t).applied]
    applied = spool.applied_copies(name)
    for copy in applied:
        safefs.check_dir(copy)
    trashed = spool.trashed_copies(name)
    removal = Removal(name, folder if os.path.lexists(folder) else None, serial, not_after,
                      pending if os.path.lexists(pending) else None, targets, applied, trashed)
    if removal.state_folder is None and removal.pending is None and not targets \
            and not applied and not trashed:
        raise UsageError(f"nothing named {name} in {store.root / 'certs'}, "
                         f"{spool.pending_dir} or the target ledgers")
    return removal


def remove(settings: Settings, name: str) -> Removal:
    """Delete what `plan_removal` finds (again: call it under the run lock). Raises StoreError
    (exit 1) when something could not be deleted, naming it."""
    from .store import Store

    removal = plan_removal(settings, name)
    store = Store(settings.paths.state)
    # The spool first: a failure or a crash after it leaves a state folder that a second
    # `remove` deletes, never a pending entry the next notify would hand the targets again.
    if removal.pending is not None or removal.targets or removal.applied or removal.trashed:
        _spool(settings).retire(name)
    if removal.state_folder is not None:
        _remove_folder(removal.state_folder)
    store.index.save(keep=settings.certificates)  # drops the entry of every name not configured
    return removal


def _spool(settings: Settings) -> Spool:
    from .spool import Spool

    return Spool(settings.paths.spool, settings.paths.hooks)


def _remove_folder(folder: Path) -> None:
    """Rename `folder` to a temp name beside it (the certificate is gone in one step; a crash
    leaves a `.*.tmp` folder that the next run's sweep deletes), then delete it. shutil.rmtree
    works through folder descriptors and never follows a link inside the tree."""
    import shutil

    from .fsutil import fsync_dir

    parent = folder.parent
    safefs.check_dir(parent)
    safefs.check_dir(folder)
    grave = parent / f".{folder.name}.removed.tmp"
    try:
        if os.path.lexists(grave):  # left by an earlier attempt
            safefs.check_dir(grave)
            shutil.rmtree(grave)
        os.rename(folder, grave)
        fsync_dir(parent)
    except OSError as exc:
        raise StoreError(f"{folder} not removed: {os_error_message(exc, folder)}") from exc
    try:
        shutil.rmtree(grave)
    except OSError as exc:
        raise StoreError(f"{folder} moved aside to {grave} but not all deleted: "
                         f"{os_error_message(exc, grave)}") from exc
