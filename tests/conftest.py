"""Shared fixtures: a real Pebble ACME server (see pebble_server.py) and helpers around it.

Fixtures:
  pebble           session-scoped PebbleInstance (directory_url, ca_bundle, management_url,
                   challtestsrv_url, http_port, dns_port, env(), root_pem(), add_servfail(host),
                   clear_servfail(host), restart_pebble()). Don't restart it: use pebble_factory.
  pebble_factory   function-scoped: ``pebble_factory(config=None, **extra_env)`` starts a separate
                   instance (e.g. ``PEBBLE_WFE_NONCEREJECT="50"``), stopped at teardown.
  webroot_server   serves a fresh webroot folder on 127.0.0.1:pebble.http_port; yields its Path.
                   (serve_by_host(port, {host: folder}): one folder per Host header, as a
                   web server with virtual hosts does; for http-01 webroot_map tests.)
  account_store    a fresh in-memory AccountStore that counts loads and saves.

Without /usr/bin/pebble the Pebble tests are skipped, or fail when CERTBATCH_REQUIRE_PEBBLE=1.
When a test using Pebble fails, the tail of the Pebble and challtestsrv logs is added to the report.

The `slow` marker (the fast lane is ``-m "not slow"``, ``scripts/test.sh --fast``): given here to
every test that uses Pebble (the `pebble` or `pebble_factory` fixture, also through another
fixture), every test of SLOW_MODULES (real servers or the real command throughout) and the tests
in SLOW_TESTS; mark another test that takes a second or more ``@pytest.mark.slow``.

pytest-xdist (scripts/test.sh runs ``-n auto --dist loadfile``): every worker is a separate
process with its own session fixtures (its own Pebble, on ports picked free at start) and its
own tmp_path folders; loadfile gives all the tests of a module to one worker, so that a module-
or session-scoped fixture of a test module (a certbot folder, a real server, test_crash.py's
lanes) is set up once. Each worker's `config.workerinput["dist"]` says the distribution.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pebble_server import PebbleInstance, find_binaries, start_pebble

# The cache of large configs (config_cache.py) goes to a folder of this test session, never to
# /var/cache/certbatch of the machine running the tests (child processes inherit it).
os.environ.setdefault("CERTBATCH_CACHE_DIR", __import__("tempfile").mkdtemp(
    prefix="certbatch-cache-"))

PEBBLE_MISSING = "pebble not installed: apt-get install pebble"
_live: list[PebbleInstance] = []

# Modules whose tests run real servers or the real command (a process each) throughout.
SLOW_MODULES = frozenset({
    "test_check", "test_cli", "test_cron", "test_dns_acmedns", "test_dns_lexicon",
    "test_dns_rfc2136", "test_newcomer", "test_operator", "test_oserrors", "test_parallel_staging",
    "test_properties", "test_quickstart", "test_real_servers", "test_renew",
    "test_restage_bulk", "test_signals", "test_ssh_push",
})
# Single tests of a second or more in modules of quick tests ("module::function").
SLOW_TESTS = frozenset({
    "test_challenges::test_dns_script_leaving_a_detached_child_does_not_hold_us",
    "test_config::test_no_command_prints_a_secret_from_a_bad_config",
    "test_digest::test_quiet_until_is_when_the_decision_can_first_change",
    "test_hook_scripts::test_nginx_names_file_2000_names",
    "test_hook_scripts::test_nginx_names_file_real_server",
    "test_init::test_the_command",
    "test_spool::test_only_last_five_applied_batches_are_kept",
    "test_spool::test_second_process_waits_for_staging_and_sees_complete_entry",
    "test_spool::test_threads_staging_at_once_overlap_unless_deploy_workers_1",
})
PEBBLE_FIXTURES = frozenset({"pebble", "pebble_factory"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: needs Pebble, a real server or runs the real command; the fast lane "
        "(scripts/test.sh --fast) is -m 'not slow'")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook, in the controller
def pytest_configure_node(node: Any) -> None:
    """Tell each worker the distribution (a worker's own config says "no")."""
    node.workerinput["dist"] = node.config.getoption("dist")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        name = getattr(item, "originalname", item.name)
        if (PEBBLE_FIXTURES & set(getattr(item, "fixturenames", ())) or module in SLOW_MODULES
                or f"{module}::{name}" in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


def _require_pebble() -> None:
    if find_binaries() is None:
        if os.environ.get("CERTBATCH_REQUIRE_PEBBLE") == "1":
            pytest.fail(PEBBLE_MISSING)
        pytest.skip(PEBBLE_MISSING)


@pytest.fixture(scope="session")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleInstance]:
    """One Pebble + challtestsrv for the whole session (PEBBLE_VA_NOSLEEP=1)."""
    _require_pebble()
    inst = start_pebble(tmp_path_factory.mktemp("pebble"))
    _live.append(inst)
    try:
        yield inst
    finally:
        inst.stop()
        _live.remove(inst)


@pytest.fixture
def pebble_factory(tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Callable[..., PebbleInstance]]:
    """Start extra instances: ``pebble_factory(config={...}, PEBBLE_WFE_NONCEREJECT="50")``.

    `config` overrides keys of Pebble's config file ("pebble" section); keyword arguments are
    added to Pebble's environment. All instances are stopped at teardown.
    """
    _require_pebble()
    started: list[PebbleInstance] = []

    def factory(config: dict[str, Any] | None = None, **extra_env: str) -> PebbleInstance:
        inst = start_pebble(tmp_path_factory.mktemp("pebble-extra"), extra_env, config)
        started.append(inst)
        _live.append(inst)
        return inst

    try:
        yield factory
    finally:
        for inst in started:
            inst.stop()
            _live.remove(inst)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def webroot_server(pebble: PebbleInstance, tmp_path: Path) -> Iterator[Path]:
    """A web server for http-01 webroot tests: serves `<tmp>/webroot` on pebble.http_port."""
    webroot = tmp_path / "webroot"
    webroot.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(webroot))
    with _serving(pebble.http_port, handler):
        yield webroot


@contextlib.contextmanager
def _serving(port: int, handler: Any) -> Iterator[None]:
    """A threaded http.server on 127.0.0.1:`port` for the block; shut down and closed after."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _ByHostHandler(_QuietHandler):
    """Serves each Host from its own folder (the port is ignored); an unknown Host gets 404,
    so a token under another name's webroot is not found."""

    roots: dict[str, Path] = {}
    seen: list[tuple[str, str, int]]  # (host, path, status) of each request

    def translate_path(self, path: str) -> str:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        root = self.roots.get(host)
        rel = path.split("?", 1)[0].split("#", 1)[0].lstrip("/")
        return str(root / rel) if root is not None else "/nonexistent/" + rel

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        self.seen.append((host, self.path, int(code) if str(code).isdigit() else 0))


@contextlib.contextmanager
def serve_by_host(port: int, roots: dict[str, Path]
                  ) -> Iterator[list[tuple[str, str, int]]]:
    """An http server on 127.0.0.1:`port` serving each host name from its folder; yields the
    list of (host, path, status) it answered."""
    seen: list[tuple[str, str, int]] = []
    handler = type("Handler", (_ByHostHandler,), {
        "roots": {h.lower(): r for h, r in roots.items()}, "seen": seen})
    with _serving(port, handler):
        yield seen


class MemoryAccountStore:
    """AccountStore in memory; `loads` and `saves` count the calls."""

    def __init__(self) -> None:
        self.accounts: dict[str, tuple[bytes, str]] = {}
        self.loads = 0
        self.saves = 0
        self._lock = threading.Lock()

    def load_account(self, directory_url: str) -> tuple[bytes, str | None] | None:
        with self._lock:
            self.loads += 1
            return self.accounts.get(directory_url)

    def save_account(self, directory_url: str, key_pem: bytes, regr_json: str) -> None:
        with self._lock:
            self.saves += 1
            self.accounts[directory_url] = (key_pem, regr_json)


@pytest.fixture
def account_store() -> MemoryAccountStore:
    return MemoryAccountStore()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the Pebble logs to the report of a failed test that used Pebble."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    uses_pebble = {"pebble", "pebble_factory"} & set(getattr(item, "fixturenames", ()))
    if report.failed and uses_pebble:
        for inst in _live:
            report.sections.append((f"Pebble {inst.directory_url}", inst.logs()))
