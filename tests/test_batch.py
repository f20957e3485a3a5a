"""Batched post-hooks through the real `certbatch` command and a real Pebble (issue: the heart).

Deploy hooks stage per certificate, one notify hook applies the batch, a failed notify is retried,
a failed deploy is staged again without a new order, and a real nginx is reloaded exactly once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from cli_helpers import REPO, live, probe_hook, probe_lines, run, write_config
from nginx_server import NginxServer, self_signed

NAMES = [f"b{i}" for i in range(1, 6)]


def five(tmp_path, pebble, **sections):
    return write_config(tmp_path, pebble,
                        {n: {"domains": [f"{n}.batch.example.com"]} for n in NAMES}, **sections)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash and mode, and every folder's mode."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        data = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(folder))] = f"{data}:{oct(st.st_mode)}:{st.st_mtime_ns}"
    return out


def test_five_renewed_deploy_once_each_notify_once_with_all(tmp_path, pebble):
    cfg = five(tmp_path, pebble)
    probes = tmp_path / "probes"
    probes.mkdir()
    probe_hook(tmp_path / "hooks/deploy.d/10-first", probes)
    probe_hook(tmp_path / "hooks/deploy.d/20-second", probes)
    # the notify hook copies batch.json so the test can read what it saw
    probe_hook(tmp_path / "hooks/notify.d/50-apply", probes,
               extra=f'cp "$CERTBATCH_BATCH_FILE" {probes}/batch-seen.json')

    result = run(["renew"], cfg, pebble)
    assert result.returncode == 0, result.stderr

    for hook in ("10-first", "20-second"):
        calls = probe_lines(probes, hook)
        assert sorted(c["CERTBATCH_NAME"] for c in calls) == NAMES  # once per certificate
        for c in calls:
            stage = Path(c["CERTBATCH_STAGE_DIR"])
            assert c["cwd"] == str(stage)
            assert c["CERTBATCH_KEY_FILE"] == str(stage / "privkey.pem")
            assert c["CERTBATCH_DOMAINS"] == f"{c['CERTBATCH_NAME']}.batch.example.com"
    notify = probe_lines(probes, "50-apply")
    assert len(notify) == 1  # exactly once for the whole batch
    assert notify[0]["CERTBATCH_COUNT"] == "5"
    assert notify[0]["CERTBATCH_NAMES"].split() == NAMES
    assert notify[0]["CERTBATCH_FAILED_NAMES"] == ""
    batch = json.loads((probes / "batch-seen.json").read_text())
    assert [c["name"] for c in batch["certificates"]] == NAMES
    for entry in batch["certificates"]:
        assert entry["serial"] == live(tmp_path, entry["name"])["serial"]
    assert not list((tmp_path / "spool/pending").iterdir())
    applied = list((tmp_path / "spool/applied").iterdir())
    assert len(applied) == 1 and sorted(p.name for p in applied[0].iterdir() if p.is_dir()) \
        == NAMES
    assert "notify: applied batch" in result.stdout


def test_failed_notify_keeps_batch_and_next_run_refires_with_nothing_renewed(tmp_path, pebble):
    cfg = five(tmp_path, pebble)
    probes = tmp_path / "probes"
    probes.mkdir()
    gate = tmp_path / "nginx-is-broken"
    gate.write_text("1")
    probe_hook(tmp_path / "hooks/notify.d/50-apply", probes,
               extra=f'if [ -e {gate} ]; then echo "nginx: config test failed" >&2; exit 1; fi')

    first = run(["renew"], cfg, pebble)
    assert first.returncode == 1
    assert "notify failed" in first.stderr and "nginx: config test failed" in first.stderr
    assert sorted(p.name for p in (tmp_path / "spool/pending").iterdir()) == NAMES
    serials = {n: live(tmp_path, n)["serial"] for n in NAMES}

    # Still broken: the next cron run fires the notify hook again, renewing nothing.
    second = run(["renew"], cfg, pebble)
    assert second.returncode == 1
    assert {n: live(tmp_path, n)["serial"] for n in NAMES} == serials
    assert len(probe_lines(probes, "50-apply")) == 2

    gate.unlink()  # the operator fixed nginx
    third = run(["renew"], cfg, pebble)
    assert third.returncode == 0, third.stderr
    calls = probe_lines(probes, "50-apply")
    assert len(calls) == 3 and calls[-1]["CERTBATCH_NAMES"].split() == NAMES
    assert not list((tmp_path / "spool/pending").iterdir())
    # and after that, nothing pending: no notify at all
    assert run(["renew"], cfg, pebble).returncode == 0
    assert len(probe_lines(probes, "50-apply")) == 3


def test_failed_deploy_for_one_others_applied_then_staged_without_new_order(tmp_path, pebble):
    cfg = five(tmp_path, pebble)
    probes = tmp_path / "probes"
    probes.mkdir()
    gate = tmp_path / "b3-deploy-breaks"
    gate.write_text("1")
    probe_hook(tmp_path / "hooks/deploy.d/10-check", probes,
               extra=f'if [ "$CERTBATCH_NAME" = b3 ] && [ -e {gate} ]; then '
                     f'echo "cannot write combined pem" >&2; exit 4; fi')
    probe_hook(tmp_path / "hooks/notify.d/50-apply", probes)

    first = run(["renew"], cfg, pebble)
    assert first.returncode == 1
    err = [line for line in first.stderr.splitlines() if line.startswith("certbatch: b3:")]
    assert err and "not-staged" in err[0] and "10-check" in err[0] and "4" in err[0]
    assert "cannot write combined pem" in err[0]
    notify = probe_lines(probes, "50-apply")
    assert len(notify) == 1
    assert notify[0]["CERTBATCH_NAMES"].split() == ["b1", "b2", "b4", "b5"]
    assert notify[0]["CERTBATCH_FAILED_NAMES"] == "b3"
    b3_serial = live(tmp_path, "b3")["serial"]  # stored, just not staged

    status = run(["status", "--json"], cfg, pebble)
    b3 = next(c for c in json.loads(status.stdout)["certificates"] if c["name"] == "b3")
    assert b3["due"] and b3["decision"] == "restage" and b3["last_result"] == "not-staged"

    gate.unlink()
    second = run(["renew", "--json"], cfg, pebble)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    outcomes = {c["name"]: c["outcome"] for c in report["certificates"]}
    assert outcomes == {"b1": "not-due", "b2": "not-due", "b3": "restaged", "b4": "not-due",
                        "b5": "not-due"}
    assert live(tmp_path, "b3")["serial"] == b3_serial  # no new ACME order
    assert report["notify"]["names"] == ["b3"]


def test_run_hook_dry_run_changes_nothing_then_run_hook_applies(tmp_path, pebble):
    cfg = five(tmp_path, pebble)
    probes = tmp_path / "probes"
    probes.mkdir()
    probe_hook(tmp_path / "hooks/notify.d/50-apply", probes)
    assert run(["renew", "--no-notify"], cfg, pebble).returncode == 0
    assert probe_lines(probes, "50-apply") == []

    before = tree_digest(tmp_path / "spool")
    dry = run(["run-hook", "--dry-run"], cfg, pebble)
    assert dry.returncode == 0, dry.stderr
    assert tree_digest(tmp_path / "spool") == before  # byte for byte, modes and times too
    assert probe_lines(probes, "50-apply") == []
    out = dry.stdout
    assert out.startswith("batch of 5 pending certificates:")
    for n in NAMES:
        assert f"{n}.batch.example.com" in out
    assert f"target 50-apply: would run {tmp_path / 'hooks/notify.d/50-apply'}" in out
    assert "CERTBATCH_NAMES=b1 b2 b3 b4 b5" in out
    assert "fullchain.pem" in out

    deploy_dry = run(["run-hook", "--deploy", "b2", "--dry-run"], cfg, pebble)
    assert deploy_dry.returncode == 0 and "would stage b2" in deploy_dry.stdout
    assert tree_digest(tmp_path / "spool") == before

    applied = run(["run-hook"], cfg, pebble)
    assert applied.returncode == 0, applied.stderr
    assert len(probe_lines(probes, "50-apply")) == 1
    assert run(["run-hook", "--dry-run"], cfg, pebble).stdout.strip() == "nothing pending"

    # --deploy re-stages one stored certificate (same serial, no order) without notifying
    serial = live(tmp_path, "b2")["serial"]
    restaged = run(["run-hook", "--deploy", "b2"], cfg, pebble)
    assert restaged.returncode == 0, restaged.stderr
    assert f"b2: staged (serial {serial})" in restaged.stdout
    assert [p.name for p in (tmp_path / "spool/pending").iterdir()] == ["b2"]
    assert json.loads((tmp_path / "spool/pending/b2/meta.json").read_text())["serial"] == serial
    assert len(probe_lines(probes, "50-apply")) == 1  # not notified yet
    assert run(["run-hook", "--deploy", "nope"], cfg, pebble).returncode == 2


def test_nginx_end_to_end_three_renewed_one_reload(tmp_path, pebble):
    names = ["one.nginx.example.com", "two.nginx.example.com", "three.nginx.example.com"]
    cert_dir = tmp_path / "nginx-certs"
    for n in names:  # nginx starts with self-signed placeholders
        self_signed([n]).install(cert_dir / n)
    hooks = tmp_path / "hooks"
    (hooks / "notify.d").mkdir(parents=True)
    shutil.copy(REPO / "hooks/notify.d/nginx", hooks / "notify.d/50-nginx")
    cfg = write_config(tmp_path, pebble, {n: {"domains": [n]} for n in names})
    with NginxServer(tmp_path / "nginx", cert_dir, names) as nginx:  # started by `with`
        old = {n: nginx.served_serial(n) for n in names}
        result = run(["renew"], cfg, pebble, env=nginx.hook_env())
        assert result.returncode == 0, result.stderr
        for n in names:
            new = int(live(tmp_path, n)["serial"], 16)
            assert new != old[n]
            assert nginx.wait_for_serial(n, new) == new
        assert nginx.reload_count() == 1


def test_unusable_spool_is_refused_before_any_order(tmp_path, pebble):
    """A spool that cannot be created is found before any work: one line, exit 2, no order.
    (A spool that fails during staging keeps the certificate stored and restages it later:
    see test_spool's write-failure test and the crash tests.)"""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the spool path runs through a regular file: every write fails
    cfg = write_config(tmp_path, pebble, {"s1": {"domains": ["s1.batch.example.com"]}},
                       paths={"spool": str(blocker / "spool")})
    first = run(["renew"], cfg, pebble)
    assert first.returncode == 2
    assert first.stderr.startswith(f"certbatch: error: {blocker / 'spool'}: ")
    assert not (tmp_path / "state" / "certs").exists()

    write_config(tmp_path, pebble, {"s1": {"domains": ["s1.batch.example.com"]}})
    second = run(["renew", "--json"], cfg, pebble)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["certificates"][0]["outcome"] == "issued"


def test_run_killed_between_storing_and_staging_is_staged_by_the_next_run(tmp_path, pebble):
    """SIGKILL while the deploy hook runs: the new certificate is live in the store but was
    never staged; the next run must stage it (without a new order), not skip it for 60 days."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = write_config(tmp_path, pebble, {"k1": {"domains": ["k1.batch.example.com"]}})
    assert run(["renew"], cfg, pebble).returncode == 0
    first = live(tmp_path, "k1")["serial"]
    started = tmp_path / "hook-started"
    hook = tmp_path / "hooks/deploy.d/10-slow"
    hook.write_text(f"#!/bin/sh\ntouch {started}\nsleep 30\n")
    hook.chmod(0o755)
    env = dict(os.environ, **pebble.env())
    env.pop("CERTBATCH_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "certbatch", "-c", str(cfg), "renew",
                             "--force"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists()
        os.killpg(proc.pid, signal.SIGKILL)  # certbatch and its hook, like a power cut
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    renewed = live(tmp_path, "k1")["serial"]
    assert renewed != first  # stored before the kill
    hook.unlink()
    dry = run(["renew", "--dry-run"], cfg, pebble)
    assert dry.stdout.split()[:2] == ["k1", "restage"]
    again = run(["renew", "--json"], cfg, pebble)
    assert again.returncode == 0, again.stderr
    entry = json.loads(again.stdout)["certificates"][0]
    assert entry["outcome"] == "restaged" and entry["staged"]
    assert live(tmp_path, "k1")["serial"] == renewed  # no new order
    batch = json.loads(again.stdout)["notify"]["batch_id"]
    assert sorted(p.name for p in (tmp_path / "spool/applied").iterdir())[-1] == batch
    meta = json.loads((tmp_path / "spool/applied" / batch / "k1/meta.json").read_text())
    assert meta["serial"] == renewed
