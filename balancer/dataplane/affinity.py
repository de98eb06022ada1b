"""Session affinity: which bytes of a request a hashing pool hashes, and the sticky cookie.

``balance: hash`` sends equal keys to the same backend (:mod:`balancer.lb.hashing`); the key is the
client address, the target, a header's value or a cookie's value (:func:`request_key`). A request
without the header or cookie is keyed by its client address.

``sticky`` works with any policy: the first response carries ``Set-Cookie: NAME=ID.SIG``, where ID
is the backend's id and SIG an HMAC-SHA256 of it (truncated to 128 bits) under a secret, as Caddy
signs its sticky cookie. A later request carrying a valid cookie goes back to that backend while it
is ready (and not already tried by this request); a tampered, unknown or stale cookie is ignored and
replaced. The secret is the configured one, or one made by the main process and handed to its
proxy replicas (so that all of a balancer's processes agree); several instances behind one address
need a configured secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from .headers import RawHeaders, field_value


def cookie_value(headers: RawHeaders, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the request's Cookie fields, if any."""
    for field, value in headers:
        if len(field) == 6 and field.lower() == b"cookie":
            for pair in value.split(b";"):
                key, sep, found = pair.strip().partition(b"=")
                if sep and key == name:
                    return found.strip().strip(b'"')
    return None


def request_key(by: str, client: str, target: bytes, headers: RawHeaders) -> bytes:
    """The hashing key of a request: ``by`` is ``client_ip``, ``uri``, ``header:NAME`` or
    ``cookie:NAME`` (header names lower case)."""
    if by == "uri":
        return target
    if by.startswith("header:"):
        value = field_value(headers, by[7:].encode())
        if value is not None:
            return value
    elif by.startswith("cookie:"):
        cookie = cookie_value(headers, by[7:].encode())
        if cookie is not None:
            return cookie
    return client.encode()


class StickyCookie:
    """Signs and reads the sticky cookie of one pool."""

    __slots__ = ("_secret", "max_age", "name")

    def __init__(self, name: str, ttl_s: float, secret: bytes) -> None:
        self.name = name.encode()
        self.max_age = max(1, int(ttl_s))
        self._secret = secret

    def _sign(self, backend_id: bytes) -> bytes:
        digest = hmac.new(self._secret, self.name + b"\0" + backend_id, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=")

    def backend_id(self, headers: RawHeaders) -> str | None:
        """The backend id a valid cookie names; None for none, or one that fails its signature."""
        value = cookie_value(headers, self.name)
        if value is None:
            return None
        encoded, _, signature = value.rpartition(b".")
        try:
            backend_id = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(signature, self._sign(backend_id)):
            return None
        return backend_id.decode("utf-8", "replace")

    def set_cookie(self, backend_id: str) -> bytes:
        """The response field that sends the client back to ``backend_id``."""
        raw = backend_id.encode()
        value = base64.urlsafe_b64encode(raw).rstrip(b"=") + b"." + self._sign(raw)
        return b"Set-Cookie: %s=%s; Max-Age=%d; Path=/; HttpOnly; SameSite=Lax\r\n" % (
            self.name, value, self.max_age)
