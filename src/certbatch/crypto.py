"""Private keys and certificate checks (cryptography only; imported lazily, on issuance)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .errors import CertificateCheckError

_CURVES = {"ec-p256": ec.SECP256R1, "ec-p384": ec.SECP384R1}
_RSA_BITS = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}


@dataclass(frozen=True)
class CertInfo:
    serial: str  # lower-case hex, no separators
    not_before: dt.datetime  # UTC, tz-aware
    not_after: dt.datetime
    names: tuple[str, ...]  # DNS subjectAltNames


def generate_key(key_type: str) -> bytes:
    """A new private key of `key_type` as unencrypted PKCS#8 PEM."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type in _CURVES:
        key = ec.generate_private_key(_CURVES[key_type]())
    elif key_type in _RSA_BITS:
        key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[key_type])
    else:
        raise ValueError(f"unknown key type {key_type!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_info(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(serial=format(cert.serial_number, "x"), not_before=cert.not_valid_before_utc,
                    not_after=cert.not_valid_after_utc, names=names)


def check_pair(fullchain_pem: bytes, key_pem: bytes) -> CertInfo:
    """The leaf of `fullchain_pem`, checked to parse and to match the private key `key_pem`.

    Raises CertificateCheckError saying which of the two is wrong.
    """
    return cert_info(_matching_leaf(fullchain_pem, key_pem))


def _matching_leaf(fullchain_pem: bytes, key_pem: bytes) -> x509.Certificate:
    """check_pair without reading the leaf's names (parsing its extensions costs more than
    the rest of the check, and a staged entry is checked by its serial alone)."""
    try:
        leaf = x509.load_pem_x509_certificates(fullchain_pem)[0]
    except ValueError as exc:
        raise CertificateCheckError(f"the certificate does not parse: {exc}") from exc
    try:
        # Only the public half is compared: skipping RSA's slow consistency checks is safe here.
        key = serialization.load_pem_private_key(key_pem, password=None,
                                                 unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError) as exc:
        raise CertificateCheckError(f"the private key does not parse: {exc}") from exc
    # cryptography (41 on) compares public keys by value (type, curve or size, the key itself):
    # a quarter of the time of comparing two DER encodings, done 10,000 times in a restage.
    if leaf.public_key() != key.public_key():
        raise CertificateCheckError("the certificate does not match the private key")
    return leaf


def set_problem(files: Mapping[str, bytes], serial: str) -> str | None:
    """Why a stored or staged set (privkey.pem, cert.pem, fullchain.pem) is not usable, or
    None: the leaf and the key parse and belong together, cert.pem holds that leaf, and its
    serial is `serial` (hex)."""
    try:
        number = _matching_leaf(files["fullchain.pem"], files["privkey.pem"]).serial_number
        # certbatch writes fullchain.pem as cert.pem + chain.pem: when cert.pem is exactly one
        # whole PEM block that fullchain.pem starts with, it is the leaf just checked.
        leaf = files["cert.pem"].strip()
        same = leaf.startswith(b"-----BEGIN CERTIFICATE-----") and leaf.endswith(
            b"-----END CERTIFICATE-----") and leaf.count(b"-----BEGIN") == 1 and \
            files["fullchain.pem"].startswith(leaf)
        if not same and \
                _matching_leaf(files["cert.pem"], files["privkey.pem"]).serial_number != number:
            return "cert.pem and fullchain.pem hold different certificates"
    except CertificateCheckError as exc:
        return str(exc)
    try:
        same = number == int(serial, 16)
    except ValueError:
        same = False
    return None if same else f"the certificate's serial is {number:x}, meta.json says {serial}"


def check_issued(fullchain_pem: bytes, key_pem: bytes, domains: tuple[str, ...] | list[str],
                 now: dt.datetime | None = None) -> CertInfo:
    """Check what the CA sent before it replaces anything: it parses, matches our key, covers
    every requested name and is currently valid. Returns the leaf's details."""
    try:
        info = check_pair(fullchain_pem, key_pem)
    except CertificateCheckError as exc:
        raise CertificateCheckError(str(exc).replace("the certificate", "the CA's certificate",
                                                     1)) from exc
    missing = sorted(set(d.lower() for d in domains) - set(info.names))
    if missing:
        raise CertificateCheckError(
            f"the CA's certificate does not cover {', '.join(missing)}")
    now = now or dt.datetime.now(dt.timezone.utc)
    if not info.not_before - dt.timedelta(minutes=5) <= now < info.not_after:
        raise CertificateCheckError(
            f"the CA's certificate is not valid now ({info.not_before} .. {info.not_after})")
    return info


def split_fullchain(fullchain_pem: bytes) -> tuple[bytes, bytes]:
    """(leaf PEM, intermediates PEM) from a full chain."""
    certs = x509.load_pem_x509_certificates(fullchain_pem)
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in certs]
    return pems[0], b"".join(pems[1:])
