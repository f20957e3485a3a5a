"""A cache of large validated configs, so that a cron run over thousands of certificates does
not parse and check thousands of YAML entries every time.

Reading and validating a config of 10,000 certificates takes most of a second; loading the
validated Settings back takes a few hundredths. Only configs with at least CACHE_FROM
certificates are cached (below that, parsing is quicker than caring), in CACHE_DIR (root) or
~/.cache/certbatch, one file per config path, 0600 in a 0700 folder of the user's own.

An entry is used only while the config file has the very content it was made from (its
SHA-256: a millisecond for 10,000 certificates, and no edit slips through within one tick of
the file system's clock), at the same path, with the same certbatch version and validating
code (config.py's SHA-256). It holds pickled Settings (plain frozen dataclasses): pickle runs
code on load, so the file is read only from a folder and file that are certbatch's user's own
and writable by no one else (safefs), like the state folder. It holds what the config holds,
secrets included, hence 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
from pathlib import Path

from . import __version__, safefs
from .config import Settings, load, outside_changed

log = logging.getLogger("certbatch.config")

CACHE_FROM = 500  # certificates
CACHE_DIR = Path("/var/cache/certbatch")
FORMAT = 1


def cache_dir() -> Path:
    """$CERTBATCH_CACHE_DIR, else /var/cache/certbatch for root, else ~/.cache/certbatch."""
    if os.environ.get("CERTBATCH_CACHE_DIR"):
        return Path(os.environ["CERTBATCH_CACHE_DIR"])
    if os.geteuid() == 0:
        return CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "certbatch"


def _rules() -> str:
    """The SHA-256 of the validating code (config.py and config_yaml.py's parser, whose module
    is not imported for this): a changed rule, in a development tree or an upgrade that kept
    the version number, never serves a result of the old rules."""
    from . import config

    digest = hashlib.sha256()
    try:
        for name in ("config.py", "config_yaml.py"):
            with open(os.path.join(os.path.dirname(config.__file__), name), "rb") as fh:
                digest.update(fh.read())
    except OSError:
        return "unknown"
    return digest.hexdigest()


def load_cached(path: Path, write: bool = True) -> Settings:
    """config.load(path), from the cache when the file is unchanged (see the module doc).
    `write=False`: a command that writes nothing (status, check, a dry run) reads the cache
    but never creates or updates it."""
    abs_path = os.path.abspath(path)
    try:
        with open(abs_path, "rb") as fh:
            content = fh.read()
    except OSError:
        return load(path)  # the loader says what is wrong with it
    if content.count(b"\n") < CACHE_FROM:  # fewer lines than certificates to cache
        return load(path)
    entry = cache_dir() / (hashlib.sha256(abs_path.encode()).hexdigest()[:24] + ".pickle")
    key = (FORMAT, __version__, _rules(), abs_path, hashlib.sha256(content).hexdigest())
    cached = _read(entry, key)
    if cached is not None:
        return cached
    settings = load(path)
    if write and len(settings.certificates) >= CACHE_FROM:
        _write(entry, key, settings)
    return settings


def _read(entry: Path, key: tuple[object, ...]) -> Settings | None:
    try:
        safefs.check_parents(entry.parent)
        safefs.check_dir(entry.parent)
        data = pickle.loads(safefs.read_bytes(entry))  # noqa: S301 - our own file, see above
        if not isinstance(data, tuple) or len(data) != 2 or data[0] != key \
                or not isinstance(data[1], Settings):
            return None
        settings: Settings = data[1]
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a cache: anything wrong means "load the file"
        log.info("ignoring the config cache %s: %s", entry, exc)
        return None
    if outside_changed(settings):  # e.g. the spool became a link to the state folder
        return None  # load() says what is wrong
    return settings


def _write(entry: Path, key: tuple[object, ...], settings: Settings) -> None:
    from .fsutil import atomic_write

    try:
        folder = entry.parent
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True)
            os.chmod(folder, 0o700)
        safefs.check_dir(folder)
        atomic_write(entry, pickle.dumps((key, settings), protocol=pickle.HIGHEST_PROTOCOL),
                     0o600, durable=False)
    except Exception as exc:  # noqa: BLE001 - a cache: the run goes on without it
        log.info("could not write the config cache %s: %s", entry, exc)
        with contextlib.suppress(OSError):
            os.unlink(entry)
