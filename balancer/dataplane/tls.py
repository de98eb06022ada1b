"""TLS contexts: a TLS listener's certificates chosen by SNI, and the client side to backends.

Defaults follow Mozilla's "intermediate" profile (TLS 1.2 and 1.3, its TLS 1.2 cipher list, no
compression, no session tickets: nginx's ``ssl_session_tickets off`` in that profile, since ticket
keys that never rotate undo forward secrecy). The handshake and the crypto run in OpenSSL, through
the event loop's SSL transport; nothing here runs per request.

A listener has one :class:`ServerTLS`. Its :attr:`~ServerTLS.context` is the one a new connection
starts with (it holds the first, default, certificate); its SNI callback moves the handshake to the
context of the certificate whose names match the requested server name: exactly, else by one
leading wildcard label (``*.example.com`` matches ``a.example.com``, not ``a.b.example.com``, as
RFC 6125 6.4.3 has it), else the default. A reload builds a new ``ServerTLS`` and the listener hands
it to connections accepted from then on; open connections keep theirs.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ..config.models import CertificateConfig, ServerTLSConfig, UpstreamTLSConfig

# Mozilla's "intermediate" TLS 1.2 cipher suites (TLS 1.3 suites are OpenSSL's, all good).
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _hardened(context: ssl.SSLContext, min_version: str) -> ssl.SSLContext:
    context.minimum_version = VERSIONS[min_version]
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def server_context(certificate: CertificateConfig, config: ServerTLSConfig) -> ssl.SSLContext:
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), config.min_version)
    context.options |= ssl.OP_NO_TICKET
    context.load_cert_chain(certificate.cert, certificate.key)
    if config.alpn:
        context.set_alpn_protocols(list(config.alpn))
    return context


class ServerTLS:
    """The certificates of one TLS listener, and the choice among them by SNI."""

    def __init__(self, config: ServerTLSConfig) -> None:
        self.config = config
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}     # "example.com" for "*.example.com"
        contexts = []
        for certificate in config.certificates:
            context = server_context(certificate, config)
            contexts.append(context)
            for name in certificate.names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], context)
                else:
                    self._exact.setdefault(name, context)
        self.context = contexts[0]
        self.context.sni_callback = self._choose

    def choose(self, server_name: str | None) -> ssl.SSLContext:
        """The context whose certificate is for ``server_name``; the default one otherwise."""
        if server_name:
            name = server_name.lower().rstrip(".")
            chosen = self._exact.get(name)
            if chosen is None:
                parent = name.partition(".")[2]
                chosen = self._wildcard.get(parent) if parent else None
            if chosen is not None:
                return chosen
        return self.context

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        chosen = self.choose(server_name)
        if chosen is not self.context:
            connection.context = chosen


def client_context(config: UpstreamTLSConfig) -> ssl.SSLContext:
    """For connections to a pool's backends: verified against ``ca`` or the system store, unless
    ``verify`` is off."""
    context = _hardened(ssl.create_default_context(cafile=config.ca), "1.2")
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


@dataclass(frozen=True, slots=True, eq=False)
class ClientTLS:
    """TLS to the backends of one pool: the context, and the name sent as SNI and verified
    (None: the backend's host)."""

    context: ssl.SSLContext
    server_name: str | None = None

    def name_for(self, host: str) -> str:
        return self.server_name or host


def client_tls(config: UpstreamTLSConfig | None) -> ClientTLS | None:
    if config is None or not config.enabled:
        return None
    return ClientTLS(client_context(config), config.server_name)
