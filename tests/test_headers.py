"""balancer.dataplane.headers: the fast field passes against a plain reference, on random field lists."""

from __future__ import annotations

import random

from balancer.dataplane.headers import HOP_BY_HOP, connection_tokens, request_fields, response_fields

NAMES = [b"Host", b"host", b"HOST", b"User-Agent", b"Accept", b"Connection", b"connection",
         b"Keep-Alive", b"TE", b"Upgrade", b"X-Request-ID", b"x-request-id", b"X-Forwarded-For",
         b"X-Forwarded-Proto", b"X-Forwarded-Host", b"Content-Length", b"Transfer-Encoding", b"Expect",
         b"X-Custom", b"x-custom", b"Cookie", b"Proxy-Authorization", b"Trailer", b"Set-Cookie"]
VALUES = [b"a", b"example.com", b"keep-alive", b"close", b"X-Custom, keep-alive", b"cookie, x-custom",
          b"req-1", b"bad id with spaces", b"10.0.0.1", b"https", b"websocket", b"\xc3\xa9t\xc3\xa9", b""]
REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
                             b"x-forwarded-host", b"expect", b"x-request-id"}


def _listed(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")}


def reference_request(headers: list[tuple[bytes, bytes]], client: bytes, trusted: bool,
                      authority: bytes | None) -> tuple[bytes, bytes, bytes, bytes, int]:
    """The rules written plainly: (fields, request_id or b"", host, upgrade, size)."""
    listed = _listed(headers)
    lines: list[bytes] = []
    xff: list[bytes] = []
    xfp = xfh = host = rid = upgrade = b""
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-request-id":
            rid = value if 0 < len(value) <= 200 and all(
                chr(c).isascii() and (chr(c).isalnum() or chr(c) in "._:/+=@-") for c in value) else b""
        elif lname == b"upgrade":
            upgrade = value
        elif lname == b"host":
            host = value
        if trusted and lname == b"x-forwarded-for" and value:
            xff.append(value)
        if trusted and lname == b"x-forwarded-proto":
            xfp = value
        if trusted and lname == b"x-forwarded-host":
            xfh = value
        if lname in REQUEST_DROP or lname in listed or (lname == b"host" and authority is not None):
            continue
        lines.append(name + b": " + value + b"\r\n")
    if authority is not None:
        host = authority
        if b"host" not in listed:
            lines.append(b"Host: " + authority + b"\r\n")
    lines.append(b"X-Forwarded-For: " + b", ".join([*xff, client]) + b"\r\n")
    lines.append(b"X-Forwarded-Proto: " + (xfp or b"http") + b"\r\n")
    if xfh or host:
        lines.append(b"X-Forwarded-Host: " + (xfh or host) + b"\r\n")
    size = sum(len(n) + len(v) + 4 for n, v in headers)
    return b"".join(lines), rid, host, upgrade, size


def reference_response(headers: list[tuple[bytes, bytes]], request_id: bytes) -> bytes:
    listed = _listed(headers)
    drop = HOP_BY_HOP | {b"content-length"}
    lines = [n + b": " + v + b"\r\n" for n, v in headers if n.lower() not in drop and n.lower() not in listed]
    if request_id and not any(n.lower() == b"x-request-id" for n, _ in headers):
        if b"x-request-id" not in listed:
            lines.append(b"X-Request-ID: " + request_id + b"\r\n")
    return b"".join(lines)


def random_fields(rnd: random.Random) -> list[tuple[bytes, bytes]]:
    return [(rnd.choice(NAMES), rnd.choice(VALUES)) for _ in range(rnd.randint(0, 8))]


def test_request_fields_match_reference() -> None:
    rnd = random.Random(7)
    for _ in range(2000):
        headers = random_fields(rnd)
        trusted = rnd.random() < 0.5
        authority = rnd.choice([None, None, b"abs.example:8080"])
        head = request_fields(headers, b"192.0.2.7", trusted, authority, lambda: b"new-id")
        fields, rid, host, upgrade, size = reference_request(headers, b"192.0.2.7", trusted, authority)
        rid = rid or b"new-id"
        case = (headers, trusted, authority)
        assert head.fields == fields + b"X-Request-ID: " + rid + b"\r\n", case
        assert (head.request_id, head.host, head.upgrade, head.size) == (rid, host, upgrade, size), case


def test_response_fields_match_reference() -> None:
    rnd = random.Random(11)
    for _ in range(2000):
        headers = random_fields(rnd)
        request_id = rnd.choice([b"", b"rid-1"])
        assert response_fields(headers, request_id) == reference_response(headers, request_id), headers


def test_connection_tokens_skip_the_usual_values() -> None:
    assert connection_tokens([b"keep-alive"]) == frozenset()
    assert connection_tokens([b"Close"]) == frozenset()
    assert connection_tokens([b"Keep-Alive, X-Secret", b"upgrade"]) == {b"x-secret"}
