"""HTTP sessions that read the environment once (the ACME client's and renewal info's).

requests looks up the proxy variables for every request, reading the whole environment twice:
about a tenth of a renewal's CPU. A session from here took them once, for the CA's host, and
does not read the environment again (trust_env off); `verify` keeps what requests would have
taken from it for the CA bundle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests


def session(url: str) -> requests.Session:
    """A session with the proxy the environment names for `url`'s host (HTTPS_PROXY,
    NO_PROXY...), if any."""
    import requests  # not on the path of a run with nothing due

    s = requests.Session()
    s.proxies.update(requests.utils.get_environ_proxies(url))
    s.trust_env = False
    return s


def verify(ca_bundle: Path | None) -> Any:
    """requests' `verify`: acme.ca_bundle, else REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE (what
    requests takes from the environment when it reads it), else True (the system's CAs). A
    path or a bool: acme declares bool only."""
    if ca_bundle:
        return str(ca_bundle)
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
