"""Test helper: a real OpenSSH server (/usr/sbin/sshd) on 127.0.0.1, everything in one folder.

API (import it from a test module in tests/: ``from sshd_server import ...``)

``SSHD_BIN``
    ``"/usr/sbin/sshd"``. ``sshd_missing() -> str | None``: why sshd (or ssh-keygen, or the ssh
    client) can't be used here, or None. ``require_sshd()``: ``pytest.skip`` with that reason,
    or ``pytest.fail`` when ``CERTBATCH_REQUIRE_PEBBLE=1`` is set (CI), like the Pebble tests.
``SshServer(workdir, sshd_bin=SSHD_BIN)``
    Creating it does everything but start sshd: it makes `workdir` (0700), a fresh ed25519 host
    key, a fresh ed25519 client key (the only key in ``authorized_keys``), picks a free port and
    writes ``known_hosts`` and ``sshd_config``. So a server can be described to a client (its
    ``known_hosts``, ``hook_env()``) before it is started: a "host that is down".
    ``start(timeout=10) -> self`` runs ``sshd -D -e -f <sshd_config>`` as a child process in its
    own session (stderr, i.e. sshd's log, goes to ``log``) and waits for its "Server listening"
    line. If another process took the port meanwhile, it picks a new free port and rewrites
    ``known_hosts`` and ``sshd_config`` (so re-read ``port``/``hook_env()`` after ``start()``).
    ``stop(timeout=10)`` SIGTERMs sshd and every process under it (sshd puts each connection in
    its own session, so they are found through /proc, not by process group), SIGKILLs whatever
    is left after `timeout`, and reaps sshd. Idempotent; also a context manager
    (``with SshServer(d) as srv:``). ``running`` -> bool.
    Attributes: ``host`` ("127.0.0.1"), ``port`` (int), ``user`` (the user the tests run as: the
    only one allowed to log in; root is allowed with the key only, ``PermitRootLogin
    prohibit-password``), ``identity`` (Path of the client private key, 0600), ``known_hosts``
    (Path: one line ``[127.0.0.1]:PORT ssh-ed25519 ...``), ``host_public_key`` (str,
    ``"ssh-ed25519 AAAA..."``), ``config``, ``log``, ``workdir``.
    ``known_hosts_line(public_key=None) -> str``: the known_hosts line for this server's address,
    with its own host key or `public_key` (e.g. another server's, for a wrong-key test).
    ``hook_env(remote_dir, reload=None) -> dict[str, str]``: the settings of the ssh-push notify
    hook (SSH_PUSH_HOST, SSH_PUSH_PORT, SSH_PUSH_USER, SSH_PUSH_DIR, SSH_PUSH_IDENTITY,
    SSH_PUSH_KNOWN_HOSTS, SSH_PUSH_CONNECT_TIMEOUT=5, and SSH_PUSH_RELOAD when `reload` is given)
    to push to `remote_dir` on this server (a local path, since the "remote" host is this
    one). Merge it into the hook's environment, or into a certbatch target's ``env``.
    ``log_text()``: sshd's log so far (for assertion messages).

sshd runs as the current user. As root it needs its privilege separation folder /run/sshd,
which is created (0755) if missing, as the Debian service does. sshd_config: ``UsePAM no``,
public key authentication only (this client key only), no forwarding, no TTY, no environment
passing, ``LogLevel VERBOSE``. ``StrictModes no``: sshd's StrictModes check of the
``authorized_keys`` path walks every folder up to / and refuses a group/world-writable one, so it
rejects any file under pytest's folders in /tmp (mode 1777). `workdir` and the keys are 0700/0600
anyway.

Every subprocess here has a timeout. ``free_port`` and ``gone`` come from nginx_server.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from nginx_server import free_port, gone

SSHD_BIN = "/usr/sbin/sshd"
SSHD_MISSING = "sshd not installed: apt-get install openssh-server openssh-client"


def sshd_missing(sshd_bin: str = SSHD_BIN) -> str | None:
    if not os.access(sshd_bin, os.X_OK):
        return f"{sshd_bin} missing ({SSHD_MISSING})"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} missing ({SSHD_MISSING})"
    return None


def require_sshd(sshd_bin: str = SSHD_BIN) -> None:
    """Skip the calling test, or fail it when CERTBATCH_REQUIRE_PEBBLE=1 (CI wants them all)."""
    why = sshd_missing(sshd_bin)
    if why is not None:
        if os.environ.get("CERTBATCH_REQUIRE_PEBBLE") == "1":
            pytest.fail(why)
        pytest.skip(why)


def _keygen(path: Path, comment: str) -> str:
    """A fresh ed25519 key pair at `path` (private, 0600) and `path`.pub; returns the public key
    as "type base64" (no comment)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    kind, blob = path.with_name(path.name + ".pub").read_text().split()[:2]
    return f"{kind} {blob}"


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree = _children()
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class SshServer:
    """A real sshd under `workdir`; see the module docstring."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, sshd_bin: str = SSHD_BIN) -> None:
        self.workdir = Path(workdir)
        self.sshd_bin = sshd_bin
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.config = self.workdir / "sshd_config"
        self.log = self.workdir / "sshd.log"
        self.pid_file = self.workdir / "sshd.pid"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.identity = self.workdir / "client_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.known_hosts = self.workdir / "known_hosts"
        self.host_public_key = _keygen(self.host_key, "certbatch-test-host")
        client_public_key = _keygen(self.identity, "certbatch-test-client")
        self.authorized_keys.write_text(client_public_key + "\n")
        os.chmod(self.authorized_keys, 0o600)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self._write_port_files()

    # -- files ------------------------------------------------------------------------------

    def known_hosts_line(self, public_key: str | None = None) -> str:
        return f"[{self.host}]:{self.port} {public_key or self.host_public_key}"

    def _write_port_files(self) -> None:
        self.known_hosts.write_text(self.known_hosts_line() + "\n")
        self.config.write_text(f"""\
Port {self.port}
ListenAddress {self.host}
AddressFamily inet
HostKey {self.host_key}
PidFile {self.pid_file}
AuthorizedKeysFile {self.authorized_keys}
AllowUsers {self.user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UsePAM no
StrictModes no
PermitTTY no
PermitUserEnvironment no
AllowTcpForwarding no
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PrintMotd no
UseDNS no
MaxStartups 100
MaxSessions 10
LoginGraceTime 30
LogLevel VERBOSE
""")
        os.chmod(self.config, 0o600)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def hook_env(self, remote_dir: Path | str, reload: str | None = None) -> dict[str, str]:
        env = {
            "SSH_PUSH_HOST": self.host,
            "SSH_PUSH_PORT": str(self.port),
            "SSH_PUSH_USER": self.user,
            "SSH_PUSH_DIR": str(remote_dir),
            "SSH_PUSH_IDENTITY": str(self.identity),
            "SSH_PUSH_KNOWN_HOSTS": str(self.known_hosts),
            "SSH_PUSH_CONNECT_TIMEOUT": "5",
        }
        if reload is not None:
            env["SSH_PUSH_RELOAD"] = reload
        return env

    # -- process ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10) -> SshServer:
        if self.running:
            return self
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation folder
        for _attempt in range(5):  # the free port may have been taken since it was picked
            if self._start_once(timeout):
                return self
            self.port = free_port()
            self._write_port_files()
        raise RuntimeError(f"sshd did not start: no free port\n{self.log_text()}")

    def _start_once(self, timeout: float) -> bool:
        """Start sshd on self.port; False if the port is in use, RuntimeError on other errors."""
        check = subprocess.run([self.sshd_bin, "-t", "-f", str(self.config)],
                               capture_output=True, text=True, timeout=timeout)
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t: the test config is refused:\n{check.stderr}")
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.sshd_bin, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        listening = f"Server listening on {self.host} port {self.port}"
        while True:
            with open(self.log, errors="replace") as fh:
                fh.seek(offset)
                text = fh.read()
            if listening in text:
                return True
            if self.proc.poll() is not None:
                self.proc = None
                if "Address already in use" in text:
                    return False
                raise RuntimeError(f"sshd exited at start:\n{text}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not listen within {timeout} s:\n{text}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pids = [proc.pid, *_descendants(proc.pid)]  # connections: each in its own session
        _kill(pids, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        while not all(gone(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.02)
        leftover = [p for p in pids if not gone(p)]
        if leftover:
            _kill(leftover, signal.SIGKILL)
            proc.wait(timeout=timeout)

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
