"""The nothing-due fast path (digest.py): a certificate found quiet is taken from
<state>/digest.json with two lstats, for as long as its folders, its settings and the clock
allow; anything else gets a full look. In-process runs (no CA is contacted: every certificate
here is quiet or planned)."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest
from cli_helpers import NoCA, dns01, write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from certbatch import ari, config, digest, metrics, renewal, runner
from certbatch.store import CertStatus, Store, StoredCert

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def no_racy_wait(monkeypatch):
    """Stamps count as settled at once (real runs wait RACY_NS after a folder changed)."""
    monkeypatch.setattr(digest, "RACY_NS", 0)


def make_site(tmp_path: Path, names=("site",), **renewal_settings) -> Path:
    """A config with `names` (domains <name>.example) and each one stored, staged, not due."""
    certs = {n: {"domains": [f"{n}.example"], "challenge": dns01()} for n in names}
    cfg = write_config(tmp_path, NoCA(tmp_path), certs,
                       renewal={"ari": False, **renewal_settings})
    store = Store(tmp_path / "state")
    for n in names:
        stored = store.save_certificate(
            n, key_type="ec-p256", domains=(f"{n}.example",), privkey_pem=b"KEY",
            cert_pem=b"CERT", chain_pem=b"CHAIN", fullchain_pem=b"CERTCHAIN", serial="0a",
            not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=89),
            issued_at=NOW - dt.timedelta(days=1))
        store.save_status(n, CertStatus(staged_version=stored.version))
    return cfg


def run(cfg: Path, dry_run: bool = False) -> dict[str, runner.CertResult]:
    report = runner.Runner(config.load(cfg)).renew(notify=False, dry_run=dry_run)
    return {c.name: c for c in report.certificates}


def entries(tmp_path: Path) -> dict[str, list]:
    path = tmp_path / "state" / digest.FILE
    return json.loads(path.read_text())["certs"] if path.exists() else {}


def test_a_quiet_certificate_is_taken_from_the_digest(tmp_path, no_racy_wait):
    cfg = make_site(tmp_path)
    first = run(cfg)["site"]
    assert first.outcome == runner.NOT_DUE and "site" in entries(tmp_path)
    assert stat.S_IMODE((tmp_path / "state" / digest.FILE).stat().st_mode) == 0o600
    # meta.json garbled in place (same inode, folders untouched) and the index gone: a full
    # look would fail this certificate; the digest does not read either
    meta = next((tmp_path / "state/certs/site/versions").glob("*/meta.json"))
    with open(meta, "r+b") as fh:  # noqa: PTH123
        fh.write(b"garbage")
    (tmp_path / "state/index.json").unlink()
    second = run(cfg)["site"]
    assert second.outcome == runner.NOT_DUE and not second.error
    assert (second.decision, second.serial, second.not_after) == \
        (first.decision, first.serial, first.not_after)


def test_metrics_of_a_run_from_the_digest_read_no_store(tmp_path, no_racy_wait, monkeypatch):
    cfg = make_site(tmp_path, names=("a", "b"))
    store = Store(tmp_path / "state")
    for name in ("a", "b"):
        status = store.status(name)
        status.last_success = NOW - dt.timedelta(hours=5)
        store.save_status(name, status)
    settings = config.load(cfg)
    expected = metrics.render(settings, Store(tmp_path / "state"),
                              runner.Runner(settings).renew(notify=False), now=0)
    report = runner.Runner(settings).renew(notify=False)  # from the digest
    monkeypatch.setattr(Store, "current", lambda *a, **k: pytest.fail("read the store"))
    monkeypatch.setattr(Store, "status", lambda *a, **k: pytest.fail("read a status"))
    text = metrics.render(settings, Store(tmp_path / "state"), report, now=0)
    assert text.split("certbatch_run_duration")[0] == expected.split("certbatch_run_duration")[0]
    assert f"certbatch_certificate_last_success_timestamp_seconds{{name=\"a\"}} " \
           f"{(NOW - dt.timedelta(hours=5)).timestamp():.15g}" in text


@pytest.mark.parametrize("change", ["status replaced", "status edited in place",
                                    "domains", "before_expiry",
                                    "folder chown"])
def test_a_change_gets_a_full_look(tmp_path, no_racy_wait, change):
    cfg = make_site(tmp_path)
    assert run(cfg)["site"].outcome == runner.NOT_DUE
    cdir = tmp_path / "state/certs/site"
    if change == "status replaced":  # as certbatch writes it: a new file renamed over
        status = Store(tmp_path / "state").status("site")
        status.rate_limited_until = NOW + dt.timedelta(hours=3)
        Store(tmp_path / "state").save_status("site", status)
        expected = renewal.RATE_LIMITED
    elif change == "status edited in place":  # a script's `>`: same inode, same folder
        path = cdir / "status.json"
        data = json.loads(path.read_text())
        data["rate_limited_until"] = (NOW + dt.timedelta(hours=3)).isoformat()
        path.write_text(json.dumps(data))
        expected = renewal.RATE_LIMITED
    elif change == "domains":
        text = cfg.read_text().replace("- site.example", "- site.example\n    - www.site.example")
        cfg.write_text(text)
        expected = renewal.REISSUE
    elif change == "before_expiry":
        data = cfg.read_text().replace("ari: false", "ari: false\n  before_expiry: 89d")
        cfg.write_text(data)
        expected = renewal.SKIP  # due by the new rule: not from the digest
    else:  # the ownership checks of the full look see this
        os.chown(cdir, 65534, -1)
        expected = renewal.ERROR
    decision = run(cfg, dry_run=True)["site"].decision
    assert decision.action == expected
    if change == "before_expiry":
        assert decision.basis == renewal.BASIS_BEFORE_EXPIRY


def test_what_the_stamps_cannot_see_is_looked_at_within_a_day(tmp_path, no_racy_wait,
                                                              monkeypatch):
    cfg = make_site(tmp_path)
    before = dt.datetime.now(UTC).timestamp()
    run(cfg)
    until = entries(tmp_path)["site"][digest._UNTIL]
    assert before + 20 * 3600 - 5 <= until <= before + 28 * 3600 + 5
    # a file removed by hand from the live version: the digest does not look inside versions
    (tmp_path / "state/certs/site/live/chain.pem").unlink()
    assert run(cfg, dry_run=True)["site"].decision.action == renewal.SKIP
    later = dt.datetime.fromtimestamp(until + 1, UTC)  # the next full look sees it
    monkeypatch.setattr(runner, "utcnow", lambda: later)
    assert run(cfg, dry_run=True)["site"].decision.action == renewal.REISSUE


def test_the_clock_ends_a_quiet_spell(tmp_path, no_racy_wait, monkeypatch):
    cfg = make_site(tmp_path)
    assert run(cfg)["site"].outcome == runner.NOT_DUE
    later = NOW + dt.timedelta(days=70)  # past the due time (a third of 90 days left)
    monkeypatch.setattr(runner, "utcnow", lambda: later)
    assert run(cfg, dry_run=True)["site"].decision.action == renewal.RENEW


def test_a_folder_changed_moments_ago_is_not_recorded(tmp_path, monkeypatch):
    # a minute instead of 2 s, so that a slow machine cannot take longer than that to get
    # from writing the store to looking at it
    monkeypatch.setattr(digest, "RACY_NS", 60_000_000_000)
    cfg = make_site(tmp_path)  # just written
    assert run(cfg)["site"].outcome == runner.NOT_DUE
    assert "site" not in entries(tmp_path)
    monkeypatch.setattr(digest, "RACY_NS", 0)  # the same look, once settled: recorded
    assert run(cfg)["site"].outcome == runner.NOT_DUE
    assert "site" in entries(tmp_path)


def test_certificates_that_need_work_are_not_recorded(tmp_path, no_racy_wait):
    cfg = make_site(tmp_path, names=("quiet", "unstaged"))
    status = Store(tmp_path / "state").status("unstaged")
    status.staged_version = None
    Store(tmp_path / "state").save_status("unstaged", status)
    results = run(cfg, dry_run=True)
    assert results["unstaged"].decision.action == renewal.RESTAGE
    runner.Runner(config.load(cfg)).renew(notify=False, workers=1)
    assert set(entries(tmp_path)) == {"quiet"}  # restaged now: recorded by the next run


def test_a_damaged_digest_is_ignored(tmp_path, no_racy_wait):
    cfg = make_site(tmp_path)
    run(cfg)
    (tmp_path / "state" / digest.FILE).write_text("{not json")
    assert run(cfg)["site"].outcome == runner.NOT_DUE
    assert "site" in entries(tmp_path)  # rebuilt


def test_a_forced_run_ignores_the_digest(tmp_path, no_racy_wait):
    cfg = make_site(tmp_path)
    run(cfg)
    report = runner.Runner(config.load(cfg)).renew(notify=False, dry_run=True, force=True)
    assert report.certificates[0].decision.action == renewal.FORCE


# -- renewal.quiet_until: the decision holds until the time it names -------------------------

HOURS = st.integers(min_value=-2000, max_value=2000).map(lambda h: dt.timedelta(hours=h))
MAYBE = st.none() | HOURS


@settings(max_examples=600, deadline=None)
@given(life=st.integers(min_value=1, max_value=2400), start=HOURS, rate=MAYBE, attempt=MAYBE,
       failed=st.integers(min_value=0, max_value=4), ari_on=st.booleans(),
       check=MAYBE, renew_at=MAYBE, same_serial=st.booleans(),
       staged=st.sampled_from([True, True, True, False]), probe=st.floats(min_value=0, max_value=1),
       before=st.none() | st.integers(min_value=1, max_value=3000))
def test_quiet_until_is_when_the_decision_can_first_change(
        life, start, rate, attempt, failed, ari_on, check, renew_at, same_serial, staged,
        probe, before):
    now = NOW
    nb = now + start
    stored = StoredCert(name="s", version="v1", folder=Path("/nonexistent"), domains=("a",),
                        key_type="ec-p256", serial="0a", not_before=nb,
                        not_after=nb + dt.timedelta(hours=life), issued_at=nb)
    state = None
    if check is not None:
        window = (now + renew_at - dt.timedelta(hours=1)) if renew_at is not None else None
        state = ari.AriState(serial="0a" if same_serial else "0b", next_check=now + check,
                             window_start=window,
                             window_end=window + dt.timedelta(hours=2) if window else None,
                             renew_at=now + renew_at if renew_at is not None else None)
    status = CertStatus(staged_version="v1" if staged else None,
                        rate_limited_until=now + rate if rate is not None else None,
                        next_attempt=now + attempt if attempt is not None else None,
                        failed_orders=failed, ari=state)
    cert = config.CertificateSettings(name="s", domains=("a",), key="ec-p256",
                                      challenge=None)  # type: ignore[arg-type]
    before_expiry = dt.timedelta(hours=before) if before else None
    decision = renewal.decide(cert, stored, status, now, before_expiry, use_ari=ari_on)
    until = renewal.quiet_until(stored, status, decision, now, before_expiry, ari_on)
    if until is None:
        return
    assert not decision.does_work and until > now
    # anywhere before `until`, and its last instant (a time missed before it shows there)
    for t in (now + (until - now) * probe, until - dt.timedelta(microseconds=1)):
        if now <= t < until:
            assert renewal.decide(cert, stored, status, t, before_expiry,
                                  use_ari=ari_on) == decision
            if ari_on and t < stored.not_after:
                assert not ari.needs_check(status.ari, stored.serial, t)
