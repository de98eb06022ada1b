"""The request path: route -> snapshot -> pick -> lease -> send -> stream back.

Runs as the request handler of the front door (:mod:`.frontdoor`): each request arrives as an
:class:`~.frontdoor.Exchange`, the parsed request (raw target and header fields, a body stream) and
the only writer of our response. Requests and responses are streamed; header fields travel as raw
bytes (see :mod:`.headers`), and the response head is built from those bytes.

Every failure maps to a status in one table, :data:`FAILURES`. Before the first response byte reaches
the client, a failed attempt may be tried again, never twice for a request that must not be
(RFC 9110 9.2.2):

* a request that **never left balancer** (connect refused or timed out, no free connection in time, a
  connection found closed before the first byte was written) goes to another backend, whatever its
  method;
* a request that was written goes again only if it is idempotent or carries ``Idempotency-Key``, and
  its body was kept (none, or one small enough to keep): once on the same backend on a fresh
  connection when a *reused* one turned out closed before any response byte (the keep-alive race),
  else on a different backend, up to ``retries`` times, after an empty reply or a response timeout.

A request that must not be sent twice takes an idle upstream connection only if it was used within
:data:`SAFE_REUSE_S` (see :mod:`.connections`): that is what keeps it out of the keep-alive race.

Each attempt holds a :class:`Lease`: the backend's in-flight count and the pooled connection are
taken when it starts and given back exactly once, whatever way the request ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config.models import LimitsConfig
from ..errors import (
    BodyTooLarge,
    ClientBodyInvalid,
    ClientBodyTimeout,
    ClientError,
    ClientGone,
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
    UpstreamSendTimeout,
)
from ..lb.hashing import ConsistentHash
from ..lb.registry import Backend, BackendSet
from ..lb.selection import Selector
from .affinity import StickyCookie, request_key
from .connections import BackendConnections, ConnectionTable
from .frontdoor import Exchange, RequestBody, reason
from .guards import Refused
from .headers import (
    AddressSet,
    HeaderEdits,
    RequestHead,
    client_address,
    field_value,
    request_fields,
    request_host,
    response_fields,
)
from .record import RequestRecord
from .routing import PathEscapesRoot, Route, Router, normalise_path
from .throttledlog import ThrottledLog
from .tunnel import Tunnel
from .upstream import ResponseHead, UpstreamConnection

log = logging.getLogger(__name__)

# Failure -> (status, short name for logs/metrics). The one place where errors become statuses.
FAILURES: dict[type[Exception], tuple[int, str]] = {
    NoBackendAvailable: (503, "no_backend"),
    PoolTimeout: (503, "pool_timeout"),
    PoolQueueFull: (503, "queue_full"),
    UpstreamConnectError: (502, "connect_error"),
    UpstreamConnectTimeout: (504, "connect_timeout"),
    UpstreamResponseTimeout: (504, "response_timeout"),
    UpstreamReadTimeout: (504, "read_timeout"),
    UpstreamSendTimeout: (504, "send_timeout"),
    UpstreamProtocolError: (502, "protocol_error"),
    UpstreamClosed: (502, "upstream_closed"),
    BodyTooLarge: (413, "body_too_large"),
    ClientBodyTimeout: (408, "client_body_timeout"),
    ClientBodyInvalid: (400, "refused"),
}

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Request bodies up to this size are read before sending, so the request can be replayed.
REPLAY_BODY_LIMIT = 64 * 1024
# A request that must not be sent twice reuses only an upstream connection used this recently.
SAFE_REUSE_S = 0.5
# Failures after which the request provably never reached a backend.
NEVER_SENT = (PoolTimeout, UpstreamConnectError, UpstreamConnectTimeout)


def never_sent(exc: UpstreamError) -> bool:
    return isinstance(exc, NEVER_SENT) or (isinstance(exc, UpstreamClosed) and not exc.sent)


@dataclass(frozen=True, slots=True)
class PoolRuntime:
    """What the proxy needs per configured pool, built once at start-up."""

    name: str
    backends: BackendSet
    selector: Selector
    response_timeout_s: float
    read_timeout_s: float
    retries: int
    send_timeout_s: float = 60.0
    hasher: ConsistentHash | None = None     # balance: hash (then also the selector)
    hash_by: str = "client_ip"
    sticky: StickyCookie | None = None


class Lease:
    """One attempt's hold on a backend: its in-flight count and a pooled connection, taken when the
    attempt starts and given back exactly once by :meth:`finish`, with the attempt's outcome for
    passive health: whether the exchange itself worked (``None``: no verdict on the backend) and the
    response's status (0: none)."""

    __slots__ = ("_outcome", "backend", "conn", "connections", "done")

    def __init__(self, backend: Backend, connections: BackendConnections,
                 outcome: Callable[[Backend, bool, int], None]) -> None:
        self.backend = backend
        self.connections = connections
        self.conn: UpstreamConnection | None = None
        self.done = False
        self._outcome = outcome
        backend.in_flight += 1

    def drop_connection(self) -> None:
        """Give back the current connection (it failed) and keep the backend for another try."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            self.connections.release(conn)

    def finish(self, ok: bool | None, status: int = 0) -> None:
        if self.done:
            return
        self.done = True
        self.backend.in_flight -= 1
        self.drop_connection()
        if ok is not None:
            self._outcome(self.backend, ok, status)


class Proxy:
    """The data-port handler. One instance per process; all state is in the registry and pools."""

    def __init__(self, router: Router, pools: dict[str, PoolRuntime],
                 connections: ConnectionTable, trusted: AddressSet,
                 limits: LimitsConfig | None = None) -> None:
        self.limits = limits or LimitsConfig()
        self.router = router
        self.pools = dict(pools)
        self.connections = connections
        self._connections_by_id = connections.by_id
        self.trusted = trusted
        # Passive health: told (backend, ok) after every attempt that reached a verdict.
        self._outcome_listeners: list[Callable[[Backend, bool, int], None]] = []
        # Metrics, access log, slow log: told every finished request.
        self.observers: tuple[Callable[[RequestRecord], None], ...] = ()
        self.requests = 0
        self.retries = 0
        # Set by shutdown: every response from now on carries `Connection: close`.
        self.draining = False
        self._request_ids = RequestIds()
        self._budget = RetryBudget()
        self._failure_log = ThrottledLog(log)

    # --- what the owner may change (start-up, reload, shutdown) ---------------------------------------

    def apply(self, router: Router, trusted: AddressSet, limits: LimitsConfig) -> None:
        """A reload's routes and client-side settings; a request in flight keeps what it holds."""
        self.router = router
        self.trusted = trusted
        self.limits = limits

    def set_pool(self, runtime: PoolRuntime) -> None:
        """Add a pool, or replace its runtime (selector, timeouts, retries) on reload."""
        self.pools[runtime.name] = runtime

    def remove_pool(self, name: str) -> None:
        self.pools.pop(name, None)

    def add_observer(self, observer: Callable[[RequestRecord], None]) -> None:
        """``observer`` is told every finished request."""
        self.observers = (*self.observers, observer)

    def remove_observer(self, observer: Callable[[RequestRecord], None]) -> None:
        self.observers = tuple(o for o in self.observers if o != observer)

    def add_outcome_listener(self, listener: Callable[[Backend, bool, int], None]) -> None:
        """``listener`` is told (backend, ok, status) after every attempt that reached a verdict:
        ``ok`` False for a transport failure (connect error, reset, empty reply, timeout, a body cut),
        ``status`` the response's (0 when there was none)."""
        self._outcome_listeners.append(listener)

    def start_draining(self) -> None:
        """Shutdown: every response from now on carries ``Connection: close``."""
        self.draining = True

    def report_outcome(self, backend: Backend, ok: bool, status: int = 0) -> None:
        """An attempt's verdict on ``backend``: ours, or one another proxy process reported."""
        for listener in self._outcome_listeners:
            listener(backend, ok, status)
    async def handle(self, request: Exchange) -> None:
        """Serve one request; every path ends with the response finished (or the client connection
        abandoned) and the record observed."""
        self.requests += 1
        target = request.target
        # From the moment the head was complete: time queued behind a pipelined request counts.
        record = RequestRecord(request.received, time.time(), request.method, target, request.client_ip)
        record.headers = request.headers
        entrance = request.entrance
        record.listener = entrance.name
        if request.version != "1.1":
            record.version = request.version      # "1.0", or what a refused request said
        try:
            if entrance.redirect_https is not None:
                return self._redirect(request, record, entrance.redirect_https)
            routed = self._route(request, target, record, entrance.scheme)
            if routed is None:
                return                  # answered already: refused, no route, too large
            route, head_info, target = routed
            guards = route.guards
            if guards is not None:
                try:
                    if guards.auth is None:
                        guards.check_addresses(record.client)
                        guards.check_rate(record.client, request.headers)
                    else:
                        await guards.check(record.client, request.headers)
                except Refused as refused:
                    return self._fail(request, record, refused.status, refused.kind,
                                      close=refused.status == 401 and request.body is not None,
                                      extra=refused.fields)
            if route.faults is not None:
                delay, abort = route.faults.pick(request.headers, request.client_ip in self.trusted)
                if delay:
                    record.fault = "delay"
                    await asyncio.sleep(delay)
                if abort:
                    record.fault = "abort"
                    return self._fail(request, record, abort, "fault_abort")
            if route.pool is None:
                return self._answer_here(request, record, route, target)
            runtime = self.pools[route.pool]
            edits = route.response_edits
            method = request.method
            upgrade = head_info.upgrade
            tunnel = request.upgrade and bool(upgrade) and upgrade.lower() != b"h2c"
            retry_ok = not tunnel and (method in IDEMPOTENT or request.has_idempotency_key)
            try:
                body: list[bytes] = []
                streamed_body = False
                if request.body is not None:
                    body, streamed_body = await self._small_body(request, request.body, record)
                if tunnel:
                    framing = b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n"
                elif streamed_body:
                    length = request.content_length
                    framing = b"Content-Length: %d\r\n" % length if length is not None else \
                        b"Transfer-Encoding: chunked\r\n"
                elif body or method in ("POST", "PUT", "PATCH"):
                    framing = b"Content-Length: %d\r\n" % record.bytes_in
                else:
                    framing = b""
                line = b"".join((method.encode(), b" ", target, b" HTTP/1.1\r\n"))
                fields = head_info.fields
                if route.request_edits is not None:
                    fields = route.request_edits.apply(fields)
                rest = fields + framing + b"\r\n"
                # A valid sticky cookie's backend (read once: the pick and the answer need it).
                sticky_id = runtime.sticky.backend_id(request.headers) if runtime.sticky is not None else None
                lease, conn, response_head = await self._exchange(
                    runtime, request, line, rest, not head_info.host, body, streamed_body, retry_ok,
                    tunnel, record, sticky_id)
            except (UpstreamError, BodyTooLarge, ClientBodyTimeout, ClientBodyInvalid) as exc:
                status, kind = FAILURES.get(type(exc), (502, "error"))
                if isinstance(exc, ClientBodyInvalid):
                    status = exc.status
                if isinstance(exc, UpstreamError):
                    self._failure_log.log(kind, "%s %r -> %d (%s): %s", method, target[:200], status,
                                              kind, exc)
                return self._fail(request, record, status, kind, close=status < 500)
            sticky = runtime.sticky
            append = b""
            if sticky is not None and sticky_id != lease.backend.id:
                append = sticky.set_cookie(lease.backend.id)
            if tunnel and response_head.status == 101:
                await self._tunnel(request, lease, conn, response_head, record)
            elif not self._send_complete(request, lease, conn, response_head, record, edits, append):
                await self._stream_back(request, runtime, lease, conn, response_head, record, edits,
                                        append)
        except (ClientError, asyncio.CancelledError) as exc:
            record.error = "client_timeout" if isinstance(exc, ClientBodyTimeout) else "client_gone"
            raise
        finally:
            record.total_s = time.monotonic() - record.start
            for observer in self.observers:
                observer(record)

    async def _small_body(self, request: Exchange, request_body: RequestBody, record: RequestRecord
                          ) -> tuple[list[bytes], bool]:
        """A body small enough to keep for a replay is read whole, as received (a list of pieces);
        a larger or chunked one is streamed later (True)."""
        length = request.content_length
        if length is None or length > REPLAY_BODY_LIMIT:
            return [], True
        body: list[bytes] = []
        size = 0
        while chunk := await request_body.read():
            body.append(chunk)
            size += len(chunk)
        record.bytes_in = size
        return body, False

    def _route(self, request: Exchange, target: bytes, record: RequestRecord, scheme: bytes
               ) -> tuple[Route, RequestHead, bytes] | None:
        """The checks and the routing before any backend is involved: the route, the header block for
        the backend and the target to send (origin form, rewritten if the route says so); or None when
        the request was answered here."""
        authority = None
        if target[:1] != b"/" and target != b"*":
            # Absolute form (RFC 9112 3.2.2): the target's authority replaces Host, and the backend
            # gets the origin form.
            split = _split_absolute(target)
            if split is None or request.method == "CONNECT":
                self._fail(request, record, 400, "refused", close=True)
                return None
            authority, target = split
        trusted = record.client in self.trusted
        head_info = request_fields(request.headers, request.client_ip_bytes, trusted, authority,
                                   self._request_ids.next, scheme)
        record.request_id = head_info.request_id
        if trusted and head_info.forwarded_for:
            record.client = client_address(record.client, head_info.forwarded_for, self.trusted)
        refused = request.refused
        if refused is not None:
            status, why = refused
            log.info("refused %s %r from %s: %d %s", request.method, target[:200], record.client, status,
                     why)
            self._fail(request, record, status, "refused", close=True)
            return None
        cut = target.find(b"?")
        path, query = (target, b"") if cut == -1 else (target[:cut], target[cut:])
        if path[:1] == b"/":
            try:
                path = normalise_path(path)
            except PathEscapesRoot:
                self._fail(request, record, 400, "refused", close=True)
                return None
        route = self.router.match(head_info.host, path, request.method, request.headers)
        if route is None:
            self._fail(request, record, 404, "no_route")
            return None
        record.route = route.name
        record.pool = route.pool or ""
        max_body = self.limits.max_body
        if max_body and (request.content_length or 0) > max_body:
            self._fail(request, record, 413, "body_too_large", close=True)
            return None
        if route.rewrites:
            target = route.rewrite(path, query)
        elif route.redirect is not None and route.redirect[2]:
            target = route.remainder(path) + query
        return route, head_info, target

    def _redirect(self, request: Exchange, record: RequestRecord, port: int) -> None:
        """A plain-HTTP listener with ``redirect_https``: 308 to the same target over HTTPS (308, not
        301: the method and body are kept). The host is the request's own, checked to be a name or
        an address: a Location built from an unchecked Host would send clients anywhere."""
        target = request.target
        if target[:1] != b"/":
            split = _split_absolute(target) if target != b"*" else None
            host, target = split if split is not None else (b"", b"")
        else:
            host = request_host(request.headers)
        name = _HOST_NAME.fullmatch(host)
        if request.refused is not None or name is None or not target:
            self._fail(request, record, 400, "refused", close=True)
            return
        authority = name.group(1) if port == 443 else b"%s:%d" % (name.group(1), port)
        location = b"https://" + authority + target
        record.status = 308
        body = b"308 Permanent Redirect\n"
        request.send_whole(308, b"Permanent Redirect",
                           b"Location: " + location + b"\r\nContent-Type: text/plain; charset=utf-8\r\n",
                           body, len(body))

    def _fail(self, request: Exchange, record: RequestRecord, status: int, kind: str,
              close: bool = False, extra: bytes = b"") -> None:
        record.status = status
        record.error = kind
        request.send_error(status, kind, record.request_id, close=close or self.draining, extra=extra)

    def _answer_here(self, request: Exchange, record: RequestRecord, route: Route, target: bytes) -> None:
        """A route that answers itself: ``respond`` or ``redirect``."""
        edits = route.response_edits
        if route.respond is not None:
            status, body, content_type = route.respond
            fields = b"Content-Type: " + content_type + b"\r\n"
        else:
            assert route.redirect is not None
            to, status, keep_path = route.redirect
            location = to.rstrip(b"/") + target if keep_path else to
            body = b"%d %s\n" % (status, reason(status))
            fields = b"Location: " + location + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
        fields += b"X-Request-ID: " + record.request_id + b"\r\n"
        if edits is not None:
            fields = edits.apply(fields)
        record.status = status
        if request.body is not None or self.draining:
            request.force_close()        # the body is not read: the connection cannot be reused
        request.send_whole(status, reason(status), fields, b"" if request.method == "HEAD" else body,
                           len(body))

    async def _exchange(self, runtime: PoolRuntime, request: Exchange, line: bytes, rest: bytes,
                        needs_host: bool, body: list[bytes], streamed_body: bool, retry_ok: bool,
                        upgrade: bool, record: RequestRecord, sticky_id: str | None
                        ) -> tuple[Lease, UpstreamConnection, ResponseHead]:
        """Try backends until one answers with a response head; raise the last failure otherwise.

        A retry goes to a backend not tried yet, only while the request is within its deadline
        (``timeouts.response`` per try allowed, from its start) and the retry budget allows it.
        """
        tried: list[Backend] = []
        backends = runtime.backends
        last_exc: UpstreamError | None = None
        self._budget.on_request()
        tries = runtime.retries + 1
        deadline = record.start + runtime.response_timeout_s * tries
        fresh_within = None if retry_ok else SAFE_REUSE_S
        is_head = request.method == "HEAD"
        head = line + rest
        hasher = runtime.hasher
        key = request_key(runtime.hash_by, record.client, request.target, request.headers) \
            if hasher is not None else None
        for attempt_no in range(tries):
            # A request that never left costs a backend nothing to try again: only retries of
            # requests that reached one spend the retry budget.
            if attempt_no and (time.monotonic() >= deadline or (
                    not (last_exc is not None and never_sent(last_exc)) and not self._budget.take())):
                break
            backend = None
            if sticky_id is not None:
                backend = next((b for b in backends.ready if b.id == sticky_id and b not in tried), None)
            if backend is None:
                backend = hasher.pick(backends.ready, backends.version, tried, key) if hasher is not None \
                    else runtime.selector.pick(backends.ready, backends.version, tried)
            if backend is None:
                if last_exc is not None:
                    raise last_exc
                raise NoBackendAvailable(f"no backend available in pool {runtime.name!r}")
            tried.append(backend)
            record.backend = backend.id
            if needs_host:
                # HTTP/1.0 without Host: the backend gets one (we speak HTTP/1.1 to it).
                head = line + b"Host: " + backend.address.encode() + b"\r\n" + rest
            lease = Lease(backend, self._connections_by_id[backend.id], self.report_outcome)
            conns = lease.connections
            replayed = False
            try:
                while True:             # at most twice: the replay after a dead reused connection
                    record.attempts += 1
                    conn = conns.acquire_idle(fresh_within) or await conns.acquire(fresh_within)
                    lease.conn = conn
                    record.queue_s += conn.queue_s
                    record.connect_s += conn.connect_s
                    try:
                        if streamed_body:
                            conn.begin(head, is_head, None, upgrade)
                            record.bytes_in = await self._send_streamed_body(conn, request,
                                                                             runtime.send_timeout_s)
                        else:
                            conn.begin(head, is_head, body, upgrade)
                        response_head = await conn.read_head(runtime.response_timeout_s)
                    except UpstreamClosed as exc:
                        # A reused connection found closed before any response byte: once more on a
                        # fresh one, if the request did not leave or may be sent twice.
                        if (exc.before_response and conn.is_reused and not replayed
                                and (not exc.sent or (retry_ok and not streamed_body))):
                            replayed = True
                            conns.count_replay()
                            log.debug("replaying on a fresh connection to %s: %s", conns.host, exc)
                            lease.drop_connection()
                            # Idle connections older than this one are as likely to be dead.
                            conns.close_idle("stale")
                            continue
                        raise
                    break
            except UpstreamError as exc:
                sent = not never_sent(exc)
                lease.finish(None if isinstance(exc, PoolTimeout) else False)
                last_exc = exc
                if sent and not (retry_ok and not streamed_body):
                    raise                       # written once; must not be written again
                if attempt_no + 1 < tries:
                    self.retries += 1
                    log.debug("%s %r: attempt on %s failed (%s); trying another backend",
                              record.method, record.target, backend.id, exc)
                continue
            except BaseException:
                lease.finish(None)
                raise
            record.ttfb_s = time.monotonic() - record.start
            record.upstream_status = response_head.status
            assert lease.conn is not None
            return lease, lease.conn, response_head
        assert last_exc is not None
        raise last_exc

    async def _send_streamed_body(self, conn: UpstreamConnection, request: Exchange, timeout: float) -> int:
        body = request.body
        assert body is not None
        chunked = request.content_length is None
        max_body = self.limits.max_body
        sent = 0
        while chunk := await body.read():
            sent += len(chunk)
            if max_body and sent > max_body:
                raise BodyTooLarge(f"request body over {max_body} bytes")
            if chunked:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), timeout)
            else:
                await conn.write(chunk, timeout)
        if chunked:
            await conn.write(b"0\r\n\r\n", timeout)
        conn.end_request()
        return sent

    def _send_complete(self, request: Exchange, lease: Lease, conn: UpstreamConnection,
                       head: ResponseHead, record: RequestRecord, edits: HeaderEdits | None,
                       append: bytes) -> bool:
        """Frame the response for the client; if it is complete already (the common small one), send
        it in one write, framed by its now known length (even if the backend sent it chunked), and
        finish the attempt. False: the body must be streamed (:meth:`_stream_back`)."""
        record.status = head.status
        if self.draining:
            request.force_close()       # shutting down: this is the connection's last response
        is_head = request.method == "HEAD"
        if not conn.response_complete or conn.trailers:
            if (head.content_length is None and not head.chunked and not is_head
                    and head.status not in (204, 304)):
                request.force_close()    # a close-delimited upstream body
            return False
        try:
            body = b"" if is_head else conn.take_body()
            fields = response_fields(head.headers, record.request_id)
            if edits is not None:
                fields = edits.apply(fields)
            request.send_whole(head.status, head.reason, fields + append, body,
                               None if head.chunked else head.content_length)
            record.bytes_out = len(body)
        except ClientGone:
            record.error = "client_gone"
            request.abandon()
        finally:
            lease.finish(True, head.status)
        return True

    async def _stream_back(self, request: Exchange, runtime: PoolRuntime, lease: Lease,
                           conn: UpstreamConnection, head: ResponseHead, record: RequestRecord,
                           edits: HeaderEdits | None, append: bytes) -> None:
        """A response whose body is still arriving: stream it, chunked to the client if its length is
        unknown, with the upstream trailers after the last chunk."""
        ok = True
        sent = 0
        try:
            fields = response_fields(head.headers, record.request_id)
            if edits is not None:
                fields = edits.apply(fields)
            request.start(head.status, head.reason, fields + append,
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
        except ClientError as exc:
            # The client went away or stopped reading; the upstream connection is dirty and is
            # closed by the lease.
            record.error = "client_timeout" if isinstance(exc, ClientBodyTimeout) else "client_gone"
            request.abandon()
        except UpstreamError as exc:
            # The status has gone; all we can do is cut the client connection so it sees a short body.
            ok = False
            record.error = FAILURES.get(type(exc), (502, "error"))[1]
            self._failure_log.log("cut", "%s %r: response from %s cut: %s", request.method,
                                      record.target[:200], lease.backend.id, exc)
            request.abandon()
        finally:
            record.bytes_out = sent
            lease.finish(ok, head.status)

    async def _tunnel(self, request: Exchange, lease: Lease, conn: UpstreamConnection, head: ResponseHead,
                      record: RequestRecord) -> None:
        """101 from the backend: pass it back, then relay bytes both ways (see :mod:`.tunnel`)."""
        record.status = 101
        upgrade = field_value(head.headers, b"upgrade") or b""
        fields = response_fields(head.headers, record.request_id)
        tunnel: Tunnel | None = None
        try:
            transport = conn.transport
            if transport is None or transport.is_closing():
                raise ClientGone("backend closed at the switch")
            tunnel = request.switch(b"".join((b"HTTP/1.1 101 ", head.reason, b"\r\n", fields,
                                              b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n\r\n")),
                                    transport, conn.upgrade_tail)
            conn.attach_tunnel(tunnel)
            await tunnel.wait()
        finally:
            if tunnel is not None:
                tunnel.close()
                record.bytes_in += tunnel.bytes_up
                record.bytes_out = tunnel.bytes_down
            conn.close("upgrade")
            lease.finish(True, 101)

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
        self._prefix = os.urandom(6).hex().encode() + b"-"
        self._count = 0

    def next(self) -> bytes:
        self._count += 1
        return self._prefix + b"%08x" % self._count


# A Host value fit for a Location: a DNS name or an IPv4 address, or a bracketed IPv6 address, with
# an optional port (dropped).
_HOST_NAME = re.compile(rb"([A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


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
