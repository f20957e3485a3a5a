"""A stand-in for an acme-dns server (https://github.com/joohoi/acme-dns): not acme-dns itself.

acme-dns has no Debian package. This implements its documented REST API and its DNS side, as
far as certbatch uses them:

- `POST /register` (optional JSON `{"allowfrom": [...]}`) -> 201 and a new account
  `{"username", "password", "fulldomain", "subdomain", "allowfrom"}`;
- `POST /update` with headers X-Api-User / X-Api-Key and JSON `{"subdomain", "txt"}`: 401
  `{"error": "forbidden"}` for a wrong user, password or subdomain, 400 `{"error": "bad_txt"}`
  for a value that is not 43 characters; else the value replaces the older of the account's
  two (acme-dns keeps the last 2 per subdomain) -> 200 `{"txt": ...}`;
- DNS over UDP and TCP (dnspython) on the same loopback address, authoritative for one zone
  (`test.` here, with NS ns.test. -> the stand-in's address): the accounts' TXT records at
  `<subdomain>.<zone>`, and CNAMEs the test adds (`cname()`: the record a domain's owner makes
  once), answered with the chain and the target's TXT records as an authoritative server does
  when it holds both names.

`updates` records every accepted update as (subdomain, value).
"""

from __future__ import annotations

import json
import secrets
import socket
import socketserver
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns_servers import _read_tcp_message, free_port

ZONE = "test."
KEPT = 2  # TXT values acme-dns keeps per subdomain
TTL = 1


class AcmeDnsStandIn:
    """The HTTP API at `api_url`, DNS at 127.0.0.1:`port`; `stop()` at the end."""

    def __init__(self, zone: str = ZONE) -> None:
        self.zone = zone
        self.address = "127.0.0.1"
        self.port = free_port(("127.0.0.1",))
        self.accounts: dict[str, dict[str, str]] = {}  # username -> account
        self.txt: dict[str, list[str]] = {}  # subdomain -> values, oldest first
        self.cnames: dict[str, str] = {}  # absolute name -> absolute target
        self.updates: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer((self.address, 0), self._handler())
        self._http.daemon_threads = True
        self.api_url = f"http://{self.address}:{self._http.server_address[1]}"
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((self.address, self.port))
        self._udp.settimeout(0.2)
        standin = self

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = _read_tcp_message(self.request)
                if len(data) > 2:
                    wire = standin.answer(data[2:])
                    self.request.sendall(len(wire).to_bytes(2, "big") + wire)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._tcp = socketserver.ThreadingTCPServer((self.address, self.port), Tcp)
        self._tcp.daemon_threads = True
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._http.serve_forever,
                                          kwargs={"poll_interval": 0.1}, daemon=True),
                         threading.Thread(target=self._tcp.serve_forever,
                                          kwargs={"poll_interval": 0.1}, daemon=True),
                         threading.Thread(target=self._serve_udp, daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def hostport(self) -> str:
        return f"{self.address}:{self.port}"

    def cname(self, name: str, target: str) -> None:
        """Add `name` CNAME `target` (what a domain's owner does once after registering)."""
        self.cnames[_absolute(name)] = _absolute(target)

    def values(self, subdomain: str) -> list[str]:
        with self._lock:
            return list(self.txt.get(subdomain, []))

    # -- HTTP ---------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = None
                if self.path == "/register":
                    self._reply(201, standin.register(body))
                elif self.path == "/update":
                    self._reply(*standin.update(self.headers.get("X-Api-User"),
                                                self.headers.get("X-Api-Key"), body))
                else:
                    self._reply(404, {"error": "not_found"})

            def _reply(self, status: int, data: dict[str, object]) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def register(self, body: object) -> dict[str, object]:
        allow = body.get("allowfrom", []) if isinstance(body, dict) else []
        subdomain = str(uuid.uuid4())
        account = {"username": str(uuid.uuid4()), "password": secrets.token_urlsafe(30),
                   "subdomain": subdomain, "fulldomain": f"{subdomain}.{self.zone.rstrip('.')}"}
        with self._lock:
            self.accounts[account["username"]] = account
        return {**account, "allowfrom": allow}

    def update(self, user: str | None, key: str | None, body: object
               ) -> tuple[int, dict[str, object]]:
        with self._lock:
            account = self.accounts.get(user or "")
            if (account is None or not secrets.compare_digest(account["password"], key or "")
                    or not isinstance(body, dict)
                    or body.get("subdomain") != account["subdomain"]):
                return 401, {"error": "forbidden"}
            value = body.get("txt")
            if not isinstance(value, str) or len(value) != 43:
                return 400, {"error": "bad_txt"}
            kept = self.txt.setdefault(account["subdomain"], [])
            kept.append(value)
            del kept[:-KEPT]
            self.updates.append((account["subdomain"], value))
        return 200, {"txt": value}

    # -- DNS ----------------------------------------------------------------------------------

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        zone = dns.name.from_text(self.zone)
        name = question.name
        if not name.is_subdomain(zone):
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        found = False
        seen = 0
        while name.to_text().lower() in self.cnames and seen < 8:  # follow the chain
            target = self.cnames[name.to_text().lower()]
            response.answer.append(dns.rrset.from_text(name, TTL, "IN", "CNAME", target))
            name, seen, found = dns.name.from_text(target), seen + 1, True
            if question.rdtype == dns.rdatatype.CNAME:
                return response.to_wire()
        for rdtype, texts in self._records(name).items():
            if rdtype in (question.rdtype, dns.rdatatype.ANY) and texts:
                response.answer.append(dns.rrset.from_text_list(name, TTL, "IN", rdtype, texts))
            found = found or bool(texts)
        if not any(r.rdtype == question.rdtype for r in response.answer):
            response.authority.append(self._soa())
            if not found and not self._exists(name):
                response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    def _records(self, name: dns.name.Name) -> dict[dns.rdatatype.RdataType, list[str]]:
        text = name.to_text().lower()
        if text == self.zone:
            return {dns.rdatatype.SOA: [self._soa()[0].to_text()],
                    dns.rdatatype.NS: [f"ns.{self.zone}"]}
        if text == f"ns.{self.zone}":
            return {dns.rdatatype.A: [self.address]}
        subdomain = text.removesuffix("." + self.zone)
        with self._lock:
            values = list(self.txt.get(subdomain, []))
        return {dns.rdatatype.TXT: [f'"{v}"' for v in values]}

    def _exists(self, name: dns.name.Name) -> bool:
        text = name.to_text().lower()
        with self._lock:
            names = {f"{s}.{self.zone}" for s in self.txt} | set(self.cnames)
        names |= {self.zone, f"ns.{self.zone}"}
        return any(n == text or n.endswith("." + text) for n in names)

    def _soa(self) -> dns.rrset.RRset:
        return dns.rrset.from_text(self.zone, TTL, "IN", "SOA",
                                   f"ns.{self.zone} hostmaster.{self.zone} 1 60 60 600 1")

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self._udp.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            try:
                self._udp.sendto(self.answer(data), client)
            except Exception:  # noqa: BLE001, S112 - a malformed query gets no answer
                continue

    def stop(self) -> None:
        self._stop.set()
        self._http.shutdown()
        self._http.server_close()
        self._tcp.shutdown()
        self._tcp.server_close()
        for thread in self._threads:
            thread.join(5)
        self._udp.close()


def _absolute(name: str) -> str:
    return name.lower().rstrip(".") + "."
