"""The rfc2136 provider: DNS dynamic update (RFC 2136) signed with TSIG (RFC 8945).

Adding is an UPDATE that adds one rdata to the TXT set; removing deletes that one rdata (RFC 2136
2.5.4), so the other values at the name (the wildcard's, another certificate's) stay. Updates
go over TCP: an answer is never lost to a dropped datagram, and a refused update is reported.

The TSIG secret is read when a certificate needs it, not when the config loads, so a missing or
unreadable secret file fails only the certificates that use it. No message ever contains it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.tsig
import dns.update

from ..errors import ChallengeError, DeadlineExceeded, os_error_message
from .provider import NotApplied, TxtRecord

log = logging.getLogger("certbatch.dns")

TTL = 60  # seconds: the record lives for minutes; resolvers should not keep it longer
UPDATE_TIMEOUT = 10.0  # seconds per update (less when the deadline is closer)

# tsig-keygen / ddns-confgen write a BIND key clause; a file may hold just the base64 secret.
_BIND_SECRET_RE = re.compile(r'secret\s+"([^"]*)"')
_ALGORITHMS = {"hmac-md5": dns.tsig.HMAC_MD5, "hmac-sha1": dns.tsig.HMAC_SHA1,
               "hmac-sha224": dns.tsig.HMAC_SHA224, "hmac-sha256": dns.tsig.HMAC_SHA256,
               "hmac-sha384": dns.tsig.HMAC_SHA384, "hmac-sha512": dns.tsig.HMAC_SHA512}


def read_secret(path: Path) -> str:
    """The base64 TSIG secret in `path`: the file's only content, or a BIND key clause."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ChallengeError(f"tsig_secret_file {os_error_message(exc, path)}") from exc
    match = _BIND_SECRET_RE.search(text)
    secret = (match.group(1) if match else text).strip()
    if not is_base64(secret):
        # Never quote the content: it is (or was meant to be) the secret.
        raise ChallengeError(f"tsig_secret_file {path} does not hold a base64 secret (nor a "
                             f"BIND key clause with one)")
    return secret


def is_base64(text: str) -> bool:
    try:
        return bool(text) and bool(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False


class Rfc2136Provider:
    """Updates sent to `server` (the primary that accepts them), signed with one TSIG key."""

    def __init__(self, server: tuple[str, int], key_name: str, secret: str,
                 algorithm: str = "hmac-sha256") -> None:
        self.server = server
        self.key_name = key_name
        self._key = dns.tsig.Key(key_name, secret, _ALGORITHMS[algorithm])

    def add(self, record: TxtRecord, deadline: float) -> None:
        update = dns.update.UpdateMessage(record.zone)
        update.add(record.name, TTL, "TXT", _quoted(record.value))
        self._send(update, f"add TXT {record.name}", record, deadline)

    def remove(self, record: TxtRecord, deadline: float) -> None:
        update = dns.update.UpdateMessage(record.zone)
        update.delete(record.name, "TXT", _quoted(record.value))  # that value only
        self._send(update, f"remove TXT {record.name}", record, deadline)

    def _send(self, update: dns.update.UpdateMessage, what: str, record: TxtRecord,
              deadline: float) -> None:
        update.use_tsig(self._key)
        address, port = self.server
        where = f"rfc2136 {what} at {_hostport(address, port)}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline exceeded before {where}")
        try:
            response = dns.query.tcp(update, address, port=port,
                                     timeout=min(UPDATE_TIMEOUT, remaining))
        except dns.tsig.PeerBadKey as exc:
            raise NotApplied(f"{where}: the server does not know TSIG key "
                                 f"{self.key_name} (tsig_key, tsig_algorithm)") from exc
        except (dns.tsig.PeerBadSignature, dns.tsig.BadSignature) as exc:
            raise NotApplied(f"{where}: the TSIG signature was rejected: wrong tsig_secret "
                                 f"for key {self.key_name}") from exc
        except (dns.tsig.PeerBadTime, dns.tsig.BadTime) as exc:
            raise NotApplied(f"{where}: the TSIG time was rejected: this host's clock "
                                 f"and the server's differ") from exc
        except dns.exception.Timeout as exc:
            if remaining < UPDATE_TIMEOUT:
                raise DeadlineExceeded(f"deadline exceeded during {where}") from exc
            raise ChallengeError(f"{where}: no answer after {UPDATE_TIMEOUT:g} s") from exc
        except (dns.exception.DNSException, OSError) as exc:
            why = getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__
            raise ChallengeError(f"{where}: {why}") from exc
        rcode = response.rcode()
        if rcode == dns.rcode.NOERROR:
            log.debug("%s: done", where)
            return
        # An update is all or nothing (RFC 2136 3.5): an error rcode changed nothing.
        raise NotApplied(f"{where}: {_rcode_problem(rcode, record, self.key_name)}")


def _rcode_problem(rcode: dns.rcode.Rcode, record: TxtRecord, key: str) -> str:
    name = dns.rcode.to_text(rcode)
    if rcode == dns.rcode.REFUSED:
        return (f"REFUSED: the server does not let key {key} update zone {record.zone} "
                f"(its allow-update or update-policy)")
    if rcode == dns.rcode.NOTAUTH:
        return f"NOTAUTH: the server is not authoritative for zone {record.zone} (or no primary)"
    if rcode == dns.rcode.NOTZONE:
        return f"NOTZONE: {record.name} is not in zone {record.zone}"
    return f"the server answered {name}"


def _quoted(value: str) -> str:
    # ACME TXT values are base64url (no quotes, no spaces); quoting keeps them one string.
    return f'"{value}"'


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
