"""Real BIND 9 `named` servers for the dns-01 tests, and a lagging copier between two of them.

`start_named(workdir, address, port, zones, key)` writes a named.conf (no recursion, updates
allowed with one TSIG key, zone transfers to loopback, no NOTIFY, no rndc) and the zone files,
starts `named -g` in the foreground and returns once it answers a SOA query for every zone.

`Relay` makes a server on 127.0.0.1:PORT2 reachable at 127.0.0.2:PORT too: named only listens
on addresses of an interface, and adding 127.0.0.2 to `lo` needs CAP_NET_ADMIN. Two servers on
two addresses with one port are what the propagation check needs (it asks every NS address on
one port).

`ZoneMirror` copies a zone's TXT record sets from one server to another with a fixed delay: a
second authoritative server that gets the records late, as a secondary behind a lost NOTIFY or
a slow refresh does, but deterministic (a real secondary's refresh timer has jitter).
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
import dns.zone

NAMED = "/usr/sbin/named"
START_TIMEOUT = 15.0  # seconds for named to load its zones
START_ATTEMPTS = 3  # starts on a fresh port when the one picked free was taken meanwhile
KEY_NAME = "certbatch."


def find_named() -> str | None:
    return shutil.which("named") or (NAMED if os.access(NAMED, os.X_OK) else None)


@dataclass(frozen=True)
class TsigKey:
    name: str
    secret: str  # base64

    @staticmethod
    def generate(name: str = KEY_NAME) -> TsigKey:
        return TsigKey(name, base64.b64encode(secrets.token_bytes(32)).decode())

    def dns_key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, dns.tsig.HMAC_SHA256)


class ServerProcess:
    """What a DNS server started by the tests has in common (named, pdns_server): asking it
    directly, waiting for a zone, its log, stopping it. Subclasses are dataclasses with
    `address`, `port`, `workdir`, `proc` and `_log`, and name their PROGRAM and LOG_NAME."""

    PROGRAM = "server"
    LOG_NAME = "server.log"
    address: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None
    _log: IO[bytes] | None

    @property
    def hostport(self) -> str:
        return f"{self.address}:{self.port}"

    def txt(self, name: str) -> set[str]:
        """The TXT values this server answers for `name` (asked directly, no recursion)."""
        query = dns.message.make_query(name, "TXT")
        response = dns.query.tcp(query, self.address, port=self.port, timeout=5)
        return {b"".join(r.strings).decode() for rrset in response.answer  # type: ignore[attr-defined]
                if rrset.rdtype == dns.rdatatype.TXT for r in rrset}

    def wait_for_soa(self, zone: str, deadline: float) -> None:
        """Until the server answers the SOA of `zone` (RuntimeError with its log if it exits
        or `deadline`, a time.monotonic() value, passes)."""
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.PROGRAM} exited with status {self.proc.returncode}:"
                                   f"\n{self.logs()}")
            with contextlib.suppress(Exception):
                response = dns.query.udp(dns.message.make_query(zone, "SOA"), self.address,
                                         port=self.port, timeout=0.5)
                if response.rcode() == dns.rcode.NOERROR and response.answer:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.PROGRAM} does not serve {zone} in time:\n"
                                   f"{self.logs()}")
            time.sleep(0.05)

    def logs(self, tail: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / self.LOG_NAME).read_text(
                errors="replace").splitlines()[-tail:])
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()


@dataclass
class Named(ServerProcess):
    """A running named: `address`, `port`, `zones` (absolute names); `stop()` at the end."""

    address: str
    port: int
    zones: list[str]
    key: TsigKey
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    PROGRAM = "named"
    LOG_NAME = "named.log"

    def set_txt(self, zone: str, name: str, values: set[str]) -> None:
        """Replace the TXT set at `name` (no values: delete it), signed with the TSIG key."""
        update = dns.update.UpdateMessage(zone)
        update.delete(name, "TXT")
        for value in sorted(values):
            update.add(name, 1, "TXT", f'"{value}"')
        update.use_tsig(self.key.dns_key())
        response = dns.query.tcp(update, self.address, port=self.port, timeout=5)
        assert response.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(response.rcode())

    def txt_sets(self, zone: str) -> dict[str, frozenset[str]]:
        """Every TXT set of `zone`, by AXFR."""
        z = dns.zone.from_xfr(dns.query.xfr(self.address, zone, port=self.port, timeout=5))
        out = {}
        for name, rdataset in z.iterate_rdatasets("TXT"):
            absolute = name.derelativize(z.origin).to_text().lower()
            out[absolute] = frozenset(b"".join(r.strings).decode() for r in rdataset)  # type: ignore[attr-defined]
        return out


def free_port(addresses: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")) -> int:
    """A port free for TCP and UDP on every one of `addresses` (named binds both)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as sock:
                        sock.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port on " + ", ".join(addresses))


def port_taken(exc: BaseException) -> bool:
    """Whether a server failed to start because its port was taken (its log says so): a port
    picked free can be taken by another test process before the server binds it."""
    text = str(exc).lower()
    return any(sign in text for sign in (
        "address already in use", "address in use",
        "unable to listen on any configured interfaces"))  # named's words for it


def start_named(workdir: Path, address: str, port: int | None, zones: dict[str, str],
                key: TsigKey, recursion: bool = False,
                free_on: tuple[str, ...] = ("127.0.0.1",)) -> Named:
    """Start named on address:port serving `zones` (absolute name -> zone file text).

    `port` None: a port free on every address of `free_on`, picked again (up to three times)
    when named finds it taken. `recursion`: for loopback clients, so that a CNAME into another
    of its zones is followed in the answer (Pebble's resolver does not follow one itself);
    named never recurses to the internet for the test names, all of which are in its own zones.
    """
    for attempt in range(START_ATTEMPTS):
        try:
            return _start_named(workdir, address, free_port(free_on) if port is None else port,
                                zones, key, recursion)
        except RuntimeError as exc:
            if port is not None or attempt == START_ATTEMPTS - 1 or not port_taken(exc):
                raise
    raise AssertionError("unreachable")


def _start_named(workdir: Path, address: str, port: int, zones: dict[str, str],
                 key: TsigKey, recursion: bool) -> Named:
    binary = find_named()
    if binary is None:
        raise RuntimeError("named not installed: apt-get install bind9")
    workdir.mkdir(parents=True, exist_ok=True)
    zone_clauses = []
    for zone, text in zones.items():
        path = workdir / f"{zone.rstrip('.')}.zone"
        path.write_text(text)
        zone_clauses.append(f'zone "{zone}" {{ type primary; file "{path}"; '
                            f'allow-update {{ key "{key.name}"; }}; }};')
    conf = workdir / "named.conf"
    conf.write_text(f"""
options {{
    directory "{workdir}";
    pid-file "{workdir}/named.pid";
    session-keyfile "{workdir}/session.key";
    managed-keys-directory "{workdir}";
    listen-on port {port} {{ {address}; }};
    listen-on-v6 {{ none; }};
    recursion {"yes" if recursion else "no"};
    {"allow-recursion { 127.0.0.0/8; };" if recursion else ""}
    dnssec-validation no;
    notify no;
    allow-transfer {{ 127.0.0.0/8; }};
    max-journal-size 1M;
}};
controls {{ }};
key "{key.name}" {{ algorithm hmac-sha256; secret "{key.secret}"; }};
{chr(10).join(zone_clauses)}
""")
    log = open(workdir / "named.log", "ab")  # noqa: SIM115 - closed in Named.stop()
    server = Named(address, port, list(zones), key, workdir, _log=log)
    server.proc = subprocess.Popen([binary, "-g", "-4", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        for zone in zones:
            server.wait_for_soa(zone, deadline)
    except BaseException:
        server.stop()
        raise
    return server


def zone_file(zone: str, nameservers: dict[str, str], extra: str = "") -> str:
    """A zone with TTL 1 (nothing stays cached), `nameservers` (label -> IPv4) as its NS."""
    lines = [f"$ORIGIN {zone}", "$TTL 1",
             f"@ SOA {next(iter(nameservers))} hostmaster 1 60 60 600 1"]
    for label, ip in nameservers.items():
        lines += [f"@ NS {label}", f"{label} A {ip}"]
    return "\n".join([*lines, extra, ""])


class ZoneMirror:
    """Copies the TXT sets of `zone` from `source` to `target`, each change `delay` s late.

    `applied` records when each (name, values) reached the target (time.monotonic()).
    """

    def __init__(self, source: Named, target: Named, zone: str, delay: float) -> None:
        self.source, self.target, self.zone, self.delay = source, target, zone, delay
        self.applied: list[tuple[float, str, frozenset[str]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mirror {zone}", daemon=True)

    def __enter__(self) -> ZoneMirror:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        seen = self.source.txt_sets(self.zone)
        pending: list[tuple[float, str, frozenset[str]]] = []
        while not self._stop.wait(0.1):
            try:
                now = time.monotonic()
                current = self.source.txt_sets(self.zone)
                for name in set(seen) | set(current):
                    if seen.get(name, frozenset()) != current.get(name, frozenset()):
                        pending.append((now + self.delay, name, current.get(name, frozenset())))
                seen = current
                while pending and pending[0][0] <= time.monotonic():
                    _, name, values = pending.pop(0)
                    self.target.set_txt(self.zone, name, set(values))
                    self.applied.append((time.monotonic(), name, values))
            except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
                self.errors.append(repr(exc))


class Relay:
    """Relays DNS over UDP and TCP from `listen` to `target` (both (address, port))."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(listen)
        self._udp.settimeout(0.2)
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with socket.create_connection(relay.target, timeout=5) as upstream:
                    data = _read_tcp_message(self.request)
                    upstream.sendall(data)
                    self.request.sendall(_read_tcp_message(upstream))

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._tcp = socketserver.ThreadingTCPServer(listen, Handler)
        self._tcp.daemon_threads = True
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._tcp.serve_forever,
                                          kwargs={"poll_interval": 0.1}, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self._udp.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._answer_udp, args=(data, client), daemon=True).start()

    def _answer_udp(self, data: bytes, client: tuple[str, int]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(5)
            upstream.sendto(data, self.target)
            with contextlib.suppress(OSError):
                self._udp.sendto(upstream.recv(65535), client)

    def stop(self) -> None:
        self._stop.set()
        self._tcp.shutdown()
        self._tcp.server_close()
        for thread in self._threads:
            thread.join(5)
        self._udp.close()


def _read_tcp_message(sock: socket.socket) -> bytes:
    """One length-prefixed DNS message, prefix included."""
    data = b""
    while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
        chunk = sock.recv(65535)
        if not chunk:
            break
        data += chunk
    return data
