"""Which secrets the configuration holds, and which files holding them others can read.

The inline ones (a TSIG secret, the EAB HMAC key) are replaced in every log line; the files
(the config itself when it holds one, each tsig_secret_file) are a warning in `check` when group
or others may read them. Only the mode is looked at: the content stays unread until needed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..config import Settings


def inline_secrets(settings: Settings) -> list[str]:
    """Secrets written in the config file itself."""
    found = [settings.acme.eab.hmac_key] if settings.acme.eab else []
    for cert in settings.certificates.values():
        s = cert.challenge.rfc2136
        if s is not None and s.tsig_secret:
            found.append(s.tsig_secret)
    return list(dict.fromkeys(found))


def secret_files(settings: Settings) -> list[Path]:
    """The files that hold a secret: the config when it has one inline, every secret file."""
    files = [settings.path] if inline_secrets(settings) else []
    for cert in settings.certificates.values():
        s = cert.challenge.rfc2136
        if s is not None and s.tsig_secret_file is not None:
            files.append(s.tsig_secret_file)
    return list(dict.fromkeys(files))


def exposure_warnings(settings: Settings) -> list[str]:
    """One line per secret-holding file that group or others may read."""
    out = []
    for path in secret_files(settings):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a missing secret file is its certificate's problem, reported as such
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            out.append(f"{path} holds a secret and is readable by group or others (mode "
                       f"{stat.S_IMODE(mode):04o}): chmod 600 it")
    return out
