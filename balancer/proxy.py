"""The request path: route -> snapshot -> pick -> lease -> send -> stream back.

Runs as the request handler of the front door (:mod:`balancer.server`): each request arrives as an
:class:`~balancer.server.Exchange`, aiohttp's parsed message and body stream plus the writer of our
response. Requests and responses are streamed; header fields travel as raw bytes (see
:mod:`balancer.headers`), and the response head is built from those bytes.

Every failure maps to a status in one table, :data:`FAILURES`. Before the first response byte reaches
the client, a failed attempt may be tried again:

* on the **same** backend, once, on a fresh connection, when a *reused* keep-alive connection turned
  out to be closed by the backend before any response byte arrived (the keep-alive race), and
* on a **different** backend, up to ``retries`` times, for idempotent requests (or ones carrying an
  ``Idempotency-Key``) after a connect failure, an empty reply or a response timeout,

in both cases only if the request body can be replayed (no body, or one small enough that we kept it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp.http_writer import HttpVersion11

from .errors import (
    BodyTooLarge,
    NoBackendAvailable,
    PoolQueueFull,
    PoolTimeout,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamResponseTimeout,
)
from .headers import RequestHead, TrustedProxies, request_fields, response_fields
from .models import LimitsConfig
from .pool import ConnectionPool, UpstreamPools
from .record import RequestRecord
from .registry import Backend, BackendSet
from .routing import Router
from .selection import Selector
from .server import Exchange, ParsedRequest, refusal
from .upstream import ResponseHead, UpstreamConnection

log = logging.getLogger(__name__)

# Failure -> (status, short name for logs/metrics). The one place where errors become statuses.
FAILURES: dict[type[UpstreamError], tuple[int, str]] = {
    NoBackendAvailable: (503, "no_backend"),
    PoolTimeout: (503, "pool_timeout"),
    PoolQueueFull: (503, "queue_full"),
    UpstreamConnectError: (502, "connect_error"),
    UpstreamConnectTimeout: (504, "connect_timeout"),
    UpstreamResponseTimeout: (504, "response_timeout"),
    UpstreamReadTimeout: (504, "read_timeout"),
    UpstreamProtocolError: (502, "protocol_error"),
    UpstreamClosed: (502, "upstream_closed"),
}

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Request bodies up to this size are read before sending, so the request can be replayed.
REPLAY_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class PoolRuntime:
    """What the proxy needs per configured pool, built once at start-up."""

    name: str
    backends: BackendSet
    selector: Selector
    response_timeout_s: float
    read_timeout_s: float
    retries: int


class _Attempt:
    """A backend's response head, on the leased connection that carries its body."""

    __slots__ = ("conn", "head", "pool")

    def __init__(self, pool: ConnectionPool, conn: UpstreamConnection, head: ResponseHead) -> None:
        self.pool = pool
        self.conn = conn
        self.head = head


class Proxy:
    """The data-port handler. One instance per process; all state is in the registry and pools."""

    def __init__(self, router: Router, pools: dict[str, PoolRuntime],
                 upstream: UpstreamPools, trusted: TrustedProxies,
                 limits: LimitsConfig | None = None) -> None:
        self.limits = limits or LimitsConfig()
        self.router = router
        self.pools = pools
        self.upstream = upstream
        self._pool_by_id = upstream.by_id
        self.trusted = trusted
        # Passive health: told (backend, ok) after every attempt that reached a verdict.
        self.outcome_listeners: list[Callable[[Backend, bool], None]] = []
        # Metrics, access log, slow log: told every finished request.
        self.observers: list[Callable[[RequestRecord], None]] = []
        self.requests = 0
        self.retries = 0
        # Set by shutdown: every response from now on carries `Connection: close`.
        self.draining = False
        self._request_ids = RequestIds()
        self._budget = RetryBudget()
        self._failure_log = ThrottledLog(log)

    async def handle(self, request: Exchange) -> None:
        """Serve one request; every path ends with the response finished and the record observed.

        The steps are inline (one coroutine for the request, one for the exchange with backends):
        every coroutine level costs on each request and on each resumption.
        """
        self.requests += 1
        message = request.message
        target: bytes = message.path.encode("utf-8", "surrogateescape")
        record = RequestRecord(time.monotonic(), time.time(), message.method, target,
                               request.protocol.peer_ip())
        record.headers = message.raw_headers
        version = message.version
        if version != HttpVersion11:
            record.version = f"{version[0]}.{version[1]}"     # "1.0", or what a refused request said
        try:
            route = self._route(request, message, target, record)
            if route is None:
                return                  # answered already: refused, no route, too large
            runtime, head_info, target = route
            method = message.method
            body: list[bytes] = []      # a small body, kept as received for a possible replay
            body_size = 0
            streamed_body = False
            if request.body_exists:
                if message.headers.get("Expect", "").lower() == "100-continue":
                    # We read the body ourselves, so we give the client the go-ahead ourselves.
                    if request.transport is not None:
                        request.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if 0 <= (request.content_length or -1) <= REPLAY_BODY_LIMIT:
                    content = request.payload
                    while chunk := await content.readany():
                        body.append(chunk)
                        body_size += len(chunk)
                    record.bytes_in = body_size
                else:
                    streamed_body = True

            upgrade = head_info.upgrade
            tunnel = bool(upgrade) and message.upgrade and upgrade.lower() != b"h2c"
            if tunnel:
                framing = b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n"
            elif streamed_body:
                length = request.content_length
                framing = b"Content-Length: %d\r\n" % length if length is not None else \
                    b"Transfer-Encoding: chunked\r\n"
            elif body or method in ("POST", "PUT", "PATCH"):
                framing = b"Content-Length: %d\r\n" % body_size
            else:
                framing = b""
            head = b"".join((method.encode(), b" ", target, b" HTTP/1.1\r\n", head_info.fields, framing,
                             b"\r\n"))
            retry_ok = not tunnel and (method in IDEMPOTENT or "Idempotency-Key" in message.headers)

            try:
                attempt, backend = await self._exchange(runtime, request, head, body, streamed_body,
                                                        retry_ok, method == "HEAD", record)
            except BodyTooLarge:
                return self._fail(request, record, 413, "body_too_large", close=True)
            except UpstreamError as exc:
                status, kind = FAILURES.get(type(exc), (502, "error"))
                self._failure_log.warning(kind, "%s %s -> %d (%s): %s", method, message.path, status,
                                          kind, exc)
                return self._fail(request, record, status, kind, close=message.upgrade)
            if tunnel and attempt.head.status == 101:
                await self._tunnel(request, attempt, backend, record)
            elif not self._send_complete(request, attempt, backend, record, close=message.upgrade):
                await self._stream_back(request, runtime, attempt, backend, record)
        finally:
            record.total_s = time.monotonic() - record.start
            for observer in self.observers:
                observer(record)

    def _route(self, request: Exchange, message: ParsedRequest, target: bytes,
               record: RequestRecord) -> tuple[PoolRuntime, RequestHead, bytes] | None:
        """The checks and the routing before any backend is involved: the pool, the header block for
        the backend and the origin-form target; or None when the request was answered here."""
        authority = None
        if target[:1] != b"/" and target != b"*":
            # Absolute form (RFC 9112 3.2.2): the target's authority replaces Host, and the backend
            # gets the origin form.
            split = _split_absolute(target)
            if split is None or message.method == "CONNECT":
                self._fail(request, record, 400, "refused", close=True)
                return None
            authority, target = split
        client = record.client
        head_info = request_fields(message.raw_headers, request.protocol.client_ip_bytes,
                                   client in self.trusted, authority, self._request_ids.next)
        record.request_id = head_info.request_id
        refused = None if (message.version == HttpVersion11 and not message.chunked
                           and head_info.size <= self.limits.max_header_size) \
            else refusal(message, head_info.size, self.limits)      # the usual request skips the call
        if refused is not None:
            status, why = refused
            log.info("refused %s %r from %s: %d %s", message.method, target[:200], client, status, why)
            self._fail(request, record, status, "refused", close=True)
            return None
        route = self.router.match(head_info.host, target)
        if route is None:
            self._fail(request, record, 404, "no_route")
            return None
        record.route = route.name
        record.pool = route.pool
        max_body = self.limits.max_body
        if max_body and (request.content_length or 0) > max_body:
            self._fail(request, record, 413, "body_too_large", close=True)
            return None
        return self.pools[route.pool], head_info, target

    def _fail(self, request: Exchange, record: RequestRecord, status: int, kind: str,
              close: bool = False) -> None:
        record.status = status
        record.error = kind
        request.send_error(status, kind, record.request_id, close=close or self.draining)

    async def _exchange(self, runtime: PoolRuntime, request: Exchange, head: bytes, body: list[bytes],
                        streamed_body: bool, retry_ok: bool, is_head: bool,
                        record: RequestRecord) -> tuple[_Attempt, Backend]:
        """Try backends until one answers with a response head; raise the last failure otherwise.

        A retry goes to a backend not tried yet, only while the request is within its deadline
        (``timeouts.response`` per try allowed, from its start) and the retry budget allows it. On
        one backend, a request that met a dead reused connection (the keep-alive race) is replayed
        once on a fresh connection.
        """
        tried: list[Backend] = []
        backends = runtime.backends
        last_exc: UpstreamError | None = None
        self._budget.on_request()
        tries = runtime.retries + 1 if retry_ok and not streamed_body else 1
        deadline = record.start + runtime.response_timeout_s * tries
        for attempt_no in range(tries):
            if attempt_no and (time.monotonic() >= deadline or not self._budget.take()):
                break
            backend = runtime.selector.pick(backends.ready, backends.version, tried)
            if backend is None:
                if last_exc is not None:
                    raise last_exc
                raise NoBackendAvailable(f"no backend available in pool {runtime.name!r}")
            tried.append(backend)
            record.backend = backend.id
            pool = self._pool_by_id[backend.id]
            backend.in_flight += 1
            try:
                replayed = False
                while True:             # at most twice: the replay after a dead reused connection
                    record.attempts += 1
                    conn = pool.acquire_idle() or await pool.acquire()
                    record.queue_s += conn.queue_s
                    record.connect_s += conn.connect_s
                    try:
                        if streamed_body:
                            conn.begin(head, is_head)
                            record.bytes_in = await self._send_streamed_body(conn, request)
                        else:
                            conn.begin(head, is_head, body)
                        response_head = await conn.read_head(runtime.response_timeout_s)
                    except UpstreamClosed as exc:
                        pool.release(conn)
                        if exc.before_response and conn.is_reused and not streamed_body and not replayed:
                            replayed = True
                            pool.stats.replayed += 1
                            log.debug("replaying on a fresh connection to %s: %s", pool.host, exc)
                            # Idle connections older than this one are as likely to be dead: drop them.
                            pool.close_idle("stale")
                            continue
                        raise
                    except BaseException:
                        pool.release(conn)
                        raise
                    break
            except (UpstreamConnectError, UpstreamConnectTimeout, UpstreamResponseTimeout,
                    UpstreamClosed) as exc:
                backend.in_flight -= 1
                self._outcome(backend, False)
                last_exc = exc
                if attempt_no + 1 < tries:
                    self.retries += 1
                    log.debug("%s %r: attempt on %s failed (%s); trying another backend",
                              record.method, record.target, backend.id, exc)
                continue
            except BaseException:
                backend.in_flight -= 1
                raise
            record.ttfb_s = time.monotonic() - record.start
            record.upstream_status = response_head.status
            return _Attempt(pool, conn, response_head), backend
        assert last_exc is not None
        raise last_exc

    async def _send_streamed_body(self, conn: UpstreamConnection, request: Exchange) -> int:
        chunked = request.content_length is None
        max_body = self.limits.max_body
        sent = 0
        async for chunk in request.payload.iter_any():
            sent += len(chunk)
            if max_body and sent > max_body:
                raise BodyTooLarge(f"request body over {max_body} bytes")
            if chunked:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                await conn.write(chunk)
        if chunked:
            await conn.write(b"0\r\n\r\n")
        return sent

    def _send_complete(self, request: Exchange, attempt: _Attempt, backend: Backend,
                       record: RequestRecord, close: bool) -> bool:
        """Frame the response for the client; if it is complete already (the common small one), send
        it in one write, framed by its now known length (even if the backend sent it chunked), and
        finish the attempt. False: the body must be streamed (:meth:`_stream_back`)."""
        conn, head = attempt.conn, attempt.head
        record.status = head.status
        if self.draining or close:
            # Shutting down: this is the connection's last response. Or aiohttp marked the client
            # connection as upgraded (an Upgrade we did not tunnel): it cannot carry another request.
            request.force_close()
        is_head = request.method == "HEAD"
        if not conn.response_complete or conn.trailers:
            if (head.content_length is None and not head.chunked and not is_head
                    and head.status not in (204, 304)):
                request.force_close()    # a close-delimited upstream body
            return False
        body = b"" if is_head else conn.take_body()
        try:
            request.send_whole(head.status, head.reason, response_fields(head.headers, record.request_id),
                               body, None if head.chunked else head.content_length)
            record.bytes_out = len(body)
        except ConnectionError:
            record.error = "client_gone"
            request.force_close()
            request.finished = True
        finally:
            backend.in_flight -= 1
            attempt.pool.release(conn)
            self._outcome(backend, head.status < 502)
        return True

    async def _stream_back(self, request: Exchange, runtime: PoolRuntime, attempt: _Attempt,
                           backend: Backend, record: RequestRecord) -> None:
        """A response whose body is still arriving: stream it, chunked to the client if its length is
        unknown, with the upstream trailers after the last chunk."""
        conn, head, pool = attempt.conn, attempt.head, attempt.pool
        ok = True
        sent = 0
        try:
            request.start(head.status, head.reason, response_fields(head.headers, record.request_id),
                          None if head.chunked else head.content_length)
            if request.method != "HEAD":
                while True:
                    data = await conn.read_body(runtime.read_timeout_s)
                    if not data:
                        break
                    sent += len(data)
                    await request.write(data)
            trailers = response_fields(conn.trailers, b"") if conn.trailers and head.chunked else b""
            await request.finish(trailers)
        except ConnectionError:
            # The client went away; the upstream connection is dirty and gets closed below.
            record.error = "client_gone"
            request.force_close()
            request.finished = True
        except UpstreamError as exc:
            # The status has gone; all we can do is cut the client connection so it sees a short body.
            ok = False
            record.error = FAILURES.get(type(exc), (502, "error"))[1]
            self._failure_log.warning("cut", "%s %s: response from %s cut: %s", request.method,
                                      request.message.path, backend.id, exc)
            if request.transport is not None:
                request.transport.abort()
            request.force_close()
            request.finished = True
        finally:
            record.bytes_out = sent
            backend.in_flight -= 1
            pool.release(conn)
            self._outcome(backend, ok and head.status < 502)

    async def _tunnel(self, request: Exchange, attempt: _Attempt, backend: Backend,
                      record: RequestRecord) -> None:
        """101 from the backend: pass it back, then relay bytes both ways until either side closes."""
        conn, head, pool = attempt.conn, attempt.head, attempt.pool
        record.status = 101
        upgrade = next((v for n, v in head.headers if n.lower() == b"upgrade"), b"")
        fields = response_fields(head.headers, record.request_id)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        feed = _TunnelFeed(conn, done)
        try:
            request.send_whole(101, head.reason, fields + b"Connection: Upgrade\r\nUpgrade: " + upgrade
                               + b"\r\n", b"")
            client = request.transport
            if client is None:
                return
            conn.start_tunnel(client, done)
            # aiohttp's hook for WebSockets: the "parser" gets every later client byte.
            request.protocol.set_parser(feed)  # type: ignore[arg-type]
            await done
        finally:
            request.finished = True
            record.bytes_in += feed.bytes
            record.bytes_out = conn.tunnel_bytes
            backend.in_flight -= 1
            conn.abort("upgrade")
            pool.release(conn)
            if request.transport is not None:
                request.transport.close()

    def _outcome(self, backend: Backend, ok: bool) -> None:
        for listener in self.outcome_listeners:
            listener(backend, ok)


class ThrottledLog:
    """At most one line per second per kind of failure, with how many were left out: a dead pool
    answering thousands of 503s a second must not turn the log into the bottleneck."""

    __slots__ = ("_clock", "_last", "_logger", "_suppressed")

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._clock = clock

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._last.get(kind, -1e9) < 1.0:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        left_out = self._suppressed.pop(kind, 0)
        if left_out:
            msg += f" (and {left_out} more like it in the last second)"
        self._logger.warning(msg, *args)


class RetryBudget:
    """Retries may add at most ``ratio`` extra load (Envoy's retry budget, Finagle's RetryBudget).

    Every request deposits ``ratio`` of a token, every retry withdraws one; ``floor`` tokens are always
    there so that a quiet service can still retry. When a whole pool is failing, this is what stops
    every request turning into three.
    """

    __slots__ = ("_cap", "_ratio", "tokens")

    def __init__(self, ratio: float = 0.2, floor: float = 10.0, cap: float = 1000.0) -> None:
        self._ratio = ratio
        self._cap = cap
        self.tokens = floor

    def on_request(self) -> None:
        if self.tokens < self._cap:
            self.tokens += self._ratio

    def take(self) -> bool:
        if self.tokens >= 1.0 - 1e-9:   # tolerate float sums of `ratio`
            self.tokens -= 1.0
            return True
        return False


class RequestIds:
    """Request ids: a per-process random prefix and a counter (unique, cheap, sortable in logs)."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex().encode()
        self._count = 0

    def next(self) -> bytes:
        self._count += 1
        return b"%s-%08x" % (self._prefix, self._count)


def _split_absolute(target: bytes) -> tuple[bytes, bytes] | None:
    """(authority, origin-form target) of an absolute-form target, or None if it is not one."""
    scheme_end = target.find(b"://")
    if scheme_end == -1 or target[:scheme_end].lower() not in (b"http", b"https"):
        return None
    rest = target[scheme_end + 3:]
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i != -1), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not authority or b"@" in authority:
        return None
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


class _TunnelFeed:
    """Takes the place of aiohttp's payload parser once a connection is upgraded: client bytes go
    straight to the backend."""

    def __init__(self, conn: UpstreamConnection, done: asyncio.Future[None]) -> None:
        self._conn = conn
        self._done = done
        self.bytes = 0

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.bytes += len(data)
        if self._conn.transport is not None and not self._conn.is_closed:
            self._conn.transport.write(data)
        return False, b""

    def feed_eof(self) -> None:
        if not self._done.done():
            self._done.set_result(None)
