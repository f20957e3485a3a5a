"""A real PowerDNS authoritative server (`pdns_server`, sqlite3 backend) with its HTTP API on.

`start_pdns(workdir, zones)` makes the sqlite3 database from the schema the Debian package ships
(with the `sqlite3` command), writes a pdns.conf (DNS on 127.0.0.1:PORT, the API and webserver
on 127.0.0.1:WEBPORT with a random API key, no daemon, no guardian, sockets and everything else
in `workdir`, no caches, so an API change is answered at once), starts it in the foreground,
and creates each zone through the API. `Pdns.stop()` at the end.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import requests
from dns_servers import START_ATTEMPTS, ServerProcess, free_port, port_taken

PDNS = "/usr/sbin/pdns_server"
SCHEMAS = ("/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql",
           "/usr/share/doc/pdns-backend-sqlite3/schema.sqlite3.sql")
START_TIMEOUT = 15.0  # seconds for pdns_server to answer


def find_pdns() -> str | None:
    """pdns_server, when it and the sqlite3 backend, its schema and `sqlite3` are installed."""
    binary = shutil.which("pdns_server") or (PDNS if os.access(PDNS, os.X_OK) else None)
    backend = glob.glob("/usr/lib/*/pdns/libgsqlite3backend.so")
    if binary and backend and schema_file() and shutil.which("sqlite3"):
        return binary
    return None


def schema_file() -> str | None:
    return next((s for s in SCHEMAS if os.path.exists(s)), None)


@dataclass
class Pdns(ServerProcess):
    """A running pdns_server: DNS at `address`:`port`, the API at `api_url` with `api_key`."""

    address: str
    port: int
    api_url: str  # http://127.0.0.1:WEBPORT (lexicon's pdns_server option)
    api_key: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    PROGRAM = "pdns_server"
    LOG_NAME = "pdns.log"

    def api(self, method: str, path: str, **kwargs: object) -> requests.Response:
        response = requests.request(method, f"{self.api_url}/api/v1/servers/localhost{path}",
                                    headers={"X-API-Key": self.api_key}, timeout=10,
                                    **kwargs)  # type: ignore[arg-type]
        assert response.ok, f"{method} {path}: {response.status_code} {response.text}"
        return response

    def create_zone(self, zone: str, nameservers: dict[str, str]) -> None:
        """A Native zone with TTL 1, `nameservers` (label -> IPv4) as its NS and their A."""
        rrsets = [{"name": zone, "type": "SOA", "ttl": 1, "changetype": "REPLACE", "records": [
            {"content": f"{next(iter(nameservers))}.{zone} hostmaster.{zone} 1 60 60 600 1",
             "disabled": False}]}]
        rrsets += [{"name": zone, "type": "NS", "ttl": 1, "changetype": "REPLACE", "records": [
            {"content": f"{label}.{zone}", "disabled": False} for label in nameservers]}]
        rrsets += [{"name": f"{label}.{zone}", "type": "A", "ttl": 1, "changetype": "REPLACE",
                    "records": [{"content": ip, "disabled": False}]}
                   for label, ip in nameservers.items()]
        self.api("POST", "/zones", json={"name": zone, "kind": "Native", "nameservers": []})
        self.api("PATCH", f"/zones/{zone}", json={"rrsets": rrsets})



def start_pdns(workdir: Path, zones: dict[str, dict[str, str]]) -> Pdns:
    """Start pdns_server on 127.0.0.1 serving `zones` (absolute name -> {NS label: IPv4}), on
    ports picked free (again, up to three times, when it finds one taken meanwhile)."""
    binary, schema = find_pdns(), schema_file()
    if binary is None or schema is None:
        raise RuntimeError("pdns_server not installed: apt-get install pdns-server "
                           "pdns-backend-sqlite3 sqlite3")
    for attempt in range(START_ATTEMPTS):
        try:
            return _start_pdns(binary, schema, workdir / f"try{attempt}", zones)
        except RuntimeError as exc:
            if attempt == START_ATTEMPTS - 1 or not port_taken(exc):
                raise
    raise AssertionError("unreachable")


def _start_pdns(binary: str, schema: str, workdir: Path, zones: dict[str, dict[str, str]]
                ) -> Pdns:
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "pdns.sqlite3"
    with open(schema, "rb") as sql:
        subprocess.run(["sqlite3", str(database)], stdin=sql, check=True, timeout=30,
                       capture_output=True)
    port, web_port = free_port(("127.0.0.1",)), free_port(("127.0.0.1",))
    key = secrets.token_urlsafe(24)
    (workdir / "pdns.conf").write_text(f"""
launch=gsqlite3
gsqlite3-database={database}
local-address=127.0.0.1
local-port={port}
api=yes
api-key={key}
webserver=yes
webserver-address=127.0.0.1
webserver-port={web_port}
webserver-allow-from=127.0.0.0/8
socket-dir={workdir}
daemon=no
guardian=no
disable-syslog=yes
log-timestamp=no
cache-ttl=0
negquery-cache-ttl=0
query-cache-ttl=0
zone-cache-refresh-interval=0
security-poll-suffix=
""")
    log = open(workdir / "pdns.log", "ab")  # noqa: SIM115 - closed in Pdns.stop()
    server = Pdns("127.0.0.1", port, f"http://127.0.0.1:{web_port}", key, workdir, _log=log)
    server.proc = subprocess.Popen([binary, f"--config-dir={workdir}"], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        _wait_for_api(server, time.monotonic() + START_TIMEOUT)
        for zone, nameservers in zones.items():
            server.create_zone(zone, nameservers)
            server.wait_for_soa(zone, time.monotonic() + START_TIMEOUT)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_for_api(server: Pdns, deadline: float) -> None:
    assert server.proc is not None
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"pdns_server exited with status {server.proc.returncode}:\n"
                               f"{server.logs()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.api_url}/api/v1/servers/localhost",
                            headers={"X-API-Key": server.api_key}, timeout=1).ok:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pdns_server's API does not answer after {START_TIMEOUT} s:\n"
                               f"{server.logs()}")
        time.sleep(0.05)
