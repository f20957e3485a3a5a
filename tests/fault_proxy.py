"""A fault-injecting TLS reverse proxy in front of Pebble, for the CA behaviours Pebble cannot
produce (rate limits, 5xx, dropped connections, hangs), and a recorder of every ACME request.

MOCK: whatever a `Fault` answers never reaches Pebble; everything else is passed through to the
real Pebble unchanged. Used by test_acme_client.py (in-process client) and test_parallel.py (the
real `certbatch` command, whose config points acme.directory at `FaultProxy.directory_url`).

Each request is recorded as a `Proxied`: method, path, the decoded JWS payload and "kid" of a
signed POST, and what was answered (status, problem type, Location). `Fault.match` lets a fault
pick requests by their content, e.g. only the new-order for one certificate's names.

`FaultProxy.profiles` adds what Pebble 2.4 lacks for ACME profiles (draft-ietf-acme-profiles):
when set, the directory it serves carries `meta.profiles` (name -> description). Pebble's own
directory already names the proxy's URLs, as it builds them from the Host header the proxy keeps.
The new-order payloads (`Proxied.payload`) show the `profile` each order asked for; Pebble itself
ignores the field.

`FaultProxy.ari` adds what Pebble 2.4 lacks for ACME Renewal Information (RFC 9773): when set
(a dict, maybe empty), the directory carries `renewalInfo` (RENEWAL_INFO on the proxy) and
GET RENEWAL_INFO/<certificate id> answers the `AriAnswer` the test set for that id (or for "*"),
404 for any other. Pebble 2.4 ignores the `replaces` field of a new order (the payloads show it);
a `Fault` on NEW_ORDER matching `replaces` plays a CA that refuses it.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import http.server
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pebble_server import PebbleInstance

# Pebble's endpoint paths (its directory names them; these are stable across Pebble versions).
DIRECTORY = "/dir"
NEW_ACCOUNT = "/sign-me-up"
NEW_ORDER = "/order-plz"
NEW_NONCE = "/nonce-plz"
RENEWAL_INFO = "/renewal-info"  # the proxy's own (MOCK: Pebble 2.4 has no ARI)

RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"
BAD_NONCE = "urn:ietf:params:acme:error:badNonce"

_NOT_JWS = object()


@dataclass
class Proxied:
    """One request the proxy received, and what it answered."""

    method: str
    path: str
    payload: Any = None  # decoded JWS payload: a dict, "" for POST-as-GET, None if not a JWS
    kid: str | None = None  # the JWS protected header's "kid" (None: a "jwk" request, or GET)
    status: int = 0  # the answer's HTTP status (0: connection dropped, or not answered yet)
    problem: str | None = None  # the problem type of an error answer
    location: str | None = None  # the answer's Location header
    faulted: bool = False  # answered by a Fault, not by Pebble
    forwarded: int = 0  # a Fault(forward=True): Pebble's status, which the client never saw

    @property
    def identifiers(self) -> list[str]:
        """The identifier values of a new-order payload ([] for anything else)."""
        if not isinstance(self.payload, dict):
            return []
        return [str(i.get("value")) for i in self.payload.get("identifiers") or []
                if isinstance(i, dict)]


@dataclass
class AriAnswer:
    """A renewalInfo answer (RFC 9773 section 4.2): the suggested window, and headers."""

    start: str  # RFC 3339
    end: str
    explanation: str | None = None
    retry_after: str | None = None  # the Retry-After header (None: none)
    status: int = 200

    def body(self) -> bytes:
        data: dict[str, Any] = {"suggestedWindow": {"start": self.start, "end": self.end}}
        if self.explanation:
            data["explanationURL"] = self.explanation
        return json.dumps(data).encode()


@dataclass
class Fault:
    """Answer a matching request ourselves instead of forwarding it to Pebble."""

    method: str
    path_prefix: str
    status: int = 0  # 0: drop the connection without an answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    times: int = 1  # how many matching requests to intercept
    after: int = 0  # let this many matching requests through first
    delay: float = 0.0  # seconds to wait before acting (a CA that hangs)
    forward: bool = False  # pass the request on to Pebble first, then lose or replace its answer
    hits: int = 0
    seen: int = 0
    match: Callable[[Proxied], bool] | None = None  # also required to match (None: any)

    def matches(self, request: Proxied) -> bool:
        return (request.method == self.method and request.path.startswith(self.path_prefix)
                and (self.match is None or self.match(request)))


def _b64url_json(text: str) -> Any:
    if text == "":
        return ""  # POST-as-GET
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def decode_jws(body: bytes) -> tuple[Any, str | None]:
    """(payload, kid) of a flattened JWS request body; (None, None) if it is not one."""
    try:
        jws = json.loads(body)
        payload = _b64url_json(jws["payload"])
        protected = _b64url_json(jws["protected"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None, None
    kid = protected.get("kid") if isinstance(protected, dict) else None
    return payload, kid


class FaultProxy:
    """A TLS reverse proxy on loopback in front of Pebble that can inject faults.

    It keeps the client's Host header, and Pebble derives its URLs (and the JWS "url" it
    expects) from Host, so the client talks to the proxy only and signatures stay valid.
    Thread-safe: several clients (or worker threads) may use it at once.
    """

    def __init__(self, inst: PebbleInstance) -> None:
        self.inst = inst
        self.faults: list[Fault] = []
        self.requests: list[Proxied] = []
        self.profiles: dict[str, str] | None = None  # set: the directory's meta.profiles
        self.ari: dict[str, AriAnswer] | None = None  # set: renewalInfo, see the top
        self.lock = threading.Lock()
        upstream = ssl.create_default_context(cafile=str(inst.ca_bundle))
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.relay()

            do_POST = do_HEAD = do_GET  # noqa: N815

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                record = Proxied(self.command, self.path)
                if self.command == "POST":
                    record.payload, record.kid = decode_jws(body)
                fault = proxy._take_fault(record)
                if fault is not None:
                    record.faulted = True
                    if fault.forward:  # the CA acts on it; the client never hears
                        record.forwarded = self.upstream(self.command, self.path, body)[0]
                    time.sleep(fault.delay)
                    if not fault.status:
                        self.close_connection = True
                        return
                    headers = dict(fault.headers)
                    if fault.status < 400:  # a success must carry a fresh nonce
                        nonce = self.upstream("HEAD", NEW_NONCE, b"")[1]
                        headers["Replay-Nonce"] = nonce["Replay-Nonce"]
                    self.answer(record, fault.status, headers, fault.body)
                    return
                if self.command == "GET" and self.path.startswith(RENEWAL_INFO + "/") \
                        and proxy.ari is not None:
                    self.renewal_info(record)
                    return
                status, headers, data = self.upstream(self.command, self.path, body)
                if self.command == "GET" and self.path == DIRECTORY and status == 200 \
                        and (proxy.profiles is not None or proxy.ari is not None):
                    directory = json.loads(data)
                    if proxy.profiles is not None:
                        directory.setdefault("meta", {})["profiles"] = dict(proxy.profiles)
                    if proxy.ari is not None:
                        directory["renewalInfo"] = \
                            f"https://{self.headers['Host']}{RENEWAL_INFO}"
                    data = json.dumps(directory).encode()
                self.answer(record, status, headers, data)

            def renewal_info(self, record: Proxied) -> None:
                assert proxy.ari is not None
                cert_id = self.path[len(RENEWAL_INFO) + 1:]
                found = proxy.ari.get(cert_id) or proxy.ari.get("*")
                if found is None:
                    problem = {"type": "urn:ietf:params:acme:error:malformed",
                               "detail": "unknown certificate", "status": 404}
                    self.answer(record, 404, {"Content-Type": "application/problem+json"},
                                json.dumps(problem).encode())
                    return
                headers = {"Content-Type": "application/json"}
                if found.retry_after is not None:
                    headers["Retry-After"] = found.retry_after
                self.answer(record, found.status, headers, found.body())

            def upstream(self, method: str, path: str, body: bytes
                         ) -> tuple[int, dict[str, str], bytes]:
                conn = http.client.HTTPSConnection("127.0.0.1", inst.acme_port,
                                                   context=upstream, timeout=10)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "content-length")}
                conn.request(method, path, body, headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                return resp.status, {k: v for k, v in resp.getheaders() if k.lower() not in
                                     ("connection", "transfer-encoding", "content-length")}, data

            def answer(self, record: Proxied, status: int, headers: dict[str, str],
                       body: bytes) -> None:
                record.status = status
                record.location = next((v for k, v in headers.items()
                                        if k.lower() == "location"), None)
                if status >= 400:
                    try:
                        record.problem = json.loads(body).get("type")
                    except (ValueError, AttributeError):
                        record.problem = None
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(inst.tls.cert), str(inst.tls.key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.directory_url = f"https://127.0.0.1:{self.server.server_address[1]}{DIRECTORY}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def _take_fault(self, record: Proxied) -> Fault | None:
        """Record the request; the fault that answers it, if any (counters updated)."""
        with self.lock:
            self.requests.append(record)
            for fault in self.faults:
                if not fault.matches(record):
                    continue
                fault.seen += 1
                if fault.seen > fault.after and fault.hits < fault.times:
                    fault.hits += 1
                    return fault
        return None

    def matching(self, method: str, prefix: str) -> list[Proxied]:
        with self.lock:
            return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def count(self, method: str, prefix: str) -> int:
        return len(self.matching(method, prefix))

    def orders_for(self, domain: str) -> list[Proxied]:
        """Every new-order request that asked for `domain`."""
        return [r for r in self.matching("POST", NEW_ORDER) if domain in r.identifiers]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(name="proxy")
def proxy_fixture(pebble: PebbleInstance) -> Iterator[FaultProxy]:
    """The `proxy` fixture: a FaultProxy in front of the session's Pebble, closed at teardown.

    A test module gets it with ``from fault_proxy import proxy_fixture  # noqa: F401``.
    """
    p = FaultProxy(pebble)
    try:
        yield p
    finally:
        p.close()


def rate_limited(retry_after: str | None, match: Callable[[Proxied], bool] | None = None,
                 detail: str = "too many new orders recently") -> Fault:
    """429 + an RFC 7807 rateLimited problem (+ Retry-After) for every matching new-order."""
    problem = {"type": RATE_LIMITED, "detail": detail, "status": 429}
    headers = {"Content-Type": "application/problem+json"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return Fault("POST", NEW_ORDER, 429, headers, json.dumps(problem).encode(), times=99,
                 match=match)
