"""The haproxy, apache and postfix-dovecot notify hooks against the real servers.

Each server (real_servers.py) starts once for this module, on free 127.0.0.1 ports, with
certificate A installed. The shipped hook then runs as a certbatch notify target
(real_servers.run_notify_hook: its names only in CERTBATCH_NAMES_FILE) on a spool folder the
test lays out, and the test checks, through real TLS handshakes, what the server presents:
- a batch of certificate B (same names, new serials) is installed and the server reloaded once;
- a batch the server cannot load (a garbage key, or for Apache a configuration that stopped
  passing `apachectl configtest`) fails the hook, every file is as before, the server still
  presents what it did, and it was not reloaded.
The failure tests leave the servers as they found them, so the tests don't depend on order.

Skipped when a server or its users are missing, unless CERTBATCH_REQUIRE_PEBBLE=1 (as CI sets
it): then they fail.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nginx_server import Issued, TestCA
from real_servers import (
    ApacheServer,
    HaproxyServer,
    MailServers,
    run_notify_hook,
    write_spool,
)

NAMES = ["a.test", "b.test"]
MAIL_NAME = "mx.test"
GARBAGE_KEY = b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"


def need(missing: Callable[[], str | None]) -> None:
    reason = missing()
    if reason is None:
        return
    if os.environ.get("CERTBATCH_REQUIRE_PEBBLE") == "1":
        pytest.fail(f"{reason} (CERTBATCH_REQUIRE_PEBBLE=1: the real-server tests must run)")
    pytest.skip(reason)


def snapshot(folder: Path) -> dict[str, bytes]:
    """The served files under `folder` (not the *.prev backups: a rollback moves those back)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".prev"}


def wait_until(check: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@dataclasses.dataclass
class Running:
    server: HaproxyServer | ApacheServer | MailServers
    a: dict[str, Issued]  # the certificates installed before the start


def _serve(server: HaproxyServer | ApacheServer | MailServers, ca: TestCA) -> Iterator[Running]:
    a = {name: ca.issue([name]) for name in server.names}
    for name, issued in a.items():
        server.install(name, issued)
    try:
        server.start()
        yield Running(server, a)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def haproxy(ca: TestCA) -> Iterator[Running]:
    need(HaproxyServer.missing)
    yield from _serve(HaproxyServer(NAMES), ca)


@pytest.fixture(scope="module")
def apache(ca: TestCA) -> Iterator[Running]:
    need(ApacheServer.missing)
    yield from _serve(ApacheServer(NAMES), ca)


@pytest.fixture(scope="module")
def mail(ca: TestCA) -> Iterator[Running]:
    need(MailServers.missing)
    yield from _serve(MailServers(MAIL_NAME), ca)


# -- HAProxy ------------------------------------------------------------------------------

def test_haproxy_installs_batch_and_reloads_once(haproxy: Running, ca: TestCA,
                                                 tmp_path: Path) -> None:
    server = haproxy.server
    assert isinstance(server, HaproxyServer)
    if server.reload_count() == 0:  # the first test on this server: A is what it serves
        for name in NAMES:
            assert server.served_serial(name) == haproxy.a[name].serial
    old = {name: (server.cert_dir / f"{name}.pem").read_bytes() for name in NAMES}
    reloads = server.reload_count()
    b = {name: ca.issue([name]) for name in NAMES}
    spool = write_spool(tmp_path / "spool", b)

    proc = run_notify_hook("haproxy", spool, NAMES, server.hook_env(), target="edge2")

    assert proc.returncode == 0, proc.stderr
    assert "haproxy hook (edge2): installed a.test b.test; haproxy reloaded" in proc.stdout
    for name in NAMES:
        assert server.wait_for_serial(b[name].serial, name) == b[name].serial
    assert wait_until(lambda: server.reload_count() == reloads + 1)
    time.sleep(0.3)
    assert server.reload_count() == reloads + 1
    assert sorted(os.listdir(server.cert_dir)) == ["a.test.pem", "b.test.pem"]  # no temp files
    for name in NAMES:
        assert (server.backup_dir / f"{name}.pem").read_bytes() == old[name]


def test_haproxy_garbage_key_is_rolled_back(haproxy: Running, ca: TestCA,
                                            tmp_path: Path) -> None:
    server = haproxy.server
    assert isinstance(server, HaproxyServer)
    before = snapshot(server.cert_dir)
    served = {name: server.served_serial(name) for name in NAMES}
    reloads = server.reload_count()
    batch = {name: ca.issue([name]) for name in NAMES + ["c.test"]}  # c.test: a new file
    batch["b.test"] = dataclasses.replace(batch["b.test"], key_pem=GARBAGE_KEY)
    spool = write_spool(tmp_path / "spool", batch)

    proc = run_notify_hook("haproxy", spool, sorted(batch), server.hook_env())

    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("haproxy hook: haproxy -c failed: [ALERT]"), proc.stderr
    assert "b.test.pem" in proc.stderr  # HAProxy's own message names the file
    assert "previous certificate files restored" in proc.stderr
    assert snapshot(server.cert_dir) == before  # c.test.pem removed, the others put back
    time.sleep(0.3)
    assert server.reload_count() == reloads
    assert {name: server.served_serial(name) for name in NAMES} == served


# -- Apache httpd -------------------------------------------------------------------------

def test_apache_installs_batch_and_reloads_once(apache: Running, ca: TestCA,
                                                tmp_path: Path) -> None:
    server = apache.server
    assert isinstance(server, ApacheServer)
    if server.reload_count() == 0:
        for name in NAMES:
            assert server.served_serial(name) == apache.a[name].serial
    old = snapshot(server.cert_dir)
    reloads = server.reload_count()
    b = {name: ca.issue([name]) for name in NAMES}
    spool = write_spool(tmp_path / "spool", b)

    proc = run_notify_hook("apache", spool, NAMES, server.hook_env())

    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "apache hook: installed a.test b.test; apache reloaded" in proc.stdout
    for name in NAMES:
        assert server.wait_for_serial(b[name].serial, name) == b[name].serial
    assert wait_until(lambda: server.reload_count() == reloads + 1)
    time.sleep(0.3)
    assert server.reload_count() == reloads + 1
    for name in NAMES:
        folder = server.cert_dir / name
        assert sorted(os.listdir(folder)) == ["fullchain.pem", "fullchain.pem.prev",
                                              "privkey.pem", "privkey.pem.prev"]
        assert (folder / "privkey.pem.prev").read_bytes() == old[f"{name}/privkey.pem"]
        assert (folder / "privkey.pem").stat().st_mode & 0o777 == 0o600
        assert (folder / "fullchain.pem").stat().st_mode & 0o777 == 0o644


def test_apache_failures_change_nothing(apache: Running, ca: TestCA, tmp_path: Path) -> None:
    server = apache.server
    assert isinstance(server, ApacheServer)
    before = snapshot(server.cert_dir)
    served = {name: server.served_serial(name) for name in NAMES}
    reloads = server.reload_count()
    good = {name: ca.issue([name]) for name in NAMES}

    # A garbage key: Apache's configtest would pass it (it does not load keys) and the graceful
    # restart would then kill Apache, so the hook refuses it before touching anything.
    bad = {**good, "b.test": dataclasses.replace(good["b.test"], key_pem=GARBAGE_KEY)}
    proc = run_notify_hook("apache", write_spool(tmp_path / "bad", bad), NAMES,
                           server.hook_env())
    assert proc.returncode == 1
    assert "b.test/privkey.pem does not match" in proc.stderr.strip().splitlines()[-1]
    assert snapshot(server.cert_dir) == before

    # Good certificates, but the configuration stopped passing `apachectl configtest`: the
    # files are installed, the test fails with Apache's message, and they are put back.
    config = server.conf.read_text()
    server.conf.write_text(config + "NotAnApacheDirective on\n")
    try:
        proc = run_notify_hook("apache", write_spool(tmp_path / "good", good),
                               NAMES, server.hook_env())
    finally:
        server.conf.write_text(config)
    assert proc.returncode == 1
    assert "Invalid command 'NotAnApacheDirective'" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "apache hook: apachectl configtest failed"
    assert snapshot(server.cert_dir) == before

    time.sleep(0.3)
    assert server.reload_count() == reloads
    assert {name: server.served_serial(name) for name in NAMES} == served


# -- Postfix and Dovecot ------------------------------------------------------------------

def test_postfix_dovecot_install_batch_and_reload(mail: Running, ca: TestCA,
                                                  tmp_path: Path) -> None:
    servers = mail.server
    assert isinstance(servers, MailServers)
    a = mail.a[MAIL_NAME].serial
    if servers.served_serials() != (a, a):
        pytest.fail(f"not serving A at the start: {servers.served_serials()}")
    b = ca.issue([MAIL_NAME])
    spool = write_spool(tmp_path / "spool", {MAIL_NAME: b})

    proc = run_notify_hook("postfix-dovecot", spool, [MAIL_NAME], servers.hook_env())

    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "installed mx.test; postfix and dovecot reloaded" in proc.stdout
    assert servers.wait_for_serial(b.serial) == (b.serial, b.serial)
    folder = servers.cert_dir / MAIL_NAME
    assert (folder / "fullchain.pem").read_bytes() == b.fullchain_pem
    assert (folder / "fullchain.pem.prev").read_bytes() == mail.a[MAIL_NAME].fullchain_pem
    # Put A back (and reload) so that the other test finds what it expects either way.
    proc = run_notify_hook("postfix-dovecot", write_spool(tmp_path / "back", mail.a),
                           [MAIL_NAME], servers.hook_env())
    assert proc.returncode == 0, proc.stderr
    assert servers.wait_for_serial(a) == (a, a)


def test_postfix_dovecot_garbage_key_changes_nothing(mail: Running, ca: TestCA,
                                                     tmp_path: Path) -> None:
    servers = mail.server
    assert isinstance(servers, MailServers)
    before = snapshot(servers.cert_dir)
    served = servers.served_serials()
    bad = dataclasses.replace(ca.issue([MAIL_NAME]), key_pem=GARBAGE_KEY)
    spool = write_spool(tmp_path / "spool", {MAIL_NAME: bad})

    proc = run_notify_hook("postfix-dovecot", spool, [MAIL_NAME], servers.hook_env())

    assert proc.returncode == 1
    assert "mx.test/privkey.pem does not match" in proc.stderr.strip().splitlines()[-1]
    assert snapshot(servers.cert_dir) == before
    time.sleep(0.5)  # had it reloaded, a new smtpd / login process would show it by now
    assert servers.served_serials() == served == (mail.a[MAIL_NAME].serial,) * 2
