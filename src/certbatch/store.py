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
import dataclasses
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import safefs
from .ari import AriState
from .errors import StoreError, os_error_message
from .faults import point
from .fsutil import (
    atomic_symlink,
    atomic_write,
    ensure_dir,
    ensure_root,
    fsync_dir,
    ordered_journal,
    remove_leftovers,
    write_new,
)
from .index import Index

log = logging.getLogger("certbatch.store")

KEEP_VERSIONS = 3  # the live set plus two older ones, for a manual rollback
PEM_FILES = ("privkey.pem", "cert.pem", "chain.pem", "fullchain.pem")
_LIVE_RE = re.compile(r"versions/[0-9A-Za-z][0-9A-Za-z_-]*\Z")  # what save_certificate links


def iso(t: dt.datetime) -> str:
    """ISO 8601 UTC with a Z, to the second (2026-11-22T10:15:00Z): certbatch's one time format
    in files and reports."""
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t!r}: certbatch only handles tz-aware times")
    u = t if t.tzinfo is dt.timezone.utc else t.astimezone(dt.timezone.utc)
    if u.year < 1000:  # %Y writes 999
        return u.strftime("%Y-%m-%dT%H:%M:%SZ")
    # Neither strftime nor an f-string: %-formatting costs half as much (2.8 against 6 and 4.8
    # us), and a batch of 10,000 certificates formats 40,000 of these.
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (  # noqa: UP031
        u.year, u.month, u.day, u.hour, u.minute, u.second)


def parse_iso(text: str) -> dt.datetime:
    # fromisoformat is ~10x faster than strptime (a nothing-due run parses thousands of these);
    # Python 3.10's does not take "Z".
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _ts(value: dt.datetime | None) -> str | None:
    return iso(value) if value else None


def _parse_ts(value: str | None) -> dt.datetime | None:
    return parse_iso(value) if value else None


def _opt_text(value: object, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{key} is not a string")
    return value


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
    damaged: str | None = None  # why the live files cannot be used: renewed as a reissue
    sizes: tuple[tuple[str, int], ...] = ()  # file sizes recorded when stored
    # The ACME profile it was ordered with; None: none asked for (the CA's default), also for
    # versions stored before certbatch knew profiles.
    profile: str | None = None
    # The URL of the ACME account that ordered it (None: not recorded, versions stored before
    # certbatch recorded it). ARI's `replaces` is sent only for the account in use.
    account: str | None = None
    # Its ARI certificate identifier (ari.cert_id), recorded when stored so that asking the
    # CA's renewal info never needs to parse it (None: stored before, parsed when needed).
    ari_id: str | None = None

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
    # Consecutive failed orders (not rate limits), and when the next order may go out (the
    # backoff, see renewal.backoff_delay); a successful order resets both. Files written
    # before certbatch had a backoff lack them: 0 and None.
    failed_orders: int = 0
    next_attempt: dt.datetime | None = None
    # What the CA's renewal info (ARI) last said about the live certificate (see ari.py).
    ari: AriState | None = None
    # The serial `certbatch revoke` last revoked at the CA, when, and the reason's name;
    # `revoked_renew`: the next run renews it (renewal.decide) while that serial is live.
    revoked_serial: str | None = None
    revoked_at: dt.datetime | None = None
    revoked_reason: str | None = None
    revoked_renew: bool = False

    _TIMES = ("last_attempt", "last_success", "rate_limited_until", "next_attempt",
              "revoked_at")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in self._TIMES:
            data[key] = _ts(data[key])
        data["ari"] = self.ari.to_dict() if self.ari else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CertStatus:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Any) -> CertStatus:
        data = dict(data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ValueError("status is not a JSON object")
        for key in cls._TIMES:
            data[key] = _parse_ts(data.get(key))
        count = data.get("failed_orders", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError("failed_orders is not a count")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        # Only advice: unreadable renewal info is asked for again, the rest of the status kept.
        try:
            known["ari"] = AriState.from_dict(data["ari"]) if data.get("ari") else None
        except (ValueError, TypeError):
            known["ari"] = None
        return cls(**known)


class Store:
    """The state folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Caches meta.json and status.json of every certificate (see index.py); the runner
        # writes it back at the end of a run.
        self.index = Index(root)
        self._root_ok = False  # _dir checked the root already
        self._certs = os.path.join(root, "certs")  # a string: paths below are concatenated

    def _dir(self, *parts: str) -> Path:
        """Create root/parts..., forcing 0700 on every level (mkdir's parents follow the umask).
        The root and the way to it are checked once per Store (a walk of every parent folder;
        a run saves thousands of statuses)."""
        path = self.root if self._root_ok else ensure_root(self.root)
        self._root_ok = True
        for part in parts:
            path = ensure_dir(path / part)
        return path

    def check(self) -> None:
        """Create the root, or raise UnsafePath unless it and its top folders are certbatch's
        own (see safefs): run before any work."""
        ensure_root(self.root)
        for part in ("certs", "accounts"):
            with contextlib.suppress(FileNotFoundError):
                safefs.check_dir(self.root / part)

    def sweep(self) -> None:
        """Delete the temp files and folders a killed run left (status.json and account.json
        writes, `live` links, a version being written, the disk space probe) in <root>,
        accounts/<hash>/, certs/<name>/ and certs/<name>/versions/. Call it under the run lock
        (no writer of the state is alive), after a run that did not end: walking every
        certificate's folders costs ~0.2 s per 1,000."""
        remove_leftovers(self.root, levels=4)

    # -- accounts ------------------------------------------------------------------------------

    def _account_dir(self, directory_url: str) -> Path:
        digest = hashlib.sha256(directory_url.encode()).hexdigest()[:16]
        return self.root / "accounts" / digest

    def load_account(self, directory_url: str) -> tuple[bytes, str | None] | None:
        """(account key PEM, registration JSON or None) for this ACME directory, if any."""
        path = self._account_dir(directory_url) / "account.json"
        try:
            data = json.loads(safefs.read_text(path))
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

    def current(self, name: str, verify: bool = False) -> StoredCert | None:
        """The live set for `name`, or None if it was never issued.

        Every folder on the way is checked to be certbatch's own (safefs) and `live` must name
        one of its versions. `damaged` says why the live files cannot be used: from a cheap
        existence-and-size check, or with `verify` from parsing them (key and certificate
        match, serial as recorded). Raises StoreError if the set cannot be read at all.
        """
        # Plain strings, not Paths: a full look and a restage do this for every certificate.
        cdir = f"{self._certs}/{name}"
        live = cdir + "/live"
        try:
            version = os.readlink(live)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise StoreError(f"{live}: not the symlink certbatch makes") from exc
            raise StoreError(os_error_message(exc, live)) from exc
        if not _LIVE_RE.match(version):
            raise StoreError(f"{live}: points at {version!r}, not at one of its versions/")
        folder = f"{cdir}/{version}"
        try:
            for path in (cdir, cdir + "/versions", folder):
                safefs.check_dir(path)
            meta_path = folder + "/meta.json"
            meta_st = os.lstat(meta_path)
            meta = cached = self.index.meta(name, version, meta_st)
            if meta is None:
                meta = json.loads(safefs.read_text(meta_path))
            stored = StoredCert(
                name=name, version=version[len("versions/"):], folder=Path(folder),
                domains=tuple(meta["domains"]), key_type=meta["key_type"],
                serial=meta["serial"],
                not_before=_parse_ts(meta["not_before"]),  # type: ignore[arg-type]
                not_after=_parse_ts(meta["not_after"]),  # type: ignore[arg-type]
                issued_at=_parse_ts(meta["issued_at"]),  # type: ignore[arg-type]
                sizes=tuple((str(k), int(v)) for k, v in meta.get("sizes", {}).items()),
                profile=_opt_text(meta.get("profile"), "profile"),
                account=_opt_text(meta.get("account"), "account"),
                ari_id=_opt_text(meta.get("ari_id"), "ari_id"),
            )
        except StoreError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"{live}/meta.json: unreadable certificate metadata: "
                             f"{type(exc).__name__}: {exc}") from exc
        if cached is None:
            self.index.put_meta(name, version, meta_st, meta)
        damaged = self._damaged(stored, verify)
        return dataclasses.replace(stored, damaged=damaged) if damaged else stored

    def _damaged(self, stored: StoredCert, verify: bool) -> str | None:
        """Why the live files of `stored` cannot be used, or None (see current)."""
        sizes = dict(stored.sizes)
        folder = f"{stored.folder}/"  # concatenation: this runs for every certificate
        for f in PEM_FILES:
            try:
                st = os.lstat(folder + f)
            except FileNotFoundError:
                return f"{f} is missing"
            except OSError as exc:
                return f"{f} cannot be examined: {exc.strerror}"
            if not stat.S_ISREG(st.st_mode):
                return f"{f} is not a regular file"
            if st.st_size == 0 and f != "chain.pem":
                return f"{f} is empty"
            if f in sizes and st.st_size != sizes[f]:
                return f"{f} was changed after it was stored ({st.st_size} bytes, not " \
                       f"{sizes[f]})"
        if not verify:
            return None
        from . import crypto  # cryptography: only for status and check

        try:
            files = self.read_files(stored)
        except (OSError, StoreError) as exc:
            return f"cannot be read: {exc}"
        return crypto.set_problem(files, stored.serial)

    def read_files(self, stored: StoredCert) -> dict[str, bytes]:
        """The four PEM files of one version (read from its own folder, never via `live`)."""
        return {f: safefs.read_bytes(stored.folder / f) for f in PEM_FILES}

    def save_certificate(self, name: str, *, key_type: str, domains: tuple[str, ...],
                         privkey_pem: bytes, cert_pem: bytes, chain_pem: bytes,
                         fullchain_pem: bytes, serial: str, not_before: dt.datetime,
                         not_after: dt.datetime, issued_at: dt.datetime,
                         profile: str | None = None, account: str | None = None,
                         ari_id: str | None = None) -> StoredCert:
        """Write a complete new version and switch `live` to it in one rename. `account`: the
        URL of the ACME account that ordered it; `ari_id`: its ARI identifier."""
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
                    "not_after": _ts(not_after), "issued_at": _ts(issued_at),
                    "profile": profile,  # as ordered (None: the CA's default)
                    "account": account,
                    "ari_id": ari_id,
                    # for the cheap check of every run: a file replaced later differs in size
                    "sizes": {"privkey.pem": len(privkey_pem), "cert.pem": len(cert_pem),
                              "chain.pem": len(chain_pem), "fullchain.pem": len(fullchain_pem)}}
            write_new(tmp / "meta.json", json.dumps(meta, indent=2) + "\n", 0o644)
            # No fsync of the folder itself: each file's fsync made its name durable too (ext4
            # and xfs commit their journal in order; btrfs logs a new file with its name and
            # its new folder), and the fsync after the rename covers the folder's new name
            # (btrfs logs the new folder an entry names). Where the journal commits in order,
            # even that is left to the fsync of `live`'s folder just after (docs/safety.md).
            point("store.version-written")
            os.rename(tmp, folder)
            point("store.version-renamed")
            if not ordered_journal(versions, base):
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
        # a plain string path: a nothing-due run reads thousands of these
        path = f"{self._certs}/{name}/status.json"
        try:
            st = os.lstat(path)
            data = self.index.status(name, st)
            if data is None:
                data = json.loads(safefs.read_text(path))
                self.index.put_status(name, st, data)
            return CertStatus.from_dict(data)
        except FileNotFoundError:
            return CertStatus()
        except Exception:  # noqa: BLE001
            # A damaged status file only loses history; it must never stop renewals.
            log.warning("%s: ignoring unreadable %s", name, self.cert_dir(name) / "status.json")
            return CertStatus()

    def save_status(self, name: str, status: CertStatus, durable: bool = False) -> None:
        """Replace status.json atomically, without fsync (2 of a renewal's fsyncs): a power cut
        may lose the last status, which costs only work done again: a restage (deploy hooks
        and targets apply the same certificate once more), a backoff or rate limit forgotten
        (the CA is asked again), renewal info fetched again. An unreadable status is ignored
        (see status()). The certificate itself is stored durably. `durable`: fsync it, for a
        record nothing could rebuild (a revocation that the next run must act on)."""
        self._dir("certs", name)
        path = self.cert_dir(name) / "status.json"
        data = status.to_dict()
        atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o600,
                     durable=durable)
        try:
            self.index.put_status(name, os.lstat(path), data)
        except OSError:
            self.index.put_status(name, None, data)  # read from the file next time

    def names(self) -> list[str]:
        """Names that have a folder in the store (configured or not)."""
        with contextlib.suppress(FileNotFoundError):
            return sorted(p.name for p in (self.root / "certs").iterdir() if p.is_dir())
        return []
