"""Issue 13: the fsyncs of one renewal (storing it, then staging it), counted and named.

Where the journal commits metadata in order (xfs, ext3/ext4 with a journal:
fsutil.ordered_journal) a renewal costs 9: the five stored files, the folder of `live`, the
entry's key and meta.json, pending/. Elsewhere (btrfs, ext4 without a journal, tmpfs, ...)
11: also versions/ after the version's rename and the entry's folder before it becomes
pending. docs/safety.md says why each is needed, and where.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certbatch import fsutil
from certbatch.spool import CertFiles, Spool
from certbatch.store import Store


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every os.fsync from now on (certbatch calls no fdatasync)."""
    calls: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def issue(serial: int, now: dt.datetime) -> CertFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example")])
    crt = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
           .public_key(key.public_key()).serial_number(serial)
           .not_valid_before(now - dt.timedelta(days=1))
           .not_valid_after(now + dt.timedelta(days=89))
           .sign(key, hashes.SHA256()))
    pem = crt.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return CertFiles(name="www", domains=("www.example",), privkey_pem=key_pem, cert_pem=pem,
                     chain_pem=b"", fullchain_pem=pem, serial=format(serial, "x"),
                     not_before=now - dt.timedelta(days=1),
                     not_after=now + dt.timedelta(days=89))


def renew(store: Store, spool: Spool, serial: int) -> None:
    """What the runner does with a renewed certificate: store it, then stage it."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    cert = issue(serial, now - dt.timedelta(seconds=serial))  # a version name of its own
    store.save_certificate("www", key_type="ec-p256", domains=cert.domains,
                           privkey_pem=cert.privkey_pem, cert_pem=cert.cert_pem,
                           chain_pem=cert.chain_pem, fullchain_pem=cert.fullchain_pem,
                           serial=cert.serial, not_before=cert.not_before,
                           not_after=cert.not_after, issued_at=now - dt.timedelta(seconds=serial))
    assert spool.stage(cert).ok


def kinds(tmp_path: Path, paths: list[str]) -> list[str]:
    """Each synced path as what it is: 'versions/<tmp>/cert.pem', 'staging/<tmp>', ..."""
    out = []
    for p in paths:
        rel = Path(p).relative_to(tmp_path)
        parts = ["<tmp>" if part.endswith(".tmp") else part for part in rel.parts]
        out.append("/".join(parts).replace("state/certs/www/", "")
                   .replace("spool/.staging", "staging"))
    return out


STORE = ["versions/<tmp>/privkey.pem", "versions/<tmp>/cert.pem", "versions/<tmp>/chain.pem",
         "versions/<tmp>/fullchain.pem", "versions/<tmp>/meta.json"]


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered-journal"])
def test_a_renewal_costs_9_fsyncs_where_the_journal_commits_in_order_and_11_elsewhere(
        tmp_path: Path, synced: list[str], monkeypatch: pytest.MonkeyPatch,
        ordered: bool) -> None:
    monkeypatch.setattr("certbatch.store.ordered_journal", lambda *paths: ordered)
    monkeypatch.setattr("certbatch.spool.spool.ordered_journal", lambda *paths: ordered)
    store = Store(tmp_path / "state")
    spool = Spool(tmp_path / "spool", tmp_path / "hooks", store=store)
    renew(store, spool, 0x1001)  # the first issuance: live and pending exist from now on
    del synced[:]

    renew(store, spool, 0x1002)  # a renewal: a new version, the pending entry replaced

    expected = STORE + ([] if ordered else ["versions"]) + [
        "state/certs/www",  # live's folder, after the switch
        "staging/<tmp>/privkey.pem", "staging/<tmp>/meta.json",
    ] + ([] if ordered else ["staging/<tmp>"]) + ["spool/pending"]
    assert sorted(kinds(tmp_path, synced)) == sorted(expected)  # os.walk: any order
    assert len(synced) == (9 if ordered else 11)
    live = store.current("www")
    assert live is not None and live.serial == "1002" and not live.damaged
    assert os.stat(tmp_path / "spool/pending/www/cert.pem").st_ino == \
        os.stat(live.folder / "cert.pem").st_ino  # linked, not copied


def test_on_this_machine_a_renewal_costs_what_its_file_system_allows(
        tmp_path: Path, synced: list[str]) -> None:
    """No stand-in: whatever fsutil.ordered_journal finds for tmp_path."""
    store = Store(tmp_path / "state")
    spool = Spool(tmp_path / "spool", tmp_path / "hooks", store=store)
    renew(store, spool, 0x1001)
    del synced[:]
    renew(store, spool, 0x1002)
    assert len(synced) == (9 if fsutil.ordered_journal(tmp_path) else 11)


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered-journal"])
def test_what_deploy_hooks_write_is_synced_with_the_entry(
        tmp_path: Path, synced: list[str], monkeypatch: pytest.MonkeyPatch,
        ordered: bool) -> None:
    monkeypatch.setattr("certbatch.spool.spool.ordered_journal", lambda *paths: ordered)
    hook = tmp_path / "hooks/deploy.d/10-combine"
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\ncat fullchain.pem privkey.pem > combined.pem\n")
    hook.chmod(0o755)
    store = Store(tmp_path / "state")
    spool = Spool(tmp_path / "spool", tmp_path / "hooks", store=store)
    renew(store, spool, 0x1001)
    del synced[:]
    renew(store, spool, 0x1002)
    staged = [k for k in kinds(tmp_path, synced) if k.startswith("staging")]
    assert sorted(staged) == sorted(
        ["staging/<tmp>/privkey.pem", "staging/<tmp>/meta.json", "staging/<tmp>/combined.pem"]
        + ([] if ordered else ["staging/<tmp>"]))


# -- telling the file systems apart ----------------------------------------------------------

def fake_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fstype: str,
                options: str | None) -> Path:
    """A /proc and /sys that say tmp_path's device is `fstype`, named 'fakedev', with these
    /proc/fs/ext4/fakedev/options (None: no such file). Returns the folder to ask about."""
    folder = tmp_path / "data"
    folder.mkdir()
    dev = os.stat(folder).st_dev
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mountinfo").write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        f"30 1 {majmin} / / rw,relatime shared:1 - {fstype} /dev/fakedev rw\n")
    (sys_ / "dev/block").mkdir(parents=True)
    (sys_ / "devices/virtual/block/fakedev").mkdir(parents=True)
    (sys_ / "dev/block" / majmin).symlink_to("../../devices/virtual/block/fakedev")
    if options is not None:
        (proc / "fs/ext4/fakedev").mkdir(parents=True)
        (proc / "fs/ext4/fakedev/options").write_text(options)
    monkeypatch.setattr(fsutil, "_PROC", str(proc))
    monkeypatch.setattr(fsutil, "_SYS", str(sys_))
    monkeypatch.setattr(fsutil, "_ordered", {})
    return folder


@pytest.mark.parametrize(("fstype", "options", "ordered"), [
    ("ext4", "rw\ndelalloc\njournal_checksum\ndata=ordered\nbarrier\n", True),
    ("ext4", "rw\ndata=journal\n", True),
    ("ext3", "rw\ndata=writeback\n", True),  # metadata still goes through the journal
    ("ext4", "rw\ndelalloc\nbarrier\nauto_da_alloc\n", False),  # no journal: no data= mode
    ("ext4", None, False),  # /proc/fs/ext4 not visible (a container): unsure
    ("xfs", None, True),
    ("btrfs", None, False),  # fsync logs what it syncs, not what came before
    ("tmpfs", None, False),
    ("overlay", None, False),
])
def test_ordered_journal_trusts_only_a_journal_that_commits_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fstype: str, options: str | None,
        ordered: bool) -> None:
    folder = fake_system(tmp_path, monkeypatch, fstype, options)
    assert fsutil.ordered_journal(folder) is ordered
    assert fsutil.ordered_journal(folder, tmp_path) is ordered  # one device: the same answer


def test_ordered_journal_is_false_when_unsure(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fake_system(tmp_path, monkeypatch, "ext4", "data=ordered\n")
    assert not fsutil.ordered_journal(folder, tmp_path / "missing")
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(folder).st_dev:
        assert not fsutil.ordered_journal(folder, shm)  # two file systems: two journals
    monkeypatch.setattr(fsutil, "_ordered", {})
    monkeypatch.setattr(fsutil, "_PROC", str(tmp_path / "no-proc"))
    assert not fsutil.ordered_journal(folder)
