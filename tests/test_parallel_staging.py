"""Stagings in parallel: deploy hooks of different certificates run at once (up to
hooks.deploy_workers), a notify never sees half a staging (across processes), one name never
stages twice at once, and a staging costs few fsyncs with the stored files left untouchable by
the hooks. Real `certbatch` processes and real hooks; no CA: every certificate is restaged from
a store written here.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import run
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certbatch.locks import SharedLock
from certbatch.spool import CertFiles, Spool
from certbatch.store import CertStatus, Store

HOOK_SLEEP = 0.4


def q(path: Path | str) -> str:
    return shlex.quote(str(path))


def hook(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nset -eu\n" + body)
    os.chmod(path, 0o755)
    return path


def store_certificates(state: Path, names: list[str]) -> Store:
    """Issued (self-signed), never staged: `renew` restages each one, without a CA."""
    store = Store(state)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    for i, name in enumerate(names):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}.example")])
        crt = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(0x1000 + i)
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=89))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{name}.example")]),
                              critical=False)
               .sign(key, hashes.SHA256()))
        pem = crt.public_bytes(serialization.Encoding.PEM)
        store.save_certificate(name, key_type="ec-p256", domains=(f"{name}.example",),
                               privkey_pem=key_pem, cert_pem=pem, chain_pem=b"",
                               fullchain_pem=pem, serial=format(0x1000 + i, "x"),
                               not_before=now - dt.timedelta(days=1),
                               not_after=now + dt.timedelta(days=89), issued_at=now)
        store.save_status(name, CertStatus(last_result="not-staged"))
    return store


def write_tree(folder: Path, names: list[str], state: str = "state", **sections: Any) -> Path:
    """A config over a store of `names` (state folder `state`, below `folder`)."""
    (folder / "hooks" / "deploy.d").mkdir(parents=True, exist_ok=True)
    (folder / "hooks" / "notify.d").mkdir(parents=True, exist_ok=True)
    (folder / "webroot").mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "acme": {"directory": "https://127.0.0.1:9/directory"},  # never asked: restages only
        "paths": {"state": f"./{state}", "spool": "./spool", "hooks": "./hooks"},
        "renewal": {"ari": False, "workers": max(len(names), 1)},
        "defaults": {"challenge": {"type": "http-01", "webroot": str(folder / "webroot")}},
        "certificates": {n: {"domains": [f"{n}.example"]} for n in names},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = folder / f"certbatch-{state}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start(args: list[str], cfg: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("CERTBATCH_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "certbatch", "-c", str(cfg), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_until(check: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def spans_of(probe: Path, names: list[str]) -> list[tuple[float, float]]:
    return [(float((probe / f"{n}.start").read_text()), float((probe / f"{n}.end").read_text()))
            for n in names]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most spans running at the same moment (an end before a start at the same time)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


# -- deploy hooks in parallel, up to deploy_workers ------------------------------------------------

@pytest.mark.parametrize("deploy_workers", [None, 2, 1])
def test_deploy_hooks_of_different_certificates_run_at_once_up_to_deploy_workers(
        tmp_path: Path, deploy_workers: int | None) -> None:
    names = [f"c{i}" for i in range(6)]
    store_certificates(tmp_path / "state", names)
    cfg = write_tree(tmp_path, names, hooks={} if deploy_workers is None else
                     {"deploy_workers": deploy_workers})
    probe = tmp_path / "probe"
    probe.mkdir()
    hook(tmp_path / "hooks/deploy.d/10-slow", f"""
date +%s.%N > {q(probe)}/"$CERTBATCH_NAME.start"
sleep {HOOK_SLEEP}
date +%s.%N > {q(probe)}/"$CERTBATCH_NAME.end"
""")

    result = run(["renew", "--no-notify"], cfg)

    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "spool/pending")) == names
    spans = spans_of(probe, names)
    total = max(e for _, e in spans) - min(s for s, _ in spans)
    at_once = most_at_once(spans)
    if deploy_workers is None:  # 6 workers: ideally all 6 at once, 0.4 s in all (serial: 2.4)
        assert at_once >= 3, spans
        assert total < len(names) * HOOK_SLEEP / 2, spans
    else:
        assert at_once == deploy_workers, spans
        assert total >= len(names) * HOOK_SLEEP / deploy_workers - 0.05, spans


# -- a notify never sees half a staging, across processes -----------------------------------------

def test_notify_in_another_process_waits_for_the_stagings_in_flight(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    store_certificates(tmp_path / "state", names)
    cfg = write_tree(tmp_path, names)
    other = write_tree(tmp_path, names, state="state2")  # same spool, its own run lock
    probe = tmp_path / "probe"
    probe.mkdir()
    hook(tmp_path / "hooks/deploy.d/10-gate", f"""
touch {q(probe)}/"$CERTBATCH_NAME.running"
while [ ! -e {q(probe)}/release ]; do sleep 0.02; done
echo late > late.txt  # a half staging lacks it
date +%s.%N > {q(probe)}/"$CERTBATCH_NAME.end"
""")
    hook(tmp_path / "hooks/notify.d/50-record", f"""
date +%s.%N > {q(probe)}/notify.start
cp "$CERTBATCH_NAMES_FILE" {q(probe)}/notify.names
for name in $CERTBATCH_NAMES; do
    ls "$CERTBATCH_SPOOL_DIR/pending/$name" > {q(probe)}/"$name.files"
done
""")

    renew = start(["renew", "--no-notify"], cfg)
    try:
        wait_until(lambda: all((probe / f"{n}.running").exists() for n in names),
                   "three deploy hooks running at once")
        notify = start(["run-hook"], other)
        time.sleep(1.0)
        assert notify.poll() is None, f"run-hook did not wait: {notify.communicate()}"
        assert not (probe / "notify.start").exists()
    finally:
        (probe / "release").touch()
        out, err = renew.communicate(timeout=30)
    assert renew.returncode == 0, err
    out, err = notify.communicate(timeout=30)
    assert notify.returncode == 0, err

    assert (probe / "notify.names").read_text().split() == names
    assert float((probe / "notify.start").read_text()) > max(
        float((probe / f"{n}.end").read_text()) for n in names)
    for n in names:
        assert (probe / f"{n}.files").read_text().split() == [
            "cert.pem", "chain.pem", "fullchain.pem", "late.txt", "meta.json", "privkey.pem"]


def test_a_staging_waits_for_a_notify_running_in_another_process(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    store_certificates(tmp_path / "state", names)
    cfg = write_tree(tmp_path, names)
    other = write_tree(tmp_path, names, state="state2")
    probe = tmp_path / "probe"
    probe.mkdir()
    assert run(["renew", "--no-notify", "--only", "a"], cfg).returncode == 0  # a is pending
    hook(tmp_path / "hooks/deploy.d/10-record", f"""
date +%s.%N > {q(probe)}/"$CERTBATCH_NAME.start"
""")
    hook(tmp_path / "hooks/notify.d/50-gate", f"""
cp "$CERTBATCH_NAMES_FILE" {q(probe)}/notify.names
touch {q(probe)}/notify.running
while [ ! -e {q(probe)}/release ]; do sleep 0.02; done
date +%s.%N > {q(probe)}/notify.end
""")

    notify = start(["run-hook"], other)
    try:
        wait_until(lambda: (probe / "notify.running").exists(), "the notify target")
        renew = start(["renew", "--no-notify"], cfg)  # stages b and c
        time.sleep(1.0)
        assert renew.poll() is None, f"renew did not wait: {renew.communicate()}"
        assert not list(probe.glob("*.start")), "a deploy hook ran during the notify"
    finally:
        (probe / "release").touch()
        notify.communicate(timeout=30)
    out, err = renew.communicate(timeout=30)
    assert (notify.returncode, renew.returncode) == (0, 0), err

    assert (probe / "notify.names").read_text().split() == ["a"]
    end = float((probe / "notify.end").read_text())
    assert min(float((probe / f"{n}.start").read_text()) for n in ("b", "c")) > end
    assert sorted(os.listdir(tmp_path / "spool/pending")) == ["b", "c"]


# -- one name never stages twice at once --------------------------------------------------------

STAGE_IN_THREADS = """
import sys, threading
from pathlib import Path
from certbatch.spool import CertFiles, Spool
from certbatch.store import Store
state, spool_dir, hooks = (Path(a) for a in sys.argv[1:4])
store = Store(state)
spool = Spool(spool_dir, hooks, store=store)
oks = []
def stage(name):
    stored = store.current(name)
    files = store.read_files(stored)
    oks.append(spool.stage(CertFiles(
        name=name, domains=stored.domains, privkey_pem=files["privkey.pem"],
        cert_pem=files["cert.pem"], chain_pem=files["chain.pem"],
        fullchain_pem=files["fullchain.pem"], serial=stored.serial,
        not_before=stored.not_before, not_after=stored.not_after)).ok)
threads = [threading.Thread(target=stage, args=(n,)) for n in sys.argv[4:]]
for t in threads: t.start()
for t in threads: t.join()
print(" ".join(map(str, oks)))
"""


def test_one_name_never_stages_twice_at_once_in_threads_and_processes(tmp_path: Path) -> None:
    store_certificates(tmp_path / "state", ["www", "other"])
    log = tmp_path / "deploy.log"
    hook(tmp_path / "hooks/deploy.d/10-slow", f"""
echo "start $(date +%s.%N) $CERTBATCH_NAME $$" >> {q(log)}
sleep {HOOK_SLEEP}
echo "end $(date +%s.%N) $CERTBATCH_NAME $$" >> {q(log)}
""")
    args = [sys.executable, "-c", STAGE_IN_THREADS, str(tmp_path / "state"),
            str(tmp_path / "spool"), str(tmp_path / "hooks")]
    procs = [subprocess.Popen([*args, "www", "www", "other"], stdout=subprocess.PIPE, text=True),
             subprocess.Popen([*args, "www", "other"], stdout=subprocess.PIPE, text=True)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert outs == [["True"] * 3, ["True"] * 2]

    spans: dict[str, dict[str, list[float]]] = {}
    for line in log.read_text().splitlines():
        kind, ts, name, pid = line.split()
        spans.setdefault(name, {}).setdefault(pid, []).append(float(ts))
    assert [len(spans["www"]), len(spans["other"])] == [3, 2]
    for name in ("www", "other"):
        runs = sorted(spans[name].values())
        for (_, end), (begin, _) in zip(runs, runs[1:], strict=False):
            assert end <= begin, f"two stagings of {name} overlapped: {runs}"
    # ...while different names did run at the same time.
    both = [tuple(r) for n in ("www", "other") for r in spans[n].values()]
    assert most_at_once(both) >= 2, both  # type: ignore[arg-type]


def test_a_staging_first_finishes_a_crashed_staging_of_its_own_name(tmp_path: Path) -> None:
    """A finished staging (.ready) a crash left behind is committed before the next staging of
    that name, so the latest wins; another name's leftovers wait for the exclusive holder."""
    store = store_certificates(tmp_path / "state", ["www", "other"])
    spool = Spool(tmp_path / "spool", tmp_path / "hooks", store=store)
    assert spool.stage(stored_files(store, "www")).ok
    staging = tmp_path / "spool/.staging"
    for name in ("www", "other"):
        leftover = staging / f"{name}.00000000000000000001-abcdef.ready"
        leftover.mkdir()
        (leftover / "meta.json").write_text("{}")  # recognisable: not what stage() writes
    assert spool.stage(stored_files(store, "www")).ok

    assert (tmp_path / "spool/pending/www/meta.json").read_text() != "{}"  # ours won
    assert os.listdir(staging) == ["other.00000000000000000001-abcdef.ready"]
    spool.forget()  # exclusive: recovers the rest
    assert os.listdir(staging) == []
    assert (tmp_path / "spool/pending/other/meta.json").read_text() == "{}"


# -- the lock itself --------------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from certbatch.locks import SharedLock
lock = SharedLock(Path(sys.argv[1]))
assert lock.acquire(timeout=5, shared=sys.argv[2] == "shared")
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["shared", "exclusive"])
def test_shared_lock_between_processes_and_threads(tmp_path: Path, mode: str) -> None:
    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        lock = SharedLock(path)
        assert lock.holder_pid() == holder.pid
        assert not lock.acquire(timeout=0.2)  # exclusive: never beside another holder
        assert lock.acquire(timeout=0.2, shared=True) is (mode == "shared")
        if mode == "shared":  # a second thread shares the process's hold at once
            other: list[bool] = []
            t = threading.Thread(target=lambda: other.append(SharedLock(path).acquire(
                timeout=0, shared=True)))
            t.start()
            t.join()
            assert other == [True]
            lock.release()
            lock.release()
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire(timeout=5)  # the kernel dropped the dead holder's flocks
    lock.release()


def test_a_waiting_exclusive_thread_keeps_new_shared_ones_out(tmp_path: Path) -> None:
    """Writers first: a notify waiting for stagings is not starved by later stagings."""
    lock = SharedLock(tmp_path / ".lock")
    assert lock.acquire(shared=True)
    got: list[str] = []
    writer = threading.Thread(target=lambda: (lock.acquire(), got.append("exclusive"),
                                              lock.release()))
    writer.start()
    time.sleep(0.2)
    assert not lock.acquire(timeout=0.2, shared=True)  # held back by the waiting writer
    assert got == []
    lock.release()
    writer.join(5)
    assert got == ["exclusive"]
    assert lock.acquire(timeout=0, shared=True)
    lock.release()


# -- fsyncs, and hard links the hooks never see ---------------------------------------------------

def stored_files(store: Store, name: str) -> CertFiles:
    stored = store.current(name)
    assert stored is not None
    files = store.read_files(stored)
    return CertFiles(name=name, domains=stored.domains, privkey_pem=files["privkey.pem"],
                     cert_pem=files["cert.pem"], chain_pem=files["chain.pem"],
                     fullchain_pem=files["fullchain.pem"], serial=stored.serial,
                     not_before=stored.not_before, not_after=stored.not_after)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every os.fsync call (certbatch calls no fdatasync) from now on, counted, on any file
    system as where the journal does not commit in order (test_fsyncs.py: where it does)."""
    monkeypatch.setattr("certbatch.spool.spool.ordered_journal", lambda *paths: False)
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


@pytest.mark.parametrize("with_hook", [False, True])
def test_a_staging_costs_at_most_4_fsyncs_plus_one_per_file_a_hook_adds(
        tmp_path: Path, fsyncs: list[int], with_hook: bool) -> None:
    """8 before (5 copies, their folder, 2 folders to commit), 15 with a hook adding one file;
    now: the key and meta.json, the folder, pending/; the public files are hard links."""
    store = store_certificates(tmp_path / "state", ["www"])
    if with_hook:
        hook(tmp_path / "hooks/deploy.d/10-combined", "cat privkey.pem fullchain.pem > "
                                                      "combined.pem\n")
    spool = Spool(tmp_path / "spool", tmp_path / "hooks", store=store)
    cert = stored_files(store, "www")
    del fsyncs[:]

    assert spool.stage(cert).ok  # a new pending entry
    first = len(fsyncs)
    assert spool.stage(cert).ok  # replacing it
    assert (first, len(fsyncs) - first) == ((5, 5) if with_hook else (4, 4))

    folder = store.current("www").folder  # type: ignore[union-attr]
    entry = tmp_path / "spool/pending/www"
    for name in ("cert.pem", "chain.pem", "fullchain.pem"):
        assert os.stat(entry / name).st_ino == os.stat(folder / name).st_ino, name
    assert os.stat(entry / "privkey.pem").st_ino != os.stat(folder / "privkey.pem").st_ino
    assert stat_mode(entry / "privkey.pem") == 0o600 and stat_mode(entry / "cert.pem") == 0o644


def test_without_a_stored_file_to_link_every_copy_is_synced(tmp_path: Path,
                                                           fsyncs: list[int]) -> None:
    store = store_certificates(tmp_path / "state", ["www"])
    spool = Spool(tmp_path / "spool", tmp_path / "hooks")  # no store given: copies
    cert = stored_files(store, "www")
    del fsyncs[:]
    assert spool.stage(cert).ok
    assert len(fsyncs) == 7  # 5 files, their folder, pending/
    assert os.stat(tmp_path / "spool/pending/www/cert.pem").st_nlink == 1


def test_a_spool_on_another_file_system_gets_synced_copies(tmp_path: Path,
                                                           fsyncs: list[int]) -> None:
    """EXDEV: the stored files cannot be linked from another file system; copies, all synced."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (tmpfs at /dev/shm) here")
    store = store_certificates(tmp_path / "state", ["www"])
    spool_dir = Path(tempfile.mkdtemp(dir=shm)) / "spool"
    try:
        spool = Spool(spool_dir, tmp_path / "hooks", store=store)
        cert = stored_files(store, "www")
        del fsyncs[:]
        assert spool.stage(cert).ok
        assert len(fsyncs) == 7  # 5 files, their folder, pending/
        entry = spool_dir / "pending/www"
        assert all(os.stat(entry / n).st_nlink == 1 for n in os.listdir(entry))
        assert (entry / "fullchain.pem").read_bytes() == cert.fullchain_pem
    finally:
        shutil.rmtree(spool_dir.parent)


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


def test_what_deploy_hooks_do_to_the_staged_files_never_reaches_the_store(
        tmp_path: Path) -> None:
    """Hooks work on copies; only a public file they left exactly as it was becomes a link."""
    store = store_certificates(tmp_path / "state", ["www"])
    folder = store.current("www").folder  # type: ignore[union-attr]
    before = {n: os.stat(folder / n) for n in os.listdir(folder)}
    hook(tmp_path / "hooks/deploy.d/10-meddle", """
chmod 0640 cert.pem privkey.pem                   # modes live in the inode
cat fullchain.pem > x && cat x > fullchain.pem    # rewritten in place, same content
rm x
""")
    spool = Spool(tmp_path / "spool", tmp_path / "hooks", store=store)
    assert spool.stage(stored_files(store, "www")).ok

    after = {n: os.stat(folder / n) for n in os.listdir(folder)}
    for name, st in before.items():
        assert (after[name].st_mode, after[name].st_mtime_ns, after[name].st_size) == \
            (st.st_mode, st.st_mtime_ns, st.st_size), name
    entry = tmp_path / "spool/pending/www"
    linked = {n for n in ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")
              if os.stat(entry / n).st_ino == after[n].st_ino}
    assert linked == {"chain.pem"}  # the only one the hook left alone
    assert stat_mode(entry / "cert.pem") == 0o640  # the hook's choice, on its own copy
    assert store.current("www").damaged is None  # type: ignore[union-attr]
