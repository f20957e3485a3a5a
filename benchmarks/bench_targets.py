"""Benchmark the apply phase: N notify targets that each take S seconds; see benchmarks/README.md.

    python benchmarks/bench_targets.py [--targets 10] [--seconds 1] [--entries 200]
                                       [--workers 10] [--rounds 3]

It stages --entries certificates (one self-signed certificate copied, no CA needed) into a fresh
spool, then times `certbatch run-hook` as a child process (interpreter start included) with
--targets targets in `hooks.targets`, each `sleep --seconds`, once with `hooks.notify_workers`
= --workers and once with 1. Prints the medians and the machine's load; asserts nothing.
Target: 10 targets of 1 s apply in about 1 s of wall time with notify_workers 10.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed() -> tuple[bytes, bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.example")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=90))
            .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM), format(cert.serial_number, "x"))


def fill_spool(spool: Path, entries: int) -> None:
    """`entries` pending entries, written as staging would leave them."""
    key, cert, serial = self_signed()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    shutil.rmtree(spool, ignore_errors=True)
    for i in range(entries):
        folder = spool / "pending" / f"b{i}"
        folder.mkdir(parents=True, mode=0o700)
        (folder / "privkey.pem").write_bytes(key)
        (folder / "cert.pem").write_bytes(cert)
        (folder / "fullchain.pem").write_bytes(cert)
        (folder / "chain.pem").write_bytes(b"")
        (folder / "meta.json").write_text(json.dumps({
            "version": 1, "name": f"b{i}", "domains": [f"b{i}.example"], "serial": serial,
            "not_before": now, "not_after": now, "staged_at": now}))
    os.chmod(spool, 0o700)


def config(work: Path, targets: int, seconds: float, workers: int) -> Path:
    data = {
        "acme": {"directory": "https://127.0.0.1:9/dir"},  # never contacted by run-hook
        "paths": {"state": str(work / "state"), "spool": str(work / "spool"),
                  "hooks": str(work / "hooks")},
        "defaults": {"challenge": {"type": "http-01", "webroot": str(work)}},
        "certificates": {"b0": {"domains": ["b0.example"]}},
        "hooks": {"notify_workers": workers,
                  "targets": {f"t{i:02d}": ["sleep", str(seconds)] for i in range(targets)}},
    }
    path = work / f"certbatch-{workers}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def timed_run_hook(cfg: Path) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "certbatch", "run-hook", "-q", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"run-hook failed ({proc.returncode}): {proc.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--entries", type=int, default=200)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="certbatch-bench-targets-") as tmp:
        work = Path(tmp)
        (work / "hooks" / "notify.d").mkdir(parents=True)
        figures: dict[int, list[float]] = {args.workers: [], 1: []}
        baseline: list[float] = []  # the same run with targets that exit at once
        for _ in range(args.rounds):  # interleaved, so machine noise hits all alike
            for workers in figures:
                fill_spool(work / "spool", args.entries)
                figures[workers].append(timed_run_hook(
                    config(work, args.targets, args.seconds, workers)))
            fill_spool(work / "spool", args.entries)
            baseline.append(timed_run_hook(config(work, args.targets, 0, args.workers)))
    print(f"apply phase: {args.targets} targets x {args.seconds:g} s, {args.entries} pending "
          f"entries, {args.rounds} rounds (medians, whole `certbatch run-hook` process)")
    for workers, times in figures.items():
        print(f"  notify_workers {workers:>2}: {statistics.median(times):6.2f} s wall  "
              f"(rounds: {', '.join(f'{t:.2f}' for t in times)})")
    base = statistics.median(baseline)
    print(f"  fixed cost (same run, targets exit at once): {base:.2f} s: interpreter start, "
          f"imports, verifying {args.entries} entries, writing batch files and ledgers")
    ideal = args.seconds * -(-args.targets // args.workers)
    spent = statistics.median(figures[args.workers]) - base
    print(f"  apply time above the fixed cost with {args.workers} workers: {spent:.2f} s "
          f"(ideal {ideal:.2f} s)")
    print(f"machine: {os.cpu_count()} CPUs, load average before {load_before[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
