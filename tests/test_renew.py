"""`certbatch renew` end to end against a real Pebble: issuance, renewal decisions, failures."""

from __future__ import annotations

import os
import stat

from cli_helpers import DNS_SCRIPT, dns01, live, run, write_config
from cryptography import x509
from cryptography.hazmat.primitives import serialization


def failing_dns_script(path, bad_domain: str):
    """The challtestsrv script, except that it fails for one domain (a broken DNS API)."""
    path.write_text(f"""#!/bin/sh
if [ "$2" = "{bad_domain}" ]; then echo "DNS API refused {bad_domain}" >&2; exit 1; fi
exec {DNS_SCRIPT} "$@"
""")
    path.chmod(0o755)
    return path


def test_issue_webroot_dns_and_wildcard_then_nothing_due(tmp_path, pebble, webroot_server):
    cfg = write_config(tmp_path, pebble, {
        "web": {"domains": ["web.example.com", "www.web.example.com"],
                "challenge": {"type": "http-01", "webroot": str(webroot_server)}},
        "dns": {"domains": ["dns.example.com"], "key": "rsa-2048"},
        "wild": {"domains": ["wild.example.com", "*.wild.example.com"], "key": "ec-p384"},
    })
    first = run(["renew"], cfg, pebble)
    assert first.returncode == 0, first.stderr
    root = x509.load_pem_x509_certificate(pebble.root_pem())
    for name, domains in (("web", ["web.example.com", "www.web.example.com"]),
                          ("dns", ["dns.example.com"]),
                          ("wild", ["wild.example.com", "*.wild.example.com"])):
        meta = live(tmp_path, name)
        assert meta["domains"] == domains
        folder = tmp_path / "state" / "certs" / name / "live"
        leaf = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "privkey.pem").read_bytes(), None)
        assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(domains)
        assert format(leaf.serial_number, "x") == meta["serial"]
        chain = x509.load_pem_x509_certificates((folder / "fullchain.pem").read_bytes())
        assert chain[0] == leaf and len(chain) >= 2
        assert chain[-1].issuer == root.subject  # the chain ends at Pebble's root
        assert stat.S_IMODE(os.stat(folder / "privkey.pem").st_mode) == 0o600
    # the webroot token files are gone again
    assert list((webroot_server / ".well-known" / "acme-challenge").glob("*")) == []
    assert "web" in first.stdout and "issued" in first.stdout

    # Second run, as from cron: nothing due, nothing printed, exit 0, nothing changed.
    before = {n: live(tmp_path, n)["serial"] for n in ("web", "dns", "wild")}
    second = run(["renew"], cfg, pebble)
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert {n: live(tmp_path, n)["serial"] for n in before} == before

    # --force renews everything: new serials, new keys.
    old_key = (tmp_path / "state/certs/dns/live/privkey.pem").read_bytes()
    forced = run(["renew", "--force"], cfg, pebble)
    assert forced.returncode == 0, forced.stderr
    after = {n: live(tmp_path, n)["serial"] for n in before}
    assert all(after[n] != before[n] for n in before)
    assert (tmp_path / "state/certs/dns/live/privkey.pem").read_bytes() != old_key

    status = run(["status"], cfg, pebble)
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert lines[0].split()[:5] == ["NAME", "DOMAINS", "EXPIRES", "DAYS", "DUE"]
    assert any(line.startswith("wild ") and "renewed" in line for line in lines)


def test_dns_calls_per_certificate_one_script_run_per_certificate_and_action(tmp_path, pebble):
    log = tmp_path / "dns-calls.log"
    script = tmp_path / "dns-logging.sh"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {log}
exec {DNS_SCRIPT} "$@"
""")
    script.chmod(0o755)
    cfg = write_config(tmp_path, pebble, {
        # the wildcard and its base name share one TXT record name, with two values
        "wild": {"domains": ["pc.example.com", "*.pc.example.com", "www.pc.example.com"]},
        "two": {"domains": ["pc2.example.com", "www.pc2.example.com"]},
    }, defaults={"challenge": dns01(script, calls="per-certificate")})
    result = run(["renew", "--workers", "2"], cfg, pebble)
    assert result.returncode == 0, result.stderr
    assert live(tmp_path, "wild")["domains"] == ["pc.example.com", "*.pc.example.com",
                                                 "www.pc.example.com"]
    calls = [line.split() for line in log.read_text().splitlines()]
    # one add and one remove per certificate, each with a (domain, record, value) triple per
    # authorization: 3 for "wild", 2 for "two"
    assert sorted((c[0], len(c[1:]) // 3) for c in calls) == [
        ("add", 2), ("add", 3), ("remove", 2), ("remove", 3)]
    wild_add = next(c for c in calls if c[0] == "add" and len(c) == 10)
    assert sorted(wild_add[2::3]) == ["_acme-challenge.pc.example.com."] * 2 + [
        "_acme-challenge.www.pc.example.com."]  # in the CA's order of authorizations
    assert pebble.txt("_acme-challenge.pc.example.com.") == []  # removed again


def test_standalone_http01(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, {
        "solo": {"domains": ["solo.example.com", "www.solo.example.com"],
                 "challenge": {"type": "http-01",
                               "standalone": {"port": pebble.http_port,
                                              "address": "127.0.0.1"}}},
    })
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 0, result.stderr
    assert live(tmp_path, "solo")["domains"] == ["solo.example.com", "www.solo.example.com"]


def test_changed_domains_reissue_and_dry_run_touches_nothing(tmp_path, pebble):
    certs = {"site": {"domains": ["site.example.com"]}}
    cfg = write_config(tmp_path, pebble, certs)
    # --dry-run before anything exists: decision printed, no state folder created
    dry = run(["renew", "--dry-run"], cfg, pebble)
    assert dry.returncode == 0
    assert dry.stdout.split()[:2] == ["site", "issue"]
    assert not (tmp_path / "state").exists() and not (tmp_path / "spool").exists()

    assert run(["renew"], cfg, pebble).returncode == 0
    first = live(tmp_path, "site")
    certs["site"]["domains"].append("new.site.example.com")
    write_config(tmp_path, pebble, certs)
    dry = run(["renew", "--dry-run"], cfg, pebble)
    assert "reissue" in dry.stdout and "added new.site.example.com" in dry.stdout
    assert live(tmp_path, "site") == first
    again = run(["renew"], cfg, pebble)
    assert again.returncode == 0, again.stderr
    second = live(tmp_path, "site")
    assert second["domains"] == ["site.example.com", "new.site.example.com"]
    assert second["serial"] != first["serial"]


def test_one_failing_certificate_does_not_stop_the_others(tmp_path, pebble):
    bad = failing_dns_script(tmp_path / "bad-dns.sh", "broken.example.com")
    cfg = write_config(tmp_path, pebble, {
        "good1": {"domains": ["good1.example.com"]},
        "broken": {"domains": ["broken.example.com"], "challenge": dns01(bad)},
        "good2": {"domains": ["good2.example.com"]},
    }, defaults={"challenge": dns01(bad)})
    result = run(["renew"], cfg, pebble)
    assert result.returncode == 1
    assert live(tmp_path, "good1")["domains"] == ["good1.example.com"]
    assert live(tmp_path, "good2")["domains"] == ["good2.example.com"]
    assert not (tmp_path / "state/certs/broken/live").exists()
    errors = [line for line in result.stderr.splitlines() if "broken" in line]
    assert errors and "DNS API refused broken.example.com" in errors[0]
    # --only restricts a run to the named certificates
    only = run(["renew", "--only", "good1", "--force"], cfg, pebble)
    assert only.returncode == 0, only.stderr
    assert "good1" in only.stdout and "good2" not in only.stdout


def test_validation_failure_shows_the_cas_error(tmp_path, pebble):
    """A name whose DNS answers SERVFAIL: the CA's problem type and detail reach the operator."""
    pebble.add_servfail("_acme-challenge.servfail.example.com")
    try:
        cfg = write_config(tmp_path, pebble, {"sf": {"domains": ["servfail.example.com"]}})
        result = run(["renew"], cfg, pebble)
    finally:
        pebble.clear_servfail("_acme-challenge.servfail.example.com")
    assert result.returncode == 1
    assert "urn:ietf:params:acme:error:" in result.stderr
    assert "sf:" in result.stderr


def test_unknown_only_name_is_a_usage_error(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, {"site": {"domains": ["site.example.com"]}})
    result = run(["renew", "--only", "nope"], cfg, pebble)
    assert result.returncode == 2
    assert "nope" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()  # nothing written, not even the lock file


def test_config_error_exit_2_one_line_nothing_written(tmp_path):
    cfg = tmp_path / "certbatch.yaml"
    cfg.write_text("acme: {directory: https://ca.example/dir}\npaths: {state: ./state}\n"
                   "certificates:\n  site:\n    domians: [a.example.com]\n")
    result = run(["renew"], cfg)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(cfg) in lines[0] and "certificates.site.domians" in lines[0]
    assert not (tmp_path / "state").exists()


def test_config_option_before_or_after_the_command(tmp_path):
    cfg = tmp_path / "certbatch.yaml"
    cfg.write_text("acme: {directory: https://ca.example/dir}\npaths: {state: ./state}\n"
                   "defaults: {challenge: {type: dns-01, script: /bin/true}}\n"
                   "certificates:\n  site: {domains: [a.example.com]}\n")
    before = run(["-c", str(cfg), "renew", "--dry-run"], None)
    after = run(["renew", "--dry-run", "--config", str(cfg)], None)
    env = run(["renew", "--dry-run"], None, env={"CERTBATCH_CONFIG": str(cfg)})
    assert before.returncode == after.returncode == env.returncode == 0
    assert before.stdout == after.stdout == env.stdout
    assert before.stdout.startswith("site")
    cwd = run(["renew", "--dry-run"], None, cwd=tmp_path)
    assert cwd.returncode == 0 and cwd.stdout == before.stdout


def test_unreachable_ca_fails_every_certificate_quickly_once(tmp_path):
    """A CA that is down: one connection attempt for the run, every certificate reported."""
    import socket
    import time

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")

    class Down:
        directory_url = f"https://127.0.0.1:{port}/dir"
        ca_bundle = bundle

        def env(self):
            return {}

    cfg = write_config(tmp_path, Down(), {f"d{i}": {"domains": [f"d{i}.example.com"]}
                                          for i in range(6)}, renewal={"workers": 2})
    t0 = time.monotonic()
    result = run(["renew", "--log-file", str(tmp_path / "log")], cfg)
    elapsed = time.monotonic() - t0
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1  # one cause, one line, with the count of certificates it failed
    assert errors[0].startswith("certbatch: 6 certificates failed: cannot reach the CA")
    assert str(port) in errors[0]
    assert elapsed < 20  # one bounded connection attempt, not one per certificate
    log = (tmp_path / "log").read_text()
    assert log.count("fetching ACME directory") == 1


def test_damaged_state_of_one_certificate_fails_only_that_one(tmp_path, pebble):
    cfg = write_config(tmp_path, pebble, {"ok": {"domains": ["ok.damage.example.com"]},
                                          "bad": {"domains": ["bad.damage.example.com"]}})
    assert run(["renew"], cfg, pebble).returncode == 0
    meta = tmp_path / "state/certs/bad/live/meta.json"
    meta.write_text('{"domains": []}')  # keys missing
    (tmp_path / "state/certs/ok/status.json").write_text("[]")  # history lost, harmless
    result = run(["renew", "--force"], cfg, pebble)
    assert result.returncode == 1
    assert "ok" in result.stdout and "renewed" in result.stdout
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("certbatch: bad: failed:")
    assert "meta.json" in errors[0]
    status = run(["status"], cfg, pebble)
    assert status.returncode == 0
    assert any(line.startswith("bad ") and "error" in line for line in status.stdout.splitlines())


def test_unwritable_metrics_file_reports_the_run_then_fails(tmp_path, pebble):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = write_config(tmp_path, pebble, {"mx": {"domains": ["mx.metrics.example.com"]}})
    result = run(["renew", "--metrics-file", str(blocker / "m.prom")], cfg, pebble)
    assert result.returncode == 1
    assert "mx" in result.stdout and "issued" in result.stdout  # the report still comes
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"certbatch: cannot write metrics file {blocker / 'm.prom'}: ")
    assert str(blocker) in lines[0].split(": ", 2)[2]  # names the path the OS refused
    assert live(tmp_path, "mx")["domains"] == ["mx.metrics.example.com"]
