"""Mean time per issuance step, from the --log-file of a `certbatch renew` (-v not needed).

    python benchmarks/log_steps.py certbatch.log

Matches certbatch's INFO lines per certificate (ordering, TXT added, authorizations valid,
finalizing, issued, staged, done) and prints the mean gap before each step. The first gap
("ordering") includes the wait for a free worker. The TXT records are removed while the order is
finalized: that step is timed from "all authorizations are valid" and printed apart.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections import defaultdict

STEPS = [
    ("decided", r": (force|renew|issue|reissue) \("),
    ("new order sent (incl. wait for a worker)", r"ordering a certificate"),
    ("authorizations fetched", r"authorization\(s\) need"),
    ("TXT records added (dns script)", r"TXT record\(s\) added"),
    ("challenges answered, polled valid", r"all authorizations are valid"),
    ("finalize started", r"finalizing the order"),
    ("finalized, polled, downloaded", r"certificate issued"),
    ("checked, stored, staged", r": staged"),
    ("status saved", r": (renewed|issued) in"),
]
BESIDE = ("TXT records removed (dns script), beside finalizing", r"TXT record\(s\) removed",
          "challenges answered, polled valid")
LINE = re.compile(r"(\S+) \d+ \w+ \S+ ([a-z0-9][a-z0-9._-]*): (.*)")


def main(path: str) -> int:
    seen: dict[str, dict[str, dt.datetime]] = defaultdict(dict)
    with open(path) as fh:
        for line in fh:
            m = LINE.match(line)
            if not m:
                continue
            when, name, text = dt.datetime.fromisoformat(m.group(1)), m.group(2), ": " + m.group(3)
            for step, pattern in [*STEPS, BESIDE[:2]]:
                if step not in seen[name] and re.search(pattern, text):
                    seen[name][step] = when
                    break
    complete = [s for s in seen.values() if all(step in s for step, _ in STEPS)]
    if not complete:
        print("no certificate with every step in this log (was it a renew that issued?)")
        return 1
    print(f"{len(complete)} certificates, mean per step:")
    total = 0.0
    for (before, _), (step, _) in zip(STEPS, STEPS[1:], strict=False):
        mean = sum((s[step] - s[before]).total_seconds() for s in complete) / len(complete)
        total += mean
        print(f"  {mean * 1000:8.1f} ms  {step}")
    print(f"  {total * 1000:8.1f} ms  in all")
    step, _, since = BESIDE
    beside = [s for s in complete if step in s]
    if beside:
        mean = sum((s[step] - s[since]).total_seconds() for s in beside) / len(beside)
        print(f"  ({mean * 1000:6.1f} ms  {step}, from \"{since}\")")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]) if len(sys.argv) == 2 else "usage: log_steps.py LOG_FILE")
