"""The per-target ledger: which serial of each certificate a target has applied successfully.

One folder per target, ``<spool>/targets/<target>/``, holds its ``ledger.json`` (schema in
docs/ledger.schema.json) and, while the target runs or after it failed, the ``batch.json`` and
``names`` files it was handed. A pending entry is handed to every target whose ledger does not
have the entry's serial, and leaves ``pending/`` once every current target's ledger has it.

A ledger that cannot be read counts as empty: the target gets everything pending again, which
re-installs identical files (hooks must be idempotent) rather than skipping any.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import safefs
from ..errors import UnsafePath
from ..fsutil import atomic_write, ensure_dir
from ..store import iso, parse_iso
from .entries import PendingEntry
from .staging import remove

log = logging.getLogger("certbatch.spool")

LEDGER_VERSION = 1
OK = "ok"
FAILED = "failed"


def _ts(value: dt.datetime | None) -> str | None:
    return iso(value) if value else None


def _parse(value: object) -> dt.datetime | None:
    return parse_iso(value) if isinstance(value, str) and value else None


@dataclass
class Ledger:
    """One target's ledger; `applied` maps certificate name -> serial applied."""

    target: str
    applied: dict[str, str] = field(default_factory=dict)
    last_attempt: dt.datetime | None = None
    last_success: dt.datetime | None = None
    last_result: str | None = None  # OK | FAILED | None (never ran)
    last_error: str | None = None

    def waiting(self, entries: Iterable[PendingEntry]) -> list[PendingEntry]:
        """The entries this target has not applied yet."""
        return [e for e in entries if self.applied.get(e.name) != e.serial]

    def to_json(self) -> str:
        return json.dumps({
            "version": LEDGER_VERSION,
            "target": self.target,
            "last_attempt": _ts(self.last_attempt),
            "last_success": _ts(self.last_success),
            "last_result": self.last_result,
            "last_error": self.last_error,
            "applied": dict(sorted(self.applied.items())),
        }, indent=1) + "\n"

    @classmethod
    def from_json(cls, target: str, text: str) -> Ledger:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("applied"), dict):
            raise ValueError("not a ledger object")
        return cls(target=target,
                   applied={str(k): str(v) for k, v in data["applied"].items()},
                   last_attempt=_parse(data.get("last_attempt")),
                   last_success=_parse(data.get("last_success")),
                   last_result=data.get("last_result"),
                   last_error=data.get("last_error"))


class Ledgers:
    """The ``targets/`` folder of a spool."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "targets"

    def folder(self, target: str) -> Path:
        return self.dir / target

    def load(self, target: str) -> Ledger:
        path = self.folder(target) / "ledger.json"
        try:
            return Ledger.from_json(target, safefs.read_text(path))
        except FileNotFoundError:
            return Ledger(target)
        except (OSError, UnsafePath, ValueError, TypeError, AttributeError) as exc:
            log.warning("spool: %s is unreadable (%s): target %s gets everything pending again",
                        path, exc, target)
            return Ledger(target)

    def save(self, ledger: Ledger) -> None:
        folder = ensure_dir(self.folder(ledger.target), 0o700)
        atomic_write(folder / "ledger.json", ledger.to_json(), 0o600)

    def known(self) -> list[str]:
        """Targets that have a folder (current or removed)."""
        try:
            return sorted(e for e in os.listdir(self.dir) if not e.startswith("."))
        except FileNotFoundError:
            return []

    def drop_removed(self, current: Sequence[str]) -> list[str]:
        """Delete the folders of targets that are gone, so they hold nothing back; the names."""
        gone = [t for t in self.known() if t not in set(current)]
        for target in gone:
            log.warning("spool: target %s is gone (no notify.d file or config entry): its "
                        "ledger is removed and it no longer holds entries back", target)
            remove(self.folder(target))
        return gone

    def forget(self, target: str | None = None, name: str | None = None) -> None:
        """Forget what was applied: everything of `target`, or `name` in every ledger (so it is
        applied again), or both."""
        for t in [target] if target else self.known():
            ledger = self.load(t)
            if name is None:
                ledger.applied.clear()
            elif ledger.applied.pop(name, None) is None:
                continue
            self.save(ledger)
