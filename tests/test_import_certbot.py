"""`certbatch import certbot` against a certbot folder made by the real certbot (from PyPI, in the
test environment) issuing from the tests' Pebble.

The certbot folder is built once for the module (each certbot run takes ~3 s): a webroot lineage
with an upper-case name (mapped), a webroot lineage whose webroot_map has two webroots (mapped
to certbatch's webroot_map, issue 14), an ECDSA P-384 standalone lineage, a manual dns-01
lineage with auth and cleanup hooks (apex + wildcard), a lineage with `autorenew = False`, and
one whose live/ link is broken after certbot made it. The folder's bytes are hashed before
anything reads it and compared at the end of the module. Every child process has a timeout.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conftest
import pytest
import yaml
from cli_helpers import run
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pebble_server import PebbleInstance, find_binaries, start_pebble

from certbatch import config as config_mod
from certbatch.migrate import configfile, mapping, plan, report, yamltext
from certbatch.migrate.certbot import jwk_to_pem, parse_conf

CERTBOT = Path(sys.executable).parent / "certbot"
CERTBOT_TIMEOUT = 90
Result = subprocess.CompletedProcess[str]


# -- the certbot folder ----------------------------------------------------------------------------

def _vhosts(cb: Certbot) -> dict[str, Path]:
    """Which webroot serves which name (a web server's virtual hosts): both webroot lineages'
    names, `split`'s under two webroots."""
    www1, www2 = cb.base / "www1", cb.base / "www2"
    return {"web.example": www1, "www.web.example": www1, "a.split.example": www1,
            "b.split.example": www2}


def _tree_hash(root: Path) -> str:
    """Names, modes, link targets and contents of everything under `root`."""
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(folder, name)
            st = path.lstat()
            h.update(f"{path.relative_to(root)}\0{st.st_mode:o}\0".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode())
            elif path.is_file():
                h.update(path.read_bytes())
    return h.hexdigest()


class Certbot:
    def __init__(self, pebble: Any, base: Path) -> None:
        self.pebble = pebble
        self.base = base
        self.le = base / "le"
        self.hook_log = base / "hooks.log"

    def run(self, *args: str) -> None:
        env = dict(os.environ, REQUESTS_CA_BUNDLE=str(self.pebble.ca_bundle))
        cmd = [str(CERTBOT), "--config-dir", str(self.le), "--work-dir", str(self.base / "work"),
               "--logs-dir", str(self.base / "logs"), "--server", self.pebble.directory_url,
               "--agree-tos", "-m", "ops@example.org", "--no-eff-email", "--non-interactive",
               "certonly", *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                           timeout=CERTBOT_TIMEOUT, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"certbot {' '.join(args)}: {r.stdout}\n{r.stderr}"

    def standalone(self, *args: str) -> None:
        self.run("--standalone", "--http-01-port", str(self.pebble.http_port),
                 "--http-01-address", "127.0.0.1", *args)

    def cert(self, lineage: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.le / "live" / lineage / "cert.pem")
                                              .read_bytes())

    def regr_uri(self) -> str:
        (regr,) = (self.le / "accounts").glob("*/*/*/regr.json")
        uri: str = json.loads(regr.read_text())["uri"]
        return uri

    def deactivate_valid_authorizations(self) -> list[str]:
        """Deactivate every valid authorization of certbot's account at Pebble (RFC 8555
        7.5.2); returns their identifiers, sorted ("*." for a wildcard).

        PEBBLE_AUTHZREUSE=0 is not "never": Pebble (2.4 to 2.9, wfe.makeAuthorizations) makes
        a new authorization only when ``rand.Intn(100) > percent``, and Intn returns 0 one
        time in 100, so each name of an order gets the account's valid authorization of it
        1 % of the time. certbatch, ordering under certbot's account, then rightly skips that
        name's challenge: a forced renewal ran one hook instead of two (about 2 % of the
        runs). With none valid there is nothing to reuse."""
        from acme import client, messages
        from josepy import ES256, JWK, JWKEC, RS256

        (key_file,) = (self.le / "accounts").glob("*/*/*/private_key.json")
        key = JWK.json_loads(key_file.read_text())
        net = client.ClientNetwork(key, alg=ES256 if isinstance(key, JWKEC) else RS256,
                                   verify_ssl=str(self.pebble.ca_bundle),  # type: ignore[arg-type]
                                   user_agent="certbatch-tests")
        nonce_url = client.ClientV2.get_directory(self.pebble.directory_url, net).newNonce

        def post(url: str, body: Any = None) -> Any:  # None: POST-as-GET
            return net.post(url, body, new_nonce_url=nonce_url)

        net.account = messages.RegistrationResource(uri=self.regr_uri(),
                                                    body=messages.Registration())
        orders: list[str] = []
        page: str | None = post(self.regr_uri()).json()["orders"]
        while page:  # Pebble lists 3 orders a page
            r = post(page)
            orders += r.json()["orders"]
            page = r.links.get("next", {}).get("url")
        done = []
        for order in orders:
            for url in post(order).json()["authorizations"]:
                authz = post(url).json()
                if authz["status"] == "valid":
                    update = messages.UpdateAuthorization(status=messages.STATUS_DEACTIVATED)
                    assert post(url, update).json()["status"] == "deactivated"
                    ident = authz["identifier"]["value"]
                    done.append(f"*.{ident}" if authz.get("wildcard") else ident)
        return sorted(done)

    def hook(self, name: str, endpoint: str) -> Path:
        """A certbot manual hook: logs its CERTBOT_* variables, then sets or clears the TXT
        record in challtestsrv."""
        path = self.base / name
        body = ('{"host":"_acme-challenge.\'"$CERTBOT_DOMAIN"\'.","value":"\'"'
                '$CERTBOT_VALIDATION"\'"}')
        path.write_text(f"""#!/bin/sh
set -eu
echo "{name} $CERTBOT_DOMAIN $CERTBOT_REMAINING_CHALLENGES $CERTBOT_ALL_DOMAINS" >> {self.hook_log}
curl --silent --show-error --fail --max-time 10 --output /dev/null \\
    --data '{body}' {self.pebble.challtestsrv_url}/{endpoint}
""")
        path.chmod(0o755)
        return path


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleInstance]:
    """A Pebble of this module's own that never rejects a nonce (certbot does not always retry
    a badNonce, and Pebble rejects 5 % of them by default) and does not reuse an authorization
    (the forced renewals must answer challenges, through certbot's hooks; PEBBLE_AUTHZREUSE=0
    still reuses 1 % of the time: the certbot fixture deactivates what certbot validated)."""
    if find_binaries() is None:
        if os.environ.get("CERTBATCH_REQUIRE_PEBBLE") == "1":  # CI: a missing pebble fails
            pytest.fail("pebble not installed: apt-get install pebble")
        pytest.skip("pebble not installed: apt-get install pebble")
    inst = start_pebble(tmp_path_factory.mktemp("pebble"),
                        {"PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"})
    conftest._live.append(inst)  # its logs go into the report of a failed test
    try:
        yield inst
    finally:
        inst.stop()
        conftest._live.remove(inst)


@pytest.fixture(scope="module")
def certbot(pebble: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certbot]:
    if not CERTBOT.exists():  # a test dependency (pyproject's test extra): CI has it
        if os.environ.get("CERTBATCH_REQUIRE_PEBBLE") == "1":
            pytest.fail("certbot is not installed in the test environment (pip install certbot)")
        pytest.skip("certbot is not installed in the test environment (pip install certbot)")
    cb = Certbot(pebble, tmp_path_factory.mktemp("certbot"))
    roots = (cb.base / "www1", cb.base / "www2")
    for root in roots:
        root.mkdir()
    # Standalone lineages first: certbot binds Pebble's http port itself.
    cb.standalone("--cert-name", "sa", "-d", "sa.example", "--key-type", "ecdsa",
                  "--elliptic-curve", "secp384r1")
    cb.standalone("--cert-name", "noauto", "-d", "noauto.example", "--no-autorenew")
    cb.standalone("--cert-name", "broken", "-d", "broken.example")
    cb.run("--manual", "--preferred-challenges", "dns", "--cert-name", "manual",
           "--manual-auth-hook", str(cb.hook("auth.sh", "set-txt")),
           "--manual-cleanup-hook", str(cb.hook("cleanup.sh", "clear-txt")),
           "-d", "manual.example", "-d", "*.manual.example")
    with conftest.serve_by_host(pebble.http_port, _vhosts(cb)):
        cb.run("--webroot", "-w", str(roots[0]), "--cert-name", "Web_Site", "-d", "web.example",
               "-d", "www.web.example", "--key-type", "rsa", "--rsa-key-size", "2048")
        cb.run("--webroot", "--cert-name", "split", "-w", str(roots[0]), "-d", "a.split.example",
               "-w", str(roots[1]), "-d", "b.split.example")
    # Nothing for an order of certbatch's to reuse (see deactivate_valid_authorizations).
    assert cb.deactivate_valid_authorizations() == sorted([
        "sa.example", "noauto.example", "broken.example", "manual.example", "*.manual.example",
        "web.example", "www.web.example", "a.split.example", "b.split.example"])
    link = cb.le / "live" / "broken" / "privkey.pem"
    link.unlink()
    link.symlink_to("../../archive/broken/privkey9.pem")  # a version that is not there
    cb.hook_log.write_text("")
    yield cb


@pytest.fixture(scope="module")
def before(certbot: Certbot) -> str:
    """The certbot folder's hash before the first import (checked by the last test)."""
    return _tree_hash(certbot.le)


def _config(folder: Path, pebble: Any, certificates: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "certbatch.yaml"
    path.write_text(f"""# my certbatch config
acme:
  directory: {pebble.directory_url}
  ca_bundle: {pebble.ca_bundle}   # Pebble's TLS
paths: {{state: ./state, spool: ./spool, hooks: ./hooks}}
certificates:{certificates}
""")
    return path


@pytest.fixture(scope="module")
def imported(certbot: Certbot, before: str, pebble: Any,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """One import into a config that exists (with a comment) and has no certificates yet."""
    config = _config(tmp_path_factory.mktemp("imported"), pebble)
    result = run(["import", "certbot", "--from", str(certbot.le)], config, timeout=60)
    return config, result


# -- end to end ----------------------------------------------------------------------------------

def test_import_takes_over_what_maps_and_says_why_for_the_rest(
        imported: tuple[Path, Result], certbot: Certbot) -> None:
    config, r = imported
    assert r.returncode == 1, r.stdout + r.stderr  # two lineages skipped
    assert r.stderr.strip() == ("certbatch: 2 of 6 lineages not imported: broken noauto")
    out = r.stdout
    assert "SKIP    broken: " in out and "broken link" in out
    assert "SKIP    noauto: autorenew = False" in out
    www1, www2 = certbot.base / "www1", certbot.base / "www2"
    assert f"split: a.split.example b.split.example [ec-p256, http-01 webroot_map " \
           f"a.split.example={www1} b.split.example={www2}]" in out
    assert "web_site (lineage Web_Site)" in out
    assert "they count as staged" in out
    text = config.read_text()
    assert text.startswith("# my certbatch config\n")  # the operator's text is kept
    assert "ca_bundle: " in text and "# Pebble's TLS" in text
    data = yaml.safe_load(text)
    assert sorted(data["certificates"]) == ["manual", "sa", "split", "web_site"]
    certs = data["certificates"]
    assert certs["split"]["challenge"] == {"type": "http-01", "webroot_map": {
        "a.split.example": str(www1), "b.split.example": str(www2)}}
    assert certs["web_site"]["challenge"] == {"type": "http-01",
                                              "webroot": str(certbot.base / "www1")}
    assert certs["web_site"]["key"] == "rsa-2048"
    assert sorted(certs["web_site"]["domains"]) == ["web.example", "www.web.example"]
    assert certs["sa"] == {"domains": ["sa.example"], "key": "ec-p384", "challenge": {
        "type": "http-01", "standalone": {"port": certbot.pebble.http_port,
                                          "address": "127.0.0.1"}}}
    script = Path(certs["manual"]["challenge"]["script"])
    assert certs["manual"]["challenge"]["calls"] == "per-certificate"
    assert certs["manual"]["challenge"]["follow_cnames"] is False  # as certbot: no lookup
    assert script.parent == config.parent / "certbot-import"
    assert oct(script.stat().st_mode & 0o777) == "0o700"
    assert oct(script.parent.stat().st_mode & 0o777) == "0o700"


def test_status_shows_certbots_serials_and_expiry_and_renew_has_nothing_due(
        imported: tuple[Path, Result], certbot: Certbot,
        pebble: Any) -> None:
    config, _ = imported
    r = run(["status", "--json"], config, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)["certificates"]}
    for name, lineage in (("sa", "sa"), ("manual", "manual"), ("web_site", "Web_Site"),
                          ("split", "split")):
        cert = certbot.cert(lineage)
        assert int(rows[name]["serial"], 16) == cert.serial_number
        assert rows[name]["not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert rows[name]["due"] is False
        meta = json.loads((config.parent / "state" / "certs" / name / "live" / "meta.json")
                          .read_text())
        assert meta["account"] == certbot.regr_uri()
        key = config.parent / "state" / "certs" / name / "live" / "privkey.pem"
        assert key.read_bytes() == (certbot.le / "live" / lineage / "privkey.pem").read_bytes()
        assert oct(key.stat().st_mode & 0o777) == "0o600"
    r = run(["check"], config, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    www1, www2 = certbot.base / "www1", certbot.base / "www2"
    assert (f"    webroot {www1}: a.split.example\n    webroot {www2}: b.split.example\n"
            in r.stdout), r.stdout  # check shows the map
    r = run(["renew", "--json"], config, pebble, timeout=60)
    assert r.returncode == 0, r.stderr
    outcomes = {c["name"]: c["outcome"] for c in json.loads(r.stdout)["certificates"]}
    assert outcomes == {"sa": "not-due", "manual": "not-due", "web_site": "not-due",
                        "split": "not-due"}


def test_the_account_is_certbots_and_a_forced_renewal_uses_it(
        imported: tuple[Path, Result], certbot: Certbot,
        pebble: Any) -> None:
    from acme import messages
    from josepy import JWK

    config, _ = imported
    (account_file,) = (config.parent / "state" / "accounts").glob("*/account.json")
    assert oct(account_file.stat().st_mode & 0o777) == "0o600"
    account = json.loads(account_file.read_text())
    assert account["directory"] == pebble.directory_url
    regr = messages.RegistrationResource.json_loads(account["regr"])
    assert regr.uri == certbot.regr_uri()
    (jwk_file,) = (certbot.le / "accounts").glob("*/*/*/private_key.json")
    jwk = JWK.json_loads(jwk_file.read_text())
    ours = serialization.load_pem_private_key(account["key"].encode(), None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ours.public_key().public_bytes(*spki) == jwk.key.public_key().public_bytes(*spki)

    old = certbot.cert("manual").serial_number
    r = run(["renew", "--force", "--only", "manual", "--json"], config, pebble, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((config.parent / "state" / "certs" / "manual" / "live" / "meta.json")
                      .read_text())
    assert int(meta["serial"], 16) != old
    assert meta["account"] == certbot.regr_uri()  # ordered under certbot's account
    assert len(list((config.parent / "state" / "accounts").iterdir())) == 1
    # certbatch ran certbot's manual hooks through the script the import wrote, as certbot did
    calls = certbot.hook_log.read_text().splitlines()
    assert sorted(c for c in calls if c.startswith("auth.sh")) == [
        "auth.sh manual.example 0 manual.example,manual.example",
        "auth.sh manual.example 1 manual.example,manual.example"]
    assert len([c for c in calls if c.startswith("cleanup.sh")]) == 2


def test_a_webroot_map_lineage_renews_with_each_token_in_its_webroot(
        imported: tuple[Path, Result], certbot: Certbot, pebble: Any) -> None:
    """Issue 14: `split` (certbot's -w www1 -d a... -w www2 -d b...) renews under certbatch
    with each name's token in its own webroot: the web server serves each name from its own
    folder only, so a token in the other webroot would fail the validation."""
    config, _ = imported
    old = certbot.cert("split").serial_number
    with conftest.serve_by_host(pebble.http_port, _vhosts(certbot)) as seen:
        r = run(["renew", "--force", "--only", "split", "--json"], config, pebble, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((config.parent / "state" / "certs" / "split" / "live" / "meta.json")
                      .read_text())
    assert int(meta["serial"], 16) != old
    assert meta["account"] == certbot.regr_uri()
    answered = {host for host, path, status in seen
                if status == 200 and path.startswith("/.well-known/acme-challenge/")}
    assert answered == {"a.split.example", "b.split.example"}
    for root in (certbot.base / "www1", certbot.base / "www2"):  # cleaned up in both
        assert [p for p in root.rglob("*") if not p.is_dir()] == []


def test_importing_again_changes_nothing_and_existing_names_need_replace(
        imported: tuple[Path, Result], certbot: Certbot,
        pebble: Any, tmp_path: Path) -> None:
    config, _ = imported
    text = config.read_text()
    r = run(["import", "certbot", "--from", str(certbot.le), "--only", "sa", "--only",
             "Web_Site"], config, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "  done    sa:" in r.stdout and "nothing to import" in r.stdout
    assert config.read_text() == text
    # certbatch renewed `manual` (the test before): certbot's older one never replaces it
    renewed = (config.parent / "state" / "certs" / "manual" / "live").readlink()
    r = run(["import", "certbot", "--from", str(certbot.le), "--only", "manual", "--replace"],
            config, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(already imported (certbatch has renewed it since: serial " in r.stdout
    assert config.read_text() == text
    assert (config.parent / "state" / "certs" / "manual" / "live").readlink() == renewed
    # ... not even under another entry's name: an entry with other names is no reason
    other = config.parent / "other.yaml"  # the same state folder
    other.write_text(text.replace("manual.example, '*.manual.example'", "x.example"))
    r = run(["import", "certbot", "--from", str(certbot.le), "--only", "manual", "--replace"],
            other, timeout=60)
    assert r.returncode == 1
    assert "SKIP    manual: certbatch's certificate manual is newer" in r.stdout
    assert (config.parent / "state" / "certs" / "manual" / "live").readlink() == renewed

    # A config of its own with an entry `sa` for other names: refused, then --replace.
    other = _config(tmp_path, pebble, "\n  sa:   # hand-made\n    domains: [other.example]\n"
                                      "    challenge: {type: dns-01, script: /bin/true}\n"
                                      "  keep: {domains: [keep.example], challenge: "
                                      "{type: dns-01, script: /bin/true}}\n")
    before = other.read_text()
    r = run(["import", "certbot", "--from", str(certbot.le), "--only", "sa"], other, timeout=60)
    assert r.returncode == 1
    assert f"certificates.sa exists in {other} with other domains: --replace" in r.stdout
    assert other.read_text() == before
    assert not (tmp_path / "state" / "certs" / "sa").exists()
    r = run(["import", "certbot", "--from", str(certbot.le), "--only", "sa", "--replace"],
            other, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    data = yaml.safe_load(other.read_text())
    assert data["certificates"]["sa"]["domains"] == ["sa.example"]
    assert data["certificates"]["keep"]["domains"] == ["keep.example"]
    assert "# my certbatch config" in other.read_text()
    assert (tmp_path / "state" / "certs" / "sa" / "live" / "cert.pem").exists()


def test_dry_run_prints_the_yaml_and_writes_nothing(certbot: Certbot, tmp_path: Path) -> None:
    config = tmp_path / "etc" / "certbatch.yaml"  # neither it nor its folder exists
    r = run(["import", "certbot", "--from", str(certbot.le), "--dry-run"], config, timeout=60)
    assert r.returncode == 1, r.stderr  # the same two lineages would be skipped
    assert f"--- {config} would be:" in r.stdout
    yaml_text = r.stdout.split(f"--- {config} would be:\n", 1)[1]
    data = yaml.safe_load(yaml_text)
    assert data["acme"] == {"directory": certbot.pebble.directory_url}
    assert sorted(data["certificates"]) == ["manual", "sa", "split", "web_site"]
    assert "would write" in r.stdout and "would become certbatch's account" in r.stdout
    assert not (tmp_path / "etc").exists()
    assert sorted(os.listdir(tmp_path)) == []
    # An existing config: the same, and the file stays as it is.
    config = _config(tmp_path / "cfg", certbot.pebble)
    text = config.read_text()
    r = run(["import", "certbot", "--from", str(certbot.le), "--dry-run"], config, timeout=60)
    assert r.returncode == 1 and "would become certbatch's account" in r.stdout
    assert yaml.safe_load(r.stdout.split(" would be:\n", 1)[1])["acme"]["ca_bundle"] == \
        str(certbot.pebble.ca_bundle)
    assert config.read_text() == text
    assert os.listdir(tmp_path / "cfg") == ["certbatch.yaml"]


def test_a_new_config_is_created_private_and_loads(certbot: Certbot, tmp_path: Path) -> None:
    from certbatch.migrate import apply

    path = tmp_path / "etc" / "certbatch.yaml"
    p = plan.build(certbot.le, path, only=("sa",))
    assert p.state == config_mod.DEFAULT_STATE  # a new config has the default paths ...
    p.state = tmp_path / "state"  # ... which a test must not write to
    done = apply.apply(p)
    assert done.config_written and done.certificates == ["sa"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert path.read_text().startswith("# certbatch configuration, made by `certbatch import "
                                       "certbot` from ")
    settings = config_mod.load(path)
    assert settings.acme.directory == certbot.pebble.directory_url
    assert list(settings.certificates) == ["sa"]
    assert settings.certificates["sa"].key == "ec-p384"


def test_rfc2136_lineages_map_to_the_rfc2136_provider(certbot: Certbot, tmp_path: Path) -> None:
    """certbot's dns-rfc2136 plugin and credentials ini -> issue 12's rfc2136 keys (checked in
    the plan, and by the loader when this certbatch has the provider). A copy of the folder: the
    real one is only read."""
    le = tmp_path / "le"
    shutil.copytree(certbot.le, le, symlinks=True)
    shutil.copytree(le / "archive" / "sa", le / "archive" / "zone")
    (le / "live" / "zone").mkdir()
    for f in ("cert", "chain", "fullchain", "privkey"):
        (le / "live" / "zone" / f"{f}.pem").symlink_to(f"../../archive/zone/{f}1.pem")
    ini = tmp_path / "rfc2136.ini"
    ini.write_text("# certbot's rfc2136 credentials\ndns_rfc2136_server = 192.0.2.53\n"
                   "dns_rfc2136_port = 5353\ndns_rfc2136_name = certbot.\n"
                   "dns_rfc2136_secret = c2VjcmV0\ndns_rfc2136_algorithm = HMAC-SHA512\n")
    sa_conf = (le / "renewal" / "sa.conf").read_text()
    params = sa_conf.split("[renewalparams]")[1].replace("authenticator = standalone",
                                                         "authenticator = dns-rfc2136")
    (le / "renewal" / "zone.conf").write_text(
        f"version = 5.8.0\n[renewalparams]{params}dns_rfc2136_credentials = {ini}\n"
        "dns_rfc2136_propagation_seconds = 30\n")
    p = plan.build(le, tmp_path / "cfg" / "certbatch.yaml", only=("zone",))
    (lp,) = p.lineages
    secret = tmp_path / "cfg" / "certbot-import" / "zone.tsig"
    assert lp.mapped.entry["challenge"] == {
        "type": "dns-01", "provider": "rfc2136", "server": "192.0.2.53:5353",
        "tsig_key": "certbot.", "tsig_secret_file": str(secret),
        "tsig_algorithm": "hmac-sha512"}
    assert [(f.path, f.content, f.mode) for f in lp.mapped.files] == [
        (secret, "c2VjcmV0\n", 0o600)]
    assert any("propagation_seconds" in n for n in lp.mapped.notes)
    assert p.config_text is not None
    assert yaml.safe_load(p.config_text)["certificates"]["zone"]["challenge"] == \
        lp.mapped.entry["challenge"]
    assert "c2VjcmV0" not in p.config_text  # the secret stays in its 0600 file
    if "rfc2136" not in getattr(config_mod, "DNS_PROVIDERS", ()):
        pytest.skip("this certbatch has no rfc2136 provider yet: the mapping is checked above")
    assert lp.action == plan.IMPORT, lp.why  # the loader took the entry
    settings = configfile.load_text(p.config_text, tmp_path / "cfg" / "certbatch.yaml",
                                    lp.mapped.files)
    rfc2136 = settings.certificates["zone"].challenge.rfc2136
    assert (rfc2136.server, rfc2136.tsig_key, rfc2136.tsig_algorithm) == (
        ("192.0.2.53", 5353), "certbot.", "hmac-sha512")


def _copy(certbot: Certbot, tmp_path: Path) -> Path:
    le = tmp_path / "le"
    shutil.copytree(certbot.le, le, symlinks=True)
    return le


def _edit(conf: Path, old: str, new: str) -> None:
    text = conf.read_text()
    assert old in text
    conf.write_text(text.replace(old, new))


def test_two_cas_or_two_accounts_are_reported_not_guessed(certbot: Certbot,
                                                          tmp_path: Path) -> None:
    le = _copy(certbot, tmp_path)
    staging = "https://acme-staging-v02.api.letsencrypt.org/directory"
    _edit(le / "renewal" / "sa.conf", f"server = {certbot.pebble.directory_url}",
          f"server = {staging}")
    p = plan.build(le, tmp_path / "new" / "certbatch.yaml")
    actions = {lp.name: (lp.action, lp.why) for lp in p.lineages}
    assert p.config_text is None
    for name in ("manual", "sa", "web_site"):
        assert actions[name][0] == plan.SKIP
        assert actions[name][1].startswith("needs a choice: the lineages use 2 CAs (")
    assert f"{staging}: sa" in actions["sa"][1]
    # One CA chosen with --only: its lineages come over.
    p = plan.build(le, tmp_path / "new" / "certbatch.yaml", only=("manual", "Web_Site"))
    assert [lp.action for lp in p.lineages] == [plan.IMPORT, plan.IMPORT]
    assert p.directory == certbot.pebble.directory_url

    # A second account on the Pebble CA, used by `manual`.
    (account,) = (le / "accounts").glob("*/*/*/regr.json")
    second = account.parent.parent / "f00"
    shutil.copytree(account.parent, second)
    _edit(second / "regr.json", certbot.regr_uri(), certbot.regr_uri() + "0")
    _edit(le / "renewal" / "manual.conf", f"account = {account.parent.name}", "account = f00")
    p = plan.build(le, tmp_path / "new" / "certbatch.yaml", only=("manual", "Web_Site"))
    assert p.account is None
    for lp in p.lineages:
        assert lp.action == plan.SKIP
        assert lp.why.startswith("needs a choice: 2 certbot accounts on this CA")
        assert "f00 (" in lp.why and ": manual" in lp.why
    p = plan.build(le, tmp_path / "new" / "certbatch.yaml", only=("manual",))
    assert p.account is not None and p.account.account.id == "f00"
    assert p.lineages[0].ordered_by == certbot.regr_uri() + "0"


def test_certbatch_keeps_its_own_account_unless_replace(certbot: Certbot, pebble: Any,
                                                        tmp_path: Path) -> None:
    from certbatch.store import Store

    config = _config(tmp_path, pebble)
    Store(tmp_path / "state").save_account(pebble.directory_url, b"key", json.dumps(
        {"body": {}, "uri": "https://ca.example/acct/1"}))
    p = plan.build(certbot.le, config, only=("sa",))
    assert p.account is not None and p.account.action == "kept"
    assert "certbatch keeps its own account https://ca.example/acct/1" in p.account.why
    (lp,) = p.lineages
    assert lp.action == plan.IMPORT and lp.ordered_by == certbot.regr_uri()
    assert any(n.startswith(f"ordered by account {certbot.regr_uri()}, renews under "
                            f"certbatch's") for n in lp.mapped.notes)
    p = plan.build(certbot.le, config, only=("sa",), replace=True)
    assert p.account is not None and p.account.action == "import"
    assert p.account.why == "replaces certbatch's account https://ca.example/acct/1"
    assert p.lineages[0].mapped.notes == []


def test_an_entry_written_by_hand_is_kept_and_gets_its_certificate(
        certbot: Certbot, pebble: Any, tmp_path: Path) -> None:
    """The way for a lineage whose challenge the import cannot map: write the entry first."""
    from certbatch.migrate import apply

    webroot = tmp_path / "www"
    webroot.mkdir()
    config = _config(tmp_path, pebble, f"\n  split:   # by hand\n    domains: "
                                       f"[b.split.example, a.split.example]\n    challenge: "
                                       f"{{type: http-01, webroot: {webroot}}}\n")
    text = config.read_text()
    p = plan.build(certbot.le, config, only=("split",))
    (lp,) = p.lineages
    assert (lp.action, lp.why) == (plan.ADOPT, "certificates.split in the config is kept")
    assert p.config_text is None
    done = apply.apply(p)
    assert done.certificates == ["split"] and not done.config_written
    assert config.read_text() == text
    meta = json.loads((tmp_path / "state" / "certs" / "split" / "live" / "meta.json")
                      .read_text())
    assert int(meta["serial"], 16) == certbot.cert("split").serial_number
    r = run(["renew", "--dry-run"], config, timeout=60)
    assert r.returncode == 0 and r.stdout.split()[:2] == ["split", "skip"], r.stdout


def test_a_valid_lineage_name_is_kept_when_another_maps_to_it(certbot: Certbot,
                                                              tmp_path: Path) -> None:
    le = _copy(certbot, tmp_path)
    shutil.copy(le / "renewal" / "Web_Site.conf", le / "renewal" / "web_site.conf")
    os.symlink("Web_Site", le / "live" / "web_site")  # certbot never does this; a test shortcut
    p = plan.build(le, tmp_path / "certbatch.yaml", only=("Web_Site", "web_site"))
    assert {lp.lineage: lp.name for lp in p.lineages} == {"Web_Site": "web_site-2",
                                                          "web_site": "web_site"}


def test_expired_lineages_are_skipped(certbot: Certbot, tmp_path: Path) -> None:
    later = certbot.cert("sa").not_valid_after_utc + dt.timedelta(seconds=1)
    p = plan.build(certbot.le, tmp_path / "certbatch.yaml", only=("sa",), now=later)
    (lp,) = p.lineages
    assert lp.action == plan.SKIP
    assert lp.why == f"expired {lp.not_after:%Y-%m-%d %H:%M}Z: issue it anew with certbatch"
    assert p.config_text is None


def test_certbot_hooks_are_listed_with_where_they_belong(certbot: Certbot,
                                                         tmp_path: Path) -> None:
    le = _copy(certbot, tmp_path)
    (le / "renewal-hooks" / "deploy" / "reload-nginx").write_text("#!/bin/sh\n")
    (le / "renewal-hooks" / "post" / "mail").write_text("#!/bin/sh\n")
    _edit(le / "renewal" / "sa.conf", "[renewalparams]\n",
          "[renewalparams]\ndeploy_hook = systemctl reload nginx\npreferred_chain = ISRG\n")
    p = plan.build(le, tmp_path / "certbatch.yaml", only=("sa",))
    assert p.hooks == ["renewal-hooks/deploy/reload-nginx: deploy.d/ (per certificate, "
                       "CERTBATCH_* variables)",
                       "renewal-hooks/post/mail: notify.d/ or hooks.targets (once per batch)"]
    (lp,) = p.lineages
    assert lp.mapped.hooks == ["deploy_hook 'systemctl reload nginx': deploy.d/ or "
                               "certificates.sa.deploy (CERTBATCH_* variables instead of "
                               "RENEWED_*)"]
    assert any(n.startswith("preferred_chain 'ISRG' not kept") for n in lp.mapped.notes)
    assert "certbatch never copies or runs them" in "\n".join(report.plan_lines(p, True))


def test_usage_errors_are_one_line_and_exit_2(certbot: Certbot, tmp_path: Path) -> None:
    config = tmp_path / "certbatch.yaml"
    for args, message in (
            (["--from", str(tmp_path)], f"{tmp_path}: not a certbot folder (it has no renewal/"
                                        f" folder)"),
            (["--from", str(certbot.le), "--only", "nope"], "no certbot lineage named nope in "),
    ):
        r = run(["import", "certbot", *args], config, timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith(f"certbatch: error: {message}") and \
            r.stderr.count("\n") == 1, r.stderr
    real = tmp_path / "real.yaml"
    real.write_text("acme: {directory: https://ca.example/dir}\n")
    config.symlink_to(real)
    r = run(["import", "certbot", "--from", str(certbot.le)], config, timeout=60)
    assert r.returncode == 2 and "is a symlink; give --config the file" in r.stderr
    assert not (tmp_path / "state").exists()


def test_the_certbot_folder_is_unchanged(certbot: Certbot, before: str,
                                         imported: Any) -> None:
    assert _tree_hash(certbot.le) == before


# -- units ---------------------------------------------------------------------------------------

def test_renewal_conf_syntax() -> None:
    conf = parse_conf("""# renew_before_expiry = 30 days
version = 5.8.0
renew_before_expiry = 20 days
[renewalparams]
account = abc
webroot_path = /var/www/a,
pref_challs = dns-01, http-01
manual_auth_hook = "/usr/local/bin/hook --a,b"
autorenew = False
[[webroot_map]]
Example.COM = /var/www/a
'www.example.com' = '/var/www/b'
""", "x.conf")
    assert conf.top["renew_before_expiry"] == "20 days"
    assert conf.get("webroot_path") == "/var/www/a"
    assert conf.items("pref_challs") == ["dns-01", "http-01"]
    assert conf.get("manual_auth_hook") == "/usr/local/bin/hook --a,b"
    assert conf.flag("autorenew", True) is False
    assert conf.webroot_map == {"example.com": "/var/www/a", "www.example.com": "/var/www/b"}


@pytest.mark.parametrize("params, challenge, problem", [
    ("authenticator = webroot\nwebroot_path = /srv/a,\n[[webroot_map]]\nb.example = /srv/a\n",
     {"type": "http-01", "webroot": "/srv/a"}, None),
    ("authenticator = webroot\nwebroot_path = /srv/a, /srv/b,\n[[webroot_map]]\n"
     "a.example = /srv/a\nb.example = /srv/b\n",
     {"type": "http-01", "webroot_map": {"a.example": "/srv/a", "b.example": "/srv/b"}}, None),
    ("authenticator = webroot\n[[webroot_map]]\na.example = /srv/a\n", None,
     "no webroot for b.example in its webroot_map"),
    ("authenticator = standalone\n", {"type": "http-01", "standalone": {}}, None),
    ("authenticator = standalone\nhttp01_port = 8080\nhttp01_address = ::\n",
     {"type": "http-01", "standalone": {"port": 8080, "address": "::"}}, None),
    ("authenticator = manual\npref_challs = http-01,\nmanual_auth_hook = /bin/true\n", None,
     "its manual hooks answer http-01; certbatch answers http-01 from a webroot or standalone"),
    ("authenticator = manual\npref_challs = dns-01,\n", None,
     "manual without manual_auth_hook is interactive"),
    ("authenticator = manual\npref_challs = dns-01,\nmanual_auth_hook = /nonexistent/hook\n",
     None, "manual_auth_hook runs /nonexistent/hook, which does not exist"),
    ("authenticator = nginx\n", None, "certbot's nginx plugin answered http-01 through nginx"),
    ("authenticator = dns-cloudflare\n", None, "certbot's dns-cloudflare plugin: use a dns-01 "
                                                 "provider"),
])
def test_challenges_map_or_say_why_not(params: str, challenge: Any, problem: str | None,
                                       tmp_path: Path) -> None:
    conf = parse_conf(f"[renewalparams]\n{params}", "x.conf")
    m = mapping.map_lineage("x", "x", conf, ("a.example", "b.example"), "ec-p256", tmp_path)
    assert m.entry.get("challenge") == challenge
    if problem is None:
        assert m.challenge_problem is None
    else:
        assert m.challenge_problem is not None
        assert m.challenge_problem.startswith(f"configure the challenge of x by hand: {problem}")


def test_the_manual_hooks_script_runs_certbots_hooks_per_record(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hook = f'echo "$0 $CERTBOT_DOMAIN $CERTBOT_VALIDATION $CERTBOT_REMAINING_CHALLENGES ' \
           f'$CERTBOT_ALL_DOMAINS" >> {log}'
    script = tmp_path / "s.sh"
    script.write_text(mapping.manual_script("x", hook, None))
    script.chmod(0o700)
    subprocess.run([str(script), "add", "a.example", "_acme-challenge.a.example.", "v1",
                    "a.example", "_acme-challenge.a.example.", "v2"], check=True, timeout=10)
    subprocess.run([str(script), "remove", "a.example", "_acme-challenge.a.example.", "v1"],
                   check=True, timeout=10)  # no cleanup hook: nothing runs
    assert log.read_text().splitlines() == ["/bin/sh a.example v1 1 a.example,a.example",
                                            "/bin/sh a.example v2 0 a.example,a.example"]


@pytest.mark.parametrize("lineage, name", [
    ("example.com", "example.com"), ("Example.COM-0001", "example.com-0001"),
    ("my site", "my-site"), ("_odd", "odd"), ("x" * 80, "x" * 64), ("---", "certificate")])
def test_lineage_names_map_to_valid_certbatch_names(lineage: str, name: str) -> None:
    assert mapping.certbatch_name(lineage) == name


def test_an_ec_account_key_converts() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from josepy import JWKEC

    key = ec.generate_private_key(ec.SECP256R1())
    pem = jwk_to_pem(json.loads(JWKEC(key=key).json_dumps()))
    loaded = serialization.load_pem_private_key(pem, None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()


def test_entries_go_in_as_text_where_they_belong() -> None:
    entry = [("new", {"domains": ["a.example"], "challenge": {"type": "http-01",
                                                              "standalone": {}}}, ["from x"])]
    crlf = "acme: {directory: x}\r\ncertificates:\r\n  www:   # mine\r\n    domains: [w]\r\n"
    assert yamltext.add_entries(crlf, entry, set()) == crlf + (
        "  # from x\r\n  new:\r\n    domains: [a.example]\r\n    challenge:\r\n"
        "      type: http-01\r\n      standalone: {}\r\n")
    literal = "certificates:\n  www:\n    deploy: |\n      echo hi\nhooks: {}  # end\n"
    out = yamltext.add_entries(literal, entry, set())
    assert out.startswith("certificates:\n  www:\n    deploy: |\n      echo hi\n  # from x\n")
    assert out.endswith("hooks: {}  # end\n")
    replaced = yamltext.add_entries("certificates:\n  new:\n    domains: [old]\n"
                                    "  b: {domains: [b]}  # b\n", entry, {"new"})
    assert replaced.endswith("      standalone: {}\n  b: {domains: [b]}  # b\n")
    assert "old" not in replaced


def test_a_flow_style_certificates_section_is_refused_not_rewritten() -> None:
    with pytest.raises(yamltext.TextEditError, match="flow style"):
        yamltext.add_entries("acme: {directory: x}\ncertificates: {a: {domains: [a]}}\n",
                             [("b", {"domains": ["b"]}, [])], set())
