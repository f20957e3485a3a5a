"""One file that caches every certificate's meta.json and status.json: <state>/index.json.

A run with nothing due reads two small files per certificate; at 10,000 certificates the
opening, reading and parsing is most of its time. The index lets it read one file instead.
It is a cache, never trusted over the files it copies:

  * a meta.json entry is used only while the certificate's `live` link names the same version
    and that meta.json has the same inode, size and modification time;
  * a status.json entry only while status.json has the same inode, size and modification
    time (every write replaces the file: a new inode; an edit in place changes the time).

Anything else (no index, an unreadable one, a stale entry) falls back to the files and
refreshes the entry. The run that holds the run lock writes it back once, at its end,
atomically and without fsync: a lost index costs one slower run, nothing else. (CacheFile,
that part, also keeps digest.py's file.)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import safefs

log = logging.getLogger("certbatch.index")

FILE = "index.json"
FORMAT = 1

Stamp = tuple[int, int, int]  # st_ino, st_size, st_mtime_ns


def stamp(st: os.stat_result) -> Stamp:
    return st.st_ino, st.st_size, st.st_mtime_ns


class CacheFile:
    """A JSON file of per-certificate entries in the state folder, kept as a cache: read on
    first use (anything wrong with it: start empty, and write it anew), written back at most
    once a run, atomically and without fsync. `header()` is stored beside the entries and
    must match on reading, else every entry is dropped."""

    FILE = ""
    FORMAT = 0
    FALLBACK = ""  # what a run does without it (for the log line)

    def __init__(self, root: Path) -> None:
        self.path = root / self.FILE
        self._entries: dict[str, Any] | None = None
        self.dirty = False

    def header(self) -> dict[str, Any]:
        return {}

    @property
    def loaded(self) -> bool:
        """Whether anything read or changed the entries yet (a run whose certificates all came
        from the digest never reads the index: it need not read it just to save it)."""
        return self._entries is not None or self.dirty

    def _all(self) -> dict[str, Any]:
        if self._entries is None:
            self._entries = self._load()
        return self._entries

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(safefs.read_bytes(self.path))
            if data.get("format") != self.FORMAT or not isinstance(data.get("certs"), dict):
                raise ValueError(f"not a {self.FILE} of this format")
            if any(data.get(key) != value for key, value in self.header().items()):
                self.dirty = True  # made for other settings: every entry is looked at anew
                return {}
            certs: dict[str, Any] = data["certs"]
            return certs
        except FileNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001 - a cache: anything wrong means "rebuild"
            log.info("ignoring %s (%s): %s", self.path, exc, self.FALLBACK)
            self.dirty = True
            return {}

    def save(self, keep: Iterable[str] | None = None) -> None:
        """Write the file if it changed (call it under the run lock). `keep`: the names to
        keep entries for (the configured certificates); others are dropped."""
        from .fsutil import atomic_write

        entries = self._all()
        if keep is not None:
            wanted = set(keep)
            for name in [n for n in entries if n not in wanted]:
                del entries[name]
                self.dirty = True
        if not self.dirty:
            return
        data = {"format": self.FORMAT, **self.header(), "certs": entries}
        try:
            atomic_write(self.path, json.dumps(data, separators=(",", ":")), 0o600,
                         durable=False)
            self.dirty = False
        except OSError as exc:  # a cache: the run's work is done and stored without it
            log.warning("could not write %s: %s", self.path, exc)


class Index(CacheFile):
    """The cache of one state folder's meta.json and status.json files; thread-safe enough
    for the runner (entries are replaced whole, by one thread per certificate)."""

    FILE = FILE
    FORMAT = FORMAT
    FALLBACK = "reading the certificates' own files"

    def meta(self, name: str, version: str, st: os.stat_result) -> dict[str, Any] | None:
        """The cached meta.json of `name` if it is about `version` (the `live` link's text)
        and still the file `st` describes."""
        entry = self._all().get(name)
        if entry is None or entry.get("live") != version \
                or entry.get("meta_stamp") != list(stamp(st)):
            return None
        meta = entry.get("meta")
        return meta if isinstance(meta, dict) else None

    def put_meta(self, name: str, version: str, st: os.stat_result | None,
                 meta: dict[str, Any]) -> None:
        entry = dict(self._all().get(name) or {})
        entry.update(live=version, meta=meta, meta_stamp=list(stamp(st)) if st else None)
        self._all()[name] = entry
        self.dirty = True

    def status(self, name: str, st: os.stat_result) -> dict[str, Any] | None:
        """The cached status.json of `name` if the file is still the one cached."""
        entry = self._all().get(name)
        if entry is None or entry.get("stamp") != list(stamp(st)):
            return None
        data = entry.get("status")
        return data if isinstance(data, dict) else None

    def put_status(self, name: str, st: os.stat_result | None, data: dict[str, Any]) -> None:
        entry = dict(self._all().get(name) or {})
        entry.update(stamp=list(stamp(st)) if st else None, status=data)
        self._all()[name] = entry
        self.dirty = True
