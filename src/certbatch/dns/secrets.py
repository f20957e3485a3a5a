"""Which secrets the configuration holds, and which files holding them others can read.

The inline ones (a TSIG secret, the EAB HMAC key, lexicon credentials) are replaced in every log
line; the files (the config itself when it holds one, each tsig_secret_file, lexicon
credentials_file and acme-dns accounts_file) are a warning in `check` when group or others may
read them. Only the mode is looked at: the content stays unread until needed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..config import Settings

# Shorter inline lexicon option values (a port, a region, an id) are not redacted: replacing
# "443" in every log line would garble the log and protect nothing.
MIN_REDACTED = 6


def inline_secrets(settings: Settings) -> list[str]:
    """Secrets written in the config file itself."""
    found = [settings.acme.eab.hmac_key] if settings.acme.eab else []
    for cert in settings.certificates.values():
        s = cert.challenge.rfc2136
        if s is not None and s.tsig_secret:
            found.append(s.tsig_secret)
        lx = cert.challenge.lexicon
        if lx is not None and lx.credentials:
            # Every option value: which of a provider's options are secret is its own affair.
            found += [v for _, v in lx.credentials if len(v) >= MIN_REDACTED]
    return list(dict.fromkeys(found))


def secret_files(settings: Settings) -> list[Path]:
    """The files that hold a secret: the config when it has one inline, every secret file."""
    files = [settings.path] if inline_secrets(settings) else []
    for cert in settings.certificates.values():
        s = cert.challenge.rfc2136
        if s is not None and s.tsig_secret_file is not None:
            files.append(s.tsig_secret_file)
        lx, adns = cert.challenge.lexicon, cert.challenge.acme_dns
        if lx is not None and lx.credentials_file is not None:
            files.append(lx.credentials_file)
        if adns is not None:
            files.append(adns.accounts_file)
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
