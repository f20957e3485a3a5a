"""Tests for certbatch.config: loading, defaults, and every validation rule."""

from __future__ import annotations

import copy
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from certbatch import config, config_yaml
from certbatch.config import (
    DEFAULT_HOOKS,
    DEFAULT_SPOOL,
    DEFAULT_STATE,
    EAB,
    AcmeSettings,
    CertificateSettings,
    ChallengeSettings,
    HookSettings,
    PathSettings,
    RenewalSettings,
    Settings,
    find_config,
    load,
)
from certbatch.errors import EXIT_USAGE, ConfigError

REPO = Path(__file__).resolve().parents[1]
LE_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
DELETE = object()  # patch value: remove the key


SECRET = "c2VjcmV0IHNlY3JldCBzZWNyZXQ="
RFC2136 = {"type": "dns-01", "provider": "rfc2136", "server": "192.0.2.53",
           "tsig_key": "certbatch", "tsig_secret": SECRET}
LEXICON = {"type": "dns-01", "provider": "lexicon", "lexicon_provider": "cloudflare",
           "credentials": {"auth_token": SECRET}}
ACMEDNS = {"type": "dns-01", "provider": "acme-dns", "api": "https://auth.example.org",
           "accounts_file": "acme-dns.json"}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A config folder with a webroot, an executable DNS script, a plain file and a CA bundle."""
    (tmp_path / "www").mkdir()
    script = tmp_path / "dns.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    noexec = tmp_path / "noexec.sh"
    noexec.write_text("#!/bin/sh\n")
    noexec.chmod(0o644)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    return tmp_path


def base() -> dict[str, Any]:
    """A small valid config, as data; tests patch it."""
    return {
        "acme": {"directory": LE_DIRECTORY},
        "defaults": {"challenge": {"type": "http-01", "webroot": "www"}},
        "certificates": {"example": {"domains": ["example.com", "www.example.com"]}},
    }


def patched(patches: dict[str, Any]) -> dict[str, Any]:
    """base() with dotted-path keys set (or removed with DELETE). Path parts split on '/'."""
    data = copy.deepcopy(base())
    for dotted, value in patches.items():
        parts = dotted.split("/")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is DELETE:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
    return data


def write(folder: Path, content: str | dict[str, Any], name: str = "certbatch.yaml") -> Path:
    path = folder / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def config_error(path: Path, key: str, problem: str) -> ConfigError:
    """Load `path`, expecting a one-line ConfigError for `key` that mentions `problem`."""
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    msg = str(err)
    assert "\n" not in msg
    assert err.key == key, msg
    assert msg.startswith(f"{path}: {key}: " if key else f"{path}: "), msg
    assert path.name in msg
    assert problem in msg, msg
    assert err.exit_code == EXIT_USAGE
    return err


# --- a good config -------------------------------------------------------------------------------

FULL = """\
acme:
  directory: https://acme.example.net/dir
  email: ops@example.com
  ca_bundle: ./ca.pem
  eab: {kid: kid-1, hmac_key: c2VjcmV0}
  timeout: 45s
paths:
  state: ./state
  spool: /srv/spool
  hooks: hooks
renewal:
  before_expiry: 30d
  workers: 8
  deadline: 10m
  jitter: 90
hooks:
  notify: systemctl reload nginx
  deploy_timeout: 1.5m
  notify_timeout: 2h
logging:
  file: log/certbatch.log
metrics:
  file: /var/lib/node_exporter/textfile/certbatch.prom
defaults:
  key: ec-p384
  challenge: {type: http-01, webroot: ./www}
  deploy: ./hooks/my-deploy.sh
certificates:
  zeta:
    domains: [Zeta.Example.COM, www.zeta.example.com]
  api:
    domains: [api.example.com, "*.api.example.com"]
    key: rsa-2048
    challenge: {type: dns-01, script: ./dns.sh, wait: 0}
    deploy: [/usr/local/bin/x, --flag]
  alpha:
    domains: [alpha.example.com]
    challenge: {type: http-01, standalone: {port: 8080, address: 127.0.0.1}}
"""


def test_full_config_loads_into_exact_settings(site: Path) -> None:
    path = write(site, FULL)
    settings = load(path)
    webroot = ChallengeSettings(type="http-01", webroot=site / "www")
    assert settings == Settings(
        path=path,
        acme=AcmeSettings(directory="https://acme.example.net/dir", email="ops@example.com",
                          ca_bundle=site / "ca.pem", eab=EAB(kid="kid-1", hmac_key="c2VjcmV0"),
                          timeout=45.0),
        paths=PathSettings(state=site / "state", spool=Path("/srv/spool"), hooks=site / "hooks"),
        renewal=RenewalSettings(before_expiry=dt.timedelta(days=30), workers=8, deadline=600.0,
                                jitter=90.0),
        hooks=HookSettings(notify="systemctl reload nginx", deploy_timeout=90.0,
                           notify_timeout=7200.0),
        certificates={
            "zeta": CertificateSettings(
                name="zeta", domains=("zeta.example.com", "www.zeta.example.com"), key="ec-p384",
                challenge=webroot, deploy="./hooks/my-deploy.sh"),
            "api": CertificateSettings(
                name="api", domains=("api.example.com", "*.api.example.com"), key="rsa-2048",
                challenge=ChallengeSettings(type="dns-01", script=site / "dns.sh", wait=0.0),
                deploy=("/usr/local/bin/x", "--flag")),
            "alpha": CertificateSettings(
                name="alpha", domains=("alpha.example.com",), key="ec-p384",
                challenge=ChallengeSettings(type="http-01", standalone_address="127.0.0.1",
                                            standalone_port=8080),
                deploy="./hooks/my-deploy.sh"),
        },
        log_file=site / "log" / "certbatch.log",
        metrics_file=Path("/var/lib/node_exporter/textfile/certbatch.prom"),
    )
    assert list(settings.certificates) == ["zeta", "api", "alpha"]  # config order, not sorted
    assert settings.certificates["alpha"].challenge.standalone
    assert not settings.certificates["zeta"].challenge.standalone


def test_minimal_config_gets_builtin_defaults(site: Path) -> None:
    settings = load(write(site, base()))
    assert settings.acme == AcmeSettings(directory=LE_DIRECTORY)
    assert settings.paths == PathSettings(DEFAULT_STATE, DEFAULT_SPOOL, DEFAULT_HOOKS)
    assert settings.renewal == RenewalSettings(before_expiry=None, workers=16, deadline=600.0,
                                               jitter=0.0)
    assert settings.hooks == HookSettings(notify=None, deploy_timeout=120.0, notify_timeout=300.0)
    assert settings.log_file is None and settings.metrics_file is None
    cert = settings.certificates["example"]
    assert cert.key == "ec-p256"
    assert cert.deploy is None
    assert cert.challenge == ChallengeSettings(type="http-01", webroot=site / "www")


def test_relative_paths_are_relative_to_config_folder_not_cwd(
        site: Path, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(site, patched({"paths/state": "state", "logging/file": "../x.log"}))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    settings = load(os.path.relpath(path))
    assert settings.path == path and settings.path.is_absolute()
    assert settings.paths.state == site / "state"
    assert settings.log_file == site / ".." / "x.log"
    assert settings.certificates["example"].challenge.webroot == site / "www"


def test_null_sections_and_keys_count_as_absent(site: Path) -> None:
    text = (f"acme:\n  directory: {LE_DIRECTORY}\n  email:\npaths:\nrenewal:\n"
            "  before_expiry: null\nhooks:\nlogging:\nmetrics:\n"
            "defaults:\n  challenge: {type: http-01, webroot: www}\n  key:\n"
            "certificates:\n  a:\n    domains: [a.example]\n    deploy:\n")
    settings = load(write(site, text))
    assert settings.acme.email is None
    assert settings.renewal.before_expiry is None
    assert settings.paths.state == DEFAULT_STATE
    assert settings.certificates["a"].key == "ec-p256"


def test_certificate_challenge_replaces_default_wholesale(site: Path) -> None:
    data = patched({"defaults/challenge": {"type": "dns-01", "script": "dns.sh", "wait": "2m"}})
    data["certificates"]["other"] = {"domains": ["o.example.com"],
                                     "challenge": {"type": "dns-01", "script": "dns.sh"}}
    data["certificates"]["web"] = {"domains": ["w.example.com"],
                                   "challenge": {"type": "http-01", "webroot": "www"}}
    certs = load(write(site, data)).certificates
    assert certs["example"].challenge.wait == 120.0  # inherited
    assert certs["other"].challenge.wait == 0.0  # not merged with the default's 2m
    assert certs["web"].challenge == ChallengeSettings(type="http-01", webroot=site / "www")


def test_dns_calls_default_and_per_certificate(site: Path) -> None:
    data = patched({"defaults/challenge": {"type": "dns-01", "script": "dns.sh",
                                           "calls": "per-certificate"}})
    data["certificates"]["other"] = {"domains": ["o.example.com"],
                                     "challenge": {"type": "dns-01", "script": "dns.sh",
                                                   "calls": None}}
    certs = load(write(site, data)).certificates
    assert certs["example"].challenge.calls == "per-certificate"
    assert certs["other"].challenge.calls == "per-record"  # null: the default


def test_defaults_key_and_deploy_are_inherited_unless_set(site: Path) -> None:
    data = patched({"defaults/key": "rsa-4096", "defaults/deploy": ["/bin/deploy", "-q"]})
    data["certificates"]["own"] = {"domains": ["own.example.com"], "key": "ec-p256",
                                   "deploy": "echo hi"}
    certs = load(write(site, data)).certificates
    assert (certs["example"].key, certs["example"].deploy) == ("rsa-4096", ("/bin/deploy", "-q"))
    assert (certs["own"].key, certs["own"].deploy) == ("ec-p256", "echo hi")


def test_yaml_anchors_and_merge_keys_work(site: Path) -> None:
    text = (f"acme: {{directory: {LE_DIRECTORY}}}\n"
            "defaults:\n  challenge: &web {type: http-01, webroot: www}\n"
            "certificates:\n"
            "  a: &tmpl\n    domains: [a.example.com]\n    key: rsa-2048\n"
            "  b:\n    <<: *tmpl\n    domains: [b.example.com]\n"
            "  c: {domains: [c.example.com], challenge: *web}\n")
    certs = load(write(site, text)).certificates
    assert certs["b"].domains == ("b.example.com",)  # overriding a merged key is not a duplicate
    assert certs["b"].key == "rsa-2048"
    assert certs["c"].challenge.webroot == site / "www"


# --- durations -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    (30, 30.0), (1.5, 1.5), (0, 0.0), ("45s", 45.0), ("10m", 600.0), ("12h", 43200.0),
    ("30d", 2592000.0), ("2w", 1209600.0), ("90", 90.0), ("1.5h", 5400.0), (".5m", 30.0),
])
def test_duration_forms(site: Path, value: Any, seconds: float) -> None:
    settings = load(write(site, patched({"renewal/jitter": value})))
    assert settings.renewal.jitter == seconds


def test_before_expiry_is_a_timedelta(site: Path) -> None:
    settings = load(write(site, patched({"renewal/before_expiry": "2w"})))
    assert settings.renewal.before_expiry == dt.timedelta(weeks=2)


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("renewal.jitter", "-5s", "must not be negative"),
    ("renewal.jitter", -1, "must not be negative"),
    ("renewal.jitter", "10M", "not a duration: '10M'"),
    ("renewal.jitter", "1h30m", "not a duration"),
    ("renewal.jitter", "soon", "not a duration: 'soon'"),
    ("renewal.jitter", True, "expected a duration"),
    ("renewal.jitter", [1], "expected a duration"),
    ("renewal.jitter", float("inf"), "must be a finite duration"),
    ("renewal.deadline", 0, "must be greater than zero"),
    ("renewal.before_expiry", "0d", "must be greater than zero"),
    ("renewal.before_expiry", "30x", "not a duration"),
    ("renewal.before_expiry", "99999999999w", "too large"),
    ("acme.timeout", "abc", "not a duration"),
    ("acme.timeout", 0, "must be greater than zero"),
    ("hooks.deploy_timeout", "-1m", "must not be negative"),
    ("hooks.notify_timeout", 0, "must be greater than zero"),
])
def test_bad_durations(site: Path, key: str, value: Any, problem: str) -> None:
    config_error(write(site, patched({key.replace(".", "/"): value})), key, problem)


# --- file-level errors ---------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    config_error(tmp_path / "nope.yaml", "", "file not found")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    (tmp_path / "certbatch.yaml").mkdir()
    config_error(tmp_path / "certbatch.yaml", "", "is a folder")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "acme: {}\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    # chmod 000 does not stop root, who runs these tests in CI.
    monkeypatch.setattr(Path, "read_bytes", denied)
    config_error(path, "", "permission denied")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "certbatch.yaml"
    path.write_bytes(b"acme:\n  email: caf\xe9@example.com\n")
    config_error(path, "", "not UTF-8")


@pytest.mark.parametrize(("text", "problem"), [
    ("acme:\n  directory: [unclosed\ncertificates: {}\n", "invalid YAML at line 3:13"),
    ("acme:\n\tdirectory: x\n", "invalid YAML at line 2:1"),
    ("a: b: c\n", "invalid YAML at line 1:5: mapping values are not allowed"),
    ("--- {}\n--- {}\n", "invalid YAML at line 2:1"),
    ("acme: !!python/object:os.system {}\n", "invalid YAML at line 1:7"),
])
def test_yaml_syntax_errors_have_line_and_column(tmp_path: Path, text: str, problem: str) -> None:
    config_error(write(tmp_path, text), "", problem)


@pytest.mark.parametrize(("text", "problem"), [
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("- acme\n", "the top level must be a mapping, got a list"),
    ("just text\n", "the top level must be a mapping, got a string ('just text')"),
])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, problem: str) -> None:
    config_error(write(tmp_path, text), "", problem)


# --- duplicate keys ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "key", "problem"), [
    (f"acme: {{directory: {LE_DIRECTORY}}}\ncertificates: {{}}\nacme: {{}}\n",
     "acme", "duplicate key (first at line 1, again at line 3)"),
    (f"acme:\n  directory: {LE_DIRECTORY}\n  email: a@b.c\n  'directory': x\n",
     "acme.directory", "first at line 2, again at line 4"),
    ("certificates:\n  example:\n    domains: [a.com]\n    key: rsa-2048\n    domains: [b.com]\n",
     "certificates.example.domains", "duplicate key (first at line 3, again at line 5)"),
    ("certificates:\n  example: {domains: [a.com]}\n  example: {domains: [b.com]}\n",
     "certificates.example", "first at line 2, again at line 3"),
    ("certificates:\n  - x: 1\n  - x: 1\n    x: 2\n",
     "certificates[1].x", "first at line 3, again at line 4"),
    ("defaults:\n  challenge: {type: http-01, webroot: a, type: dns-01}\n",
     "defaults.challenge.type", "first at line 2, again at line 2"),
])
def test_duplicate_keys(tmp_path: Path, text: str, key: str, problem: str) -> None:
    config_error(write(tmp_path, text), key, problem)


# --- unknown keys --------------------------------------------------------------------------------

@pytest.mark.parametrize(("patches", "key", "problem"), [
    ({"certificates/example/domian": ["a.com"]}, "certificates.example.domian",
     "unknown key (did you mean 'domains'?)"),
    ({"certificate": {}}, "certificate", "unknown key (did you mean 'certificates'?)"),
    ({"acme/directroy": "x"}, "acme.directroy", "did you mean 'directory'?"),
    ({"acme/eab": {"kid": "k", "hmac": "h"}}, "acme.eab.hmac", "did you mean 'hmac_key'?"),
    ({"renewal/wrokers": 2}, "renewal.wrokers", "did you mean 'workers'?"),
    ({"paths/stat": "x"}, "paths.stat", "did you mean 'state'?"),
    ({"hooks/notfy": "x"}, "hooks.notfy", "did you mean 'notify'?"),
    ({"logging/path": "x"}, "logging.path", "unknown key (expected one of: file)"),
    ({"metrics/files": "x"}, "metrics.files", "did you mean 'file'?"),
    ({"defaults/keys": "x"}, "defaults.keys", "did you mean 'key'?"),
    ({"defaults/challenge/webrot": "x"}, "defaults.challenge.webrot",
     "did you mean 'webroot'?"),
    ({"defaults/challenge/standalone": {"prot": 80}, "defaults/challenge/webroot": DELETE},
     "defaults.challenge.standalone.prot", "did you mean 'port'?"),
    ({"zzzzzz": 1}, "zzzzzz", "unknown key (expected one of: acme, paths, renewal"),
    ({"defaults/challenge/script": "dns.sh"}, "defaults.challenge.script",
     "not valid for http-01 challenges (valid keys: type, webroot, webroot_map, standalone)"),
    ({"certificates/example/challenge": {"type": "dns-01", "script": "dns.sh", "webroot": "www"}},
     "certificates.example.challenge.webroot", "not valid for dns-01 challenges"),
])
def test_unknown_keys(site: Path, patches: dict[str, Any], key: str, problem: str) -> None:
    config_error(write(site, patched(patches)), key, problem)


def test_odd_unknown_keys_keep_the_message_on_one_line(site: Path) -> None:
    text = f"acme: {{directory: {LE_DIRECTORY}}}\n\"bad\\nkey\": 1\n"
    config_error(write(site, text), "['bad\\nkey']", "unknown key")
    config_error(write(site, f"acme: {{directory: {LE_DIRECTORY}}}\n7: 1\n"), "[7]",
                 "unknown key")


# --- wrong types, ranges, required keys ----------------------------------------------------------

@pytest.mark.parametrize(("patches", "key", "problem"), [
    ({"acme": DELETE}, "acme", "required section is missing"),
    ({"acme": "https://x"}, "acme", "expected a mapping, got a string"),
    ({"acme/directory": DELETE}, "acme.directory", "required key is missing"),
    ({"acme/directory": "ftp://example.com/dir"}, "acme.directory",
     "must be an http:// or https:// URL"),
    ({"acme/directory": "acme-v02.api.letsencrypt.org"}, "acme.directory", "http:// or https://"),
    ({"acme/directory": "https://"}, "acme.directory", "http:// or https:// URL"),
    ({"acme/directory": "https://exa mple.com/"}, "acme.directory", "URL"),
    ({"acme/directory": 42}, "acme.directory", "expected a string, got an integer (42)"),
    ({"acme/email": "ops.example.com"}, "acme.email", "not an email address"),
    ({"acme/email": "a@b@example.com"}, "acme.email", "not an email address"),
    ({"acme/email": "o ps@example.com"}, "acme.email", "not an email address"),
    ({"acme/email": ""}, "acme.email", "must not be empty"),
    ({"acme/ca_bundle": "missing.pem"}, "acme.ca_bundle", "missing.pem does not exist"),
    ({"acme/ca_bundle": "www"}, "acme.ca_bundle", "is not a regular file"),
    ({"acme/eab": "kid:hmac"}, "acme.eab", "expected a mapping"),
    ({"acme/eab": {"kid": "k"}}, "acme.eab.hmac_key", "required key is missing"),
    ({"acme/eab": {"kid": "", "hmac_key": "h"}}, "acme.eab.kid", "must not be empty"),
    ({"acme/eab": {"kid": 123, "hmac_key": "h"}}, "acme.eab.kid",
     "expected a string, got an integer (123) (quote it to make it a string)"),
    ({"paths/state": 5}, "paths.state", "expected a string"),
    ({"paths/spool": ""}, "paths.spool", "must not be empty"),
    ({"paths/hooks": "a\0b"}, "paths.hooks", "NUL"),
    ({"paths": ["state"]}, "paths", "expected a mapping, got a list"),
    ({"renewal/workers": "4"}, "renewal.workers", "expected an integer, got a string ('4')"),
    ({"renewal/workers": True}, "renewal.workers", "expected an integer, got a boolean (true)"),
    ({"renewal/workers": 4.5}, "renewal.workers", "expected an integer, got a number (4.5)"),
    ({"renewal/workers": 0}, "renewal.workers", "must be between 1 and 64, got 0"),
    ({"renewal/workers": 65}, "renewal.workers", "must be between 1 and 64, got 65"),
    ({"hooks/notify": 5}, "hooks.notify", "expected a string (shell command) or a list (argv)"),
    ({"hooks/notify": []}, "hooks.notify", "empty list"),
    ({"hooks/notify": ["/bin/x", 1]}, "hooks.notify[1]", "expected a string"),
    ({"hooks/notify": "  "}, "hooks.notify", "must not be empty"),
    ({"logging/file": ["a"]}, "logging.file", "expected a string, got a list"),
    ({"metrics": "x.prom"}, "metrics", "expected a mapping"),
    ({"defaults": ["x"]}, "defaults", "expected a mapping"),
    ({"defaults/deploy": {"cmd": "x"}}, "defaults.deploy", "expected a string (shell command)"),
    ({"certificates/example/deploy": [""]}, "certificates.example.deploy[0]",
     "must not be empty"),
])
def test_wrong_values(site: Path, patches: dict[str, Any], key: str, problem: str) -> None:
    config_error(write(site, patched(patches)), key, problem)


# --- certificates --------------------------------------------------------------------------------

@pytest.mark.parametrize(("certificates", "key", "problem"), [
    (DELETE, "certificates", "required section is missing"),
    (None, "certificates", "required section is missing"),
    ({}, "certificates", "at least one is required"),
    (["example"], "certificates", "expected a mapping of certificate names, got a list"),
    ({"Example": {"domains": ["a.com"]}}, "certificates.Example", "invalid certificate name"),
    ({"-x": {"domains": ["a.com"]}}, "certificates['-x']", "invalid certificate name"),
    ({".x": {"domains": ["a.com"]}}, "certificates['.x']", "invalid certificate name"),
    ({"my site": {"domains": ["a.com"]}}, "certificates['my site']", "invalid certificate name"),
    ({"a/b": {"domains": ["a.com"]}}, "certificates['a/b']", "invalid certificate name"),
    ({"x" * 65: {"domains": ["a.com"]}}, f"certificates.{'x' * 65}", "up to 64"),
    ({123: {"domains": ["a.com"]}}, "certificates[123]", "names must be strings"),
    ({"example": None}, "certificates.example", "expected a mapping with at least 'domains'"),
    ({"example": ["a.com"]}, "certificates.example", "expected a mapping"),
    ({"example": {"key": "rsa-2048"}}, "certificates.example.domains",
     "a certificate needs at least one domain"),
    ({"example": {"domains": []}}, "certificates.example.domains", "empty list"),
    ({"example": {"domains": "example.com"}}, "certificates.example.domains",
     "expected a list of names, got a string; write [example.com]"),
    ({"example": {"domains": {"a": 1}}}, "certificates.example.domains",
     "expected a list of names, got a mapping"),
    ({"example": {"domains": ["a.com", 5]}}, "certificates.example.domains[1]",
     "expected a domain name (string), got an integer (5)"),
    ({"example": {"domains": ["a.com", "b.com", "A.com"]}}, "certificates.example.domains[2]",
     "duplicate domain 'a.com' (also at index 0)"),
    ({"example": {"domains": ["a.com"], "key": "rsa2048"}}, "certificates.example.key",
     "unknown key type 'rsa2048' (did you mean 'rsa-2048'?); expected one of: ec-p256"),
    ({"example": {"domains": ["a.com"], "key": "ed25519"}}, "certificates.example.key",
     "unknown key type 'ed25519'; expected one of"),
    ({"example": {"domains": ["a.com"], "key": 2048}}, "certificates.example.key",
     "unknown key type 2048"),
])
def test_certificate_errors(site: Path, certificates: Any, key: str, problem: str) -> None:
    config_error(write(site, patched({"certificates": certificates})), key, problem)


def test_certificate_name_limits_accept_64_chars_and_dots(site: Path) -> None:
    name = "a" * 60 + ".b_c"
    certs = load(write(site, patched({"certificates": {name: {"domains": ["a.com"]},
                                                       "0-x": {"domains": ["b.com"]}}})))
    assert list(certs.certificates) == [name, "0-x"]


def test_bad_defaults_key(site: Path) -> None:
    config_error(write(site, patched({"defaults/key": "ec-p521"})), "defaults.key",
                 "unknown key type 'ec-p521'")


# --- domain names --------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "normalized"), [
    ("Example.COM", "example.com"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a1-b2.c3.example.org", "a1-b2.c3.example.org"),
    ("123.example.com", "123.example.com"),
    ("localhost", "localhost"),
    ("a" * 63 + ".com", "a" * 63 + ".com"),
    (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
])
def test_valid_domains(site: Path, name: str, normalized: str) -> None:
    certs = load(write(site, patched({"certificates/example/domains": [name]}))).certificates
    assert certs["example"].domains == (normalized,)


@pytest.mark.parametrize(("name", "problem"), [
    ("https://example.com/", "is a URL; give only the host name"),
    ("example.com/path", "contains '/'"),
    ("example.com:443", "contains ':'; give only the host name, without a port"),
    ("192.0.2.1", "is an IP address"),
    ("2001:db8::1", "is an IP address"),
    ("[2001:db8::1]", "is an IP address"),
    ("bücher.example", "is not ASCII"),
    ("bücher.example", "(did you mean 'xn--bcher-kva.example'?)"),
    ("exa mple.com", "contains whitespace"),
    (" example.com", "contains whitespace"),
    ("example.com;reboot", "contains the invalid character ';'"),
    ("$(id).example.com", "contains the invalid character '$'"),
    ("a`b`.example.com", "contains the invalid character '`'"),
    ("under_score.example.com", "contains the invalid character '_'"),
    ("example..com", "empty label"),
    (".example.com", "empty label"),
    ("example.com.", "ends with a dot"),
    ("", "empty domain name"),
    ("a" * 64 + ".com", "label of 64 characters; the limit is 63"),
    (".".join(["a" * 63] * 4) + ".com", "characters long; the limit is 253"),
    ("-example.com", "starts or ends with '-'"),
    ("example-.com", "starts or ends with '-'"),
    ("*", "a bare '*' is not a name"),
    ("*.com", "a wildcard needs at least two labels"),
    ("www.*.example.com", "'*' is only allowed as the whole leftmost label"),
    ("*www.example.com", "'*' is only allowed as the whole leftmost label"),
    ("**.example.com", "'*' is only allowed as the whole leftmost label"),
    ("*.*.example.com", "'*' is only allowed as the whole leftmost label"),
    ("example.123", "all-digit label"),
])
def test_invalid_domains(site: Path, name: str, problem: str) -> None:
    # dns-01 so that wildcard-specific rules are what fails, not the http-01 wildcard rule.
    data = patched({"certificates/example": {
        "domains": ["ok.example.com", name],
        "challenge": {"type": "dns-01", "script": "dns.sh"}}})
    config_error(write(site, data), "certificates.example.domains[1]", problem)


def test_wildcard_needs_dns01(site: Path) -> None:
    data = patched({"certificates/example/domains": ["example.com", "*.example.com"]})
    config_error(write(site, data), "certificates.example.domains[1]",
                 "wildcard '*.example.com' needs a dns-01 challenge"
                 " (this certificate uses http-01)")


def test_wildcard_with_inherited_dns01_is_fine(site: Path) -> None:
    data = patched({"defaults/challenge": {"type": "dns-01", "script": "dns.sh"},
                    "certificates/example/domains": ["*.Example.com", "example.com"]})
    assert load(write(site, data)).certificates["example"].domains == (
        "*.example.com", "example.com")


# --- challenges ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("challenge", "key", "problem"), [
    ("http-01", "defaults.challenge", "expected a mapping with a 'type' key, got a string"),
    ({"webroot": "www"}, "defaults.challenge.type", "required key is missing: http-01 or dns-01"),
    ({"type": "http01", "webroot": "www"}, "defaults.challenge.type",
     "unknown challenge type 'http01' (did you mean 'http-01'?)"),
    ({"type": "tls-alpn-01"}, "defaults.challenge.type", "expected http-01 or dns-01"),
    ({"type": 1}, "defaults.challenge.type", "unknown challenge type 1"),
    ({"type": "http-01"}, "defaults.challenge.webroot",
     "missing: http-01 needs 'webroot' (the web server's document root) or 'standalone'"),
    ({"type": "http-01", "webroot": "www", "standalone": {"port": 80}}, "defaults.challenge",
     "takes 'webroot' or 'standalone', not both"),
    ({"type": "http-01", "webroot": 5}, "defaults.challenge.webroot", "expected a string"),
    ({"type": "http-01", "standalone": 80}, "defaults.challenge.standalone",
     "expected a mapping like {port: 80, address: 0.0.0.0}"),
    ({"type": "http-01", "standalone": {"port": 0}}, "defaults.challenge.standalone.port",
     "must be between 1 and 65535, got 0"),
    ({"type": "http-01", "standalone": {"port": 65536}}, "defaults.challenge.standalone.port",
     "must be between 1 and 65535"),
    ({"type": "http-01", "standalone": {"port": "80"}}, "defaults.challenge.standalone.port",
     "expected an integer"),
    ({"type": "http-01", "standalone": {"address": "localhost"}},
     "defaults.challenge.standalone.address", "must be an IP address"),
    ({"type": "http-01", "standalone": {"address": "300.1.1.1"}},
     "defaults.challenge.standalone.address", "must be an IP address"),
    ({"type": "dns-01"}, "defaults.challenge.script",
     "required key is missing: dns-01 needs 'script' or 'provider' (rfc2136, lexicon, acme-dns)"),
    ({"type": "dns-01", "script": "dns.sh", "provider": "rfc2136"}, "defaults.challenge",
     "dns-01 takes 'script' or 'provider', not both"),
    ({"type": "dns-01", "provider": "lexicn"}, "defaults.challenge.provider",
     "unknown value 'lexicn'"),
    ({"type": "dns-01", "script": "dns.sh", "server": "127.0.0.1"}, "defaults.challenge.server",
     "only valid with provider: rfc2136"),
    ({**RFC2136, "calls": "per-record"}, "defaults.challenge.calls", "only valid with a script"),
    ({**RFC2136, "server": None}, "defaults.challenge.server", "required key is missing"),
    ({**RFC2136, "server": "ns1.example.com"}, "defaults.challenge.server",
     "expected an IP address (IP, IP:PORT or [IPv6]:PORT), got 'ns1.example.com'"),
    ({**RFC2136, "server": "127.0.0.1:99999"}, "defaults.challenge.server",
     "the port must be between 1 and 65535, got '99999'"),
    ({**RFC2136, "server": "[::1]x"}, "defaults.challenge.server", "expected IP, IP:PORT"),
    ({**RFC2136, "resolver": "localhost:53"}, "defaults.challenge.resolver",
     "expected an IP address"),
    ({**RFC2136, "tsig_key": "bad key"}, "defaults.challenge.tsig_key", "not a DNS name"),
    ({**RFC2136, "tsig_secret": None}, "defaults.challenge.tsig_secret",
     "missing: rfc2136 needs 'tsig_secret_file' (or 'tsig_secret')"),
    ({**RFC2136, "tsig_secret_file": "x"}, "defaults.challenge.tsig_secret",
     "give 'tsig_secret' (base64) or 'tsig_secret_file', not both"),
    ({**RFC2136, "tsig_secret": "not base64!"}, "defaults.challenge.tsig_secret",
     "must be the key's secret in base64"),
    ({**RFC2136, "tsig_algorithm": "hmac-sha265"}, "defaults.challenge.tsig_algorithm",
     "(did you mean 'hmac-sha256'?)"),
    ({**RFC2136, "zone": "exa mple.com"}, "defaults.challenge.zone", "not a DNS name"),
    ({**RFC2136, "api": "https://auth.example.org"}, "defaults.challenge.api",
     "only valid with provider: acme-dns"),
    ({"type": "dns-01", "script": "dns.sh", "zone": "example.com"}, "defaults.challenge.zone",
     "only valid with provider: rfc2136 or lexicon"),
    ({**LEXICON, "lexicon_provider": None}, "defaults.challenge.lexicon_provider",
     "required key is missing"),
    ({**LEXICON, "lexicon_provider": "cloud flare"}, "defaults.challenge.lexicon_provider",
     "not a lexicon provider name: 'cloud flare'"),
    ({**LEXICON, "credentials": None}, "defaults.challenge.credentials",
     "missing: lexicon needs 'credentials_file' (or 'credentials': the provider's options)"),
    ({**LEXICON, "credentials_file": "cf.yaml"}, "defaults.challenge.credentials",
     "give 'credentials' or 'credentials_file', not both"),
    ({**LEXICON, "credentials": "token"}, "defaults.challenge.credentials",
     "expected a mapping of the provider's options (auth_token: ...), got a string"),
    ({**LEXICON, "credentials": {"auth_token": ["x"]}}, "defaults.challenge.credentials.auth_token",
     "expected a string (quote it)"),
    ({**LEXICON, "tsig_key": "k"}, "defaults.challenge.tsig_key",
     "only valid with provider: rfc2136"),
    ({**ACMEDNS, "api": "http://auth.example.org"}, "defaults.challenge.api",
     "must be https:// (http:// only to a loopback address)"),
    ({**ACMEDNS, "api": "auth.example.org"}, "defaults.challenge.api",
     "must be an https:// URL, got 'auth.example.org'"),
    ({**ACMEDNS, "accounts_file": None}, "defaults.challenge.accounts_file",
     "required key is missing"),
    ({**ACMEDNS, "follow_cnames": False}, "defaults.challenge.follow_cnames",
     "must stay true with acme-dns"),
    ({**ACMEDNS, "zone": "example.com"}, "defaults.challenge.zone",
     "only valid with provider: rfc2136 or lexicon"),
    ({**RFC2136, "propagation": "off"}, "defaults.challenge.propagation",
     "expected one of: check, none"),
    ({**RFC2136, "propagation_timeout": "0s"}, "defaults.challenge.propagation_timeout",
     "must be greater than zero"),
    ({**RFC2136, "follow_cnames": "no"}, "defaults.challenge.follow_cnames",
     "expected true or false"),
    ({**RFC2136, "nameserver_port": 0}, "defaults.challenge.nameserver_port",
     "must be between 1 and 65535"),
    ({"type": "dns-01", "script": "dns.sh", "wait": "-1s"}, "defaults.challenge.wait",
     "must not be negative"),
    ({"type": "dns-01", "script": "dns.sh", "calls": "per-cert"}, "defaults.challenge.calls",
     "unknown value 'per-cert' (did you mean 'per-certificate'?); expected one of: "
     "per-record, per-certificate"),
    ({"type": "dns-01", "script": "dns.sh", "calls": True}, "defaults.challenge.calls",
     "unknown value True"),
    ({"type": "http-01", "webroot": "www", "calls": "per-record"}, "defaults.challenge.calls",
     "not valid for http-01 challenges"),
])
def test_challenge_errors(site: Path, challenge: Any, key: str, problem: str) -> None:
    config_error(write(site, patched({"defaults/challenge": challenge})), key, problem)


def test_certificate_challenge_errors_name_the_certificate(site: Path) -> None:
    data = patched({"certificates/example/challenge": {"type": "dns-01", "script": "dns.sh",
                                                       "calls": "x"}})
    config_error(write(site, data), "certificates.example.challenge.calls", "unknown value 'x'")


@pytest.mark.parametrize("challenge", [
    {"type": "http-01", "webroot": "nowhere"},
    {"type": "http-01", "webroot": "dns.sh"},
    {"type": "dns-01", "script": "missing.sh"},
    {"type": "dns-01", "script": "noexec.sh"},
    {**RFC2136, "tsig_secret": None, "tsig_secret_file": "missing.secret"},
])
def test_a_broken_dns_or_webroot_setup_loads(site: Path, challenge: dict[str, Any]) -> None:
    """Checked when the certificate is renewed (it alone fails) and by `check`, not at load."""
    data = patched({"certificates/example/challenge": challenge})
    challenge_settings = load(write(site, data)).certificates["example"].challenge
    assert challenge_settings.type == challenge["type"]


# -- http-01 webroot_map (issue 14: certbot's per-name webroots) --------------------------------

def test_webroot_map_gives_each_name_its_webroot(site: Path) -> None:
    (site / "www2").mkdir()
    data = patched({"certificates/example/challenge": {
        "type": "http-01", "webroot_map": {"Example.com": "www", "www.example.com": "www2"}}})
    ch = load(write(site, data)).certificates["example"].challenge
    assert ch.webroot is None
    assert ch.webroot_map == (("example.com", site / "www"), ("www.example.com", site / "www2"))
    assert (ch.webroot_for("example.com"), ch.webroot_for("WWW.example.com")) == (
        site / "www", site / "www2")
    assert ch.webroots == (site / "www", site / "www2")
    # with `webroot` as the default, the map names only the names that differ
    data = patched({"certificates/example/challenge": {
        "type": "http-01", "webroot": "www", "webroot_map": {"www.example.com": "/srv/b"}}})
    ch = load(write(site, data)).certificates["example"].challenge
    assert (ch.webroot_for("example.com"), ch.webroot_for("www.example.com")) == (
        site / "www", Path("/srv/b"))
    assert ch.webroots == (site / "www", Path("/srv/b"))


def test_a_defaults_webroot_map_may_name_more_than_one_certificate(site: Path) -> None:
    data = patched({"defaults/challenge": {"type": "http-01", "webroot_map": {
        "example.com": "a", "www.example.com": "b", "other.org": "c"}},
        "certificates/other": {"domains": ["other.org"]}})
    certs = load(write(site, data)).certificates
    assert certs["example"].challenge.webroot_for("www.example.com") == site / "b"
    assert certs["other"].challenge.webroots == (site / "a", site / "b", site / "c")


@pytest.mark.parametrize(("patches", "key", "problem"), [
    ({"certificates/example/challenge": {"type": "http-01",
                                         "webroot_map": {"example.com": "www"}}},
     "certificates.example.challenge.webroot_map", "no webroot for 'www.example.com': add it to"
     " the map, or give 'webroot' as the default for the names it leaves out"),
    ({"defaults/challenge": {"type": "http-01", "webroot_map": {"example.com": "www"}}},
     "certificates.example.domains[1]",
     "no webroot for 'www.example.com' in defaults.challenge.webroot_map: add it"),
    ({"certificates/example/challenge": {"type": "http-01", "webroot": "www", "webroot_map": {
        "wwww.example.com": "a"}}},
     "certificates.example.challenge.webroot_map.wwww.example.com",
     "'wwww.example.com' is not a domain of this certificate (example.com, www.example.com)"),
    ({"defaults/challenge": {"type": "http-01", "webroot_map": {"example.com": "www"},
                             "standalone": {}}},
     "defaults.challenge", "http-01 takes 'webroot_map' or 'standalone', not both"),
    ({"defaults/challenge/webroot_map": ["example.com"]}, "defaults.challenge.webroot_map",
     "expected a mapping of domain names to webroots, like {www.example.org: /var/www/www},"
     " got a list"),
    ({"defaults/challenge/webroot_map": "www"}, "defaults.challenge.webroot_map",
     "got a string ('www')"),
    ({"defaults/challenge/webroot_map": {}}, "defaults.challenge.webroot_map",
     "got an empty mapping"),
    ({"defaults/challenge/webroot_map": {"example.com": 5}},
     "defaults.challenge.webroot_map.example.com", "expected a string, got an integer (5)"),
    ({"defaults/challenge/webroot_map": {"example.com": ""}},
     "defaults.challenge.webroot_map.example.com", "must not be empty"),
    ({"defaults/challenge/webroot_map": {5: "www"}}, "defaults.challenge.webroot_map[5]",
     "expected a domain name (string), got an integer (5)"),
    ({"defaults/challenge/webroot_map": {"http://example.com": "www"}},
     "defaults.challenge.webroot_map['http://example.com']", "is a URL"),
    ({"defaults/challenge/webroot_map": {"*.example.com": "www"}},
     "defaults.challenge.webroot_map['*.example.com']",
     "wildcard '*.example.com' needs a dns-01 challenge; http-01 cannot validate it"),
    ({"defaults/challenge/webroot_map": {"example.com": "a", "EXAMPLE.com": "b"}},
     "defaults.challenge.webroot_map.EXAMPLE.com", "duplicate domain 'example.com'"),
    ({"certificates/example/challenge": {"type": "dns-01", "script": "dns.sh",
                                         "webroot_map": {"example.com": "www"}}},
     "certificates.example.challenge.webroot_map", "not valid for dns-01 challenges"),
])
def test_webroot_map_errors(site: Path, patches: dict[str, Any], key: str, problem: str) -> None:
    config_error(write(site, patched(patches)), key, problem)


def test_rfc2136_settings_and_defaults(site: Path) -> None:
    data = patched({"defaults/challenge": {**RFC2136, "server": "[::1]:5353", "zone": "Example.COM",
                                           "resolver": "127.0.0.1:53000"},
                    "certificates/script": {"domains": ["s.example.com"],
                                            "challenge": {"type": "dns-01", "script": "dns.sh"}}})
    certs = load(write(site, data)).certificates
    ch = certs["example"].challenge
    assert ch.provider == "rfc2136" and ch.script is None and ch.rfc2136 is not None
    assert ch.rfc2136.server == ("::1", 5353) and ch.rfc2136.zone == "example.com."
    assert ch.rfc2136.tsig_key == "certbatch." and ch.rfc2136.tsig_algorithm == "hmac-sha256"
    assert (ch.follow_cnames, ch.propagation, ch.propagation_timeout) == (True, "check", 120.0)
    assert ch.resolver == ("127.0.0.1", 53000) and ch.nameserver_port == 53
    assert SECRET not in repr(ch)  # a settings dump never shows the secret
    # A script keeps its old behaviour: no propagation check unless asked for.
    assert certs["script"].challenge.propagation == "none"


def test_lexicon_and_acme_dns_settings(site: Path) -> None:
    data = patched({"defaults/challenge": {**LEXICON, "zone": "Example.COM", "credentials": {
                        "auth-token": SECRET, "account_id": 12345}},
                    "certificates/file": {"domains": ["f.example.com"], "challenge": {
                        **LEXICON, "credentials": None, "credentials_file": "cf.yaml"}},
                    "certificates/adns": {"domains": ["a.example.com"], "challenge": {
                        **ACMEDNS, "api": "http://127.0.0.1:8053/"}}})
    certs = load(write(site, data)).certificates
    ch = certs["example"].challenge
    assert ch.provider == "lexicon" and ch.lexicon is not None and ch.propagation == "check"
    assert ch.lexicon.provider == "cloudflare" and ch.lexicon.zone == "example.com."
    # Option names as lexicon's command line spells them also work; numbers become strings.
    assert ch.lexicon.credentials == (("auth_token", SECRET), ("account_id", "12345"))
    assert SECRET not in repr(ch)
    assert certs["file"].challenge.lexicon.credentials_file == site / "cf.yaml"  # type: ignore[union-attr]
    adns = certs["adns"].challenge.acme_dns
    assert adns is not None and adns.api == "http://127.0.0.1:8053"
    assert adns.accounts_file == site / "acme-dns.json"


def test_no_challenge_anywhere(site: Path) -> None:
    config_error(write(site, patched({"defaults": DELETE})), "certificates.example.challenge",
                 "no challenge configured, here or in defaults.challenge")


def test_standalone_defaults(site: Path) -> None:
    data = patched({"defaults/challenge": {"type": "http-01", "standalone": {}},
                    "certificates/v6": {"domains": ["v6.example.com"], "challenge": {
                        "type": "http-01",
                        "standalone": {"port": 8080, "address": "0:0::0:1"}}}})
    certs = load(write(site, data)).certificates
    assert certs["example"].challenge == ChallengeSettings(
        type="http-01", standalone_address="0.0.0.0", standalone_port=80)
    assert certs["v6"].challenge.standalone_address == "::1"  # normalized
    assert certs["v6"].challenge.standalone_port == 8080


# --- find_config ---------------------------------------------------------------------------------

def test_find_config_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"CERTBATCH_CONFIG": "/from/env.yaml"}
    (tmp_path / "certbatch.yaml").write_text("")
    assert find_config("/explicit.yaml", env) == Path("/explicit.yaml")
    assert find_config(None, env) == Path("/from/env.yaml")
    assert find_config(None, {}) == Path("certbatch.yaml")
    assert find_config(None, {"CERTBATCH_CONFIG": ""}) == Path("certbatch.yaml")
    (tmp_path / "certbatch.yaml").unlink()
    assert find_config(None, {}) == Path("/etc/certbatch/certbatch.yaml")


def test_find_config_reads_process_environment(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CERTBATCH_CONFIG", "/env/certbatch.yaml")
    assert find_config(None) == Path("/env/certbatch.yaml")


# --- the shipped example, speed, imports ---------------------------------------------------------

def test_example_letsencrypt_config_loads(tmp_path: Path) -> None:
    text = (REPO / "examples" / "letsencrypt.yaml").read_text()
    (tmp_path / "acme").mkdir()
    script = tmp_path / "dns-01.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    # Only the paths that must exist on this machine are moved; everything else is as shipped.
    assert "/var/www/acme" in text and "/etc/certbatch/hooks/dns-01.sh" in text
    text = text.replace("/var/www/acme", str(tmp_path / "acme"))
    text = text.replace("/etc/certbatch/hooks/dns-01.sh", str(script))
    settings = load(write(tmp_path, text))
    assert settings.acme.directory == LE_DIRECTORY
    assert settings.paths == PathSettings(DEFAULT_STATE, DEFAULT_SPOOL, DEFAULT_HOOKS)
    certs = settings.certificates
    assert len(certs) >= 3
    assert any(d.startswith("*.") for c in certs.values() for d in c.domains)
    for cert in certs.values():
        if cert.challenge.type == "http-01":
            assert cert.challenge.webroot == tmp_path / "acme"


def big_config(folder: Path, count: int) -> Path:
    lines = [f"acme: {{directory: {LE_DIRECTORY}, email: ops@example.com}}",
             "defaults:", "  challenge: {type: http-01, webroot: www}", "  deploy: [/bin/true]",
             "certificates:"]
    for i in range(count):
        lines.append(f"  site{i}:")
        lines.append(f"    domains: [site{i}.example.com, www.site{i}.example.com]")
        if i % 10 == 0:
            lines.append("    key: rsa-2048")
            lines.append("    challenge: {type: dns-01, script: dns.sh, wait: 30s}")
    return write(folder, "\n".join(lines) + "\n")


def test_thousand_certificates_load_fast(site: Path) -> None:
    path = big_config(site, 1000)
    load(path)  # warm up caches
    start = time.perf_counter()
    settings = load(path)
    elapsed = time.perf_counter() - start
    assert len(settings.certificates) == 1000
    assert list(settings.certificates)[:3] == ["site0", "site1", "site2"]
    # The target is well under 0.1 s; the bound is loose so a busy CI machine does not flake.
    assert elapsed < 0.5, f"load() took {elapsed:.3f}s for 1000 certificates"


def test_config_module_does_not_import_heavy_libraries() -> None:
    code = ("import sys, certbatch.config\n"
            "heavy = [m for m in ('acme', 'josepy', 'requests', 'cryptography', 'pydantic')"
            " if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


def test_uses_libyaml_when_available() -> None:
    if getattr(yaml, "CSafeLoader", None) is None:
        pytest.skip("PyYAML built without libyaml")
    assert config_yaml._BaseLoader is yaml.CSafeLoader


def test_state_and_spool_must_differ(tmp_path: Path) -> None:
    cfg = tmp_path / "certbatch.yaml"
    cfg.write_text("acme: {directory: https://ca.example/dir}\n"
                   "paths: {state: ./data, spool: ./data/}\n"
                   "defaults: {challenge: {type: dns-01, script: /bin/true}}\n"
                   "certificates: {site: {domains: [a.example.com]}}\n")
    with pytest.raises(ConfigError) as err:
        load(cfg)
    assert "paths.spool" in str(err.value) and "paths.state" in str(err.value)


# --- acme-dns URLs and secrets in messages (issue 12 review) -------------------------------------

TOKEN = "cftok-SECRET-4e1b7c"  # a secret given where it does not belong: never in a message


@pytest.mark.parametrize("api, problem", [
    # Cut out by hand, the host of these read as 127.0.0.1; requests sends to evil.example.
    ("http://evil.example#@127.0.0.1", "must not have a query (?...) or fragment (#...)"),
    ("http://evil.example?@127.0.0.1", "must not have a query (?...) or fragment (#...)"),
    ("https://auth.example.org/?x=1", "must not have a query"),
    ("https://auth.example.org#top", "must not have a query"),
    ("http://evil.example\\@127.0.0.1", "must not hold user:password@"),
    ("http://127.0.0.1\\evil.example", "must name a host"),
    ("https://certbatch:pw-SECRET-1@auth.example.org", "must not hold user:password@"),
    ("http://certbatch:pw-SECRET-1@127.0.0.1:8053", "must not hold user:password@"),
    ("ftp://certbatch:pw-SECRET-1@auth.example.org", "must be an https:// URL"),
    ("https://auth.example.org:http", "is not a valid URL"),
])
def test_acme_dns_api_must_say_plainly_where_the_password_goes(site: Path, api: str,
                                                                problem: str) -> None:
    from certbatch.dns.acmedns import api_problem

    err = config_error(write(site, patched({"defaults/challenge": {**ACMEDNS, "api": api}})),
                       "defaults.challenge.api", problem)
    assert "SECRET" not in str(err)
    assert problem in (api_problem(api) or "")  # `acme-dns register --api`: the same rule
    assert "SECRET" not in (api_problem(api) or "")


@pytest.mark.parametrize("url, loopback", [
    ("http://127.0.0.1:8053", True), ("http://[::1]:8053/x", True), ("http://LocalHost", True),
    ("http://127.9.9.9", True), ("http://evil.example#@127.0.0.1", False),
    ("http://evil.example?@127.0.0.1", False), ("http://evil.example/@127.0.0.1", False),
    ("http://127.0.0.1.evil.example", False), ("http://[::1", False),
])
def test_loopback_url_reads_the_host_as_the_url_parser_does(url: str, loopback: bool) -> None:
    assert config._loopback_url(url) is loopback


def test_acme_dns_loopback_and_https_urls_load(site: Path) -> None:
    for api in ("http://127.0.0.1:8053", "http://[::1]:8053", "http://localhost:8053/",
                "https://auth.example.org:8443/acme-dns"):
        data = patched({"defaults/challenge": {**ACMEDNS, "api": api}})
        adns = load(write(site, data)).certificates["example"].challenge.acme_dns
        assert adns is not None and adns.api == api.rstrip("/")


@pytest.mark.parametrize("patch, key, problem", [
    ({"defaults/challenge": {**LEXICON, "credentials": TOKEN}}, "defaults.challenge.credentials",
     "expected a mapping of the provider's options (auth_token: ...), got a string"),
    ({"defaults/challenge": {**LEXICON, "credentials": 4711081512}},
     "defaults.challenge.credentials", "got an integer"),
    ({"defaults/challenge": {**RFC2136, "tsig_secret": TOKEN}}, "defaults.challenge.tsig_secret",
     "must be the key's secret in base64"),
    ({"defaults/challenge": {**RFC2136, "tsig_secret": 4711081512}},
     "defaults.challenge.tsig_secret", "must be the key's secret in base64"),
    ({"acme/eab": {"kid": "k", "hmac_key": 4711081512}}, "acme.eab.hmac_key",
     "expected a string, got an integer (quote it to make it a string)"),
])
def test_a_misplaced_secret_is_named_by_its_kind_only(site: Path, patch: dict[str, Any],
                                                      key: str, problem: str) -> None:
    err = config_error(write(site, patched(patch)), key, problem)
    assert TOKEN not in str(err) and "cftok" not in str(err) and "4711081512" not in str(err)


def test_no_command_prints_a_secret_from_a_bad_config(site: Path) -> None:
    """The config error goes to every command's stderr: it names the key, not the secret."""
    from cli_helpers import run

    for challenge in ({**LEXICON, "credentials": TOKEN},
                      {**ACMEDNS, "api": f"https://certbatch:{TOKEN}@auth.example.org"}):
        cfg = write(site, patched({"defaults/challenge": challenge}))
        for args in (["check"], ["status"], ["status", "--json"], ["renew", "--dry-run"]):
            result = run(args, cfg, timeout=60)
            assert result.returncode == EXIT_USAGE, (args, result.stderr)
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert "defaults.challenge." in result.stderr
            assert "cftok" not in result.stdout + result.stderr, (args, result.stderr)
