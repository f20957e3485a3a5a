"""The state folder's index (index.py): a cache of meta.json and status.json that a run reads
instead of two files per certificate, and that is never trusted over those files."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat

import pytest
from test_cli import restore_certbatch_logger  # noqa: F401 - a fixture
from test_store import save

from certbatch.store import CertStatus, Store

UTC = dt.timezone.utc
T = dt.datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def reopened(store: Store) -> Store:
    """A new Store on the same folder (a new run), after the old one saved its index."""
    store.index.save()
    return Store(store.root)


def test_a_run_reads_the_index_instead_of_the_files(tmp_path, monkeypatch):
    store = Store(tmp_path / "state")
    save(store, "0a")
    store.save_status("site", CertStatus(last_result="renewed", failed_orders=2))
    store = reopened(store)
    index = tmp_path / "state" / "index.json"
    assert stat.S_IMODE(index.stat().st_mode) == 0o600
    # a new run opens no meta.json and no status.json: both come from the index
    opened: list[str] = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    current = store.current("site")
    status = store.status("site")
    monkeypatch.undo()
    assert current is not None and current.serial == "0a" and not current.damaged
    assert status.failed_orders == 2
    assert not [p for p in opened if p.endswith(("meta.json", "status.json"))], opened


def test_the_files_win_over_a_stale_index(tmp_path):
    store = Store(tmp_path / "state")
    save(store, "0a")
    store.save_status("site", CertStatus(last_result="renewed"))
    store.current("site")
    store.index.save()
    # another process writes a new status and a new version (the index is not told)
    other = Store(tmp_path / "state")
    other.index.save = lambda keep=None: None  # type: ignore[method-assign]
    save(other, "0b", domains=("b.example",))
    other.save_status("site", CertStatus(last_result="failed", last_error="boom"))
    fresh = Store(tmp_path / "state")
    current = fresh.current("site")
    assert current is not None and current.serial == "0b" and current.domains == ("b.example",)
    assert fresh.status("site").last_error == "boom"
    # a status.json edited by hand (same inode: written in place) is read again too
    path = tmp_path / "state/certs/site/status.json"
    data = json.loads(path.read_text())
    data["failed_orders"] = 7
    with open(path, "r+") as fh:  # noqa: PTH123
        fh.write(json.dumps(data))
        fh.truncate()
    os.utime(path, ns=(1, 1))  # even with an old time: the size differs
    assert Store(tmp_path / "state").status("site").failed_orders == 7


def test_a_damaged_index_is_ignored_and_rebuilt(tmp_path):
    store = Store(tmp_path / "state")
    save(store, "0a")
    index = tmp_path / "state" / "index.json"
    for junk in ("{not json", '{"format": 99, "certs": {}}', '[]',
                 '{"format": 1, "certs": {"site": {"live": 5, "meta": "x", "stamp": 3}}}'):
        index.write_text(junk)
        fresh = Store(tmp_path / "state")
        current = fresh.current("site")
        assert current is not None and current.serial == "0a"
        assert fresh.status("site") == CertStatus()
        fresh.index.save()
        assert json.loads(index.read_text())["format"] == 1  # rebuilt


def test_entries_of_removed_certificates_are_dropped(tmp_path):
    store = Store(tmp_path / "state")
    save(store, "0a")
    store.current("site")
    store.save_status("old", CertStatus(last_result="renewed"))
    store.index.save(keep=["site"])
    certs = json.loads((tmp_path / "state" / "index.json").read_text())["certs"]
    assert sorted(certs) == ["site"]


@pytest.mark.usefixtures("restore_certbatch_logger")
def test_check_reads_the_index_once(tmp_path, monkeypatch):
    """check looks at every certificate's live files through one Store: one index read, not
    one per certificate (10,000 certificates would read a 10 MB file 20,000 times)."""
    from certbatch import index
    from certbatch.cli import cli

    store = Store(tmp_path / "state")
    save(store, "0a")
    store.index.save()
    cfg = tmp_path / "certbatch.yaml"
    names = ["site"] + [f"n{i}" for i in range(5)]
    cfg.write_text("acme: {directory: https://ca.example/dir}\n"
                   "paths: {state: ./state, spool: ./spool, hooks: ./hooks}\n"
                   "defaults: {challenge: {type: http-01, standalone: {}}}\n"
                   "certificates:\n" + "".join(f"  {n}: {{domains: [{n}.example]}}\n"
                                               for n in names))
    loads = []
    real = index.Index._load
    monkeypatch.setattr(index.Index, "_load", lambda self: loads.append(1) or real(self))
    with pytest.raises(SystemExit):
        cli.main(["check", "-q", "-c", str(cfg)])
    assert len(loads) == 1
