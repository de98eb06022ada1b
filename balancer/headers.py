"""What a proxy does to header fields, on raw bytes both ways (RFC 9110 section 7.6, Go's ReverseProxy).

* Hop-by-hop fields are removed in both directions, and so is every field named in ``Connection``.
* Framing (``Content-Length``, ``Transfer-Encoding``) is never copied: the proxy re-derives it from what
  it actually sends.
* ``X-Forwarded-For`` gets the client address appended when the peer is a trusted proxy, otherwise
  the incoming value is replaced; ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` likewise.

Fields stay ``bytes`` from the parser to the socket: no decoding, so non-ASCII octets pass unchanged.
The tables are built once at import time; the per-request work is one pass over the fields.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence

RawHeaders = Sequence[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
# Dropped from requests: hop-by-hop, framing (re-derived), and the forwarding fields we rewrite.
_REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
                              b"x-forwarded-host", b"expect", b"x-request-id"}
# An incoming X-Request-ID is kept only if it looks like an id (no spaces, no controls, bounded).
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,200}")
# Dropped from responses: hop-by-hop and framing.
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}


def connection_tokens(headers: RawHeaders) -> frozenset[bytes]:
    """Lower-cased field names listed in ``Connection`` (they are hop-by-hop too)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


class TrustedProxies:
    """Which peers may hand us ``X-Forwarded-*`` values that we keep and extend."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._cache: dict[str, bool] = {}

    def __contains__(self, peer: str) -> bool:
        if not self._networks:
            return False
        hit = self._cache.get(peer)
        if hit is None:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                hit = False
            else:
                hit = any(address in net for net in self._networks)
            if len(self._cache) < 4096:
                self._cache[peer] = hit
        return hit


class RequestHead:
    """What one pass over the client's header fields produced (see :func:`request_fields`)."""

    __slots__ = ("fields", "host", "request_id", "size", "upgrade")

    def __init__(self, fields: bytes, request_id: bytes, host: bytes, upgrade: bytes, size: int) -> None:
        self.fields = fields            # the header block for the backend, CRLF-terminated lines
        self.request_id = request_id    # kept from the client if well-formed, else new
        self.host = host                # Host (or the absolute-form authority), for routing
        self.upgrade = upgrade          # the client's Upgrade value, b"" if none
        self.size = size                # bytes in the client's header block, for limits


def request_fields(headers: RawHeaders, client_ip: bytes, trusted: bool, authority: bytes | None,
                   new_id: Callable[[], bytes], scheme: bytes = b"http") -> RequestHead:
    """One pass over the client's fields: the header block to send upstream, plus what routing,
    limits and logging need from them.

    ``authority`` (from an absolute-form target) replaces the Host field, as RFC 9112 3.2.2 requires.
    """
    drop = _REQUEST_DROP
    out: list[bytes] = []
    forwarded_for = forwarded_proto = forwarded_host = host = request_id = upgrade = b""
    has_connection = False
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 4
        lname = name.lower()
        if lname in drop:
            if lname == b"connection":
                has_connection = True
            elif lname == b"x-request-id":
                request_id = value if _REQUEST_ID.fullmatch(value) else b""
            elif lname == b"upgrade":
                upgrade = value
            elif trusted:
                if lname == b"x-forwarded-for":
                    forwarded_for = forwarded_for + b", " + value if forwarded_for else value
                elif lname == b"x-forwarded-proto":
                    forwarded_proto = value
                elif lname == b"x-forwarded-host":
                    forwarded_host = value
            continue
        if lname == b"host":
            if authority is not None:
                continue
            host = value
        out.append(name + b": " + value + b"\r\n")
    if authority is not None:
        host = authority
        out.append(b"Host: " + authority + b"\r\n")
    if has_connection:
        listed = connection_tokens(headers)
        if listed:
            out = [line for line in out if line.split(b":", 1)[0].lower() not in listed]
    out.append(b"X-Forwarded-For: " + (forwarded_for + b", " + client_ip if forwarded_for else client_ip)
               + b"\r\n")
    out.append(b"X-Forwarded-Proto: " + (forwarded_proto or scheme) + b"\r\n")
    if forwarded_host or host:
        out.append(b"X-Forwarded-Host: " + (forwarded_host or host) + b"\r\n")
    if not request_id:
        request_id = new_id()
    out.append(b"X-Request-ID: " + request_id + b"\r\n")
    return RequestHead(b"".join(out), request_id, host, upgrade, size)


def response_fields(headers: RawHeaders, request_id: bytes) -> bytes:
    """The upstream response's header block minus hop-by-hop and framing fields, with the
    request's X-Request-ID unless the backend set one."""
    drop = _RESPONSE_DROP
    out: list[bytes] = []
    has_connection = False
    has_request_id = False
    for name, value in headers:
        lname = name.lower()
        if lname in drop:
            has_connection = has_connection or lname == b"connection"
            continue
        if lname == b"x-request-id":
            has_request_id = True
        out.append(name + b": " + value + b"\r\n")
    if request_id and not has_request_id:
        out.append(b"X-Request-ID: " + request_id + b"\r\n")
    if has_connection:
        listed = connection_tokens(headers)
        if listed:
            out = [line for line in out if line.split(b":", 1)[0].lower() not in listed]
    return b"".join(out)
