"""Accounts, keys and certificates on disk: atomic, versioned, private.

Layout under the state folder (all folders 0700, private keys 0600)::

    accounts/<hash of directory URL>/account.json  key, registration and directory URL
    certs/<name>/live -> versions/<version>       symlink, switched atomically
    certs/<name>/versions/<version>/privkey.pem cert.pem chain.pem fullchain.pem meta.json
    certs/<name>/status.json                     outcome of the last run for this certificate

A new issuance is written completely into a fresh version folder (each file fsynced) before the
`live` symlink is renamed onto it, so a reader that resolves `live` once always gets a key and a
certificate from the same issuance, and a crash at any point leaves the previous set in place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import StoreError
from .faults import point
from .fsutil import atomic_symlink, atomic_write, ensure_dir, fsync_dir, write_new

log = logging.getLogger("certbatch.store")

KEEP_VERSIONS = 3  # the live set plus two older ones, for a manual rollback
PEM_FILES = ("privkey.pem", "cert.pem", "chain.pem", "fullchain.pem")


def iso(t: dt.datetime) -> str:
    """ISO 8601 UTC with a Z, to the second (2026-11-22T10:15:00Z): certbatch's one time format
    in files and reports."""
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t!r}: certbatch only handles tz-aware times")
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    # fromisoformat is ~10x faster than strptime (a nothing-due run parses thousands of these);
    # Python 3.10's does not take "Z".
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _ts(value: dt.datetime | None) -> str | None:
    return iso(value) if value else None


def _parse_ts(value: str | None) -> dt.datetime | None:
    return parse_iso(value) if value else None


@dataclass(frozen=True)
class StoredCert:
    """The live certificate set of one name, as described by its meta.json."""

    name: str
    version: str
    folder: Path
    domains: tuple[str, ...]
    key_type: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    issued_at: dt.datetime

    def path(self, filename: str) -> Path:
        return self.folder / filename


@dataclass
class CertStatus:
    """What happened to a certificate in the last runs (state, not configuration)."""

    last_attempt: dt.datetime | None = None
    last_result: str | None = None  # renewed | not-due | failed | rate-limited | not-staged | ...
    last_error: str | None = None
    last_success: dt.datetime | None = None
    rate_limited_until: dt.datetime | None = None
    # The stored version last staged into the spool. A live version that differs (deploy hooks
    # failed, or a crash between storing and staging) is staged again by the next run.
    staged_version: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("last_attempt", "last_success", "rate_limited_until"):
            data[key] = _ts(data[key])
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CertStatus:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("status is not a JSON object")
        for key in ("last_attempt", "last_success", "rate_limited_until"):
            data[key] = _parse_ts(data.get(key))
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class Store:
    """The state folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, *parts: str) -> Path:
        """Create root/parts..., forcing 0700 on every level (mkdir's parents follow the umask)."""
        path = ensure_dir(self.root)
        for part in parts:
            path = ensure_dir(path / part)
        return path

    # -- accounts ------------------------------------------------------------------------------

    def _account_dir(self, directory_url: str) -> Path:
        digest = hashlib.sha256(directory_url.encode()).hexdigest()[:16]
        return self.root / "accounts" / digest

    def load_account(self, directory_url: str) -> tuple[bytes, str | None] | None:
        """(account key PEM, registration JSON or None) for this ACME directory, if any."""
        path = self._account_dir(directory_url) / "account.json"
        try:
            data = json.loads(path.read_text())
            return data["key"].encode(), data.get("regr")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise StoreError(f"{path}: unreadable ACME account: {exc}") from exc

    def save_account(self, directory_url: str, key_pem: bytes, regr_json: str) -> None:
        """Key and registration in ONE file, replaced atomically: two files could be left from
        two different registrations by a crash, and the CA would reject every signature."""
        folder = self._dir("accounts", self._account_dir(directory_url).name)
        data = {"directory": directory_url, "key": key_pem.decode(), "regr": regr_json}
        atomic_write(folder / "account.json", json.dumps(data, indent=2) + "\n", 0o600)

    # -- certificates --------------------------------------------------------------------------

    def cert_dir(self, name: str) -> Path:
        return self.root / "certs" / name

    def current(self, name: str) -> StoredCert | None:
        """The live set for `name`, or None if it was never issued (or its metadata is gone)."""
        live = self.cert_dir(name) / "live"
        try:
            version = os.readlink(live)
        except FileNotFoundError:
            return None
        try:
            meta = json.loads((live.parent / version / "meta.json").read_text())
            return StoredCert(
                name=name, version=Path(version).name, folder=live.parent / version,
                domains=tuple(meta["domains"]), key_type=meta["key_type"],
                serial=meta["serial"],
                not_before=_parse_ts(meta["not_before"]),  # type: ignore[arg-type]
                not_after=_parse_ts(meta["not_after"]),  # type: ignore[arg-type]
                issued_at=_parse_ts(meta["issued_at"]),  # type: ignore[arg-type]
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"{live}/meta.json: unreadable certificate metadata: "
                             f"{type(exc).__name__}: {exc}") from exc

    def read_files(self, stored: StoredCert) -> dict[str, bytes]:
        """The four PEM files of one version (read from its own folder, never via `live`)."""
        return {f: (stored.folder / f).read_bytes() for f in PEM_FILES}

    def save_certificate(self, name: str, *, key_type: str, domains: tuple[str, ...],
                         privkey_pem: bytes, cert_pem: bytes, chain_pem: bytes,
                         fullchain_pem: bytes, serial: str, not_before: dt.datetime,
                         not_after: dt.datetime, issued_at: dt.datetime) -> StoredCert:
        """Write a complete new version and switch `live` to it in one rename."""
        base = self._dir("certs", name)
        versions = self._dir("certs", name, "versions")
        version = f"{issued_at.strftime('%Y%m%dT%H%M%SZ')}-{serial[-12:]}"
        folder = versions / version
        if folder.exists():  # a leftover from a crash with the same serial: replace it
            shutil.rmtree(folder)
        tmp = versions / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ensure_dir(tmp)
        try:
            # A fresh, not yet visible folder: plain fsynced writes, then one rename.
            write_new(tmp / "privkey.pem", privkey_pem, 0o600)
            write_new(tmp / "cert.pem", cert_pem, 0o644)
            write_new(tmp / "chain.pem", chain_pem, 0o644)
            write_new(tmp / "fullchain.pem", fullchain_pem, 0o644)
            meta = {"name": name, "domains": list(domains), "key_type": key_type,
                    "serial": serial, "not_before": _ts(not_before),
                    "not_after": _ts(not_after), "issued_at": _ts(issued_at)}
            write_new(tmp / "meta.json", json.dumps(meta, indent=2) + "\n", 0o644)
            fsync_dir(tmp)
            point("store.version-written")
            os.rename(tmp, folder)
            point("store.version-renamed")
            fsync_dir(versions)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_symlink(f"versions/{version}", base / "live")
        point("store.live-switched")
        self._prune(versions, keep=version)
        stored = self.current(name)
        assert stored is not None
        return stored

    def _prune(self, versions: Path, keep: str) -> None:
        """Drop old versions and temp folders left by a crashed write (runs are serialized by
        the run lock, so no other writer can own them)."""
        for leftover in versions.glob(".*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        names = sorted(p.name for p in versions.iterdir() if not p.name.startswith("."))
        for old in names[:-KEEP_VERSIONS]:
            if old != keep:
                shutil.rmtree(versions / old, ignore_errors=True)

    # -- per-certificate run status ------------------------------------------------------------

    def status(self, name: str) -> CertStatus:
        try:
            return CertStatus.from_json((self.cert_dir(name) / "status.json").read_text())
        except FileNotFoundError:
            return CertStatus()
        except Exception:  # noqa: BLE001
            # A damaged status file only loses history; it must never stop renewals.
            log.warning("%s: ignoring unreadable %s", name, self.cert_dir(name) / "status.json")
            return CertStatus()

    def save_status(self, name: str, status: CertStatus) -> None:
        self._dir("certs", name)
        atomic_write(self.cert_dir(name) / "status.json", status.to_json(), 0o600)

    def names(self) -> list[str]:
        """Names that have a folder in the store (configured or not)."""
        with contextlib.suppress(FileNotFoundError):
            return sorted(p.name for p in (self.root / "certs").iterdir() if p.is_dir())
        return []
