"""Checking certificate files when a configuration is read, so that ``balancer check`` and a reload
refuse what the TLS handshake would only find later: an unreadable file, a key that is not the
certificate's, an expired certificate. Also reads the names a certificate is for (SNI).

The ``ssl`` module loads a certificate but cannot show one; ``cryptography`` reads it.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..errors import ConfigError

# A certificate this close to its end is accepted with a warning.
EXPIRY_WARNING = datetime.timedelta(days=14)


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    names: tuple[str, ...]            # DNS names (SAN; the CN when there is no SAN), lower case
    not_after: datetime.datetime      # UTC


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def inspect_certificate(cert_path: str, key_path: str,
                        now: datetime.datetime | None = None) -> CertificateInfo:
    """The names and end of the certificate in ``cert_path``, after checking that ``key_path``
    holds its private key and that it has not expired. Raises ConfigError saying what is wrong."""
    pem = read_file(cert_path)
    read_file(key_path)
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ConfigError(f"{cert_path} holds no PEM certificate") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper() or "mismatch" in str(exc).lower():
            raise ConfigError(f"the key in {key_path} is not the key of the certificate in {cert_path}") \
                from None
        raise ConfigError(f"cannot load {cert_path} with {key_path}: {reason}") from None
    not_after = cert.not_valid_after_utc
    if not_after <= (now or datetime.datetime.now(datetime.UTC)):
        raise ConfigError(f"the certificate in {cert_path} expired on {not_after:%Y-%m-%d %H:%M} UTC")
    return CertificateInfo(_names(cert), not_after)


def expires_soon(info: CertificateInfo, now: datetime.datetime | None = None) -> bool:
    return info.not_after - (now or datetime.datetime.now(datetime.UTC)) < EXPIRY_WARNING


def check_ca_file(path: str) -> None:
    """``path`` holds CA certificates a client context can verify with."""
    read_file(path)
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{path} holds no usable CA certificate: {exc.reason or exc}") from None


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(name.lower() for name in names))
