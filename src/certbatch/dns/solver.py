"""The dns-01 solver for `provider:` challenges, and the propagation check for scripts too.

`prepare()` works out where each TXT value goes (CNAME chain, zone), adds every value through
the provider, then runs the propagation check; only then does the ACME client answer the
challenges. `cleanup()` removes exactly the values that were added (or attempted: an update that
timed out may have been applied), and never raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..challenges import cleanup_deadline
from ..config import ChallengeSettings
from ..errors import ChallengeError, DeadlineExceeded, Interrupted
from .lookup import Lookup, in_zone
from .propagation import wait_until_visible
from .provider import NotApplied, Provider, TxtRecord

if TYPE_CHECKING:
    from ..challenges import ChallengeResponse

log = logging.getLogger("certbatch.dns")

CLEANUP_TIMEOUT = 30.0  # seconds for all removals of one certificate; runs after the deadline too


def make_provider(challenge: ChallengeSettings) -> Provider:
    """The provider of a dns-01 challenge; its secret is read here (ChallengeError if it
    cannot be), so only the certificates using it fail."""
    if challenge.provider == "rfc2136" and challenge.rfc2136 is not None:
        from .rfc2136 import Rfc2136Provider, read_secret

        s = challenge.rfc2136
        if s.tsig_secret is not None:
            secret = s.tsig_secret
        elif s.tsig_secret_file is not None:
            secret = read_secret(s.tsig_secret_file)
        else:  # the config loader does not let this happen
            raise ChallengeError("rfc2136: no tsig_secret nor tsig_secret_file")
        return Rfc2136Provider(s.server, s.tsig_key, secret, s.tsig_algorithm)
    if challenge.provider == "lexicon" and challenge.lexicon is not None:
        from .lexicon import LexiconProvider, read_credentials, unavailable

        lx = challenge.lexicon
        problem = unavailable(lx.provider)
        if problem:
            raise ChallengeError(problem)
        if lx.credentials is not None:
            credentials = dict(lx.credentials)
        elif lx.credentials_file is not None:
            credentials = read_credentials(lx.credentials_file)
        else:  # the config loader does not let this happen
            raise ChallengeError("lexicon: no credentials nor credentials_file")
        return LexiconProvider(lx.provider, credentials)
    if challenge.provider == "acme-dns" and challenge.acme_dns is not None:
        from .acmedns import AcmeDnsProvider

        return AcmeDnsProvider(challenge.acme_dns.api, challenge.acme_dns.accounts_file)
    raise ChallengeError(f"unknown dns-01 provider {challenge.provider!r}")


def setup_problem(challenge: ChallengeSettings) -> str | None:
    """What `check` can tell without the network about a provider's setup (None: fine)."""
    try:
        make_provider(challenge)
    except ChallengeError as exc:
        return str(exc)
    return None


class Placement:
    """Where each `_acme-challenge` value is written: the CNAME chain's end, in its zone."""

    def __init__(self, challenge: ChallengeSettings, lookup: Lookup) -> None:
        self.challenge = challenge
        self.lookup = lookup

    def records(self, responses: Sequence[ChallengeResponse], deadline: float
                ) -> list[TxtRecord]:
        targets: dict[str, tuple[str, str]] = {}  # record name -> (target name, zone)
        out: list[TxtRecord] = []
        for resp in responses:
            name = resp.record_name.lower()
            if name not in targets:
                target = (self.lookup.follow_cnames(name, deadline)
                          if self.challenge.follow_cnames else name)
                targets[name] = (target, self.zone(target, deadline))
            target, zone = targets[name]
            record = TxtRecord(target, zone, resp.txt_value)
            if record not in out:
                out.append(record)
        return out

    def zone(self, name: str, deadline: float) -> str:
        ch = self.challenge
        configured = (ch.rfc2136.zone if ch.rfc2136 else ch.lexicon.zone if ch.lexicon
                      else None)
        if configured is None:
            return self.lookup.zone_of(name, deadline)
        if not in_zone(name, configured):
            raise ChallengeError(f"{name} is not in zone {configured} (the challenge's 'zone'"
                                 f"; a CNAME may lead elsewhere: see follow_cnames)")
        return configured


def lookup_for(challenge: ChallengeSettings) -> Lookup:
    return Lookup(challenge.resolver, challenge.nameserver_port)


def check_propagation(challenge: ChallengeSettings, records: Sequence[TxtRecord],
                      deadline: float, label: str) -> None:
    if challenge.propagation == "check" and records:
        wait_until_visible(lookup_for(challenge), records, challenge.propagation_timeout,
                           deadline, label)


class DnsProviderSolver:
    """Publish dns-01 TXT values through a provider, then wait until they are visible."""

    def __init__(self, challenge: ChallengeSettings, name: str,
                 provider: Provider | None = None) -> None:
        self.challenge = challenge
        self.name = name
        self._provider = provider
        self._added: list[TxtRecord] = []
        self.written: list[TxtRecord] = []  # every value ever added (for check's report)
        self.cleanup_problems: list[str] = []  # what cleanup could not remove

    def prepare(self, responses: Sequence[ChallengeResponse], deadline: float) -> None:
        if not responses:
            return
        if self._provider is None:  # first: a setup problem is reported before any lookup
            self._provider = make_provider(self.challenge)
        records = Placement(self.challenge, lookup_for(self.challenge)).records(
            responses, deadline)
        for record in records:
            self._added.append(record)  # before: a timed-out update may still have applied
            try:
                self._provider.add(record, deadline)
            except NotApplied:
                self._added.pop()
                raise
            self.written.append(record)
            log.debug("%s: TXT %s added in zone %s", self.name, record.name, record.zone)
        log.info("%s: %d dns-01 TXT value(s) added by %s: %s", self.name, len(records),
                 self.challenge.provider, ", ".join(dict.fromkeys(r.name for r in records)))
        check_propagation(self.challenge, records, deadline, self.name)

    def cleanup(self) -> None:
        added, self._added = self._added, []
        if not added or self._provider is None:
            return
        # Removal is one short update per value: done even after a signal, so no record is
        # left behind; the whole of it is bounded (within STOPPED_CLEANUP_TIMEOUT of a stop).
        deadline = time.monotonic() + CLEANUP_TIMEOUT
        failed = 0
        for record in added:
            try:
                self._provider.remove(record, cleanup_deadline(deadline))
            except (ChallengeError, DeadlineExceeded, Interrupted) as exc:
                failed += 1
                self.cleanup_problems.append(str(exc))
                log.warning("%s: cannot remove dns-01 TXT value at %s: %s", self.name,
                            record.name, exc)
            except Exception:  # noqa: BLE001 - cleanup must not raise
                failed += 1
                self.cleanup_problems.append(f"removing the value at {record.name} failed")
                log.exception("%s: removing dns-01 TXT value at %s failed", self.name,
                              record.name)
        if getattr(self._provider, "keeps_values", False):  # acme-dns: no delete
            log.info("%s: %d dns-01 TXT value(s) left in place (%s has no delete; the next "
                     "updates replace them)", self.name, len(added), self.challenge.provider)
            return
        log.info("%s: %d dns-01 TXT value(s) removed", self.name, len(added) - failed)


def probe(challenge: ChallengeSettings, name: str, domains: Sequence[str],
          deadline: float) -> str:
    """`check --online`: add a probe TXT value for every domain's `_acme-challenge` name, see
    it on the authoritative servers (when the check is on), remove it. A one-line summary, or
    ChallengeError / DeadlineExceeded."""
    import secrets

    from ..challenges import DNS01, ChallengeResponse

    bases = dict.fromkeys(d.removeprefix("*.") for d in domains)
    # 43 characters of base64url, like a real value: acme-dns refuses any other length.
    value = f"certbatch-probe-{secrets.token_urlsafe(20)}"
    responses = [ChallengeResponse(DNS01, base, "probe", "", value) for base in bases]
    solver = DnsProviderSolver(challenge, name)
    try:
        solver.prepare(responses, deadline)
    finally:
        solver.cleanup()
    if solver.cleanup_problems:
        raise ChallengeError(f"the probe TXT value was added but not removed: "
                             f"{solver.cleanup_problems[0]}")
    written = sorted({r.name for r in solver.written})
    checked = ("seen on every authoritative server" if challenge.propagation == "check"
               else "not checked (propagation: none)")
    if getattr(solver._provider, "keeps_values", False):  # acme-dns: no delete
        return (f"probe TXT added at {', '.join(written)} (left in place: {challenge.provider} "
                f"has no delete); {checked}")
    return f"probe TXT added and removed at {', '.join(written)}; {checked}"
