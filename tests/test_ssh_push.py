"""The ssh-push notify hook (hooks/notify.d/ssh-push) against real sshd servers (sshd_server.py).

The script runs as certbatch runs a target: directly, with the spool as working directory, stdin
/dev/null, its own session, certbatch's environment plus the CERTBATCH_* variables and the
target's SSH_PUSH_* settings. The "remote host" is an sshd on 127.0.0.1 started by this module,
so the remote folders are local paths the tests can inspect. A few checks that must show that
nothing was even attempted use a recording stand-in for the ssh program instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from nginx_server import TestCA, gone
from sshd_server import SshServer, require_sshd

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "hooks" / "notify.d" / "ssh-push"
DEFAULT_FILES = ("fullchain.pem", "privkey.pem")


# -- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """The host that is up: one sshd for the whole module."""
    require_sshd()
    srv = SshServer(tmp_path_factory.mktemp("sshd-up"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A second host, not started: down until a test starts it (stopped at module end)."""
    require_sshd()
    srv = SshServer(tmp_path_factory.mktemp("sshd-down"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@dataclass
class Batch:
    spool: Path
    names_file: Path
    names: list[str]

    def entry(self, name: str) -> Path:
        return self.spool / "pending" / name

    def env(self, target: str = "web2") -> dict[str, str]:
        """The CERTBATCH_* variables certbatch gives a notify target for this batch."""
        joined = " ".join(self.names)
        env = {
            "CERTBATCH_SPOOL_DIR": str(self.spool),
            "CERTBATCH_TARGET": target,
            "CERTBATCH_NAMES_FILE": str(self.names_file),
            "CERTBATCH_COUNT": str(len(self.names)),
            "CERTBATCH_BATCH_FILE": str(self.spool / "batch.json"),
            "CERTBATCH_FAILED_NAMES": "",
        }
        if len(joined) > 64 * 1024:
            env["CERTBATCH_NAMES_TRUNCATED"] = "1"
        else:
            env["CERTBATCH_NAMES"] = joined
        return env


def write_entry(folder: Path, files: Mapping[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
        os.chmod(folder / fname, 0o600 if fname in ("privkey.pem", "combined.pem") else 0o644)


def pem_files(name: str, ca: TestCA | None = None, tag: str = "1") -> dict[str, bytes]:
    """A pending entry's files: real ones from `ca`, or small PEM-looking ones."""
    if ca is not None:
        issued = ca.issue([f"{name}.test"])
        key, cert, chain = issued.key_pem, issued.cert_pem, issued.chain_pem
    else:
        key = f"-----BEGIN PRIVATE KEY-----\n{name} {tag}\n-----END PRIVATE KEY-----\n".encode()
        cert = f"-----BEGIN CERTIFICATE-----\n{name} {tag}\n-----END CERTIFICATE-----\n".encode()
        chain = b"-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n"
    meta = {"version": 1, "name": name, "domains": [f"{name}.test"], "serial": tag}
    return {"privkey.pem": key, "cert.pem": cert, "chain.pem": chain,
            "fullchain.pem": cert + chain, "meta.json": json.dumps(meta).encode()}


def make_batch(root: Path, entries: Mapping[str, Mapping[str, bytes]],
               names: Sequence[str] | None = None) -> Batch:
    """A spool under `root` with pending/<name>/ for each entry, a batch.json and a names file
    (listing `names`, default the entries' names)."""
    spool = root / "spool"
    (spool / "pending").mkdir(parents=True, exist_ok=True)
    os.chmod(spool, 0o700)
    for name, files in entries.items():
        write_entry(spool / "pending" / name, files)
    listed = list(names) if names is not None else sorted(entries)
    names_file = root / "names"
    names_file.write_text("".join(f"{n}\n" for n in listed))
    (spool / "batch.json").write_text(json.dumps({"version": 1, "names": listed}))
    return Batch(spool, names_file, listed)


def hook_env(batch: Batch, settings: Mapping[str, str], tmpdir: Path,
             target: str = "web2") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SSH_PUSH_", "CERTBATCH_"))}
    env.update(batch.env(target))
    env.update(settings)
    tmpdir.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmpdir)  # so the tests can see that the hook leaves nothing behind
    return env


def start_hook(env: Mapping[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([str(HOOK)], cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"hook timed out\nstdout:\n{out}\nstderr:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_hook(batch: Batch, settings: Mapping[str, str], tmp_path: Path,
             target: str = "web2", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = hook_env(batch, settings, tmp_path / "hook-tmp", target)
    return finish(start_hook(env, batch.spool), timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def assert_installed(remote: Path, batch: Batch, files: Sequence[str] = DEFAULT_FILES) -> None:
    for name in batch.names:
        folder = remote / name
        assert mode(folder) == 0o700, name
        assert sorted(os.listdir(folder)) == sorted(files), name
        for fname in files:
            installed, staged = folder / fname, batch.entry(name) / fname
            assert installed.read_bytes() == staged.read_bytes(), f"{name}/{fname}"
            assert mode(installed) == mode(staged), f"{name}/{fname}"
            assert installed.stat().st_uid == os.geteuid()


def assert_no_temp_left(remote: Path, tmp_path: Path) -> None:
    if remote.exists():
        assert not [p for p in os.listdir(remote) if p.startswith(".ssh-push.")]
    hook_tmp = tmp_path / "hook-tmp"
    assert not hook_tmp.exists() or os.listdir(hook_tmp) == []


def recording_ssh(folder: Path) -> Path:
    """A stand-in ssh program: records its arguments (NUL-separated) and its stdin, exits 0."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "ssh"
    script.write_text(f"""#!/bin/sh
printf '%s\\0' "$@" >{shlex.quote(str(folder / 'args'))}
cat >{shlex.quote(str(folder / 'stdin'))}
""")
    os.chmod(script, 0o755)
    return script


def reload_cmd(log: Path, word: str = "reload") -> str:
    return f"echo {word} >> {shlex.quote(str(log))}"


# -- installing -------------------------------------------------------------------------------

def test_installs_files_with_modes_and_reloads_once(server: SshServer, ca: TestCA,
                                                    tmp_path: Path) -> None:
    names = ["api", "mail.example", "www"]
    batch = make_batch(tmp_path, {n: pem_files(n, ca) for n in names})
    if os.geteuid() == 0:  # spool files of another owner: the remote copies are the remote user's
        for path in batch.entry("www").iterdir():
            os.chown(path, 65534, 65534)
    remote = tmp_path / "remote" / "certs"  # does not exist yet
    reloads = tmp_path / "reloads"

    proc = run_hook(batch, server.hook_env(remote, reload_cmd(reloads)), tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert last_line(proc.stdout) == "ssh-push: 127.0.0.1: installed 3 certificate(s); reloaded"
    assert_installed(remote, batch)  # content, modes as staged, owner
    assert mode(remote / "www" / "privkey.pem") == 0o600
    assert mode(remote / "www" / "fullchain.pem") == 0o644
    assert mode(remote) == 0o700  # created by the hook
    assert sorted(os.listdir(remote)) == [".prev", *names]
    assert os.listdir(remote / ".prev") == []  # nothing was replaced
    assert reloads.read_text() == "reload\n"  # once, after all files
    assert_no_temp_left(remote, tmp_path)


def test_rerun_is_idempotent_and_replaces_whole_folders(server: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    reloads = tmp_path / "reloads"
    settings = server.hook_env(remote, reload_cmd(reloads))
    batch = make_batch(tmp_path / "b1", {n: pem_files(n, tag="1") for n in ("api", "www")})

    for _ in range(2):  # the same batch twice (a retry): same result
        proc = run_hook(batch, settings, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert_installed(remote, batch)
    assert reloads.read_text() == "reload\nreload\n"
    api_inode = (remote / "api").stat().st_ino
    old_www = (remote / "www" / "fullchain.pem").read_bytes()

    # A later batch with only www, a new certificate, one more file: www's folder is replaced
    # as a whole, the previous one is kept in .prev/, api is not touched.
    files = (*DEFAULT_FILES, "cert.pem")
    batch2 = make_batch(tmp_path / "b2", {"www": pem_files("www", tag="2")})
    proc = run_hook(batch2, {**settings, "SSH_PUSH_FILES": " ".join(files)}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_installed(remote, batch2, files)
    assert (remote / "api").stat().st_ino == api_inode
    assert os.listdir(remote / ".prev") == ["www"]
    assert (remote / ".prev" / "www" / "fullchain.pem").read_bytes() == old_www
    assert reloads.read_text() == "reload\n" * 3
    assert_no_temp_left(remote, tmp_path)


def test_no_reload_setting(server: SshServer, tmp_path: Path) -> None:
    batch = make_batch(tmp_path, {"www": pem_files("www")})
    proc = run_hook(batch, server.hook_env(tmp_path / "remote"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert last_line(proc.stdout) == "ssh-push: 127.0.0.1: installed 1 certificate(s)"
    assert_installed(tmp_path / "remote", batch)


def test_two_hosts_one_down(server: SshServer, second: SshServer, tmp_path: Path) -> None:
    """Two targets, run in parallel: the one whose host is down fails alone and cleanly."""
    batch = make_batch(tmp_path, {n: pem_files(n) for n in ("api", "www")})
    up_dir, down_dir = tmp_path / "up", tmp_path / "down"
    up_log, down_log = tmp_path / "up-reloads", tmp_path / "down-reloads"
    assert not second.running
    procs = [start_hook(hook_env(batch, srv.hook_env(d, reload_cmd(log)), tmp_path / "hook-tmp",
                                 target), batch.spool)
             for srv, d, log, target in ((server, up_dir, up_log, "web1"),
                                         (second, down_dir, down_log, "web2"))]
    up, down = (finish(p) for p in procs)

    assert up.returncode == 0, up.stderr
    assert_installed(up_dir, batch)
    assert up_log.read_text() == "reload\n"

    assert down.returncode != 0
    line = last_line(down.stderr)
    assert line.startswith("ssh-push: 127.0.0.1: ssh failed: "), down.stderr
    assert f"port {second.port}" in line and "Connection refused" in line, line
    assert not down_dir.exists() and not down_log.exists()
    assert_no_temp_left(up_dir, tmp_path)

    second.start()  # the host is back: the retry installs everything
    proc = run_hook(batch, second.hook_env(down_dir, reload_cmd(down_log)), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_installed(down_dir, batch)
    assert down_log.read_text() == "reload\n"
    assert up_log.read_text() == "reload\n"  # the other target was not run again


@pytest.mark.parametrize("case", ["not-listed", "wrong-key"])
def test_unknown_host_key_copies_nothing(server: SshServer, second: SshServer, tmp_path: Path,
                                         case: str) -> None:
    known_hosts = tmp_path / "known_hosts"
    if case == "not-listed":  # known_hosts lacks the host (it has the other server only)
        known_hosts.write_text(second.known_hosts_line() + "\n")
    else:  # the host's address with another key: a man in the middle, or a reinstalled host
        known_hosts.write_text(server.known_hosts_line(second.host_public_key) + "\n")
    batch = make_batch(tmp_path, {"www": pem_files("www")})
    remote, reloads = tmp_path / "remote", tmp_path / "reloads"
    settings = {**server.hook_env(remote, reload_cmd(reloads)),
                "SSH_PUSH_KNOWN_HOSTS": str(known_hosts)}

    proc = run_hook(batch, settings, tmp_path)

    assert proc.returncode != 0
    assert last_line(proc.stderr) == (
        "ssh-push: 127.0.0.1: ssh failed: Host key verification failed."), proc.stderr
    assert not remote.exists() and not reloads.exists()
    assert known_hosts.read_text().count("\n") == 1  # never updated
    assert_no_temp_left(remote, tmp_path)


# -- refusing bad input before connecting -----------------------------------------------------

@pytest.mark.parametrize("bad", [
    "../x", "a b", "$(touch pwn)", "$(touch {tmp}/pwn)", "`touch pwn`", "x;touch pwn", "-rf",
    ".hidden", "Www", "a/b", "", "tab\there", "caf\u00e9", "x\r",
])
def test_hostile_name_is_refused_before_connecting(server: SshServer, tmp_path: Path,
                                                   bad: str) -> None:
    bad = bad.replace("{tmp}", str(tmp_path))
    batch = make_batch(tmp_path, {"api": pem_files("api")}, names=["api", bad, "www"])
    # Give the bad name an entry where it can have one, so only the name check stops it.
    with contextlib.suppress(OSError):
        write_entry(batch.spool / "pending" / bad, pem_files("bad"))
    write_entry(batch.spool / "pending" / "www", pem_files("www"))
    fake = recording_ssh(tmp_path / "fake-ssh")
    remote = tmp_path / "remote"
    settings = {**server.hook_env(remote, "touch pwn"), "SSH_PUSH_SSH": str(fake)}

    proc = run_hook(batch, settings, tmp_path)

    assert proc.returncode == 1
    assert last_line(proc.stderr).startswith("ssh-push: 127.0.0.1: invalid certificate name "), \
        proc.stderr
    assert not (fake.parent / "args").exists()  # ssh was never started
    assert not remote.exists()
    assert not list(tmp_path.rglob("pwn")) and not (Path.home() / "pwn").exists()
    assert_no_temp_left(remote, tmp_path)


def test_missing_file_fails_before_connecting(server: SshServer, tmp_path: Path) -> None:
    entries = {n: pem_files(n) for n in ("api", "www")}
    entries["api"]["combined.pem"] = entries["api"]["privkey.pem"] + entries["api"]["fullchain.pem"]
    batch = make_batch(tmp_path, entries)  # www has no combined.pem
    fake = recording_ssh(tmp_path / "fake-ssh")
    settings = {**server.hook_env(tmp_path / "remote"), "SSH_PUSH_SSH": str(fake),
                "SSH_PUSH_FILES": "combined.pem fullchain.pem"}

    proc = run_hook(batch, settings, tmp_path)

    assert proc.returncode == 1
    line = last_line(proc.stderr)
    assert line.startswith("ssh-push: 127.0.0.1: missing "), proc.stderr
    assert f"{batch.spool}/pending/www/combined.pem" in line
    assert not (fake.parent / "args").exists()


@pytest.mark.parametrize("setting, value, message", [
    ("SSH_PUSH_HOST", None, "ssh-push: target web2: SSH_PUSH_HOST is not set"),
    ("SSH_PUSH_HOST", "", "ssh-push: target web2: SSH_PUSH_HOST is not set"),
    ("SSH_PUSH_HOST", "-oProxyCommand=touch pwn", "SSH_PUSH_HOST is not a host name"),
    ("SSH_PUSH_PORT", "22x", "SSH_PUSH_PORT is not a port number"),
    ("SSH_PUSH_FILES", "../privkey.pem", "SSH_PUSH_FILES: not a plain file name"),
    ("SSH_PUSH_DIR", "/", "SSH_PUSH_DIR must not be /"),
    ("SSH_PUSH_IDENTITY", "/nonexistent/key", "SSH_PUSH_IDENTITY: no readable file"),
    ("SSH_PUSH_KNOWN_HOSTS", '/tmp/a"b', "SSH_PUSH_KNOWN_HOSTS must not contain"),
    ("SSH_PUSH_CONNECT_TIMEOUT", "soon", "SSH_PUSH_CONNECT_TIMEOUT must be a number"),
])
def test_bad_setting_fails_clearly_before_connecting(server: SshServer, tmp_path: Path,
                                                     setting: str, value: str | None,
                                                     message: str) -> None:
    batch = make_batch(tmp_path, {"www": pem_files("www")})
    fake = recording_ssh(tmp_path / "fake-ssh")
    settings = {**server.hook_env(tmp_path / "remote"), "SSH_PUSH_SSH": str(fake)}
    if value is None:
        del settings[setting]
    else:
        settings[setting] = value

    proc = run_hook(batch, settings, tmp_path)

    assert proc.returncode == 1
    assert message in last_line(proc.stderr), proc.stderr
    assert not (fake.parent / "args").exists()
    assert not list(tmp_path.rglob("pwn"))


def test_names_never_reach_a_command_line(tmp_path: Path) -> None:
    """What ssh is given: the safety options, a fixed command, the names only inside the tar."""
    names = ["api", "www.example"]
    batch = make_batch(tmp_path, {n: pem_files(n) for n in names})
    fake = recording_ssh(tmp_path / "fake-ssh")
    settings = {"SSH_PUSH_HOST": "web2.example.com", "SSH_PUSH_SSH": str(fake)}

    proc = run_hook(batch, settings, tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert last_line(proc.stdout) == "ssh-push: web2.example.com: installed 2 certificate(s)"
    args = (fake.parent / "args").read_bytes().split(b"\0")[:-1]
    text = [a.decode() for a in args]
    for option in ("BatchMode=yes", "StrictHostKeyChecking=yes", "ConnectTimeout=10",
                   "ServerAliveInterval=10", "ControlMaster=no"):
        assert option in text
    assert "-p" not in text and "-l" not in text  # the ssh config's (or ssh's) defaults
    assert text[-3:-1] == ["--", "web2.example.com"]
    command = text[-1]
    assert command.startswith("sh -c '")
    assert command.endswith(" ssh-push '/etc/ssl/certbatch' '' 2 fullchain.pem privkey.pem")
    for name in names:
        assert name not in command
    with tarfile.open(fake.parent / "stdin") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == [f"{n}/{f}" for n in names for f in DEFAULT_FILES]
        assert members["api/privkey.pem"].mode == 0o600
        assert tar.extractfile("www.example/fullchain.pem").read() == (  # type: ignore[union-attr]
            batch.entry("www.example") / "fullchain.pem").read_bytes()


def test_empty_batch_does_not_connect(tmp_path: Path) -> None:
    batch = make_batch(tmp_path, {}, names=[])
    fake = recording_ssh(tmp_path / "fake-ssh")
    proc = run_hook(batch, {"SSH_PUSH_HOST": "web2.example.com", "SSH_PUSH_SSH": str(fake)},
                    tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to install" in proc.stdout
    assert not (fake.parent / "args").exists()


def test_identity_and_known_hosts_paths_with_space_and_percent(server: SshServer,
                                                                tmp_path: Path) -> None:
    """ssh's config parser sees these paths: spaces must be quoted and % escaped for it."""
    keys = tmp_path / "keys 100%"
    keys.mkdir()
    identity, known_hosts = keys / "id %h %%", keys / "known hosts %d"
    identity.write_bytes(server.identity.read_bytes())
    os.chmod(identity, 0o600)
    known_hosts.write_bytes(server.known_hosts.read_bytes())
    batch = make_batch(tmp_path, {"www": pem_files("www")})
    settings = {**server.hook_env(tmp_path / "remote"), "SSH_PUSH_IDENTITY": str(identity),
                "SSH_PUSH_KNOWN_HOSTS": str(known_hosts)}

    proc = run_hook(batch, settings, tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert_installed(tmp_path / "remote", batch)


def test_timeout_kill_leaves_nothing_behind(server: SshServer, tmp_path: Path) -> None:
    """certbatch's timeout SIGTERMs the hook's process group: the hook cleans up and says so."""
    batch = make_batch(tmp_path, {"www": pem_files("www")})
    started = tmp_path / "ssh-started"
    slow = tmp_path / "slow-ssh"
    slow.write_text(f"#!/bin/sh\ntouch {shlex.quote(str(started))}\nexec sleep 30\n")
    os.chmod(slow, 0o755)
    remote = tmp_path / "remote"
    env = hook_env(batch, {**server.hook_env(remote), "SSH_PUSH_SSH": str(slow)},
                   tmp_path / "hook-tmp")
    proc = start_hook(env, batch.spool)
    deadline = time.monotonic() + 10
    while not started.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the ssh stand-in never ran"
        time.sleep(0.02)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    result = finish(proc, timeout=10)

    assert time.monotonic() - t0 < 5
    assert result.returncode == 143
    assert last_line(result.stderr) == "ssh-push: 127.0.0.1: stopped by a signal", result.stderr
    assert not remote.exists()
    assert_no_temp_left(remote, tmp_path)


# -- the remote side ----------------------------------------------------------------------------

def test_weird_characters_in_remote_dir_and_reload(server: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote dir" / "it's $(touch pwn) `touch pwn` \\ ; & \"x\" *"
    reloads = tmp_path / "it's reloads"
    batch = make_batch(tmp_path, {n: pem_files(n) for n in ("api", "www")})
    reload = f"printf '%s\\n' \"it's done\" >> {shlex.quote(str(reloads))}"

    proc = run_hook(batch, server.hook_env(remote, reload), tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert_installed(remote, batch)
    assert sorted(os.listdir(tmp_path / "remote dir")) == [remote.name]
    assert reloads.read_text() == "it's done\n"
    assert not list(tmp_path.rglob("pwn")) and not (Path.home() / "pwn").exists()
    assert_no_temp_left(remote, tmp_path)


@pytest.mark.parametrize("cut", [1024, 1500])  # after the first member; inside the second
def test_stream_cut_short_installs_nothing(server: SshServer, tmp_path: Path, cut: int) -> None:
    """A tar stream that ends early (a lost connection) is noticed before anything is renamed."""
    batch = make_batch(tmp_path, {n: pem_files(n) for n in ("api", "www")})
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "api").mkdir()  # an installed certificate must stay as it is
    cutter = tmp_path / "cutting-ssh"
    cutter.write_text(f"#!/bin/sh\nhead -c {cut} | ssh \"$@\"\n")
    os.chmod(cutter, 0o755)
    reloads = tmp_path / "reloads"
    settings = {**server.hook_env(tmp_path / "remote", reload_cmd(reloads)),
                "SSH_PUSH_SSH": str(cutter)}

    proc = run_hook(batch, settings, tmp_path)

    assert proc.returncode == 1
    line = last_line(proc.stderr)
    assert line.startswith("ssh-push: 127.0.0.1: ")
    assert ("receiving the files failed (tar)" in line
            or "incomplete transfer" in line), proc.stderr
    assert os.listdir(tmp_path / "remote") == ["api"]
    assert os.listdir(tmp_path / "remote" / "api") == []
    assert not reloads.exists()


def test_reload_failure_keeps_files_and_fails(server: SshServer, tmp_path: Path) -> None:
    batch = make_batch(tmp_path, {"www": pem_files("www")})
    remote = tmp_path / "remote"
    reload = "echo 'nginx: [emerg] something is wrong' >&2; exit 3"

    proc = run_hook(batch, server.hook_env(remote, reload), tmp_path)

    assert proc.returncode == 1
    assert last_line(proc.stderr) == (
        f"ssh-push: 127.0.0.1: installed 1 certificate(s) in {remote}, but the reload command "
        "failed (status 3): nginx: [emerg] something is wrong"), proc.stderr
    assert_installed(remote, batch)
    assert_no_temp_left(remote, tmp_path)


def test_remote_dir_that_cannot_be_created(server: SshServer, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder\n")
    remote = tmp_path / "file" / "certs"
    batch = make_batch(tmp_path, {"www": pem_files("www")})

    proc = run_hook(batch, server.hook_env(remote, "touch pwn"), tmp_path)

    assert proc.returncode == 1
    assert last_line(proc.stderr) == (
        f"ssh-push: 127.0.0.1: cannot create or enter folder {remote}"), proc.stderr
    assert not list(tmp_path.rglob("pwn"))


def test_names_from_certbatch_names_without_names_file(server: SshServer,
                                                       tmp_path: Path) -> None:
    """A certbatch that does not set CERTBATCH_NAMES_FILE yet: CERTBATCH_NAMES is used."""
    batch = make_batch(tmp_path, {n: pem_files(n) for n in ("api", "www")})
    env = hook_env(batch, server.hook_env(tmp_path / "remote"), tmp_path / "hook-tmp")
    del env["CERTBATCH_NAMES_FILE"]
    proc = finish(start_hook(env, batch.spool))
    assert proc.returncode == 0, proc.stderr
    assert_installed(tmp_path / "remote", batch)


def test_3000_long_names(server: SshServer, tmp_path: Path) -> None:
    """No argument-length limit anywhere: 3,000 names of 63 characters (one tiny file each)."""
    names = [f"host-{i:05d}.{'a' * 40}.example.org" for i in range(3000)]
    batch = make_batch(tmp_path, {n: {"fullchain.pem": f"{n}\n".encode()} for n in names})
    assert "CERTBATCH_NAMES" not in batch.env()  # over 64 KiB: only the names file
    remote, reloads = tmp_path / "remote", tmp_path / "reloads"
    settings = {**server.hook_env(remote, reload_cmd(reloads)), "SSH_PUSH_FILES": "fullchain.pem"}

    for run in range(2):  # into an empty folder, then replacing all 3,000 folders
        t0 = time.monotonic()
        proc = run_hook(batch, settings, tmp_path)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        assert last_line(proc.stdout) == (
            "ssh-push: 127.0.0.1: installed 3000 certificate(s); reloaded")
        assert elapsed < 20, f"run {run}: {elapsed:.1f} s"
    assert len(os.listdir(remote)) == 3001
    assert len(os.listdir(remote / ".prev")) == 3000
    for name in (names[0], names[1234], names[-1]):
        assert os.listdir(remote / name) == ["fullchain.pem"]
        assert (remote / name / "fullchain.pem").read_text() == f"{name}\n"
        assert (remote / ".prev" / name / "fullchain.pem").read_text() == f"{name}\n"
    assert reloads.read_text() == "reload\nreload\n"
    assert_no_temp_left(remote, tmp_path)


# -- the harness --------------------------------------------------------------------------------

def test_missing_sshd_skips_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTBATCH_REQUIRE_PEBBLE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="/nonexistent/sshd missing"):
        require_sshd("/nonexistent/sshd")
    monkeypatch.setenv("CERTBATCH_REQUIRE_PEBBLE", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install openssh-server"):
        require_sshd("/nonexistent/sshd")


def test_stop_ends_sshd_and_its_sessions(tmp_path: Path) -> None:
    require_sshd()
    srv = SshServer(tmp_path / "sshd")
    with srv:
        session = subprocess.Popen(
            ["ssh", "-T", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={srv.known_hosts}",
             "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"IdentityFile={srv.identity}",
             "-o", "IdentitiesOnly=yes", "-p", str(srv.port), "-l", srv.user, srv.host,
             "echo $$; exec sleep 60"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert session.stdout is not None
        remote_pid = int(session.stdout.readline())
        assert srv.proc is not None
        sshd_pid = srv.proc.pid
        assert not gone(remote_pid)
    assert not srv.running
    session.wait(timeout=10)  # its connection was closed
    session.stdout.close()
    deadline = time.monotonic() + 5
    while not (gone(remote_pid) and gone(sshd_pid)):  # sshd is reaped; the session's
        assert time.monotonic() < deadline, "a process was left running"  # child too
        time.sleep(0.02)
