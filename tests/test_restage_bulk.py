"""`run-hook --target NAME --all` stages every live certificate in bulk (spool/bulk.py): every
entry written, then made durable at once, then published. Real `certbatch` processes, real
hooks; no CA: the certificates are stored here (test_parallel_staging.store_certificates).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run
from test_parallel_staging import hook, most_at_once, q, store_certificates, write_tree

from certbatch.spool.entries import entry_problem

# Every fault point of the bulk path, and the visits tested (per-entry points twice).
BULK_POINTS = [("bulk.prepared", 1), ("bulk.prepared", 3), ("bulk.synced", 1),
               ("bulk.committed", 1), ("bulk.committed", 3), ("bulk.published", 1)]
PEM = ("privkey.pem", "cert.pem", "chain.pem", "fullchain.pem")

# A target that copies what it is handed into <tree>/got/<name>/ (the names file, then the
# files of each entry: the bytes a real target would install) and logs its names.
TARGET = f"""#!{sys.executable} -IS
import os, shutil, sys
spool = os.environ["CERTBATCH_SPOOL_DIR"]
got = os.path.join(os.path.dirname(spool), "got")
with open(os.environ["CERTBATCH_NAMES_FILE"]) as fh:
    names = fh.read().split()
for name in names:
    dest = os.path.join(got, name)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(os.path.join(spool, "pending", name), dest)
with open(os.path.join(os.path.dirname(spool), "target.log"), "a") as fh:
    fh.write(" ".join(names) + " | " + os.environ.get("CERTBATCH_FAILED_NAMES", "") + "\\n")
"""


def make_tree(tmp_path: Path, names: list[str], **sections: Any) -> Path:
    store_certificates(tmp_path / "state", names)
    cfg = write_tree(tmp_path, names, **sections)
    target = tmp_path / "hooks/notify.d/new"
    target.write_text(TARGET)
    target.chmod(0o755)
    return cfg


def live(tmp_path: Path, name: str) -> Path:
    return (tmp_path / "state/certs" / name / "live").resolve()


def target_runs(tmp_path: Path) -> list[tuple[list[str], list[str]]]:
    """Each run of the target: (names handed, CERTBATCH_FAILED_NAMES)."""
    log = tmp_path / "target.log"
    runs = []
    for line in log.read_text().splitlines() if log.exists() else []:
        names, failed = line.split("|")
        runs.append((names.split(), failed.split()))
    return runs


def assert_entry_is_the_stored_set(entry: Path, stored: Path, linked: bool = True) -> None:
    """The entry holds the stored files' bytes and modes; public files linked, the key not."""
    for f in PEM:
        assert (entry / f).read_bytes() == (stored / f).read_bytes(), f
        assert os.stat(entry / f).st_mode & 0o777 == (0o600 if f == "privkey.pem" else 0o644)
        same = os.stat(entry / f).st_ino == os.stat(stored / f).st_ino
        assert same is (linked and f != "privkey.pem"), f
    meta = json.loads((entry / "meta.json").read_text())
    stored_meta = json.loads((stored / "meta.json").read_text())
    assert {k: meta[k] for k in ("name", "domains", "serial", "not_before", "not_after")} == \
        {k: stored_meta[k] for k in ("name", "domains", "serial", "not_before", "not_after")}
    assert entry_problem(entry, meta["serial"], meta["name"]) is None


def staging_left(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "spool/.staging"))


def test_every_live_certificate_is_handed_over_with_the_stored_bytes(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(6)]
    cfg = make_tree(tmp_path, names)
    assert run(["run-hook", "--deploy", "c0"], cfg).returncode == 0  # c0 is pending already
    pending_c0 = os.stat(tmp_path / "spool/pending/c0").st_ino

    result = run(["run-hook", "--target", "new", "--all"], cfg)

    assert result.returncode == 0, result.stderr
    assert target_runs(tmp_path) == [(names, [])]
    for name in names:
        assert_entry_is_the_stored_set(tmp_path / "got" / name, live(tmp_path, name),
                                       linked=False)  # copied by the target
    (batch,) = os.listdir(tmp_path / "spool/applied")
    for name in names[1:]:  # what the bulk staging made, as applied
        assert_entry_is_the_stored_set(tmp_path / "spool/applied" / batch / name,
                                       live(tmp_path, name))
    assert os.stat(tmp_path / "spool/applied" / batch / "c0").st_ino == pending_c0  # kept
    assert staging_left(tmp_path) == [] and os.listdir(tmp_path / "spool/pending") == []
    ledger = json.loads((tmp_path / "spool/targets/new/ledger.json").read_text())
    assert sorted(ledger["applied"]) == names
    statuses = [(tmp_path / f"state/certs/{n}/status.json").read_bytes() for n in names]

    again = run(["run-hook", "--target", "new", "--all"], cfg)
    assert again.returncode == 0, again.stderr
    assert target_runs(tmp_path)[1] == (names, [])
    # Only a failure is recorded in a status: 10,000 status files cost more than the staging.
    assert [(tmp_path / f"state/certs/{n}/status.json").read_bytes() for n in names] == statuses


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_the_fsyncs_do_not_grow_with_the_number_of_certificates(tmp_path: Path) -> None:
    """One syncfs for the whole batch (Linux 5.8+), not 4 fsyncs per certificate."""
    counts = []
    for n in (3, 12):
        tree = tmp_path / str(n)
        tree.mkdir()
        cfg = make_tree(tree, [f"c{i}" for i in range(n)])
        trace = tree / "strace.txt"
        env = {k: v for k, v in os.environ.items() if k != "CERTBATCH_CONFIG"}
        done = subprocess.run(["strace", "-f", "--seccomp-bpf", "-o", str(trace), "-e",
                               "trace=fsync,fdatasync,syncfs,sync", sys.executable, "-m",
                               "certbatch", "-c", str(cfg), "run-hook", "--target", "new",
                               "--all"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        # A call another thread's output cut in two ends as "<... syncfs resumed>) = 0".
        calls = [line for line in trace.read_text().splitlines()
                 if re.search(r"\b(f?sync|fdatasync|syncfs)\b", line)
                 and line.rstrip().endswith("= 0")]
        counts.append(len(calls))
        assert sum("syncfs" in line for line in calls) == 1, calls
        assert len(target_runs(tree)[0][0]) == n
    assert counts[0] == counts[1], counts


def test_deploy_hooks_still_run_per_certificate_up_to_deploy_workers(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(6)]
    cfg = make_tree(tmp_path, names, hooks={"deploy_workers": 2})
    probe = tmp_path / "probe"
    probe.mkdir()
    hook(tmp_path / "hooks/deploy.d/10-combined", f"""
date +%s.%N > {q(probe)}/"$CERTBATCH_NAME.start"
test "$PWD" = "$CERTBATCH_STAGE_DIR"
cat privkey.pem fullchain.pem > combined.pem
sleep 0.5
date +%s.%N > {q(probe)}/"$CERTBATCH_NAME.end"
if [ "$CERTBATCH_NAME" = c3 ]; then echo "c3 refused" >&2; exit 1; fi
""")

    result = run(["run-hook", "--target", "new", "--all"], cfg)

    assert result.returncode == 1
    assert "c3: stored, not staged: hook 10-combined exited with status 1: c3 refused" in \
        result.stderr, result.stderr
    spans = [(float((probe / f"{n}.start").read_text()), float((probe / f"{n}.end").read_text()))
             for n in names]
    assert most_at_once(spans) == 2, spans  # in parallel, and never more than deploy_workers
    ok = [n for n in names if n != "c3"]
    assert target_runs(tmp_path) == [(ok, ["c3"])]
    (batch,) = os.listdir(tmp_path / "spool/applied")
    for name in ok:
        entry = tmp_path / "spool/applied" / batch / name
        stored = live(tmp_path, name)
        assert (entry / "combined.pem").read_bytes() == \
            (stored / "privkey.pem").read_bytes() + (stored / "fullchain.pem").read_bytes()
        assert_entry_is_the_stored_set(entry, stored)  # the hook left them: links again
    assert staging_left(tmp_path) == []
    status = json.loads((tmp_path / "state/certs/c3/status.json").read_text())
    assert status["last_result"] == "not-staged" and status["staged_version"] is None


def test_sigterm_during_the_deploy_hooks_stops_cleanly(tmp_path: Path) -> None:
    """Hooks in flight are stopped, the rest never start, nothing is left half staged, and
    each certificate's status says so (the next renew stages it)."""
    names = [f"c{i}" for i in range(6)]
    cfg = make_tree(tmp_path, names, hooks={"deploy_workers": 2})
    probe = tmp_path / "probe"
    probe.mkdir()
    hook(tmp_path / "hooks/deploy.d/10-slow", f"""
touch {q(probe)}/"$CERTBATCH_NAME"
sleep 30
""")
    env = {k: v for k, v in os.environ.items() if k != "CERTBATCH_CONFIG"}
    proc = subprocess.Popen([sys.executable, "-m", "certbatch", "-c", str(cfg), "run-hook",
                             "--target", "new", "--all"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(os.listdir(probe)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "no hook started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()

    assert (proc.returncode, out, err) == (143, "", "certbatch: interrupted (SIGTERM)\n")
    assert target_runs(tmp_path) == []
    assert os.listdir(tmp_path / "spool/pending") == [] and staging_left(tmp_path) == []
    for name in names:
        status = json.loads((tmp_path / f"state/certs/{name}/status.json").read_text())
        assert status["last_result"] == "failed" and status["staged_version"] is None
        assert status["last_error"].startswith("interrupted: stored, not staged ("), status


def test_a_damaged_stored_certificate_fails_only_itself(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    cfg = make_tree(tmp_path, names)
    # b: the key garbled in place, same size (only parsing it shows); c: a file truncated.
    key = live(tmp_path, "b") / "privkey.pem"
    lines = key.read_bytes().split(b"\n")
    lines[2] = bytes(reversed(lines[2]))
    key.write_bytes(b"\n".join(lines))
    (live(tmp_path, "c") / "cert.pem").write_bytes(b"")

    result = run(["run-hook", "--target", "new", "--all"], cfg)

    assert result.returncode == 1
    assert "certbatch: b: stored, not staged: the private key does not parse" in result.stderr
    assert "certbatch: c: stored, not staged: the stored files are damaged (cert.pem is " \
           "empty)" in result.stderr, result.stderr
    assert target_runs(tmp_path) == [(["a", "d"], ["b", "c"])]
    for name in ("a", "d"):
        assert_entry_is_the_stored_set(tmp_path / "got" / name, live(tmp_path, name), False)
    assert staging_left(tmp_path) == [] and os.listdir(tmp_path / "spool/pending") == []
    for name in ("b", "c"):
        status = json.loads((tmp_path / f"state/certs/{name}/status.json").read_text())
        assert status["last_result"] == "not-staged" and status["staged_version"] is None


@pytest.mark.parametrize(("point", "nth"), BULK_POINTS, ids=[f"{p}@{n}" for p, n in BULK_POINTS])
def test_a_crash_mid_bulk_leaves_no_half_entry(tmp_path: Path, point: str, nth: int) -> None:
    names = [f"c{i}" for i in range(5)]
    cfg = make_tree(tmp_path, names)

    crashed = run(["run-hook", "--target", "new", "--all"], cfg,
                  env={"CERTBATCH_FAULT": f"{point}@{nth}"})

    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert target_runs(tmp_path) == []
    pending = sorted(os.listdir(tmp_path / "spool/pending"))
    for name in pending:  # whatever is pending is whole: the stored set, linked, synced
        assert_entry_is_the_stored_set(tmp_path / "spool/pending" / name, live(tmp_path, name))
    committed = {"bulk.prepared": 0, "bulk.synced": 0, "bulk.committed": nth,
                 "bulk.published": len(names)}[point]
    assert len(pending) == committed, pending
    assert all(n.endswith(".tmp") for n in staging_left(tmp_path))  # never pending: discarded

    healed = run(["run-hook", "--target", "new", "--all"], cfg)

    assert healed.returncode == 0, healed.stderr
    assert target_runs(tmp_path) == [(names, [])]
    for name in names:
        assert_entry_is_the_stored_set(tmp_path / "got" / name, live(tmp_path, name), False)
    assert staging_left(tmp_path) == [] and os.listdir(tmp_path / "spool/pending") == []


def test_without_syncfs_every_copied_file_and_folder_is_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where syncfs cannot be relied on: an fsync per file that is not a link, per folder."""
    from certbatch.spool import Spool, bulk

    names = ["a", "b", "c"]
    store = store_certificates(tmp_path / "state", names)
    spool = Spool(tmp_path / "spool", tmp_path / "hooks", store=store)
    spool.check()
    synced: list[str] = []
    real = bulk._fsync
    monkeypatch.setattr(bulk, "_syncfs", lambda folder: False)
    monkeypatch.setattr(bulk, "_fsync", lambda path: (synced.append(str(path)), real(path)))
    items = [bulk.BulkItem(n) for n in names]

    done, outcome = spool.restage_all("t", [], items, store.current, 4)

    assert [r.ok for r in done] == [True] * 3 and outcome is not None
    in_entries = [p.rsplit("/", 1)[-1] for p in synced if ".tmp/" in p]
    assert sorted(in_entries) == ["meta.json"] * 3 + ["privkey.pem"] * 3  # not the links
    assert sum(p.endswith(".tmp") for p in synced) == 3  # each entry's folder
    assert str(tmp_path / "spool/.staging") in synced
    (batch,) = os.listdir(tmp_path / "spool/applied")  # no targets: marked applied as is
    for name in names:
        assert_entry_is_the_stored_set(tmp_path / "spool/applied" / batch / name,
                                       live(tmp_path, name))


def test_a_spool_on_another_file_system_gets_copies(tmp_path: Path) -> None:
    """EXDEV: the stored files cannot be linked; each entry holds copies, checked all the
    same."""
    import tempfile

    from certbatch.spool import Spool, bulk

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (tmpfs at /dev/shm) here")
    store = store_certificates(tmp_path / "state", ["a", "b"])
    spool_dir = Path(tempfile.mkdtemp(dir=shm)) / "spool"
    try:
        spool = Spool(spool_dir, tmp_path / "hooks", store=store)
        spool.check()
        items = [bulk.BulkItem(n) for n in ("a", "b")]
        done, outcome = spool.restage_all("t", [], items, store.current, 4)
        assert [r.ok for r in done] == [True, True] and outcome is not None
        (batch,) = os.listdir(spool_dir / "applied")
        for name in ("a", "b"):
            entry = spool_dir / "applied" / batch / name
            assert_entry_is_the_stored_set(entry, live(tmp_path, name), linked=False)
            assert all(os.stat(entry / f).st_nlink == 1 for f in PEM)
    finally:
        shutil.rmtree(spool_dir.parent)


def test_meta_json_is_written_byte_for_byte_as_a_single_staging_writes_it() -> None:
    import datetime as dt

    from certbatch.spool.bulk import _meta_json
    from certbatch.store import StoredCert

    when = dt.datetime(2026, 11, 22, 10, 15, tzinfo=dt.timezone.utc)
    for domains in (("a.example", "*.b.example"), ("xn--bcher-kva.example",), ()):
        stored = StoredCert("a", "v1", Path("/nowhere"), domains, "ec-p256", "0a1b", when,
                            when + dt.timedelta(days=90), when)
        meta = {"version": 1, "name": "a", "domains": list(domains), "serial": "0a1b",
                "not_before": "2026-11-22T10:15:00Z", "not_after": "2027-02-20T10:15:00Z",
                "staged_at": "2026-11-22T11:00:00Z"}  # as Spool.stage builds it
        assert _meta_json(stored, "2026-11-22T11:00:00Z") == \
            (json.dumps(meta, indent=2) + "\n").encode()


def _helper_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: list[str],
                 die_after: int | None = None) -> tuple[Any, Any, Path]:
    """A spool whose bulk staging forks its helper process at once (one entry a chunk), this
    process taking only the first chunk (before the fork): the helper prepares every other
    entry (or dies by SIGKILL at the `die_after`th entry made), each recording its pid in
    `pids`."""
    from certbatch.spool import Spool, bulk

    store = store_certificates(tmp_path / "state", names)
    spool = Spool(tmp_path / "spool", tmp_path / "hooks", store=store)
    spool.check()
    pids = tmp_path / "pids"
    real = bulk._prepare_one
    parent = os.getpid()

    def prepare_one(*args: Any) -> Any:
        with open(pids, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        if die_after is not None and os.getpid() != parent and \
                len(pids.read_text().split()) > die_after:
            real(*args)  # a whole work folder, never reported
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    monkeypatch.setattr(bulk, "SPLIT_MIN", 1)
    monkeypatch.setattr(bulk, "CHUNK", 1)
    monkeypatch.setattr(bulk._Helper, "chunks", lambda self: iter(()))
    monkeypatch.setattr(bulk, "_prepare_one", prepare_one)
    return store, spool, pids


def test_the_helper_process_prepares_entries_and_reports_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With many certificates a forked helper prepares some of the entries: what it made is
    published as if made here, and a damaged certificate it found fails alone."""
    from certbatch.spool import bulk

    names = ["a", "b", "c", "d"]
    store, spool, pids = _helper_tree(tmp_path, monkeypatch, names)
    key = live(tmp_path, "b") / "privkey.pem"  # same size, does not parse
    lines = key.read_bytes().split(b"\n")
    lines[2] = bytes(reversed(lines[2]))
    key.write_bytes(b"\n".join(lines))
    items = [bulk.BulkItem(n) for n in names]

    done, outcome = spool.restage_all("t", [], items, store.current, 4)

    made_by = pids.read_text().split()
    assert made_by[0] == str(os.getpid()) and len(made_by) == 4  # a, before the fork
    assert str(os.getpid()) not in made_by[1:]  # the others made by the helper
    assert [(r.name, r.ok) for r in done] == [("a", True), ("b", False), ("c", True),
                                              ("d", True)]
    assert done[1].error is not None and "the private key does not parse" in done[1].error
    assert outcome is not None and staging_left(tmp_path) == []
    (batch,) = os.listdir(tmp_path / "spool/applied")  # no targets: marked applied as is
    assert sorted(os.listdir(tmp_path / "spool/applied" / batch)) == \
        ["a", "batch.json", "c", "d"]
    for name in ("a", "c", "d"):
        assert_entry_is_the_stored_set(tmp_path / "spool/applied" / batch / name,
                                       live(tmp_path, name))


def test_the_helper_process_reads_the_stored_sets_it_takes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper reads the store for the entries it takes, and reports what the results need
    of each stored set: one whose state cannot be read fails alone, one never issued has no
    result."""
    from certbatch.spool import bulk

    names = ["a", "b", "c"]
    store, spool, _ = _helper_tree(tmp_path, monkeypatch, names)
    (live(tmp_path, "b") / "meta.json").write_text("{")
    readers = tmp_path / "readers"

    def load(name: str) -> Any:
        with open(readers, "a") as fh:
            fh.write(f"{os.getpid()} {name}\n")
        return store.current(name)

    items = [bulk.BulkItem(n) for n in ("a", "b", "never", "c")]
    done, outcome = spool.restage_all("t", [], items, load, 4)

    reads = [line.split() for line in readers.read_text().splitlines()]
    assert reads[0] == [str(os.getpid()), "a"]  # the first chunk: here, before the fork
    assert sorted(n for _, n in reads[1:]) == ["b", "c", "never"]
    assert str(os.getpid()) not in {p for p, _ in reads[1:]}  # read by the helper
    assert [(r.name, r.ok, r.unreadable) for r in done] == \
        [("a", True, False), ("b", False, True), ("c", True, False)]
    assert done[1].error is not None and "unreadable certificate metadata" in done[1].error
    for result in (done[0], done[2]):
        stored = store.current(result.name)
        assert stored is not None and result.entry is not None
        assert (result.serial, result.domains, result.not_after) == \
            (stored.serial, stored.domains, stored.not_after)
    assert outcome is not None and staging_left(tmp_path) == []
    (batch,) = os.listdir(tmp_path / "spool/applied")
    assert sorted(os.listdir(tmp_path / "spool/applied" / batch)) == ["a", "batch.json", "c"]


def test_a_certificate_whose_state_cannot_be_read_fails_alone(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    cfg = make_tree(tmp_path, names)
    (live(tmp_path, "b") / "meta.json").write_text("{")

    result = run(["run-hook", "--target", "new", "--all"], cfg)

    assert result.returncode == 1
    assert "unreadable certificate metadata" in result.stderr, result.stderr
    assert target_runs(tmp_path) == [(["a", "c"], ["b"])]
    assert staging_left(tmp_path) == [] and os.listdir(tmp_path / "spool/pending") == []


def test_a_helper_process_that_dies_leaves_its_entries_to_this_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The helper is killed after two entries (the second folder whole, never reported):
    every entry it took is prepared here again, nothing it left behind is published or
    kept."""
    from certbatch.spool import bulk

    names = ["a", "b", "c", "d", "e"]
    store, spool, pids = _helper_tree(tmp_path, monkeypatch, names, die_after=2)
    items = [bulk.BulkItem(n) for n in names]

    done, outcome = spool.restage_all("t", [], items, store.current, 4)

    assert "the helper process failed" in caplog.text
    made_by = pids.read_text().split()
    me = str(os.getpid())
    assert made_by[0] == me and made_by[1] == made_by[2] != me  # a here; b and c: the helper
    assert made_by.count(me) == 5  # a, then b to e again
    assert all(r.ok for r in done) and outcome is not None
    assert staging_left(tmp_path) == []
    (batch,) = os.listdir(tmp_path / "spool/applied")
    for name in names:
        assert_entry_is_the_stored_set(tmp_path / "spool/applied" / batch / name,
                                       live(tmp_path, name))


def test_iso_writes_what_strftime_wrote() -> None:
    """store.iso formats without strftime (meta.json and batch files hold 2 dates an entry)."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from certbatch.store import iso

    plus2 = dt.timezone(dt.timedelta(hours=2))
    for when in (dt.datetime(2026, 11, 22, 10, 15, 9, 999999, tzinfo=dt.timezone.utc),
                 dt.datetime(2027, 1, 1, 1, 0, tzinfo=plus2),  # 2026 in UTC
                 dt.datetime(2026, 7, 1, 12, 0, tzinfo=ZoneInfo("Europe/Paris")),
                 dt.datetime(999, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc),
                 dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)):
        assert iso(when) == when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert iso(dt.datetime(2027, 1, 1, 1, 0, tzinfo=plus2)) == "2026-12-31T23:00:00Z"
    with pytest.raises(ValueError, match="naive"):
        iso(dt.datetime(2026, 1, 1))


# `certbatch run-hook --target new --all` with the helper forked at once (one entry a chunk),
# each prepare recording its process, the helper's slowed down: it is mid-batch when the
# command dies.
SPLIT_RUN = """
import os, sys, time
from certbatch import cli
from certbatch.spool import bulk
parent, real, pids = os.getpid(), bulk._prepare_one, sys.argv[1]
calls = []
def prepare_one(*args):
    with open(pids, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    if os.getpid() != parent:
        time.sleep(1)
    elif calls:  # after the first (made before the fork): once the helper has one too
        deadline = time.monotonic() + 20
        while len(set(open(pids).read().split())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    calls.append(1)
    return real(*args)
bulk.SPLIT_MIN, bulk.CHUNK, bulk._prepare_one = 1, 1, prepare_one
sys.argv = ["certbatch", "-c", sys.argv[2], "run-hook", "--target", "new", "--all"]
cli.main()
"""


def test_the_helper_process_dies_with_a_crashed_command(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(8)]
    cfg = make_tree(tmp_path, names)
    pids = tmp_path / "pids"
    env = {k: v for k, v in os.environ.items() if k != "CERTBATCH_CONFIG"}

    with open(tmp_path / "stderr", "w") as err:  # not a pipe: the helper would hold it open
        command = subprocess.Popen([sys.executable, "-c", SPLIT_RUN, str(pids), str(cfg)],
                                   env={**env, "CERTBATCH_FAULT": "bulk.prepared@3"},
                                   stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        command.wait(timeout=120)

    assert command.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()
    made_by = {int(p) for p in pids.read_text().split()}
    assert command.pid in made_by and len(made_by) == 2, made_by  # the command, its helper
    (pid,) = made_by - {command.pid}

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"

    deadline = time.monotonic() + 3  # its other entries would take 4 s or more
    while not gone():  # PR_SET_PDEATHSIG: killed with its parent, not left writing
        assert time.monotonic() < deadline, "the helper outlived the command"
        time.sleep(0.05)
    assert os.listdir(tmp_path / "spool/pending") == [] and target_runs(tmp_path) == []
    assert all(n.endswith(".tmp") for n in staging_left(tmp_path))

    healed = run(["run-hook", "--target", "new", "--all"], cfg)

    assert healed.returncode == 0, healed.stderr
    assert target_runs(tmp_path) == [(names, [])]
    assert staging_left(tmp_path) == [] and os.listdir(tmp_path / "spool/pending") == []
