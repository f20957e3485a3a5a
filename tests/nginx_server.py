"""Test helpers: a throw-away CA and a real nginx serving TLS on 127.0.0.1.

API (import it from a test module in tests/: ``from nginx_server import ...``)

``TestCA(name="certbatch test CA")``
    A self-signed EC P-256 CA. ``ca.issue(names, serial=None, days=90) -> Issued`` signs a new
    leaf (its own fresh key; SANs = `names`, CN = names[0]); ``ca.cert_pem`` is the CA's PEM.
``self_signed(names, serial=None) -> Issued``
    A leaf signed by its own key (empty chain).
``Issued``
    ``key_pem``, ``cert_pem``, ``chain_pem``, ``fullchain_pem`` (bytes), ``serial`` (int),
    ``not_before``/``not_after`` (aware UTC), ``names``; ``.cert_files(name)`` -> the
    certbatch.spool.CertFiles the runner would stage; ``.install(folder)`` writes fullchain.pem
    and privkey.pem into `folder` (the layout the nginx notify hook produces).
``NginxServer(workdir, cert_dir, server_names, nginx_bin="/usr/sbin/nginx")``
    nginx with everything (config, pid file, logs, temp folders) under `workdir`, one TLS server
    block per name on 127.0.0.1:<free port>, using ``<cert_dir>/<name>/fullchain.pem`` and
    ``privkey.pem``: install certificates there before ``start()``.
    ``start()`` writes the config and starts nginx as a daemon (pid file in `workdir`) and waits
    until it accepts connections; ``stop()`` stops it and waits for the master to exit (also a
    context manager). ``conf``, ``error_log``, ``port``, ``master_pid()``.
    ``reload_count()``: how many reloads the master has performed since start (the
    "reconfiguring" lines it logs at notice level on SIGHUP).
    ``served_serial(server_name) -> int``: serial of the certificate nginx presents in a TLS
    handshake with that SNI. ``wait_for_serial(server_name, serial, timeout)``: poll until it
    is `serial` (a reload takes a moment to reach new workers); returns the last serial seen.
    ``hook_env()``: NGINX_CONF, NGINX_CERT_DIR, NGINX_BIN for the nginx notify hook.
    When run as root the config says ``user root;`` so workers can reach the temp folders.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certbatch.spool import CertFiles

NGINX_BIN = "/usr/sbin/nginx"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Issued:
    names: tuple[str, ...]
    key_pem: bytes
    cert_pem: bytes
    chain_pem: bytes
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def fullchain_pem(self) -> bytes:
        return self.cert_pem + self.chain_pem

    def cert_files(self, name: str) -> CertFiles:
        return CertFiles(
            name=name, domains=self.names, privkey_pem=self.key_pem, cert_pem=self.cert_pem,
            chain_pem=self.chain_pem, fullchain_pem=self.fullchain_pem,
            serial=format(self.serial, "x"), not_before=self.not_before,
            not_after=self.not_after,
        )

    def install(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "fullchain.pem").write_bytes(self.fullchain_pem)
        (folder / "privkey.pem").write_bytes(self.key_pem)
        os.chmod(folder / "privkey.pem", 0o600)


def _build(names: Sequence[str], key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           signer: ec.EllipticCurvePrivateKey, serial: int | None, days: int,
           chain_pem: bytes) -> Issued:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    serial = serial if serial is not None else x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(signer, hashes.SHA256())
    )
    return Issued(tuple(names), _key_pem(key), cert.public_bytes(serialization.Encoding.PEM),
                  chain_pem, serial, cert.not_valid_before_utc, cert.not_valid_after_utc)


class TestCA:
    """A one-level CA; its certificate is the chain of every leaf it issues."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "certbatch test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, names: Sequence[str], serial: int | None = None, days: int = 90) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        return _build(names, key, self.name, self.key, serial, days, self.cert_pem)


def self_signed(names: Sequence[str], serial: int | None = None, days: int = 90) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    return _build(names, key, issuer, key, serial, days, b"")


def _q(value: object) -> str:
    """A quoted nginx config string (paths may contain spaces)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gone(pid: int) -> bool:
    """True if `pid` has exited (a zombie that nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class NginxServer:
    """A real nginx under `workdir`; see the module docstring."""

    def __init__(self, workdir: Path, cert_dir: Path, server_names: Sequence[str],
                 nginx_bin: str = NGINX_BIN) -> None:
        self.workdir = Path(workdir)
        self.cert_dir = Path(cert_dir)
        self.server_names = list(server_names)
        self.nginx_bin = nginx_bin
        self.conf = self.workdir / "nginx.conf"
        self.pid_file = self.workdir / "nginx.pid"
        self.error_log = self.workdir / "error.log"
        self.port = 0

    def _config_head(self) -> str:
        """nginx.conf up to the `server` blocks: everything under workdir, no daemon of ours
        left behind (the pid file), root's own user when run as root."""
        w = self.workdir
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return f"""{user}daemon on;
worker_processes 1;
pid {_q(self.pid_file)};
error_log {_q(self.error_log)} notice;
events {{ worker_connections 64; }}
http {{
    access_log {_q(w / 'access.log')};
    client_body_temp_path {_q(w / 'tmp' / 'body')};
    proxy_temp_path {_q(w / 'tmp' / 'proxy')};
    fastcgi_temp_path {_q(w / 'tmp' / 'fastcgi')};
    uwsgi_temp_path {_q(w / 'tmp' / 'uwsgi')};
    scgi_temp_path {_q(w / 'tmp' / 'scgi')};
"""

    def _config(self) -> str:
        servers = []
        for i, name in enumerate(self.server_names):
            default = " default_server" if i == 0 else ""
            servers.append(f"""
    server {{
        listen 127.0.0.1:{self.port} ssl{default};
        server_name {name};
        ssl_certificate {_q(self.cert_dir / name / 'fullchain.pem')};
        ssl_certificate_key {_q(self.cert_dir / name / 'privkey.pem')};
        location / {{ return 200 "{name}\\n"; }}
    }}""")
        return f"""{self._config_head()}{''.join(servers)}
}}
"""

    def start(self, timeout: float = 10) -> NginxServer:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):  # the free port may be taken before nginx binds it
            self.port = free_port()
            self.conf.write_text(self._config())
            proc = subprocess.run(
                [self.nginx_bin, "-c", str(self.conf), "-e", str(self.error_log)],
                capture_output=True, text=True, timeout=timeout,
            )
            if proc.returncode == 0:
                break
            if "Address already in use" not in proc.stderr:
                raise RuntimeError(f"nginx did not start: {proc.stderr}")
        else:
            raise RuntimeError("nginx did not start: no free port")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return self

    def master_pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def stop(self, timeout: float = 10) -> None:
        try:
            pid = self.master_pid()
        except (FileNotFoundError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)  # nginx: fast shutdown
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while not gone(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def __enter__(self) -> NginxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reload_count(self) -> int:
        text = self.error_log.read_text(errors="replace") if self.error_log.exists() else ""
        # The master logs "signal 1 (SIGHUP) received from N, reconfiguring" and then, when it
        # actually re-reads the config, a line that is just "<pid>#<tid>: reconfiguring".
        return len(re.findall(r"^.*\d+#\d+: reconfiguring$", text, re.MULTILINE))

    def served_serial(self, server_name: str) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # we only read the certificate, whoever signed it
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def wait_for_serial(self, server_name: str, serial: int, timeout: float = 5) -> int:
        deadline = time.monotonic() + timeout
        while True:
            seen = self.served_serial(server_name)
            if seen == serial or time.monotonic() > deadline:
                return seen
            time.sleep(0.05)

    def hook_env(self) -> dict[str, str]:
        return {"NGINX_CONF": str(self.conf), "NGINX_CERT_DIR": str(self.cert_dir),
                "NGINX_BIN": self.nginx_bin}
