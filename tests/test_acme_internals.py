"""The parts of the acme library's ClientNetwork that certbatch's wire layer relies on.

acme_client._Network/_Conn reuse one requests.Session and one nonce pool per worker thread by
assigning `session` and `_nonces`, override `_send_request`, call `_add_nonce` and read
`REPLAY_NONCE_HEADER`, and skip `__del__`. None of that is public API. pyproject pins the acme and
josepy major versions these were checked with; this test fails loudly, naming the attribute, if
an upgrade changes one of them (then re-check acme_client before widening the pin).
"""

from __future__ import annotations

import inspect

import pytest
import requests
from acme.client import ClientNetwork


def test_client_network_internals_certbatch_uses() -> None:
    net = ClientNetwork(key=None)
    try:
        assert isinstance(net.session, requests.Session), "ClientNetwork.session"
        assert isinstance(net._nonces, set), "ClientNetwork._nonces"  # noqa: SLF001
        assert net.REPLAY_NONCE_HEADER == "Replay-Nonce"
        for name in ("_send_request", "_add_nonce", "_get_nonce", "__del__"):
            assert callable(getattr(ClientNetwork, name, None)), f"ClientNetwork.{name}"
        params = list(inspect.signature(ClientNetwork._send_request).parameters)
        assert params[:3] == ["self", "method", "url"], f"_send_request{params}"
        source = inspect.getsource(ClientNetwork)
        # Every request goes through _send_request, and nonces come from _nonces.
        assert "self._send_request(" in source and "self._nonces" in source
    finally:
        net.session.close()


# -- the environment is read once per session, not per request -------------------------------

def test_sessions_take_the_proxy_from_the_environment_once(monkeypatch) -> None:
    """A real proxy listener sees the CONNECT; NO_PROXY is honoured; requests does not read
    the environment again per request (trust_env off)."""
    import socket
    import threading

    from certbatch.httpenv import session as _session

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen: list[bytes] = []

    def proxy() -> None:
        conn, _ = listener.accept()
        with conn:
            seen.append(conn.recv(1024))
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=proxy, daemon=True)
    thread.start()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    session = _session("https://ca.example.test/dir")
    assert session.trust_env is False
    monkeypatch.delenv("HTTPS_PROXY")  # taken already: the session keeps it
    with pytest.raises(requests.exceptions.ProxyError):
        session.get("https://ca.example.test/dir", timeout=5)
    thread.join(5)
    listener.close()
    assert seen and seen[0].startswith(b"CONNECT ca.example.test:443 ")

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "ca.example.test")
    assert not _session("https://ca.example.test/dir").proxies


def test_ca_bundle_from_the_config_else_from_the_environment(monkeypatch, tmp_path) -> None:
    from certbatch.httpenv import verify

    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    assert verify(None) is True
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/curl.pem")
    assert verify(None) == "/etc/ssl/curl.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/requests.pem")
    assert verify(None) == "/etc/ssl/requests.pem"
    assert verify(tmp_path / "ca.pem") == str(tmp_path / "ca.pem")
