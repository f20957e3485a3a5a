"""`certbatch init`: a starter config that loads, folders with the right modes, never an
overwrite, no network."""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import REPO, run

from certbatch import config, init
from certbatch.errors import UsageError


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("certbatch init touched the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_writes_a_config_that_loads_and_its_folders(tmp_path: Path, no_network: None) -> None:
    old = os.umask(0)  # the modes do not depend on the umask
    try:
        result = init.run(tmp_path / "etc" / "certbatch.yaml", email="ops@example.com",
                          domains=("www.example.com", "example.com"),
                          webroot=str(tmp_path / "my acme"))
    finally:
        os.umask(old)

    cfg = tmp_path / "etc" / "certbatch.yaml"
    assert result.config == cfg and mode(cfg) == 0o600
    settings = config.load(cfg)
    assert settings.acme.directory == init.LETSENCRYPT
    assert settings.acme.email == "ops@example.com"
    (cert,) = settings.certificates.values()
    assert cert.name == "www.example.com" and cert.domains == ("www.example.com", "example.com")
    assert cert.challenge.type == "http-01" and cert.challenge.webroot == tmp_path / "my acme"
    here = tmp_path / "etc"
    assert (settings.paths.state, settings.paths.spool, settings.paths.hooks) == (
        here / "state", here / "spool", here / "hooks")
    made = [f.path for f in result.folders]
    assert made == [here / "state", here / "spool", here / "hooks", here / "hooks" / "deploy.d",
                    here / "hooks" / "notify.d"]
    assert all(f.created for f in result.folders)
    for folder in made:
        assert mode(folder) == 0o700, folder
    # nothing copied: the folders are empty, the config is the only file
    assert sorted(p.name for p in here.iterdir()) == ["certbatch.yaml", "hooks", "spool", "state"]
    assert not any((here / "hooks" / "deploy.d").iterdir())
    assert not any((here / "hooks" / "notify.d").iterdir())
    assert not (tmp_path / "my acme").exists()  # the webroot is the web server's: a note says so
    assert any("my acme" in n for n in result.notes)

    assert result.next_commands == [f"certbatch -c {cfg} check --online",
                                    f"certbatch -c {cfg} renew --dry-run",
                                    f"certbatch -c {cfg} renew"]
    assert result.cron_line.endswith(f"certbatch -c {cfg} renew --jitter 3600")


def test_every_written_key_is_explained_and_the_docs_it_names_exist(tmp_path: Path) -> None:
    init.run(tmp_path / "c.yaml", staging=True)
    text = (tmp_path / "c.yaml").read_text()
    assert config.load(tmp_path / "c.yaml").acme.directory == init.LETSENCRYPT_STAGING
    assert init.LETSENCRYPT in text  # the other one, in a comment
    for doc in set(re.findall(r"docs/[a-z-]+\.md", text)):
        assert (REPO / doc).exists(), doc
    assert "docs/configuration.md" in text
    # a comment beside or right above every setting of a section
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"  [a-z_]+:", line):
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), line


def test_dns_script_and_wildcards(tmp_path: Path) -> None:
    init.run(tmp_path / "c.yaml", domains=("*.example.org", "example.org"),
             dns_script="/etc/certbatch/dns-01.sh")
    (cert,) = config.load(tmp_path / "c.yaml").certificates.values()
    assert cert.name == "example.org"
    assert cert.challenge.type == "dns-01"
    assert cert.challenge.script == Path("/etc/certbatch/dns-01.sh")


def test_a_long_first_domain_still_names_the_certificate(tmp_path: Path) -> None:
    long = ".".join(["a" * 40, "b" * 40, "example.org"])  # a valid name of 93 characters
    init.run(tmp_path / "c.yaml", domains=(long,), webroot=str(tmp_path))
    (cert,) = config.load(tmp_path / "c.yaml").certificates.values()
    assert cert.name == long[:64].rstrip(".-") and cert.domains == (long,)


def test_the_cron_line_names_certbatch_by_its_full_path(tmp_path: Path) -> None:
    """cron's PATH is /usr/bin:/bin: a bare `certbatch` in /usr/local/bin would never run."""
    result = init.run(tmp_path / "c.yaml", webroot=str(tmp_path))
    program = result.cron_line.split()[6]
    assert program.startswith("/") and os.access(program, os.X_OK), result.cron_line


def test_relative_paths_on_the_command_line_are_taken_from_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    init.run(Path("etc/a.yaml"), webroot="www")
    init.run(Path("etc/b.yaml"), dns_script="dns.sh")
    (a,) = config.load(tmp_path / "etc" / "a.yaml").certificates.values()
    (b,) = config.load(tmp_path / "etc" / "b.yaml").certificates.values()
    assert a.challenge.webroot == tmp_path / "www"  # not etc/www
    assert b.challenge.script == tmp_path / "dns.sh"


def test_folders_of_ones_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "etc" / "certbatch.yaml"
    done = run(["init", "--state", "data/state", "--spool", str(tmp_path / "q"),
                "--hooks", "hk"], cfg)
    assert done.returncode == 0, done.stderr
    paths = config.load(cfg).paths
    assert (paths.state, paths.spool, paths.hooks) == \
        (tmp_path / "data" / "state", tmp_path / "q", tmp_path / "hk")  # not below etc/
    assert mode(tmp_path / "data" / "state") == 0o700 and (tmp_path / "hk" / "notify.d").is_dir()
    assert f"created {tmp_path / 'q'}/" in done.stdout.splitlines()
    # state and spool must differ: refused before anything is written
    refused = run(["init", "--state", "same", "--spool", "same"], tmp_path / "other.yaml")
    assert refused.returncode == 2 and "paths" in refused.stderr
    assert not (tmp_path / "other.yaml").exists() and not (tmp_path / "same").exists()


def test_system_paths_for_a_config_in_etc_certbatch(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc" / "certbatch"
    monkeypatch.setattr(init, "SYSTEM_CONFIG_DIR", etc)
    monkeypatch.setattr(config, "DEFAULT_STATE", tmp_path / "var" / "lib" / "certbatch")
    monkeypatch.setattr(config, "DEFAULT_SPOOL", tmp_path / "var" / "spool" / "certbatch")
    monkeypatch.setattr(config, "DEFAULT_HOOKS", etc / "hooks")
    result = init.run(etc / "certbatch.yaml")
    settings = config.load(etc / "certbatch.yaml")
    assert settings.paths.state == tmp_path / "var" / "lib" / "certbatch"
    assert settings.paths.hooks == etc / "hooks"
    assert result.next_commands[0] == "certbatch check --online"  # the default path: no -c
    assert mode(tmp_path / "var" / "spool" / "certbatch") == 0o700


def test_refuses_to_overwrite_and_keeps_existing_folders(tmp_path: Path) -> None:
    cfg = tmp_path / "certbatch.yaml"
    cfg.write_text("mine\n")
    with pytest.raises(UsageError, match="exists"):
        init.run(cfg)
    assert cfg.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certbatch.yaml"]  # nothing created

    (tmp_path / "state").mkdir(mode=0o700)
    result = init.run(tmp_path / "other.yaml")
    assert [f.created for f in result.folders] == [False, True, True, True, True]


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="exclude each other"):
        init.run(tmp_path / "c.yaml", webroot="/w", dns_script="/s")
    with pytest.raises(UsageError, match="acme.email"):
        init.run(tmp_path / "c.yaml", email="not-an-address")
    with pytest.raises(UsageError, match="dns-01"):  # a wildcard needs dns-01
        init.run(tmp_path / "c.yaml", domains=("*.example.org",))
    assert not any(tmp_path.iterdir())


def test_the_command(tmp_path: Path) -> None:
    cfg = tmp_path / "certbatch.yaml"
    webroot = tmp_path / "www"
    webroot.mkdir()
    done = run(["init", "--email", "ops@example.com", "--domain", "example.com",
                "--webroot", str(webroot), "--staging"], cfg)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == f"wrote {cfg} (mode 0600)"
    assert f"  certbatch -c {cfg} check --online" in lines
    assert f"  certbatch -c {cfg} renew --dry-run" in lines
    assert f"  certbatch -c {cfg} renew" in lines
    assert any(line.strip().startswith("17 3,15 * * *") for line in lines)

    # what it wrote works offline: check (no --online) finds nothing wrong, the dry run plans
    checked = run(["check"], cfg)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    planned = run(["renew", "--dry-run"], cfg)
    assert planned.returncode == 0, planned.stderr
    assert "issue" in planned.stdout

    again = run(["init"], cfg)
    assert again.returncode == 2 and "exists" in again.stderr
    both = run(["init", "--webroot", "/w", "--dns-script", "/s"], tmp_path / "x.yaml")
    assert both.returncode == 2 and "exclude each other" in both.stderr
    assert not (tmp_path / "x.yaml").exists()
