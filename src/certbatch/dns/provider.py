"""The interface a DNS provider implements for dns-01.

A provider adds ONE value to the TXT record set at a name and later removes only that value:
``example.com`` and ``*.example.com`` both publish at ``_acme-challenge.example.com.`` and the CA
must see both values at once, so replacing the set (or deleting all of it) would make one of the
two authorizations fail. Two certificates validating the same name at once need the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import ChallengeError


class NotApplied(ChallengeError):
    """The provider knows the change was not made (refused, bad key): nothing to undo.
    Any other error leaves the value to be removed, since the change may have happened."""


@dataclass(frozen=True)
class TxtRecord:
    """One TXT value to publish: `name` is absolute (trailing dot), after CNAME following;
    `zone` is the zone it is written in (absolute), found by SOA lookup unless configured."""

    name: str
    zone: str
    value: str


class Provider(Protocol):
    """Raise ChallengeError (one line, never a secret; NotApplied when sure nothing changed)
    or DeadlineExceeded on failure."""

    def add(self, record: TxtRecord, deadline: float) -> None:
        """Add `record.value` to the TXT set at `record.name`, keeping the values already there."""

    def remove(self, record: TxtRecord, deadline: float) -> None:
        """Remove only `record.value` from the set; a value already gone is not an error."""
