"""SIGTERM, SIGINT and SIGHUP through the real command, with real hook processes.

Each test starts `python -m certbatch` in its own process group, with a hook that records its
PID (and a background child's) and then sleeps; once the hook runs, the signal goes to
certbatch only. certbatch must stop the hook's whole group, save every status, release its locks
and exit 128 + the signal number with one line on stderr; the next run must apply what was cut
short, and no notify hook of it may overlap the stopped one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import DNS_SCRIPT, dns01, probe_hook, probe_lines, run, write_config
from nginx_server import gone

from certbatch import interrupt
from certbatch.errors import Interrupted
from certbatch.hooks import HookCommand, run_hook

HOOK_WAIT = 30  # seconds a test waits for its slow hook to start (issuance comes first)
EXIT_WITHIN = 6.0  # certbatch must be gone this soon after the signal (KILL_GRACE is 2 s)


def slow_hook(path: Path, probes: Path, ignore_term: bool = False) -> Path:
    """A hook that logs "start <time> <pid>" to probes/<name>.log, starts a background child,
    writes both PIDs to probes/<name>.pid, then sleeps (unless probes/fast exists); on SIGTERM
    it logs "end <time>" and exits. `ignore_term`: it and its child ignore SIGTERM (only
    SIGKILL stops them)."""
    name = path.name
    log, pids = probes / f"{name}.log", probes / f"{name}.pid"
    trap = "trap '' TERM" if ignore_term else \
        f"trap 'echo \"end $(date +%s.%N)\" >> {log}; exit 143' TERM"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!/bin/sh
echo "start $(date +%s.%N) $$" >> {log}
if [ -e {probes}/fast ]; then echo "end $(date +%s.%N)" >> {log}; exit 0; fi
{trap}
sleep 300 &
echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}
wait
""")
    path.chmod(0o755)
    return path


def spans(log: Path) -> list[tuple[float, float | None]]:
    """(start, end) of each run of a slow hook; end None if it never logged one (killed)."""
    runs: list[tuple[float, float | None]] = []
    for line in log.read_text().splitlines():
        kind, ts = line.split()[:2]
        if kind == "start":
            runs.append((float(ts), None))
        else:
            runs[-1] = (runs[-1][0], float(ts))
    return runs


def start(args: list[str], cfg: Path, pebble) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("CERTBATCH_CONFIG", None)
    env.update(pebble.env())
    return subprocess.Popen([sys.executable, "-m", "certbatch", *args, "-c", str(cfg)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = HOOK_WAIT) -> list[int]:
    """The PIDs in `path` once it exists (certbatch must still be running)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"{path.name} never appeared (exit {proc.returncode}): {out}{err}")
        time.sleep(0.02)
    return [int(p) for p in path.read_text().split()]


def stop(proc: subprocess.Popen[str], signum: int, *more: int) -> tuple[int, str, str, float]:
    """Send `signum` to certbatch only (then `more`, 0.3 s apart); wait for it to exit."""
    t0 = time.monotonic()
    proc.send_signal(signum)
    for extra in more:
        time.sleep(0.3)
        proc.send_signal(extra)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"certbatch still running 20 s after {signum}: {out}{err}")
    return proc.returncode, out, err, time.monotonic() - t0


def assert_stopped(result: tuple[int, str, str, float], signum: int, pids: list[int]) -> None:
    code, _out, err, took = result
    name = signal.Signals(signum).name
    assert (code, err) == (128 + signum, f"certbatch: interrupted ({name})\n"), err
    assert took < EXIT_WITHIN, f"took {took:.1f} s"
    # The hook and its background child are gone by the time certbatch has exited.
    assert [p for p in pids if not gone(p)] == [], "hook processes outlived certbatch"


def status(tmp_path: Path, name: str) -> dict:
    f = tmp_path / "state" / "certs" / name / "status.json"
    return json.loads(f.read_text()) if f.exists() else {}


def ledger(tmp_path: Path, target: str) -> dict:
    return json.loads((tmp_path / "spool" / "targets" / target / "ledger.json").read_text())


def pending(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "spool" / "pending"))


def assert_no_overlap(log: Path) -> None:
    """Every run of the hook started after the previous one had ended (or been killed, which
    happened before certbatch exited: see assert_stopped)."""
    runs = spans(log)
    for (_, end), (next_start, _) in zip(runs, runs[1:], strict=False):
        assert end is None or end <= next_start, runs


# -- in-process: the handlers, the registry and run_hook -------------------------------------

def test_a_hook_stopped_mid_way_is_interrupted_whatever_it_exits_with(tmp_path):
    """A hook that traps SIGTERM and exits 0 was still cut short: interrupted, not ok. Once
    stopped, no hook starts. The graceful block raises only at its end."""
    pid_file = tmp_path / "pid"
    hook = tmp_path / "trapper"
    hook.write_text(f"#!/bin/sh\ntrap 'exit 0' TERM\nsleep 300 &\necho $$ $! > {pid_file}\n"
                    "wait\n")
    hook.chmod(0o755)
    results = []
    interrupt.install()
    try:
        with pytest.raises(Interrupted) as info, interrupt.graceful():
            worker = threading.Thread(target=lambda: results.append(
                run_hook(HookCommand("trapper", (str(hook),)), {}, tmp_path, 60)))
            worker.start()
            deadline = time.monotonic() + 10
            while not pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in this (main) thread
            worker.join(10)
            late = run_hook(HookCommand("late", ("/bin/sh", "-c", f"touch {tmp_path}/ran")),
                            {}, tmp_path, 60)
    finally:
        interrupt.uninstall()
    assert info.value.exit_code == 143 and str(info.value) == "interrupted"
    (result,) = results
    assert result.interrupted and not result.ok and result.returncode is None
    assert "stopped: certbatch was interrupted" in str(result.error())
    assert all(gone(int(p)) for p in pid_file.read_text().split())
    assert late.interrupted and not (tmp_path / "ran").exists()
    assert not interrupt.requested()  # uninstall resets


# -- SIGTERM during each kind of hook ---------------------------------------------------------

def test_sigterm_during_deploy_hook(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, {"dep": {"domains": ["dep.signals.example.com"]}})
    slow_hook(tmp_path / "hooks/deploy.d/10-slow", probes)
    probe_hook(tmp_path / "hooks/notify.d/apply", probes)

    proc = start(["renew"], cfg, pebble)
    pids = wait_for(probes / "10-slow.pid", proc)
    assert_stopped(stop(proc, signal.SIGTERM), signal.SIGTERM, pids)

    st = status(tmp_path, "dep")
    assert st["last_result"] == "failed"
    assert st["last_error"].startswith("interrupted: renewed and stored, not staged")
    assert probe_lines(probes, "apply") == []  # no notify phase after an interrupt
    assert pending(tmp_path) == []
    assert spans(probes / "10-slow.log")[0][1] is not None  # it got SIGTERM, trapped it

    (probes / "fast").touch()
    again = run(["renew"], cfg, pebble, timeout=60)
    assert again.returncode == 0, again.stderr
    assert status(tmp_path, "dep")["last_result"] == "restaged"  # no new order
    assert [p["CERTBATCH_NAMES"] for p in probe_lines(probes, "apply")] == ["dep"]


def test_sigterm_during_notify_target_then_run_hook_retries_it(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, {"nt": {"domains": ["nt.signals.example.com"]}})
    slow_hook(tmp_path / "hooks/notify.d/slow", probes)
    probe_hook(tmp_path / "hooks/notify.d/fast-target", probes)

    proc = start(["renew"], cfg, pebble)
    pids = wait_for(probes / "slow.pid", proc)
    result = stop(proc, signal.SIGTERM)
    # The next run-hook starts at once: no exit 75, and its hook cannot overlap the old one.
    (probes / "fast").touch()
    retry = run(["run-hook"], cfg, pebble, timeout=60)
    assert_stopped(result, signal.SIGTERM, pids)
    assert retry.returncode == 0, retry.stderr

    assert status(tmp_path, "nt")["last_result"] == "issued"  # the certificate itself is fine
    runs = spans(probes / "slow.log")
    assert len(runs) == 2
    assert_no_overlap(probes / "slow.log")
    led = ledger(tmp_path, "slow")
    assert "nt" in led["applied"] and led["last_result"] == "ok"
    # The other target applied it in the first run and was not run again.
    assert [p["CERTBATCH_NAMES"] for p in probe_lines(probes, "fast-target")] == ["nt"]
    assert pending(tmp_path) == []


def test_sigterm_during_notify_target_counts_as_failed(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, {"nf": {"domains": ["nf.signals.example.com"]}})
    slow_hook(tmp_path / "hooks/notify.d/slow", probes)

    proc = start(["renew"], cfg, pebble)
    pids = wait_for(probes / "slow.pid", proc)
    assert_stopped(stop(proc, signal.SIGTERM), signal.SIGTERM, pids)

    led = ledger(tmp_path, "slow")
    assert led["last_result"] == "failed" and "interrupted" in led["last_error"]
    assert led["applied"] == {}
    assert pending(tmp_path) == ["nf"]
    (probes / "fast").touch()
    again = run(["renew"], cfg, pebble, timeout=60)  # nothing due: applies what is pending
    assert again.returncode == 0, again.stderr
    assert pending(tmp_path) == [] and "nf" in ledger(tmp_path, "slow")["applied"]


@pytest.mark.parametrize("remove", ["quick", "hangs"])
def test_sigterm_during_dns_script(tmp_path, pebble, remove):
    probes = tmp_path / "probes"
    probes.mkdir()
    script = tmp_path / "dns.sh"
    script.write_text(f"""#!/bin/sh
echo "$1" >> {probes}/dns-calls
if [ -e {probes}/fast ]; then exec {DNS_SCRIPT} "$@"; fi
if [ "$1" = remove ] && [ {remove} = quick ]; then echo "$$" > {probes}/removed; exit 0; fi
sleep 300 &
echo "$$ $!" > {probes}/$1.pid.tmp && mv {probes}/$1.pid.tmp {probes}/$1.pid
wait
""")
    script.chmod(0o755)
    cfg = write_config(tmp_path, pebble, {"dns": {"domains": ["dns.signals.example.com"],
                                                  "challenge": dns01(script)}})
    probe_hook(tmp_path / "hooks/notify.d/apply", probes)

    proc = start(["renew"], cfg, pebble)
    pids = wait_for(probes / "add.pid", proc)
    code, out, err, took = stop(proc, signal.SIGTERM)

    # The one script run a stop still starts: `remove`, for the records `add` was run for, so
    # that none is left behind; one that hangs is killed 10 s after the signal.
    assert (probes / "dns-calls").read_text().split() == ["add", "remove"]
    if remove == "quick":
        assert (probes / "removed").exists()
        assert_stopped((code, out, err, took), signal.SIGTERM, pids)
    else:
        assert 9 < took < 18, took
        assert (code, err) == (128 + signal.SIGTERM, "certbatch: interrupted (SIGTERM)\n")
        remover = [int(p) for p in (probes / "remove.pid").read_text().split()]
        assert [p for p in pids + remover if not gone(p)] == [], "hooks outlived certbatch"
    st = status(tmp_path, "dns")
    assert st["last_result"] == "failed"
    assert st["last_error"].startswith("interrupted: dns script"), st["last_error"]
    assert not (tmp_path / "state" / "certs" / "dns" / "live").exists()

    (probes / "fast").touch()
    again = run(["renew"], cfg, pebble, timeout=60)
    assert again.returncode == 0, again.stderr
    assert status(tmp_path, "dns")["last_result"] == "issued"
    assert [p["CERTBATCH_NAMES"] for p in probe_lines(probes, "apply")] == ["dns"]


def test_a_remove_running_when_the_stop_comes_is_let_finish(tmp_path, pebble):
    # `remove` runs while the CA finalizes the order (acme_client._cleaning_up): a stop then
    # must not kill it, or the record would stay
    probes = tmp_path / "probes"
    probes.mkdir()
    script = tmp_path / "dns.sh"
    script.write_text(f"""#!/bin/sh
trap 'echo TERM >> {probes}/remove-signalled' TERM
if [ "$1" = remove ]; then echo $$ > {probes}/remove.pid; sleep 1.5; fi
{DNS_SCRIPT} "$@" && echo "$1" >> {probes}/done
""")
    script.chmod(0o755)
    cfg = write_config(tmp_path, pebble, {"rm": {"domains": ["rm.signals.example.com"],
                                                 "challenge": dns01(script)}})
    proc = start(["renew"], cfg, pebble)
    pids = wait_for(probes / "remove.pid", proc)
    code, out, err, took = stop(proc, signal.SIGTERM)

    assert (probes / "done").read_text().split() == ["add", "remove"]
    assert not (probes / "remove-signalled").exists()
    assert pebble.txt("_acme-challenge.rm.signals.example.com.") == []
    assert code in (0, 128 + signal.SIGTERM), err  # the order may have been done already
    assert took < 10, took
    assert [p for p in pids if not gone(p)] == []


def test_sigint_while_ordering_stops_before_the_next_acme_step(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, {"ord": {"domains": ["ord.signals.example.com"],
                                                  "challenge": dns01(wait=120)}})
    log = tmp_path / "certbatch.log"
    proc = start(["renew", "--log-file", str(log)], cfg, pebble)
    deadline = time.monotonic() + HOOK_WAIT
    while "for DNS propagation" not in (log.read_text() if log.exists() else ""):
        if time.monotonic() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no DNS propagation wait: {proc.communicate(timeout=10)}")
        time.sleep(0.02)
    assert_stopped(stop(proc, signal.SIGINT), signal.SIGINT, [])

    st = status(tmp_path, "ord")
    assert st["last_result"] == "failed"
    assert st["last_error"] == "interrupted: waiting for DNS propagation"
    assert not (tmp_path / "state" / "certs" / "ord" / "live").exists()  # still due
    assert "interrupted by SIGINT: exit code 130" in log.read_text()


# -- SIGINT, SIGHUP, a second signal -------------------------------------------------------------

def test_sigint_during_run_hook_target_that_ignores_sigterm(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, {"ci": {"domains": ["ci.signals.example.com"]}})
    staged = run(["renew", "--no-notify"], cfg, pebble, timeout=60)
    assert staged.returncode == 0, staged.stderr
    slow_hook(tmp_path / "hooks/notify.d/stubborn", probes, ignore_term=True)

    proc = start(["run-hook"], cfg, pebble)
    pids = wait_for(probes / "stubborn.pid", proc)
    # Ctrl-C, then impatient Ctrl-C and SIGTERM while it waits out the SIGKILL grace: ignored,
    # the cleanup goes on and the exit code is the first signal's.
    result = stop(proc, signal.SIGINT, signal.SIGINT, signal.SIGTERM)
    (probes / "fast").touch()
    retry = run(["run-hook"], cfg, pebble, timeout=60)

    assert_stopped(result, signal.SIGINT, pids)
    assert result[3] > 1.5  # the hook ignored SIGTERM: it took the SIGKILL after the grace
    assert "Aborted" not in result[2] and "Traceback" not in result[2]
    assert retry.returncode == 0, retry.stderr
    assert_no_overlap(probes / "stubborn.log")
    assert "ci" in ledger(tmp_path, "stubborn")["applied"]


def test_sighup_during_deploy_restage(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    cfg = write_config(tmp_path, pebble, {"hup": {"domains": ["hup.signals.example.com"]}})
    assert run(["renew"], cfg, pebble, timeout=60).returncode == 0
    slow_hook(tmp_path / "hooks/deploy.d/10-slow", probes)

    # run-hook --deploy runs the deploy hook in certbatch's main thread.
    proc = start(["run-hook", "--deploy", "hup"], cfg, pebble)
    pids = wait_for(probes / "10-slow.pid", proc)
    assert_stopped(stop(proc, signal.SIGHUP), signal.SIGHUP, pids)
    st = status(tmp_path, "hup")
    assert st["last_result"] == "failed" and st["last_error"].startswith("interrupted")

    (probes / "fast").touch()
    again = run(["renew"], cfg, pebble, timeout=60)  # staging it failed: the next run does it
    assert again.returncode == 0, again.stderr
    assert status(tmp_path, "hup")["last_result"] == "restaged"


def test_a_command_that_does_no_work_simply_exits(tmp_path, pebble):
    # A "CA" that accepts connections and never answers: `check --online` waits on it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cfg = write_config(tmp_path, pebble, {"st": {"domains": ["st.signals.example.com"]}},
                           acme={"directory": f"http://127.0.0.1:{silent.getsockname()[1]}/d"})
        proc = start(["check", "--online"], cfg, pebble)
        silent.settimeout(20)
        conn, _ = silent.accept()  # it is waiting for an answer now
        code, out, err, took = stop(proc, signal.SIGTERM)
        conn.close()
    assert (code, err) == (143, "certbatch: interrupted (SIGTERM)\n"), out + err
    assert took < 1


# -- the worker pool ------------------------------------------------------------------------

def test_sigterm_with_several_certificates_in_flight(tmp_path, pebble):
    probes = tmp_path / "probes"
    probes.mkdir()
    names = [f"p{i}" for i in range(8)]
    cfg = write_config(tmp_path, pebble,
                       {n: {"domains": [f"{n}.signals.example.com"]} for n in names},
                       renewal={"workers": 3})
    slow_hook(tmp_path / "hooks/deploy.d/10-slow", probes)

    proc = start(["renew"], cfg, pebble)
    # One worker is in the deploy hook; the two others are ordering, or in their deploy hook
    # too (stagings of different certificates run at once).
    pids = wait_for(probes / "10-slow.pid", proc)
    time.sleep(0.3)
    signalled = time.time()
    assert_stopped(stop(proc, signal.SIGTERM), signal.SIGTERM, pids)

    started = [start for start, _ in spans(probes / "10-slow.log")]
    assert 1 <= len(started) <= 3 and max(started) < signalled, started  # none after it
    attempted = [n for n in names if status(tmp_path, n)]
    assert 1 <= len(attempted) <= 3, attempted
    for n in attempted:  # in flight: each says why it stopped
        st = status(tmp_path, n)
        assert st["last_result"] == "failed" and st["last_error"].startswith("interrupted"), st
    for n in set(names) - set(attempted):  # never started: nothing recorded or stored
        assert not (tmp_path / "state" / "certs" / n / "live").exists()
    assert pending(tmp_path) == []

    (probes / "fast").touch()
    again = run(["renew"], cfg, pebble, timeout=60)
    assert again.returncode == 0, again.stderr
    results = {n: status(tmp_path, n)["last_result"] for n in names}
    assert set(results.values()) <= {"issued", "restaged"}, results
    assert all(results[n] == "issued" for n in names if n not in attempted), results
    assert sorted(pending(tmp_path)) == []  # no notify target: marked applied
