"""Benchmark parallel staging: N stored certificates restaged through a slow deploy hook, at
several hooks.deploy_workers settings; see benchmarks/README.md.

    python benchmarks/bench_staging.py [--count 200] [--sleep 0.2] [--deploy-workers 1,4,16]
                                       [--workers 16] [--rounds 1] [--no-strace] [--keep]

No CA: the certificates are written into a store as issued and never staged (bench_renew's
write_idle_store), so `certbatch renew --no-notify` restages every one of them, through the
runner's worker pool and the spool, like a renewal minus ACME. Each figure is the real command
as a child process, timed from fork to exit; the goal is count x sleep / deploy_workers (plus
the run's own cost, shown by the row without a hook). The share of the machine's CPUs used by
other processes meanwhile is printed next to each figure: above 5 % the figure is suspect.

Exit status: 0 whether targets are met or not; 1 only when a scenario failed to run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_renew import (
    FOREIGN_CPU_LIMIT,
    Child,
    CpuUsage,
    Row,
    ScenarioFailed,
    cert_names,
    certbatch_env,
    print_table,
    run_child,
    say,
    write_idle_store,
)

DEFAULT_COUNT = 200
DEFAULT_SLEEP = 0.2
DEFAULT_DEPLOY_WORKERS = (1, 4, 16)
DEFAULT_WORKERS = 16  # renewal.workers: the runner's pool, stagings included
OVERHEAD_S = 2.0  # allowed beyond count x sleep / deploy_workers: start-up, store reads, fsyncs
SLACK = 1.25  # and this factor for hook process start-up on a 2-core machine


def write_config(folder: Path, names: dict[str, list[str]], workers: int,
                 deploy_workers: int | None) -> Path:
    """folder/certbatch.yaml over folder/state (copied in) and a fresh folder/spool."""
    lines = [
        "acme:", "  directory: https://127.0.0.1:9/directory  # never asked: restages only",
        "paths: {state: ./state, spool: ./spool, hooks: ./hooks}",
        f"renewal: {{workers: {workers}, ari: false}}",
        f"defaults: {{challenge: {{type: http-01, webroot: {folder / 'webroot'}}}}}",
        "hooks: {}" if deploy_workers is None else f"hooks: {{deploy_workers: {deploy_workers}}}",
        "certificates:",
        *(f"  {n}: {{domains: [{', '.join(d)}]}}" for n, d in names.items()),
    ]
    (folder / "webroot").mkdir(parents=True, exist_ok=True)
    path = folder / "certbatch.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(work: Path, label: str, template: Path, hook: str | None) -> Path:
    """work/label: a copy of the template state, an empty spool, the deploy hook."""
    folder = work / label
    shutil.copytree(template, folder / "state", symlinks=True)
    (folder / "hooks" / "deploy.d").mkdir(parents=True)
    (folder / "hooks" / "notify.d").mkdir(parents=True)
    if hook is not None:
        path = folder / "hooks" / "deploy.d" / "10-slow"
        path.write_text(hook)
        path.chmod(0o755)
    return folder


def restage(cfg: Path, count: int, timeout: float, strace: bool = False
            ) -> tuple[Child, float | None]:
    """`certbatch renew --no-notify`, checked to have restaged `count`; with the share of the
    CPUs other processes used meanwhile."""
    argv = [sys.executable, "-m", "certbatch", "-c", str(cfg), "renew", "--no-notify"]
    if strace:
        argv = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o",
                str(cfg.parent / "strace.txt"), *argv]
    before = CpuUsage.now()
    child = run_child(argv, certbatch_env(), timeout=timeout)
    foreign = CpuUsage.now().foreign_share(before)
    if child.returncode != 0:
        raise ScenarioFailed(child.describe_failure())
    pending = len(list((cfg.parent / "spool" / "pending").iterdir()))
    if pending != count:
        raise ScenarioFailed(f"{pending} of {count} certificates pending after {cfg}")
    return child, foreign


def fsyncs_per_cert(cfg: Path, count: int, timeout: float) -> float:
    """fsync + fdatasync calls per restaged certificate (spool and status), from strace -c."""
    restage(cfg, count, timeout, strace=True)
    text = (cfg.parent / "strace.txt").read_text()
    calls = sum(int(m.group(1)) for m in re.finditer(
        r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(?:fsync|fdatasync)$", text, re.M))
    return calls / count


def load(foreign: float | None) -> str:
    """The machine load other processes added, for a figure's label."""
    if foreign is None:
        return "other load unknown"
    flag = "" if foreign <= FOREIGN_CPU_LIMIT else ", BUSY: suspect"
    return f"other load {foreign:.0%}{flag}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="certbatch-bench-staging-"))
    try:
        return run(args, work)
    except ScenarioFailed as exc:
        say(f"scenario failed: {exc}")
        return 1
    finally:
        if args.keep:
            say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    names = cert_names(args.count, prefix="s")
    template = work / "template-state"
    t0 = time.perf_counter()
    write_idle_store(template, names)
    say(f"store of {args.count} issued, never staged certificates written in "
        f"{time.perf_counter() - t0:.1f} s; renewal.workers {args.workers}, deploy hook sleeps "
        f"{args.sleep} s")
    hook = f"#!/bin/sh\nsleep {args.sleep}\n"
    serial = args.count * args.sleep
    timeout = serial * 2 + 300
    rows: list[Row] = []

    scenarios: list[tuple[str, int | None, str | None]] = [("no deploy hook", None, None)]
    scenarios += [(f"deploy_workers {w}", w, hook) for w in args.deploy_workers]
    results: dict[str, list[tuple[Child, float | None]]] = {label: [] for label, *_ in scenarios}
    for r in range(args.rounds):  # interleaved: a busy spell hits every setting alike
        for label, workers, body in scenarios:
            folder = prepare(work, f"{label.replace(' ', '-')}-{r}", template, body)
            cfg = write_config(folder, names, args.workers, workers)
            child, foreign = restage(cfg, args.count, timeout)
            say(f"round {r + 1}: {label}: {child.wall:.2f} s wall, {child.cpu:.2f} s CPU; "
                f"{load(foreign)}")
            results[label].append((child, foreign))

    for label, workers, _ in scenarios:
        runs = sorted(results[label], key=lambda cf: cf[0].wall)
        child, _ = runs[len(runs) // 2]
        foreign = max((f for _, f in runs if f is not None), default=None)
        row = Row(f"{label} ({load(foreign)})", args.count, child.wall,
                  child.rss_mb, child.cpu)
        if workers is not None:
            ideal = serial / workers
            row.ratio = f"{child.wall / ideal:.2f}x ideal {ideal:.1f} s"
            row.target = f"<= {ideal * SLACK + OVERHEAD_S:.1f} s"
            row.ok = child.wall <= ideal * SLACK + OVERHEAD_S
        rows.append(row)

    if args.strace and shutil.which("strace"):
        folder = prepare(work, "strace", template, None)
        per_cert = fsyncs_per_cert(write_config(folder, names, args.workers, None), args.count,
                                   timeout)
        say(f"fsync calls per restaged certificate (spool entry and status.json; strace): "
            f"{per_cert:.1f}")
        rows.append(Row("  fsyncs per restaged certificate (strace)", args.count, None,
                        ratio=f"{per_cert:.1f}", per_cert=False))
    print_table(rows)
    walls = {label: statistics.median(c.wall for c, _ in results[label]) for label in results}
    say("medians over rounds: " + ", ".join(f"{k} {v:.2f} s" for k, v in walls.items()))
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark parallel staging through a slow deploy hook (see README.md).")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help=f"stored certificates restaged (default {DEFAULT_COUNT})")
    parser.add_argument("--sleep", type=float, default=DEFAULT_SLEEP,
                        help=f"seconds the deploy hook sleeps (default {DEFAULT_SLEEP})")
    parser.add_argument("--deploy-workers", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=list(DEFAULT_DEPLOY_WORKERS), metavar="W1,W2,...",
                        help="hooks.deploy_workers settings to time (default 1,4,16)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"renewal.workers (default {DEFAULT_WORKERS})")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds; medians are reported (default 1)")
    parser.add_argument("--strace", action=argparse.BooleanOptionalAction, default=True,
                        help="count fsyncs per certificate with strace, if installed (an "
                             "extra, untimed run without a hook)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if args.count < 1 or args.rounds < 1 or args.sleep < 0 or not 1 <= args.workers <= 64 \
            or not all(1 <= w <= 64 for w in args.deploy_workers):
        parser.error("--count and --rounds must be >= 1, --sleep >= 0, --workers and "
                     "--deploy-workers 1..64")
    return args


if __name__ == "__main__":
    sys.exit(main())
