"""Test helpers: real HAProxy, Apache httpd, Postfix and Dovecot serving TLS on 127.0.0.1.

API (import it from a test module in tests/: ``from real_servers import ...``; certificates come
from ``nginx_server.TestCA``)

Every server runs as a daemon on free 127.0.0.1 ports, with everything it writes or reads
(config, pid files, logs, runtime, queue and state folders, certificates) in its own `workdir`.
Nothing from /etc is used or changed, apart from what the programs themselves read there (users
and groups, and postfix-script reads /etc/postfix/main.cf to see whether multi-instance mode is
on). Apache, Postfix and Dovecot drop privileges to www-data, postfix, dovecot/dovenull, so the
default `workdir` is a fresh ``tempfile.mkdtemp()`` folder made 0755 (a pytest tmp_path sits
in a 0700 folder those users cannot enter); it is removed by ``stop()``. Run as root.

Common to every class below:
    ``missing() -> str | None`` (static): why the server cannot run here (program or user
    missing, not root), or None.
    ``install(name, issued)``: write the `nginx_server.Issued` certificate as the matching
    notify hook lays it out in ``cert_dir`` (use it before ``start()``).
    ``start(timeout=20)``: write the config, start the server, wait until it accepts
    connections; a port that was taken meanwhile is retried with another. Returns self.
    ``stop(timeout=10)``: stop it and wait until none of its processes is left (the daemons
    run in their own session; what is still there after `timeout` gets SIGKILL); remove the
    workdir it made. Also a context manager.
    ``port``, ``workdir``, ``cert_dir``, ``conf`` (its config file), ``log_tail(n=40)``.
    ``served_serial(name=None) -> int``: serial of the certificate presented in a real TLS
    handshake (SNI `name`, default the first name). ``wait_for_serial(serial, name=None,
    timeout=5) -> int``: poll until it is `serial` (reloads take a moment); returns the last
    serial seen.
    ``hook_env() -> dict[str, str]``: the settings of the matching shipped notify hook that
    point it at this instance (cert folder, config, programs, reload command).

``HaproxyServer(names, workdir=None)``
    haproxy -W -D (master-worker), ``bind 127.0.0.1:PORT ssl crt <cert_dir>/`` (cert_dir is
    ``<workdir>/haproxy certs``: a space, so the hook must quote). ``install`` writes
    ``<cert_dir>/<name>.pem`` = key + full chain. Reload: SIGUSR2 to the master (pid file);
    ``reload_count()`` asks the master socket (``show proc``). hook_env: HAPROXY_BIN,
    HAPROXY_CONF, HAPROXY_CERT_DIR, HAPROXY_BACKUP_DIR, HAPROXY_RELOAD_CMD.
``ApacheServer(names, workdir=None)``
    /usr/sbin/apache2 -d <confdir> -k start, mpm_event + ssl + socache_shmcb + authz_core,
    User/Group www-data, one name-based TLS vhost per name using
    ``<cert_dir>/<name>/fullchain.pem`` and ``privkey.pem`` (cert_dir ``<workdir>/apache certs``).
    The config dir is laid out as a Debian instance (``apache2.conf`` + ``envvars``), so
    Debian's own apachectl drives it with APACHE_CONFDIR set. ``reload_count()`` counts the
    graceful restarts in the error log. hook_env: APACHE_CERT_DIR, APACHECTL, APACHE_CONFDIR.
``PostfixServer(name, workdir=None)``
    postfix -c <confdir> start: its own main.cf/master.cf, queue/data/meta folders in the
    workdir, smtpd on 127.0.0.1:PORT offering STARTTLS with ``smtpd_tls_chain_files`` =
    ``<cert_dir>/<name>/privkey.pem, fullchain.pem``; log in ``maillog``. ``served_serial``
    does EHLO + STARTTLS. hook_env: MAIL_CERT_DIR, POSTFIX_RELOAD_CMD (``postfix -c DIR
    reload``), DOVECOT_RELOAD_CMD="" (skipped).
``DovecotServer(name, workdir=None)``
    dovecot -c <conf>, its own base_dir/state_dir/log, ``ssl_cert``/``ssl_key`` from
    ``<cert_dir>/<name>/``. The TLS listener is the doveadm service's inet_listener with
    ``ssl = yes`` (implicit TLS): Debian's dovecot-core alone has no imap-login (that is in
    dovecot-imapd); the listener uses the same global ssl_cert/ssl_key, so a reload is seen the
    same way. hook_env: MAIL_CERT_DIR, DOVECOT_RELOAD_CMD (``doveadm -c CONF reload``),
    POSTFIX_RELOAD_CMD="".
``MailServers(name, workdir=None)``
    a PostfixServer and a DovecotServer (``.postfix``, ``.dovecot``) sharing one cert_dir, as
    the postfix-dovecot hook expects; start/stop/context manager/install; hook_env has both
    reload commands. ``served_serials() -> (postfix's, dovecot's)``.

Running a shipped notify hook as a certbatch notify target, without certbatch's internals:

``write_spool(spool, entries) -> Path``
    lay out `spool`/pending/<name>/ (privkey.pem 0600, cert.pem, chain.pem, fullchain.pem 0644,
    meta.json) for every ``{name: Issued}`` of `entries` (added to what is there).
``run_notify_hook(script, spool, names, settings, target=None, legacy_names=False,
timeout=60) -> subprocess.CompletedProcess[str]``
    run ``hooks/notify.d/<script>`` (or a path) with an environment built from scratch: PATH,
    `settings`, and the target contract: CERTBATCH_SPOOL_DIR (also the working directory),
    CERTBATCH_NAMES_FILE (`names`, one per line, newline-terminated, written in a folder next
    to the spool together with CERTBATCH_BATCH_FILE), CERTBATCH_COUNT,
    CERTBATCH_FAILED_NAMES="", CERTBATCH_TARGET (default: the script's name) and
    CERTBATCH_NAMES_TRUNCATED=1 with no CERTBATCH_NAMES, as for a batch too big for the
    variable. ``legacy_names=True`` instead runs it as an older certbatch did: CERTBATCH_NAMES
    (space-separated), no names file, no CERTBATCH_TARGET. stdin is /dev/null; the hook gets
    its own session.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from nginx_server import Issued, free_port, gone

HOOKS = Path(__file__).resolve().parent.parent / "hooks"
HAPROXY_BIN = "/usr/sbin/haproxy"
APACHE_BIN = "/usr/sbin/apache2"
APACHECTL = "/usr/sbin/apache2ctl"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
POSTFIX_BIN = "/usr/sbin/postfix"
POSTFIX_DAEMON_DIR = Path("/usr/lib/postfix/sbin")
DOVECOT_BIN = "/usr/sbin/dovecot"
DOVEADM_BIN = "/usr/bin/doveadm"

_IN_USE = re.compile(r"address already in use|could not bind|cannot bind", re.IGNORECASE)


class StartError(RuntimeError):
    pass


def _missing(programs: Sequence[str], users: Sequence[str] = (),
             groups: Sequence[str] = ()) -> str | None:
    for program in programs:
        if not os.access(program, os.X_OK):
            return f"{program} is not installed"
    for user in users:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"user {user} does not exist"
    for group in groups:
        try:
            grp.getgrnam(group)
        except KeyError:
            return f"group {group} does not exist"
    if os.geteuid() != 0:
        return "needs root (it drops privileges to its own users)"
    return None


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _tls_serial(sock: socket.socket, server_name: str | None) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we only read the certificate, whoever signed it
    with ctx.wrap_socket(sock, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class _Daemon:
    """Shared start/stop/serial logic; subclasses write the config and name the commands."""

    name = "server"
    cert_subdir = "certs"

    def __init__(self, names: Sequence[str], workdir: Path | None) -> None:
        self.names = list(names)
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix=f"certbatch-{self.name}-"))
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # the server's unprivileged users must get in
        self.cert_dir = self.workdir / self.cert_subdir
        self.cert_dir.mkdir(exist_ok=True)
        self.port = 0
        self.conf = self.workdir / "unset"
        self.log = self.workdir / "unset.log"
        self._sid: int | None = None

    # -- to override ---------------------------------------------------------------------
    def _write_config(self) -> None:
        raise NotImplementedError

    def _start_command(self) -> list[str]:
        raise NotImplementedError

    def _master_pid(self) -> int | None:
        raise NotImplementedError

    def _stop_master(self, pid: int, timeout: float) -> None:
        os.kill(pid, signal.SIGTERM)

    def install(self, name: str, issued: Issued) -> None:
        issued.install(self.cert_dir / name)  # <name>/fullchain.pem + privkey.pem (0600)

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    # -- common --------------------------------------------------------------------------
    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return f"({self.log} does not exist)"

    def start(self, timeout: float = 20) -> _Daemon:
        for _attempt in range(5):  # the free port may be taken before the server binds it
            self.port = free_port()
            self._write_config()
            # Output to a file, not a pipe: a daemon that kept the pipe open would block us.
            out = self.workdir / f"{self.name}-start.out"
            with out.open("w") as fh:
                returncode = subprocess.run(self._start_command(), stdin=subprocess.DEVNULL,
                                            stdout=fh, stderr=subprocess.STDOUT,
                                            timeout=timeout).returncode
            if returncode == 0:
                break
            self._kill_leftovers()
            message = f"{out.read_text(errors='replace')}\n{self.log_tail()}"
            if not _IN_USE.search(message):
                raise StartError(f"{self.name} did not start (exit {returncode}):\n{message}")
        else:
            raise StartError(f"{self.name} did not start: no free port")
        pid = self._wait_master(timeout)
        self._sid = os.getsid(pid)
        try:
            _wait_port(self.port, timeout)
        except OSError:
            self.stop()
            raise StartError(f"{self.name} does not accept connections:\n"
                             f"{self.log_tail()}") from None
        return self

    def _wait_master(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid = self._master_pid()
            if pid is not None and not gone(pid):
                return pid
            if time.monotonic() > deadline:
                raise StartError(f"{self.name}: no master pid\n{self.log_tail()}")
            time.sleep(0.05)

    def _kill_leftovers(self) -> None:
        pid = self._master_pid()
        if pid is not None and not gone(pid):
            sid = os.getsid(pid)
            for p in _session(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)

    def stop(self, timeout: float = 10) -> None:
        pid = self._master_pid()
        if pid is not None and not gone(pid):
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                self._stop_master(pid, timeout)
        if self._sid is not None:
            deadline = time.monotonic() + timeout
            while _session(self._sid) and time.monotonic() < deadline:
                time.sleep(0.05)
            for p in _session(self._sid):  # still there after `timeout`
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            while _session(self._sid) and time.monotonic() < deadline + 5:
                time.sleep(0.05)
            self._sid = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> _Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def served_serial(self, name: str | None = None) -> int:
        return _tls_serial(self._connect(), name or self.names[0])

    def wait_for_serial(self, serial: int, name: str | None = None, timeout: float = 5) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen = self.served_serial(name)
            except (OSError, smtplib.SMTPException):
                seen = -1  # between workers, a reload may refuse a connection or two
            if seen == serial or time.monotonic() > deadline:
                return seen
            time.sleep(0.1)

    def hook_env(self) -> dict[str, str]:
        raise NotImplementedError


def _q(value: object) -> str:
    """A double-quoted config string (HAProxy and Apache; paths may contain spaces)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- HAProxy ------------------------------------------------------------------------------

class HaproxyServer(_Daemon):
    name = "haproxy"
    cert_subdir = "haproxy certs"

    def __init__(self, names: Sequence[str], workdir: Path | None = None,
                 haproxy_bin: str = HAPROXY_BIN) -> None:
        super().__init__(names, workdir)
        self.haproxy_bin = haproxy_bin
        self.conf = self.workdir / "haproxy.cfg"
        self.log = self.workdir / "haproxy-start.out"  # what it says before it daemonizes
        self.pid_file = self.workdir / "haproxy.pid"
        self.master_socket = self.workdir / "master.sock"
        self.backup_dir = self.workdir / "haproxy backups"

    @staticmethod
    def missing() -> str | None:
        return _missing([HAPROXY_BIN])

    def install(self, name: str, issued: Issued) -> None:
        path = self.cert_dir / f"{name}.pem"
        path.write_bytes(issued.key_pem + issued.fullchain_pem)
        os.chmod(path, 0o600)

    def _write_config(self) -> None:
        self.conf.write_text(f"""global
    log stderr format raw local0 info
defaults
    mode http
    log global
    timeout connect 2s
    timeout client 5s
    timeout server 5s
frontend tls
    bind 127.0.0.1:{self.port} ssl crt {_q(str(self.cert_dir) + '/')}
    http-request return status 200 content-type text/plain string ok
""")

    def _start_command(self) -> list[str]:
        # -D: the master daemonizes once the config is loaded and the port bound, so a bad
        # config or a taken port is a non-zero exit here.
        return [self.haproxy_bin, "-W", "-D", "-f", str(self.conf), "-p", str(self.pid_file),
                "-S", f"{self.master_socket},mode,600"]

    def _master_pid(self) -> int | None:
        return _read_pid(self.pid_file)

    def _stop_master(self, pid: int, timeout: float) -> None:
        os.kill(pid, signal.SIGUSR1)  # soft stop: master and workers finish and exit

    def start(self, timeout: float = 20) -> HaproxyServer:
        super().start(timeout)
        self.master_command("show proc", timeout)  # the master socket is up too
        return self

    def master_command(self, command: str, timeout: float = 5) -> str:
        """`command`'s answer on the master socket (retried while a reload re-executes the
        master: the socket is refused for a moment then)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._master_command(command)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _master_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.master_socket))
            s.sendall(command.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n\n"):  # an answer ends with an empty line
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.decode(errors="replace")

    def reload_count(self) -> int:
        """Reloads the master has done (``show proc``: "<pid> master <reloads> ...")."""
        match = re.search(r"^\d+\s+master\s+(\d+)", self.master_command("show proc"), re.M)
        assert match, "no master line in 'show proc'"
        return int(match.group(1))

    def hook_env(self) -> dict[str, str]:
        return {
            "HAPROXY_BIN": self.haproxy_bin,
            "HAPROXY_CONF": str(self.conf),
            "HAPROXY_CERT_DIR": str(self.cert_dir),
            "HAPROXY_BACKUP_DIR": str(self.backup_dir),
            "HAPROXY_RELOAD_CMD": f"kill -USR2 \"$(cat {shlex.quote(str(self.pid_file))})\"",
        }


# -- Apache httpd -------------------------------------------------------------------------

class ApacheServer(_Daemon):
    name = "apache"
    cert_subdir = "apache certs"
    modules = ("mpm_event", "authz_core", "socache_shmcb", "ssl")

    def __init__(self, names: Sequence[str], workdir: Path | None = None) -> None:
        super().__init__(names, workdir)
        self.conf_dir = self.workdir / "conf"
        self.conf = self.conf_dir / "apache2.conf"
        self.run_dir = self.workdir / "run"
        self.pid_file = self.run_dir / "apache2.pid"
        self.log = self.workdir / "error.log"

    @staticmethod
    def missing() -> str | None:
        modules = [str(APACHE_MODULES / f"mod_{m}.so") for m in ApacheServer.modules]
        absent = [m for m in modules if not os.path.exists(m)]
        if absent:
            return f"{absent[0]} is not installed"
        return _missing([APACHE_BIN, APACHECTL], ["www-data"], ["www-data"])

    def _write_config(self) -> None:
        self.conf_dir.mkdir(exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        loads = "\n".join(f"LoadModule {m}_module {APACHE_MODULES / f'mod_{m}.so'}"
                          for m in self.modules)
        vhosts = "".join(f"""
<VirtualHost 127.0.0.1:{self.port}>
    ServerName {name}
    SSLEngine on
    SSLCertificateFile {_q(self.cert_dir / name / 'fullchain.pem')}
    SSLCertificateKeyFile {_q(self.cert_dir / name / 'privkey.pem')}
</VirtualHost>
""" for name in self.names)
        self.conf.write_text(f"""ServerRoot {_q(self.conf_dir)}
ServerName localhost
PidFile {_q(self.pid_file)}
DefaultRuntimeDir {_q(self.run_dir)}
ErrorLog {_q(self.log)}
LogLevel notice
{loads}
User www-data
Group www-data
Listen 127.0.0.1:{self.port} https
SSLSessionCache {_q(f'shmcb:{self.run_dir}/ssl_scache(512000)')}
{vhosts}""")
        # Read by Debian's apachectl (APACHE_CONFDIR=conf_dir): keeps it out of /var/run.
        run = shlex.quote(str(self.run_dir))
        (self.conf_dir / "envvars").write_text(
            f"export APACHE_RUN_DIR={run} APACHE_LOCK_DIR={run}\n"
            f"export APACHE_PID_FILE={shlex.quote(str(self.pid_file))}\n"
            "export APACHE_RUN_USER=www-data APACHE_RUN_GROUP=www-data\n"
            f"export APACHE_LOG_DIR={shlex.quote(str(self.workdir))}\n")

    def _start_command(self) -> list[str]:
        return [APACHE_BIN, "-d", str(self.conf_dir), "-k", "start"]

    def _master_pid(self) -> int | None:
        return _read_pid(self.pid_file)

    def _stop_master(self, pid: int, timeout: float) -> None:
        subprocess.run([APACHE_BIN, "-d", str(self.conf_dir), "-k", "stop"],
                       capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def reload_count(self) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count("Doing graceful restart")

    def hook_env(self) -> dict[str, str]:
        return {"APACHE_CERT_DIR": str(self.cert_dir), "APACHECTL": APACHECTL,
                "APACHE_CONFDIR": str(self.conf_dir)}


# -- Postfix ------------------------------------------------------------------------------

# The queue and data folders, as Debian's /etc/postfix/postfix-files lists them: postfix-script
# (check-fatal -> post-install create-missing) creates them from $meta_directory/postfix-files.
_POSTFIX_FILES = """\
$data_directory:d:$mail_owner:-:700:uc
$queue_directory:d:root:-:755:uc
$queue_directory/active:d:$mail_owner:-:700:ucr
$queue_directory/bounce:d:$mail_owner:-:700:ucr
$queue_directory/corrupt:d:$mail_owner:-:700:ucr
$queue_directory/defer:d:$mail_owner:-:700:ucr
$queue_directory/deferred:d:$mail_owner:-:700:ucr
$queue_directory/flush:d:$mail_owner:-:700:ucr
$queue_directory/hold:d:$mail_owner:-:700:ucr
$queue_directory/incoming:d:$mail_owner:-:700:ucr
$queue_directory/private:d:$mail_owner:-:700:uc
$queue_directory/maildrop:d:$mail_owner:$setgid_group:730:uc
$queue_directory/public:d:$mail_owner:$setgid_group:710:uc
$queue_directory/pid:d:root:-:755:uc
$queue_directory/saved:d:$mail_owner:-:700:ucr
$queue_directory/trace:d:$mail_owner:-:700:ucr
"""

# No chroot (5th column "n"): the chroot would need copies of /etc files in the queue folder.
_POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
proxymap  unix  - - n - - proxymap
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixServer(_Daemon):
    name = "postfix"
    cert_subdir = "mail-certs"  # no space: smtpd_tls_chain_files is a list split on spaces

    def __init__(self, name: str, workdir: Path | None = None,
                 cert_dir: Path | None = None) -> None:
        super().__init__([name], workdir)
        if cert_dir is not None:
            self.cert_dir = Path(cert_dir)
        self.conf_dir = self.workdir / "postfix"
        self.conf = self.conf_dir / "main.cf"
        self.queue_dir = self.workdir / "queue"
        self.log = self.workdir / "maillog"

    @staticmethod
    def missing() -> str | None:
        return _missing([POSTFIX_BIN, str(POSTFIX_DAEMON_DIR / "master"),
                         str(POSTFIX_DAEMON_DIR / "smtpd")], ["postfix"], ["postdrop"])

    def _write_config(self) -> None:
        w = self.workdir
        self.conf_dir.mkdir(exist_ok=True)
        (w / "meta").mkdir(exist_ok=True)
        (w / "meta" / "postfix-files").write_text(_POSTFIX_FILES)
        # postfix(1) chdirs to the queue folder before postfix-script can create it.
        self.queue_dir.mkdir(exist_ok=True)
        os.chmod(self.queue_dir, 0o755)
        folder = self.cert_dir / self.names[0]
        self.conf.write_text(f"""compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {w / 'data'}
meta_directory = {w / 'meta'}
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.names[0]}
mydomain = certbatch.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtputf8_enable = no
alias_maps =
alias_database =
maillog_file = {self.log}
maillog_file_prefixes = {w}
smtpd_tls_security_level = may
smtpd_tls_chain_files = {folder / 'privkey.pem'}, {folder / 'fullchain.pem'}
""")
        (self.conf_dir / "master.cf").write_text(_POSTFIX_MASTER_CF.format(port=self.port))

    def _start_command(self) -> list[str]:
        return [POSTFIX_BIN, "-c", str(self.conf_dir), "start"]

    def _master_pid(self) -> int | None:
        return _read_pid(self.queue_dir / "pid" / "master.pid")

    def _stop_master(self, pid: int, timeout: float) -> None:
        # postfix stop: SIGTERM to the master, which ends its children; it waits up to 5 s.
        subprocess.run([POSTFIX_BIN, "-c", str(self.conf_dir), "stop"], capture_output=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)

    def served_serial(self, name: str | None = None) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as smtp:
            smtp.ehlo("probe.certbatch.test")
            if not smtp.has_extn("starttls"):
                raise smtplib.SMTPException("no STARTTLS offered")
            smtp.starttls(context=ctx)
            der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def hook_env(self) -> dict[str, str]:
        return {"MAIL_CERT_DIR": str(self.cert_dir),
                "POSTFIX_RELOAD_CMD": f"{POSTFIX_BIN} -c {shlex.quote(str(self.conf_dir))} reload",
                "DOVECOT_RELOAD_CMD": ""}


# -- Dovecot ------------------------------------------------------------------------------

class DovecotServer(_Daemon):
    name = "dovecot"
    cert_subdir = "mail-certs"

    def __init__(self, name: str, workdir: Path | None = None,
                 cert_dir: Path | None = None) -> None:
        super().__init__([name], workdir)
        if cert_dir is not None:
            self.cert_dir = Path(cert_dir)
        self.conf = self.workdir / "dovecot.conf"
        self.base_dir = self.workdir / "dovecot-run"
        self.log = self.workdir / "dovecot.log"

    @staticmethod
    def missing() -> str | None:
        return _missing([DOVECOT_BIN, DOVEADM_BIN, "/usr/lib/dovecot/doveadm-server"],
                        ["dovecot", "dovenull"])

    def _write_config(self) -> None:
        w = self.workdir
        folder = self.cert_dir / self.names[0]
        # The doveadm listener needs a password for its (unused) authentication; passdb and
        # userdb only have to exist.
        self.conf.write_text(f"""base_dir = {self.base_dir}
state_dir = {w / 'dovecot-state'}
log_path = {self.log}
info_log_path = {self.log}
protocols =
listen = 127.0.0.1
ssl = yes
ssl_cert = <{folder / 'fullchain.pem'}
ssl_key = <{folder / 'privkey.pem'}
default_internal_user = dovecot
default_login_user = dovenull
doveadm_password = certbatch-test
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={w / 'dovecot-home'}
}}
service doveadm {{
  inet_listener {{
    address = 127.0.0.1
    port = {self.port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
""")

    def _start_command(self) -> list[str]:
        return [DOVECOT_BIN, "-c", str(self.conf)]

    def _master_pid(self) -> int | None:
        return _read_pid(self.base_dir / "master.pid")

    def hook_env(self) -> dict[str, str]:
        return {"MAIL_CERT_DIR": str(self.cert_dir),
                "DOVECOT_RELOAD_CMD": f"{DOVEADM_BIN} -c {shlex.quote(str(self.conf))} reload",
                "POSTFIX_RELOAD_CMD": ""}


class MailServers:
    """Postfix and Dovecot with one certificate folder: the postfix-dovecot hook's setup."""

    def __init__(self, name: str, workdir: Path | None = None) -> None:
        self.postfix = PostfixServer(name, workdir)
        self.cert_dir = self.postfix.cert_dir
        self.dovecot = DovecotServer(name, self.postfix.workdir, cert_dir=self.cert_dir)
        self.dovecot._own_workdir = False  # postfix's stop removes the shared folder
        self.names = [name]

    @staticmethod
    def missing() -> str | None:
        return PostfixServer.missing() or DovecotServer.missing()

    def install(self, name: str, issued: Issued) -> None:
        self.postfix.install(name, issued)

    def start(self, timeout: float = 20) -> MailServers:
        self.postfix.start(timeout)
        try:
            self.dovecot.start(timeout)
        except BaseException:
            self.postfix.stop()
            raise
        return self

    def stop(self, timeout: float = 10) -> None:
        try:
            self.dovecot.stop(timeout)
        finally:
            self.postfix.stop(timeout)

    def __enter__(self) -> MailServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def served_serials(self) -> tuple[int, int]:
        return self.postfix.served_serial(), self.dovecot.served_serial()

    def wait_for_serial(self, serial: int, timeout: float = 5) -> tuple[int, int]:
        return (self.postfix.wait_for_serial(serial, timeout=timeout),
                self.dovecot.wait_for_serial(serial, timeout=timeout))

    def hook_env(self) -> dict[str, str]:
        return {**self.postfix.hook_env(), **self.dovecot.hook_env(),
                "POSTFIX_RELOAD_CMD": self.postfix.hook_env()["POSTFIX_RELOAD_CMD"],
                "DOVECOT_RELOAD_CMD": self.dovecot.hook_env()["DOVECOT_RELOAD_CMD"]}

    def log_tail(self, n: int = 40) -> str:
        return f"{self.postfix.log_tail(n)}\n{self.dovecot.log_tail(n)}"


# -- running a notify hook as a certbatch target ------------------------------------------

def _utc(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_spool(spool: Path, entries: Mapping[str, Issued]) -> Path:
    """`spool`/pending/<name>/ for every entry, as certbatch stages it; returns `spool`."""
    now = _utc(dt.datetime.now(dt.timezone.utc))
    for name, issued in entries.items():
        folder = spool / "pending" / name
        folder.mkdir(parents=True, exist_ok=True)
        for file, data, mode in (("privkey.pem", issued.key_pem, 0o600),
                                 ("cert.pem", issued.cert_pem, 0o644),
                                 ("chain.pem", issued.chain_pem, 0o644),
                                 ("fullchain.pem", issued.fullchain_pem, 0o644)):
            (folder / file).write_bytes(data)
            os.chmod(folder / file, mode)
        (folder / "meta.json").write_text(json.dumps({
            "version": 1, "name": name, "domains": list(issued.names),
            "serial": format(issued.serial, "x"), "not_before": _utc(issued.not_before),
            "not_after": _utc(issued.not_after), "staged_at": now}, indent=2) + "\n")
    return spool


def run_notify_hook(script: str | Path, spool: Path, names: Sequence[str],
                    settings: Mapping[str, str], target: str | None = None,
                    legacy_names: bool = False,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a notify hook with the target contract; see the module docstring."""
    path = Path(script) if os.sep in str(script) else HOOKS / "notify.d" / str(script)
    target = target or path.name
    batch_dir = spool.parent / f"{spool.name}-target-{target}"
    batch_dir.mkdir(parents=True, exist_ok=True)
    names_file = batch_dir / "names"
    names_file.write_text("".join(f"{n}\n" for n in names))
    batch_file = batch_dir / "batch.json"
    batch_file.write_text(json.dumps({
        "version": 1, "batch_id": "20261122T101500123456Z-3f9a1c", "target": target,
        "created_at": _utc(dt.datetime.now(dt.timezone.utc)), "spool_dir": str(spool),
        "count": len(names), "names": list(names), "failed_names": [],
        "certificates": [{"name": n, "folder": str(spool / "pending" / n)} for n in names],
    }, indent=2) + "\n")
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **settings,
           "CERTBATCH_SPOOL_DIR": str(spool), "CERTBATCH_BATCH_FILE": str(batch_file),
           "CERTBATCH_COUNT": str(len(names)), "CERTBATCH_FAILED_NAMES": ""}
    if legacy_names:
        env["CERTBATCH_NAMES"] = " ".join(names)
    else:
        env.update(CERTBATCH_NAMES_FILE=str(names_file), CERTBATCH_NAMES_TRUNCATED="1",
                   CERTBATCH_TARGET=target)
    return subprocess.run([str(path)], cwd=spool, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
