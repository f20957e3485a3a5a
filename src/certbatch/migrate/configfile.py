"""The config file the import adds to: what it needs to know of it before changing it, and
loading a changed text before it is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .. import config as config_mod
from ..errors import UsageError, os_error_message
from .mapping import NewFile


class ExistingConfig:
    """What the import needs of the config file before it changes it: whether it exists, its
    text, its CA, its state folder and its certificate entries (raw YAML)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.exists = os.path.lexists(path)
        self.text = ""
        self.directory: str | None = None
        self.state = config_mod.DEFAULT_STATE
        self.certificates: dict[str, Any] = {}
        self.defaults: dict[str, Any] = {}
        self.profile: str | None = None
        if not self.exists:
            return
        if os.path.islink(path):
            raise UsageError(f"{path}: is a symlink; give --config the file it points to "
                             f"(certbatch does not replace a link it did not make)")
        try:
            self.text = path.read_bytes().decode("utf-8-sig")  # line breaks as they are
        except (OSError, UnicodeDecodeError) as exc:
            why = os_error_message(exc, path) if isinstance(exc, OSError) else f"{path}: {exc}"
            raise UsageError(why) from None
        try:
            data = yaml.safe_load(self.text) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
        acme = data.get("acme") if isinstance(data, dict) else None
        if not isinstance(acme, dict) or not isinstance(acme.get("directory"), str):
            raise UsageError(f"{path}: acme.directory is missing; it names the CA to import "
                             f"for")
        self.directory = acme["directory"]
        self.profile = acme.get("profile") if isinstance(acme.get("profile"), str) else None
        defaults = data.get("defaults")
        self.defaults = defaults if isinstance(defaults, dict) else {}
        paths = data.get("paths") or {}
        state = paths.get("state") if isinstance(paths, dict) else None
        if isinstance(state, str) and state.strip():
            p = Path(state)
            self.state = p if p.is_absolute() else Path(os.path.abspath(path)).parent / p
        certs = data.get("certificates")
        self.certificates = certs if isinstance(certs, dict) else {}


def load_text(text: str, path: Path, new_files: list[NewFile]) -> config_mod.Settings:
    """config.load for a text not on disk yet (paths relative to `path`'s folder). Scripts the
    import will write are not there yet: while loading, they count as existing executables."""
    import tempfile

    abs_path = Path(os.path.abspath(path))
    with tempfile.TemporaryDirectory(prefix="certbatch-import-") as tmp:
        swapped = text
        for f in new_files:  # stand-ins with the same mode, in a private folder
            stand_in = Path(tmp) / f.path.name
            stand_in.write_text(f.content)
            stand_in.chmod(f.mode)
            swapped = swapped.replace(str(f.path), str(stand_in))
        return config_mod.loads(swapped, abs_path)
