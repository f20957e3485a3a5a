"""What hooks are handed: environment variables, and a notify target's batch and names files.

Data reaches hooks only through these (never interpolated into a command). A name list can be
long (5,000 certificates of 64 characters is 325 KB, and Linux refuses one environment string
over 128 KiB), so a list variable is left out, with ``<VAR>_TRUNCATED=1``, when it would exceed
NAMES_ENV_MAX; the names file and the batch file always hold every name.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path

from ..fsutil import atomic_write
from ..store import iso
from .entries import PendingEntry

NAMES_ENV_MAX = 64 * 1024
BATCH_VERSION = 2  # 2: one batch file per target (1 was one batch for all notify hooks)


def deploy_env(spool_root: Path, cert_name: str, domains: Sequence[str],
               stage_dir: Path) -> dict[str, str]:
    """A deploy hook's variables: the certificate and the folder it works in."""
    stage_dir = Path(stage_dir)
    return {
        "CERTBATCH_NAME": cert_name,
        "CERTBATCH_DOMAINS": " ".join(domains),
        "CERTBATCH_STAGE_DIR": str(stage_dir),
        "CERTBATCH_KEY_FILE": str(stage_dir / "privkey.pem"),
        "CERTBATCH_CERT_FILE": str(stage_dir / "cert.pem"),
        "CERTBATCH_CHAIN_FILE": str(stage_dir / "chain.pem"),
        "CERTBATCH_FULLCHAIN_FILE": str(stage_dir / "fullchain.pem"),
        "CERTBATCH_SPOOL_DIR": str(spool_root),
    }


def name_list(var: str, names: Sequence[str]) -> dict[str, str]:
    """`var` = the names space-separated, or `var`_TRUNCATED=1 when that is too long."""
    joined = " ".join(names)
    if len(joined.encode()) > NAMES_ENV_MAX:
        return {f"{var}_TRUNCATED": "1"}
    return {var: joined}


def notify_env(spool_root: Path, target: str, folder: Path, names: Sequence[str],
               failed_names: Sequence[str]) -> dict[str, str]:
    """A notify target's variables; `folder` is the target's folder holding its files."""
    return {
        "CERTBATCH_SPOOL_DIR": str(spool_root),
        "CERTBATCH_TARGET": target,
        "CERTBATCH_BATCH_FILE": str(folder / "batch.json"),
        "CERTBATCH_NAMES_FILE": str(folder / "names"),
        "CERTBATCH_COUNT": str(len(names)),
        **name_list("CERTBATCH_NAMES", names),
        **name_list("CERTBATCH_FAILED_NAMES", failed_names),
    }


class Records:
    """Each pending entry's record in the batch files, as JSON, made once per notify phase: an
    entry goes into its targets' batch.json and into applied/<batch-id>/batch.json, and at
    10,000 entries making the records and their JSON takes 0.1 s a file."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, str, Path], str] = {}

    def json(self, e: PendingEntry) -> str:
        key = (e.name, e.serial, e.folder)
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = json.dumps({
                "name": e.name,
                "domains": list(e.domains),
                "serial": e.serial,
                "not_after": iso(e.not_after),
                "staged_at": iso(e.staged_at),
                "folder": str(e.folder),
            })
        return made


def batch_json(batch_id: str, target: str | None, spool_root: Path,
               entries: Sequence[PendingEntry], failed_names: Sequence[str],
               records: Records | None = None) -> str:
    """The batch file (schema in docs/batch.schema.json; `target` None for the record kept in
    applied/<batch-id>/): indented as json.dumps(indent=2) indents it, but each certificate on
    one line (indent= makes json use its pure-Python encoder: 0.8 s for a batch of 10,000
    certificates, against 0.1 s)."""
    head = {
        "version": BATCH_VERSION,
        "batch_id": batch_id,
        "target": target,
        "created_at": iso(dt.datetime.now(dt.timezone.utc)),
        "spool_dir": str(spool_root),
        "count": len(entries),
        "names": [e.name for e in entries],
        "failed_names": list(failed_names),
    }
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in head.items()]
    records = records or Records()
    certificates = "[\n    " + ",\n    ".join(records.json(e) for e in entries) + "\n  ]" \
        if entries else "[]"
    lines.append(f'  "certificates": {certificates}')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_handover(folder: Path, batch: str, names: Sequence[str]) -> None:
    """Write a target's batch.json (`batch_json`) and names files (0600) into its folder."""
    atomic_write(folder / "batch.json", batch, 0o600)
    atomic_write(folder / "names", "".join(f"{n}\n" for n in names), 0o600)
