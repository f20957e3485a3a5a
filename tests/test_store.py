"""The state folder: modes, atomic replacement, crash safety, status records."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from certbatch import fsutil
from certbatch.errors import UnsafePath
from certbatch.store import CertStatus, Store

UTC = dt.timezone.utc
NB = dt.datetime(2026, 1, 1, tzinfo=UTC)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask0():
    old = os.umask(0)
    yield
    os.umask(old)


def save(store: Store, serial: str, domains=("a.example",), key=b"KEY", cert=b"CERT"):
    return store.save_certificate(
        "site", key_type="ec-p256", domains=domains, privkey_pem=key + serial.encode(),
        cert_pem=cert + serial.encode(), chain_pem=b"CHAIN", fullchain_pem=cert + b"CHAIN",
        serial=serial, not_before=NB, not_after=NB + dt.timedelta(days=90),
        issued_at=NB + dt.timedelta(seconds=int(serial, 16)))


def test_modes_are_private_whatever_the_umask(tmp_path, umask0):
    store = Store(tmp_path / "state")
    s = save(store, "0a")
    store.save_account("https://ca.example/dir", b"ACCOUNTKEY", "{}")
    store.save_status("site", CertStatus(last_result="renewed"))
    for folder in [tmp_path / "state", tmp_path / "state" / "certs", s.folder.parent,
                   s.folder, tmp_path / "state" / "accounts"]:
        assert mode(folder) == 0o700, folder
    assert mode(s.path("privkey.pem")) == 0o600
    acct = next((tmp_path / "state" / "accounts").iterdir())
    assert mode(acct) == 0o700
    assert mode(acct / "account.json") == 0o600


def test_save_switches_live_and_reads_back(tmp_path):
    store = Store(tmp_path)
    assert store.current("site") is None
    first = save(store, "0a")
    second = save(store, "0b", domains=("a.example", "b.example"))
    cur = store.current("site")
    assert cur == second and cur.version != first.version
    assert cur.domains == ("a.example", "b.example")
    files = store.read_files(cur)
    assert files["privkey.pem"] == b"KEY0b" and files["cert.pem"] == b"CERT0b"
    # the old version is still there, untouched (rollback)
    assert (first.folder / "privkey.pem").read_bytes() == b"KEY0a"


def test_only_the_last_versions_are_kept(tmp_path):
    store = Store(tmp_path)
    for i in range(1, 7):
        save(store, f"{i:02x}")
    versions = sorted(p.name for p in (tmp_path / "certs/site/versions").iterdir())
    assert len(versions) == 3
    assert store.current("site").serial == "06"


def test_failed_write_keeps_previous_set_and_leaves_no_temp(tmp_path, monkeypatch):
    store = Store(tmp_path)
    save(store, "0a")
    real = fsutil.write_new
    calls = []

    def flaky(path, data, mode=0o644):
        calls.append(path.name)
        if path.name == "fullchain.pem":
            raise OSError(28, "No space left on device")
        real(path, data, mode)

    monkeypatch.setattr("certbatch.store.write_new", flaky)
    with pytest.raises(OSError):
        save(store, "0b")
    cur = store.current("site")
    assert cur.serial == "0a"
    assert store.read_files(cur)["privkey.pem"] == b"KEY0a"
    leftovers = [p.name for p in (tmp_path / "certs/site/versions").iterdir()]
    assert leftovers == [cur.version]


def test_process_killed_mid_write_leaves_previous_set(tmp_path):
    """A real process SIGKILLed after writing the new key but before the switch."""
    store = Store(tmp_path)
    save(store, "0a")
    script = textwrap.dedent(f"""
        import datetime as dt, os, signal
        from certbatch import store as st
        real = st.write_new
        def killer(path, data, mode=0o644):
            real(path, data, mode)
            if path.name == "cert.pem":
                os.kill(os.getpid(), signal.SIGKILL)
        st.write_new = killer
        nb = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        from pathlib import Path
        st.Store(Path({str(tmp_path)!r})).save_certificate("site", key_type="ec-p256",
            domains=("a.example",), privkey_pem=b"NEWKEY", cert_pem=b"NEWCERT", chain_pem=b"",
            fullchain_pem=b"NEWCERT", serial="0b", not_before=nb,
            not_after=nb + dt.timedelta(days=90), issued_at=nb + dt.timedelta(days=1))
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    cur = Store(tmp_path).current("site")
    assert cur.serial == "0a"
    files = Store(tmp_path).read_files(cur)
    assert files["privkey.pem"] == b"KEY0a" and files["cert.pem"] == b"CERT0a"
    # the next successful save cleans the half-written temp version
    save(Store(tmp_path), "0c")
    assert not [p for p in (tmp_path / "certs/site/versions").iterdir()
                if p.name.startswith(".")]


def test_status_roundtrip_and_damaged_status(tmp_path):
    store = Store(tmp_path)
    st = CertStatus(last_result="failed", last_error="boom",
                    rate_limited_until=NB, last_attempt=NB, staged_version="v1")
    store.save_status("site", st)
    assert store.status("site") == st
    for damage in ("{not json", "[]", '{"last_attempt": 5}', '{"last_attempt": "junk"}'):
        (tmp_path / "certs/site/status.json").write_text(damage)
        assert store.status("site") == CertStatus()


def test_account_roundtrip_per_directory(tmp_path):
    """Key and registration live in one file, so they are always replaced together."""
    store = Store(tmp_path)
    assert store.load_account("https://a/dir") is None
    store.save_account("https://a/dir", b"K1", '{"uri": "x"}')
    store.save_account("https://b/dir", b"K2", "{}")
    assert store.load_account("https://a/dir") == (b"K1", '{"uri": "x"}')
    assert store.load_account("https://b/dir")[0] == b"K2"
    store.save_account("https://a/dir", b"K3", '{"uri": "y"}')
    assert store.load_account("https://a/dir") == (b"K3", '{"uri": "y"}')
    folder = next(p for p in (tmp_path / "accounts").iterdir()
                  if "https://a/dir" in (p / "account.json").read_text())
    assert [p.name for p in folder.iterdir()] == ["account.json"]


def test_atomic_write_leaves_exactly_one_file(tmp_path):
    target = tmp_path / "f"
    fsutil.atomic_write(target, b"one")
    fsutil.atomic_write(target, "two", 0o600)
    assert target.read_bytes() == b"two" and mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_file_lock_excludes_a_second_process_and_names_the_holder(tmp_path):
    lock_path = tmp_path / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from certbatch.fsutil import FileLock
            lock = FileLock(Path({str(lock_path)!r}))
            assert lock.acquire()
            print("locked", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = fsutil.FileLock(lock_path)
        assert lock.acquire(timeout=0.2) is False
        assert lock.holder_pid() == holder.pid
        holder.kill()  # SIGKILL: the kernel drops the flock
        holder.wait()
        assert lock.acquire(timeout=5) is True
        lock.release()
    finally:
        holder.kill()
        holder.wait()
    assert lock_path.exists()  # never deleted


def test_file_lock_excludes_threads_of_one_process(tmp_path):
    import threading
    a = fsutil.FileLock(tmp_path / ".lock")
    b = fsutil.FileLock(tmp_path / ".lock")
    assert a.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(b.acquire(timeout=0.2)))
    t.start()
    t.join()
    assert got == [False]
    a.release()
    assert b.acquire(timeout=1)
    b.release()


def test_a_shared_folder_is_refused_as_root_and_a_subfolder_of_it_works(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    kwargs = dict(key_type="ec-p256", domains=("a.example",), privkey_pem=b"K", cert_pem=b"C",
                  chain_pem=b"", fullchain_pem=b"C", serial="01", not_before=NB,
                  not_after=NB + dt.timedelta(days=90), issued_at=NB)
    with pytest.raises(UnsafePath, match=r"writable by others \(mode 1777\): a shared folder; "
                                         r".*/shared/certbatch, which it creates 0700"):
        Store(shared).save_certificate("site", **kwargs)
    assert mode(shared) == 0o1777 and os.listdir(shared) == []  # not ours to change

    s = Store(shared / "certbatch").save_certificate("site", **kwargs)
    assert mode(shared) == 0o1777
    assert mode(shared / "certbatch") == 0o700 and mode(shared / "certbatch" / "certs") == 0o700
    assert mode(s.path("privkey.pem")) == 0o600
