"""Spool entries: what a staged certificate is, reading ``pending/``, and checking an entry."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import safefs
from ..errors import UnsafePath
from ..store import parse_iso

log = logging.getLogger("certbatch.spool")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
META_VERSION = 1
ENTRY_FILES = ("privkey.pem", "cert.pem", "chain.pem", "fullchain.pem", "meta.json")


@dataclass(frozen=True)
class CertFiles:
    """A renewed certificate as the runner hands it in for staging."""

    name: str
    domains: tuple[str, ...]
    privkey_pem: bytes
    cert_pem: bytes
    chain_pem: bytes
    fullchain_pem: bytes
    serial: str  # hex
    not_before: dt.datetime  # tz-aware
    not_after: dt.datetime  # tz-aware


@dataclass(frozen=True)
class PendingEntry:
    """A staged certificate waiting until every target has applied it."""

    name: str
    domains: tuple[str, ...]
    serial: str
    not_after: dt.datetime
    staged_at: dt.datetime
    folder: Path


def _parse_meta(name: str, text: str) -> dict[str, object]:
    """meta.json of the entry `name`, checked field by field; ValueError says what is wrong."""
    meta = json.loads(text)
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    if meta.get("name") != name:
        raise ValueError(f"it names {meta.get('name')!r}, not {name!r}")
    domains = meta.get("domains")
    if not isinstance(domains, list) or not domains or \
            not all(isinstance(d, str) and d for d in domains):
        raise ValueError("'domains' is not a list of names")
    for key in ("serial", "not_after", "staged_at"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise ValueError(f"{key!r} is missing or not a string")
    return meta


def read_pending(pending_dir: Path, broken: list[tuple[str, str]] | None = None,
                 known: Mapping[str, PendingEntry] | None = None) -> list[PendingEntry]:
    """The entries in `pending_dir`, sorted by name; unreadable ones are logged and left out.
    `known`: entries the caller has just written and checked, holding the spool lock
    exclusively since (run-hook --all: 10,000 of them); taken as they are, neither their
    folders looked at nor their meta.json read again.

    An entry that is not certbatch's own (a symlink, another user's folder, writable by others)
    is never handed to a target: it is left where it is, with a warning. One of certbatch's own
    whose meta.json is missing or unreadable is added to `broken` as (name, problem), so that
    the apply phase can remove it and have it staged again (it is left out either way).
    """
    try:
        safefs.check_dir(pending_dir)
        names = sorted(os.listdir(pending_dir))
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        if known and name in known:
            entries.append(known[name])
            continue
        folder = pending_dir / name
        if name.startswith(".") or not NAME_RE.match(name):
            continue
        try:
            safefs.check_dir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue  # moved away meanwhile
        except UnsafePath as exc:
            log.warning("spool: ignoring %s (not staged by certbatch)", exc)
            continue
        try:
            meta = _parse_meta(name, safefs.read_text(folder / "meta.json"))
            entries.append(PendingEntry(
                name=name,
                domains=tuple(meta["domains"]),  # type: ignore[arg-type]
                serial=str(meta["serial"]),
                not_after=parse_iso(str(meta["not_after"])),
                staged_at=parse_iso(str(meta["staged_at"])),
                folder=folder,
            ))
        except FileNotFoundError:
            problem = "meta.json is missing"
        except UnsafePath as exc:
            problem = f"meta.json {exc.why}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problem = f"meta.json is unreadable: {exc}"
        else:
            continue
        log.warning("spool: %s: %s", folder, problem)
        if broken is not None:
            broken.append((name, problem))
    return entries


def entry_problem(folder: Path, serial: str, name: str | None = None) -> str | None:
    """Why the entry in `folder` must not be handed to a target, or None if it is sound.

    Its files are there and not empty, the certificate and the key parse and belong together,
    and the certificate is the one meta.json names. Deploy hooks run inside the entry's folder,
    so this is checked after they ran and again before any target gets the entry.
    """
    from .. import crypto  # cryptography: only when something is staged or applied

    data = {}
    for filename in ENTRY_FILES:
        try:
            data[filename] = safefs.read_bytes(folder / filename)
        except FileNotFoundError:
            return f"{filename} is missing"
        except UnsafePath as exc:
            return f"{filename} {exc.why}"
        except OSError as exc:
            return f"{filename} cannot be read: {exc.strerror or exc}"
        if not data[filename] and filename != "chain.pem":  # a self-signed CA has no chain
            return f"{filename} is empty"
    problem = crypto.set_problem(data, serial)
    if problem:
        return problem
    try:
        meta = _parse_meta(name or folder.name, data["meta.json"].decode())
    except (ValueError, UnicodeDecodeError) as exc:
        return f"meta.json is unreadable: {exc}"
    if meta["serial"] != serial:
        return f"meta.json says serial {meta['serial']}, not {serial}"
    return None
