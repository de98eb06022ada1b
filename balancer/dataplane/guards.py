"""What may stop a request at its route before any backend sees it, checked in this order:

1. ``deny`` then ``allow`` (client address ranges): 403;
2. ``basic_auth`` (bcrypt hashes): 401 with ``WWW-Authenticate``;
3. ``rate_limit`` (a token bucket per key): 429 with ``Retry-After``.

The client address is the one the access log shows: the peer's, or, from a trusted proxy, the last
``X-Forwarded-For`` entry that is not itself a trusted proxy.

**bcrypt** is slow on purpose (a cost-12 hash takes a quarter of a second of CPU), so it never runs on
the event loop: checks run on a small thread pool, at most ``MAX_PENDING_CHECKS`` at once (beyond it:
503, so a password-guessing flood cannot queue without bound), and a credential that passed is
remembered (keyed by an HMAC of the header, not the header itself) for ``CACHE_TTL_S``, as Caddy does,
in a bounded table.

**Rate limits** are per proxy process: with ``processes: N`` a client whose connections the kernel
spreads over N processes gets up to N times the rate (nginx's ``limit_req`` shares one zone among its
workers; a limit shared across processes and instances is a later step).
The buckets are an LRU of at most ``max_keys`` entries, so memory is bounded whatever the number of
distinct keys; a key that was dropped starts again with a full bucket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import bcrypt

from .headers import AddressSet, RawHeaders, field_value

MAX_PENDING_CHECKS = 64
CACHE_TTL_S = 300.0
CACHE_SIZE = 4096

_checker: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _checker
    if _checker is None:
        _checker = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bcrypt")
    return _checker


class Refused(Exception):
    """A guard refused the request: the status, the error kind and extra header fields to send."""

    def __init__(self, status: int, kind: str, fields: bytes = b"") -> None:
        super().__init__(kind)
        self.status = status
        self.kind = kind
        self.fields = fields


class BasicAuth:
    """HTTP Basic authentication (RFC 7617) against bcrypt hashes."""

    __slots__ = ("_cache", "_challenge", "_key", "_pending", "_users")

    def __init__(self, realm: str, users: tuple[tuple[str, str], ...]) -> None:
        self._users = {name.encode(): hashed.encode() for name, hashed in users}
        self._challenge = b'WWW-Authenticate: Basic realm="' + realm.replace('"', "'").encode() + \
            b'", charset="UTF-8"\r\n'
        self._key = os.urandom(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()     # HMAC of a good header -> expiry
        self._pending = 0

    async def check(self, headers: RawHeaders) -> None:
        value = field_value(headers, b"authorization")
        if value is None or value[:6].lower() != b"basic ":
            raise Refused(401, "unauthorized", self._challenge)
        tag = hmac.new(self._key, value, hashlib.sha256).digest()
        expiry = self._cache.get(tag)
        now = time.monotonic()
        if expiry is not None and expiry > now:
            self._cache.move_to_end(tag)
            return
        try:
            user, _, password = base64.b64decode(value[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            raise Refused(401, "unauthorized", self._challenge) from None
        hashed = self._users.get(user)
        if hashed is None:
            raise Refused(401, "unauthorized", self._challenge)
        if self._pending >= MAX_PENDING_CHECKS:
            raise Refused(503, "auth_busy", b"Retry-After: 1\r\n")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(_executor(), bcrypt.checkpw, password, hashed)
        finally:
            self._pending -= 1
        if not ok:
            raise Refused(401, "unauthorized", self._challenge)
        self._cache[tag] = now + CACHE_TTL_S
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, holding at most ``burst``.

    Kept as GCRA (the generic cell rate algorithm, as in ATM and many limiters since): one number a
    key, the time its bucket will be full again, instead of (tokens, time): a bucket costs one float.
    """

    __slots__ = ("_buckets", "_clock", "_header", "_interval", "_max_keys", "_tolerance")

    def __init__(self, rate: float, burst: int, key: str, max_keys: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / rate                     # seconds a token takes to come back
        burst = burst or max(1, math.ceil(rate))
        self._tolerance = (burst - 1) * self._interval  # how far ahead of now a bucket may run
        self._header = key[7:].encode() if key.startswith("header:") else b""
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[bytes, float] = OrderedDict()    # key -> when it is full again

    def __len__(self) -> int:
        return len(self._buckets)

    def key_of(self, client: bytes, headers: RawHeaders) -> bytes:
        if self._header:
            value = field_value(headers, self._header)
            if value is not None:
                return b"h:" + value
        return client

    def take(self, key: bytes) -> None:
        """One token for ``key``, or Refused(429) saying when the next one is there."""
        now = self._clock()
        buckets = self._buckets
        full_at = buckets.get(key)
        if full_at is None:
            full_at = now
            if len(buckets) >= self._max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
            if full_at < now:
                full_at = now
        ahead = full_at - now
        if ahead > self._tolerance:
            wait = ahead - self._tolerance
            buckets[key] = full_at
            raise Refused(429, "rate_limited", b"Retry-After: %d\r\n" % max(math.ceil(wait - 1e-9), 1))
        buckets[key] = full_at + self._interval


class Guards:
    """A route's checks, in order: addresses, credentials, rate."""

    __slots__ = ("allow", "auth", "deny", "limiter")

    def __init__(self, allow: AddressSet | None = None, deny: AddressSet | None = None,
                 auth: BasicAuth | None = None, limiter: RateLimiter | None = None) -> None:
        self.allow = allow
        self.deny = deny
        self.auth = auth
        self.limiter = limiter

    def check_addresses(self, client: str) -> None:
        if self.deny is not None and client in self.deny:
            raise Refused(403, "forbidden")
        if self.allow is not None and client not in self.allow:
            raise Refused(403, "forbidden")

    def check_rate(self, client: str, headers: RawHeaders) -> None:
        limiter = self.limiter
        if limiter is not None:
            limiter.take(limiter.key_of(client.encode(), headers))

    async def check(self, client: str, headers: RawHeaders) -> None:
        """Every check, in order (the proxy calls the synchronous ones directly when there is no
        ``basic_auth``: no coroutine per request)."""
        self.check_addresses(client)
        if self.auth is not None:
            await self.auth.check(headers)
        self.check_rate(client, headers)
