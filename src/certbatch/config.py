"""Configuration: YAML file -> validated, immutable settings.

Every error names the file, the key path and what is wrong, and is raised before any network call.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
DEFAULT_CONFIG_PATHS = (Path("certbatch.yaml"), Path("/etc/certbatch/certbatch.yaml"))
DEFAULT_STATE = Path("/var/lib/certbatch")
DEFAULT_SPOOL = Path("/var/spool/certbatch")
DEFAULT_HOOKS = Path("/etc/certbatch/hooks")

# A hook command from the config: a string runs through /bin/sh -c (the operator's own text, never
# with data interpolated: data comes in CERTBATCH_* environment variables), a list runs as argv.
HookCommandSpec = str | tuple[str, ...]


@dataclass(frozen=True)
class EAB:
    kid: str
    hmac_key: str  # base64url, as the CA hands it out


@dataclass(frozen=True)
class AcmeSettings:
    directory: str
    email: str | None = None
    ca_bundle: Path | None = None
    eab: EAB | None = None
    timeout: float = 30.0  # seconds, for every HTTP request to the CA


@dataclass(frozen=True)
class PathSettings:
    state: Path = DEFAULT_STATE
    spool: Path = DEFAULT_SPOOL
    hooks: Path = DEFAULT_HOOKS


@dataclass(frozen=True)
class ChallengeSettings:
    type: str  # "http-01" | "dns-01"
    webroot: Path | None = None  # http-01 webroot
    standalone_address: str | None = None  # http-01 standalone (address, port)
    standalone_port: int | None = None
    script: Path | None = None  # dns-01
    wait: float = 0.0  # dns-01: seconds to wait after adding records (propagation)

    @property
    def standalone(self) -> bool:
        return self.standalone_port is not None


@dataclass(frozen=True)
class CertificateSettings:
    name: str
    domains: tuple[str, ...]
    key: str  # one of KEY_TYPES
    challenge: ChallengeSettings
    deploy: HookCommandSpec | None = None


@dataclass(frozen=True)
class RenewalSettings:
    before_expiry: dt.timedelta | None = None  # None: 1/3 of lifetime (1/2 under 10 days)
    workers: int = 4
    deadline: float = 600.0  # seconds one certificate may take, challenges and all
    jitter: float = 0.0  # seconds: random sleep before the first ACME request


@dataclass(frozen=True)
class HookSettings:
    notify: HookCommandSpec | None = None
    deploy_timeout: float = 120.0
    notify_timeout: float = 300.0


@dataclass(frozen=True)
class Settings:
    path: Path  # the config file itself (absolute)
    acme: AcmeSettings
    paths: PathSettings = field(default_factory=PathSettings)
    renewal: RenewalSettings = field(default_factory=RenewalSettings)
    hooks: HookSettings = field(default_factory=HookSettings)
    certificates: dict[str, CertificateSettings] = field(default_factory=dict)  # config order
    log_file: Path | None = None
    metrics_file: Path | None = None


def find_config(explicit: str | os.PathLike[str] | None,
                environ: dict[str, str] | None = None) -> Path:
    """The config file to use: --config, else $CERTBATCH_CONFIG, else ./certbatch.yaml, else /etc."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get("CERTBATCH_CONFIG"):
        return Path(env["CERTBATCH_CONFIG"])
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_CONFIG_PATHS[-1]


def load(path: Path) -> Settings:
    """Read and validate the config file; raise ConfigError naming file, key and problem."""
    raise NotImplementedError
