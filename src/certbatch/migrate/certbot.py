"""A certbot config folder (/etc/letsencrypt), read only.

    renewal/<lineage>.conf                          configobj ini: settings of one lineage
    live/<lineage>/{cert,chain,fullchain,privkey}.pem  symlinks into archive/<lineage>/
    accounts/<host[:port]>/<path>/<id>/{private_key.json,regr.json,meta.json}
    renewal-hooks/{pre,deploy,post}/                 hook programs certbot runs

Nothing is written and nothing of certbot is imported. certbot makes its links; certbatch follows
them only while the real path stays inside the folder (a link leading out of it, or a folder
swapped for a link to elsewhere, is a problem of that lineage), and opens what it reads with
O_NOFOLLOW, checking on the descriptor that it is a regular file of a sane size.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..errors import os_error_message

PEM_NAMES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")
HOOK_FOLDERS = ("pre", "deploy", "post")
MAX_FILE = 1 << 20  # no certbot file is anywhere near 1 MiB


class Unreadable(Exception):
    """A file of the certbot folder cannot be used; the message names it and says why."""


# -- renewal/<lineage>.conf ------------------------------------------------------------------------

@dataclass(frozen=True)
class RenewalConf:
    """One renewal/<lineage>.conf: the top-level keys, [renewalparams], and its [[webroot_map]]."""

    top: dict[str, str | list[str]]
    params: dict[str, str | list[str]]
    webroot_map: dict[str, str]

    def get(self, key: str) -> str | None:
        """A [renewalparams] value as one string (the first item of a list), None if unset."""
        value = self.params.get(key)
        if isinstance(value, list):
            return value[0] if value else None
        return value or None

    def items(self, key: str) -> list[str]:
        """A [renewalparams] value as a list (configobj writes `a,` for a one-item list)."""
        value = self.params.get(key)
        if value is None:
            return []
        return value if isinstance(value, list) else [value]

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        return value.strip().lower() in ("true", "yes", "on", "1")


def parse_conf(text: str, where: str) -> RenewalConf:
    """certbot's renewal file. It is configobj syntax, of which certbot writes a small part:
    `key = value` lines, `#` comments, `[renewalparams]`, `[[webroot_map]]` inside it, values
    quoted with ' or " or bare, and lists as comma-separated values (`a,` is a one-item list).
    Raises Unreadable naming the line that does not fit."""
    top: dict[str, str | list[str]] = {}
    params: dict[str, str | list[str]] = {}
    webroot_map: dict[str, str] = {}
    section: dict[str, str | list[str]] | dict[str, str] = top
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            depth = len(line) - len(line.lstrip("["))
            name = line.strip("[] \t")
            if depth == 1 and name == "renewalparams":
                section = params
            elif depth == 2 and name == "webroot_map" and section is not top:
                section = webroot_map
            else:
                section = {}  # a section certbot does not write: read, then ignored
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise Unreadable(f"{where}: line {number} is not `key = value`: {raw.strip()[:60]}")
        try:
            parsed = _value(value.strip())
        except ValueError as exc:
            raise Unreadable(f"{where}: line {number}: {exc}") from None
        if section is webroot_map:
            webroot_map[_unquote(key.strip()).lower()] = parsed if isinstance(parsed, str) \
                else ",".join(parsed)
        else:
            section[key.strip()] = parsed  # type: ignore[assignment]
    return RenewalConf(top, params, webroot_map)


def _value(text: str) -> str | list[str]:
    """configobj's value syntax: items quoted with ' or " or bare (up to a `,` or `#`),
    separated by commas; one comma makes a list. Raises ValueError for an unclosed quote."""
    items: list[str] = []
    is_list = False
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] == "#":
            break
        if text[i] in "'\"":
            end = text.find(text[i], i + 1)
            if end < 0:
                raise ValueError("unclosed quote")
            items.append(text[i + 1:end])
            i = end + 1
        else:
            end = i
            while end < n and text[end] not in ",#":
                end += 1
            items.append(text[i:end].strip())
            i = end
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ",":
            is_list = True
            i += 1
        elif i < n and text[i] != "#":
            raise ValueError("text after a quoted value")
    if is_list:
        return [item for item in items if item]
    return items[0] if items else ""


def _unquote(text: str) -> str:
    if len(text) > 1 and text[0] in "'\"" and text[-1] == text[0]:
        return text[1:-1]
    return text


# -- accounts --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Account:
    """One certbot account: its id, the CA, its URL (regr.json's uri), its key as PEM, and
    regr.json as certbatch stores it (it loads with acme's RegistrationResource)."""

    id: str
    server: str
    uri: str
    key_pem: bytes = field(repr=False)
    regr_json: str


def jwk_to_pem(jwk: object) -> bytes:
    """certbot's private_key.json (a private JWK, RSA or EC) as unencrypted PKCS#8 PEM."""
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")

    def num(name: str) -> int:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"no {name!r}")
        return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if jwk.get("kty") == "RSA":
        public = rsa.RSAPublicNumbers(num("e"), num("n"))
        key = rsa.RSAPrivateNumbers(num("p"), num("q"), num("d"), num("dp"), num("dq"),
                                    num("qi"), public).private_key()
    elif jwk.get("kty") == "EC":
        curves: dict[str, ec.EllipticCurve] = {
            "P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
        curve = curves.get(str(jwk.get("crv")))
        if curve is None:
            raise ValueError(f"unknown curve {jwk.get('crv')!r}")
        point = ec.EllipticCurvePublicNumbers(num("x"), num("y"), curve)
        key = ec.EllipticCurvePrivateNumbers(num("d"), point).private_key()
    else:
        raise ValueError(f"unknown key type {jwk.get('kty')!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def server_path(server: str) -> str:
    """accounts/<this>/ for an ACME directory URL, as certbot names it (netloc + path)."""
    parsed = urlparse(server)
    return (parsed.netloc + parsed.path).strip("/")


# -- the folder ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LineageFiles:
    """The four PEM files of a lineage's current version, read through live/<lineage>/."""

    pems: dict[str, bytes] = field(repr=False)
    archive: dict[str, str]  # file -> its real path in archive/


class CertbotDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.real = os.path.realpath(root)

    def check(self) -> str | None:
        """Why `root` is not a certbot folder, or None."""
        renewal = os.path.join(self.real, "renewal")
        if not os.path.isdir(self.real):
            return f"{self.root}: no such folder"
        if not os.path.isdir(renewal):
            return f"{self.root}: not a certbot folder (it has no renewal/ folder)"
        try:
            os.listdir(renewal)
        except OSError as exc:
            return os_error_message(exc, renewal)
        return None

    def lineages(self) -> list[str]:
        """Lineage names, from renewal/*.conf, sorted."""
        folder = os.path.join(self.real, "renewal")
        return sorted(n[:-len(".conf")] for n in os.listdir(folder)
                      if n.endswith(".conf") and len(n) > len(".conf") and not n.startswith("."))

    def conf_path(self, lineage: str) -> Path:
        return self.root / "renewal" / f"{lineage}.conf"

    def read_conf(self, lineage: str) -> RenewalConf:
        path = self.conf_path(lineage)
        return parse_conf(_read(path, follow=False).decode("utf-8", "replace"), str(path))

    def read_files(self, lineage: str) -> LineageFiles:
        """The current version through the live/ links, each of which must lead into
        archive/<lineage>/ of this folder. Raises Unreadable for the first that does not."""
        live = self.root / "live" / lineage
        archive = os.path.join(self.real, "archive", lineage) + os.sep
        pems, real = {}, {}
        for name in PEM_NAMES:
            link = live / name
            try:
                os.lstat(link)
            except OSError as exc:
                raise Unreadable(os_error_message(exc, link)) from None
            target = os.path.realpath(link)
            if not os.path.exists(target):
                raise Unreadable(f"{link}: broken link (its target {target} does not exist)")
            if not target.startswith(archive):
                raise Unreadable(f"{link}: leads to {target}, outside {archive}")
            pems[name] = _read(Path(target), follow=False)
            real[name] = target
        return LineageFiles(pems, real)

    def read_account(self, server: str, account_id: str) -> Account:
        """The account `account_id` of the CA `server`. Raises Unreadable."""
        if not account_id or "/" in account_id or account_id.startswith("."):
            raise Unreadable(f"invalid account id {account_id!r}")
        folder = self.root / "accounts" / server_path(server) / account_id
        real = os.path.realpath(folder)  # certbot links accounts of an old server to a new one
        if not real.startswith(os.path.join(self.real, "accounts") + os.sep):
            raise Unreadable(f"{folder}: leads to {real}, outside {self.root / 'accounts'}")
        if not os.path.isdir(real):
            raise Unreadable(f"{folder}: no such account folder")
        try:
            jwk = json.loads(_read(Path(real, "private_key.json"), follow=False))
            key_pem = jwk_to_pem(jwk)
        except (ValueError, TypeError) as exc:
            raise Unreadable(f"{folder}/private_key.json: not a private key: {exc}") from None
        try:
            regr = json.loads(_read(Path(real, "regr.json"), follow=False))
        except ValueError as exc:
            raise Unreadable(f"{folder}/regr.json: not JSON: {exc}") from None
        uri = regr.get("uri") if isinstance(regr, dict) else None
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise Unreadable(f"{folder}/regr.json: no account URL (uri)")
        if not isinstance(regr.get("body", {}), dict):
            raise Unreadable(f"{folder}/regr.json: body is not an object")
        regr.setdefault("body", {})
        return Account(account_id, server, uri, key_pem, json.dumps(regr))

    def hook_files(self) -> dict[str, list[str]]:
        """renewal-hooks/<phase>/: the file names in each phase folder (missing: none)."""
        out: dict[str, list[str]] = {}
        for phase in HOOK_FOLDERS:
            folder = os.path.join(self.real, "renewal-hooks", phase)
            try:
                out[phase] = sorted(n for n in os.listdir(folder) if not n.startswith("."))
            except FileNotFoundError:
                out[phase] = []
            except OSError as exc:
                raise Unreadable(os_error_message(exc, folder)) from None
        return out


def read_outside(path: Path) -> bytes:
    """A file the renewal conf names outside the certbot folder (a DNS credentials ini):
    read as certbot would, through links, but only a regular file of a sane size."""
    return _read(path, follow=True)


def _read(path: Path, follow: bool) -> bytes:
    """A regular file of at most MAX_FILE bytes, opened with O_NOFOLLOW unless `follow`,
    checked on the descriptor. Raises Unreadable naming it."""
    # O_NONBLOCK: a FIFO put in the place of a file must not hang the import in open()
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise Unreadable(f"{path}: is a symlink") from None
        raise Unreadable(os_error_message(exc, path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"{path}: not a regular file")
        if st.st_size > MAX_FILE:
            raise Unreadable(f"{path}: too large ({st.st_size} bytes)")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(MAX_FILE + 1)
    except OSError as exc:
        raise Unreadable(os_error_message(exc, path)) from None
    finally:
        os.close(fd)
