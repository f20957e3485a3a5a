"""Wait until every authoritative server of a zone answers with the new TXT values.

The CA may ask any of the zone's servers; a secondary that has not yet received the update
(NOTIFY lost, slow refresh, an anycast node behind) makes the validation fail for good. So after
writing, each address of each NS of the zone the record is in is asked directly, about once a
second, until all of them answer with every value, up to `timeout` and never past the
certificate's deadline. Answering the challenge earlier would only waste the authorization.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Sequence

from .. import interrupt
from ..errors import ChallengeError, DeadlineExceeded
from .lookup import Lookup
from .provider import TxtRecord

log = logging.getLogger("certbatch.dns")

POLL_INTERVAL = 1.0  # seconds between two rounds of queries


def wait_until_visible(lookup: Lookup, records: Sequence[TxtRecord], timeout: float,
                       deadline: float, label: str) -> None:
    """Return once every authoritative server answers every record; else ChallengeError
    (timeout) or DeadlineExceeded (the certificate's deadline came first)."""
    start = time.monotonic()
    limit = min(start + timeout, deadline)
    servers = {zone: lookup.authoritative(zone, deadline)
               for zone in dict.fromkeys(r.zone for r in records)}
    # (server name, address, record) still to confirm -> why not yet (for the final message)
    pending = {(ns, address, record): "not asked yet"
               for record in records for ns, address in servers[record.zone]}
    log.info("%s: propagation check: %d TXT value(s) on %d authoritative server address(es)",
             label, len(records), sum(len(s) for s in servers.values()))
    unreachable: set[tuple[str, str]] = set()
    while time.monotonic() < limit:
        for key in list(pending):
            if key not in pending:  # dropped with its unreachable address meanwhile
                continue
            ns, address, record = key
            try:
                values = lookup.txt_at(address, record.name, limit)
            except DeadlineExceeded:
                break  # the time is up: the message below says who is missing what
            except ChallengeError as exc:
                others = [a for n, a in servers[record.zone] if n == ns and a != address
                          and (n, a) not in unreachable]
                if _unreachable(exc) and others:
                    # No route from here to this address family (an IPv6 address on an IPv4-only
                    # host): the CA may reach it, certbatch cannot; the server's other addresses
                    # still have to answer.
                    log.debug("%s: %s (%s) unreachable from here, skipped", label, ns, address)
                    unreachable.add((ns, address))
                    for other in [k for k in pending if k[:2] == (ns, address)]:
                        del pending[other]
                    continue
                pending[key] = str(exc)
                continue
            if record.value in values:
                del pending[key]
            else:
                pending[key] = (f"answers {len(values)} other value(s)" if values
                                else "has no TXT record there yet")
        if not pending:
            log.info("%s: propagation check: every server answers (%.1f s)", label,
                     time.monotonic() - start)
            return
        left = limit - time.monotonic()
        if left > 0 and interrupt.wait(min(POLL_INTERVAL, left)):
            raise interrupt.error("propagation check stopped")
    (ns, address, record), why = next(iter(pending.items()))
    more = f" (and {len(pending) - 1} more)" if len(pending) > 1 else ""
    what = (f"{ns} ({address}) does not answer the new TXT value at {record.name}: "
            f"{why}{more}")
    if limit >= deadline:
        raise DeadlineExceeded(f"deadline exceeded during the propagation check: {what}")
    raise ChallengeError(f"propagation check gave up after {timeout:g} s: {what}")


_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL}


def _unreachable(exc: ChallengeError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in _UNREACHABLE
