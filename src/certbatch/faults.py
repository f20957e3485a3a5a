"""Crash injection for tests: die by SIGKILL at a named point of a multi-step write.

``CERTBATCH_FAULT=<point>`` kills the process the first time it reaches that point;
``<point>@N`` the N-th time (points inside loops). Several may be given, comma-separated. The
points sit between the fsync, rename and unlink steps of storing a certificate, committing a
staging and applying a batch, so a test can prove that a crash between any two steps loses
nothing. Read once at import; without the variable `point` costs one set lookup.
"""

from __future__ import annotations

import collections
import os
import signal
import threading

_ARMED: dict[str, int] = {}
for _spec in filter(None, os.environ.get("CERTBATCH_FAULT", "").split(",")):
    _name, _, _nth = _spec.strip().partition("@")
    _ARMED[_name] = int(_nth) if _nth.isdigit() else 1
_seen: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def point(name: str) -> None:
    """Die here if the environment armed `name` (and this is its N-th visit)."""
    if name not in _ARMED:
        return
    with _lock:
        _seen[name] += 1
        if _seen[name] == _ARMED[name]:
            os.kill(os.getpid(), signal.SIGKILL)
