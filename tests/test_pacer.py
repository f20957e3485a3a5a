"""The client-side pace of requests to the CA (pacer.py), and the CA's pauses for the run.

The buckets are tested with an injected clock; the pace of a real issuance against Pebble
(through FaultProxy, which records each request) with a slow pace set on the client.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from conftest import MemoryAccountStore
from fault_proxy import (  # proxy_fixture: the `proxy` fixture
    NEW_NONCE,
    Fault,
    FaultProxy,
    proxy_fixture,  # noqa: F401
)
from pebble_server import PebbleInstance
from test_acme_client import issue, settings_for, standalone, unique

from certbatch import pacer
from certbatch.acme_client import AcmeClient
from certbatch.errors import RateLimited

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_buckets_allow_a_burst_then_the_rate() -> None:
    clock = Clock()
    p = pacer.Pacer(clock=clock, now=lambda: NOW)
    # new-nonce: 20/s, a burst of 4; then one every 50 ms, queued reservations wait longer
    assert [p.reserve(pacer.NEW_NONCE) for _ in range(4)] == [0, 0, 0, 0]
    waits = [p.reserve(pacer.NEW_NONCE) for _ in range(3)]
    assert waits == pytest.approx([0.05, 0.10, 0.15])
    clock.t += 1.0  # refilled (to the burst size, not beyond)
    assert [p.reserve(pacer.NEW_NONCE) for _ in range(4)] == [0, 0, 0, 0]
    assert p.reserve(pacer.NEW_NONCE) > 0
    # the classes are separate: new-account (5/s, a burst of 1) is not slowed by nonces
    assert p.reserve(pacer.NEW_ACCOUNT) == 0
    assert p.reserve(pacer.NEW_ACCOUNT) == pytest.approx(0.2)
    assert p.reserve("anything else") == 0  # counted as "other"


def test_pauses_the_ca_asked_for() -> None:
    now = [NOW]
    p = pacer.Pacer(clock=Clock(), now=lambda: now[0])
    p.pause(pacer.NEW_NONCE, NOW + dt.timedelta(seconds=30), "429 from new-nonce")
    with pytest.raises(pacer.Paused) as paused:
        p.reserve(pacer.NEW_NONCE)
    assert paused.value.until == NOW + dt.timedelta(seconds=30)
    assert p.reserve(pacer.OTHER) == 0  # another class goes on
    assert p.pause_left(pacer.NEW_NONCE) == 30
    p.pause(None, NOW + dt.timedelta(minutes=5), "503")  # everything
    with pytest.raises(pacer.Paused) as paused:
        p.reserve(pacer.OTHER)
    assert paused.value.reason == "503"
    p.pause(None, NOW + dt.timedelta(minutes=1), "shorter")  # never shortens a pause
    assert p.pause_left(pacer.OTHER) == 300
    now[0] = NOW + dt.timedelta(minutes=6)
    assert p.reserve(pacer.NEW_NONCE) == 0 and p.pause_left(pacer.OTHER) == 0


def test_an_issuance_keeps_the_pace(pebble: PebbleInstance, proxy: FaultProxy) -> None:
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    client.pacer = pacer.Pacer(rates={**pacer.RATES, pacer.OTHER: 5.0})  # a burst of 1
    t0 = time.monotonic()
    issue(client, [unique("paced")], standalone(pebble))
    took = time.monotonic() - t0
    others = [r for r in proxy.requests if not r.path.startswith(NEW_NONCE)
              and r.method in ("GET", "POST")]
    others = [r for r in others if not r.path.startswith(("/sign-me-up", "/order-plz"))]
    # every "other" request but the first waited its 0.2 s slot
    assert len(others) >= 6
    assert took >= (len(others) - 1) * 0.2 - 0.05, (took, len(others))


def test_a_429_on_an_endpoint_pauses_it_for_the_run(pebble: PebbleInstance,
                                                   proxy: FaultProxy) -> None:
    # MOCK: Pebble never rate-limits; the proxy answers authorization fetches with 429 and
    # Retry-After: 3600. The client sends no more of those ("other" requests) in this run.
    client = AcmeClient(settings_for(pebble, proxy.directory_url), MemoryAccountStore())
    fault = Fault("POST", "/authZ/", 429, {"Retry-After": "3600"}, b"slow down", times=99)
    proxy.faults.append(fault)
    with pytest.raises(RateLimited):
        issue(client, [unique("limited")], standalone(pebble))
    with pytest.raises(RateLimited) as again:
        issue(client, [unique("limited2")], standalone(pebble))
    assert "not asked again in this run" in str(again.value)
    assert fault.hits == 1
    assert again.value.retry_after is not None
    assert again.value.retry_after > dt.datetime.now(UTC) + dt.timedelta(minutes=59)


def test_workers_default_is_16(tmp_path: Path) -> None:
    from certbatch import config

    path = tmp_path / "c.yaml"
    path.write_text("acme: {directory: https://ca.example/dir}\n"
                    "defaults: {challenge: {type: http-01, standalone: {}}}\n"
                    "certificates: {www: {domains: [www.example.com]}}\n")
    assert config.load(path).renewal.workers == 16
