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


# `Connection` tokens that name no other field we could be sending: nothing to filter for them. Host
# is never removed, whatever `Connection` lists: a request upstream carries exactly one.
_PLAIN_TOKENS = HOP_BY_HOP | {b"close", b"keep-alive", b"", b"host"}


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """Lower-cased field names listed in the ``Connection`` field ``values`` (they are hop-by-hop
    too), minus those dropped anyway (``keep-alive``, ``close``, ``upgrade``...): usually empty."""
    names: set[bytes] | None = None
    for value in values:
        value = value.lower()
        if value not in _PLAIN_TOKENS:          # not the usual lone `keep-alive` or `close`
            names = names or set()
            names.update(t.strip() for t in value.split(b","))
    return frozenset(names - _PLAIN_TOKENS) if names else _NO_TOKENS


_NO_TOKENS: frozenset[bytes] = frozenset()


class AddressSet:
    """Client addresses in some networks: the trusted proxies (whose ``X-Forwarded-*`` values we keep
    and extend), a route's ``allow`` and ``deny``. Lookups are cached, bounded."""

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

    __slots__ = ("fields", "forwarded_for", "host", "request_id", "size", "upgrade")

    def __init__(self, fields: bytes, request_id: bytes, host: bytes, upgrade: bytes, size: int,
                 forwarded_for: bytes = b"") -> None:
        self.forwarded_for = forwarded_for  # a trusted peer's X-Forwarded-For, as received
        self.fields = fields            # the header block for the backend, CRLF-terminated lines
        self.request_id = request_id    # kept from the client if well-formed, else new
        self.host = host                # Host (or the absolute-form authority), for routing
        self.upgrade = upgrade          # the client's Upgrade value, b"" if none
        self.size = size                # bytes in the client's header block, for limits


# What to do with a field, by name. Looked up by the name *as received*: `_KIND` learns each spelling
# on first sight (bounded), so the usual field costs one dict lookup and no lower-casing.
_PASS, _DROP, _HOST, _CONNECTION, _REQUEST_ID_FIELD, _UPGRADE, _XFF, _XFP, _XFH = range(9)
_KIND_BY_LOWER: dict[bytes, int] = {name: _DROP for name in _REQUEST_DROP}
_KIND_BY_LOWER.update({b"host": _HOST, b"connection": _CONNECTION, b"x-request-id": _REQUEST_ID_FIELD,
                       b"upgrade": _UPGRADE, b"x-forwarded-for": _XFF, b"x-forwarded-proto": _XFP,
                       b"x-forwarded-host": _XFH})
_RESPONSE_KIND_BY_LOWER: dict[bytes, int] = {name: _DROP for name in _RESPONSE_DROP}
_RESPONSE_KIND_BY_LOWER.update({b"connection": _CONNECTION, b"x-request-id": _REQUEST_ID_FIELD})
_KIND_CACHE_MAX = 4096


def _learn(cache: dict[bytes, int], by_lower: dict[bytes, int], name: bytes) -> int:
    kind = by_lower.get(name.lower(), _PASS)
    if len(cache) < _KIND_CACHE_MAX:
        cache[name] = kind
    return kind


_KIND: dict[bytes, int] = {}
_RESPONSE_KIND: dict[bytes, int] = {}


def request_fields(headers: RawHeaders, client_ip: bytes, trusted: bool, authority: bytes | None,
                   new_id: Callable[[], bytes], scheme: bytes = b"http") -> RequestHead:
    """One pass over the client's fields: the header block to send upstream, plus what routing,
    limits and logging need from them.

    ``authority`` (from an absolute-form target) replaces the Host field, as RFC 9112 3.2.2 requires.
    """
    kinds = _KIND
    out: list[bytes] = []
    forwarded_for = forwarded_proto = forwarded_host = host = request_id = upgrade = b""
    connection: list[bytes] = []
    dropped = 0                     # bytes of the fields not copied (the size limit counts them)
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _learn(kinds, _KIND_BY_LOWER, name)
        if kind == _PASS:
            out += (name, b": ", value, b"\r\n")
            continue
        if kind == _HOST:
            host = value
            if authority is None:
                out += (name, b": ", value, b"\r\n")
                continue
        elif kind == _CONNECTION:
            connection.append(value)
        elif kind == _REQUEST_ID_FIELD:
            request_id = value if _REQUEST_ID.fullmatch(value) else b""
        elif kind == _UPGRADE:
            upgrade = value
        elif trusted:
            if kind == _XFF and value:
                forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            elif kind == _XFP:
                forwarded_proto = value
            elif kind == _XFH:
                forwarded_host = value
        dropped += len(name) + len(value) + 4
    if authority is not None:
        host = authority
        out += (b"Host: ", authority, b"\r\n")
        dropped -= len(authority) + 8
    block = b"".join(out)
    size = len(block) + dropped
    if connection:
        listed = connection_tokens(connection)
        if listed:
            block = _without(block, listed)
    if not request_id:
        request_id = new_id()
    added = [block, b"X-Forwarded-For: ", forwarded_for + b", " + client_ip if forwarded_for else client_ip,
             b"\r\nX-Forwarded-Proto: ", forwarded_proto or scheme, b"\r\n"]
    if forwarded_host or host:
        added += (b"X-Forwarded-Host: ", forwarded_host or host, b"\r\n")
    added += (b"X-Request-ID: ", request_id, b"\r\n")
    return RequestHead(b"".join(added), request_id, host, upgrade, size, forwarded_for)


def client_address(peer: str, forwarded_for: bytes, trusted: AddressSet) -> str:
    """The client a trusted proxy speaks for: the last ``X-Forwarded-For`` entry that is not a
    trusted proxy itself (entries are appended left to right, so the rightmost are the surest);
    the peer when there is none."""
    for entry in reversed(forwarded_for.split(b",")):
        address = entry.strip().decode("latin-1")
        if address and address not in trusted:
            return address if _ADDRESS.fullmatch(address) else peer
    return peer


_ADDRESS = re.compile(r"[0-9A-Fa-f.:]{2,45}")


class HeaderEdits:
    """A route's header rules on a header block: remove (and the names ``set`` replaces), then the
    ``set`` and ``add`` lines."""

    __slots__ = ("_append", "_drop", "_probes")

    def __init__(self, set_: tuple[tuple[str, str], ...], add: tuple[tuple[str, str], ...],
                 remove: tuple[str, ...]) -> None:
        self._drop = frozenset(n.lower().encode() for n in (*remove, *(name for name, _ in set_)))
        # "\nname:" in the lower-cased block (with a CRLF before it) finds a field line to drop.
        self._probes = tuple(b"\n" + name + b":" for name in self._drop)
        self._append = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in (*set_, *add))

    def apply(self, block: bytes) -> bytes:
        """The block with the rules applied. The usual case, none of the names present, costs one
        lower-casing of the block (in C), not a pass over its lines."""
        if self._probes:
            lowered = b"\n" + block.lower()
            if any(probe in lowered for probe in self._probes):
                block = _without(block, self._drop)
        return block + self._append


def field_value(headers: RawHeaders, name: bytes) -> bytes | None:
    """The value of the first field called ``name`` (lower case), or None."""
    size = len(name)
    for field, value in headers:
        if len(field) == size and field.lower() == name:
            return value
    return None


def request_host(headers: RawHeaders) -> bytes:
    """The request's Host value (the front door refuses a request with more than one)."""
    return field_value(headers, b"host") or b""


def _without(block: bytes, names: frozenset[bytes]) -> bytes:
    """``block`` (CRLF-terminated field lines) minus the fields named in ``names`` (lower case)."""
    lines = block.split(b"\r\n")
    return b"".join(line + b"\r\n" for line in lines[:-1]
                    if line.split(b":", 1)[0].lower() not in names)


def response_fields(headers: RawHeaders, request_id: bytes) -> bytes:
    """The upstream response's header block minus hop-by-hop and framing fields, with the
    request's X-Request-ID unless the backend set one."""
    kinds = _RESPONSE_KIND
    out: list[bytes] = []
    connection: list[bytes] = []
    has_request_id = False
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _learn(kinds, _RESPONSE_KIND_BY_LOWER, name)
        if kind == _PASS:
            out += (name, b": ", value, b"\r\n")
        elif kind == _REQUEST_ID_FIELD:
            has_request_id = True
            out += (name, b": ", value, b"\r\n")
        elif kind == _CONNECTION:
            connection.append(value)
    if request_id and not has_request_id:
        out += (b"X-Request-ID: ", request_id, b"\r\n")
    block = b"".join(out)
    if connection:
        listed = connection_tokens(connection)
        if listed:
            block = _without(block, listed)
    return block
