"""The DNS queries certbatch makes itself: CNAME chain, zone cut, authoritative servers, TXT.

Lookups of CNAMEs, SOA, NS and addresses go to `resolver` (an address and port from the
challenge's `resolver` key) or, without one, to the system's resolvers (/etc/resolv.conf). TXT
values are asked of an authoritative server directly, without recursion, so no cache between
certbatch and the zone can answer with an old record set.

Every call is bounded by the certificate's deadline; every failure is a one-line ChallengeError.
"""

from __future__ import annotations

import time

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from ..errors import ChallengeError, DeadlineExceeded

MAX_CNAMES = 16  # a longer chain is a loop or a mistake
QUERY_TIMEOUT = 3.0  # seconds per query to one server (less when the deadline is closer)


class Lookup:
    """DNS lookups through one resolver; `nameserver_port` is where authoritative servers listen."""

    def __init__(self, resolver: tuple[str, int] | None = None, nameserver_port: int = 53) -> None:
        self.resolver_address = resolver
        self.nameserver_port = nameserver_port

    def _resolver(self, deadline: float) -> dns.resolver.Resolver:
        lifetime = _remaining(deadline, "a DNS lookup")
        if self.resolver_address is None:
            try:
                res = dns.resolver.Resolver()
            except (dns.exception.DNSException, OSError) as exc:
                raise ChallengeError(f"no DNS resolver: {_text(exc)} (set the challenge's "
                                     f"'resolver' key)") from exc
        else:
            res = dns.resolver.Resolver(configure=False)
            res.nameservers = [self.resolver_address[0]]
            res.port = self.resolver_address[1]
        res.lifetime = min(lifetime, 2 * QUERY_TIMEOUT)
        res.timeout = min(lifetime, QUERY_TIMEOUT)
        res.cache = None  # a record added a second ago must not be answered from a cache
        return res

    def follow_cnames(self, name: str, deadline: float) -> str:
        """The end of the CNAME chain starting at `name` (`name` itself without a CNAME)."""
        seen = [name]
        while True:
            try:
                answer = self._resolver(deadline).resolve(
                    seen[-1], "CNAME", raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                return seen[-1]
            except dns.exception.DNSException as exc:
                raise ChallengeError(f"CNAME lookup of {seen[-1]} failed: {_text(exc)}") from exc
            if answer.rrset is None:
                return seen[-1]
            target = str(answer.rrset[0].target).lower()
            if target in seen or len(seen) > MAX_CNAMES:
                raise ChallengeError(f"CNAME chain from {name} loops or is longer than "
                                     f"{MAX_CNAMES}: {' -> '.join([*seen, target])}")
            seen.append(target)

    def zone_of(self, name: str, deadline: float) -> str:
        """The zone `name` is in (the closest enclosing SOA)."""
        try:
            zone = dns.resolver.zone_for_name(name, resolver=self._resolver(deadline),
                                              lifetime=_remaining(deadline, "a SOA lookup"))
        except dns.exception.DNSException as exc:
            raise ChallengeError(f"cannot find the zone of {name} (SOA lookup): "
                                 f"{_text(exc)}") from exc
        return str(zone).lower()

    def authoritative(self, zone: str, deadline: float) -> list[tuple[str, str]]:
        """(server name, address) for every address of every NS of `zone`."""
        res = self._resolver(deadline)
        try:
            ns_names = sorted(str(r.target).lower()
                              for r in res.resolve(zone, "NS"))
        except dns.exception.DNSException as exc:
            raise ChallengeError(f"NS lookup of {zone} failed: {_text(exc)}") from exc
        servers: list[tuple[str, str]] = []
        for ns in ns_names:
            addresses: list[str] = []
            for rdtype in ("A", "AAAA"):
                try:
                    answer = self._resolver(deadline).resolve(ns, rdtype,
                                                              raise_on_no_answer=False)
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue
                except dns.exception.DNSException as exc:
                    raise ChallengeError(f"address lookup of {ns} (NS of {zone}) failed: "
                                         f"{_text(exc)}") from exc
                addresses += [r.address for r in answer.rrset or ()]
            if not addresses:
                raise ChallengeError(f"{ns} (NS of {zone}) has no address")
            servers += [(ns, address) for address in addresses]
        return servers

    def txt_at(self, address: str, name: str, deadline: float) -> set[str]:
        """The TXT values one server answers for `name`, asked without recursion."""
        query = dns.message.make_query(name, "TXT")
        query.flags &= ~dns.flags.RD
        timeout = min(QUERY_TIMEOUT, _remaining(deadline, f"the TXT query to {address}"))
        try:
            response, _ = dns.query.udp_with_fallback(query, address, timeout=timeout,
                                                      port=self.nameserver_port)
        except (dns.exception.DNSException, OSError) as exc:
            raise ChallengeError(f"no answer: {_text(exc)}") from exc
        rcode = response.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise ChallengeError(f"answered {dns.rcode.to_text(rcode)}")
        values: set[str] = set()
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.TXT and str(rrset.name).lower() == name.lower():
                values.update(b"".join(r.strings).decode("ascii", "replace")
                              for r in rrset)
        return values


def in_zone(name: str, zone: str) -> bool:
    return dns.name.from_text(name).is_subdomain(dns.name.from_text(zone))


def _remaining(deadline: float, what: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded(f"deadline exceeded before {what}")
    return remaining


def _text(exc: BaseException) -> str:
    """dnspython's message on one line, without its class name noise."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
