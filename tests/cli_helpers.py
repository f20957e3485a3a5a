"""Helpers for end-to-end tests: write a config for a Pebble instance, run the real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DNS_SCRIPT = REPO / "hooks" / "dns" / "challtestsrv.sh"


class NoCA:
    """Stands in for a Pebble instance in configs whose CA must not be, or cannot be,
    contacted: nobody listens on 127.0.0.1:`port` (9, discard: connection refused)."""

    def __init__(self, folder: Path, port: int = 9) -> None:
        self.directory_url = f"https://127.0.0.1:{port}/dir"
        self.ca_bundle = folder / "ca.pem"
        self.ca_bundle.write_text("")
        self.ca_bundle.chmod(0o644)

    def env(self) -> dict[str, str]:
        return {}


def dns01(script: Path = DNS_SCRIPT, **extra: Any) -> dict[str, Any]:
    return {"type": "dns-01", "script": str(script), **extra}


def write_config(folder: Path, pebble: Any, certificates: dict[str, Any],
                 **sections: Any) -> Path:
    """A certbatch.yaml in `folder` for `pebble`; state/spool/hooks below `folder`.

    `sections` are merged into the top-level mapping (e.g. renewal={"workers": 8}).
    Certificates default to dns-01 through the challtestsrv script.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hooks" / "deploy.d").mkdir(parents=True, exist_ok=True)
    (folder / "hooks" / "notify.d").mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "acme": {"directory": pebble.directory_url, "ca_bundle": str(pebble.ca_bundle)},
        "paths": {"state": "./state", "spool": "./spool", "hooks": "./hooks"},
        "defaults": {"challenge": dns01()},
        "certificates": certificates,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path = folder / "certbatch.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(args: list[str], config: Path | None, pebble: Any = None,
        env: dict[str, str] | None = None, timeout: float = 240,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run `certbatch ARGS` as a real process without a terminal (like cron)."""
    full_env = dict(os.environ)
    full_env.pop("CERTBATCH_CONFIG", None)
    if pebble is not None:
        full_env.update(pebble.env())
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "certbatch", *args]
    if config is not None:
        cmd += ["-c", str(config)]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


def live(folder: Path, name: str) -> dict[str, Any]:
    """meta.json of the live certificate set of `name` under folder/state."""
    meta: dict[str, Any] = json.loads(
        (folder / "state" / "certs" / name / "live" / "meta.json").read_text())
    return meta


def probe_hook(path: Path, probe_dir: Path, exit_code: int = 0, extra: str = "") -> Path:
    """An executable hook that appends its environment (CERTBATCH_* only) as one JSON line to
    probe_dir/<hook name>.jsonl, runs `extra` shell code, and exits with `exit_code`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!{sys.executable}
import json, os, sys, subprocess
env = {{k: v for k, v in os.environ.items() if k.startswith("CERTBATCH_")}}
env["cwd"] = os.getcwd()
with open({str(probe_dir / path.name)!r} + ".jsonl", "a") as fh:
    fh.write(json.dumps(env) + "\\n")
extra = {extra!r}
if extra:
    subprocess.run(["/bin/sh", "-c", extra], check=True)
sys.exit({exit_code})
""")
    path.chmod(0o755)
    return path


def probe_lines(probe_dir: Path, hook_name: str) -> list[dict[str, str]]:
    f = probe_dir / f"{hook_name}.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
