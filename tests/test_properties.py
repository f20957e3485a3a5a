"""Property-based tests (hypothesis): config loading fails only with ConfigError, and crash
recovery of the spool's staging state machine never loses a finished staging.

Examples are random locally and derandomized (the same every run) when $CI is set; no example
database is kept. The whole file takes about 15 s.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from test_spool import cert as spool_cert

import certbatch.spool.staging as staging_mod
from certbatch.config import Settings, load
from certbatch.errors import ConfigError
from certbatch.spool import CertFiles, Spool
from certbatch.spool.entries import META_VERSION, entry_problem
from certbatch.store import iso

CI = bool(os.environ.get("CI"))


def props(max_examples: int) -> Callable[[Any], Any]:
    return settings(max_examples=max_examples, deadline=None, derandomize=CI, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# == 1. Config loading raises only ConfigError ==================================================

VALID: dict[str, Any] = {
    "acme": {"directory": "https://acme.example/directory", "email": "ops@example.com",
             "ca_bundle": "ca.pem", "eab": {"kid": "kid-1", "hmac_key": "aGVsbG8"},
             "timeout": "30s"},
    "paths": {"state": "./state", "spool": "./spool", "hooks": "./hooks"},
    "renewal": {"before_expiry": "30d", "workers": 4, "deadline": 600, "jitter": "10s"},
    "hooks": {"notify": "systemctl reload nginx", "deploy_timeout": 120, "notify_timeout": "5m",
              "notify_workers": 2,
              "targets": {"web": {"command": ["/bin/true", "x"], "timeout": 30,
                                  "env": {"ROLE": "web", "COUNT": 3}},
                          "mail": "/bin/true"}},
    "logging": {"file": "certbatch.log"},
    "metrics": {"file": "metrics.prom"},
    "defaults": {"key": "ec-p256", "challenge": {"type": "http-01", "webroot": "www"},
                 "deploy": "true"},
    "certificates": {
        "web": {"domains": ["example.com", "www.example.com"], "key": "rsa-2048"},
        "wild": {"domains": ["*.example.org"],
                 "challenge": {"type": "dns-01", "script": "dns.sh", "wait": "5s",
                               "calls": "per-certificate"}},
        "ddns": {"domains": ["ddns.example.org", "*.ddns.example.org"],
                 "challenge": {"type": "dns-01", "provider": "rfc2136", "server": "[::1]:5353",
                               "tsig_key": "certbatch.", "tsig_secret": "c2VjcmV0",
                               "zone": "example.org.", "follow_cnames": False,
                               "propagation": "check", "propagation_timeout": "1m",
                               "resolver": "127.0.0.1", "nameserver_port": 53}},
        "alone": {"domains": ["alone.example.net"],
                  "challenge": {"type": "http-01",
                                "standalone": {"port": 8080, "address": "127.0.0.1"}},
                  "deploy": ["/bin/true"]},
    },
}

# A billion laughs: a list of 2**30 leaves when expanded, a few hundred bytes as text.
LAUGHS = functools.reduce(lambda s, i: f"[&l{i} {s}, *l{i}]", range(30), "x")
# YAML text put in place of a value or key as is: tags, anchors, aliases, merge keys, timestamps,
# odd numbers, and things that are not YAML at all.
RAW = [
    "!!python/object:os.system ['true']", "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system", "!!binary aGVsbG8=", "!!binary '!!!'", "!!timestamp 2020-13-45",
    "!!timestamp foo", "2020-13-45", "2020-02-30", "2001-12-14t21:59:43.10-99:99",
    "!!int ''", "!!int abc", "!!int 0x", "!!float abc", "!!float ''", "!!bool maybe",
    "!!null x", "!!str", "!!set {a, b}", "!!omap [a: 1, b: 2]", "!!omap [1, 2]",
    "!!pairs [a: 1]", "!!pairs x", "!!merge x", "!unknown x", "!<tag:example.com,2000:x> 1",
    "*nowhere", "&r [*r]", "&s {x: *s}", "{<<: *nowhere}", "{<<: 1}", "{<<: [1]}",
    "&m {<<: *m}", "{a: 1, a: 2}", "[a, {b: 1, b: 2}]", "{? [a]: 1}", "{? {a: 1}: 1}",
    "1:2:3", "190:20:30", "0o777", "0b102", "0x" + "f" * 4000, "0b" + "1" * 5000,
    "9" * 5000, "9" * 400, "-" + "9" * 400, "1e400", "-1e400", "1_000", "+.inf", "-.inf",
    ".nan", "~", "null", "yes", "off", "=", "-0", "0.", ".", "'unterminated", '"\\x"',
    '"\\ud800"', '"\\U0010ffff"', '"\\0"', '"a\\u2028b"', '"a\\x85b"', "|\n  block",
    ">-\n  folded", "--- next", "...", "%YAML 1.1", "\t", "@reserved", "`x",
    "[" * 990 + "]" * 990, "[" * 1100 + "]" * 1100,
    LAUGHS,
]


@dataclasses.dataclass(frozen=True)
class Raw:
    """A value dumped as the raw YAML text RAW[index] (see _dump)."""

    index: int


RAW.append("<<")
MERGE_KEY = Raw(len(RAW) - 1)  # `<<: *anchor`, made by the "merge" mutation


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    Raw, lambda dumper, raw: dumper.represent_scalar("tag:yaml.org,2002:str",
                                                     f"rawfragment{raw.index}x"))

INTERESTING = [
    "", " ", "0", "-5", "10x", "1e400", "30d", "-1s", "http://", "https://a b", "ftp://x",
    "ec-p256 ", "EC-P256", "rsa2048", "*.com", "*", "dns-01", "http-01", "per-record", "www",
    "dns.sh", "ca.pem", "/", "../", "~", "/dev/null", "/proc/self", "é.example", "xn--",
    "bücher.example", "a..b", "-a.example", "192.0.2.1", "[::1]", "a:80", "http://a.example/",
    "a\u2028b", "a\x85b", "a\nb", "a\x00b", "\x00", "\udcff", "a" * 300, "a" * 5000,
    "x" * 64 + ".example", "/" + "a/" * 2100, "a" * 255, "a" * 256 + "/b", "<<", "&a", "*a",
    "CERTBATCH_NAME", "notify", "127.0.0.1", "::", "999999", "0.0.0.0",
    "rfc2136", "hmac-sha256", "c2VjcmV0", "127.0.0.1:53", "[::1]:0", "1.2.3.4:", "check", "none",
    "lexicon", "acme-dns", "http://127.0.0.1:1", "http://[::1", "http://a@b",
]

KNOWN_KEYS = ["acme", "paths", "renewal", "hooks", "logging", "metrics", "defaults",
              "certificates", "type", "domains", "key", "file", "command", "timeout", "env",
              "webroot", "webroot_map", "standalone", "port", "address", "script", "wait",
              "calls", "eab", "kid", "hmac_key", "directory", "deploy", "targets", "notify",
              "workers", "provider",
              "server", "tsig_key", "tsig_secret", "tsig_secret_file", "tsig_algorithm", "zone",
              "follow_cnames", "propagation", "propagation_timeout", "resolver",
              "nameserver_port", "lexicon_provider", "credentials", "credentials_file", "api",
              "accounts_file"]
_raw = st.sampled_from(range(len(RAW))).map(Raw)
_keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12), st.sampled_from(INTERESTING),
                  st.integers(), st.booleans(), st.none(), st.floats(), _raw)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.sampled_from([0, -1, 1, 65536, -(2**63), 2**64, 10**400, -(10**400), 2**4000]),
    st.floats(), st.text(max_size=40), st.sampled_from(INTERESTING),
    st.sampled_from(INTERESTING), st.binary(max_size=16), _raw, _raw, _raw,
    st.dates(), st.datetimes(),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)), max_leaves=8)

EDGE_NUMBERS = [0, -1, 1, 64, 65, 65536, -(2**63), 2**64, 10**400, -(10**400), 2**1000 - 1,
                2**4000, 0.0, -0.0, 1e-300, 1e308, float("inf"), float("-inf"), float("nan")]
# A value for a leaf: the edge cases mostly.
_leaf_values = st.one_of(st.sampled_from(INTERESTING), st.sampled_from(EDGE_NUMBERS), _raw,
                         _scalars)

MUTATIONS = ("leaf", "leaf", "set", "set", "delete", "add", "alias", "merge", "cycle", "retype")
_mutation = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 10**6), st.integers(0, 10**6),
                      st.one_of(_values, _leaf_values), _keys)


def _slots(data: Any) -> list[tuple[Any, Any]]:
    """(container, key) of every value in `data`; each container once (aliases, cycles)."""
    out: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    stack = [data]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for k, v in list(node.items() if isinstance(node, dict) else enumerate(node)):
            out.append((node, k))
            if isinstance(v, (dict, list)):
                stack.append(v)
    return out


def _mutate(data: dict[Any, Any], op: tuple[str, int, int, Any, Any]) -> None:
    kind, i, j, value, key = op
    slots = _slots(data)
    containers = [data] + [c[k] for c, k in slots if isinstance(c[k], (dict, list))]
    mappings = [c for c in containers if isinstance(c, dict)]
    if not slots:
        data[key] = value
        return
    c, k = slots[i % len(slots)]
    if kind == "leaf":  # replace a scalar, keeping the rest valid
        leaves = [(c, k) for c, k in slots if not isinstance(c[k], (dict, list))]
        c, k = leaves[i % len(leaves)] if leaves else (c, k)
        c[k] = value
    elif kind == "set":
        c[k] = value
    elif kind == "delete":
        del c[k]
    elif kind == "add":
        mappings[i % len(mappings)][key] = value
    elif kind == "alias":  # the same object twice: the dumper writes an anchor and an alias
        c2, k2 = slots[j % len(slots)]
        c[k] = c2[k2]
    elif kind == "merge":  # `<<: *anchor` (possibly the mapping itself)
        mappings[i % len(mappings)][MERGE_KEY] = mappings[j % len(mappings)]
    elif kind == "cycle":  # a container holding itself or an ancestor
        c[k] = containers[j % len(containers)]
    elif kind == "retype":
        v = c[k]
        if isinstance(v, dict):
            c[k] = list(v.values())
        elif isinstance(v, list):
            c[k] = dict(enumerate(v))
        elif isinstance(v, str):
            c[k] = [v]
        else:
            c[k] = str(v)


def _dump(data: Any, flow: bool | None, unicode: bool) -> str:
    text = yaml.dump(data, Dumper=_Dumper, default_flow_style=flow, allow_unicode=unicode,
                     sort_keys=False, width=100)
    # Longest index first: "rawfragment1x" must not match inside "rawfragment12x".
    for index in sorted(range(len(RAW)), reverse=True):
        text = text.replace(f"rawfragment{index}x", RAW[index])
    return text


TEXT_EDITS = ("dup-line", "del-line", "insert-raw", "truncate", "char", "none", "none")
_SPECIALS = st.sampled_from([":", "- ", "[", "]", "{", "}", "&a ", "*a", "!", "|", ">", '"', "'",
                             "#", "%", "@", "`", "\t", "\n", "\x00", "\r", "\ufeff", "  ",
                             "<<: ", "? ", ",", "\x85", "\u2028"])
_text_edit = st.tuples(st.sampled_from(TEXT_EDITS), st.integers(0, 10**6),
                       st.sampled_from(range(len(RAW))), _SPECIALS)


def _edit_text(text: str, edit: tuple[str, int, int, str]) -> str:
    kind, pos, raw, special = edit
    lines = text.splitlines(keepends=True) or [""]
    n = pos % len(lines)
    if kind == "dup-line":  # the same key twice in one mapping, most of the time
        lines.insert(n, lines[n])
    elif kind == "del-line":
        del lines[n]
    elif kind == "insert-raw":
        indent = lines[n][: len(lines[n]) - len(lines[n].lstrip(" "))]
        lines.insert(n, f"{indent}{RAW[raw]}\n")
    elif kind == "truncate":
        return text[: pos % (len(text) + 1)]
    elif kind == "char":
        at = pos % (len(text) + 1)
        return text[:at] + special + text[at:]
    return "".join(lines)


ENCODINGS = ("utf-8",) * 12 + ("utf-8-sig", "utf-16", "latin-1", "junk")


@st.composite
def config_bytes(draw: st.DrawFn) -> bytes:
    """A config file's bytes: mostly a mutated valid config, sometimes pure junk."""
    shape = draw(st.sampled_from(["mutated"] * 18 + ["binary", "text"]))
    if shape == "binary":
        return draw(st.binary(max_size=200))
    if shape == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    data = copy.deepcopy(VALID)
    for op in draw(st.lists(_mutation, min_size=1, max_size=3)):
        _mutate(data, op)
    text = _dump(data, draw(st.sampled_from([None, False, True])), draw(st.booleans()))
    for edit in draw(st.lists(_text_edit, max_size=2)):
        text = _edit_text(text, edit)
    encoding = draw(st.sampled_from(ENCODINGS))
    if encoding == "junk":
        raw = text.encode("utf-8", "surrogatepass")
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The config's folder: a webroot, an executable DNS script and a CA bundle."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "www").mkdir()
    (folder / "dns.sh").write_text("#!/bin/sh\nexit 0\n")
    (folder / "dns.sh").chmod(0o755)
    (folder / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    return folder


def _variant(where: str, value: Any) -> bytes:
    """VALID with the value at `where` ("acme/timeout") replaced; a str in RAW goes in as is."""
    data = copy.deepcopy(VALID)
    *parents, last = where.split("/")
    node = functools.reduce(lambda n, k: n[k], parents, data)
    node[last] = Raw(RAW.index(value)) if isinstance(value, str) and value in RAW else value
    return _dump(data, None, True).encode()


def _check_load(path: Path) -> ConfigError | None:
    """load(path) returns Settings or raises a one-line ConfigError naming the file."""
    try:
        result = load(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: "), message
        assert len(message.splitlines()) == 1, message
        return exc
    assert isinstance(result, Settings)
    return None


def test_the_unmutated_config_is_valid(site: Path) -> None:
    path = site / "certbatch.yaml"
    path.write_text(_dump(VALID, None, True))
    settings_ = load(path)
    assert list(settings_.certificates) == ["web", "wild", "ddns", "alone"]
    assert settings_.hooks.targets["web"].env == (("ROLE", "web"), ("COUNT", "3"))


@props(300)
@given(content=config_bytes())
# What the properties found, each once: PyYAML's constructors raising plain Python errors, an
# integer float() or str() refuses, a file name too long for Path.is_file(), and an error
# message that printed a "billion laughs" list whole.
@example(content=_variant("acme/timeout", "2020-13-45"))  # ValueError
@example(content=_variant("acme/timeout", "!!timestamp foo"))  # AttributeError
@example(content=_variant("hooks/targets/web/timeout", "!!bool maybe"))  # KeyError
@example(content=_variant("renewal/workers", "!!int ''"))  # IndexError
@example(content=_variant("renewal/deadline", 10**400))  # OverflowError in float()
@example(content=_variant("hooks/targets/web/env/COUNT", "0x" + "f" * 4000))  # str(): ValueError
@example(content=_variant("acme/ca_bundle", "a" * 300))  # OSError: file name too long
@example(content=_variant("defaults/challenge/webroot", "/" + "a/" * 2100))  # OSError
@example(content=_variant("defaults/key", LAUGHS))  # repr() of 2**30 leaves: hangs
def test_config_load_raises_only_config_error(site: Path, content: bytes) -> None:
    path = site / "certbatch.yaml"
    path.write_bytes(content)
    _check_load(path)


@props(8)
@given(content=config_bytes())
@example(content=_variant("acme/timeout", "2020-13-45"))
@example(content=_variant("defaults/key", LAUGHS))
def test_check_command_reports_a_bad_config_in_one_line(site: Path, content: bytes) -> None:
    path = site / "check.yaml"
    path.write_bytes(content)
    assume(_check_load(path) is not None)
    env = {k: v for k, v in os.environ.items() if k != "CERTBATCH_CONFIG"}
    proc = subprocess.run([sys.executable, "-m", "certbatch", "check", "-c", str(path)],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=60, errors="replace")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"certbatch: error: {path}: "), proc.stderr


# == 2. Crash recovery of the staging state machine loses nothing ================================

NAMES = ("alpha", "bravo", "charlie")
NOW = dt.datetime(2026, 11, 22, 10, 15, tzinfo=dt.timezone.utc)


def cert(name: str, serial: str) -> CertFiles:
    """A real certificate and key, one per (name, serial) for the whole session."""
    return spool_cert(name, serial, version=serial, domains=(f"{name}.example",))


def _fill(work: Path, c: CertFiles, only_key: bool = False) -> None:
    """What Spool._prepare writes into a work folder (only the key: cut while filling)."""
    work.mkdir(mode=0o700)
    (work / "privkey.pem").write_bytes(c.privkey_pem)
    if only_key:
        return
    (work / "cert.pem").write_bytes(c.cert_pem)
    (work / "chain.pem").write_bytes(c.chain_pem)
    (work / "fullchain.pem").write_bytes(c.fullchain_pem)
    meta = {"version": META_VERSION, "name": c.name, "domains": list(c.domains),
            "serial": c.serial, "not_before": iso(c.not_before), "not_after": iso(c.not_after),
            "staged_at": iso(NOW)}
    (work / "meta.json").write_text(json.dumps(meta))


class _Crash(BaseException):
    """The process dies here (SIGKILL at a faults.point): nothing after it runs."""


class _Faults:
    """Stands in for faults.point in staging.py: dies at the nth visit of the armed point."""

    def __init__(self) -> None:
        self.armed: tuple[str, int] | None = None

    def arm(self, point: str | None, nth: int) -> None:
        self.armed = None if point is None else (point, nth)

    def __call__(self, name: str) -> None:
        if self.armed is not None and self.armed[0] == name:
            point, nth = self.armed
            self.armed = (point, nth - 1) if nth > 1 else None
            if nth == 1:
                raise _Crash(name)


# Where a staging is cut: while filling its .tmp, then at each point of mark_ready and commit
# (none: it finishes). A point also fires if recovery, run first under the lock, reaches it.
STAGE_CUTS = (None, "filling", "staging.hooks-done", "staging.ready", "staging.old-aside",
              "staging.committed", "staging.old-removed")
RECOVER_CUTS = (None, "staging.old-aside", "staging.committed", "staging.old-removed")

_ops = st.lists(st.one_of(
    # a staging: name, cut, nth visit of the cut point, recovery first (as every lock holder
    # does) or not (a backlog of cut stagings: unreachable in a real spool, allowed when sound)
    st.tuples(st.just("stage"), st.sampled_from(NAMES), st.sampled_from(STAGE_CUTS),
              st.sampled_from([1, 1, 1, 2, 3]), st.sampled_from([True, True, True, False])),
    # a staging cut right after .ready, without recovery: several left at once
    st.tuples(st.just("stage"), st.sampled_from(NAMES), st.just("staging.ready"), st.just(1),
              st.just(False)),
    st.tuples(st.just("live"), st.sampled_from(NAMES)),  # a preparer that stays in .tmp
    st.tuples(st.just("die"), st.integers(0, 10)),  # ...until it dies
    st.tuples(st.just("recover"), st.sampled_from(RECOVER_CUTS), st.sampled_from([1, 1, 2, 3])),
), min_size=1, max_size=12)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Everything under .staging/ and pending/: file contents, None for a folder."""
    out: dict[str, bytes | None] = {}
    for top in (root / ".staging", root / "pending"):
        for dirpath, dirs, files in os.walk(top):
            for d in dirs:
                out[os.path.relpath(os.path.join(dirpath, d), root)] = None
            for f in files:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = \
                    Path(dirpath, f).read_bytes()
    return out


def _work(root: Path, state: str) -> set[str]:
    """The work folders in .staging/ in `state` (tmp, ready, old)."""
    return {e for e in os.listdir(root / ".staging") if e.endswith(f".{state}")}


class _Model:
    """Runs the ops against a real spool and checks the invariants after each."""

    def __init__(self, root: Path, stack: contextlib.ExitStack) -> None:
        self.spool = Spool(root, root.parent / "hooks")
        self.staging = self.spool.staging
        self.root = self.spool.root
        self.faults = _Faults()
        self.tokens = 0
        self.serials = 0x10
        self.latest: dict[str, tuple[str, str]] = {}  # name -> (token, serial) that won
        self.live: list[tuple[contextlib.ExitStack, Path]] = []
        stack.enter_context(mock.patch.object(staging_mod, "point", self.faults))
        stack.enter_context(mock.patch.object(staging_mod, "token", self.token))
        self.spool.check()

    def token(self) -> str:
        self.tokens += 1
        return f"{self.tokens:020d}-{self.tokens:06x}"

    def new_cert(self, name: str) -> CertFiles:
        self.serials += 1
        return cert(name, f"{self.serials:x}")

    # -- the ops --------------------------------------------------------------------------------

    def stage(self, name: str, cut: str | None, nth: int, recover_first: bool) -> None:
        if not recover_first and any(e.startswith(f"{name}.") for e in _work(self.root, "ready")):
            # Without recovery, committing past a .ready of the same name would put an older
            # staging after a newer one: only cut before the swap (and the first visit is the
            # only one without recovery).
            nth = 1
            if cut not in ("filling", "staging.hooks-done"):
                cut = "staging.ready"
        c = self.new_cert(name)
        before = _work(self.root, "tmp")
        work = self.staging.work_folder(name)
        self.faults.arm(None if cut == "filling" else cut, nth)
        try:
            with self.staging.preparing():
                _fill(work, c, only_key=cut == "filling")
                if cut == "filling":
                    raise _Crash("filling")
                with self.spool._locked() if recover_first else self._lock_only():
                    tok = self.staging.mark_ready(work, name)
                    self.staging.commit(name, tok)
        except _Crash:
            pass
        finally:
            self.faults.arm(None, 0)
        reached = not work.exists()  # renamed to .ready: from now on it must win
        if reached:
            self.latest[name] = (work.name[len(name) + 1:-len(".tmp")], c.serial)
        # A staging is a preparer itself: its recovery keeps every .tmp.
        assert _work(self.root, "tmp") == before | ({work.name} if not reached else set())

    @contextlib.contextmanager
    def _lock_only(self) -> Iterator[None]:
        self.spool.lock.acquire()
        try:
            yield
        finally:
            self.spool.lock.release()

    def start_live(self, name: str) -> None:
        before = _work(self.root, "tmp")
        holder = contextlib.ExitStack()
        holder.enter_context(self.staging.preparing())
        work = self.staging.work_folder(name)
        _fill(work, self.new_cert(name))
        self.live.append((holder, work))
        assert _work(self.root, "tmp") == before | {work.name}

    def die(self, index: int) -> None:
        if self.live:
            holder, _work_dir = self.live.pop(index % len(self.live))
            holder.close()  # its .tmp stays: a leftover now

    def recover(self, cut: str | None, nth: int) -> None:
        before = _work(self.root, "tmp")
        self.faults.arm(cut, nth)
        crashed = False
        try:
            with self.spool._locked():
                pass
        except _Crash:
            crashed = True
        finally:
            self.faults.arm(None, 0)
        after = _work(self.root, "tmp")
        if self.live:
            assert after == before, "a .tmp was deleted while somebody prepares"
        elif not crashed:
            assert after == set()
        else:
            assert after <= before

    # -- the invariants -------------------------------------------------------------------------

    def check_nothing_lost(self) -> None:
        """The latest staging of every name that reached .ready is pending or still .ready."""
        for name, (tok, serial) in self.latest.items():
            want = cert(name, serial).cert_pem
            places = [self.root / "pending" / name, self.root / ".staging" / f"{name}.{tok}.ready"]
            assert any((p / "cert.pem").is_file() and (p / "cert.pem").read_bytes() == want
                       for p in places), f"{name} serial {serial} lost"
        for _holder, work in self.live:
            assert (work / "meta.json").is_file(), f"live {work.name} damaged"

    def check_recovered(self) -> None:
        pending = self.root / "pending"
        assert sorted(os.listdir(pending)) == sorted(self.latest)
        for name, (_tok, serial) in self.latest.items():
            assert (pending / name / "cert.pem").read_bytes() == cert(name, serial).cert_pem
            assert json.loads((pending / name / "meta.json").read_text())["serial"] == serial
            assert entry_problem(pending / name, serial) is None
        left = set(os.listdir(self.root / ".staging"))
        assert left == _work(self.root, "tmp"), f"not only .tmp left: {left}"
        if self.live:
            assert {w.name for _h, w in self.live} <= left
        else:
            assert left == set()


@pytest.fixture(scope="module")
def spool_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spools")


@props(300)
@given(ops=_ops, keep_live=st.booleans())
def test_recovery_after_any_crashes_loses_nothing(spool_base: Path, ops: list[tuple[Any, ...]],
                                                  keep_live: bool) -> None:
    folder = Path(tempfile.mkdtemp(dir=spool_base))
    try:
        with contextlib.ExitStack() as stack:
            model = _Model(folder / "spool", stack)
            stack.callback(lambda: [h.close() for h, _w in model.live])
            for op in ops:
                if op[0] == "stage":
                    model.stage(*op[1:])
                elif op[0] == "live":
                    model.start_live(op[1])
                elif op[0] == "die":
                    model.die(op[1])
                else:
                    model.recover(*op[1:])
                model.check_nothing_lost()
            if not keep_live:
                while model.live:
                    model.die(0)
            model.recover(None, 0)
            model.check_recovered()
            # Idempotent: a second recovery changes nothing.
            tree = _tree(model.root)
            model.recover(None, 0)
            assert _tree(model.root) == tree
            # Once the live preparers are gone, their .tmp folders are leftovers.
            while model.live:
                model.die(0)
            model.recover(None, 0)
            model.check_recovered()
            assert _work(model.root, "tmp") == set()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
