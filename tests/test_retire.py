"""`certbatch revoke` and `certbatch remove`, against the real Pebble (revocations are read back
through Pebble's management API, `/cert-status-by-serial/<serial>`, which Pebble 2.4 serves),
plus the renewal decision after a revocation (table-driven, no I/O)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from cli_helpers import NoCA, live, probe_hook, run, write_config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_renewal import STAGED, T0, cert, stored

from certbatch import renewal
from certbatch.store import CertStatus

TIMEOUT = 60  # every child process


def ca_status(pebble, serial: str) -> dict:
    """What Pebble says about a certificate: Status (Valid | Revoked), Reason, RevokedAt."""
    resp = requests.get(f"{pebble.management_url}/cert-status-by-serial/{serial}",
                        verify=str(pebble.ca_bundle), timeout=10)
    resp.raise_for_status()
    data: dict = resp.json()
    return data


def status_json(folder: Path, name: str) -> dict:
    data: dict = json.loads((folder / "state" / "certs" / name / "status.json").read_text())
    return data


def issue(folder: Path, pebble, names=("site",), exit_code: int = 0) -> Path:
    config = write_config(folder, pebble, {n: {"domains": [f"{n}.retire.example"]}
                                           for n in names})
    result = run(["renew"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == exit_code, result.stderr
    return config


# -- the decision after a revocation ----------------------------------------------------------

REVOKED = dataclasses.replace(STAGED, revoked_serial="01", revoked_at=T0,
                              revoked_reason="superseded", revoked_renew=True)


@pytest.mark.parametrize("status, action", [
    (REVOKED, renewal.REISSUE),
    (dataclasses.replace(REVOKED, revoked_renew=False), renewal.SKIP),  # --no-renew
    (dataclasses.replace(REVOKED, revoked_serial="02"), renewal.SKIP),  # replaced already
])
def test_a_revoked_live_certificate_is_reissued_unless_told_not_to(status, action):
    decision = renewal.decide(cert(), stored(), status, T0 + dt.timedelta(days=1), None)
    assert decision.action == action
    if action == renewal.REISSUE:
        assert decision.reason == "revoked 2026-01-01 00:00Z (superseded)"
        assert decision.needs_order


def test_revocation_fields_survive_status_json():
    assert CertStatus.from_json(REVOKED.to_json()) == REVOKED
    assert CertStatus.from_json("{}").revoked_serial is None


# -- revoke ----------------------------------------------------------------------------------

def test_revoke_with_the_account_then_renew_replaces_it(tmp_path, pebble):
    config = issue(tmp_path, pebble)
    serial = live(tmp_path, "site")["serial"]
    assert ca_status(pebble, serial)["Status"] == "Valid"

    result = run(["revoke", "site", "--reason", "superseded"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert f"site: serial {serial} revoked at the CA (reason superseded, signed with the " \
           f"account); the next `certbatch renew` replaces it" in result.stdout
    seen = ca_status(pebble, serial)
    assert (seen["Status"], seen["Reason"]) == ("Revoked", 4)
    status = status_json(tmp_path, "site")
    assert (status["revoked_serial"], status["revoked_reason"], status["revoked_renew"]) == \
        (serial, "superseded", True)

    plan = run(["renew", "--dry-run"], config, pebble, timeout=TIMEOUT)
    assert "reissue" in plan.stdout and "revoked" in plan.stdout and "(superseded)" in plan.stdout
    detail = run(["status", "site"], config, pebble, timeout=TIMEOUT).stdout.splitlines()
    assert any(line.startswith(f"revoked: the live certificate (serial {serial}) on ")
               and line.endswith(", reason superseded; the next `certbatch renew` replaces it")
               for line in detail), detail

    result = run(["renew"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    new = live(tmp_path, "site")["serial"]
    assert new != serial
    assert ca_status(pebble, new)["Status"] == "Valid"
    plan = run(["renew", "--dry-run"], config, pebble, timeout=TIMEOUT)
    assert "skip" in plan.stdout and "revoked" not in plan.stdout
    detail = run(["status", "site"], config, pebble, timeout=TIMEOUT).stdout
    assert f"revoked: an earlier certificate (serial {serial})" in detail
    assert "replaced since" in detail


def test_key_compromise_is_signed_with_the_certificate_key_and_no_renew_keeps_it(tmp_path,
                                                                                  pebble):
    config = issue(tmp_path, pebble)
    serial = live(tmp_path, "site")["serial"]
    # No account at all: only the certificate's own key can sign the request.
    shutil.rmtree(tmp_path / "state" / "accounts")
    refused = run(["revoke", "site"], config, pebble, timeout=TIMEOUT)
    assert refused.returncode == 1
    assert "no ACME account" in refused.stderr
    assert ca_status(pebble, serial)["Status"] == "Valid"

    result = run(["revoke", "site", "--reason", "keyCompromise", "--no-renew"], config, pebble,
                 timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "reason keyCompromise, signed with the certificate's key" in result.stdout
    assert "--no-renew: it stays live, revoked, until it is due" in result.stdout
    seen = ca_status(pebble, serial)
    assert (seen["Status"], seen["Reason"]) == ("Revoked", 1)
    assert status_json(tmp_path, "site")["revoked_renew"] is False

    again = run(["revoke", "site", "--reason", "keyCompromise", "--no-renew"], config, pebble,
                timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr
    assert f"site: serial {serial} was already revoked at the CA" in again.stdout
    assert status_json(tmp_path, "site")["revoked_reason"] == "keyCompromise"  # kept

    result = run(["renew"], config, pebble, timeout=TIMEOUT)  # not due: nothing ordered
    assert result.returncode == 0, result.stderr
    assert live(tmp_path, "site")["serial"] == serial


def test_a_ca_refusal_is_exit_1_with_its_message_and_records_nothing(tmp_path, pebble):
    config = issue(tmp_path, pebble)
    serial = live(tmp_path, "site")["serial"]
    # Another key of the same size in place of the certificate's: the CA refuses the proof.
    key = live_folder(tmp_path, "site") / "privkey.pem"
    other = tmp_path / "other.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    other.chmod(0o600)
    os.replace(other, key)
    result = run(["revoke", "site", "--reason", "keyCompromise"], config, pebble,
                 timeout=TIMEOUT)
    assert result.returncode == 1
    assert f"certbatch: error: the CA refused to revoke site (serial {serial}): " \
           f"urn:ietf:params:acme:error:" in result.stderr
    assert ca_status(pebble, serial)["Status"] == "Valid"
    assert "revoked_serial" not in status_json(tmp_path, "site") or \
        status_json(tmp_path, "site")["revoked_serial"] is None


def live_folder(folder: Path, name: str) -> Path:
    return (folder / "state" / "certs" / name / "live").resolve()


def test_revoke_unknown_or_never_issued_is_exit_2(tmp_path, pebble):
    config = write_config(tmp_path, pebble, {"site": {"domains": ["site.retire.example"]}})
    result = run(["revoke", "nosuch"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "no certificate named nosuch" in result.stderr
    result = run(["revoke", "site"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "site has no certificate yet" in result.stderr
    result = run(["revoke", "site", "--reason", "cACompromise"], config, pebble,
                 timeout=TIMEOUT)
    assert result.returncode == 2


# -- remove ----------------------------------------------------------------------------------

def test_remove_deletes_state_pending_ledger_and_index_entries(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    hooks = tmp_path / "hooks" / "notify.d"
    probe_hook(hooks / "ok", probes)
    probe_hook(hooks / "broken", probes, exit_code=1)  # keeps both entries pending
    config = issue(tmp_path, pebble, names=("old", "keep"), exit_code=1)
    state, spool = tmp_path / "state", tmp_path / "spool"
    ledger = spool / "targets" / "ok" / "ledger.json"
    assert {"old", "keep"} <= set(json.loads(ledger.read_text())["applied"])
    assert (spool / "pending" / "old").is_dir()
    assert "old" in json.loads((state / "index.json").read_text())["certs"]

    refused = run(["remove", "old", "--yes"], config, pebble, timeout=TIMEOUT)
    assert refused.returncode == 2
    assert "old is still in the config" in refused.stderr
    assert "remove it from there first" in refused.stderr

    config = write_config(tmp_path, pebble, {"keep": {"domains": ["keep.retire.example"]}})
    refused = run(["remove", "old"], config, pebble, timeout=TIMEOUT)  # no terminal, no --yes
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert (state / "certs" / "old").is_dir() and (spool / "pending" / "old").is_dir()

    result = run(["remove", "old", "--yes"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("old: removed (")
    assert not (state / "certs" / "old").exists()
    assert [p.name for p in (state / "certs").iterdir()] == ["keep"]  # no temp folder left
    assert not (spool / "pending" / "old").exists()
    assert set(json.loads(ledger.read_text())["applied"]) == {"keep"}
    assert set(json.loads((state / "index.json").read_text())["certs"]) <= {"keep"}
    assert (spool / "pending" / "keep").is_dir()  # the other certificate is untouched

    again = run(["remove", "old", "--yes"], config, pebble, timeout=TIMEOUT)
    assert again.returncode == 2
    assert "nothing named old" in again.stderr
    result = run(["renew"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 1  # the broken target still fails, for keep only
    assert "old" not in json.loads(ledger.read_text())["applied"]


def test_remove_deletes_the_copies_in_applied_batches_too(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    probe_hook(tmp_path / "hooks" / "notify.d" / "ok", probes)
    config = issue(tmp_path, pebble, names=("old", "keep"))  # applied: both in applied/<batch>
    spool = tmp_path / "spool"
    assert {p.name for p in spool.glob("applied/*/*") if p.is_dir()} == {"old", "keep"}
    config = write_config(tmp_path, pebble, {"keep": {"domains": ["keep.retire.example"]}})
    result = run(["remove", "old", "--yes"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "1 copy in " in result.stdout and "keys included" in result.stdout
    assert not list(spool.glob("applied/*/old")) and not list(spool.glob(".staging/*"))
    assert [p.name for p in spool.glob("applied/*/keep")] == ["keep"]
    assert (next(spool.glob("applied/*/keep")) / "privkey.pem").is_file()
    # nothing left to remove, anywhere
    again = run(["remove", "old", "--yes"], config, pebble, timeout=TIMEOUT)
    assert again.returncode == 2 and "nothing named old" in again.stderr


def test_remove_never_follows_a_symlink_nor_takes_a_path(tmp_path, pebble):
    config = write_config(tmp_path, pebble, {"site": {"domains": ["site.retire.example"]}})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    certs = tmp_path / "state" / "certs"
    certs.mkdir(parents=True, mode=0o700)
    (tmp_path / "state").chmod(0o700)
    (certs / "evil").symlink_to(outside)
    result = run(["remove", "evil", "--yes"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "symlink" in result.stderr
    assert (outside / "precious").exists() and (certs / "evil").is_symlink()
    pending = tmp_path / "spool" / "pending"
    pending.mkdir(parents=True, mode=0o700)
    (tmp_path / "spool").chmod(0o700)
    (pending / "evil").symlink_to(outside)
    (certs / "evil").unlink()
    (certs / "evil").mkdir(mode=0o700)  # deleted only if everything else may be
    result = run(["remove", "evil", "--yes"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 2
    assert f"{pending / 'evil'}: is a symlink" in result.stderr
    assert (certs / "evil").is_dir() and (outside / "precious").exists()
    for name in ("../outside", "a/b", ".hidden"):
        result = run(["remove", name, "--yes"], config, pebble, timeout=TIMEOUT)
        assert result.returncode == 2
        assert "invalid certificate name" in result.stderr
    assert (outside / "precious").exists()


def _on_a_terminal(args: list[str], answer: str) -> tuple[int, str]:
    """Run certbatch with a pseudo-terminal as stdin and stdout; type `answer` at the prompt."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "CERTBATCH_CONFIG"}
    proc = subprocess.Popen([sys.executable, "-m", "certbatch", *args], stdin=slave,
                            stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output, deadline, answered = b"", time.monotonic() + TIMEOUT, False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
                if not answered and b"[y/N]" in output:
                    os.write(master, answer.encode() + b"\n")
                    answered = True
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=TIMEOUT), output.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_remove_asks_on_a_terminal(tmp_path, pebble):
    config = issue(tmp_path, pebble, names=("old",))
    config = write_config(tmp_path, pebble, {"new": {"domains": ["new.retire.example"]}})
    folder = tmp_path / "state" / "certs" / "old"
    code, output = _on_a_terminal(["remove", "old", "-c", str(config)], "n")
    assert code == 1, output
    assert f"{folder} (live certificate serial" in output
    assert "nothing removed" in output and folder.is_dir()
    code, output = _on_a_terminal(["remove", "old", "-c", str(config)], "y")
    assert code == 0, output
    assert "old: removed" in output and not folder.exists()


def test_remove_that_cannot_delete_the_pending_key_fails_and_keeps_the_state(tmp_path,
                                                                             monkeypatch):
    """The spool goes first: a pending entry that cannot be deleted (an immutable file, EIO)
    is an error naming it, and the state folder stays, so a second `remove` finishes."""
    from test_store import save

    from certbatch import config as config_mod
    from certbatch import retire
    from certbatch.errors import StoreError
    from certbatch.spool import spool as spool_mod
    from certbatch.store import Store

    cfg = write_config(tmp_path, NoCA(tmp_path), {"keep": {"domains": ["keep.example"]}})
    save(Store(tmp_path / "state"), "0a")  # certificate "site", no longer configured
    pending = tmp_path / "spool" / "pending" / "site"
    pending.mkdir(parents=True, mode=0o700)
    (pending / "privkey.pem").write_text("KEY")
    settings = config_mod.load(cfg)

    def refuse(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(spool_mod.shutil, "rmtree", refuse)
    with pytest.raises(StoreError, match="not all deleted"):
        retire.remove(settings, "site")
    assert (tmp_path / "state" / "certs" / "site").is_dir()  # kept: nothing half-forgotten
    assert not pending.exists()  # no target gets it any more, even so
    monkeypatch.undo()
    retire.remove(settings, "site")
    assert not (tmp_path / "state" / "certs" / "site").exists()


def test_remove_deletes_the_copies_in_pruned_batches_not_deleted_yet(tmp_path, pebble):
    # a pruned batch whose background deleter was killed (a service manager may do that): its
    # keys must go with `remove` too, listed first
    probes = tmp_path / "probes"
    probes.mkdir()
    probe_hook(tmp_path / "hooks" / "notify.d" / "ok", probes)
    config = issue(tmp_path, pebble, names=("old", "keep"))
    spool = tmp_path / "spool"
    (batch,) = [p for p in (spool / "applied").iterdir() if p.is_dir()]
    (spool / ".trash").mkdir(mode=0o700)
    batch.rename(spool / ".trash" / f"{batch.name}.abc123")
    config = write_config(tmp_path, pebble, {"keep": {"domains": ["keep.retire.example"]}})
    result = run(["remove", "old", "--yes"], config, pebble, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "pruned batches not deleted yet; keys included" in result.stdout
    assert not list(spool.glob(".trash/*/old"))
    assert not list(spool.glob(".trash/*"))  # the rest too: a run deletes leftovers it finds
