"""Apply targets through the real command: every notify hook is a target with its own ledger,
run in parallel and isolated, retried alone, and never reported as applied when it was not.

Real Pebble, real nginx (two instances as two targets), real hook processes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from cli_helpers import REPO, live, probe_hook, probe_lines, run, write_config
from nginx_server import NginxServer, self_signed

NGINX_HOOK = REPO / "hooks" / "notify.d" / "nginx"


def certs(*names: str) -> dict[str, dict[str, list[str]]]:
    return {n: {"domains": [f"{n}.targets.example.com"]} for n in names}


def ledger(tmp_path: Path, target: str) -> dict:
    return json.loads((tmp_path / "spool" / "targets" / target / "ledger.json").read_text())


def pending(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "spool" / "pending"))


# -- two real nginx and a failing target ------------------------------------------------------

def test_two_nginx_targets_and_a_failing_one(tmp_path, pebble):
    names = ["web1", "web2"]
    servers = []
    for i in (1, 2):
        cert_dir = tmp_path / f"nginx{i}" / "certs"
        for n in names:  # the helper's server names are the certificate names
            self_signed([f"{n}.targets.example.com"]).install(cert_dir / n)
        server = NginxServer(tmp_path / f"nginx{i}", cert_dir, names).start()
        servers.append(server)
    try:
        targets = {f"nginx{i}": {"command": [str(NGINX_HOOK)], "env": s.hook_env()}
                   for i, s in enumerate(servers, 1)}
        targets["broken"] = {"command": "echo 'backend unreachable' >&2; exit 3",
                             "timeout": 30}
        cfg = write_config(tmp_path, pebble, certs(*names), hooks={"targets": targets})

        first = run(["renew"], cfg, pebble)

        assert first.returncode == 1
        assert first.stderr.splitlines() == [
            "certbatch: notify failed for target broken: hook broken exited with status 3: "
            "backend unreachable; 2 certificates stay pending for it: fix it, then run "
            "`certbatch run-hook`"]
        assert "applied batch" in first.stdout and "nginx1 (2)" in first.stdout
        for server in servers:
            for n in names:
                serial = int(live(tmp_path, n)["serial"], 16)
                assert server.wait_for_serial(n, serial) == serial
            assert server.reload_count() == 1
        assert pending(tmp_path) == names  # held back by the failing target only
        assert ledger(tmp_path, "broken")["last_result"] == "failed"
        assert ledger(tmp_path, "nginx1")["applied"] == {
            n: live(tmp_path, n)["serial"] for n in names}

        # status says what waits for whom and what to do
        status = run(["status"], cfg, pebble)
        assert status.returncode == 0
        assert "pending: 2 certificates staged and not yet applied by every target: web1 web2" \
            in status.stdout
        rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()
                if line.startswith(("broken", "nginx"))}
        assert rows["broken"][1:3] == ["failed", "2"] and rows["nginx1"][1:3] == ["ok", "0"]
        assert "a target failed: fix it, then run `certbatch run-hook`" in status.stdout
        data = json.loads(run(["status", "--json"], cfg, pebble).stdout)
        broken = next(t for t in data["targets"] if t["target"] == "broken")
        assert broken["waiting_names"] == names and broken["state"] == "failed"
        assert "backend unreachable" in broken["last_error"]

        # The next run: nothing due; only the failing target runs again, and the nginx
        # instances are not reloaded again.
        second = run(["renew"], cfg, pebble)
        assert second.returncode == 1 and "target broken" in second.stderr
        assert [s.reload_count() for s in servers] == [1, 1]

        # Fixed: it alone gets what it lacks, and the entries leave pending/.
        fixed = dict(targets, broken={"command": "exit 0"})
        cfg = write_config(tmp_path, pebble, certs(*names), hooks={"targets": fixed})
        third = run(["run-hook"], cfg, pebble)
        assert third.returncode == 0, third.stderr
        assert third.stdout.startswith("notify: applied batch") and "broken (2)" in third.stdout
        assert "nginx1" not in third.stdout
        assert pending(tmp_path) == []
        assert [s.reload_count() for s in servers] == [1, 1]
    finally:
        for server in servers:
            server.stop()


# -- never report success it did not have ------------------------------------------------------

def test_not_executable_notify_hook_keeps_entries_pending(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, certs("ne"))
    probes = tmp_path / "probes"
    probes.mkdir()
    hook = probe_hook(tmp_path / "hooks/notify.d/50-reload", probes)
    hook.chmod(0o644)

    result = run(["renew"], cfg, pebble)

    assert result.returncode == 1
    assert result.stderr == (
        f"certbatch: notify failed for target 50-reload: target 50-reload cannot run: "
        f"{hook}: not executable (chmod +x it, or rename it to 50-reload.disabled to turn it "
        f"off); 1 certificate stays pending for it: fix it, then run `certbatch run-hook`\n")
    assert "applied" not in result.stdout
    assert pending(tmp_path) == ["ne"]
    assert run(["check"], cfg, pebble).returncode == 1

    hook.chmod(0o755)
    again = run(["run-hook"], cfg, pebble)
    assert again.returncode == 0, again.stderr
    assert len(probe_lines(probes, "50-reload")) == 1 and pending(tmp_path) == []


def test_no_targets_marks_the_batch_applied_and_says_so(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, certs("solo"))
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 0, result.stderr
    notify = [line for line in result.stdout.splitlines() if line.startswith("notify")]
    assert notify == ["notify: no notify targets (hooks/notify.d/ is empty, no hooks.targets or "
                      "hooks.notify): 1 certificate marked applied without running anything"]
    assert pending(tmp_path) == []


def test_deploy_hook_that_empties_its_folder_fails_the_certificate(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, certs("emptied", "fine"))
    (tmp_path / "hooks/deploy.d/10-oops").write_text(
        '#!/bin/sh\n[ "$CERTBATCH_NAME" = emptied ] && rm -f "$CERTBATCH_STAGE_DIR"/*\nexit 0\n')
    (tmp_path / "hooks/deploy.d/10-oops").chmod(0o755)
    probes = tmp_path / "probes"
    probes.mkdir()
    probe_hook(tmp_path / "hooks/notify.d/50-apply", probes)

    result = run(["renew"], cfg, pebble)

    assert result.returncode == 1
    assert result.stderr == (
        "certbatch: emptied: not-staged: renewed, not staged: the deploy hooks left the staged "
        "files damaged (privkey.pem is missing); staging discarded\n")
    (call,) = probe_lines(probes, "50-apply")
    assert call["CERTBATCH_NAMES"] == "fine"
    status = json.loads(run(["status", "--json"], cfg, pebble).stdout)
    row = next(c for c in status["certificates"] if c["name"] == "emptied")
    assert row["last_result"] == "not-staged" and row["decision"] == "restage"


def test_entry_damaged_after_staging_is_removed_and_restaged_next_run(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, certs("dmg", "ok"))
    probes = tmp_path / "probes"
    probes.mkdir()
    probe_hook(tmp_path / "hooks/notify.d/50-apply", probes)
    assert run(["renew", "--no-notify"], cfg, pebble).returncode == 0
    (tmp_path / "spool/pending/dmg/privkey.pem").write_text("")  # a person, a disk, a script

    result = run(["run-hook"], cfg, pebble)

    assert result.returncode == 1
    assert result.stderr == (
        "certbatch: dmg: staged entry damaged before it was applied (privkey.pem is empty); "
        "staged again from the store by the next `certbatch renew`\n")
    assert [c["CERTBATCH_NAMES"] for c in probe_lines(probes, "50-apply")] == ["ok"]
    assert pending(tmp_path) == []

    serial = live(tmp_path, "dmg")["serial"]
    healed = run(["renew", "--json"], cfg, pebble)
    assert healed.returncode == 0, healed.stderr
    report = json.loads(healed.stdout)
    (row,) = [c for c in report["certificates"] if c["name"] == "dmg"]
    assert (row["outcome"], row["serial"]) == ("restaged", serial)  # no new order
    assert [c["CERTBATCH_NAMES"] for c in probe_lines(probes, "50-apply")] == ["ok", "dmg"]


# -- retries, removal, new targets --------------------------------------------------------------

def test_hanging_target_is_killed_and_retried_others_apply(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, certs("h1"), hooks={"targets": {
        "slow": {"command": f"echo $$ > {probes}/slow.pid; exec sleep 60", "timeout": 1}}})
    probe_hook(tmp_path / "hooks/notify.d/fast", probes)

    t0 = time.monotonic()
    result = run(["renew"], cfg, pebble)

    assert time.monotonic() - t0 < 30
    assert result.returncode == 1
    assert "notify failed for target slow: hook slow timed out" in result.stderr
    assert len(probe_lines(probes, "fast")) == 1
    pid = int((probes / "slow.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert pending(tmp_path) == ["h1"]


def test_removed_target_no_longer_holds_entries_back(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, certs("rm1"),
                       hooks={"targets": {"gone-soon": "exit 1"}})
    assert run(["renew"], cfg, pebble).returncode == 1
    assert pending(tmp_path) == ["rm1"]

    cfg = write_config(tmp_path, pebble, certs("rm1"))  # the target is removed
    log = tmp_path / "log"
    result = run(["run-hook", "--log-file", str(log)], cfg, pebble)

    assert result.returncode == 0, result.stderr
    assert pending(tmp_path) == []
    assert not (tmp_path / "spool/targets/gone-soon").exists()
    assert log.read_text().count("target gone-soon is gone") == 1
    assert run(["run-hook", "--log-file", str(log)], cfg, pebble).returncode == 0
    assert log.read_text().count("target gone-soon is gone") == 1  # logged once


def test_new_target_with_all_gets_every_live_certificate(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, certs("n1", "n2", "n3"))
    probe_hook(tmp_path / "hooks/notify.d/old", probes)
    assert run(["renew"], cfg, pebble).returncode == 0
    assert pending(tmp_path) == []

    probe_hook(tmp_path / "hooks/notify.d/new", probes)
    dry = run(["run-hook", "--target", "new", "--all", "--dry-run"], cfg, pebble)
    assert dry.returncode == 0, dry.stderr
    assert "stage again 3 live certificates that are not pending: n1 n2 n3" in dry.stdout
    assert not probe_lines(probes, "new")

    result = run(["run-hook", "--target", "new", "--all"], cfg, pebble)

    assert result.returncode == 0, result.stderr
    (call,) = probe_lines(probes, "new")
    assert call["CERTBATCH_NAMES"] == "n1 n2 n3"
    assert Path(call["CERTBATCH_NAMES_FILE"]).parent == tmp_path / "spool/targets/new"
    assert len(probe_lines(probes, "old")) == 1  # it had these serials: not run again
    assert pending(tmp_path) == []
    assert run(["run-hook", "--all"], cfg, pebble).returncode == 2
    unknown = run(["run-hook", "--target", "nope"], cfg, pebble)
    assert unknown.returncode == 2 and "no notify target named nope" in unknown.stderr


def test_run_hook_target_runs_that_target_only(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, certs("o1"))
    probe_hook(tmp_path / "hooks/notify.d/a", probes)
    probe_hook(tmp_path / "hooks/notify.d/b", probes)
    assert run(["renew", "--no-notify"], cfg, pebble).returncode == 0

    result = run(["run-hook", "--target", "a"], cfg, pebble)

    assert result.returncode == 0, result.stderr
    assert len(probe_lines(probes, "a")) == 1 and probe_lines(probes, "b") == []
    assert pending(tmp_path) == ["o1"]  # b has not applied it yet
    assert run(["run-hook"], cfg, pebble).returncode == 0
    assert len(probe_lines(probes, "a")) == 1 and len(probe_lines(probes, "b")) == 1
    assert pending(tmp_path) == []


def test_deploy_restage_is_applied_again_by_every_target(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, certs("re"))
    probe_hook(tmp_path / "hooks/notify.d/t", probes)
    assert run(["renew"], cfg, pebble).returncode == 0
    assert run(["run-hook", "--deploy", "re"], cfg, pebble).returncode == 0
    assert run(["run-hook"], cfg, pebble).returncode == 0
    assert len(probe_lines(probes, "t")) == 2


# -- parallelism and the environment ----------------------------------------------------------

SPAN = 'date +%s.%N > "{probes}/$CERTBATCH_TARGET.start"; sleep 0.5; ' \
       'date +%s.%N > "{probes}/$CERTBATCH_TARGET.end"'


def spans(probes: Path, names: list[str]) -> list[tuple[float, float]]:
    return [(float((probes / f"{n}.start").read_text()), float((probes / f"{n}.end").read_text()))
            for n in names]


@pytest.mark.parametrize("workers", [1, 3])
def test_targets_run_in_parallel_up_to_notify_workers(tmp_path, pebble, workers):
    probes = tmp_path / "probes"
    probes.mkdir()
    names = ["t1", "t2", "t3"]
    cfg = write_config(tmp_path, pebble, certs("p1"), hooks={
        "notify_workers": workers,
        "targets": {n: SPAN.format(probes=probes) for n in names}})
    assert run(["renew"], cfg, pebble).returncode == 0
    s = spans(probes, names)
    overlaps = any(a_start < b_end and b_start < a_end
                   for i, (a_start, a_end) in enumerate(s) for b_start, b_end in s[i + 1:])
    if workers == 1:
        assert not overlaps and s == sorted(s), s  # one by one, in name order
    else:
        assert overlaps, s


def test_target_env_reaches_the_hook_and_cannot_override_certbatch(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, certs("e1"), hooks={"targets": {
        "envy": {"command": ["/bin/sh", "-c", f'echo "$NGINX_CERT_DIR:$PORT" > {probes}/out'],
                 "env": {"NGINX_CERT_DIR": "/srv/my certs", "PORT": 8443}}}})
    assert run(["renew"], cfg, pebble).returncode == 0
    assert (probes / "out").read_text() == "/srv/my certs:8443\n"

    bad = write_config(tmp_path / "bad", pebble, certs("e1"), hooks={"targets": {
        "envy": {"command": "true", "env": {"CERTBATCH_NAMES": "x"}}}})
    result = run(["renew"], bad, pebble)
    assert result.returncode == 2
    assert result.stderr == (f"certbatch: error: {bad}: hooks.targets.envy.env.CERTBATCH_NAMES: "
                             "CERTBATCH_NAMES is set by certbatch itself\n")
    # a value that is not a string is refused without being shown (env often holds tokens)
    bad = write_config(tmp_path / "bad2", pebble, certs("e1"), hooks={"targets": {
        "envy": {"command": "true", "env": {"TOKEN": 1.2345e300}}}})
    result = run(["check"], bad, pebble)
    assert (result.returncode, result.stderr) == (
        2, f"certbatch: error: {bad}: hooks.targets.envy.env.TOKEN: expected a string, got a "
           f"number (quote it)\n")


def test_target_settings_for_a_notify_d_file_and_clashes(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    probe_hook(tmp_path / "hooks/notify.d/nginx", probes, extra=f'echo "$X" > {probes}/x')
    cfg = write_config(tmp_path, pebble, certs("c1"),
                       hooks={"targets": {"nginx": {"env": {"X": "from config"}}}})
    assert run(["renew"], cfg, pebble).returncode == 0
    assert (probes / "x").read_text() == "from config\n"

    clash = write_config(tmp_path, pebble, certs("c1"),
                         hooks={"targets": {"nginx": "true"}})
    result = run(["run-hook"], clash, pebble)
    assert result.returncode == 2
    assert result.stderr == (f"certbatch: error: {clash}: hooks.targets.nginx.command: "
                             f"{tmp_path / 'hooks/notify.d'}/nginx is a target of that name too;"
                             " rename one\n")
    orphan = write_config(tmp_path, pebble, certs("c1"),
                          hooks={"targets": {"apache": {"timeout": 10}}})
    result = run(["check"], orphan, pebble)
    assert result.returncode == 2 and "hooks.targets.apache: no command" in result.stderr


def test_five_thousand_pending_names_apply_in_one_run(tmp_path, pebble):
    """Build 5,000 pending entries from one stored certificate (no live orders), then apply them:
    CERTBATCH_NAMES would be 325 KB, over Linux's 128 KiB limit for one variable."""
    cfg = write_config(tmp_path, pebble, certs("seed"))
    probes = tmp_path / "probes"
    probes.mkdir()
    assert run(["renew"], cfg, pebble).returncode == 0
    src = tmp_path / "spool" / "applied"
    seed = next(src.glob("*/seed"))
    names = [f"{i:05d}-" + "x" * 58 for i in range(5000)]
    assert all(len(n) == 64 for n in names)
    meta = json.loads((seed / "meta.json").read_text())
    pend = tmp_path / "spool" / "pending"
    for n in names:
        shutil.copytree(seed, pend / n)
        (pend / n / "meta.json").write_text(json.dumps(dict(meta, name=n)))
    (tmp_path / "hooks/notify.d/count").write_text(
        '#!/bin/sh\nset -eu\n'
        f'wc -l < "$CERTBATCH_NAMES_FILE" > {probes}/count\n'
        f'echo "${{CERTBATCH_NAMES_TRUNCATED:-0}} ${{CERTBATCH_NAMES:-unset}}" > {probes}/env\n'
        f'grep -c . "$CERTBATCH_BATCH_FILE" > /dev/null\n')
    (tmp_path / "hooks/notify.d/count").chmod(0o755)

    result = run(["run-hook"], cfg, pebble, timeout=300)

    assert result.returncode == 0, result.stderr
    assert int((probes / "count").read_text()) == 5000
    assert (probes / "env").read_text() == "1 unset\n"
    assert pending(tmp_path) == []


def test_metrics_per_target(tmp_path, pebble):
    from prometheus_client.parser import text_string_to_metric_families

    metrics = tmp_path / "certbatch.prom"
    cfg = write_config(tmp_path, pebble, certs("m1", "m2"), metrics={"file": str(metrics)},
                       hooks={"targets": {"good": "exit 0", "bad": "exit 1"}})
    assert run(["renew"], cfg, pebble).returncode == 1
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}

    def by_target(name: str) -> dict[str, float]:
        return {s.labels["target"]: s.value for s in families[name].samples}

    assert by_target("certbatch_target_pending_entries") == {"bad": 2, "good": 0}
    assert by_target("certbatch_target_last_run_ok") == {"bad": 0, "good": 1}
    success = by_target("certbatch_target_last_success_timestamp_seconds")
    assert list(success) == ["good"] and abs(success["good"] - time.time()) < 120
    assert families["certbatch_notify_ok"].samples[0].value == 0
    # without the notify phase the targets are still in the metrics, with what waits for them
    metrics.unlink()
    assert run(["renew", "--no-notify"], cfg, pebble).returncode == 0
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    assert by_target("certbatch_target_pending_entries") == {"bad": 2, "good": 0}
    assert by_target("certbatch_target_last_run_ok") == {"bad": 0, "good": 1}


# -- one certificate to many servers: ssh-push targets against real sshd ------------------------

def test_ssh_push_targets_one_host_down_then_up(tmp_path, pebble):
    from sshd_server import SshServer, require_sshd

    require_sshd()
    up = SshServer(tmp_path / "sshd-up").start()
    down = SshServer(tmp_path / "sshd-down")  # described, not started: a host that is down
    ssh_push = str(REPO / "hooks" / "notify.d" / "ssh-push")

    def config() -> Path:
        targets = {}
        for name, srv in (("host-up", up), ("host-down", down)):
            log = tmp_path / f"{name}.reloads"
            targets[name] = {"command": [ssh_push], "timeout": 60, "env": srv.hook_env(
                str(tmp_path / f"{name}-remote"), reload=f"echo reload >> '{log}'")}
        return write_config(tmp_path, pebble, certs("s1", "s2"), hooks={"targets": targets})

    try:
        first = run(["renew"], config(), pebble)
        assert first.returncode == 1
        (line,) = first.stderr.splitlines()  # only the host that is down failed
        assert line.startswith("certbatch: notify failed for target host-down: hook host-down ")
        assert "ssh-push: 127.0.0.1: " in line  # the hook's own line names the host
        for n in ("s1", "s2"):
            got = (tmp_path / "host-up-remote" / n / "fullchain.pem").read_bytes()
            assert got == (tmp_path / "state/certs" / n / "live/fullchain.pem").read_bytes()
            assert (tmp_path / "host-up-remote" / n / "privkey.pem").stat().st_mode & 0o077 == 0
        assert not (tmp_path / "host-down-remote").exists()
        assert (tmp_path / "host-up.reloads").read_text() == "reload\n"

        down.start()  # the host comes back (maybe on another port: the config is rewritten)
        second = run(["run-hook"], config(), pebble)
        assert second.returncode == 0, second.stderr
        assert "host-down (2)" in second.stdout and "host-up" not in second.stdout
        assert (tmp_path / "host-down.reloads").read_text() == "reload\n"
        assert (tmp_path / "host-up.reloads").read_text() == "reload\n"  # not run again
        assert pending(tmp_path) == []
    finally:
        up.stop()
        down.stop()


def test_only_the_variables_certbatch_sets_are_reserved(tmp_path, monkeypatch):
    """A hook's own CERTBATCH_* settings (the webhook's) may be set per target; a name list
    certbatch left out for its size is never replaced by one from certbatch's environment."""
    from certbatch.config import load
    from certbatch.hooks import HookCommand, run_hook

    cfg = tmp_path / "c.yaml"
    cfg.write_text("acme: {directory: https://ca.example/dir}\n"
                   "defaults: {challenge: {type: dns-01, script: /bin/true}}\n"
                   "certificates: {site: {domains: [a.example.com]}}\n"
                   "hooks: {targets: {hook: {command: 'true', env: "
                   "{CERTBATCH_WEBHOOK_URL: 'https://hooks.example/x'}}}}\n")
    target = load(cfg).hooks.targets["hook"]
    assert target.env == (("CERTBATCH_WEBHOOK_URL", "https://hooks.example/x"),)

    monkeypatch.setenv("CERTBATCH_NAMES", "stale")
    monkeypatch.setenv("CERTBATCH_WEBHOOK_TOKEN_FILE", "/etc/token")
    out = tmp_path / "seen"
    result = run_hook(HookCommand("h", ("/bin/sh", "-c",
                                        f'echo "${{CERTBATCH_NAMES-unset}} '
                                        f'$CERTBATCH_WEBHOOK_TOKEN_FILE" > {out}')),
                      {"CERTBATCH_NAMES_TRUNCATED": "1"}, tmp_path, 10)
    assert result.ok and out.read_text() == "unset /etc/token\n"


@pytest.mark.parametrize("meta", ["", '{"name": "mm", "staged_at": null}', None])
def test_entry_with_broken_meta_json_is_restaged_not_forgotten(tmp_path, pebble, meta):
    cfg = write_config(tmp_path, pebble, certs("mm", "ok"))
    probes = tmp_path / "probes"
    probes.mkdir()
    probe_hook(tmp_path / "hooks/notify.d/50-apply", probes)
    assert run(["renew", "--no-notify"], cfg, pebble).returncode == 0
    path = tmp_path / "spool/pending/mm/meta.json"
    if meta is None:
        path.unlink()
    else:
        path.write_text(meta)

    result = run(["run-hook"], cfg, pebble)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("certbatch: mm: staged entry damaged before it was applied "
                                    "(meta.json is ")
    assert [c["CERTBATCH_NAMES"] for c in probe_lines(probes, "50-apply")] == ["ok"]
    healed = run(["renew"], cfg, pebble)
    assert healed.returncode == 0, healed.stderr
    assert [c["CERTBATCH_NAMES"] for c in probe_lines(probes, "50-apply")] == ["ok", "mm"]
