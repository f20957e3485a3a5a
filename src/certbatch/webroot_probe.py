"""`check --online` for http-01 webroots: publish a probe file the way a renewal publishes its
token, fetch it over plain HTTP by the certificate's own names, say what came back.

A wrong webroot otherwise shows up only as the CA's 404, without where certbatch wrote the
file, and the CA's authorization reuse can hide the mistake for weeks. The probe goes through
the same solver as a renewal (challenges.make_solver): same folder, file mode and cleanup; the
file is always removed again.

Results, per domain: OK (the file's content came back), PROBLEM (an HTTP answer, but not the
file: a 404, another content: the web server does not serve that webroot for that name), or
WARNING (this host cannot reach its own name: no address, refused, a timeout; the CA, from
outside, may well reach it). No click, no printing: the command renders the results.
"""

from __future__ import annotations

import secrets
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .challenges import HTTP01, WELL_KNOWN, ChallengeResponse, make_solver
from .config import CertificateSettings, ChallengeSettings
from .errors import CertbatchError

OK, WARNING, PROBLEM = "ok", "warning", "problem"
TIMEOUT = 5.0  # seconds per fetch
MAX_BODY = 4096  # bytes read of an answer (the probe is 60)


@dataclass(frozen=True)
class Probe:
    """One domain's self-test: `path` is where the probe file was written, `url` where it was
    fetched; `level` OK, WARNING or PROBLEM, `detail` what happened."""

    cert: str
    domain: str
    path: Path
    url: str
    level: str
    detail: str


def probes_webroot(challenge: ChallengeSettings) -> bool:
    """Whether `check --online` probes this challenge (http-01 with a webroot or a map)."""
    return challenge.type == HTTP01 and not challenge.standalone and bool(
        challenge.webroot is not None or getattr(challenge, "webroot_map", None))


def _webroot(challenge: ChallengeSettings, domain: str) -> Path | None:
    webroot_for = getattr(challenge, "webroot_for", None)  # config.py with webroot_map
    return webroot_for(domain) if webroot_for is not None else challenge.webroot


def probe(cert: CertificateSettings, timeout: float = TIMEOUT, port: int = 80) -> list[Probe]:
    """Self-test every (non-wildcard) name of `cert` through its webroot (`port`: where the
    CA connects, 80; another only in tests). Raises CertbatchError (ChallengeError) when the
    probe files cannot be written at all."""
    challenge = cert.challenge
    responses = []
    for domain in cert.domains:
        if domain.startswith("*.") or _webroot(challenge, domain) is None:
            continue  # http-01 cannot validate a wildcard (config refuses one anyway)
        token = secrets.token_urlsafe(24)
        responses.append(ChallengeResponse(type=HTTP01, domain=domain, token=token,
                                           key_authorization=f"{token}.certbatch-check"))
    if not responses:
        return []
    solver = make_solver(challenge, cert.name)
    try:
        solver.prepare(responses, time.monotonic() + 30)
        with ThreadPoolExecutor(max_workers=min(8, len(responses))) as pool:
            return list(pool.map(lambda r: _fetch(cert.name, challenge, r, timeout, port),
                                 responses))
    finally:
        solver.cleanup()


def probe_all(certs: Sequence[CertificateSettings], timeout: float = TIMEOUT, port: int = 80
              ) -> list[tuple[CertificateSettings, list[Probe] | CertbatchError]]:
    """`probe` for every certificate that uses a webroot; a certificate whose probe files
    cannot be written gets its error instead of results."""
    results: list[tuple[CertificateSettings, list[Probe] | CertbatchError]] = []
    for cert in certs:
        if not probes_webroot(cert.challenge):
            continue
        try:
            results.append((cert, probe(cert, timeout, port)))
        except CertbatchError as exc:
            results.append((cert, exc))
    return results


def _opener() -> urllib.request.OpenerDirector:
    # Like a CA's validation: no proxy from the environment, redirects followed, and an https
    # redirect target's certificate not checked (Let's Encrypt does not check it either).
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                       urllib.request.HTTPSHandler(context=ctx))


def _fetch(name: str, challenge: ChallengeSettings, resp: ChallengeResponse,
           timeout: float, port: int) -> Probe:
    webroot = _webroot(challenge, resp.domain)
    assert webroot is not None
    path = webroot / WELL_KNOWN / resp.token
    host = resp.domain if port == 80 else f"{resp.domain}:{port}"
    url = f"http://{host}/{WELL_KNOWN}/{resp.token}"
    request = urllib.request.Request(url, headers={"User-Agent": "certbatch-check"})
    try:
        with _opener().open(request, timeout=timeout) as answer:
            body = answer.read(MAX_BODY)
            final = answer.geturl()
    except urllib.error.HTTPError as exc:
        return Probe(name, resp.domain, path, url, PROBLEM,
                     f"HTTP {exc.code} {exc.reason}: the web server does not serve {webroot} "
                     f"for {resp.domain}")
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        if isinstance(why, OSError) and why.strerror:  # not "[Errno 111] Connection refused"
            why = why.strerror
        return Probe(name, resp.domain, path, url, WARNING,
                     f"this host cannot reach its own name ({why}); the CA may still reach it")
    via = f" (redirected to {final})" if final != url else ""
    if body.strip() == resp.key_authorization.encode():
        return Probe(name, resp.domain, path, url, OK, f"the probe file came back{via}")
    return Probe(name, resp.domain, path, url, PROBLEM,
                 f"answered {len(body)} bytes that are not the probe file{via}: the web server "
                 f"does not serve {webroot} for {resp.domain}")
