"""Apply targets: every notify hook is a named target that the spool applies to on its own.

The targets of a run are each file in ``<hooks>/notify.d/`` (named by its file name), each entry
of ``hooks.targets`` with a command, and ``hooks.notify`` as the target ``notify``. An entry of
``hooks.targets`` without a command sets the timeout and environment of the notify.d file of its
name. A notify.d file that cannot run (not executable, a dangling symlink) is still a target: one
that always fails, so the entries it should get stay pending and the run says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import TARGET_NAME_RE, HookSettings
from .errors import ConfigError
from .hooks import HookCommand, from_config, scan


@dataclass(frozen=True)
class Target:
    """One notify target. `problem` set: it cannot run, and counts as failed every time."""

    name: str
    source: str  # where it comes from, for messages: a path or a config key
    command: HookCommand | None
    timeout: float
    env: Mapping[str, str] = field(default_factory=dict)
    problem: str | None = None


def resolve(hooks_dir: Path, hooks: HookSettings, config_file: Path | str = "") -> list[Target]:
    """The current targets, sorted by name.

    Raises ConfigError when the config and notify.d disagree: an entry without a command that
    names no notify.d file, or an entry with a command whose name a notify.d file has too.
    """
    found: dict[str, Target] = {}
    folder = hooks_dir / "notify.d"
    for f in scan(folder):
        if f.state == "skip":
            continue
        settings = hooks.targets.get(f.name)
        timeout = settings.timeout if settings and settings.timeout else hooks.notify_timeout
        env = dict(settings.env) if settings else {}
        problem = f"{f.path}: {f.why}" if f.state == "problem" else None
        if problem is None and not TARGET_NAME_RE.fullmatch(f.name):
            problem = (f"{f.path}: not usable as a target name (letters, digits, '.', '_' and"
                       " '-', at most 64)")
        found[f.name] = Target(f.name, str(f.path), None if problem else f.command, timeout,
                               env, problem)
    for name, t in hooks.targets.items():
        key = f"hooks.targets.{name}"
        if t.command is None:
            if name not in found:
                raise ConfigError(config_file, key, f"no command, and there is no {folder}/"
                                                    f"{name} for its settings to apply to")
            continue
        if name in found:
            raise ConfigError(config_file, f"{key}.command",
                              f"{folder}/{name} is a target of that name too; rename one")
        (command,) = from_config(t.command, name)
        found[name] = Target(name, key, command, t.timeout or hooks.notify_timeout,
                             dict(t.env))
    if hooks.notify is not None:
        if "notify" in found:
            raise ConfigError(config_file, "hooks.notify",
                              f"{folder}/notify is a target named 'notify' too; rename it")
        (command,) = from_config(hooks.notify, "notify")
        found["notify"] = Target("notify", "hooks.notify", command, hooks.notify_timeout)
    return [found[name] for name in sorted(found)]
