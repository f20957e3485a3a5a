"""Pruning applied batches (issue 13): under the spool lock an old batch is only renamed into
<spool>/.trash/; a process of its own deletes it after the lock is released, and whatever a
crash leaves there is deleted by the next run, never read as a batch or a pending entry.

Real processes and real files: runs killed at a named point (CERTBATCH_FAULT, faults.py), the
deleting process held back by taking its flock on .trash/ from the test.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_spool import cert

import certbatch.spool.spool as spool_core
from certbatch.locks import SharedLock
from certbatch.spool import Spool

# The fault points of pruning (test_crash checks that every point is crash-tested somewhere):
# a run killed right after its rename into .trash/, a deleter killed before its second folder.
PRUNE_POINTS = [("prune.moved", 1), ("trash.deleting", 2)]
TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

# A run in a process of its own: stage certificate argv[3] and notify (no targets: the entries
# are marked applied as is), keeping argv[2] batches; or, without argv[3], only take the spool
# lock exclusively (as every run does first).
RUN = f"""import sys
from pathlib import Path
sys.path[:0] = [{str(TESTS)!r}, {str(SRC)!r}]
from test_spool import cert
from certbatch.spool import Spool
root = Path(sys.argv[1])
spool = Spool(root / "spool", root / "hooks", keep_applied=int(sys.argv[2]))
if len(sys.argv) > 3:
    assert spool.stage(cert(sys.argv[3])).ok
    spool.notify()
else:
    spool.forget("nobody")
"""


def run(root: Path, keep: int, name: str | None = None, fault: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CERTBATCH_FAULT"}
    if fault:
        env["CERTBATCH_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", RUN, str(root), str(keep),
                           *([name] if name else [])],
                          env=env, capture_output=True, text=True, timeout=60)


def spool_in(root: Path, keep: int) -> Spool:
    return Spool(root / "spool", root / "hooks", keep_applied=keep)


def trash(root: Path) -> list[str]:
    folder = root / "spool" / ".trash"
    return sorted(os.listdir(folder)) if folder.exists() else []


def wait_for_empty_trash(root: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while trash(root):
        assert time.monotonic() < deadline, f"still in .trash/: {trash(root)}"
        time.sleep(0.05)


@contextlib.contextmanager
def deleter_held(root: Path) -> Iterator[None]:
    """Hold the flock the deleting process takes on .trash/: it waits until the block ends."""
    folder = root / "spool" / ".trash"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_a_pruned_batch_leaves_applied_at_once_and_is_deleted_after_the_lock(
        tmp_path: Path) -> None:
    spool = spool_in(tmp_path, keep=2)
    ids = []
    with deleter_held(tmp_path):
        for name in ("a", "b", "c", "d"):
            assert spool.stage(cert(name)).ok
            ids.append(spool.notify().batch_id)
            assert spool.applied() == sorted(ids[-2:])  # at once, whatever the deleter does
            assert sorted(os.listdir(spool.applied_dir)) == sorted(ids[-2:])
        # Held back: the two pruned batches wait in the trash, whole, under another name.
        held = trash(tmp_path)
        assert [n.rsplit(".", 1)[0] for n in held] == sorted(ids[:2])
        assert sorted(os.listdir(spool.trash_dir / held[0])) == ["a", "batch.json"]
        assert spool.pending() == []
    wait_for_empty_trash(tmp_path)
    assert spool.applied() == sorted(ids[-2:])


@pytest.mark.slow
def test_the_deleting_process_holds_no_lock_of_the_run(tmp_path: Path) -> None:
    """The deleter is started while the run still runs: it must not inherit the spool lock's
    file descriptor (a flock stays held while any process has it open)."""
    for name in ("a", "b"):
        assert run(tmp_path, 1, name).returncode == 0
    wait_for_empty_trash(tmp_path)
    with deleter_held(tmp_path):
        r = run(tmp_path, 1, "c")  # prunes b's batch; its deleter waits for our flock
        assert r.returncode == 0, r.stderr
        assert len(trash(tmp_path)) == 1
        started = time.monotonic()
        r = run(tmp_path, 1)  # takes the spool lock exclusively
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - started < 15
        assert len(trash(tmp_path)) == 1  # both deleters still wait
    wait_for_empty_trash(tmp_path)


@pytest.mark.slow
def test_a_run_killed_between_rename_and_deletion_is_finished_by_the_next_run(
        tmp_path: Path) -> None:
    assert run(tmp_path, 1, "a").returncode == 0
    first = spool_in(tmp_path, 1).applied()
    r = run(tmp_path, 1, "b", fault="{}@{}".format(*PRUNE_POINTS[0]))  # right after the rename
    assert r.returncode == -9, r.stderr
    spool = spool_in(tmp_path, 1)
    (left,) = trash(tmp_path)
    assert left.startswith(first[0] + ".")
    assert (spool.trash_dir / left / "a" / "privkey.pem").exists()  # nothing deleted yet
    assert first[0] not in spool.applied() and len(spool.applied()) == 1
    assert spool.pending() == []
    time.sleep(0.5)
    assert trash(tmp_path) == [left]  # no deleter was started
    assert run(tmp_path, 1).returncode == 0  # the next run: no prune of its own
    # deleted by that run itself, after its lock: a deleter that did not finish may have been
    # killed by a service manager, which would kill the next one too
    assert trash(tmp_path) == []


@pytest.mark.slow
def test_what_a_killed_deleter_left_is_never_a_batch_or_an_entry(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        assert run(tmp_path, 3, name).returncode == 0
    with deleter_held(tmp_path):
        # Prunes a, b and c's batches; its deleter (which inherits the fault) dies before the
        # second of them, once let go.
        r = run(tmp_path, 1, "d", fault="{}@{}".format(*PRUNE_POINTS[1]))
        assert r.returncode == 0, r.stderr
        assert len(trash(tmp_path)) == 3
    deadline = time.monotonic() + 30
    while len(trash(tmp_path)) > 2 or not deleter_gone(tmp_path):
        assert time.monotonic() < deadline, trash(tmp_path)
        time.sleep(0.05)
    left = trash(tmp_path)
    assert len(left) == 2
    spool = spool_in(tmp_path, 1)
    os.unlink(spool.trash_dir / left[0] / next(  # and one half deleted, as by a kill in there
        n for n in os.listdir(spool.trash_dir / left[0]) if n != "batch.json") / "privkey.pem")
    (kept,) = spool.applied()
    assert sorted(os.listdir(spool.applied_dir)) == [kept]
    assert spool.pending() == []
    assert spool.applied_copies("a") == spool.applied_copies("b") == []
    assert spool.notify().batch_id is None  # nothing pending; the next run's deleter starts
    wait_for_empty_trash(tmp_path)
    assert spool.applied() == [kept]


def deleter_gone(root: Path) -> bool:
    fd = os.open(root / "spool" / ".trash", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_remove_deletes_the_copies_waiting_in_the_trash(tmp_path: Path) -> None:
    spool = spool_in(tmp_path, 1)
    with deleter_held(tmp_path):
        for names in (("gone", "stays"), ("other",)):
            for name in names:
                assert spool.stage(cert(name)).ok
            spool.notify()
        (pruned,) = trash(tmp_path)
        assert sorted(os.listdir(spool.trash_dir / pruned)) == ["batch.json", "gone", "stays"]
        spool.retire("gone")  # the deleter may have been killed: not left to it
        assert sorted(os.listdir(spool.trash_dir / pruned)) == ["batch.json", "stays"]
    wait_for_empty_trash(tmp_path)


def test_the_trash_is_deleted_without_following_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    spool = spool_in(tmp_path, 1)
    with deleter_held(tmp_path):
        for name in ("a", "b"):
            assert spool.stage(cert(name)).ok
            spool.notify()
        (pruned,) = trash(tmp_path)
        os.symlink(outside, spool.trash_dir / pruned / "a" / "link")
        os.symlink(outside / "precious", spool.trash_dir / pruned / "a" / "file-link")
        os.symlink(outside, spool.trash_dir / "20260101T000000000000Z-abcdef.123456")
    wait_for_empty_trash(tmp_path)
    assert (outside / "precious").read_text() == "keep me"


def test_where_no_process_can_be_started_the_run_deletes_after_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = spool_in(tmp_path, 1)
    monkeypatch.setattr(spool_core.sys, "executable", str(tmp_path / "no-python"))
    free_while_deleting = []
    real = spool_core.empty_trash

    def deleting(*args: object, **kwargs: object) -> None:
        other = SharedLock(spool.lock.path)  # another open file: a flock of its own
        free_while_deleting.append(other.acquire(timeout=0))
        other.release()
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(spool_core, "empty_trash", deleting)
    for name in ("a", "b"):
        assert spool.stage(cert(name)).ok
        spool.notify()
    assert trash(tmp_path) == []  # deleted before notify returned
    assert free_while_deleting == [True]  # after the spool lock was released
    assert oct(spool.trash_dir.stat().st_mode & 0o777) == "0o700"
    assert len(spool.applied()) == 1


def test_a_prune_that_fails_never_fails_the_notify_phase(tmp_path: Path) -> None:
    # Housekeeping after every target has applied: the batch stays in applied/ instead
    spool = spool_in(tmp_path, 1)
    spool.root.mkdir(parents=True)
    (spool.root / ".trash").write_text("not a folder")
    for name in ("a", "b"):
        assert spool.stage(cert(name)).ok
        outcome = spool.notify()
        assert outcome.ok and outcome.applied == [name]
    assert len(spool.applied()) == 2  # kept for the next prune


def test_remove_never_deletes_through_a_linked_trash(tmp_path: Path) -> None:
    spool = spool_in(tmp_path, 1)
    assert spool.stage(cert("victim")).ok
    spool.notify()
    elsewhere = tmp_path / "elsewhere" / "somebatch" / "victim"
    elsewhere.mkdir(parents=True)
    (elsewhere / "keep").write_text("x")
    (spool.root / ".trash").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="symlink"):
        spool.retire("victim")
    assert (elsewhere / "keep").exists()
