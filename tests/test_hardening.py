"""Hostile files and tampering, through the real command: certbatch never follows a link it did
not make, never trusts what it does not own, and heals what a person or a crash damaged.

Each test repeats one row of the hardening issue's table. The tests run as root (CI does) and
make "another user" with chown to uid 65534 (nobody).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import live, probe_hook, probe_lines, run, write_config

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")


def certs(*names: str) -> dict:
    return {n: {"domains": [f"{n}.hard.example.com"]} for n in names}


@pytest.fixture(scope="module")
def issued_once(tmp_path_factory, pebble):
    """The tree `issued` copies: issued once for the module (a renew of two certificates)."""
    folder = tmp_path_factory.mktemp("issued")
    probes = folder / "probes"
    probes.mkdir()
    cfg = write_config(folder, pebble, certs("www", "api"))
    probe_hook(folder / "hooks/notify.d/50-apply", probes)
    first = run(["renew"], cfg, pebble)
    assert first.returncode == 0, first.stderr
    return folder


@pytest.fixture
def issued(tmp_path, issued_once):
    """A config with two issued and applied certificates, and a notify probe: a copy of
    issued_once in tmp_path (its state, spool and config name no folder: paths are relative),
    the probe hook written again to log into the copy's probes folder."""
    shutil.copytree(issued_once, tmp_path, symlinks=True, dirs_exist_ok=True)
    probes = tmp_path / "probes"
    probe_hook(tmp_path / "hooks/notify.d/50-apply", probes)
    return tmp_path / "certbatch.yaml", probes


def victim_file(tmp_path: Path) -> Path:
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch\n")
    return victim


def victim_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine\n")
    (folder / "www.00000000000000000001-abcdef.tmp").mkdir()  # looks like a leftover
    return folder


@pytest.mark.parametrize("root", ["state", "spool"])
def test_lock_file_replaced_by_a_symlink(tmp_path, pebble, issued, root):
    cfg, _ = issued
    victim = victim_file(tmp_path)
    lock = tmp_path / root / ".lock"
    lock.unlink()
    lock.symlink_to(victim)

    result = run(["renew", "--force"], cfg, pebble)

    assert result.returncode == 2
    assert result.stderr == (f"certbatch: error: {lock}: is a symlink (certbatch never follows "
                             "links in its own folders)\n")
    assert victim.read_text() == "do not touch\n"


@pytest.mark.parametrize("folder", [".staging", "applied", "pending", "targets"])
def test_spool_folder_replaced_by_a_symlink(tmp_path, pebble, issued, folder):
    cfg, probes = issued
    victim = victim_folder(tmp_path)
    path = tmp_path / "spool" / folder
    os.rename(path, tmp_path / "moved-away")
    path.symlink_to(victim)

    result = run(["renew", "--force"], cfg, pebble)

    assert result.returncode == 2
    assert result.stderr.startswith(f"certbatch: error: {path}: is a symlink")
    assert sorted(os.listdir(victim)) == ["keep.txt", "www.00000000000000000001-abcdef.tmp"]
    assert len(probe_lines(probes, "50-apply")) == 1  # nothing more was applied
    run_hook = run(["run-hook"], cfg, pebble)
    assert run_hook.returncode == 2 and "is a symlink" in run_hook.stderr


def test_versions_folder_replaced_by_a_symlink_fails_that_certificate_only(tmp_path, pebble,
                                                                            issued):
    cfg, probes = issued
    victim = victim_folder(tmp_path)
    versions = tmp_path / "state/certs/www/versions"
    os.rename(versions, tmp_path / "moved-away")
    versions.symlink_to(victim)
    api_serial = live(tmp_path, "api")["serial"]

    result = run(["renew", "--force"], cfg, pebble)

    assert result.returncode == 1
    assert result.stderr == f"certbatch: www: failed: {versions}: is a symlink (certbatch never " \
                            "follows links in its own folders)\n"
    assert sorted(os.listdir(victim)) == ["keep.txt", "www.00000000000000000001-abcdef.tmp"]
    assert live(tmp_path, "api")["serial"] != api_serial  # the other one was renewed
    assert probe_lines(probes, "50-apply")[-1]["CERTBATCH_NAMES"] == "api"


def test_shared_world_writable_spool_is_refused(tmp_path, pebble):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    cfg = write_config(tmp_path, pebble, certs("www"), paths={"spool": str(shared)})
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 2
    assert result.stderr == (
        f"certbatch: error: {shared}: is writable by others (mode 1777): a shared folder; point "
        f"certbatch at a folder of its own inside it (e.g. {shared}/certbatch, which it creates "
        "0700)\n")
    assert not (tmp_path / "state" / "certs").exists()  # before any work

    cfg = write_config(tmp_path, pebble, certs("www"), paths={"spool": str(shared / "cb")})
    assert run(["renew"], cfg, pebble).returncode == 0
    assert (shared / "cb").stat().st_mode & 0o777 == 0o700


def forge_pending_www(tmp_path: Path) -> Path:
    """pending/www, a copy of an applied entry, owned by another user (nobody)."""
    forged = tmp_path / "spool/pending/www"
    applied = next((tmp_path / "spool/applied").glob("*/www"))
    subprocess.run(["cp", "-a", str(applied), str(forged)], check=True)
    for p in [forged, *forged.iterdir()]:
        os.chown(p, NOBODY, NOBODY)
    return forged


def test_entry_forged_by_another_user_is_never_applied_or_deleted(tmp_path, pebble, issued):
    cfg, probes = issued
    forged = forge_pending_www(tmp_path)

    result = run(["renew", "--only", "api", "--force", "-v"], cfg, pebble)

    assert result.returncode == 0, result.stderr
    assert "not staged by certbatch" in result.stderr  # -v: the warning
    assert [c["CERTBATCH_NAMES"] for c in probe_lines(probes, "50-apply")][-1] == "api"
    assert forged.is_dir() and forged.stat().st_uid == NOBODY  # left alone


def test_hook_writable_by_others_does_not_run(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, certs("www"))
    probes = tmp_path / "probes"
    probes.mkdir()
    hook = probe_hook(tmp_path / "hooks/notify.d/50-apply", probes)
    hook.chmod(0o777)
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 1
    assert "is writable by group or others (mode 0777)" in result.stderr
    assert probe_lines(probes, "50-apply") == []
    os.chown(hook, NOBODY, NOBODY)
    hook.chmod(0o755)
    result = run(["run-hook"], cfg, pebble)
    assert result.returncode == 1 and "is owned by uid 65534" in result.stderr
    assert probe_lines(probes, "50-apply") == []


HOLD = """
import sys, time
from pathlib import Path
from certbatch.fsutil import FileLock
lock = FileLock(Path(sys.argv[1]))
assert lock.acquire(timeout=5)
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_run_lock_deleted_or_replaced_while_held_still_excludes(tmp_path, pebble, issued, how):
    cfg, _ = issued
    lock = tmp_path / "state/.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        if how == "deleted":
            lock.unlink()
        else:
            (tmp_path / "state/new-lock").write_text("")
            os.rename(tmp_path / "state/new-lock", lock)

        result = run(["renew", "--force"], cfg, pebble)

        assert result.returncode == 75, result.stderr
        assert "another certbatch run is in progress" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    assert run(["renew"], cfg, pebble).returncode == 0  # and free again afterwards


def test_waiter_relocks_a_lock_file_replaced_while_it_waited(tmp_path):
    """A process waiting for the lock gets it only on the file that is at the path."""
    from certbatch.fsutil import FileLock

    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        waiter = FileLock(lock)
        assert not waiter.acquire(timeout=0.2)
        lock.unlink()
        holder.kill()
        holder.wait()
        assert waiter.acquire(timeout=5)
        fds = waiter._proc.fds
        assert fds is not None and os.stat(lock).st_ino == os.fstat(fds[1]).st_ino
        waiter.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_stale_batch_json_is_removed_by_recovery(tmp_path, pebble, issued):
    cfg, _ = issued
    stale = tmp_path / "spool/batch.json"
    stale.write_text("{}")
    assert run(["run-hook"], cfg, pebble).returncode == 0
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["delete-key", "garbage-cert"])
def test_damaged_live_files_are_reissued(tmp_path, pebble, issued, damage):
    cfg, probes = issued
    folder = tmp_path / "state/certs/www/live"
    before = live(tmp_path, "www")["serial"]
    if damage == "delete-key":
        (folder / "privkey.pem").unlink()
        reason = "live files damaged (privkey.pem is missing)"
    else:
        (folder / "cert.pem").write_text("garbage\n")
        reason = "live files damaged (cert.pem was changed after it was stored"

    status = json.loads(run(["status", "--json"], cfg, pebble).stdout)
    row = next(c for c in status["certificates"] if c["name"] == "www")
    assert row["decision"] == "reissue" and row["reason"].startswith(reason), row
    dry = run(["renew", "--dry-run"], cfg, pebble)
    assert f"www  reissue       {reason}" in dry.stdout

    result = run(["renew"], cfg, pebble)

    assert result.returncode == 0, result.stderr
    assert live(tmp_path, "www")["serial"] != before
    assert probe_lines(probes, "50-apply")[-1]["CERTBATCH_NAMES"] == "www"
    assert run(["status", "--json"], cfg, pebble).returncode == 0


def test_status_finds_damage_the_cheap_check_cannot_see(tmp_path, pebble, issued):
    """A key swapped for another of the same size: only parsing shows it; status (and so the
    operator) sees it, and the nothing-due run stays cheap."""
    cfg, _ = issued
    www, api = (tmp_path / "state/certs" / n / "live" for n in ("www", "api"))
    (www / "privkey.pem").write_bytes((api / "privkey.pem").read_bytes())
    status = json.loads(run(["status", "--json"], cfg, pebble).stdout)
    row = next(c for c in status["certificates"] if c["name"] == "www")
    assert row["decision"] == "reissue"
    assert row["reason"] == ("live files damaged (the certificate does not match the private "
                             "key)")


def test_nothing_due_run_checks_cheaply(tmp_path, pebble, issued):
    """No certificate is parsed on a nothing-due run: cryptography is never imported."""
    cfg, _ = issued
    env = {**os.environ, **pebble.env()}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "certbatch", "renew", "-c",
                             str(cfg)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0
    assert "certbatch.cli" in result.stderr  # the import log is there...
    assert "cryptography" not in result.stderr  # ...and names no cryptography module


def test_hooks_run_with_umask_077(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, certs("www"))
    hook = tmp_path / "hooks/deploy.d/10-extra"
    hook.write_text('#!/bin/sh\necho x > "$CERTBATCH_STAGE_DIR/extra.pem"\n')
    hook.chmod(0o755)
    old = os.umask(0)
    try:
        assert run(["renew"], cfg, pebble).returncode == 0
    finally:
        os.umask(old)
    extra = next((tmp_path / "spool/applied").glob("*/www/extra.pem"))
    assert extra.stat().st_mode & 0o777 == 0o600


def test_check_reports_damaged_live_files_and_unsafe_folders(tmp_path, pebble, issued):
    cfg, _ = issued
    (tmp_path / "state/certs/www/live/cert.pem").write_text("garbage\n")
    result = run(["check"], cfg, pebble)
    assert result.returncode == 1
    assert ("certbatch: problem: www: DAMAGED (cert.pem was changed after it was stored (8 "
            "bytes, not ") in result.stderr
    assert "the next `certbatch renew` reissues it" in result.stderr
    (tmp_path / "spool").chmod(0o777)
    result = run(["check"], cfg, pebble)
    assert f"certbatch: problem: spool folder {tmp_path / 'spool'}: is writable by others " \
           "(mode 0777): a shared folder" in result.stderr


def test_forged_entry_of_a_renewed_certificate_does_not_wedge_the_spool(tmp_path, pebble,
                                                                         issued):
    cfg, probes = issued
    forged = forge_pending_www(tmp_path)

    result = run(["renew", "--force"], cfg, pebble)

    assert result.returncode == 1
    assert result.stderr == (f"certbatch: www: not-staged: renewed, not staged: "
                             f"{forged}: is owned by nobody (uid 65534), not by root "
                             f"(uid 0) who runs certbatch; not replaced\n")
    assert forged.stat().st_uid == NOBODY  # neither moved nor deleted
    assert probe_lines(probes, "50-apply")[-1]["CERTBATCH_NAMES"] == "api"
    again = run(["run-hook"], cfg, pebble)  # the spool still works
    assert again.returncode == 0, again.stderr


def test_symlinked_hook_in_another_users_folder_does_not_run(tmp_path, pebble):
    """The link in notify.d is root's and so is the file, but its real folder is nobody's:
    nobody could rename their own script over it between the check and the run."""
    cfg = write_config(tmp_path, pebble, certs("www"))
    probes = tmp_path / "probes"
    probes.mkdir()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    hook = probe_hook(theirs / "app", probes)
    os.chown(theirs, NOBODY, NOBODY)
    (tmp_path / "hooks/notify.d/app").symlink_to(hook)
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 1
    assert f"not run: {theirs}: is owned by nobody (uid 65534): another user could swap what " \
           "is inside it" in result.stderr
    assert probe_lines(probes, "app") == []


def test_state_through_another_users_symlink_is_refused(tmp_path, pebble):
    real = tmp_path / "real-state"
    real.mkdir(mode=0o700)
    link = tmp_path / "sticky"
    link.mkdir()
    link.chmod(0o1777)
    (link / "state").symlink_to(real)
    os.chown(link / "state", NOBODY, NOBODY, follow_symlinks=False)
    cfg = write_config(tmp_path, pebble, certs("www"), paths={"state": str(link / "state")})
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 2
    assert result.stderr == (f"certbatch: error: {link / 'state'}: is a symlink owned by nobody "
                             "(uid 65534): another user could point it elsewhere\n")
    assert os.listdir(real) == []
