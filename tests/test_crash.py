"""Crash injection: SIGKILL `certbatch renew` at every fault point, then heal with one more run.

certbatch's fault points (src/certbatch/faults.py) sit between the fsync, rename and unlink
steps of storing a certificate, committing a staging and applying a batch. Each test runs the
real command with CERTBATCH_FAULT=<point>@<N> in one of two situations:

- first: a fresh tree (no account, no certificate, no ledger): a first issuance;
- renewal: `renew --force` on a copy of a prepared tree after a successful first run: an old
  live version of each certificate, an applied entry (b), an old pending entry (a, staged again
  by `run-hook --deploy` and applied by t1 alone: replacing a pending entry is exercised too,
  with one ledger that has it and one that does not), both ledgers.

The run must die by SIGKILL where the point is reached; a point a situation never reaches is
listed in UNREACHED with the reason: that run must exit 0 instead, the checks below must hold
all the same, and the test then reports itself skipped with the reason. Then one plain
`certbatch renew` heals and must exit 0. After it: every live certificate is complete and
sound; both targets have applied, last, exactly the live serial (and cert.pem) of every
certificate, and their ledgers say so; nothing is pending; no temp file, work folder or
handed-over batch is left; a third run exits 0, prints nothing and applies nothing. No run may
exit 75 (a lock left blocking).

A crash after the CA issued a certificate but before `live` was switched to it
(store.version-written, store.version-renamed, symlink.created, an atomic write inside the
issuance) legitimately costs a second ACME order in the first situation: the healing run issues
again. In the renewal situation the old certificate is still live and staged, so the healing run
(no --force) keeps it and the new one is dropped; the same goes for a certificate that was still
at the CA when the other one hit the point. That is not a loss: the live certificate is intact
and applied. What must never happen is a lost or broken live certificate, a target missing the
live serial, or leftovers.

Speed: every scenario is three real runs. The two situations use different domains (a
challtestsrv `remove` clears every value of a name), so they run side by side in two lanes,
each lane one scenario at a time (scenarios of one situation share domains); each test waits
for its own scenario. Scenarios are submitted for the selected tests only. Under pytest-xdist
with --dist loadfile (scripts/test.sh) or loadscope, one worker gets every test of this module
and runs them so; under a distribution that spreads them (--dist load, worksteal) a worker runs
each test's scenario when the test comes, one at a time (conftest.py tells the workers the
distribution).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run, write_config
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certbatch.store import Store

NAMES = ("a", "b")
TARGETS = ("t1", "t2")
SITUATIONS = ("first", "renewal")
RUN_TIMEOUT = 90

# Every fault point (grep 'point("' src/certbatch), at visit 1 and 2: each one sits in a loop
# (two certificates stored and staged, two targets, two entries moved, many atomic writes),
# except apply.moved, once per notify phase. Visit 5 of the atomic writes falls in the notify
# phase (a target's batch.json, names or ledger) in both situations.
POINTS = [
    ("atomic-write.synced", 1), ("atomic-write.synced", 2), ("atomic-write.synced", 5),
    ("atomic-write.renamed", 1), ("atomic-write.renamed", 2), ("atomic-write.renamed", 5),
    ("symlink.created", 1), ("symlink.created", 2),
    ("symlink.switched", 1), ("symlink.switched", 2),
    ("store.version-written", 1), ("store.version-written", 2),
    ("store.version-renamed", 1), ("store.version-renamed", 2),
    ("store.live-switched", 1), ("store.live-switched", 2),
    ("staging.linked", 1), ("staging.linked", 2),
    ("staging.hooks-done", 1), ("staging.hooks-done", 2),
    ("staging.ready", 1), ("staging.ready", 2),
    ("staging.old-aside", 1), ("staging.old-aside", 2),
    ("staging.committed", 1), ("staging.committed", 2),
    ("staging.old-removed", 1), ("staging.old-removed", 2),
    ("apply.target-starting", 1), ("apply.target-starting", 2),
    ("apply.target-ran", 1), ("apply.target-ran", 2),
    ("apply.ledger-saved", 1), ("apply.ledger-saved", 2),
    ("apply.entry-moved", 1), ("apply.entry-moved", 2),
    ("apply.moved", 1),
]

# Killed once every target's ledger had every entry: the healing run must run no target, only
# move what is left to applied/.
ALL_RECORDED = {("apply.ledger-saved", 2), ("apply.entry-moved", 1), ("apply.entry-moved", 2),
                ("apply.moved", 1)}

# Points a situation never reaches: the run must exit 0, and the checks still hold.
UNREACHED = {
    ("first", "staging.old-aside", 1): "nothing is pending before a first issuance",
    ("first", "staging.old-aside", 2): "nothing is pending before a first issuance",
    ("renewal", "staging.old-aside", 2): "only a is pending before the renewal",
}

DEPLOY_HOOK = """#!/bin/sh
# Adds combined.pem to the staged entry, like the shipped combined-pem hook.
set -eu
cat privkey.pem fullchain.pem > combined.pem
"""

# A target: for each certificate of its batch, check that the entry is the batch's serial and
# complete, then log "<target> <name> <serial> <sha256 of cert.pem>" to <tree>/logs/<target>.log
# (<tree> is the spool's parent: a copied tree logs into itself).
TARGET_HOOK = f"""#!{sys.executable} -IS
import hashlib, json, os, sys
target = os.environ["CERTBATCH_TARGET"]
tree = os.path.dirname(os.environ["CERTBATCH_SPOOL_DIR"])
with open(os.environ["CERTBATCH_BATCH_FILE"]) as fh:
    batch = json.load(fh)
with open(os.environ["CERTBATCH_NAMES_FILE"]) as fh:
    if fh.read().split() != batch["names"]:
        sys.exit("the names file differs from batch.json")
lines = []
for cert in batch["certificates"]:
    with open(os.path.join(cert["folder"], "meta.json")) as fh:
        if json.load(fh)["serial"] != cert["serial"]:
            sys.exit(cert["name"] + ": the entry is not the batch's serial")
    if not os.path.getsize(os.path.join(cert["folder"], "combined.pem")):
        sys.exit(cert["name"] + ": combined.pem is empty")
    with open(os.path.join(cert["folder"], "cert.pem"), "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    lines.append(f"{{target}} {{cert['name']}} {{cert['serial']}} {{digest}}\\n")
os.makedirs(os.path.join(tree, "logs"), exist_ok=True)
with open(os.path.join(tree, "logs", target + ".log"), "a") as fh:
    fh.write("".join(lines))
"""


def make_tree(folder: Path, pebble: Any, tag: str) -> Path:
    """Config, the deploy hook and the two targets (notify.d files) in `folder`; certificate
    names a and b for <name>.<tag>.crash.example.com. Nothing in it names `folder`: a copy
    works on its own."""
    cfg = write_config(folder, pebble,
                       {n: {"domains": [f"{n}.{tag}.crash.example.com"]} for n in NAMES},
                       renewal={"workers": 2}, hooks={"notify_workers": 2})
    deploy = folder / "hooks" / "deploy.d" / "10-combined"
    deploy.write_text(DEPLOY_HOOK)
    deploy.chmod(0o755)
    for t in TARGETS:
        hook = folder / "hooks" / "notify.d" / t
        hook.write_text(TARGET_HOOK)
        hook.chmod(0o755)
    return cfg


def renew(cfg: Path, pebble: Any, *args: str, fault: str = "") -> Any:
    return run(["renew", *args], cfg, pebble, env={"CERTBATCH_FAULT": fault},
               timeout=RUN_TIMEOUT)


def live_serials(tree: Path) -> dict[str, str]:
    return {n: json.loads((tree / "state/certs" / n / "live/meta.json").read_text())["serial"]
            for n in NAMES}


def applied_log(tree: Path) -> dict[str, list[tuple[str, ...]]]:
    """Per target: the (name, serial, cert.pem digest) it applied, in order."""
    logs = {}
    for t in TARGETS:
        f = tree / "logs" / f"{t}.log"
        logs[t] = [tuple(line.split()[1:]) for line in
                   (f.read_text().splitlines() if f.exists() else [])]
    return logs


def check_live(tree: Path) -> dict[str, tuple[str, str]]:
    """Every live certificate is a complete version that parses and matches its key, as
    `certbatch status` sees it (a damaged one would be reissued); (serial, cert.pem digest)."""
    store = Store(tree / "state")
    out = {}
    for name in NAMES:
        live = tree / "state" / "certs" / name / "live"
        assert live.is_symlink(), f"{name}: no live symlink"
        version = live.resolve()
        assert version.parent == live.parent / "versions" and not version.name.startswith(".")
        for f in ("privkey.pem", "cert.pem", "chain.pem", "fullchain.pem", "meta.json"):
            assert (version / f).is_file(), f"{name}: the live version lacks {f}"
        meta = json.loads((version / "meta.json").read_text())
        cert_pem = (version / "cert.pem").read_bytes()
        leaf = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key((version / "privkey.pem").read_bytes(), None)
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert leaf.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki), \
            f"{name}: the live key does not match the live certificate"
        assert leaf.serial_number == int(meta["serial"], 16)
        assert x509.load_pem_x509_certificates((version / "fullchain.pem").read_bytes())[0] \
            == leaf
        stored = store.current(name, verify=True)
        assert stored is not None and stored.damaged is None, f"{name}: {stored}"
        out[name] = (meta["serial"], hashlib.sha256(cert_pem).hexdigest())
    return out


def leftovers(tree: Path) -> list[str]:
    """Temp files and folders under state and spool (not inside applied/ records), work
    folders in spool/.staging, batch.json and names files in spool/targets/*."""
    found = []
    for top in (tree / "state", tree / "spool"):
        for dirpath, dirs, files in os.walk(top):
            rel = Path(dirpath).relative_to(tree)
            if rel.parts[:2] == ("spool", "applied") and len(rel.parts) > 2:
                dirs[:] = []  # an applied/ record: what the deploy hooks added
                continue
            found += [str(rel / n) for n in dirs + files
                      if n.startswith(".") and n.endswith(".tmp")]
    found += [f"spool/.staging/{n}" for n in os.listdir(tree / "spool" / ".staging")]
    targets = tree / "spool" / "targets"
    found += [f"spool/targets/{t}/{n}" for t in os.listdir(targets)
              for n in ("batch.json", "names") if os.path.lexists(targets / t / n)]
    return found


def min_renewed(point: str, nth: int, unreached: str | None) -> int:
    """How many certificates a renewal killed at point@nth has surely switched live."""
    if unreached or point.startswith("apply."):
        return len(NAMES)  # it finished, or died in the notify phase, after every renewal
    if point == "staging.linked":  # up to three visits in each staging: after its switch
        return 1
    if point.startswith("staging.") or point in ("store.live-switched", "symlink.switched"):
        return nth  # staging follows the switch; the n-th switch has happened
    # Before a switch (the other certificate may be at the same step), or an atomic write
    # before or after either switch.
    return 0


def crash_and_heal(situation: str, point: str, nth: int, pebble: Any, prepared: Path,
                   tree: Path) -> None:
    """One scenario, start to end (see the module doc); raises AssertionError."""
    if situation == "first":
        cfg = make_tree(tree, pebble, "first")
        old: dict[str, str] = {}
        args: tuple[str, ...] = ()
    else:
        shutil.copytree(prepared, tree, symlinks=True)
        cfg = tree / "certbatch.yaml"
        old = live_serials(tree)
        args = ("--force",)

    crashed = renew(cfg, pebble, *args, fault=f"{point}@{nth}")
    unreached = UNREACHED.get((situation, point, nth))
    if unreached:
        assert crashed.returncode == 0, (
            f"{point}@{nth} is listed as never reached in a {situation} run ({unreached}), "
            f"yet exit {crashed.returncode}: {crashed.stderr}")
    else:
        assert crashed.returncode == -signal.SIGKILL, (
            f"{point}@{nth} was not reached in a {situation} run (exit {crashed.returncode}): "
            f"{crashed.stderr}")

    logs_at_crash = applied_log(tree)
    healed = renew(cfg, pebble)
    assert healed.returncode != 75, f"a lock blocks the healing run: {healed.stderr}"
    assert healed.returncode == 0, f"healing run: exit {healed.returncode}: {healed.stderr}"

    live = check_live(tree)
    logs = applied_log(tree)
    for t in TARGETS:
        ledger = json.loads((tree / "spool" / "targets" / t / "ledger.json").read_text())
        for name in NAMES:
            got = [(serial, digest) for n, serial, digest in logs[t] if n == name]
            assert got, f"target {t} never applied {name}"
            assert got[-1] == live[name], \
                f"target {t} last applied {name} {got[-1]}, live is {live[name]}"
            assert ledger["applied"].get(name) == live[name][0], f"ledger of {t}: {ledger}"
    if (point, nth) in ALL_RECORDED:
        assert logs == logs_at_crash, "the healing run ran a target that had everything"
    if situation == "renewal":
        renewed = [n for n in NAMES if live[n][0] != old[n]]
        assert len(renewed) >= min_renewed(point, nth, unreached), \
            f"only {renewed} renewed after a crash at {point}@{nth}"
    assert os.listdir(tree / "spool" / "pending") == [], "entries left pending"
    assert leftovers(tree) == [], "leftovers after the healing run"

    third = renew(cfg, pebble)
    assert third.returncode != 75, f"a lock blocks the third run: {third.stderr}"
    assert (third.returncode, third.stdout, third.stderr) == (0, "", ""), \
        "the third run did something"
    assert applied_log(tree) == logs, "the third run applied something again"


@pytest.fixture(scope="module")
def prepared(pebble: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The renewal situation's tree: a successful first run (b's entry is in applied/), then a
    staged again and applied by t1 alone (pending, for t2)."""
    folder = tmp_path_factory.mktemp("crash-prepared")
    cfg = make_tree(folder, pebble, "renewal")
    first = renew(cfg, pebble)
    assert first.returncode == 0, first.stderr
    again = run(["run-hook", "--deploy", "a"], cfg, pebble, timeout=RUN_TIMEOUT)
    assert again.returncode == 0, again.stderr
    only_t1 = run(["run-hook", "--target", "t1"], cfg, pebble, timeout=RUN_TIMEOUT)
    assert only_t1.returncode == 0, only_t1.stderr
    assert os.listdir(folder / "spool" / "pending") == ["a"]  # t2 still lacks it
    logs = applied_log(folder)
    assert [e[0] for e in logs["t1"]] == ["a", "b", "a"] and [e[0] for e in logs["t2"]] == \
        ["a", "b"]
    return folder


Key = tuple[str, str, int]


class Lanes(dict[Key, "Future[None]"]):
    """The scenario of each test (situation, point, nth), submitted ahead to its lane; one that
    was not (a worker that gets some of this module's tests only) is submitted when asked."""

    def __init__(self, submit: Callable[[Key], Future[None]]) -> None:
        super().__init__()
        self.submit = submit

    def __missing__(self, key: Key) -> Future[None]:
        future = self[key] = self.submit(key)
        return future


def _runs_all_of_this_module(config: pytest.Config) -> bool:
    """Whether this process runs every selected test of this module: without pytest-xdist, or
    a worker under a distribution that keeps a module on one worker."""
    workerinput = getattr(config, "workerinput", None)
    return workerinput is None or workerinput.get("dist") in ("loadfile", "loadscope", "each")


@pytest.fixture(scope="module")
def lanes(request: pytest.FixtureRequest, pebble: Any, prepared: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lanes]:
    """Start the scenario of every selected test: one lane (thread) per situation."""
    pools = {s: ThreadPoolExecutor(1, thread_name_prefix=f"crash-{s}") for s in SITUATIONS}

    def submit(key: Key) -> Future[None]:
        tree = tmp_path_factory.mktemp(f"crash-{key[0]}-{key[1]}-{key[2]}") / "tree"
        return pools[key[0]].submit(crash_and_heal, *key, pebble, prepared, tree)

    futures = Lanes(submit)
    if _runs_all_of_this_module(request.config):
        for item in request.session.items:
            if item.path == request.path and getattr(item, "originalname", "") == \
                    "test_crash_then_heal":
                params = item.callspec.params  # type: ignore[attr-defined]
                key = (params["situation"], params["point"], params["nth"])
                futures[key] = submit(key)
    try:
        yield futures
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize(("point", "nth"), POINTS, ids=[f"{p}@{n}" for p, n in POINTS])
def test_crash_then_heal(situation: str, point: str, nth: int,
                         lanes: Lanes) -> None:
    lanes[(situation, point, nth)].result()
    unreached = UNREACHED.get((situation, point, nth))
    if unreached:  # the run exited 0 and every check held, but nothing was crash-tested
        pytest.skip(f"{point}@{nth} is never reached in a {situation} run: {unreached}")


def test_remove_leftovers_deletes_only_temp_files_of_its_own_and_follows_no_link(
        tmp_path: Path) -> None:
    """What the healing run's sweep (fsutil.remove_leftovers) may delete, and what not."""
    from certbatch.fsutil import remove_leftovers

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    root = tmp_path / "root"
    deep = root / "certs" / "a" / "versions"
    deep.mkdir(parents=True, mode=0o700)
    for folder in (root, deep.parent.parent, deep.parent, deep):
        folder.chmod(0o700)
        (folder / ".status.json.x1.tmp").write_text("half")
    (deep / ".20260101T000000Z-ab.tmp").mkdir(mode=0o700)
    (deep / ".20260101T000000Z-ab.tmp" / "cert.pem").write_text("half")
    (root / ".link.tmp").symlink_to(outside, target_is_directory=True)
    (root / ".shared.tmp").mkdir()
    (root / ".shared.tmp").chmod(0o777)  # not certbatch's own: left alone
    (root / "keep.tmp").write_text("not hidden: not a temp file of certbatch")
    (root / ".keep").write_text("no .tmp suffix")
    (root / "linked").symlink_to(outside, target_is_directory=True)  # never searched
    (outside / ".other.tmp").write_text("outside")

    remove_leftovers(root, levels=3)  # root, certs/, certs/a/: not versions/ yet
    assert (deep / ".status.json.x1.tmp").exists()
    assert not (deep.parent / ".status.json.x1.tmp").exists()
    remove_leftovers(root, levels=4)
    assert sorted(os.listdir(root)) == [".keep", ".shared.tmp", "certs", "keep.tmp", "linked"]
    assert os.listdir(deep) == []
    assert sorted(os.listdir(outside)) == [".other.tmp", "precious"]


def test_every_fault_point_is_crash_tested() -> None:
    """A fault point added to certbatch must be added to POINTS (at visits 1 and 2 if it can be
    visited more than once in a run), or, for `run-hook --all`'s bulk staging, to
    test_restage_bulk.BULK_POINTS, or, for pruning applied batches, to test_prune.PRUNE_POINTS."""
    import re

    from test_prune import PRUNE_POINTS
    from test_restage_bulk import BULK_POINTS

    import certbatch

    source = Path(certbatch.__file__).parent
    found = {m for f in source.rglob("*.py")
             for m in re.findall(r'\bpoint\("([a-z.-]+)"\)', f.read_text())}
    assert found == {p for p, _ in POINTS} | {p for p, _ in BULK_POINTS} | \
        {p for p, _ in PRUNE_POINTS}
