"""The parts of the acme library's ClientNetwork that certbatch's wire layer relies on.

acme_client._Network/_Conn reuse one requests.Session and one nonce pool per worker thread by
assigning `session` and `_nonces`, override `_send_request`, call `_add_nonce` and read
`REPLAY_NONCE_HEADER`, and skip `__del__`. None of that is public API. pyproject pins the acme and
josepy major versions these were checked with; this test fails loudly, naming the attribute, if
an upgrade changes one of them (then re-check acme_client before widening the pin).
"""

from __future__ import annotations

import inspect

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
