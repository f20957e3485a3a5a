"""Configuration: YAML file -> validated, immutable settings.

Every error names the file, the key path and what is wrong, and is raised before any network call.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from certbatch.errors import ConfigError
from certbatch.hooks import RESERVED_ENV

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
    profile: str | None = None  # ACME profile for every certificate that names none itself


@dataclass(frozen=True)
class PathSettings:
    state: Path = DEFAULT_STATE
    spool: Path = DEFAULT_SPOOL
    hooks: Path = DEFAULT_HOOKS


@dataclass(frozen=True)
class Rfc2136Settings:
    """dns-01 `provider: rfc2136`: where updates go and the TSIG key that signs them."""

    server: tuple[str, int]  # (IP address, port) of the primary that accepts updates
    tsig_key: str  # key name, absolute (trailing dot)
    tsig_secret: str | None = field(default=None, repr=False)  # base64; or tsig_secret_file
    tsig_secret_file: Path | None = None  # read when a certificate needs it, not at load
    tsig_algorithm: str = "hmac-sha256"
    zone: str | None = None  # absolute; None: found by SOA lookup


@dataclass(frozen=True)
class LexiconSettings:
    """dns-01 `provider: lexicon`: a DNS provider's API through dns-lexicon (optional extra)."""

    provider: str  # lexicon's provider name (cloudflare, powerdns, ...), checked when used
    # The provider's options (auth_token, ...): inline, or a YAML/JSON file read when needed.
    credentials: tuple[tuple[str, str], ...] | None = field(default=None, repr=False)
    credentials_file: Path | None = None
    zone: str | None = None  # absolute; None: found by SOA lookup


@dataclass(frozen=True)
class AcmeDnsSettings:
    """dns-01 `provider: acme-dns`: an acme-dns server and the accounts registered with it."""

    api: str  # base URL (https://, or http:// to a loopback address)
    accounts_file: Path  # JSON: domain -> username, password, subdomain, fulldomain


@dataclass(frozen=True)
class ChallengeSettings:
    type: str  # "http-01" | "dns-01"
    webroot: Path | None = None  # http-01 webroot
    standalone_address: str | None = None  # http-01 standalone (address, port)
    standalone_port: int | None = None
    script: Path | None = None  # dns-01: a script, or a provider
    wait: float = 0.0  # dns-01: seconds to wait after adding records (propagation)
    calls: str = "per-record"  # dns-01: one script run per record, or per certificate
    provider: str | None = None  # dns-01: one of DNS_PROVIDERS
    rfc2136: Rfc2136Settings | None = None
    lexicon: LexiconSettings | None = None
    acme_dns: AcmeDnsSettings | None = None
    follow_cnames: bool = True  # dns-01: write at the end of _acme-challenge's CNAME chain
    propagation: str = "none"  # dns-01: "check" the authoritative servers, or "none"
    propagation_timeout: float = 120.0
    resolver: tuple[str, int] | None = None  # for CNAME/SOA/NS lookups; None: the system's
    nameserver_port: int = 53  # where the propagation check asks authoritative servers
    # http-01: (domain, webroot) pairs of `webroot_map`; `webroot` serves the names not in it.
    webroot_map: tuple[tuple[str, Path], ...] = ()

    @property
    def standalone(self) -> bool:
        return self.standalone_port is not None

    def webroot_for(self, domain: str) -> Path | None:
        """The http-01 webroot of `domain`: its own in `webroot_map`, else `webroot`."""
        return dict(self.webroot_map).get(domain.lower(), self.webroot)

    @property
    def webroots(self) -> tuple[Path, ...]:
        """Every http-01 webroot, each once: `webroot` first, then the map's in its order."""
        roots = ([self.webroot] if self.webroot is not None else []) + \
            [root for _, root in self.webroot_map]
        return tuple(dict.fromkeys(roots))


@dataclass(frozen=True)
class CertificateSettings:
    name: str
    domains: tuple[str, ...]
    key: str  # one of KEY_TYPES
    challenge: ChallengeSettings
    deploy: HookCommandSpec | None = None
    # The ACME profile to order with: its own, else acme.profile; None: the CA's default.
    profile: str | None = None


@dataclass(frozen=True)
class RenewalSettings:
    before_expiry: dt.timedelta | None = None  # None: 1/3 of lifetime (1/2 under 10 days)
    workers: int = 16  # best measured on 2 cores; pacer.py keeps the CA safe
    deadline: float = 600.0  # seconds one certificate may take, challenges and all
    jitter: float = 0.0  # seconds: random sleep before the first ACME request
    ari: bool = True  # ask the CA's renewalInfo (RFC 9773) when it offers it


@dataclass(frozen=True)
class TargetSettings:
    """One entry of `hooks.targets`: a notify target with its own command, timeout and env.

    Without `command` the entry only sets `timeout`/`env` for the notify.d file of that name.
    """

    name: str
    command: HookCommandSpec | None = None
    timeout: float | None = None  # None: hooks.notify_timeout
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class HookSettings:
    notify: HookCommandSpec | None = None
    deploy_timeout: float = 120.0
    notify_timeout: float = 300.0
    notify_workers: int = 4
    # Deploy hooks (of different certificates) running at once; None: as many as renewal
    # workers stage at once, since each hook works only in its own staging folder.
    deploy_workers: int | None = None
    targets: dict[str, TargetSettings] = field(default_factory=dict)


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


def missing_config_hint(explicit: str | os.PathLike[str] | None,
                        environ: dict[str, str] | None = None) -> str:
    """Where the config path came from, for a "file not found" (issue 15: a user must see
    where certbatch looked and why)."""
    env = os.environ if environ is None else environ
    if explicit:
        return "named by --config"
    if env.get("CERTBATCH_CONFIG"):
        return "named by $CERTBATCH_CONFIG"
    looked = " and ".join(str(p if p.is_absolute() else Path.cwd() / p)
                          for p in DEFAULT_CONFIG_PATHS)
    return f"looked for {looked} (give another with --config or $CERTBATCH_CONFIG)"


def find_config(explicit: str | os.PathLike[str] | None,
                environ: dict[str, str] | None = None) -> Path:
    """The config file: --config, else $CERTBATCH_CONFIG, else ./certbatch.yaml, else /etc."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get("CERTBATCH_CONFIG"):
        return Path(env["CERTBATCH_CONFIG"])
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_CONFIG_PATHS[-1]


# --- Loading -------------------------------------------------------------------------------------

CHALLENGE_TYPES = ("http-01", "dns-01")
DEFAULT_KEY_TYPE = "ec-p256"
DEFAULT_STANDALONE_ADDRESS = "0.0.0.0"
DEFAULT_STANDALONE_PORT = 80

_TOP_KEYS = ("acme", "paths", "renewal", "hooks", "logging", "metrics", "defaults", "certificates")
_ACME_KEYS = ("directory", "email", "ca_bundle", "eab", "timeout", "profile")
_EAB_KEYS = ("kid", "hmac_key")
_PATHS_KEYS = ("state", "spool", "hooks")
_RENEWAL_KEYS = ("before_expiry", "workers", "deadline", "jitter", "ari")
_HOOKS_KEYS = ("notify", "deploy_timeout", "notify_timeout", "notify_workers", "deploy_workers",
               "targets")
_TARGET_KEYS = ("command", "timeout", "env")
# Target names become folder names in the spool and appear in messages and metrics labels.
TARGET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FILE_KEYS = ("file",)
_DEFAULTS_KEYS = ("key", "challenge", "deploy")
_CERT_KEYS = ("domains", "key", "challenge", "deploy", "profile")
_CHALLENGE_KEYS = {
    "http-01": ("type", "webroot", "webroot_map", "standalone"),
    "dns-01": ("type", "script", "provider", "wait", "calls", "follow_cnames", "propagation",
               "propagation_timeout", "resolver", "nameserver_port", "server", "tsig_key",
               "tsig_secret", "tsig_secret_file", "tsig_algorithm", "zone", "lexicon_provider",
               "credentials", "credentials_file", "api", "accounts_file"),
}
_ANY_CHALLENGE_KEYS = (*_CHALLENGE_KEYS["http-01"], *_CHALLENGE_KEYS["dns-01"][1:])
DNS_CALLS = ("per-record", "per-certificate")
DNS_PROVIDERS = ("rfc2136", "lexicon", "acme-dns")  # see docs/dns.md
DNS_PROPAGATION = ("check", "none")
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha512", "hmac-sha384", "hmac-sha224", "hmac-sha1",
                   "hmac-md5")
_RFC2136_KEYS = ("server", "tsig_key", "tsig_secret", "tsig_secret_file", "tsig_algorithm",
                 "zone")
_LEXICON_KEYS = ("lexicon_provider", "credentials", "credentials_file", "zone")
_ACMEDNS_KEYS = ("api", "accounts_file")
_PROVIDER_KEYS = {"rfc2136": _RFC2136_KEYS, "lexicon": _LEXICON_KEYS, "acme-dns": _ACMEDNS_KEYS}
_SCRIPT_KEYS = ("calls",)
_STANDALONE_KEYS = ("port", "address")

_CERT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_CERT_NAME_MAX = 64
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
# The common case in one match; only names that fail it go through the slower diagnosis.
_DOMAIN_RE = re.compile(rf"(?:\*\.)?(?:{_LABEL}\.)*{_LABEL}")
_DOMAIN_CHARS_RE = re.compile(r"[a-z0-9.*-]*")
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+")
_URL_RE = re.compile(r"https?://[^\s/?#]+(?:[/?#]\S*)?", re.IGNORECASE)
# Keys that may hold a secret: a message names the kind of a wrong value, never the value.
_SECRET_KEY_RE = re.compile(r"(?:secret|credentials|password|hmac_key|token|api)(?:\W|$)")
_URL_AUTHORITY_RE = re.compile(r"(?:[a-z0-9._-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?",
                               re.IGNORECASE)
_SIMPLE_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DNS_NAME_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*")
def load(path: Path | str) -> Settings:
    """Read and validate the config file; raise ConfigError naming file, key and problem."""
    path = Path(path)
    file = str(path)
    abs_path = Path(os.path.abspath(path))
    from .config_yaml import read_yaml  # PyYAML: not on the path of a cached config

    data = read_yaml(path, file)
    return _Checker(file, abs_path.parent).settings(data, abs_path)


def outside_changed(settings: Settings) -> bool:
    """Whether what the loader checks outside the config file no longer holds for `settings`:
    the CA bundle is a file, state and spool are two folders (config_cache loads the file
    anew then, and the loader says what is wrong). Keep in step with _Checker.acme/paths."""
    bundle = settings.acme.ca_bundle
    if bundle is not None and not os.path.isfile(bundle):
        return True
    paths = settings.paths
    return os.path.realpath(paths.state) == os.path.realpath(paths.spool)


def loads(text: str, path: Path | str) -> Settings:
    """Validate a config text as if it were the file `path` (relative paths are taken from its
    folder): for a config about to be written (certbatch import)."""
    path = Path(path)
    abs_path = Path(os.path.abspath(path))
    from .config_yaml import parse_yaml

    data = parse_yaml(text, str(path))
    return _Checker(str(path), abs_path.parent).settings(data, abs_path)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _join(parent: str, key: Any) -> str:
    """The key path of `key` inside `parent`, always on one line."""
    if isinstance(key, str) and _SIMPLE_KEY_RE.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{key!r}]"


def _short(value: Any) -> str:
    # reprlib for containers: a list built from aliases can be exponentially long printed whole
    # (a "billion laughs": 30 nested anchors make 2**30 items).
    text = reprlib.repr(value) if isinstance(value, (list, dict, set)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(value: Any) -> str:
    """How a YAML value reads in an error message: its kind, and the value if it is short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({_short(value)})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({_short(value)})"


def _kind(value: Any) -> str:
    """How a value of a key that may hold a secret reads in a message: its kind alone."""
    return _describe(value).partition(" (")[0]


def _suggest(word: Any, choices: tuple[str, ...]) -> str:
    import difflib  # only on the error path

    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "45s", "10m", "12h", "30d", "2w"; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(
            f"expected a duration (seconds, or a string like '45s', '10m', '12h', '30d', '2w'),"
            f" got {_describe(value)}")
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m is None:
            if value.strip().startswith("-"):
                raise ValueError(f"must not be negative, got {_short(value)}")
            raise ValueError(
                f"not a duration: {_short(value)} (use seconds, or a number followed by"
                " s, m, h, d or w, e.g. '90s', '10m', '30d')")
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration, got {_short(value)}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {_short(value)}")
    return seconds


def _domain_problem(name: str) -> str:
    """Why `name` (which failed the fast check) is not an acceptable certificate name."""
    if not name:
        return "empty domain name"
    if not name.isascii():
        try:
            hint = f" (did you mean {name.encode('idna').decode('ascii')!r}?)"
        except UnicodeError:  # the stdlib codec is IDNA 2003: not every name converts
            hint = ""
        return (f"{_short(name)} is not ASCII: give internationalized names in punycode (xn--)"
                f" form{hint}")
    if any(c.isspace() for c in name):
        return f"{_short(name)} contains whitespace"
    if ":" in name or "/" in name:
        if _is_ip(name.strip("[]")):
            return f"{_short(name)} is an IP address; only DNS names are supported"
        if "://" in name:
            return f"{_short(name)} is a URL; give only the host name (e.g. 'example.com')"
        if "/" in name:
            return f"{_short(name)} contains '/'; give only the host name, not a URL or path"
        return f"{_short(name)} contains ':'; give only the host name, without a port"
    if _is_ip(name):
        return f"{_short(name)} is an IP address; only DNS names are supported"
    if name.endswith("."):
        return f"{_short(name)} ends with a dot; leave the trailing dot out"
    labels = name.split(".")
    if "" in labels:
        return f"{_short(name)} has an empty label (a leading dot or '..')"
    bad = _DOMAIN_CHARS_RE.match(name)
    if bad is not None and bad.end() < len(name):
        return f"{_short(name)} contains the invalid character {name[bad.end()]!r}"
    if name == "*":
        return "a bare '*' is not a name; write a wildcard as '*.example.com'"
    for i, label in enumerate(labels):
        if "*" in label and (i > 0 or label != "*"):
            return (f"{_short(name)}: '*' is only allowed as the whole leftmost label"
                    " (e.g. '*.example.com')")
    if labels[0] == "*" and len(labels) < 3:
        return (f"{_short(name)}: a wildcard needs at least two labels after '*.'"
                " (e.g. '*.example.com')")
    for label in labels:
        if len(label) > 63:
            return f"{_short(name)} has a label of {len(label)} characters; the limit is 63"
        if label.startswith("-") or label.endswith("-"):
            return f"{_short(name)} has a label that starts or ends with '-' ({label!r})"
    if len(name) > 253:
        return f"{_short(name)} is {len(name)} characters long; the limit is 253"
    if labels[-1].isdigit():
        return f"{_short(name)} ends in an all-digit label, which no host name does"
    return f"{_short(name)} is not a valid domain name"


def _loopback_url(url: str) -> bool:
    """Whether `url` goes to a loopback address, by the parser's reading of its host (not by
    cutting text: in `http://evil.example#@127.0.0.1` the host is evil.example)."""
    import ipaddress  # only acme-dns configs with an http:// URL pay for it
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host == "localhost":  # .hostname is lower case
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def acme_dns_api_problem(api: str) -> str | None:
    """What is wrong with an acme-dns `api` URL (None: fine); never quotes user:password. The
    account's password goes with every update, so the URL must say plainly where: no
    user:password@, query or fragment, only host characters in its authority (a `\\` there
    reads as a path to some HTTP libraries and as part of user:password to others)."""
    from urllib.parse import urlsplit

    if not _URL_RE.fullmatch(api):
        # Quoted only without an '@': before it may be a password.
        return "must be an https:// URL" + ("" if "@" in api else f", got {_short(api)}")
    try:
        parts = urlsplit(api)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return "is not a valid URL (host or port)"
    if "@" in parts.netloc:
        return ("must not hold user:password@ (the accounts file holds the credentials)")
    if "?" in api or "#" in api:
        return "must not have a query (?...) or fragment (#...)"
    if not (parts.hostname and _URL_AUTHORITY_RE.fullmatch(parts.netloc)):
        return "must name a host (letters, digits, '.', '-', an [IPv6] address, a :port)"
    if parts.scheme.lower() == "http" and not _loopback_url(api):
        return "must be https:// (http:// only to a loopback address)"
    return None


def _without_userinfo(url: str) -> str:
    """`url` without anything up to an '@' in its authority (for messages)."""
    scheme, sep, rest = url.partition("//")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    return f"{scheme}//{authority.rpartition('@')[2]}{slash}{path}"


def _is_base64(text: str) -> bool:
    import base64  # only configs with an inline secret pay for it
    import binascii

    try:
        return bool(text) and bool(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False


def _is_ip(text: str) -> bool:
    import ipaddress  # only on the error path

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _Checker:
    """Turns parsed YAML into Settings; knows the file (for messages) and its folder (for paths)."""

    def __init__(self, file: str, base: Path) -> None:
        self.file = file
        self.base = base

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(self.file, key, _one_line(problem))

    # -- generic pieces ---------------------------------------------------------------------------

    def section(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict[Any, Any]:
        """A mapping whose keys must all be in `allowed`; null counts as empty."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {_describe(value)}")
        for k in value:
            if k not in allowed:
                self.unknown(key, k, allowed)
        return value

    def unknown(self, parent: str, k: Any, allowed: tuple[str, ...]) -> NoReturn:
        hint = _suggest(k, allowed) or f" (expected one of: {', '.join(allowed)})"
        self.fail(_join(parent, k), f"unknown key{hint}")

    def opt_str(self, m: dict[Any, Any], parent: str, name: str) -> str | None:
        value = m.get(name)
        if value is None:
            return None
        return self.string(value, _join(parent, name))

    def req_str(self, m: dict[Any, Any], parent: str, name: str) -> str:
        value = m.get(name)
        if value is None:
            self.fail(_join(parent, name), "required key is missing or empty")
        return self.string(value, _join(parent, name))

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            hint = " (quote it to make it a string)" if isinstance(value, (int, float)) else ""
            got = _kind(value) if _SECRET_KEY_RE.search(key) else _describe(value)
            self.fail(key, f"expected a string, got {got}{hint}")
        if not value.strip():
            self.fail(key, "must not be empty")
        if "\0" in value:
            self.fail(key, "must not contain a NUL character")
        return value

    def opt_path(self, m: dict[Any, Any], parent: str, name: str) -> Path | None:
        text = self.opt_str(m, parent, name)
        return None if text is None else self.resolve(text)

    def resolve(self, text: str) -> Path:
        """Relative paths are relative to the config file's folder, not to the working directory."""
        p = Path(text)
        return p if p.is_absolute() else self.base / p

    def duration(self, m: dict[Any, Any], parent: str, name: str, default: float,
                 positive: bool) -> float:
        value = m.get(name)
        if value is None:
            return default
        try:
            seconds = _parse_duration(value)
        except ValueError as e:
            self.fail(_join(parent, name), str(e))
        if positive and seconds == 0:
            self.fail(_join(parent, name), "must be greater than zero")
        return seconds

    def integer(self, m: dict[Any, Any], parent: str, name: str, default: int,
                lo: int, hi: int) -> int:
        value = m.get(name)
        if value is None:
            return default
        # bool is a subclass of int: `workers: yes` must not mean 1.
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(_join(parent, name), f"expected an integer, got {_describe(value)}")
        if not lo <= value <= hi:
            self.fail(_join(parent, name), f"must be between {lo} and {hi}, got {value}")
        return value

    def boolean(self, m: dict[Any, Any], parent: str, name: str, default: bool) -> bool:
        value = m.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(_join(parent, name), f"expected true or false, got {_describe(value)}")
        return value

    def command(self, value: Any, key: str) -> HookCommandSpec:
        """A hook: a string for /bin/sh -c, or a non-empty list of strings used as argv."""
        if isinstance(value, str):
            return self.string(value, key)
        if isinstance(value, list):
            if not value:
                self.fail(key, "empty list; give the program and its arguments")
            return tuple(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))
        self.fail(key, "expected a string (shell command) or a list (argv),"
                       f" got {_describe(value)}")

    def profile(self, m: dict[Any, Any], parent: str) -> str | None:
        """An ACME profile name (the CA lists its own in its directory: checked when ordering)."""
        profile = self.opt_str(m, parent, "profile")
        if profile is not None and any(c.isspace() or not c.isprintable() for c in profile):
            self.fail(_join(parent, "profile"), f"a profile name has no whitespace or control"
                                                f" characters, got {_short(profile)}")
        return profile

    def key_type(self, value: Any, key: str) -> str:
        if value not in KEY_TYPES or not isinstance(value, str):
            hint = _suggest(value, KEY_TYPES) if isinstance(value, str) else ""
            self.fail(key, f"unknown key type {_short(value)}{hint}; expected one of:"
                           f" {', '.join(KEY_TYPES)}")
        return value

    # -- sections ---------------------------------------------------------------------------------

    def settings(self, data: Any, path: Path) -> Settings:
        if data is None:
            self.fail("", "the file is empty; it needs at least 'acme' and 'certificates'")
        if not isinstance(data, dict):
            self.fail("", f"the top level must be a mapping, got {_describe(data)}")
        top = self.section(data, "", _TOP_KEYS)
        acme = self.acme(top.get("acme"))
        paths = self.paths(top.get("paths"))
        renewal = self.renewal(top.get("renewal"))
        hooks = self.hooks(top.get("hooks"))
        log_file = self.opt_path(self.section(top.get("logging"), "logging", _FILE_KEYS),
                                 "logging", "file")
        metrics_file = self.opt_path(self.section(top.get("metrics"), "metrics", _FILE_KEYS),
                                     "metrics", "file")
        d_key, d_challenge, d_deploy = self.defaults(top.get("defaults"))
        certificates = self.certificates(top.get("certificates"), d_key, d_challenge, d_deploy,
                                         acme.profile)
        return Settings(path=path, acme=acme, paths=paths, renewal=renewal, hooks=hooks,
                        certificates=certificates, log_file=log_file, metrics_file=metrics_file)

    def acme(self, raw: Any) -> AcmeSettings:
        if raw is None:
            self.fail("acme", "required section is missing (it needs at least 'directory')")
        m = self.section(raw, "acme", _ACME_KEYS)
        directory = self.req_str(m, "acme", "directory")
        if not _URL_RE.fullmatch(directory):
            self.fail("acme.directory",
                      f"must be an http:// or https:// URL, got {_short(directory)}")
        email = self.opt_str(m, "acme", "email")
        if email is not None and not _EMAIL_RE.fullmatch(email):
            self.fail("acme.email", f"not an email address: {_short(email)}")
        ca_bundle = self.opt_path(m, "acme", "ca_bundle")
        # os.path, not Path.is_file(): that raises for a name too long, os.path says False.
        if ca_bundle is not None and not os.path.isfile(ca_bundle):
            what = "is not a regular file" if os.path.exists(ca_bundle) else "does not exist"
            self.fail("acme.ca_bundle", f"{ca_bundle} {what}")
        eab = None
        if m.get("eab") is not None:
            e = self.section(m["eab"], "acme.eab", _EAB_KEYS)
            eab = EAB(kid=self.req_str(e, "acme.eab", "kid"),
                      hmac_key=self.req_str(e, "acme.eab", "hmac_key"))
        timeout = self.duration(m, "acme", "timeout", 30.0, positive=True)
        return AcmeSettings(directory=directory, email=email, ca_bundle=ca_bundle, eab=eab,
                            timeout=timeout, profile=self.profile(m, "acme"))

    def paths(self, raw: Any) -> PathSettings:
        m = self.section(raw, "paths", _PATHS_KEYS)
        paths = PathSettings(state=self.opt_path(m, "paths", "state") or DEFAULT_STATE,
                             spool=self.opt_path(m, "paths", "spool") or DEFAULT_SPOOL,
                             hooks=self.opt_path(m, "paths", "hooks") or DEFAULT_HOOKS)
        # realpath, not resolve(): a symlink loop must not crash every command here (the
        # commands that use the folders say what is wrong with them).
        if os.path.realpath(paths.state) == os.path.realpath(paths.spool):
            # Both keep a .lock file: one folder would make the run lock and the spool lock
            # the same lock, and a run would wait for itself forever.
            self.fail("paths.spool", f"must be another folder than paths.state ({paths.state})")
        return paths

    def renewal(self, raw: Any) -> RenewalSettings:
        m = self.section(raw, "renewal", _RENEWAL_KEYS)
        before = None
        if m.get("before_expiry") is not None:
            seconds = self.duration(m, "renewal", "before_expiry", 0.0, positive=True)
            try:
                before = dt.timedelta(seconds=seconds)
            except OverflowError:
                self.fail("renewal.before_expiry", "too large")
        return RenewalSettings(
            before_expiry=before,
            workers=self.integer(m, "renewal", "workers", 16, 1, 64),
            deadline=self.duration(m, "renewal", "deadline", 600.0, positive=True),
            jitter=self.duration(m, "renewal", "jitter", 0.0, positive=False),
            ari=self.boolean(m, "renewal", "ari", True))

    def hooks(self, raw: Any) -> HookSettings:
        m = self.section(raw, "hooks", _HOOKS_KEYS)
        notify = None if m.get("notify") is None else self.command(m["notify"], "hooks.notify")
        targets = self.targets(m.get("targets"))
        if notify is not None and "notify" in targets:
            self.fail("hooks.targets.notify", "'notify' is the name of hooks.notify's target;"
                                              " give this target another name")
        return HookSettings(
            notify=notify,
            deploy_timeout=self.duration(m, "hooks", "deploy_timeout", 120.0, positive=True),
            notify_timeout=self.duration(m, "hooks", "notify_timeout", 300.0, positive=True),
            notify_workers=self.integer(m, "hooks", "notify_workers", 4, 1, 64),
            deploy_workers=None if m.get("deploy_workers") is None else
            self.integer(m, "hooks", "deploy_workers", 1, 1, 64),
            targets=targets)

    def targets(self, raw: Any) -> dict[str, TargetSettings]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail("hooks.targets", f"expected a mapping of target names, got"
                                       f" {_describe(raw)}")
        out: dict[str, TargetSettings] = {}
        for name, body in raw.items():
            key = _join("hooks.targets", name)
            if not isinstance(name, str) or not TARGET_NAME_RE.fullmatch(name):
                self.fail(key, f"invalid target name {_short(name)}: use up to 64 letters,"
                               " digits, '.', '_' and '-', starting with a letter or digit")
            if isinstance(body, (str, list)):  # the short form: just the command
                out[name] = TargetSettings(name, command=self.command(body, key))
                continue
            if not isinstance(body, dict):
                self.fail(key, "expected a command (string or list) or a mapping with"
                               f" command, timeout and env, got {_describe(body)}")
            m = self.section(body, key, _TARGET_KEYS)
            if not m:
                self.fail(key, "empty target: give at least one of command, timeout, env")
            command = None if m.get("command") is None else self.command(
                m["command"], f"{key}.command")
            timeout = None if m.get("timeout") is None else self.duration(
                m, key, "timeout", 0.0, positive=True)
            out[name] = TargetSettings(name, command=command, timeout=timeout,
                                       env=self.env(m.get("env"), f"{key}.env"))
        return out

    def env(self, raw: Any, key: str) -> tuple[tuple[str, str], ...]:
        """Environment variables for a hook: names as the shell knows them, string values."""
        if raw is None:
            return ()
        if not isinstance(raw, dict):
            self.fail(key, f"expected a mapping of variable names to values, got"
                           f" {_describe(raw)}")
        out = []
        for name, value in raw.items():
            where = _join(key, name)
            if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
                self.fail(where, f"invalid environment variable name {_short(name)}")
            if name in RESERVED_ENV:
                self.fail(where, f"{name} is set by certbatch itself")
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                # only the kind: a hook's env often carries a token
                self.fail(where, f"expected a string, got {_kind(value)} (quote it)")
            text = str(value)
            if "\0" in text:
                self.fail(where, "must not contain a NUL character")
            out.append((name, text))
        return tuple(out)

    def defaults(self, raw: Any) -> tuple[str, ChallengeSettings | None, HookCommandSpec | None]:
        m = self.section(raw, "defaults", _DEFAULTS_KEYS)
        key = DEFAULT_KEY_TYPE if m.get("key") is None else self.key_type(m["key"], "defaults.key")
        challenge = None
        if m.get("challenge") is not None:
            challenge = self.challenge(m["challenge"], "defaults.challenge")
        deploy = None if m.get("deploy") is None else self.command(m["deploy"], "defaults.deploy")
        return key, challenge, deploy

    def challenge(self, raw: Any, key: str) -> ChallengeSettings:
        if not isinstance(raw, dict):
            self.fail(key, f"expected a mapping with a 'type' key, got {_describe(raw)}")
        self.section(raw, key, _ANY_CHALLENGE_KEYS)
        ctype = raw.get("type")
        if ctype is None:
            self.fail(f"{key}.type", "required key is missing: http-01 or dns-01")
        if not isinstance(ctype, str) or ctype not in CHALLENGE_TYPES:
            hint = _suggest(ctype, CHALLENGE_TYPES) if isinstance(ctype, str) else ""
            self.fail(f"{key}.type",
                      f"unknown challenge type {_short(ctype)}{hint}; expected http-01 or dns-01")
        allowed = _CHALLENGE_KEYS[ctype]
        for k in raw:
            if k not in allowed:
                self.fail(_join(key, k), f"not valid for {ctype} challenges"
                                         f" (valid keys: {', '.join(allowed)})")
        if ctype == "dns-01":
            return self.dns01(raw, key)
        return self.http01(raw, key)

    def http01(self, m: dict[Any, Any], key: str) -> ChallengeSettings:
        has_webroot = m.get("webroot") is not None
        has_map = m.get("webroot_map") is not None
        has_standalone = m.get("standalone") is not None
        if (has_webroot or has_map) and has_standalone:
            self.fail(key, f"http-01 takes '{'webroot' if has_webroot else 'webroot_map'}' or"
                           " 'standalone', not both")
        if not has_webroot and not has_map and not has_standalone:
            self.fail(f"{key}.webroot", "missing: http-01 needs 'webroot' (the web server's"
                                        " document root) or 'standalone'")
        if has_webroot or has_map:
            # Whether they exist is checked when a certificate needs them (and by `check`);
            # whether the map covers every name, by the certificate (a default may be shared).
            webroot = self.resolve(self.string(m["webroot"], f"{key}.webroot")) \
                if has_webroot else None
            webroot_map = self.webroot_map(m["webroot_map"], f"{key}.webroot_map") \
                if has_map else ()
            return ChallengeSettings(type="http-01", webroot=webroot, webroot_map=webroot_map)
        where = f"{key}.standalone"
        if not isinstance(m["standalone"], dict):
            self.fail(where, f"expected a mapping like {{port: 80, address: 0.0.0.0}},"
                             f" got {_describe(m['standalone'])}")
        s = self.section(m["standalone"], where, _STANDALONE_KEYS)
        port = self.integer(s, where, "port", DEFAULT_STANDALONE_PORT, 1, 65535)
        address = self.opt_str(s, where, "address") or DEFAULT_STANDALONE_ADDRESS
        import ipaddress  # only standalone configs pay for it

        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            self.fail(f"{where}.address",
                      f"must be an IP address such as 0.0.0.0 or ::, got {_short(address)}")
        return ChallengeSettings(type="http-01", standalone_address=address, standalone_port=port)

    def webroot_map(self, raw: Any, key: str) -> tuple[tuple[str, Path], ...]:
        """http-01 `webroot_map`: domain -> the webroot that serves it (certbot's name)."""
        if not isinstance(raw, dict) or not raw:
            self.fail(key, "expected a mapping of domain names to webroots, like"
                           " {www.example.org: /var/www/www}, got"
                           f" {'an empty mapping' if raw == {} else _describe(raw)}")
        out: dict[str, Path] = {}
        for name, root in raw.items():
            where = _join(key, name)
            domain = self.domain(name, where)
            if domain.startswith("*."):
                self.fail(where, f"wildcard {domain!r} needs a dns-01 challenge; http-01 cannot"
                                 " validate it")
            if domain in out:
                self.fail(where, f"duplicate domain {domain!r}")
            out[domain] = self.resolve(self.string(root, where))
        return tuple(out.items())

    def dns01(self, m: dict[Any, Any], key: str) -> ChallengeSettings:
        # Whether the script exists and runs is checked when it is needed (and by `check`): one
        # certificate's broken DNS setup must not stop the others, nor `status`.
        has_script, has_provider = m.get("script") is not None, m.get("provider") is not None
        if has_script == has_provider:
            self.fail(f"{key}.script" if not has_script else key,
                      "dns-01 takes 'script' or 'provider', not both" if has_script else
                      "required key is missing: dns-01 needs 'script' or 'provider'"
                      f" ({', '.join(DNS_PROVIDERS)})")
        provider = None if has_script else self.choice(m, key, "provider", DNS_PROVIDERS)
        for k in m:
            owners = [p for p, keys in _PROVIDER_KEYS.items() if k in keys]
            if m[k] is None or provider in owners:
                continue
            if owners:
                self.fail(_join(key, k), f"only valid with provider: {' or '.join(owners)}")
            if k in _SCRIPT_KEYS and not has_script:
                self.fail(_join(key, k), "only valid with a script")
        wait = self.duration(m, key, "wait", 0.0, positive=False)
        calls = DNS_CALLS[0] if m.get("calls") is None else m["calls"]
        if not isinstance(calls, str) or calls not in DNS_CALLS:
            hint = _suggest(calls, DNS_CALLS) if isinstance(calls, str) else ""
            self.fail(f"{key}.calls", f"unknown value {_short(calls)}{hint}; expected one of:"
                                      f" {', '.join(DNS_CALLS)}")
        # A provider's records are checked by default; a script keeps its old behaviour (it may
        # publish where certbatch cannot look, or wait itself) unless it asks for the check.
        propagation = (DNS_PROPAGATION[1] if has_script else DNS_PROPAGATION[0]
                       ) if m.get("propagation") is None else self.choice(
            m, key, "propagation", DNS_PROPAGATION)
        follow = self.boolean(m, key, "follow_cnames", True)
        if provider == "acme-dns" and not follow:
            self.fail(f"{key}.follow_cnames", "must stay true with acme-dns: the values are "
                                              "written at the end of the CNAME")
        resolver = None
        if m.get("resolver") is not None:
            resolver = self.address(self.string(m["resolver"], f"{key}.resolver"),
                                    f"{key}.resolver", 53)
        return ChallengeSettings(
            type="dns-01", wait=wait, calls=calls, provider=provider,
            script=self.resolve(self.string(m["script"], f"{key}.script")) if has_script
            else None,
            rfc2136=self.rfc2136(m, key) if provider == "rfc2136" else None,
            lexicon=self.lexicon(m, key) if provider == "lexicon" else None,
            acme_dns=self.acme_dns(m, key) if provider == "acme-dns" else None,
            follow_cnames=follow,
            propagation=propagation,
            propagation_timeout=self.duration(m, key, "propagation_timeout", 120.0,
                                              positive=True),
            resolver=resolver,
            nameserver_port=self.integer(m, key, "nameserver_port", 53, 1, 65535))

    def rfc2136(self, m: dict[Any, Any], key: str) -> Rfc2136Settings:
        server = self.address(self.req_str(m, key, "server"), f"{key}.server", 53)
        tsig_key = self.dns_name(self.req_str(m, key, "tsig_key"), f"{key}.tsig_key")
        secret = m.get("tsig_secret")
        secret_file = self.opt_path(m, key, "tsig_secret_file")
        if (secret is None) == (secret_file is None):
            self.fail(f"{key}.tsig_secret", "give 'tsig_secret' (base64) or 'tsig_secret_file',"
                                            " not both" if secret is not None else
                      "missing: rfc2136 needs 'tsig_secret_file' (or 'tsig_secret')")
        if secret is not None:
            # Never quote the value in a message: it is the secret.
            if not isinstance(secret, str) or not _is_base64(secret.strip()):
                self.fail(f"{key}.tsig_secret", "must be the key's secret in base64 (as "
                                                "tsig-keygen prints it)")
            secret = secret.strip()
        algorithm = TSIG_ALGORITHMS[0] if m.get("tsig_algorithm") is None else self.choice(
            m, key, "tsig_algorithm", TSIG_ALGORITHMS)
        zone = None
        if m.get("zone") is not None:
            zone = self.dns_name(self.string(m["zone"], f"{key}.zone"), f"{key}.zone")
        return Rfc2136Settings(server=server, tsig_key=tsig_key, tsig_secret=secret,
                               tsig_secret_file=secret_file, tsig_algorithm=algorithm, zone=zone)

    def lexicon(self, m: dict[Any, Any], key: str) -> LexiconSettings:
        # The provider name is checked when it is used (and by `check`): knowing lexicon's
        # providers means importing lexicon, which is optional and heavy.
        name = self.req_str(m, key, "lexicon_provider").strip().lower()
        if not _SIMPLE_KEY_RE.fullmatch(name):
            self.fail(f"{key}.lexicon_provider", f"not a lexicon provider name: {_short(name)}")
        raw, cred_file = m.get("credentials"), self.opt_path(m, key, "credentials_file")
        if (raw is None) == (cred_file is None):
            self.fail(f"{key}.credentials", "give 'credentials' or 'credentials_file', not both"
                      if raw is not None else "missing: lexicon needs 'credentials_file' (or "
                                              "'credentials': the provider's options)")
        credentials = None if raw is None else self.credentials(raw, f"{key}.credentials")
        zone = None
        if m.get("zone") is not None:
            zone = self.dns_name(self.string(m["zone"], f"{key}.zone"), f"{key}.zone")
        return LexiconSettings(provider=name, credentials=credentials,
                               credentials_file=cred_file, zone=zone)

    def credentials(self, raw: Any, key: str) -> tuple[tuple[str, str], ...]:
        """A lexicon provider's options: option name -> string (or number). Values are never
        quoted in a message: most of them are secrets."""
        if not isinstance(raw, dict) or not raw:
            self.fail(key, f"expected a mapping of the provider's options (auth_token: ...),"
                           f" got {_kind(raw)}")  # a token given alone: never quoted
        out = []
        for name, value in raw.items():
            if not isinstance(name, str) or not _SIMPLE_KEY_RE.fullmatch(name):
                self.fail(key, f"not an option name: {_short(name)}")
            if isinstance(value, bool) or not isinstance(value, (str, int)) or "\0" in str(value):
                self.fail(_join(key, name), "expected a string (quote it)")
            out.append((name.replace("-", "_"), str(value)))
        return tuple(out)

    def acme_dns(self, m: dict[Any, Any], key: str) -> AcmeDnsSettings:
        api = self.req_str(m, key, "api").strip().rstrip("/")
        problem = acme_dns_api_problem(api)
        if problem:
            self.fail(f"{key}.api", problem)
        accounts = self.opt_path(m, key, "accounts_file")
        if accounts is None:
            self.fail(f"{key}.accounts_file", "required key is missing: the JSON file `certbatch"
                                              " acme-dns register` writes")
        return AcmeDnsSettings(api=api, accounts_file=accounts)

    def choice(self, m: dict[Any, Any], parent: str, name: str, allowed: tuple[str, ...]) -> str:
        value = m.get(name)
        if not isinstance(value, str) or value not in allowed:
            hint = _suggest(value, allowed) if isinstance(value, str) else ""
            self.fail(_join(parent, name), f"unknown value {_short(value)}{hint}; expected one"
                                           f" of: {', '.join(allowed)}")
        return value

    def address(self, text: str, key: str, default_port: int) -> tuple[str, int]:
        """`IP`, `IP:PORT` or `[IPv6]:PORT` -> (normalized IP, port)."""
        import ipaddress  # only dns-01 configs with a server or resolver pay for it

        host, port = text.strip(), default_port
        if host.startswith("["):
            host, _, rest = host[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    self.fail(key, f"expected IP, IP:PORT or [IPv6]:PORT, got {_short(text)}")
                port = self.port_text(rest[1:], key)
        elif host.count(":") == 1:
            host, _, rest = host.partition(":")
            port = self.port_text(rest, key)
        try:
            return str(ipaddress.ip_address(host)), port
        except ValueError:
            self.fail(key, f"expected an IP address (IP, IP:PORT or [IPv6]:PORT), got"
                           f" {_short(text)}")

    def port_text(self, text: str, key: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            self.fail(key, f"the port must be between 1 and 65535, got {_short(text)}")
        return int(text)

    def dns_name(self, text: str, key: str) -> str:
        """A DNS name (zone, key name), lowercase and absolute (with the trailing dot)."""
        name = text.strip().lower().rstrip(".")
        if not (name.isascii() and len(name) <= 253 and _DNS_NAME_RE.fullmatch(name)):
            self.fail(key, f"not a DNS name: {_short(text)}")
        return name + "."

    def certificates(self, raw: Any, d_key: str, d_challenge: ChallengeSettings | None,
                     d_deploy: HookCommandSpec | None, d_profile: str | None = None
                     ) -> dict[str, CertificateSettings]:
        if raw is None:
            self.fail("certificates", "required section is missing or empty:"
                                      " configure at least one certificate")
        if not isinstance(raw, dict):
            self.fail("certificates",
                      f"expected a mapping of certificate names, got {_describe(raw)}")
        if not raw:
            self.fail("certificates", "no certificates configured; at least one is required")
        out: dict[str, CertificateSettings] = {}
        for name, body in raw.items():
            out[name] = self.certificate(name, body, d_key, d_challenge, d_deploy, d_profile)
        return out

    def certificate(self, name: Any, raw: Any, d_key: str, d_challenge: ChallengeSettings | None,
                    d_deploy: HookCommandSpec | None, d_profile: str | None = None
                    ) -> CertificateSettings:
        key = _join("certificates", name)
        if not isinstance(name, str):
            self.fail(key, f"certificate names must be strings, got {_describe(name)}"
                           " (quote it)")
        if len(name) > _CERT_NAME_MAX or not _CERT_NAME_RE.fullmatch(name):
            self.fail(key, f"invalid certificate name {_short(name)}: use up to {_CERT_NAME_MAX}"
                           " lowercase letters, digits, '.', '_' and '-', starting with a letter"
                           " or digit")
        if not isinstance(raw, dict):
            self.fail(key, f"expected a mapping with at least 'domains', got {_describe(raw)}")
        m = self.section(raw, key, _CERT_KEYS)
        domains = self.domains(m.get("domains"), f"{key}.domains")
        key_type = d_key if m.get("key") is None else self.key_type(m["key"], f"{key}.key")
        if m.get("challenge") is not None:
            challenge = self.challenge(m["challenge"], f"{key}.challenge")
        elif d_challenge is not None:
            challenge = d_challenge
        else:
            self.fail(f"{key}.challenge", "no challenge configured, here or in defaults.challenge")
        if challenge.type != "dns-01":
            for i, d in enumerate(domains):
                if d.startswith("*."):
                    self.fail(f"{key}.domains[{i}]", f"wildcard {d!r} needs a dns-01 challenge"
                                                      f" (this certificate uses {challenge.type})")
        if challenge.webroot_map:
            self.webroot_cover(challenge, domains, key, own=m.get("challenge") is not None)
        deploy = d_deploy if m.get("deploy") is None else self.command(m["deploy"], f"{key}.deploy")
        profile = self.profile(m, key) or d_profile
        return CertificateSettings(name=name, domains=domains, key=key_type, challenge=challenge,
                                   deploy=deploy, profile=profile)

    def webroot_cover(self, challenge: ChallengeSettings, domains: tuple[str, ...], key: str,
                      own: bool) -> None:
        """Every name of the certificate has a webroot; the certificate's own map names only
        its names (a typo would send a name to the default webroot)."""
        where = f"{key}.challenge.webroot_map" if own else "defaults.challenge.webroot_map"
        for i, d in enumerate(domains):
            if challenge.webroot_for(d) is None:
                self.fail(where if own else f"{key}.domains[{i}]",
                          f"no webroot for {d!r}{'' if own else ' in ' + where}: add it to the"
                          " map, or give 'webroot' as the default for the names it leaves out")
        if own:
            for d, _ in challenge.webroot_map:
                if d not in domains:
                    self.fail(_join(where, d), f"{d!r} is not a domain of this certificate"
                                               f" ({', '.join(domains)})")

    def domains(self, raw: Any, key: str) -> tuple[str, ...]:
        if raw is None:
            self.fail(key, "missing: a certificate needs at least one domain")
        if isinstance(raw, str):
            self.fail(key, f"expected a list of names, got a string; write [{raw}]")
        if not isinstance(raw, list):
            self.fail(key, f"expected a list of names, got {_describe(raw)}")
        if not raw:
            self.fail(key, "empty list: a certificate needs at least one domain")
        out: list[str] = []
        first_index: dict[str, int] = {}
        for i, value in enumerate(raw):
            where = f"{key}[{i}]"
            name = self.domain(value, where)
            if name in first_index:
                self.fail(where, f"duplicate domain {name!r} (also at index {first_index[name]})")
            first_index[name] = i
            out.append(name)
        return tuple(out)

    def domain(self, value: Any, where: str) -> str:
        """One certificate name, lowercase; a wildcard is `*.` and at least two labels."""
        if not isinstance(value, str):
            self.fail(where, f"expected a domain name (string), got {_describe(value)}")
        name = value.lower()
        if not (name.isascii() and len(name) <= 253 and _DOMAIN_RE.fullmatch(name)
                and not name.rpartition(".")[2].isdigit()
                and not (name.startswith("*.") and name.count(".") < 2)):
            self.fail(where, _domain_problem(name if name.isascii() else value))
        return name
