"""One certbot lineage -> one certbatch certificate entry (the YAML mapping), with notes.

What maps (see docs/import-certbot.md for the table): domains from the certificate itself; the
key type from the private key (so the first `renew` does not reissue); `webroot_path` and
`webroot_map` -> http-01 webroot, or webroot_map when the names have several; `standalone` ->
http-01 standalone; `manual` with an auth hook and dns-01 -> a dns-01 script that runs certbot's
hooks; `dns-rfc2136` -> the rfc2136 provider; `preferred_profile`/`required_profile` -> profile.
Anything else is a note, a hook suggestion, or a `challenge_problem` (configure it by hand).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .certbot import RenewalConf, Unreadable, read_outside

_NAME_BAD = re.compile(r"[^a-z0-9._-]+")
NAME_MAX = 64


@dataclass(frozen=True)
class NewFile:
    """A file the import writes besides the config: a dns-01 script or a TSIG secret."""

    path: Path
    content: str = field(repr=False)
    mode: int
    what: str  # for the plan's lines


@dataclass
class Mapped:
    entry: dict[str, Any] = field(default_factory=dict)  # certificates.<name>, without domains
    challenge_problem: str | None = None  # why the challenge must be configured by hand
    notes: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)  # certbot hooks and where they belong
    files: list[NewFile] = field(default_factory=list)


def certbatch_name(lineage: str) -> str:
    """A valid certbatch certificate name for a certbot lineage name (the same when it is one):
    lowercase, runs of other characters as '-', starting with a letter or digit, at most 64."""
    name = _NAME_BAD.sub("-", lineage.lower()).lstrip("._-")[:NAME_MAX].rstrip("-")
    return name or "certificate"


def key_type(key_pem: bytes) -> str:
    """certbatch's key type of a PEM private key; ValueError for one certbatch cannot order."""
    key = serialization.load_pem_private_key(key_pem, password=None,
                                             unsafe_skip_rsa_key_validation=True)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size in (2048, 3072, 4096):
            return f"rsa-{key.key_size}"
        raise ValueError(f"an RSA key of {key.key_size} bits (certbatch orders 2048, 3072 or "
                         f"4096)")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}
        if key.curve.name in curves:
            return curves[key.curve.name]
        raise ValueError(f"an EC key on {key.curve.name} (certbatch orders P-256 or P-384)")
    raise ValueError(f"a {type(key).__name__} (certbatch orders RSA or EC keys)")


def domains_of(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names of the certificate; ValueError if it names IP addresses (certbatch orders
    DNS names only) or nothing at all."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the certificate has no subjectAltName") from None
    ips = san.get_values_for_type(x509.IPAddress)
    if ips:
        raise ValueError(f"it covers IP addresses ({', '.join(map(str, ips))}); certbatch "
                         f"orders DNS names only")
    names = tuple(dict.fromkeys(n.lower() for n in san.get_values_for_type(x509.DNSName)))
    if not names:
        raise ValueError("the certificate names no DNS name")
    return names


def conf_key_type(conf: RenewalConf) -> str | None:
    """The key type certbot's next renewal would use, in certbatch's words (None: unknown)."""
    kind = (conf.get("key_type") or "").lower()
    if kind == "rsa":
        return f"rsa-{conf.get('rsa_key_size') or 2048}"
    if kind == "ecdsa":
        curve = conf.get("elliptic_curve") or "secp256r1"
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(curve, f"ec-{curve}")
    return None


def map_lineage(name: str, lineage: str, conf: RenewalConf, domains: tuple[str, ...],
                key: str, import_dir: Path) -> Mapped:
    """The certificate entry for one lineage. `import_dir`: where scripts and secrets that the
    import writes go (next to the config)."""
    m = Mapped()
    m.entry["key"] = key
    wanted = conf_key_type(conf)
    if wanted and wanted != key:
        m.notes.append(f"certbot's next renewal would make a {wanted} key; kept {key}, the "
                       f"current key's type (changing `key` reissues at once)")
    _challenge(m, name, conf, domains, import_dir)
    profile = conf.get("required_profile") or conf.get("preferred_profile")
    if profile:
        m.entry["profile"] = profile
        if not conf.get("required_profile"):
            m.notes.append(f"preferred_profile {profile} became `profile`: certbatch fails "
                           f"the order if the CA stops offering it (certbot fell back)")
    if conf.get("preferred_chain"):
        m.notes.append(f"preferred_chain {conf.get('preferred_chain')!r} not kept: certbatch "
                       f"takes the CA's default chain")
    if conf.flag("reuse_key", False):
        m.notes.append("reuse_key was set: certbatch makes a new key at every renewal")
    if conf.top.get("renew_before_expiry"):
        m.notes.append(f"renew_before_expiry = {conf.top['renew_before_expiry']}: certbatch "
                       f"has one setting for every certificate, renewal.before_expiry")
    if conf.flag("must_staple", False):
        m.notes.append("must_staple was set: certbatch does not ask for it")
    installer = conf.get("installer")
    if installer and installer != "None":
        m.hooks.append(f"installer {installer}: certbot pointed {installer} at "
                       f"/etc/letsencrypt/live/{lineage}/; point it at certbatch's files with a "
                       f"deploy hook or the shipped notify.d/{installer} target")
    for key_name, where in (("pre_hook", "no pre hook in certbatch: if it frees port 80 for "
                                         "standalone, use a webroot instead"),
                            ("deploy_hook", "deploy.d/ or certificates." + name + ".deploy "
                                            "(CERTBATCH_* variables instead of RENEWED_*)"),
                            ("post_hook", "a notify target (hooks.targets or notify.d/), run "
                                          "once per batch")):
        value = conf.get(key_name)
        if value:
            m.hooks.append(f"{key_name} {value!r}: {where}")
    return m


def _challenge(m: Mapped, name: str, conf: RenewalConf, domains: tuple[str, ...],
               import_dir: Path) -> None:
    auth = conf.get("authenticator") or "?"
    by_hand = f"configure the challenge of {name} by hand: "
    if auth == "webroot":
        roots = {}
        default = conf.get("webroot_path")
        for domain in domains:
            root = conf.webroot_map.get(domain) or default
            if root is None:
                m.challenge_problem = by_hand + f"no webroot for {domain} in its webroot_map"
                return
            roots[domain] = root
        if len(set(roots.values())) == 1:
            m.entry["challenge"] = {"type": "http-01", "webroot": next(iter(roots.values()))}
        else:  # each name under its own webroot, as certbot had it
            m.entry["challenge"] = {"type": "http-01", "webroot_map": roots}
    elif auth == "standalone":
        standalone: dict[str, Any] = {}
        port = conf.get("http01_port")
        if port and port != "80":
            if not port.isdigit():
                m.challenge_problem = by_hand + f"http01_port {port!r} is not a port"
                return
            standalone["port"] = int(port)
        address = conf.get("http01_address")
        if address:
            try:
                standalone["address"] = str(ipaddress.ip_address(address))
            except ValueError:
                m.challenge_problem = by_hand + f"http01_address {address!r} is not an IP"
                return
        m.entry["challenge"] = {"type": "http-01", "standalone": standalone}
    elif auth == "manual":
        _manual(m, name, conf, domains, import_dir)
    elif auth == "dns-rfc2136":
        _rfc2136(m, name, conf, import_dir)
    elif auth.startswith("dns-"):
        m.challenge_problem = by_hand + (f"certbot's {auth} plugin: use a dns-01 provider "
                                         f"(lexicon knows most DNS hosts) or a dns-01 script")
    elif auth in ("nginx", "apache"):
        m.challenge_problem = by_hand + (f"certbot's {auth} plugin answered http-01 through "
                                         f"{auth}: serve /.well-known/acme-challenge/ from a "
                                         f"folder and use it as http-01 webroot")
    else:
        m.challenge_problem = by_hand + f"certbot's authenticator {auth!r} has no counterpart"


def _manual(m: Mapped, name: str, conf: RenewalConf, domains: tuple[str, ...],
            import_dir: Path) -> None:
    by_hand = f"configure the challenge of {name} by hand: "
    challs = [c.strip().lower() for c in conf.items("pref_challs")]
    kind = next((c for c in challs if c in ("dns-01", "http-01", "dns", "http")), "http-01")
    auth_hook, cleanup_hook = conf.get("manual_auth_hook"), conf.get("manual_cleanup_hook")
    if not auth_hook:
        m.challenge_problem = by_hand + "manual without manual_auth_hook is interactive"
        return
    if not kind.startswith("dns"):
        m.challenge_problem = by_hand + ("its manual hooks answer http-01; certbatch answers "
                                         "http-01 from a webroot or standalone")
        return
    for label, hook in (("manual_auth_hook", auth_hook), ("manual_cleanup_hook", cleanup_hook)):
        problem = hook and _hook_problem(hook)
        if problem:
            m.challenge_problem = by_hand + f"{label} {problem}"
            return
    script = import_dir / f"{name}.dns-01.sh"
    m.files.append(NewFile(script, manual_script(name, auth_hook, cleanup_hook), 0o700,
                           f"dns-01 script running certbot's manual hooks of {name}"))
    # certbot handed its hooks the domain and left CNAMEs to them: so does the script
    # (follow_cnames: false spares a lookup whose answer the script would not use).
    m.entry["challenge"] = {"type": "dns-01", "script": str(script), "calls": "per-certificate",
                            "follow_cnames": False}
    if not cleanup_hook:
        m.notes.append("no manual_cleanup_hook: the TXT records stay after each renewal")


def _hook_problem(hook: str) -> str | None:
    """Why a certbot hook command cannot be run by the script (None: its program exists)."""
    try:
        words = shlex.split(hook)
    except ValueError as exc:
        return f"is not a command line: {exc}"
    if not words:
        return "is empty"
    program = words[0]
    if "/" in program:
        return None if os.path.isfile(program) else f"runs {program}, which does not exist"
    return None if shutil.which(program) else f"runs {program}, which is not on PATH"


def manual_script(name: str, auth_hook: str, cleanup_hook: str | None) -> str:
    """A certbatch dns-01 script (calls: per-certificate) that runs certbot's manual hooks the
    way certbot did: once per record, with CERTBOT_DOMAIN, CERTBOT_VALIDATION,
    CERTBOT_REMAINING_CHALLENGES and CERTBOT_ALL_DOMAINS set, through /bin/sh -c."""
    cleanup = shlex.quote(cleanup_hook) if cleanup_hook else "''"
    return f"""#!/bin/sh
# Written by `certbatch import certbot` for the certificate {name}: a certbatch dns-01 script
# (calls: per-certificate) that runs certbot's manual hooks as certbot ran them, once per TXT
# record, with CERTBOT_DOMAIN, CERTBOT_VALIDATION, CERTBOT_REMAINING_CHALLENGES and
# CERTBOT_ALL_DOMAINS in the environment. CERTBOT_AUTH_OUTPUT is empty for the cleanup hook.
#   <this> add|remove <domain> <record-name> <value> [<domain> <record-name> <value> ...]
set -eu
auth_hook={shlex.quote(auth_hook)}
cleanup_hook={cleanup}
action=$1
shift
case $action in
    add) hook=$auth_hook ;;
    remove) hook=$cleanup_hook ;;
    *) echo "$0: unknown action $action" >&2; exit 2 ;;
esac
[ -n "$hook" ] || exit 0
all=
n=0
for arg in "$@"; do
    [ $((n % 3)) -eq 0 ] && all=${{all:+$all,}}$arg
    n=$((n + 1))
done
remaining=$(($# / 3))
while [ "$#" -ge 3 ]; do
    remaining=$((remaining - 1))
    CERTBOT_DOMAIN=$1 CERTBOT_VALIDATION=$3 CERTBOT_REMAINING_CHALLENGES=$remaining \\
        CERTBOT_ALL_DOMAINS=$all CERTBOT_AUTH_OUTPUT= /bin/sh -c "$hook"
    shift 3
done
"""


def _rfc2136(m: Mapped, name: str, conf: RenewalConf, import_dir: Path) -> None:
    """certbot's dns-rfc2136 plugin and its credentials ini -> the rfc2136 provider (issue 12):
    provider, server (address:port), tsig_key, tsig_secret_file (written 0600 here: the ini
    holds more than the secret), tsig_algorithm."""
    by_hand = f"configure the challenge of {name} by hand: "
    ini_path = conf.get("dns_rfc2136_credentials")
    if not ini_path:
        m.challenge_problem = by_hand + "dns-rfc2136 without dns_rfc2136_credentials"
        return
    try:
        creds = parse_ini(read_outside(Path(ini_path)).decode("utf-8", "replace"))
    except Unreadable as exc:
        m.challenge_problem = by_hand + f"its rfc2136 credentials: {exc}"
        return
    server, key, secret = (creds.get(f"dns_rfc2136_{k}") for k in ("server", "name", "secret"))
    if not (server and key and secret):
        missing = [k for k, v in (("server", server), ("name", key), ("secret", secret)) if not v]
        m.challenge_problem = by_hand + (f"{ini_path} lacks dns_rfc2136_"
                                         f"{', dns_rfc2136_'.join(missing)}")
        return
    port = creds.get("dns_rfc2136_port") or "53"
    host = f"[{server}]" if ":" in server else server
    secret_file = import_dir / f"{name}.tsig"
    m.files.append(NewFile(secret_file, secret + "\n", 0o600,
                           f"TSIG secret of {name} (from {ini_path})"))
    m.entry["challenge"] = {
        "type": "dns-01", "provider": "rfc2136", "server": f"{host}:{port}",
        "tsig_key": key, "tsig_secret_file": str(secret_file),
        "tsig_algorithm": (creds.get("dns_rfc2136_algorithm") or "hmac-md5").lower()}
    seconds = conf.get("dns_rfc2136_propagation_seconds")
    if seconds:
        m.notes.append(f"dns_rfc2136_propagation_seconds = {seconds} not kept: certbatch asks "
                       f"the zone's authoritative servers until they have the record")


def parse_ini(text: str) -> dict[str, str]:
    """A certbot DNS credentials file: `key = value` lines, `#` comments."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() and not key.strip().startswith(("#", ";")):
            out[key.strip()] = value.strip().strip("'\"")
    return out
