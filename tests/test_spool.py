"""certbatch.spool: staging, batching, notify and locking, with real hook processes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import certbatch.spool.spool as spool_core
from certbatch.config import HookSettings, TargetSettings
from certbatch.errors import StoreError
from certbatch.hooks import from_config
from certbatch.spool import CertFiles, NotifyOutcome, Spool
from certbatch.spool.env import notify_env
from certbatch.targets import resolve

NOW = dt.datetime(2026, 11, 22, 10, 15, tzinfo=dt.timezone.utc)


@functools.cache
def _pems(name: str, version: str, serial: str) -> tuple[bytes, bytes]:
    """A self-signed certificate (CN "<name> <version>") and its key: the spool checks that an
    entry's files parse and belong together before a target gets them."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {version}")])
    crt = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
           .public_key(key.public_key()).serial_number(int(serial, 16))
           .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=90))
           .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            crt.public_bytes(serialization.Encoding.PEM))


def cert(name: str, serial: str = "0a1b", version: str = "v1",
         domains: tuple[str, ...] | None = None) -> CertFiles:
    """A certificate to stage (the same one for the same name, serial and version)."""
    key_pem, cert_pem = _pems(name, version, serial)
    return CertFiles(
        name=name, domains=domains or (f"{name}.example", f"www.{name}.example"),
        privkey_pem=key_pem, cert_pem=cert_pem, chain_pem=b"", fullchain_pem=cert_pem,
        serial=serial, not_before=NOW, not_after=NOW + dt.timedelta(days=90),
    )


def hook(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nset -eu\n" + body)
    os.chmod(path, 0o755)
    return path


def q(path: Path | str) -> str:
    return shlex.quote(str(path))


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    p = tmp_path / "probe"
    p.mkdir()
    return p


@pytest.fixture
def hooks_dir(tmp_path: Path) -> Path:
    return tmp_path / "hooks"


@pytest.fixture
def spool(tmp_path: Path, hooks_dir: Path) -> Spool:
    return Spool(tmp_path / "spool", hooks_dir, deploy_timeout=20, notify_timeout=20)


def recording_hooks(hooks_dir: Path, probe: Path) -> None:
    """A deploy hook and a notify hook that log what they saw into `probe`."""
    hook(hooks_dir / "deploy.d" / "10-record", f"""
echo "$CERTBATCH_NAME" >> {q(probe)}/deploy.log
env | grep '^CERTBATCH_' | sort > {q(probe)}/"deploy-$CERTBATCH_NAME.env"
pwd > {q(probe)}/"deploy-$CERTBATCH_NAME.cwd"
stat -c %a "$CERTBATCH_KEY_FILE" > {q(probe)}/"deploy-$CERTBATCH_NAME.keymode"
cat "$CERTBATCH_CERT_FILE" "$CERTBATCH_CHAIN_FILE" "$CERTBATCH_FULLCHAIN_FILE" >/dev/null
echo "added by a deploy hook" > "$CERTBATCH_STAGE_DIR/extra.txt"
""")
    hook(hooks_dir / "notify.d" / "50-record", f"""
n=$(wc -l < {q(probe)}/notify.log 2>/dev/null || echo 0)
n=$((n + 1))
tr '\\n' ' ' < "$CERTBATCH_NAMES_FILE" | sed 's/ $//' >> {q(probe)}/notify.log
echo >> {q(probe)}/notify.log
cp "$CERTBATCH_BATCH_FILE" {q(probe)}/"batch-$n.json"
env | grep '^CERTBATCH_' | sort > {q(probe)}/"notify-$n.env"
pwd > {q(probe)}/"notify-$n.cwd"
for name in $CERTBATCH_NAMES; do
    test -f "$CERTBATCH_SPOOL_DIR/pending/$name/fullchain.pem"
    test -f "$CERTBATCH_SPOOL_DIR/pending/$name/extra.txt"
done
if [ -e {q(probe)}/fail-notify ]; then echo "notify refused" >&2; exit 7; fi
""")


def read_env(path: Path) -> dict[str, str]:
    """CERTBATCH_* variables a hook saw, minus those the test run itself inherits (CI sets
    CERTBATCH_REQUIRE_PEBBLE): only what the spool passed is compared."""
    env = dict(line.split("=", 1) for line in path.read_text().splitlines())
    return {k: v for k, v in env.items() if k not in os.environ}


NAMES = ["alpha", "bravo", "charlie.example", "delta-1", "echo_2"]


def test_five_stages_then_one_notify(spool: Spool, hooks_dir: Path, probe: Path) -> None:
    recording_hooks(hooks_dir, probe)
    for i, name in enumerate(NAMES):
        outcome = spool.stage(cert(name, serial=f"{i + 10:x}"))
        assert outcome.ok and outcome.error is None
        assert [r.hook for r in outcome.results] == ["10-record"]

    assert (probe / "deploy.log").read_text().split() == NAMES  # once per certificate
    assert not (probe / "notify.log").exists()  # staging never notifies
    assert [e.name for e in spool.pending()] == sorted(NAMES)

    env = read_env(probe / "deploy-bravo.env")
    stage_dir = env["CERTBATCH_STAGE_DIR"]
    assert (probe / "deploy-bravo.cwd").read_text().strip() == stage_dir
    assert Path(stage_dir).parent == spool.root / ".staging"
    assert env == {
        "CERTBATCH_NAME": "bravo",
        "CERTBATCH_DOMAINS": "bravo.example www.bravo.example",
        "CERTBATCH_STAGE_DIR": stage_dir,
        "CERTBATCH_KEY_FILE": f"{stage_dir}/privkey.pem",
        "CERTBATCH_CERT_FILE": f"{stage_dir}/cert.pem",
        "CERTBATCH_CHAIN_FILE": f"{stage_dir}/chain.pem",
        "CERTBATCH_FULLCHAIN_FILE": f"{stage_dir}/fullchain.pem",
        "CERTBATCH_SPOOL_DIR": str(spool.root),
    }
    assert env == spool.deploy_env("bravo", ("bravo.example", "www.bravo.example"),
                                   Path(stage_dir))
    assert (probe / "deploy-bravo.keymode").read_text().strip() == "600"

    out = spool.notify(failed_names=["zulu"])

    assert out.ok and out.error is None and out.batch_id is not None
    assert out.names == sorted(NAMES)
    assert [r.hook for r in out.results] == ["50-record"]
    assert (probe / "notify.log").read_text().splitlines() == [" ".join(sorted(NAMES))]
    batch = json.loads((probe / "batch-1.json").read_text())
    assert [c["name"] for c in batch["certificates"]] == sorted(NAMES)
    nenv = read_env(probe / "notify-1.env")
    folder = spool.root / "targets" / "50-record"
    assert nenv == {
        "CERTBATCH_SPOOL_DIR": str(spool.root),
        "CERTBATCH_TARGET": "50-record",
        "CERTBATCH_BATCH_FILE": str(folder / "batch.json"),
        "CERTBATCH_NAMES_FILE": str(folder / "names"),
        "CERTBATCH_NAMES": " ".join(sorted(NAMES)),
        "CERTBATCH_COUNT": "5",
        "CERTBATCH_FAILED_NAMES": "zulu",
    }
    assert nenv == notify_env(spool.root, "50-record", folder, sorted(NAMES), ["zulu"])
    assert (probe / "notify-1.cwd").read_text().strip() == str(spool.root)

    # Applied: entries moved with everything the deploy hook added, plus a batch record.
    assert spool.pending() == []
    assert os.listdir(spool.root / "pending") == []
    applied = spool.root / "applied" / out.batch_id
    assert sorted(os.listdir(applied)) == sorted([*NAMES, "batch.json"])
    assert (applied / "alpha" / "extra.txt").read_text() == "added by a deploy hook\n"
    record = json.loads((applied / "batch.json").read_text())
    assert record["target"] is None and batch["target"] == "50-record"
    assert record["certificates"] == batch["certificates"]
    assert sorted(os.listdir(folder)) == ["ledger.json"]  # the handed files go on success
    assert os.listdir(spool.root / ".staging") == []

    # Nothing left: the next notify runs no hook at all.
    assert spool.notify() == NotifyOutcome(None)
    assert len((probe / "notify.log").read_text().splitlines()) == 1


def test_notify_with_nothing_pending_runs_no_hook(spool: Spool, hooks_dir: Path,
                                                  probe: Path) -> None:
    recording_hooks(hooks_dir, probe)
    assert spool.notify() == NotifyOutcome(None)
    assert not (probe / "notify.log").exists()


def test_failed_notify_keeps_batch_and_next_notify_retries(spool: Spool, hooks_dir: Path,
                                                           probe: Path) -> None:
    recording_hooks(hooks_dir, probe)
    hook(hooks_dir / "notify.d" / "60-after", f"echo ran >> {q(probe)}/after.log\n")
    for name in ("alpha", "bravo"):
        assert spool.stage(cert(name)).ok
    (probe / "fail-notify").touch()

    first = spool.notify()

    assert not first.ok and first.batch_id is not None
    assert first.names == ["alpha", "bravo"]
    assert first.error is not None
    assert (first.error.hook, first.error.returncode) == ("50-record", 7)
    assert "notify refused" in first.error.stderr_tail
    assert (probe / "after.log").read_text() == "ran\n"  # a failing target stops no other
    assert [e.name for e in spool.pending()] == ["alpha", "bravo"]
    assert spool.applied() == []
    kept = spool.root / "targets" / "50-record" / "batch.json"  # kept for the operator
    assert json.loads(kept.read_text())["batch_id"] == first.batch_id

    (probe / "fail-notify").unlink()
    second = spool.notify()

    assert second.ok and second.names == ["alpha", "bravo"]
    assert second.batch_id != first.batch_id
    assert (probe / "notify.log").read_text().splitlines() == ["alpha bravo", "alpha bravo"]
    assert (probe / "after.log").read_text() == "ran\n"  # it had them: not run again
    assert spool.pending() == []
    assert spool.applied() == [second.batch_id]


def test_failed_deploy_discards_staging_and_keeps_previous(spool: Spool, hooks_dir: Path,
                                                          probe: Path) -> None:
    hook(hooks_dir / "deploy.d" / "10-check", f"""
echo "$CERTBATCH_STAGE_DIR" >> {q(probe)}/stage-dirs
if [ "${{CERTBATCH_DOMAINS#v2.}}" != "$CERTBATCH_DOMAINS" ]; then
    echo "some detail" >&2
    echo "boom: cannot convert" >&2
    exit 4
fi
""")
    hook(hooks_dir / "deploy.d" / "20-later", f"echo ran >> {q(probe)}/later.log\n")
    assert spool.stage(cert("www", serial="01", version="v1")).ok

    outcome = spool.stage(cert("www", serial="02", version="v2", domains=("v2.www.example",)))

    assert not outcome.ok
    assert outcome.error is not None
    assert outcome.error.hook == "10-check"
    assert outcome.error.returncode == 4 and not outcome.error.timed_out
    assert outcome.error.stderr_tail.splitlines()[-1] == "boom: cannot convert"
    assert "10-check" in str(outcome.error) and "status 4" in str(outcome.error)
    assert [r.hook for r in outcome.results] == ["10-check"]
    assert (probe / "later.log").read_text() == "ran\n"  # only for the v1 staging
    failed_dir = Path((probe / "stage-dirs").read_text().splitlines()[-1])
    assert not failed_dir.exists()
    assert os.listdir(spool.root / ".staging") == []
    (entry,) = spool.pending()
    assert entry.serial == "01"
    assert (entry.folder / "cert.pem").read_bytes() == cert("www", "01", "v1").cert_pem


def test_failed_deploy_of_new_name_leaves_nothing(spool: Spool, hooks_dir: Path) -> None:
    hook(hooks_dir / "deploy.d" / "10-fail", "exit 1\n")
    outcome = spool.stage(cert("new"))
    assert not outcome.ok
    assert spool.pending() == []
    assert os.listdir(spool.root / ".staging") == []


def test_deploy_hook_timeout_fails_the_staging(tmp_path: Path, hooks_dir: Path) -> None:
    hook(hooks_dir / "deploy.d" / "10-hang", "sleep 100\n")
    spool = Spool(tmp_path / "spool", hooks_dir, deploy_timeout=0.3)
    outcome = spool.stage(cert("www"))
    assert not outcome.ok and outcome.error is not None and outcome.error.timed_out
    assert spool.pending() == []


def test_latest_staging_wins(spool: Spool, hooks_dir: Path, probe: Path) -> None:
    recording_hooks(hooks_dir, probe)
    assert spool.stage(cert("www", serial="01", version="v1")).ok
    assert spool.stage(cert("www", serial="02", version="v2")).ok

    (entry,) = spool.pending()
    assert entry.serial == "02"
    assert (entry.folder / "privkey.pem").read_bytes() == cert("www", "02", "v2").privkey_pem
    assert os.listdir(spool.root / ".staging") == []  # the replaced entry is gone

    out = spool.notify()
    batch = json.loads((probe / "batch-1.json").read_text())
    assert out.names == ["www"] and [c["serial"] for c in batch["certificates"]] == ["02"]


def test_modes_under_umask_000(spool: Spool, hooks_dir: Path, probe: Path) -> None:
    recording_hooks(hooks_dir, probe)
    old = os.umask(0)
    try:
        assert spool.stage(cert("www")).ok
        root = spool.root
        for folder in (root, root / "pending", root / "applied", root / ".staging",
                       root / "pending" / "www"):
            assert oct(folder.stat().st_mode & 0o777) == oct(0o700), folder
        assert (root / "pending" / "www" / "privkey.pem").stat().st_mode & 0o777 == 0o600
        for name in ("cert.pem", "chain.pem", "fullchain.pem", "meta.json"):
            assert (root / "pending" / "www" / name).stat().st_mode & 0o077 in (0o044, 0)
        (probe / "fail-notify").touch()
        spool.notify()
        target = root / "targets" / "50-record"
        assert target.stat().st_mode & 0o777 == 0o700
        for name in ("batch.json", "names", "ledger.json"):
            assert (target / name).stat().st_mode & 0o777 == 0o600
        (probe / "fail-notify").unlink()
        out = spool.notify()
        assert out.batch_id is not None
        assert (root / "applied" / out.batch_id).stat().st_mode & 0o777 == 0o700
        assert (root / "applied" / out.batch_id / "batch.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")


def test_batch_and_meta_json_schema(spool: Spool, hooks_dir: Path, probe: Path) -> None:
    recording_hooks(hooks_dir, probe)
    c = cert("www", serial="00ff", domains=("example.org", "*.example.org"))
    assert spool.stage(c).ok

    meta = json.loads((spool.root / "pending" / "www" / "meta.json").read_text())
    assert meta.keys() == {"version", "name", "domains", "serial", "not_before", "not_after",
                           "staged_at"}
    assert meta["version"] == 1 and meta["name"] == "www"
    assert meta["domains"] == ["example.org", "*.example.org"]
    assert meta["serial"] == "00ff"
    assert meta["not_before"] == "2026-11-22T10:15:00Z"
    assert meta["not_after"] == "2027-02-20T10:15:00Z"
    assert ISO_Z.match(meta["staged_at"])

    out = spool.notify(failed_names=["broken"])
    batch = json.loads((probe / "batch-1.json").read_text())
    assert batch.keys() == {"version", "batch_id", "target", "created_at", "spool_dir", "count",
                            "names", "failed_names", "certificates"}
    assert batch["version"] == 2 and batch["target"] == "50-record"
    assert batch["batch_id"] == out.batch_id
    assert re.match(r"\d{8}T\d{12}Z-[0-9a-f]{6}\Z", batch["batch_id"])
    assert ISO_Z.match(batch["created_at"])
    assert batch["spool_dir"] == str(spool.root)
    assert batch["count"] == 1 and batch["names"] == ["www"]
    assert batch["failed_names"] == ["broken"]
    assert batch["certificates"] == [{
        "name": "www",
        "domains": ["example.org", "*.example.org"],
        "serial": "00ff",
        "not_after": "2027-02-20T10:15:00Z",
        "staged_at": meta["staged_at"],
        "folder": str(spool.root / "pending" / "www"),
    }]


def test_only_last_five_applied_batches_are_kept(spool: Spool, hooks_dir: Path,
                                                 probe: Path) -> None:
    recording_hooks(hooks_dir, probe)
    ids = []
    for i in range(7):
        assert spool.stage(cert(f"c{i}")).ok
        out = spool.notify()
        assert out.ok and out.batch_id
        ids.append(out.batch_id)
    assert spool.applied() == sorted(ids[-5:])
    assert sorted(os.listdir(spool.root / "applied")) == sorted(ids[-5:])


def test_config_deploy_runs_after_deploy_d_and_config_targets_join_notify_d(
        spool: Spool, hooks_dir: Path, probe: Path) -> None:
    hook(hooks_dir / "deploy.d" / "10-d", f"echo dir >> {q(probe)}/order\n")
    hook(hooks_dir / "notify.d" / "10-n", f"echo dir-notify >> {q(probe)}/n1\n")
    extra_deploy = from_config(f"echo config >> {q(probe)}/order", "config:deploy")
    settings = HookSettings(notify_timeout=20, targets={"cfg": TargetSettings(
        "cfg", command=f"echo config-notify $CERTBATCH_TARGET >> {q(probe)}/n2")})
    targets = resolve(hooks_dir, settings)
    assert [h.name for h in spool.deploy_commands(extra_deploy)] == ["10-d", "config:deploy"]
    assert [(t.name, t.source) for t in targets] == [
        ("10-n", str(hooks_dir / "notify.d" / "10-n")), ("cfg", "hooks.targets.cfg")]

    assert spool.stage(cert("www"), extra_deploy).ok
    assert spool.notify(targets).ok
    assert (probe / "order").read_text().split() == ["dir", "config"]
    assert (probe / "n1").read_text() == "dir-notify\n"
    assert (probe / "n2").read_text() == "config-notify cfg\n"


def test_invalid_names_are_refused(spool: Spool) -> None:
    for bad in ("", "../x", "a/b", ".hidden", "Upper", "-x", "a b"):
        with pytest.raises(ValueError):
            spool.stage(dataclasses.replace(cert("x"), name=bad))


# -- crash recovery ---------------------------------------------------------------------------

def _copy_entry(src: Path, dst: Path, version: str) -> None:
    dst.mkdir(mode=0o700)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    new = cert("www", version=version)  # same serial, another certificate and key
    for name, data in (("cert.pem", new.cert_pem), ("fullchain.pem", new.fullchain_pem),
                       ("privkey.pem", new.privkey_pem)):
        (dst / name).write_bytes(data)


def test_recovery_after_crash_between_the_two_renames(spool: Spool, hooks_dir: Path,
                                                      probe: Path) -> None:
    recording_hooks(hooks_dir, probe)
    assert spool.stage(cert("www", version="v1")).ok
    staging = spool.root / ".staging"
    # The state a crash leaves after "pending/www -> .old" and before ".ready -> pending/www":
    token = "00000000000000000001-abcdef"
    _copy_entry(spool.root / "pending" / "www", staging / f"www.{token}.ready", "v2")
    os.rename(spool.root / "pending" / "www", staging / f"www.{token}.old")
    # ...plus an unfinished staging of another name, whose hooks never completed.
    (staging / "other.00000000000000000002-123456.tmp").mkdir()

    out = spool.notify()  # taking the lock recovers first

    assert out.ok and out.names == ["www"]
    assert out.batch_id is not None
    applied = spool.root / "applied" / out.batch_id / "www"
    assert (applied / "cert.pem").read_bytes() == cert("www", version="v2").cert_pem
    assert os.listdir(staging) == []


def test_recovery_completes_a_finished_staging(spool: Spool, hooks_dir: Path,
                                               probe: Path) -> None:
    recording_hooks(hooks_dir, probe)
    assert spool.stage(cert("www", version="v1")).ok
    staging = spool.root / ".staging"
    # Crash after the hooks succeeded (.tmp -> .ready) but before the swap began.
    _copy_entry(spool.root / "pending" / "www",
                staging / "www.00000000000000000001-abcdef.ready", "v2")
    # A crash after the swap, before deleting the replaced entry:
    (staging / "www.00000000000000000000-aaaaaa.old").mkdir()

    # A staging of another name shares the lock: it leaves www's leftovers alone...
    assert spool.stage(cert("other")).ok
    assert len(os.listdir(staging)) == 2
    spool.forget()  # ...for whoever holds it exclusively (forget, notify) to recover.

    assert (spool.root / "pending" / "www" / "cert.pem").read_bytes() == cert(
        "www", version="v2").cert_pem
    assert sorted(e.name for e in spool.pending()) == ["other", "www"]
    assert os.listdir(staging) == []


# -- locking ----------------------------------------------------------------------------------

@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


HOLD_FLOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2:] == ["shared"] else fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def hold_flock(reaper: list[subprocess.Popen[str]], path: Path, *mode: str) -> None:
    """Another process takes an flock on `path` (exclusive, or "shared") and keeps it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FLOCK, str(path), *mode],
                              stdout=subprocess.PIPE, text=True)
    reaper.append(holder)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"


def test_recovery_leaves_tmp_folders_while_another_process_prepares(
        spool: Spool, reaper: list[subprocess.Popen[str]]) -> None:
    """A .tmp folder may be a live staging of another process that is still copying or waiting
    for the lock: while anybody holds .prepare.lock, no .tmp is deleted. Once nobody does, the
    next lock holder deletes it as a crash leftover."""
    assert spool.stage(cert("first")).ok  # creates the layout and .prepare.lock
    leftover = spool.root / ".staging" / "other.00000000000000000002-123456.tmp"
    leftover.mkdir()
    hold_flock(reaper, spool.root / ".prepare.lock", "shared")

    assert spool.notify().ok  # recovers first
    assert leftover.is_dir()

    reaper[0].kill()
    reaper[0].wait()
    assert spool.stage(cert("www")).ok
    assert leftover.is_dir()  # a staging is itself a preparer: it leaves them to notify
    assert spool.notify().ok
    assert not leftover.exists()


def test_recovery_leaves_tmp_folders_of_another_thread(spool: Spool) -> None:
    """The same between threads of one process: flocks of two open files conflict."""
    assert spool.stage(cert("first")).ok
    busy = spool.root / ".staging" / "other.00000000000000000002-123456.tmp"
    busy.mkdir()
    with spool.staging.preparing():  # what a worker thread holds from its mkdir to its commit
        assert spool.notify().ok
        assert busy.is_dir()
    assert spool.notify().ok
    assert not busy.exists()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_or_folder_left_by_success_hook_failure_or_write_failure(
        spool: Spool, hooks_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool.stage(cert("warm"))  # the layout, and whatever the first call opens for good
    before = open_fds()
    assert spool.stage(cert("www")).ok
    hook(hooks_dir / "deploy.d" / "10-fail", "exit 3")
    assert not spool.stage(cert("www", version="v2")).ok
    (hooks_dir / "deploy.d" / "10-fail").unlink()

    def full_disk(path: Path, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(spool_core, "write_new", full_disk)
    with pytest.raises(StoreError, match="staging www failed: .*: no space left on device"):
        spool.stage(cert("www", version="v3"))
    assert open_fds() == before
    assert os.listdir(spool.root / ".staging") == []
    assert (spool.root / "pending" / "www" / "cert.pem").read_bytes() == cert("www").cert_pem


def test_files_are_copied_before_the_lock_is_taken(
        spool: Spool, reaper: list[subprocess.Popen[str]]) -> None:
    """While another process holds the spool lock, a staging already has its complete .tmp
    folder; it only waits for the lock to run the hooks and commit."""
    spool.stage(cert("first"))
    hold_flock(reaper, spool.root / ".lock")
    done: list[bool] = []
    stager = threading.Thread(target=lambda: done.append(spool.stage(cert("www")).ok))
    stager.start()
    try:
        deadline = time.monotonic() + 10
        while not list((spool.root / ".staging").glob("www.*.tmp/meta.json")):
            assert time.monotonic() < deadline, "nothing was written before the lock"
            time.sleep(0.01)
        work = next((spool.root / ".staging").glob("www.*.tmp"))
        assert sorted(os.listdir(work)) == ["cert.pem", "chain.pem", "fullchain.pem",
                                            "meta.json", "privkey.pem"]
        assert (work / "cert.pem").read_bytes() == cert("www").cert_pem
        time.sleep(0.2)
        assert not done and not (spool.root / "pending" / "www").exists()  # still waiting
    finally:
        reaper[0].kill()
        reaper[0].wait()
        stager.join(20)
    assert done == [True]
    assert (spool.root / "pending" / "www" / "cert.pem").read_bytes() == cert("www").cert_pem
    assert os.listdir(spool.root / ".staging") == []



NOTIFY_IN_SUBPROCESS = """
import sys
from pathlib import Path
from certbatch.spool import Spool
out = Spool(Path(sys.argv[1]), Path(sys.argv[2])).notify()
print(out.ok, out.batch_id, " ".join(out.names))
"""


def test_second_process_waits_for_staging_and_sees_complete_entry(
        spool: Spool, hooks_dir: Path, probe: Path,
        reaper: list[subprocess.Popen[str]]) -> None:
    hook(hooks_dir / "deploy.d" / "10-gate", f"""
if [ "$CERTBATCH_NAME" = gated ]; then
    touch {q(probe)}/running
    while [ ! -e {q(probe)}/release ]; do sleep 0.02; done
    echo late > "$CERTBATCH_STAGE_DIR/late.txt"  # a partial entry would lack this file
    date +%s.%N > {q(probe)}/deploy-end
fi
""")
    hook(hooks_dir / "notify.d" / "50-record", f"""
date +%s.%N > {q(probe)}/notify-start
cp "$CERTBATCH_BATCH_FILE" {q(probe)}/batch.json
ls "$CERTBATCH_SPOOL_DIR/pending/gated" > {q(probe)}/gated-files
""")
    assert spool.stage(cert("early")).ok

    result: list[bool] = []
    stager = threading.Thread(target=lambda: result.append(spool.stage(
        cert("gated", serial="abcd")).ok))
    stager.start()
    try:
        deadline = time.monotonic() + 10
        while not (probe / "running").exists():
            assert time.monotonic() < deadline, "deploy hook never started"
            time.sleep(0.02)
        assert spool.lock.holder_pid() == os.getpid()

        other = subprocess.Popen(
            [sys.executable, "-c", NOTIFY_IN_SUBPROCESS, str(spool.root), str(hooks_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reaper.append(other)
        time.sleep(1.0)
        assert other.poll() is None, "notify did not wait for the staging to finish"
        assert not (probe / "notify-start").exists()
    finally:
        (probe / "release").touch()
        stager.join(20)

    stdout, stderr = other.communicate(timeout=30)
    assert other.returncode == 0, stderr
    assert result == [True]
    assert stdout.split() == ["True", stdout.split()[1], "early", "gated"]
    assert float((probe / "notify-start").read_text()) > float(
        (probe / "deploy-end").read_text())
    batch = json.loads((probe / "batch.json").read_text())
    assert [(c["name"], c["serial"]) for c in batch["certificates"]] == [
        ("early", "0a1b"), ("gated", "abcd")]
    files = (probe / "gated-files").read_text().split()
    assert sorted(files) == ["cert.pem", "chain.pem", "fullchain.pem", "late.txt", "meta.json",
                             "privkey.pem"]


@pytest.mark.parametrize("deploy_workers", [None, 1])
def test_threads_staging_at_once_overlap_unless_deploy_workers_1(
        tmp_path: Path, hooks_dir: Path, probe: Path, deploy_workers: int | None) -> None:
    hook(hooks_dir / "deploy.d" / "10-slow", f"""
date +%s.%N > {q(probe)}/"$CERTBATCH_NAME.start"
sleep 0.3
date +%s.%N > {q(probe)}/"$CERTBATCH_NAME.end"
""")
    shared = Spool(tmp_path / "spool", hooks_dir, deploy_workers=deploy_workers)
    Spool(tmp_path / "spool", hooks_dir).stage(cert("first"))  # an earlier run
    # One has its own object: deploy_workers 1 serializes across objects (and processes) too.
    spools = [shared, shared, Spool(tmp_path / "spool", hooks_dir, deploy_workers=deploy_workers)]
    barrier = threading.Barrier(len(spools))
    oks: list[bool] = []

    def work(i: int) -> None:
        barrier.wait()
        oks.append(spools[i].stage(cert(f"t{i}")).ok)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(spools))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert oks == [True] * 3
    spans = sorted((float((probe / f"t{i}.start").read_text()),
                    float((probe / f"t{i}.end").read_text())) for i in range(3))
    if deploy_workers == 1:
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"deploy hooks overlapped: {spans}"
    else:  # all three at once: the last one started before the first one ended
        assert max(s for s, _ in spans) < min(e for _, e in spans), f"serialized: {spans}"
    assert [e.name for e in shared.pending()] == ["first", "t0", "t1", "t2"]
