"""Simulated power cuts (issue 13): what a renewal's fsyncs keep when the power goes.

For each round: a fresh file system in a loop-mounted image, one certificate stored and staged
and synced, then a child process renewing it in a loop (Store.save_certificate, then
Spool.stage: what `renew` does with a renewed certificate) until, at a random moment, the file
system is shut down without flushing its log (`xfs_io -x -c shutdown`: FS_IOC_SHUTDOWN with
NOLOGFLUSH; what was not committed is lost, as in a power cut) and the child killed. After a
remount (journal replay) it checks that `live` is a complete, sound version (Store.current with
verify), that pending/<name> is a complete entry, and that both are at least as new as the last
renewal the child finished. Needs root, loop devices, mkfs.ext4/mkfs.xfs and xfs_io (xfsprogs);
btrfs does not take the shutdown ioctl on most kernels (and dm-flakey is not always there).

    benchmarks/powercut.py ext4 25                  # ext4 with its journal: the 9-fsync path
    benchmarks/powercut.py xfs 25
    benchmarks/powercut.py ext4 10 --unordered      # the 11-fsync path on the same file system
    benchmarks/powercut.py ext4 10 --no-data-sync   # control: the stored files not synced; fails

Exit 1 if any round found damage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"],
        "ext4-nojournal": ["mkfs.ext4", "-q", "-F", "-O", "^has_journal"],
        "xfs": ["mkfs.xfs", "-q", "-f"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}

# The child: renews certificate "www" with serials from argv[2] on, printing each one done.
WORKER = r"""
import datetime as dt, functools, os, sys
from pathlib import Path
import certbatch.fsutil, certbatch.spool.spool, certbatch.store
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from certbatch.spool import CertFiles, Spool
from certbatch.store import Store

if os.environ["POWERCUT_ORDERED"]:
    value = os.environ["POWERCUT_ORDERED"] == "yes"
    certbatch.store.ordered_journal = lambda *paths: value
    certbatch.spool.spool.ordered_journal = lambda *paths: value
if os.environ["POWERCUT_NODATA"]:
    certbatch.store.write_new = functools.partial(certbatch.fsutil.write_new, sync=False)
root = Path(sys.argv[1])
store = Store(root / "state")
spool = Spool(root / "spool", root / "hooks", store=store)
print("ordered", certbatch.store.ordered_journal(root), flush=True)  # what save uses
key = ec.generate_private_key(ec.SECP256R1())
key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example")])
start = int(sys.argv[2])
for serial in range(start, start + int(sys.argv[3])):
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=serial)
    pem = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
           .public_key(key.public_key()).serial_number(serial)
           .not_valid_before(now - dt.timedelta(days=1))
           .not_valid_after(now + dt.timedelta(days=89))
           .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM)
    cert = CertFiles(name="www", domains=("www.example",), privkey_pem=key_pem, cert_pem=pem,
                     chain_pem=b"", fullchain_pem=pem, serial=format(serial, "x"),
                     not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=89))
    store.save_certificate("www", key_type="ec-p256", domains=cert.domains, privkey_pem=key_pem,
                           cert_pem=pem, chain_pem=b"", fullchain_pem=pem, serial=cert.serial,
                           not_before=cert.not_before, not_after=cert.not_after, issued_at=now)
    assert spool.stage(cert).ok
    print("done", serial, flush=True)
"""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def damage(root: Path, done: int) -> str | None:
    """What is wrong with the state and spool under `root` after the cut, or None."""
    from certbatch.spool.entries import entry_problem
    from certbatch.store import Store

    live = Store(root / "state").current("www", verify=True)
    if live is None:
        return "no live certificate"
    if live.damaged:
        return f"live damaged: {live.damaged}"
    if int(live.serial, 16) < done:
        return f"live is serial {int(live.serial, 16)}, older than the finished renewal {done}"
    entry = root / "spool/pending/www"
    if not entry.is_dir():
        return f"no pending entry (.staging: {sorted(os.listdir(root / 'spool/.staging'))})"
    serial = json.loads((entry / "meta.json").read_text())["serial"]
    problem = entry_problem(entry, serial, "www")
    if problem:
        return f"pending entry damaged: {problem}"
    if int(serial, 16) < done:
        return f"pending is serial {int(serial, 16)}, older than the finished renewal {done}"
    return None


def one_round(args: argparse.Namespace, image: Path, mnt: Path, env: dict[str, str]) -> str:
    subprocess.run(["truncate", "-s", "400M", str(image)], check=True)
    sh(*MKFS[args.fstype], str(image))
    fstype = "ext4" if args.fstype.startswith("ext4") else args.fstype
    sh("mount", "-t", fstype, "-o", "loop", str(image), str(mnt))
    try:
        first = subprocess.run([sys.executable, "-c", WORKER, str(mnt), "1", "1"], env=env,
                               capture_output=True, text=True)
        if first.returncode:
            raise SystemExit(f"the first issuance failed: {first.stderr}")
        ordered = first.stdout.split()[1]
        os.sync()  # the baseline is on disk
        child = subprocess.Popen([sys.executable, "-c", WORKER, str(mnt), "2", "100000"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True)
        time.sleep(random.uniform(0.8, 2.5))
        sh("xfs_io", "-x", "-c", "shutdown", str(mnt))  # no -f: the log is not flushed
        child.kill()
        out, _ = child.communicate()
    finally:
        sh("umount", str(mnt))
    done = max([int(line.split()[1]) for line in out.splitlines() if line.startswith("done")]
               or [1])
    sh("mount", "-t", fstype, "-o", "loop", str(image), str(mnt))
    try:
        try:
            problem = damage(mnt, done)
        except Exception as exc:  # noqa: BLE001 - unreadable state is a finding too
            problem = f"{type(exc).__name__}: {exc}"
    finally:
        sh("umount", str(mnt))
    return f"ordered journal {ordered}, renewed up to serial {done}: {problem or 'ok'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fstype", choices=sorted(MKFS))
    parser.add_argument("rounds", type=int, nargs="?", default=25)
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--unordered", action="store_true",
                      help="take the 11-fsync path whatever the file system")
    path.add_argument("--ordered", action="store_true",
                      help="take the 9-fsync path whatever the file system (a control)")
    parser.add_argument("--no-data-sync", action="store_true",
                        help="a control: the stored files are not synced (must find damage)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (mount, loop devices)")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"),
               POWERCUT_ORDERED="no" if args.unordered else "yes" if args.ordered else "",
               POWERCUT_NODATA="1" if args.no_data_sync else "")
    sys.path.insert(0, str(ROOT / "src"))
    bad = 0
    with tempfile.TemporaryDirectory(prefix="certbatch-powercut-") as tmp:
        image, mnt = Path(tmp) / "fs.img", Path(tmp) / "mnt"
        mnt.mkdir()
        for n in range(args.rounds):
            result = one_round(args, image, mnt, env)
            bad += not result.endswith(": ok")
            print(f"{args.fstype} round {n + 1}: {result}", flush=True)
    print(f"{args.fstype}: damage after {bad} of {args.rounds} simulated power cuts")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
