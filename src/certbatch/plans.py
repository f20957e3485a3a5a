"""What `run-hook --dry-run` would do, as data: the notify phase (`notify_plan`) or the staging
of one stored certificate again (`deploy_plan`). Nothing here runs, writes or prints; the
command line renders the plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hooks import HookCommand
    from .runner import Runner
    from .spool.entries import PendingEntry
    from .store import StoredCert


@dataclass(frozen=True)
class PendingItem:
    """A pending entry and the files in its folder (sorted; none when the folder is gone)."""

    entry: PendingEntry
    files: tuple[str, ...]


@dataclass(frozen=True)
class TargetPlan:
    """What one notify target would do: nothing when it cannot run (`problem`) or has every
    pending entry (`names` empty); else run `command` with `names` and `env`."""

    name: str
    problem: str | None = None
    names: tuple[str, ...] = ()
    command: HookCommand | None = None
    timeout: float = 0
    env: dict[str, str] = field(default_factory=dict)  # its own env, then CERTBATCH_*


@dataclass
class NotifyPlan:
    pending: list[PendingItem]
    # With --all: the target whose applied entries would be forgotten, and the live
    # certificates (not pending) that would be staged again for it.
    restage_for: str | None = None
    restage: list[str] = field(default_factory=list)
    has_targets: bool = True  # False: no notify target at all, the batch is marked applied
    targets: list[TargetPlan] = field(default_factory=list)  # the selected ones, by name

    @property
    def nothing_pending(self) -> bool:
        return self.restage_for is None and not self.pending


@dataclass(frozen=True)
class DeployPlan:
    """Staging `name` again: its live certificate (None: not issued yet, nothing to stage),
    the folder the deploy hooks would run in, their environment and the hooks in order."""

    name: str
    stored: StoredCert | None
    folder: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    commands: list[HookCommand] = field(default_factory=list)


def notify_plan(runner: Runner, only: Sequence[str] = (), all_live: bool = False) -> NotifyPlan:
    """What `run-hook [--target NAME...] [--all] --dry-run` would do. With `all_live`, `only`
    is the one target that would get every live certificate."""
    pending = runner.spool.pending()
    targets = runner.targets()
    plan = NotifyPlan([PendingItem(p, _files(p.folder)) for p in pending])
    if all_live:
        waiting = {p.name for p in pending}
        plan.restage_for = only[0]
        plan.restage = [n for n in runner.settings.certificates
                        if runner.store.current(n) is not None and n not in waiting]
    elif not pending:
        return plan
    plan.has_targets = bool(targets)
    for state in runner.spool.target_states(targets):
        t = state.target
        if only and t.name not in only:
            continue
        if t.problem:
            plan.targets.append(TargetPlan(t.name, problem=t.problem))
            continue
        names = state.waiting if not all_live else sorted(set(state.waiting) | set(plan.restage))
        if not names:
            plan.targets.append(TargetPlan(t.name))
            continue
        plan.targets.append(TargetPlan(t.name, names=tuple(names), command=t.command,
                                       timeout=t.timeout, env=runner.spool.target_env(t, names)))
    return plan


def deploy_plan(runner: Runner, name: str) -> DeployPlan:
    """What `run-hook --deploy NAME --dry-run` would do."""
    stored = runner.store.current(name)
    if stored is None:
        return DeployPlan(name, None)
    folder = runner.spool.deploy_folder_shown(name)
    cert = runner.settings.certificates[name]
    return DeployPlan(name, stored, folder,
                      env=runner.spool.deploy_env(name, stored.domains, folder),
                      commands=runner.spool.deploy_commands(runner.deploy_hooks(cert)))


def _files(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(f.name for f in folder.iterdir())) if folder.exists() else ()
