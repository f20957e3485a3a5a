"""The apply phase: hand each target what it has not applied yet, all targets in parallel.

Each target gets its own batch: the pending entries whose serial its ledger lacks, written to its
own batch and names files. Targets never wait for or stop each other; a target that fails, times
out or cannot run keeps its entries (its ledger is unchanged for them) and gets them again, with
anything staged since, on the next run. Its ledger is written when it ends, success or not.

Interrupted (a signal, see interrupt.py): a target not started yet does not start and its
ledger is left alone; a running one is stopped (hooks.run_hook) and counts as failed, its
ledger keeps lacking those entries. The caller holds the spool lock until every target has
returned, so no notify hook of a later run can overlap one that is being stopped.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import interrupt
from ..errors import CertbatchError, os_error_message
from ..faults import point
from ..fsutil import ensure_dir
from ..hooks import HookResult, run_hook
from ..targets import Target
from .entries import PendingEntry
from .env import Records, batch_json, notify_env, write_handover
from .ledger import FAILED, OK, Ledger, Ledgers
from .staging import remove

log = logging.getLogger("certbatch.spool")


@dataclass
class TargetOutcome:
    """What one target did in a notify phase. `result` is None when it did not run: nothing
    was waiting for it (`ok`), or it cannot run (`error` says why)."""

    target: str
    names: list[str]
    result: HookResult | None
    ok: bool
    error: str | None = None

    @property
    def ran(self) -> bool:
        return self.result is not None


@dataclass
class Batch:
    """What every target of one notify phase shares."""

    batch_id: str
    spool_root: Path
    failed_names: Sequence[str]
    records: Records = field(default_factory=Records)  # for its batch files


def apply_all(batch: Batch, targets: Sequence[Target], entries: Sequence[PendingEntry],
              ledgers: Ledgers, loaded: Mapping[str, Ledger], workers: int) -> list[TargetOutcome]:
    """Run every target that has entries waiting, at most `workers` at a time (1: one by one,
    in name order); update `loaded` ledgers in place and on disk. Outcomes in target order."""

    def one(target: Target) -> TargetOutcome:
        return apply_one(batch, target, loaded[target.name].waiting(entries), ledgers,
                         loaded[target.name])

    if workers <= 1 or len(targets) <= 1:
        return [one(t) for t in targets]
    with ThreadPoolExecutor(max_workers=min(workers, len(targets)),
                            thread_name_prefix="certbatch-target") as pool:
        return list(pool.map(one, targets))


def apply_one(batch: Batch, target: Target, waiting: Sequence[PendingEntry], ledgers: Ledgers,
              ledger: Ledger) -> TargetOutcome:
    names = [e.name for e in waiting]
    if not waiting:
        return TargetOutcome(target.name, [], None, True)
    if interrupt.requested():  # not started: nothing to record, it gets them next run
        return TargetOutcome(target.name, names, None, False,
                             f"target {target.name} not started: interrupted")
    now = dt.datetime.now(dt.timezone.utc)
    ledger.last_attempt = now
    result = None
    error: str | None
    if target.problem or target.command is None:
        error = f"target {target.name} cannot run: {target.problem}"
    else:
        try:
            result = _run(batch, target, waiting, ledgers)
            error = None if result.ok else str(result.error())
        except OSError as exc:  # its files could not be written
            error = f"target {target.name}: cannot hand over the batch: " \
                    f"{os_error_message(exc, ledgers.folder(target.name))}"
        except CertbatchError as exc:
            error = f"target {target.name}: cannot hand over the batch: {exc}"
    if error is None:
        ledger.applied.update((e.name, e.serial) for e in waiting)
        ledger.last_success, ledger.last_result, ledger.last_error = now, OK, None
        log.info("spool: target %s applied %d certificate(s)", target.name, len(waiting))
    else:
        ledger.last_result, ledger.last_error = FAILED, error
        log.warning("spool: %s; %d certificate(s) stay pending for it", error, len(waiting))
    try:
        ledgers.save(ledger)
    except OSError as exc:
        # Not recorded: the target gets these entries again next time (re-applying is safe).
        log.error("spool: cannot save the ledger of target %s: %s", target.name, exc)
    point("apply.ledger-saved")
    return TargetOutcome(target.name, names, result, error is None, error)


def _run(batch: Batch, target: Target, waiting: Sequence[PendingEntry],
         ledgers: Ledgers) -> HookResult:
    assert target.command is not None
    folder = ensure_dir(ledgers.folder(target.name), 0o700)
    names = [e.name for e in waiting]
    write_handover(folder, batch_json(batch.batch_id, target.name, batch.spool_root, waiting,
                                      batch.failed_names, batch.records), names)
    # The target's own settings first: certbatch's variables cannot be overridden.
    env = {**target.env, **notify_env(batch.spool_root, target.name, folder, names,
                                      batch.failed_names)}
    point("apply.target-starting")
    result = run_hook(target.command, env, batch.spool_root, target.timeout)
    point("apply.target-ran")
    if result.ok:  # kept after a failure, for the operator to look at
        remove(folder / "batch.json")
        remove(folder / "names")
    return result
