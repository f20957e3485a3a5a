"""Publish ACME challenge responses: http-01 webroot, http-01 standalone, dns-01 script.

The ACME client hands a solver plain `ChallengeResponse` records (no acme/josepy types) for ALL
authorizations of one certificate, then calls `prepare()` once, answers the challenges, and
always calls `cleanup()`. Publishing everything before answering anything matters for dns-01:
``*.example.com`` and ``example.com`` share the record name ``_acme-challenge.example.com.`` and
the CA must see both values at once.

`cleanup()` never raises: it logs what it could not undo, so it never hides the error that made
the issuance fail.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import interrupt
from .config import ChallengeSettings
from .errors import ChallengeError, DeadlineExceeded, Interrupted
from .fsutil import atomic_write
from .hooks import HookCommand, run_hook

log = logging.getLogger("certbatch.challenges")

HTTP01 = "http-01"
DNS01 = "dns-01"
WELL_KNOWN = ".well-known/acme-challenge"
SCRIPT_TIMEOUT = 60.0  # seconds per dns script call (less if the deadline is closer)
CLEANUP_TIMEOUT = 60.0  # seconds per `remove` call; runs even after the deadline has passed
STOPPED_CLEANUP_TIMEOUT = 10.0  # the same once certbatch is interrupted (a stop must end soon)


def cleanup_deadline(deadline: float) -> float:
    """`deadline` (time.monotonic()) for removing challenge responses, brought forward to
    STOPPED_CLEANUP_TIMEOUT after a stop, if one came: cleanups run after a signal too."""
    stopped_at = interrupt.requested_at()
    return deadline if stopped_at is None else min(deadline,
                                                   stopped_at + STOPPED_CLEANUP_TIMEOUT)

# ACME tokens are base64url (RFC 8555 8.1); anything else could escape the webroot.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")


@dataclass(frozen=True)
class ChallengeResponse:
    """What to publish for one authorization.

    `domain` is the identifier without ``*.`` (a wildcard authorization is for the base name and
    has `wildcard` set). `key_authorization` is the http-01 file content; `txt_value` is the
    dns-01 TXT record value (empty for http-01).
    """

    type: str
    domain: str
    token: str
    key_authorization: str
    txt_value: str = ""
    wildcard: bool = False

    @property
    def record_name(self) -> str:
        """The dns-01 TXT record name, fully qualified: ``_acme-challenge.<domain>.``."""
        return f"_acme-challenge.{self.domain.rstrip('.')}."

    @property
    def http_path(self) -> str:
        return f"/{WELL_KNOWN}/{self.token}"


class Solver(Protocol):
    def prepare(self, responses: Sequence[ChallengeResponse], deadline: float) -> None:
        """Publish every response; raise ChallengeError / DeadlineExceeded on failure."""

    def cleanup(self) -> None:
        """Remove whatever `prepare` published (also after a partial `prepare`). Never raises."""


def make_solver(challenge: ChallengeSettings, name: str) -> Solver:
    """The solver for a certificate's challenge settings; `name` prefixes the log lines."""
    if challenge.type == HTTP01 and challenge.standalone:
        assert challenge.standalone_port is not None
        return StandaloneSolver(challenge.standalone_address or "", challenge.standalone_port,
                                name)
    if challenge.type == HTTP01 and challenge.webroots:
        return WebrootSolver(challenge.webroot, name, dict(challenge.webroot_map))
    if challenge.type == DNS01 and challenge.script is not None:
        return DnsScriptSolver(challenge.script, name,
                               per_certificate=challenge.calls == "per-certificate",
                               challenge=challenge)
    if challenge.type == DNS01 and challenge.provider is not None:
        from .dns.solver import DnsProviderSolver  # dnspython: only when a provider is used

        return DnsProviderSolver(challenge, name)
    raise ChallengeError(f"incomplete {challenge.type} challenge settings")


def setup_problem(challenge: ChallengeSettings) -> str | None:
    """What is wrong with a certificate's challenge setup that can be seen without the
    network (None: nothing). Found at run time it fails that certificate alone; `check`
    lists it."""
    if challenge.webroots:
        problems = [p for p in map(webroot_problem, challenge.webroots) if p]
        return "; ".join(problems) or None
    if challenge.script is not None:
        return script_problem(challenge.script)
    if challenge.provider is not None:
        from .dns.solver import setup_problem as provider_problem

        return provider_problem(challenge)
    return None


def script_problem(script: Path) -> str | None:
    if not os.path.isfile(script):
        what = "is not a regular file" if os.path.exists(script) else "does not exist"
        return f"dns script {script} {what}"
    if not os.access(script, os.X_OK):
        return f"dns script {script} is not executable (chmod +x it)"
    return None


def _check_token(token: str) -> str:
    if not _TOKEN_RE.fullmatch(token):
        raise ChallengeError(f"the CA sent a token that is not base64url: {token[:40]!r}")
    return token


# -- http-01 webroot -----------------------------------------------------------------------------

# Creating/removing the shared .well-known folders is serialized between threads, so one
# certificate's cleanup never deletes a folder another is about to write into.
_webroot_lock = threading.Lock()


def webroot_problem(webroot: Path) -> str | None:
    """Why `webroot` cannot take http-01 tokens (None: it is a folder)."""
    if os.path.isdir(webroot):
        return None
    return f"webroot {webroot} {'is not a folder' if os.path.exists(webroot) else 'does not exist'}"


class WebrootSolver:
    """Write ``<webroot>/.well-known/acme-challenge/<token>`` files for a web server to serve;
    each name's token under its own webroot (`webroot_map`), else under `webroot`."""

    def __init__(self, webroot: Path | None, name: str,
                 webroot_map: Mapping[str, Path] | None = None) -> None:
        self.webroot = webroot
        self.webroot_map = dict(webroot_map or {})
        self.name = name
        self._files: list[Path] = []
        self._created_dirs: list[Path] = []  # deepest last

    def _root(self, domain: str) -> Path:
        root = self.webroot_map.get(domain.lower(), self.webroot)
        if root is None:  # the config loader makes sure every name has one
            raise ChallengeError(f"no http-01 webroot for {domain}")
        return root

    def prepare(self, responses: Sequence[ChallengeResponse], deadline: float) -> None:
        by_root: dict[Path, list[ChallengeResponse]] = {}
        for resp in responses:
            by_root.setdefault(self._root(resp.domain), []).append(resp)
        for root in by_root:
            problem = webroot_problem(root)
            if problem:  # never create the webroot itself: a typo would publish nowhere
                raise ChallengeError(problem)
        for root, group in by_root.items():
            folder = root / WELL_KNOWN
            with _webroot_lock:
                try:
                    self._make_dirs(root, folder)
                    for resp in group:
                        path = folder / _check_token(resp.token)
                        self._files.append(path)
                        atomic_write(path, resp.key_authorization.encode("ascii"), 0o644)
                        log.debug("%s: http-01 token for %s written to %s", self.name,
                                  resp.domain, path)
                except OSError as exc:
                    raise ChallengeError(f"cannot write http-01 token in {folder}: "
                                         f"{exc.strerror or exc}") from exc
            log.info("%s: %d http-01 token(s) published in %s", self.name, len(group), folder)

    def _make_dirs(self, root: Path, folder: Path) -> None:
        missing = []
        for parent in [folder, *folder.parents]:
            if parent == root or parent.exists():
                break
            missing.append(parent)
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            # mkdir honours the umask; the web server user must be able to traverse these.
            os.chmod(path, 0o755)
            self._created_dirs.append(path)

    def cleanup(self) -> None:
        with _webroot_lock:
            for path in self._files:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("%s: cannot remove http-01 token %s: %s", self.name, path, exc)
            for folder in reversed(self._created_dirs):
                with contextlib.suppress(OSError):  # not empty: someone else's file lives there
                    folder.rmdir()
        self._files.clear()
        self._created_dirs.clear()


# -- http-01 standalone --------------------------------------------------------------------------

class _ChallengeHTTPServer(http.server.ThreadingHTTPServer):
    """Serves key authorizations from a token map; shared by all certificates on one address."""

    daemon_threads = True

    def __init__(self, address: str, port: int) -> None:
        if ":" in address:
            self.address_family = socket.AF_INET6
        self.tokens: dict[str, str] = {}
        self.tokens_lock = threading.Lock()
        self.users = 0
        super().__init__((address, port), _ChallengeHandler)


class _ChallengeHandler(http.server.BaseHTTPRequestHandler):
    server: _ChallengeHTTPServer
    server_version = "certbatch"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        prefix = f"/{WELL_KNOWN}/"
        token = self.path[len(prefix):] if self.path.startswith(prefix) else ""
        with self.server.tokens_lock:
            body = self.server.tokens.get(token)
        if body is None:
            self.send_error(404)
            return
        data = body.encode("ascii")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        log.debug("http-01 standalone %s: %s", self.client_address[0], format % args)


_servers: dict[tuple[str, int], _ChallengeHTTPServer] = {}
_servers_lock = threading.Lock()


def _acquire_server(address: str, port: int) -> _ChallengeHTTPServer:
    """The running server for address:port, started on first use (refcounted)."""
    with _servers_lock:
        server = _servers.get((address, port))
        if server is None:
            try:
                server = _ChallengeHTTPServer(address, port)
            except OSError as exc:
                hint = ""
                if exc.errno == errno.EADDRINUSE:
                    hint = " (another program listens there: use a webroot instead)"
                elif exc.errno == errno.EACCES:
                    hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
                raise ChallengeError(
                    f"http-01 standalone: cannot listen on {_hostport(address, port)}: "
                    f"{exc.strerror or exc}{hint}") from exc
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"http-01 {_hostport(address, port)}", daemon=True)
            thread.start()
            _servers[(address, port)] = server
            log.info("http-01 standalone server listening on %s", _hostport(address, port))
        server.users += 1
        return server


def _release_server(address: str, port: int, server: _ChallengeHTTPServer) -> None:
    with _servers_lock:
        server.users -= 1
        if server.users > 0:
            return
        del _servers[(address, port)]
        # Close the socket before anyone can try to bind the port again.
        server.shutdown()
        server.server_close()
    log.info("http-01 standalone server on %s stopped", _hostport(address, port))


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address or '*'}:{port}"


class StandaloneSolver:
    """Answer http-01 from certbatch's own HTTP server (one per address:port, shared)."""

    def __init__(self, address: str, port: int, name: str) -> None:
        self.address = address
        self.port = port
        self.name = name
        self._server: _ChallengeHTTPServer | None = None
        self._tokens: list[str] = []

    def prepare(self, responses: Sequence[ChallengeResponse], deadline: float) -> None:
        if not responses:
            return  # all authorizations reused: no need to bind the port
        tokens = {_check_token(r.token): r.key_authorization for r in responses}
        self._server = _acquire_server(self.address, self.port)
        with self._server.tokens_lock:
            self._server.tokens.update(tokens)
        self._tokens.extend(tokens)
        log.info("%s: %d http-01 token(s) served on %s", self.name, len(tokens),
                 _hostport(self.address, self.port))

    def cleanup(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with server.tokens_lock:
            for token in self._tokens:
                server.tokens.pop(token, None)
        self._tokens.clear()
        try:
            _release_server(self.address, self.port, server)
        except Exception:  # noqa: BLE001 - cleanup must not raise
            log.exception("%s: stopping the http-01 standalone server failed", self.name)


# -- dns-01 script -------------------------------------------------------------------------------

class DnsScriptSolver:
    """Run ``<script> add|remove <domain> <record-name> <value> [...]`` for the TXT records.

    `per_certificate` False: one run per record and action, with the record's data in argv and
    in CERTBATCH_DOMAIN, CERTBATCH_RECORD_NAME and CERTBATCH_RECORD_VALUE. True: one run per
    certificate and action, with a triple per record in argv. Either way CERTBATCH_ACTION and
    CERTBATCH_RECORDS (a "domain record-name value" line per record) are set, and no shell is
    involved. `remove` gets the same records as every `add` that was attempted, even a failed
    one, since it may have half worked.
    """

    def __init__(self, script: Path, name: str, per_certificate: bool = False,
                 challenge: ChallengeSettings | None = None) -> None:
        self.script = script
        self.name = name
        self.per_certificate = per_certificate
        self.challenge = challenge  # for `propagation: check` (None: no check)
        self._added: list[tuple[str, str, str]] = []

    def prepare(self, responses: Sequence[ChallengeResponse], deadline: float) -> None:
        records: list[tuple[str, str, str]] = []
        for resp in responses:
            record = (resp.domain.rstrip("."), resp.record_name, resp.txt_value)
            if record not in records and record not in self._added:
                records.append(record)
        if not records:
            return
        problem = script_problem(self.script)
        if problem:  # one clear line rather than the shell's "cannot run" (and no remove)
            raise ChallengeError(problem)
        if self.per_certificate:
            self._added.extend(records)
            self._run("add", records, deadline, deadline_bound=True)
        else:
            for record in records:
                self._added.append(record)
                self._run("add", [record], deadline, deadline_bound=True)
        log.info("%s: %d dns-01 TXT record(s) added by %s", self.name, len(self._added),
                 self.script)
        if self.challenge is not None and self.challenge.propagation == "check":
            from .dns.solver import Placement, check_propagation, lookup_for

            # Where the script wrote is its business; the CA looks at the CNAME chain's end.
            placed = Placement(self.challenge, lookup_for(self.challenge)).records(
                responses, deadline)
            check_propagation(self.challenge, placed, deadline, self.name)

    def cleanup(self) -> None:
        """Run `remove` for every record `add` was run for. Also once certbatch is interrupted
        (the one script run a stop still starts: records left behind would stay for good),
        then within STOPPED_CLEANUP_TIMEOUT in all."""
        added, self._added = self._added, []
        calls = [added] if self.per_certificate else [[record] for record in added]
        if added and interrupt.requested():
            log.warning("%s: interrupted: removing the dns-01 TXT record(s) all the same (%s "
                        "remove, within %g s)", self.name, self.script, STOPPED_CLEANUP_TIMEOUT)
        failed = False
        for records in calls:
            if not records:
                continue
            # A stop during the remove brings its end forward too (run_hook's after_stop)
            try:
                self._run("remove", records,
                          cleanup_deadline(time.monotonic() + CLEANUP_TIMEOUT),
                          deadline_bound=False, after_stop=STOPPED_CLEANUP_TIMEOUT)
            except (ChallengeError, DeadlineExceeded, Interrupted) as exc:
                failed = True
                log.warning("%s: %s", self.name, exc)
        if added and not failed:
            log.info("%s: dns-01 TXT record(s) removed", self.name)

    def _run(self, action: str, records: Sequence[tuple[str, str, str]], deadline: float,
             deadline_bound: bool, after_stop: float | None = None) -> None:
        argv = [str(self.script), action, *(field for record in records for field in record)]
        env = {"CERTBATCH_ACTION": action,
               "CERTBATCH_RECORDS": "".join(f"{d} {r} {v}\n" for d, r, v in records)}
        if not self.per_certificate:
            (domain, record_name, value), = records
            env.update(CERTBATCH_DOMAIN=domain, CERTBATCH_RECORD_NAME=record_name,
                       CERTBATCH_RECORD_VALUE=value)
        names = ", ".join(dict.fromkeys(r for _, r, _ in records))
        what = f"dns script {self.script} {action} {names}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline exceeded before {what}")
        timeout = min(SCRIPT_TIMEOUT, remaining)
        # The hooks' runner: own process group killed whole on timeout, and it stops reading
        # soon after the script exits even if a detached child still holds its output open.
        result = run_hook(HookCommand(f"{self.name}: dns {action}", tuple(argv)), env,
                          self.script.parent, timeout, after_stop=after_stop)
        if result.interrupted:
            raise interrupt.error(f"{what} stopped")
        if result.timed_out:
            if deadline_bound and timeout < SCRIPT_TIMEOUT:
                raise DeadlineExceeded(f"deadline exceeded while {what} was "
                                       f"running (killed after {timeout:.1f} s)")
            raise ChallengeError(f"{what} timed out after {timeout:g} s")
        if result.returncode != 0:
            lines = [ln.strip() for ln in result.stderr_tail.splitlines() if ln.strip()]
            code = result.returncode or 0
            status = (f"was killed by signal {-code}" if code < 0
                      else f"exited with status {code}")
            raise ChallengeError(f"{what} {status}" + (f": {lines[-1]}" if lines else ""))
