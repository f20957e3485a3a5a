"""Benchmark `certbatch renew` against a local Pebble CA; see benchmarks/README.md.

    python benchmarks/bench_renew.py [--count N] [--workers W] [--certbot/--no-certbot]
                                     [--idle-count M] [--sweep 4,8,16] [--keep]

Every certbatch figure is the real command (`python -m certbatch -c CFG renew ...`) run as a child
process, timed from fork to exit (interpreter start included). Peak memory is the child's
ru_maxrss as returned by os.wait4() for that one child: it covers the certbatch process and its
waited-for hook processes (sh, curl: far smaller, so the figure is certbatch's own peak).

Exit status: 0 whether targets are met or not; 1 only when a scenario failed to run (a crash, a
certificate that was not issued).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BARE_LOOP = HERE / "bare_acme_loop.py"
DNS_HOOK = REPO / "hooks" / "dns" / "challtestsrv.sh"
CERTBOT_VENV = Path("/tmp/certbot-venv")

# Measured on the 2-core reference machine (see README.md): forced renewal of 100 certificates
# gets faster up to ~16 workers and stays flat after, within noise: from there the 2 CPUs, shared
# by certbatch, its hook processes and Pebble, are the limit.
DEFAULT_WORKERS = 16
DEFAULT_COUNT = 100
DEFAULT_IDLE_COUNT = 1000
DEFAULT_CERTBOT_COUNT = 20
DEFAULT_ROUNDS = 3
IDLE_REPEATS = 5
FOREIGN_CPU_LIMIT = 0.05  # other processes' share of the CPUs above which figures are suspect

# Targets.
IDLE_TARGET_S = 0.5  # nothing due over --idle-count certificates, whole process
IDLE_TARGET_MB = 60  # ... and its peak RSS
REALISTIC_COUNT = 40  # certificates on the slow CA
REALISTIC_SLEEP = 4  # PEBBLE_VA_SLEEPTIME: the most seconds one validation waits
REALISTIC_WORKERS = (4, 16, 32)
RESTAGE_TARGET_S = 5.0  # restaging 10,000 certificates (scaled up for more)
BARE_RATIO_TARGET = 1.5  # certbatch forced renewal / bare acme loop
# certbatch forced renewal / the bare loop making the same dns-01 script calls (issue 13):
SAME_WALL_TARGET, SAME_CPU_TARGET = 1.15, 1.2
CERTBOT_RATIO_TARGET = 30.0  # certbot per-certificate renew time / certbatch's

# Pebble without its random validation sleeps (PEBBLE_VA_NOSLEEP), never reusing a valid
# authorization (every renewal does the full dns-01 dance, for every client alike; Pebble's
# default reuses one half of the time at random) and never rejecting a good nonce (its default 5%
# turns into retries, or into failures for clients that retry once: noise, not speed).
PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0", "PEBBLE_WFE_NONCEREJECT": "0"}

# Modules a run with nothing due must not load, and others worth knowing about.
ACME_MODULES = ("acme", "josepy")
WATCHED = (*ACME_MODULES, "cryptography", "requests", "rich", "click", "yaml")


# -- measuring a child process -------------------------------------------------------------------

@dataclass
class Child:
    """One finished child process: wall time, peak RSS and its output."""

    argv: list[str]
    wall: float
    rss_mb: float
    cpu: float  # user + system seconds of the child and its waited-for children (hooks)
    returncode: int
    stdout: str
    stderr: str

    def describe_failure(self) -> str:
        tail = "\n".join((self.stderr or self.stdout).strip().splitlines()[-15:])
        return f"{shlex.join(self.argv)} exited with {self.returncode}:\n{tail}"


# Runs argv[1:] and writes "wall maxrss_kb cpu" of that child to $BENCH_MEASURE_FILE. A forked
# child's peak RSS starts from its parent's (Linux keeps the high-water mark across exec), so
# the measured process must be forked by a small one: this, under `python -S` (about 9 MB),
# rather than the benchmark itself (hundreds of MB after writing a store of 10,000).
MEASURE = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(os.environ["BENCH_MEASURE_FILE"], "w") as fh:
    fh.write(f"{wall} {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None, timeout: float = 900) -> Child:
    """Run argv without a terminal (as cron would), through MEASURE: wall time from its fork to
    its exit, its own peak RSS and CPU (with its waited-for children: hooks)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile() as measured:
        child_env = dict(os.environ if env is None else env, BENCH_MEASURE_FILE=measured.name)
        argv = list(argv)
        argv[0] = shutil.which(argv[0], path=child_env.get("PATH")) or argv[0]
        proc = subprocess.Popen([sys.executable, "-S", "-c", MEASURE, *argv],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=child_env, cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the wrapper and what it runs
            proc.wait()
        out.seek(0)
        err.seek(0)
        try:
            wall, rss_kb, cpu = (float(x) for x in Path(measured.name).read_text().split())
        except ValueError:  # killed before it could say
            wall = rss_kb = cpu = float("nan")
        return Child(argv, wall, rss_kb / 1024, cpu, proc.returncode,
                     out.read().decode(errors="replace"), err.read().decode(errors="replace"))


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds used by the whole machine and by this process tree, at one moment."""

    wall: float
    machine: float | None  # busy seconds of all CPUs (/proc/stat), None if unknown
    ours: float  # this process and every child it has waited for

    @classmethod
    def now(cls) -> CpuUsage:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), \
            resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        try:
            with open("/proc/stat") as fh:
                ticks = [int(x) for x in fh.readline().split()[1:9]]
            # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
            machine: float | None = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            machine = None
        return cls(time.monotonic(), machine, ours)

    def foreign_share(self, before: CpuUsage) -> float | None:
        """Share of all CPUs used by other processes since `before` (Pebble is ours, reaped)."""
        if self.machine is None or before.machine is None:
            return None
        capacity = (self.wall - before.wall) * (os.cpu_count() or 1)
        foreign = (self.machine - before.machine) - (self.ours - before.ours)
        return max(foreign, 0.0) / capacity if capacity > 0 else None


# -- results -------------------------------------------------------------------------------------

@dataclass
class Row:
    scenario: str
    n: int
    wall: float | None  # seconds
    rss_mb: float | None = None
    cpu: float | None = None  # user + system seconds of the client process and its hooks
    ratio: str = ""
    target: str = ""
    ok: bool | None = None  # None: no target
    per_cert: bool = True  # show certificates per second

    @property
    def rate(self) -> str:
        if not self.per_cert or not self.wall:
            return ""
        return f"{self.n / self.wall:.1f}"


def print_table(rows: Sequence[Row]) -> None:
    header = ("scenario", "N", "wall s", "CPU s", "certs/s", "peak RSS MB", "ratio", "target",
              "result")
    cells = [header]
    for r in rows:
        result = "" if r.ok is None else ("PASS" if r.ok else "FAIL (target not met)")
        cells.append((r.scenario, str(r.n), "" if r.wall is None else f"{r.wall:.2f}",
                      "" if r.cpu is None else f"{r.cpu:.2f}", r.rate,
                      "" if r.rss_mb is None else f"{r.rss_mb:.0f}", r.ratio, r.target, result))
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print()
    print(line)
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if 0 < j < 6 else c.ljust(w)
                        for j, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if i == 0:
            print(line)
    print(line)


class ScenarioFailed(Exception):
    """A scenario could not produce a valid figure (the benchmark then exits 1)."""


# -- the certbatch side --------------------------------------------------------------------------

def cert_names(count: int, prefix: str = "b") -> dict[str, list[str]]:
    """`count` two-name certificates: b0 -> b0.example.com, www.b0.example.com."""
    return {f"{prefix}{i}": [f"{prefix}{i}.example.com", f"www.{prefix}{i}.example.com"]
            for i in range(count)}


def certbatch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CERTBATCH_CONFIG", None)
    env.update(extra or {})
    return env


def run_certbatch(config: Path, args: Sequence[str], env: dict[str, str],
                  expect: dict[str, int] | None = None) -> Child:
    """`certbatch -c CONFIG ARGS`; with `expect`, check the --json summary (e.g. renewed=100)."""
    child = run_child([sys.executable, "-m", "certbatch", "-c", str(config), *args], env)
    if child.returncode != 0:
        raise ScenarioFailed(child.describe_failure())
    if expect is not None:
        try:
            summary = json.loads(child.stdout)["summary"]
        except (ValueError, KeyError) as exc:
            raise ScenarioFailed(f"no JSON report from certbatch ({exc}): "
                                 f"{child.stdout[:300]}") from None
        if summary != expect:
            raise ScenarioFailed(f"certbatch {' '.join(args)}: expected {expect}, got {summary}")
    return child


def median_child(runs: Sequence[Child]) -> Child:
    """The run with the median wall time (the upper one of the middle two for an even count)."""
    return sorted(runs, key=lambda c: c.wall)[len(runs) // 2]


def write_idle_store(state: Path, names: dict[str, list[str]]) -> None:
    """A state folder where every certificate was issued 10 days ago for 90 days (not due),
    with fresh ARI data (the CA's window in 40 days, next check in a day), as a run that asked
    the CA's renewal info leaves it: the steady state of a CA with ARI.

    Written with certbatch's own Store, so the layout is the real one; the certificates are
    self-signed (a renew with nothing due reads only meta.json and status.json anyway).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from certbatch import ari
    from certbatch.store import CertStatus, Store

    store = Store(state)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    not_before, not_after = now - dt.timedelta(days=10), now + dt.timedelta(days=80)
    key = ec.generate_private_key(ec.SECP256R1())  # one key: its cost is not what is measured
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    for name, domains in names.items():
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]),
                               critical=False)
                .sign(key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        store.save_certificate(name, key_type="ec-p256", domains=tuple(domains),
                               privkey_pem=key_pem, cert_pem=pem, chain_pem=b"",
                               fullchain_pem=pem, serial=format(cert.serial_number, "x"),
                               not_before=not_before, not_after=not_after, issued_at=not_before)
        serial = format(cert.serial_number, "x")
        window = ari.answered(None, serial, now + dt.timedelta(days=40),
                              now + dt.timedelta(days=42), None, "86400", now)
        store.save_status(name, CertStatus(last_attempt=not_before, last_result="renewed",
                                           last_success=not_before, ari=window))


# Runs certbatch.cli.main in-process, then records which of the heavy modules it had imported.
MODULE_CHECK = textwrap.dedent("""
    import json, sys
    from certbatch.cli import main
    code = 0
    try:
        main(sys.argv[3:])
    except SystemExit as exc:
        code = exc.code
    watched = sys.argv[2].split(",")
    with open(sys.argv[1], "w") as fh:
        json.dump({"exit": code, "loaded": [m for m in watched if m in sys.modules]}, fh)
""")


def check_modules(config: Path, env: dict[str, str], out: Path) -> dict[str, Any]:
    child = run_child([sys.executable, "-c", MODULE_CHECK, str(out), ",".join(WATCHED),
                       "-c", str(config), "renew"], env)
    if child.returncode != 0:
        raise ScenarioFailed(child.describe_failure())
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def import_times(config: Path, env: dict[str, str], top: int = 8) -> list[tuple[str, float]]:
    """Top-level imports of one idle run by cumulative time (ms), from `python -X importtime`."""
    child = run_child([sys.executable, "-X", "importtime", "-m", "certbatch", "-c", str(config),
                       "renew"], env)
    times: list[tuple[str, float]] = []
    for line in child.stderr.splitlines():
        # "import time:       self [us] |  cumulative | imported package"; nesting = indentation
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, package = line[len("import time:"):].split("|")
        if package.startswith("  "):
            continue  # nested: one space, then two more per level
        times.append((package.strip(), int(cumulative) / 1000))
    return sorted(times, key=lambda t: -t[1])[:top]


# -- certbot -------------------------------------------------------------------------------------

def find_certbot(mode: bool | None) -> Path | None:
    """certbot from /tmp/certbot-venv or PATH; installed into the venv only with --certbot."""
    venv_bin = CERTBOT_VENV / "bin" / "certbot"
    if mode is False:
        return None
    if venv_bin.exists():
        return venv_bin
    on_path = shutil.which("certbot")
    if on_path:
        return Path(on_path)
    if mode is None:
        return None
    print(f"installing certbot into {CERTBOT_VENV} (pip) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(CERTBOT_VENV)], check=True)
    subprocess.run([str(CERTBOT_VENV / "bin" / "pip"), "install", "-q",
                    "--disable-pip-version-check", "certbot"], check=True)
    return venv_bin


class Certbot:
    """certbot's manual plugin with dns-01 hooks calling the same challtestsrv script."""

    def __init__(self, binary: Path, folder: Path, pebble: Any, env: dict[str, str]) -> None:
        self.binary = binary
        self.folder = folder
        self.pebble = pebble
        # certbot trusts Pebble through requests' CA bundle variable.
        self.env = dict(env, REQUESTS_CA_BUNDLE=str(pebble.ca_bundle))
        script = shlex.quote(str(REPO / "hooks" / "dns" / "challtestsrv.sh"))
        record = '"_acme-challenge.$CERTBOT_DOMAIN." "$CERTBOT_VALIDATION"'
        self.auth_hook = f'{script} add "$CERTBOT_DOMAIN" {record}'
        self.cleanup_hook = f'{script} remove "$CERTBOT_DOMAIN" {record}'

    def _dirs(self) -> list[str]:
        return ["--config-dir", str(self.folder / "config"), "--work-dir",
                str(self.folder / "work"), "--logs-dir", str(self.folder / "logs"),
                "--non-interactive"]

    def version(self) -> str:
        child = run_child([str(self.binary), "--version"], self.env)
        return (child.stdout or child.stderr).strip()

    def issue(self, name: str, domains: list[str]) -> Child:
        argv = [str(self.binary), "certonly", *self._dirs(), "--manual",
                "--preferred-challenges", "dns", "--manual-auth-hook", self.auth_hook,
                "--manual-cleanup-hook", self.cleanup_hook, "--server", self.pebble.directory_url,
                "--agree-tos", "-m", "x@example.com", "--no-eff-email", "--cert-name", name]
        for domain in domains:
            argv += ["-d", domain]
        return self._checked(argv)

    def renew_all(self) -> Child:
        # Without --no-random-sleep-on-renew, a renew without a terminal first sleeps up to 8 min.
        return self._checked([str(self.binary), "renew", *self._dirs(), "--force-renewal",
                              "--no-random-sleep-on-renew"])

    def _checked(self, argv: list[str]) -> Child:
        child = run_child(argv, self.env)
        if child.returncode != 0:
            raise ScenarioFailed(child.describe_failure())
        return child


# -- the benchmark -------------------------------------------------------------------------------

def start_ca(workdir: Path, env: dict[str, str] | None = None) -> Any:
    """Pebble + pebble-challtestsrv from the test suite's helper (tests/ is not a package)."""
    sys.path.insert(0, str(REPO / "tests"))
    from pebble_server import start_pebble

    return start_pebble(workdir, extra_env=PEBBLE_ENV if env is None else env)


def write_certbatch_config(folder: Path, pebble: Any, names: dict[str, list[str]],
                           workers: int, dns_calls: str, **sections: Any) -> Path:
    """folder/certbatch.yaml (dns-01 through hooks/dns/challtestsrv.sh), as the tests write it."""
    sys.path.insert(0, str(REPO / "tests"))
    from cli_helpers import dns01, write_config

    return write_config(folder, pebble, {n: {"domains": d} for n, d in names.items()},
                        renewal={"workers": workers},
                        defaults={"challenge": dns01(calls=dns_calls)}, **sections)


def say(text: str) -> None:
    print(text, flush=True)


class Benchmark:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        # The validated-config cache of every certbatch child goes with the work folder, not
        # into /var/cache/certbatch (one file per config path, never cleaned up there).
        os.environ["CERTBATCH_CACHE_DIR"] = str(workdir / "config-cache")
        self.rows: list[Row] = []
        self.errors: list[str] = []
        self.force_row: Row | None = None  # certbatch's forced renewal of N, once measured

    def scenario(self, label: str, fn: Any, *a: Any) -> Any:
        """Run one scenario; a failure is reported and the others still run."""
        try:
            return fn(*a)
        except ScenarioFailed as exc:
            self.errors.append(f"{label}: {exc}")
            say(f"!! {label} failed: {exc}")
        return None

    def record(self, label: str, n: int, child: Child, **kw: Any) -> Row:
        """Print one measured child process and add it to the final table."""
        row = Row(label, n, child.wall, child.rss_mb, child.cpu, **kw)
        rate = f"{n / child.wall:6.1f} certs/s" if row.per_cert else " " * 14
        say(f"{label:<44} {child.wall:7.2f} s  {rate}  CPU {child.cpu:6.2f} s  "
            f"{child.rss_mb:4.0f} MB")
        self.rows.append(row)
        return row

    def run(self) -> int:
        args = self.args
        say(f"certbatch benchmark: N={args.count} two-name certificates, workers={args.workers} "
            f"(default {DEFAULT_WORKERS}), {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
        say(f"work folder: {self.workdir}")
        usage_before = CpuUsage.now()
        pebble = start_ca(self.workdir / "pebble")
        settings = " ".join(f"{k}={v}" for k, v in PEBBLE_ENV.items())
        say(f"pebble: {pebble.directory_url} ({settings})")
        try:
            env = certbatch_env(pebble.env())
            cfg = None if args.idle_only else self.scenario(
                "certbatch on pebble", self.certbatch_pebble, pebble, env)
            if cfg is not None:
                self.scenario("forced renewal against the bare loop", self.rounds, pebble, env,
                              cfg)
                if args.steps:
                    self.scenario("issuance steps", self.steps, env, cfg)
                self.scenario("syscalls per certificate", self.syscalls, env, cfg)
            if args.sweep and not args.idle_only:
                self.scenario("workers sweep", self.sweep, env)
            if not args.idle_only:
                self.scenario("certbot", self.certbot, pebble, env)
            if args.realistic:
                self.scenario("a CA with validation delays", self.realistic)
        finally:
            pebble.stop()
        self.scenario("nothing due", self.idle, pebble)
        foreign = CpuUsage.now().foreign_share(usage_before)
        print_table(self.rows)
        if foreign is not None:
            say(f"CPU used by processes other than this benchmark's while it ran: "
                f"{foreign:.0%} of the machine")
            if foreign > FOREIGN_CPU_LIMIT:
                say("WARNING: the machine was busy with other work: these figures measure "
                    "contention too; run again on a quiet machine")
        for error in self.errors:
            say(f"ERROR {error}")
        return 1 if self.errors else 0

    # -- scenarios -----------------------------------------------------------------------------

    def certbatch_pebble(self, pebble: Any, env: dict[str, str]) -> Path:
        """First issuance of N and a run with nothing due, on the state the rounds renew."""
        n, w = self.args.count, self.args.workers
        cfg = write_certbatch_config(self.workdir / "certbatch", pebble, cert_names(n), w,
                                     self.args.dns_calls)
        say(f"\n== certbatch, {n} certificates, {w} workers ({cfg})")
        self.warm_up(cfg.parent, pebble, env)
        issue = run_certbatch(cfg, ["renew", "--json"], env, expect={"issued": n})
        self.record("certbatch renew (first issuance)", n, issue)
        idle = run_certbatch(cfg, ["renew"], env)
        self.record("certbatch renew (nothing due)", n, idle, per_cert=False)
        if idle.stdout.strip():
            say("   stdout of a run with nothing due is NOT empty: cron would mail it")
        return cfg

    def rounds(self, pebble: Any, env: dict[str, str], cfg: Path) -> None:
        """--rounds x (certbatch renew --force, bare loop, bare loop with the dns script),
        interleaved so that drift (Pebble's growing state, the disk, other load) hits all three
        alike; each row is the median round."""
        n, w, r = self.args.count, self.args.workers, self.args.rounds
        say(f"\n== forced renewal of {n} against the bare acme loop (lower bound), {w} workers, "
            f"{r} interleaved round(s), medians")
        force_runs: list[Child] = []
        bare_runs: list[Child] = []
        script_runs: list[Child] = []
        loop_seconds: list[float] = []
        for i in range(r):
            force_runs.append(run_certbatch(cfg, ["renew", "--force", "--json"], env,
                                            expect={"renewed": n}))
            out = self.workdir / f"bare-loop-{i}.json"
            bare_runs.append(self.bare_loop(pebble, out, []))
            loop_seconds.append(json.loads(out.read_text())["loop_seconds"])
            # The same loop paying for the dns-01 script certbatch calls (same `calls`): what
            # is left between it and certbatch is certbatch's own overhead. Information only.
            script_runs.append(self.bare_loop(
                pebble, self.workdir / f"bare-loop-script-{i}.json",
                ["--prefix", "s", "--dns-script", str(DNS_HOOK), "--dns-calls",
                 self.args.dns_calls]))
            say(f"   round {i + 1}: certbatch {force_runs[-1].wall:.2f} s, bare loop "
                f"{bare_runs[-1].wall:.2f} s ({force_runs[-1].wall / bare_runs[-1].wall:.2f}x), "
                f"bare loop with the dns script {script_runs[-1].wall:.2f} s")
        force, bare, same = (median_child(runs) for runs in (force_runs, bare_runs, script_runs))
        self.force_row = self.record("certbatch renew --force", n, force)
        self.record("bare acme loop (lower bound)", n, bare)
        say(f"   of which the loop itself (no interpreter start, imports, account): "
            f"{statistics.median(loop_seconds):.2f} s")
        self.record("bare acme loop, same dns script", n, same)
        ratio = force.wall / bare.wall
        say(f"certbatch renew --force / bare loop = {ratio:.2f}x (target <= {BARE_RATIO_TARGET}x)")
        self.force_row.ratio = f"{ratio:.2f}x bare"
        self.force_row.target = f"<= {BARE_RATIO_TARGET}x bare"
        self.force_row.ok = ratio <= BARE_RATIO_TARGET
        wall, cpu = force.wall / same.wall, force.cpu / same.cpu
        say(f"certbatch renew --force / bare loop with the same dns script = {wall:.2f}x wall, "
            f"{cpu:.2f}x CPU (certbatch's own overhead; targets <= {SAME_WALL_TARGET}x, "
            f"<= {SAME_CPU_TARGET}x)")
        self.rows.append(Row("  certbatch / bare loop with the same dns script", n, None,
                             ratio=f"{wall:.2f}x wall, {cpu:.2f}x CPU",
                             target=f"<= {SAME_WALL_TARGET}x, <= {SAME_CPU_TARGET}x",
                             ok=wall <= SAME_WALL_TARGET and cpu <= SAME_CPU_TARGET,
                             per_cert=False))

    def syscalls(self, env: dict[str, str], cfg: Path) -> None:
        """fsyncs and processes per renewed certificate: one more forced renewal of the N under
        `strace -f -c` (not timed: strace slows every system call). Skipped without strace."""
        strace = shutil.which("strace")
        if strace is None:
            say("\n== syscalls per certificate: skipped (no strace)")
            return
        n = self.args.count
        say(f"\n== fsyncs and processes per certificate (renew --force of {n} under strace)")
        out = self.workdir / "strace.txt"
        child = run_child([strace, "-f", "-qq", "-c", "-o", str(out), "-e",
                           "trace=fsync,fdatasync,execve", sys.executable, "-m", "certbatch",
                           "-c", str(cfg), "renew", "--force"], env)
        if child.returncode != 0:
            raise ScenarioFailed(child.describe_failure())
        calls: dict[str, int] = {}
        for line in out.read_text().splitlines():
            # "% time  seconds  usecs/call  calls  [errors]  syscall"
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync", "execve"):
                calls[parts[-1]] = int(parts[3])
        fsyncs = calls.get("fsync", 0) + calls.get("fdatasync", 0)
        # execve: the certbatch process itself, then every hook, dns script and its commands
        processes = max(calls.get("execve", 0) - 1, 0)
        say(f"   {fsyncs} fsyncs, {processes} processes started, for {n} certificates "
            f"(the run's own: a few fsyncs for the disk probes and the batch)")
        from certbatch.fsutil import ordered_journal

        say("   the work folder's file system " + (
            "commits its journal in order: 9 per certificate expected" if
            ordered_journal(self.workdir) else "has no journal known to commit in order "
            "(btrfs, ext4 without one, tmpfs, ...): 11 per certificate expected"))
        self.rows.append(Row("  fsyncs per certificate", n, None, ratio=f"{fsyncs / n:.1f}",
                             target="<= 9", ok=fsyncs / n <= 9, per_cert=False))
        self.rows.append(Row("  processes per certificate", n, None,
                             ratio=f"{processes / n:.1f}", target="info", ok=True,
                             per_cert=False))

    def steps(self, env: dict[str, str], cfg: Path) -> None:
        """One more forced renewal, logged to a file (not measured: logging costs), and the
        mean time of each issuance step."""
        log = self.workdir / "renew-force.log"
        say(f"\n== issuance steps: certbatch renew --force --log-file {log}")
        run_certbatch(cfg, ["renew", "--force", "--json", "--log-file", str(log)], env,
                      expect={"renewed": self.args.count})
        sys.path.insert(0, str(HERE))
        import log_steps

        log_steps.main(str(log))

    def warm_up(self, folder: Path, pebble: Any, env: dict[str, str]) -> None:
        """Register the ACME account with a one-certificate run sharing the state folder.

        Guards against a race seen while this benchmark was written (Runner._acme() was not
        locked: with no stored account, each worker thread of the first run registered its own,
        and account.key / regr.json could come from two different registrations, so every later
        run failed with "JWS verification error"). With the account stored first, the measured
        runs only load it; registering costs one request, so the figures hardly change.
        """
        paths = {"state": str(folder / "state"), "spool": str(folder / "spool"),
                 "hooks": str(folder / "hooks")}
        cfg = write_certbatch_config(folder / "warm-up", pebble,
                                     {"warmup": ["warmup.example.com"]}, 1,
                                     self.args.dns_calls, paths=paths)
        child = run_certbatch(cfg, ["renew", "--json"], env, expect={"issued": 1})
        say(f"warm-up (registers the account, not counted): {child.wall:.2f} s")

    def realistic(self) -> None:
        """A CA that takes its time: Pebble validating each authorization after a random 0 to
        REALISTIC_SLEEP seconds (as a real CA's validation does), REALISTIC_COUNT
        certificates renewed by force with each of REALISTIC_WORKERS."""
        n = REALISTIC_COUNT
        pebble = start_ca(self.workdir / "pebble-slow",
                          {"PEBBLE_VA_NOSLEEP": "0", "PEBBLE_VA_SLEEPTIME": str(REALISTIC_SLEEP),
                           "PEBBLE_AUTHZREUSE": "0",
                           "PEBBLE_WFE_NONCEREJECT": "0"})
        try:
            env = certbatch_env(pebble.env())
            cfg = write_certbatch_config(self.workdir / "slow", pebble, cert_names(n, "r"),
                                         max(REALISTIC_WORKERS), self.args.dns_calls)
            say(f"\n== a CA with validation delays of 0-{REALISTIC_SLEEP} s: {n} certificates")
            run_certbatch(cfg, ["renew", "--json"], env, expect={"issued": n})
            for w in REALISTIC_WORKERS:
                child = run_certbatch(cfg, ["renew", "--force", "--json", "--workers", str(w)],
                                      env, expect={"renewed": n})
                self.record(f"  slow CA: renew --force --workers {w}", n, child)
        finally:
            pebble.stop()

    def sweep(self, env: dict[str, str]) -> None:
        """Forced renewal of the same N with each worker count of --sweep."""
        cfg = self.workdir / "certbatch" / "certbatch.yaml"
        n = self.args.count
        say(f"\n== workers sweep: certbatch renew --force of {n}")
        for w in self.args.sweep:
            child = run_certbatch(cfg, ["renew", "--force", "--json", "--workers", str(w)], env,
                                  expect={"renewed": n})
            self.record(f"  sweep: renew --force --workers {w}", n, child)

    def bare_loop(self, pebble: Any, out: Path, extra: list[str]) -> Child:
        """One run of bare_acme_loop.py over N certificates with W threads."""
        child = run_child([sys.executable, str(BARE_LOOP), "--directory", pebble.directory_url,
                           "--ca-bundle", str(pebble.ca_bundle), "--challtestsrv",
                           pebble.challtestsrv_url, "--count", str(self.args.count),
                           "--workers", str(self.args.workers), "--out", str(out), *extra])
        if child.returncode != 0:
            raise ScenarioFailed(child.describe_failure()
                                 + (f"\n{out.read_text()}" if out.exists() else ""))
        return child

    def certbot(self, pebble: Any, env: dict[str, str]) -> None:
        """certbot certonly for K = min(N, --certbot-count), then one forced `renew` of all K."""
        binary = find_certbot(self.args.certbot)
        if binary is None:
            why = ("skipped (--no-certbot)" if self.args.certbot is False else
                   f"certbot not installed: skipped (run with --certbot to install it into "
                   f"{CERTBOT_VENV})")
            say(f"\n== certbot: {why}")
            self.rows.append(Row("certbot: skipped", 0, None, per_cert=False))
            return
        k = min(self.args.count, self.args.certbot_count)
        bot = Certbot(binary, self.workdir / "certbot", pebble, env)
        say(f"\n== certbot ({bot.version()}, {binary}), {k} certificates, one at a time")
        runs = [bot.issue(name, domains) for name, domains in cert_names(k, "cb").items()]
        issue = Child(["certbot certonly"], sum(r.wall for r in runs),
                      max(r.rss_mb for r in runs), sum(r.cpu for r in runs), 0, "", "")
        self.record("certbot certonly x K (measured)", k, issue)
        renew = bot.renew_all()
        self.record("certbot renew --force-renewal (measured)", k, renew)
        n, per_cert = self.args.count, renew.wall / k
        extrapolated = Row(f"certbot renew --force-renewal (extrapolated, {k} -> {n})", n,
                           per_cert * n, None, renew.cpu / k * n)
        say(f"{extrapolated.scenario:<44} {per_cert * n:7.2f} s  ({per_cert:.3f} s per "
            f"certificate x {n})")
        force = self.force_row
        if force is not None and force.wall is not None:
            ratio = per_cert / (force.wall / n)
            say(f"per certificate: certbot {per_cert:.3f} s, certbatch {force.wall / n:.3f} s: "
                f"certbatch is {ratio:.1f}x faster (target >= {CERTBOT_RATIO_TARGET:.0f}x)")
            extrapolated.ratio = f"{ratio:.1f}x certbatch"
            extrapolated.target = f">= {CERTBOT_RATIO_TARGET:.0f}x certbatch"
            extrapolated.ok = ratio >= CERTBOT_RATIO_TARGET
        self.rows.append(extrapolated)

    def idle(self, pebble: Any) -> None:
        """Nothing due over M stored certificates: median whole-process time of 5 runs."""
        m = self.args.idle_count
        folder = self.workdir / "idle"
        names = cert_names(m, prefix="i")
        say(f"\n== nothing due over {m} certificates (Pebble stopped: no network used)")
        t0 = time.perf_counter()
        write_idle_store(folder / "state", names)
        cfg = write_certbatch_config(folder, pebble, names, self.args.workers,
                                     self.args.dns_calls)
        say(f"store of {m} issued certificates written in {time.perf_counter() - t0:.1f} s")
        env = certbatch_env()
        run_certbatch(cfg, ["renew"], env)  # untimed: warms the page cache and .pyc files
        # That first run stages every certificate (status.json written): a folder changed less
        # than 2 s before a run is looked at in full (digest.RACY_NS). Cron runs are hours
        # apart: let the changes settle, then one more run records every certificate.
        time.sleep(2.1)
        run_certbatch(cfg, ["renew"], env)
        statuses = sorted((folder / "state" / "certs").glob("*/status.json"))
        before = [p.stat().st_mtime_ns for p in statuses]
        runs = sorted((run_certbatch(cfg, ["renew"], env) for _ in range(IDLE_REPEATS)),
                      key=lambda r: r.wall)
        # A run that asked the CA (ARI) would have stored its answer: none may have.
        quiet = [p.stat().st_mtime_ns for p in statuses] == before
        say(f"status files written by the timed runs: {'none' if quiet else 'SOME'} (fresh "
            f"ARI data: no renewal info asked for)")
        self.rows.append(Row("  idle run asks renewal info (ARI)?", m, None,
                             ratio="no" if quiet else "yes", target="no", ok=quiet,
                             per_cert=False))
        median = runs[len(runs) // 2]
        say(f"{IDLE_REPEATS} runs: " + ", ".join(f"{r.wall:.3f}" for r in runs) + " s")
        self.record(f"certbatch renew, nothing due (median of {IDLE_REPEATS})", m, median,
                    per_cert=False, target=f"< {IDLE_TARGET_S} s, < {IDLE_TARGET_MB} MB",
                    ok=median.wall < IDLE_TARGET_S and median.rss_mb < IDLE_TARGET_MB)
        # The same with every certificate looked at in full (no digest: the first run after
        # a change of the renewal settings, or after the digest was deleted), caches warm.
        (folder / "state" / "digest.json").unlink(missing_ok=True)
        full = run_certbatch(cfg, ["renew"], env)
        self.record("  same, every certificate looked at in full (no digest)", m, full,
                    per_cert=False)
        if any(r.stdout.strip() for r in runs):
            say("   stdout of a run with nothing due is NOT empty: cron would mail it")
        modules = check_modules(cfg, env, folder / "modules.json")
        clean = not set(modules["loaded"]) & set(ACME_MODULES)
        say(f"modules loaded by an idle run (of {', '.join(WATCHED)}): "
            f"{', '.join(modules['loaded']) or 'none'} -> ACME stack "
            f"{'not imported' if clean else 'IMPORTED'}")
        self.rows.append(Row("  idle run imports acme/josepy?", m, None,
                             ratio="no" if clean else "yes", target="no", ok=clean,
                             per_cert=False))
        top = import_times(cfg, env)
        say("slowest top-level imports of an idle run (python -X importtime, cumulative ms): "
            + ", ".join(f"{name} {ms:.0f}" for name, ms in top))
        self.restage(folder, cfg, env, m)

    def restage(self, folder: Path, cfg: Path, env: dict[str, str], m: int) -> None:
        """Restaging every stored certificate: `run-hook --target T --all` hands one (no-op)
        notify target every live certificate, staged again through the spool (no deploy
        hook, so this is certbatch's own cost: store reads, staging folders, fsyncs)."""
        hook = folder / "hooks" / "notify.d" / "00-accept"
        hook.write_text("#!/bin/sh\nexit 0\n")
        hook.chmod(0o755)
        say(f"\n== restaging {m} certificates (run-hook --target 00-accept --all)")
        child = run_certbatch(cfg, ["run-hook", "--target", "00-accept", "--all"], env)
        # The target is the issue's, at 10,000; below that the fixed cost (imports, the
        # notify phase's setup) is most of the time, and scaling the target down says nothing.
        at_scale = m >= 10000
        self.record("certbatch run-hook --all (restage every certificate)", m, child,
                    target=f"<= {RESTAGE_TARGET_S * m / 10000:g} s" if at_scale
                    else f"info (<= {RESTAGE_TARGET_S:g} s at 10,000)",
                    ok=child.wall <= RESTAGE_TARGET_S * m / 10000 if at_scale else True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark certbatch renewals against a local Pebble (see README.md).")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help=f"certificates issued and renewed on Pebble (default {DEFAULT_COUNT})")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"renewal.workers, also used by the bare loop "
                             f"(default {DEFAULT_WORKERS})")
    parser.add_argument("--certbot", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with certbot; default: only if already installed "
                             f"(--certbot installs it into {CERTBOT_VENV})")
    parser.add_argument("--certbot-count", type=int, default=DEFAULT_CERTBOT_COUNT,
                        help=f"certbot certificates, min(N, this) (default "
                             f"{DEFAULT_CERTBOT_COUNT}); its figures are extrapolated to N")
    parser.add_argument("--idle-count", type=int, default=DEFAULT_IDLE_COUNT,
                        help=f"certificates in the nothing-due run (default {DEFAULT_IDLE_COUNT})")
    parser.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=[], metavar="W1,W2,...",
                        help="also time renew --force with each of these worker counts")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"interleaved rounds of forced renewal, bare loop and bare loop "
                             f"with the dns script; medians are compared (default "
                             f"{DEFAULT_ROUNDS})")
    parser.add_argument("--steps", action="store_true",
                        help="also run a forced renewal with a log file (not measured) and print "
                             "its mean time per issuance step (log_steps.py)")
    parser.add_argument("--dns-calls", choices=("per-certificate", "per-record"),
                        default="per-certificate",
                        help="the dns-01 challenge's `calls` setting: one script run per "
                             "certificate and action (default), or per record and action")
    parser.add_argument("--realistic", action="store_true",
                        help=f"also renew {REALISTIC_COUNT} certificates on a Pebble with "
                             f"validation delays of 0-{REALISTIC_SLEEP} s, with workers "
                             f"{', '.join(map(str, REALISTIC_WORKERS))} (a few minutes)")
    parser.add_argument("--idle-only", action="store_true",
                        help="only the nothing-due run over --idle-count certificates")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if args.count < 1 or args.idle_count < 1 or args.rounds < 1 or not 1 <= args.workers <= 64:
        parser.error("--count, --idle-count and --rounds must be >= 1, --workers 1..64")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="certbatch-bench-"))
    try:
        return Benchmark(args, workdir).run()
    finally:
        if args.keep:
            say(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
