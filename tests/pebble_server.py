"""Start and stop a real Pebble ACME server plus pebble-challtestsrv for integration tests.

Pebble (Debian package `pebble`) is a small RFC 8555 test CA. pebble-challtestsrv is its mock
DNS server: Pebble resolves every name through it (`-dnsserver`), it answers A queries with
127.0.0.1 (so http-01 validation connects to our own server on `http_port`) and serves the TXT
records that `hooks/dns/challtestsrv.sh` adds through its management API.

Everything listens on free loopback ports picked at start, so several instances (and pytest-xdist
workers) can run side by side. The TLS certificate of Pebble's ACME and management endpoints is
generated here (throwaway CA + leaf for 127.0.0.1/localhost); `ca_bundle` verifies it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEBBLE_BIN = "pebble"
CHALLTESTSRV_BIN = "pebble-challtestsrv"
START_TIMEOUT = 15.0  # seconds for both processes to listen
START_ATTEMPTS = 3  # starts on fresh ports when a process exits at once (its port was taken)


def find_binaries() -> tuple[str, str] | None:
    """Paths of pebble and pebble-challtestsrv, or None when either is missing."""
    pebble = shutil.which(PEBBLE_BIN) or _existing("/usr/bin/pebble")
    challtestsrv = shutil.which(CHALLTESTSRV_BIN) or _existing("/usr/bin/pebble-challtestsrv")
    if pebble and challtestsrv:
        return pebble, challtestsrv
    return None


def _existing(path: str) -> str | None:
    return path if os.access(path, os.X_OK) else None


def free_port(used: set[int] | None = None) -> int:
    """A loopback port free for both TCP and UDP right now (the DNS server needs both)."""
    used = used if used is not None else set()
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            if port in used:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        used.add(port)
        return port
    raise RuntimeError("no free loopback port found")


class ExitedEarly(RuntimeError):
    """A process exited while starting: most often a port picked free was taken meanwhile (by
    another test process, e.g. a pytest-xdist worker starting its own servers)."""


def wait_for_port(port: int, deadline: float, procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:port."""
    while True:
        for proc in procs:
            if proc.poll() is not None:
                name = proc.args[0] if isinstance(proc.args, list) else proc.args
                raise ExitedEarly(f"{name!s} exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {START_TIMEOUT} s")
        time.sleep(0.02)


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path  # the throwaway CA: give this to clients as ca_bundle
    cert: Path  # leaf for 127.0.0.1 and localhost
    key: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """A throwaway CA and a leaf certificate for 127.0.0.1 / localhost, as PEM files."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certbatch test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.DNSName("localhost"),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(directory / "test-ca.pem", directory / "localhost.pem",
                     directory / "localhost.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files


@dataclass
class PebbleInstance:
    """A running Pebble + challtestsrv pair. Build it with `start_pebble`; `stop()` at the end.

    Attributes: `directory_url` (ACME directory), `ca_bundle` (PEM verifying Pebble's TLS),
    `management_url` (Pebble's management API, HTTPS), `challtestsrv_url` (mock DNS management,
    plain HTTP), `http_port` (where Pebble connects for http-01, on 127.0.0.1), `dns_port`
    (challtestsrv's DNS server), `tls` (cert/key files, e.g. for a TLS proxy in front of Pebble).
    """

    directory_url: str
    ca_bundle: Path
    management_url: str
    challtestsrv_url: str
    http_port: int
    dns_port: int
    acme_port: int
    management_port: int
    tls: TLSFiles
    workdir: Path
    env_vars: dict[str, str]
    _pebble_cmd: tuple[list[str], dict[str, str]] = field(default_factory=lambda: ([], {}),
                                                         repr=False)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    _logs: list[tuple[str, Path, IO[bytes]]] = field(default_factory=list, repr=False)

    # -- for hooks and clients ------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment variables the hooks in hooks/dns need to reach this instance."""
        return {"CERTBATCH_CHALLTESTSRV_URL": self.challtestsrv_url}

    def root_pem(self) -> bytes:
        """Pebble's issuing root (regenerated at every Pebble start)."""
        resp = requests.get(f"{self.management_url}/roots/0", verify=str(self.ca_bundle),
                            timeout=10)
        resp.raise_for_status()
        return resp.content

    def intermediate_pem(self) -> bytes:
        resp = requests.get(f"{self.management_url}/intermediates/0",
                            verify=str(self.ca_bundle), timeout=10)
        resp.raise_for_status()
        return resp.content

    # -- mock DNS (challtestsrv management API) ---------------------------------------------------

    def _challtestsrv(self, endpoint: str, body: Mapping[str, Any]) -> None:
        resp = requests.post(f"{self.challtestsrv_url}/{endpoint}", data=json.dumps(body),
                             timeout=10)
        resp.raise_for_status()

    def add_servfail(self, host: str) -> None:
        """Make every DNS query for `host` (any type) answer SERVFAIL."""
        self._challtestsrv("set-servfail", {"host": _fqdn(host)})

    def clear_servfail(self, host: str) -> None:
        self._challtestsrv("clear-servfail", {"host": _fqdn(host)})

    def txt(self, name: str) -> list[str]:
        """The TXT values challtestsrv's DNS server answers for `name` (a minimal UDP query:
        challtestsrv's management API can set records but not list them)."""
        query_id = os.getpid() & 0xFFFF
        question = b"".join(bytes([len(label)]) + label.encode("ascii")
                            for label in _fqdn(name).rstrip(".").split(".")) + b"\0"
        packet = query_id.to_bytes(2, "big") + b"\1\0\0\1\0\0\0\0\0\0" + question + b"\0\x10\0\1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(packet, ("127.0.0.1", self.dns_port))
            answer = sock.recv(4096)
        assert answer[:2] == packet[:2] and answer[3] & 0xF == 0, f"DNS error: {answer!r}"
        count = int.from_bytes(answer[6:8], "big")
        pos = 12 + len(question) + 4
        values = []
        for _ in range(count):
            pos += 2 if answer[pos] & 0xC0 == 0xC0 else answer.index(b"\0", pos) + 1 - pos
            rtype = int.from_bytes(answer[pos:pos + 2], "big")
            length = int.from_bytes(answer[pos + 8:pos + 10], "big")
            rdata = answer[pos + 10:pos + 10 + length]
            pos += 10 + length
            if rtype == 16:  # TXT: one or more length-prefixed strings
                i, text = 0, b""
                while i < len(rdata):
                    text += rdata[i + 1:i + 1 + rdata[i]]
                    i += 1 + rdata[i]
                values.append(text.decode())
        return values

    # -- lifecycle -------------------------------------------------------------------------------

    def logs(self, tail: int = 60) -> str:
        """The last lines of both processes' output (for failure reports)."""
        parts = []
        for label, path, fh in self._logs:
            with contextlib.suppress(ValueError):
                fh.flush()
            try:
                lines = path.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"--- {label} ({path}) ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def restart_pebble(self) -> None:
        """Restart Pebble on the same ports: it forgets every account, order and its CA roots.

        challtestsrv keeps running. This is what a CA losing an account looks like.
        """
        argv, env = self._pebble_cmd
        old = self._procs.pop()
        old.terminate()
        old.wait(timeout=10)
        self._procs.append(_spawn(self, "pebble", argv, env))
        deadline = time.monotonic() + START_TIMEOUT
        wait_for_port(self.acme_port, deadline, self._procs)
        wait_for_port(self.management_port, deadline, self._procs)

    def stop(self) -> None:
        """Terminate and reap both processes; idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for _, _, fh in self._logs:
            fh.close()


def _fqdn(host: str) -> str:
    return host if host.endswith(".") else host + "."


def start_pebble(workdir: Path, extra_env: Mapping[str, str] | None = None,
                 config: Mapping[str, Any] | None = None,
                 dns_server: str | None = None) -> PebbleInstance:
    """Start challtestsrv, then Pebble using it as DNS server; return once both listen.

    `dns_server` ("IP:PORT") makes Pebble resolve through another DNS server instead (a real
    authoritative server started by tests/dns_servers.py).

    `extra_env` is added to Pebble's environment (e.g. ``PEBBLE_WFE_NONCEREJECT="50"``); the
    default is ``PEBBLE_VA_NOSLEEP=1``. `config` keys override the "pebble" section of the
    config file (e.g. ``externalAccountBindingRequired``). Raises RuntimeError with both logs
    when a process does not come up.

    A process that exits while starting (a port taken between picking and binding it) is
    retried on new ports, up to START_ATTEMPTS times; the answer on the ACME port is checked to
    be this instance's (its TLS certificate), not another process's that took the port.
    """
    binaries = find_binaries()
    if binaries is None:
        raise RuntimeError("pebble not installed: apt-get install pebble")
    workdir.mkdir(parents=True, exist_ok=True)
    tls = make_tls_files(workdir)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_pebble(binaries, workdir, tls, extra_env, config, dns_server)
        except RuntimeError as exc:
            taken = isinstance(exc.__cause__, (ExitedEarly, requests.exceptions.SSLError))
            if not taken or attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _start_pebble(binaries: tuple[str, str], workdir: Path, tls: TLSFiles,
                  extra_env: Mapping[str, str] | None, config: Mapping[str, Any] | None,
                  dns_server: str | None) -> PebbleInstance:
    pebble_bin, challtestsrv_bin = binaries
    used: set[int] = set()
    acme_port, mgmt_port, http_port = free_port(used), free_port(used), free_port(used)
    dns_port, chall_mgmt_port, tls_port = free_port(used), free_port(used), free_port(used)

    pebble_config = {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{mgmt_port}",
        "certificate": str(tls.cert),
        "privateKey": str(tls.key),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    pebble_config.update(config or {})
    config_path = workdir / "pebble-config.json"
    config_path.write_text(json.dumps({"pebble": pebble_config}, indent=2))

    env = dict(os.environ)
    env["PEBBLE_VA_NOSLEEP"] = "1"
    env.update(extra_env or {})

    inst = PebbleInstance(
        directory_url=f"https://127.0.0.1:{acme_port}/dir",
        ca_bundle=tls.ca_cert,
        management_url=f"https://127.0.0.1:{mgmt_port}",
        challtestsrv_url=f"http://127.0.0.1:{chall_mgmt_port}",
        http_port=http_port,
        dns_port=dns_port,
        acme_port=acme_port,
        management_port=mgmt_port,
        tls=tls,
        workdir=workdir,
        env_vars={k: v for k, v in env.items() if k.startswith("PEBBLE_")},
    )
    try:
        # The challenge servers of challtestsrv are disabled: our own webroot/standalone servers
        # bind http_port. No default IPv6 answer, so Pebble never tries ::1.
        inst._procs.append(_spawn(inst, "challtestsrv", [
            challtestsrv_bin,
            "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
            "-dns01", f"127.0.0.1:{dns_port}",
            "-management", f"127.0.0.1:{chall_mgmt_port}",
        ], dict(os.environ)))
        deadline = time.monotonic() + START_TIMEOUT
        wait_for_port(chall_mgmt_port, deadline, inst._procs)
        wait_for_port(dns_port, deadline, inst._procs)
        inst._pebble_cmd = ([pebble_bin, "-config", str(config_path),
                             "-dnsserver", dns_server or f"127.0.0.1:{dns_port}"], env)
        inst._procs.append(_spawn(inst, "pebble", *inst._pebble_cmd))
        wait_for_port(acme_port, deadline, inst._procs)
        wait_for_port(mgmt_port, deadline, inst._procs)
        # Ours, verified by our own CA: not another process that took the port meanwhile.
        requests.get(inst.directory_url, verify=str(tls.ca_cert), timeout=10).raise_for_status()
    except BaseException as exc:
        inst.stop()
        if isinstance(exc, Exception):
            raise RuntimeError(f"Pebble did not start: {exc}\n{inst.logs()}") from exc
        raise
    return inst


def _spawn(inst: PebbleInstance, label: str, argv: list[str],
           env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path = inst.workdir / f"{label}.log"
    for entry in [e for e in inst._logs if e[0] == label]:  # a restart: same file, appended
        entry[2].close()
        inst._logs.remove(entry)
    fh = open(log_path, "ab")  # noqa: SIM115 - closed in PebbleInstance.stop()
    inst._logs.append((label, log_path, fh))
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                            env=env, cwd=inst.workdir)
