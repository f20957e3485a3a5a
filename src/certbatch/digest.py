"""What the last full look at each certificate concluded: <state>/digest.json.

A run with nothing due spends most of its time looking at certificates that nothing happened
to. For each certificate found quiet (not due, nor rate-limited or held back after failed
orders, with no renewal info to ask for), the run records:

  * the decision and what it was made from: the configured names, key type and profile
    (`fingerprint`), and the renewal settings (for the whole file);
  * the inode and change time (ctime) of the certificate's folder, which changes whenever
    `live` or status.json is replaced (every certbatch write renames), and of status.json,
    which an edit in place (a script's `>`) changes too. A chmod or chown changes the ctime,
    so the ownership checks made by the full look still hold;
  * `quiet_until`: the first time the decision could change (renewal.quiet_until), or the
    next full look, whichever comes first. Full looks come back about daily (20 to 28 hours,
    spread), so what the stamps cannot see is found within a day: anything inside a version
    folder (which certbatch writes once and never changes: a PEM file edited in place,
    removed or renamed by hand), the `versions/` folder's owner changed.

The next run takes the recorded decision with two lstats when all of it still holds, and
looks in full otherwise. (A third, of the live version's folder, cost 6 % of a run with
nothing due over 10,000 certificates, to see hand edits that can wait a day: a quiet run reads
no file of the version.) A stamp taken less than RACY_NS after its file changed is not
recorded: file systems keep coarse times (a clock tick, or a second), and a change in the same
tick would leave the same ctime. The file is a cache like index.json: never trusted over what
it describes, written once at the end of a run, atomically and without fsync.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CertificateSettings
from .index import CacheFile
from .renewal import Decision
from .store import CertStatus, StoredCert

FILE = "digest.json"
FORMAT = 4
RACY_NS = 2_000_000_000  # see the module docstring
LOOK_AGAIN = (20 * 3600, 28 * 3600)  # seconds: the next full look, spread over 8 hours

# The fields of one entry (a JSON list, the most compact form json reads: 10,000 in 0.06 s).
_FP, _MARKS, _UNTIL, _ACTION, _REASON, _DUE_AT, _BASIS, _SERIAL, _NOT_AFTER, \
    _LAST_SUCCESS = range(10)


def fingerprint(cert: CertificateSettings) -> str:
    """What renewal.decide reads from a certificate's settings."""
    return "\x1f".join((*cert.domains, "", cert.key, cert.profile or ""))


@dataclass(frozen=True)
class Stamps:
    """Taken before a full look at one certificate."""

    # inode and ctime (ns) of the certificate's folder and of its status.json
    marks: list[int]
    taken: int  # time.time_ns() when taken


def _marks(folder: str) -> list[int]:
    a = os.lstat(folder)
    b = os.lstat(f"{folder}/status.json")
    return [a.st_ino, a.st_ctime_ns, b.st_ino, b.st_ctime_ns]


_iso = dt.datetime.fromisoformat


class Digest(CacheFile):
    """The digest of one state folder, for one set of renewal settings."""

    FILE = FILE
    FORMAT = FORMAT
    FALLBACK = "looking at every certificate"

    def __init__(self, root: Path, before_expiry: dt.timedelta | None, use_ari: bool) -> None:
        super().__init__(root)
        self._certs_dir = os.path.join(root, "certs")
        self._settings = [before_expiry.total_seconds() if before_expiry else None, use_ari]

    def header(self) -> dict[str, Any]:
        return {"settings": self._settings}

    def lookup(self, cert: CertificateSettings, now: float
               ) -> tuple[Decision, str, dt.datetime, dt.datetime | None] | None:
        """The recorded (decision, serial, not_after, last_success) for `cert` if it still
        holds at `now` (epoch seconds). Runs for every certificate of every run: kept lean."""
        entries = self._entries if self._entries is not None else self._all()
        e = entries.get(cert.name)
        if e is None:
            return None
        try:
            if now >= e[_UNTIL] or e[_FP] != fingerprint(cert):
                return None
            if _marks(f"{self._certs_dir}/{cert.name}") != e[_MARKS]:
                return None
            due_at, last_success = e[_DUE_AT], e[_LAST_SUCCESS]
            return (Decision(e[_ACTION], e[_REASON], due_at and _iso(due_at), e[_BASIS]),
                    e[_SERIAL], _iso(e[_NOT_AFTER]), last_success and _iso(last_success))
        except (OSError, TypeError, ValueError, IndexError):
            return None  # gone, or an entry not of this format: a full look

    def stamps(self, name: str) -> Stamps | None:
        """Stamp `name`'s folder and status before a full look (None: no status, nothing to
        record)."""
        try:
            taken = time.time_ns()
            return Stamps(_marks(f"{self._certs_dir}/{name}"), taken)
        except OSError:
            return None

    def record(self, cert: CertificateSettings, stamps: Stamps | None, decision: Decision,
               stored: StoredCert, status: CertStatus,
               quiet_until: dt.datetime | None) -> None:
        """Record a quiet decision made from what `stamps` describe (or forget the entry when
        there is nothing that can be recorded)."""
        if stamps is None or quiet_until is None \
                or max(stamps.marks[1::2]) > stamps.taken - RACY_NS:
            self.drop(cert.name)
            return
        until = min(quiet_until.timestamp(),
                    stamps.taken / 1e9 + random.uniform(*LOOK_AGAIN))
        self._all()[cert.name] = [
            fingerprint(cert), stamps.marks, until, decision.action,
            decision.reason,
            decision.due_at.isoformat() if decision.due_at else None, decision.basis,
            stored.serial, stored.not_after.isoformat(),
            status.last_success.isoformat() if status.last_success else None]
        self.dirty = True

    def drop(self, name: str) -> None:
        if self._all().pop(name, None) is not None:
            self.dirty = True
