"""One upstream HTTP/1.1 connection: an asyncio protocol with llhttp (httptools) parsing responses.

Theory of operation
-------------------
A connection lives through explicit states (httpcore's ``NEW/ACTIVE/IDLE/CLOSED``)::

    CONNECTING --connected--> ACTIVE  (leased to one request)
    ACTIVE --response complete, keep-alive agreed--> IDLE --leased again--> ACTIVE
    any --error / peer close / close()--> CLOSED

Because this is a protocol, the event loop tells us at once when an *idle* connection becomes
readable or is closed by the backend: ``data_received`` or ``connection_lost`` while IDLE marks it stale,
so the pool never sends on it. That removes most of the keep-alive race; the rest (the backend closing
at the very moment we write) is caught by :class:`UpstreamClosed` with ``before_response=True`` and
replayed by the proxy.

Response data flows ``data_received -> parser -> callbacks -> self._body`` and out through
:meth:`read_body`. When more than ``HIGH_WATER`` bytes are waiting, we pause reading from the backend
until the client side has taken them (backpressure end to end). Request bytes go out through
:meth:`write`, which waits on the transport's own pause/resume flow control.

Every wait (response head, body gap, a write the backend does not take) has a deadline on the
event loop's timing wheel (:mod:`.deadlines`).

A response is delivered exactly by its framing. Anything else is a violation that closes the
connection (never pooled): bytes after a complete response (the next client must never see them), a
status outside 100-599, a 101 we did not ask for, a Transfer-Encoding other than ``chunked``, a head
larger than ``limits.max_response_header``.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from typing import Any

import httptools

from ..errors import (
    UpstreamClosed,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamResponseTimeout,
    UpstreamSendTimeout,
)
from .deadlines import deadlines
from .tunnel import Tunnel

HIGH_WATER = 256 * 1024
# Content-Length bodies from this size on bypass the parser (saves a copy of every piece).
PASSTHROUGH_MIN = 64 * 1024
MAX_HEAD = 64 * 1024       # limits.max_response_header's default
# len(b"keep-alive"), len(b"content-length"), len(b"transfer-encoding")
_FRAMING_NAME_LENGTHS = frozenset({10, 14, 17})


class ConnState(enum.Enum):
    CONNECTING = "connecting"
    ACTIVE = "active"
    IDLE = "idle"
    CLOSED = "closed"

    # Members are singletons: hash by identity in C, not by Enum's Python-level __hash__ (the
    # transition check below hashes two states on every lease and release).
    __hash__ = object.__hash__


# Legal transitions; anything else is a bug and raises.
_TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    ConnState.CONNECTING: frozenset({ConnState.ACTIVE, ConnState.CLOSED}),
    ConnState.ACTIVE: frozenset({ConnState.IDLE, ConnState.CLOSED}),
    ConnState.IDLE: frozenset({ConnState.ACTIVE, ConnState.CLOSED}),
    ConnState.CLOSED: frozenset({ConnState.CLOSED}),
}


class ResponseHead:
    """Status line and raw header fields of a final (non-1xx) response."""

    __slots__ = ("chunked", "content_length", "headers", "keep_alive", "reason", "status", "upgrade")

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.upgrade = False


class UpstreamConnection:
    """A keep-alive HTTP/1.1 client connection to one backend. See the module docstring.

    An asyncio protocol by its methods, not by inheritance (see ``frontdoor.ClientConnection``).
    """

    def __init__(self, address: str, *, clock: Any = time.monotonic, max_head: int = MAX_HEAD) -> None:
        self.address = address
        self._max_head = max_head
        self._clock = clock
        self.state = ConnState.CONNECTING
        self.created_at = clock()
        self.idle_since = self.created_at
        self.requests = 0               # requests started on this connection
        self.queue_s = 0.0              # of the current lease: waited for a slot
        self.connect_s = 0.0            # of the current lease: connect time (0 when reused)
        self.close_reason = ""
        # A `Keep-Alive: timeout=N` from the backend: absolute monotonic time after which it may close.
        self.keepalive_deadline: float | None = None
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._deadlines = deadlines(self._loop)
        self.deadline = 0.0             # loop time by which the awaited bytes must arrive
        self.deadline_slot = 0          # owned by the wheel
        self._timeout: tuple[type[Exception], float] = (UpstreamResponseTimeout, 0.0)
        self._parser = httptools.HttpResponseParser(self)
        self._body_seen = 0              # body bytes parsed on this connection, all responses
        self._body: deque[bytes] = deque()
        self._read_paused = False       # reading paused: more than HIGH_WATER body bytes buffered
        self._reset_exchange()
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # After a 101: the tunnel that takes every later byte, and the bytes that came with the head.
        self._tunnel: Tunnel | None = None
        self.upgrade_tail = b""

    def _reset_exchange(self) -> None:
        self._head: ResponseHead | None = None
        self._head_tail = b""            # last bytes fed before the head was complete
        self.trailers: list[tuple[bytes, bytes]] = []
        self._passthrough = 0            # body bytes still to come outside the parser
        self._interim = False            # an interim (1xx) response came first
        self._pending_head = ResponseHead()
        self._body.clear()
        self._body_size = 0
        self._complete = False
        self._got_bytes = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        if self._read_paused:
            self._resume_reading()
        self._expect_no_body = False
        self._upgrade_asked = False
        self._head_bytes = 0             # bytes of the head's fields so far
        self._incomplete_bytes = 0       # bytes read while the head was incomplete
        self._dirty = False              # something unexpected was seen: never reuse
        self._request_sent = False       # every byte of the request, body included, was written
        self._framing_bytes = 0          # bytes of reads that carried no body bytes, mid-body
        self.is_reused = self.requests > 0

    # --- state ---------------------------------------------------------------------------------------

    def _set_state(self, new: ConnState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal connection transition {self.state.value} -> {new.value}")
        self.state = new

    @property
    def is_closed(self) -> bool:
        return self.state is ConnState.CLOSED

    def has_expired(self, now: float, idle_timeout: float | None, max_lifetime: float | None,
                    max_requests: int | None) -> str | None:
        """Why this idle connection must not be reused, or None. Readable-while-idle is 'stale'."""
        if self.state is ConnState.CLOSED:
            return self.close_reason or "backend_close"
        if idle_timeout is not None and now - self.idle_since >= idle_timeout:
            return "idle_timeout"
        if self.keepalive_deadline is not None and now >= self.keepalive_deadline:
            return "idle_timeout"
        if max_lifetime is not None and now - self.created_at >= max_lifetime:
            return "lifetime"
        if max_requests is not None and self.requests >= max_requests:
            return "max_requests"
        return None

    # --- leasing (called by the pool) ----------------------------------------------------------------

    def mark_active(self) -> None:
        self._set_state(ConnState.ACTIVE)
        self._reset_exchange()

    def mark_idle(self) -> None:
        self._set_state(ConnState.IDLE)
        self.idle_since = self._clock()

    @property
    def is_reusable(self) -> bool:
        """The response was read completely and both sides agreed on keep-alive."""
        head = self._head
        return (self.state is ConnState.ACTIVE and self._complete and self._exc is None
                and head is not None and head.keep_alive and not head.upgrade and not self._dirty
                and self._request_sent)

    def close(self, reason: str) -> None:
        """Close now (idempotent). The reason feeds the pool's per-reason statistics."""
        if self.state is not ConnState.CLOSED:
            self.close_reason = reason
            self.state = ConnState.CLOSED
        if self.transport is not None:
            self.transport.close()
        self._fail(UpstreamClosed("connection closed", before_response=not self._got_bytes))

    def abort(self, reason: str) -> None:
        """Close without flushing (a dirty connection: nothing more must reach the backend)."""
        if self.transport is not None:
            self.transport.abort()
        self.close(reason)

    # --- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same interface.
        self.transport = transport  # type: ignore[assignment]

    def eof_received(self) -> bool:
        return False                 # the backend closed its side: so do we (connection_lost follows)

    def attach_tunnel(self, tunnel: Tunnel) -> None:
        """Every later byte from the backend goes to ``tunnel`` (after a 101)."""
        self._tunnel = tunnel
        self._dirty = True
        if self.state is ConnState.CLOSED:
            tunnel.backend_closed()
        elif self._write_paused:         # paused by a write before the switch: said only once
            tunnel.backend_pause_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadlines.disarm(self)
        if self._tunnel is not None:
            self._tunnel.backend_closed()
        if self.state is not ConnState.CLOSED:
            self.close_reason = "backend_close" if exc is None else "error"
            self.state = ConnState.CLOSED
        head = self._head
        if head is not None and not self._complete and head.content_length is None \
                and not head.chunked and self._exc is None:
            # A close-delimited body (no length, not chunked) ends with the connection.
            head.keep_alive = False
            self._complete = True
            self._wake()
            return
        self._fail(UpstreamClosed("backend closed the connection",
                                  before_response=not self._got_bytes))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(
                UpstreamClosed("backend closed the connection", before_response=not self._got_bytes))

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.backend_data(data)
            return
        if self._passthrough:
            self._take_passthrough(data)
            return
        if self.state is not ConnState.ACTIVE:
            # Bytes on an idle connection: the backend is closing it or speaking out of turn.
            # Either way it can never carry a request again.
            self.close("stale")
            return
        if self._complete or self._dirty:
            # Bytes after a complete response, before our next request: never served to anyone,
            # and the connection is closed when it is released (nginx: "upstream sent more data").
            self._dirty = True
            return
        self._got_bytes = True
        head_pending = self._head is None
        body_before = self._body_seen
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _StopAfterHead) and self._head is not None:
                self._after_stopped_head(data)
                return
            if isinstance(cause, _ExtraBytes):
                self._dirty = True
                self._parser = httptools.HttpResponseParser(self)
                return
            self._fail(UpstreamProtocolError(f"invalid response from backend: {cause or exc}"))
            self.abort("error")
        except httptools.HttpParserUpgrade as exc:
            # 101 Switching Protocols (asked for): bytes after the head belong to the tunnel.
            self.upgrade_tail = data[exc.args[0]:] if exc.args else b""
            self._wake()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid response from backend: {exc}"))
            self.abort("error")
        else:
            if self._head is None:
                self._head_tail = (self._head_tail + data)[-3:]
                # Still no complete head: bound what llhttp holds of it (one read past the limit).
                self._incomplete_bytes += len(data)
                if head_pending and self._incomplete_bytes > self._max_head:
                    self._fail(UpstreamProtocolError(f"response head over {self._max_head} bytes"))
                    self.abort("error")
            elif not self._complete:
                # Reads with no body bytes inside a chunked body (chunk extensions, the trailer
                # section) are bounded like the head: llhttp buffers a trailer line until it ends.
                if self._body_seen != body_before:
                    self._framing_bytes = 0
                else:
                    self._framing_bytes += len(data)
                    if self._framing_bytes > self._max_head:
                        self._fail(UpstreamProtocolError(f"response trailers over {self._max_head} bytes"))
                        self.abort("error")

    def _after_stopped_head(self, data: bytes) -> None:
        """We stopped llhttp at the end of a head (HEAD response, or a large body we pass through
        ourselves). Find where the head ended in ``data``; what follows is body (or a violation)."""
        tail = self._head_tail
        edge = (tail + data[:3]).find(b"\r\n\r\n")
        end = edge + 4 - len(tail) if edge != -1 else data.find(b"\r\n\r\n") + 4
        rest = data[end:] if 0 < end < len(data) else b""
        # llhttp cannot go on after a callback error: the next response gets a fresh parser.
        self._parser = httptools.HttpResponseParser(self)
        if self._passthrough:
            if rest:
                self._take_passthrough(rest)
            return
        assert self._head is not None
        if rest or self._interim:
            # Bytes after a HEAD response's head (the backend is confused), or a head whose end we
            # cannot place for sure: finish this response but never reuse the connection.
            self._head.keep_alive = False
        self._complete = True
        self._wake()

    def _take_passthrough(self, data: bytes) -> None:
        """Body bytes of a large Content-Length response, queued as received (no copies)."""
        left = self._passthrough
        if len(data) >= left:
            if len(data) > left:                 # more than announced: never reuse this connection
                assert self._head is not None
                self._head.keep_alive = False
                data = data[:left]
            self._passthrough = 0
            self._complete = True
        else:
            self._passthrough = left - len(data)
        self.on_body(data)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._tunnel is not None:
            self._tunnel.backend_pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._tunnel is not None:
            self._tunnel.backend_resume_writing()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- httptools callbacks --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _ExtraBytes        # a second response where none was asked for

    def on_status(self, reason: bytes) -> None:
        self._pending_head.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head is not None:
            # After a chunked body: trailer fields (bounded in data_received, with chunk framing).
            self.trailers.append((name, value))
        else:
            self._pending_head.headers.append((name, value))
            self._head_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        parser = self._parser
        head = self._pending_head
        status = parser.get_status_code()
        if status < 100 or status > 599:
            raise UpstreamProtocolError(f"status {status} from backend")
        if self._head_bytes > self._max_head:     # a whole head that came in one read
            raise UpstreamProtocolError(f"response head over {self._max_head} bytes")
        if status == 101 and not self._upgrade_asked:
            raise UpstreamProtocolError("101 Switching Protocols from backend, not asked for")
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): not the final answer; absorb it.
            self._pending_head = ResponseHead()
            self._interim = True
            return
        head.status = status
        head.keep_alive = parser.should_keep_alive()
        head.upgrade = status == 101
        self._inspect_framing(head)
        self._head = head
        self._wake()
        if self._expect_no_body and status not in (204, 304):
            # llhttp would wait for a HEAD response's Content-Length bytes; stop it here.
            raise _StopAfterHead
        if self._interim:
            return           # the head's end is harder to find after an interim response: llhttp goes on
        if head.content_length is not None and head.content_length >= PASSTHROUGH_MIN:
            # A large body: take its bytes ourselves, without llhttp's copy of every piece.
            self._passthrough = head.content_length
            raise _StopAfterHead

    def _inspect_framing(self, head: ResponseHead) -> None:
        lengths: list[bytes] = []
        for name, value in head.headers:
            if len(name) not in _FRAMING_NAME_LENGTHS:
                continue                 # cheaper than lower-casing every name
            lname = name.lower()
            if lname == b"content-length":
                lengths.append(value)
            elif lname == b"transfer-encoding":
                if head.chunked or value.strip().lower() != b"chunked":
                    # Any other coding would make the body's end ours to guess (nginx: 502).
                    raise UpstreamProtocolError(f"Transfer-Encoding {value[:40]!r} from backend")
                head.chunked = True
            elif lname == b"keep-alive":
                self._note_keepalive(value)
        if lengths:
            if head.chunked or len(lengths) > 1 or not lengths[0].strip().isdigit():
                raise UpstreamProtocolError("conflicting or invalid Content-Length from backend")
            head.content_length = int(lengths[0])

    def _note_keepalive(self, value: bytes) -> None:
        for part in value.split(b","):
            key, _, number = part.strip().partition(b"=")
            if key.strip().lower() == b"timeout" and number.strip().isdigit():
                # Leave a margin of one second: the backend's timer started before ours.
                seconds = max(int(number.strip()) - 1, 0)
                self.keepalive_deadline = self._clock() + seconds

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        self._body.append(body)
        self._body_size += len(body)
        if self._body_size > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # end of an interim (1xx) response
        self._complete = True
        self._wake()

    # --- the request/response exchange (called by the proxy) ------------------------------------------

    def begin(self, head: bytes, expect_no_body: bool, body: list[bytes] | None = None,
              upgrade: bool = False) -> None:
        """Send a request head and the body pieces already received, in one vectored write.

        Raises :class:`UpstreamClosed` with ``sent=False`` when the connection is already closed:
        then not one byte of the request left balancer. ``body`` None: a streamed body follows
        (:meth:`write`, then :meth:`end_request`); until then the connection is not reusable.
        """
        self.requests += 1
        self._expect_no_body = expect_no_body
        self._upgrade_asked = upgrade
        self._request_sent = body is not None
        if self.state is ConnState.CLOSED or self.transport is None or self.transport.is_closing():
            raise UpstreamClosed("backend closed the connection before the request",
                                 before_response=True, sent=False)
        if body:
            self.transport.writelines([head, *body])
        else:
            self.transport.write(head)

    def end_request(self) -> None:
        """The last byte of a streamed request body was written."""
        self._request_sent = True

    async def write(self, data: bytes, timeout: float) -> None:
        """Send request body bytes, waiting while the backend's socket buffer is full: up to
        ``timeout`` seconds for it to take more (:class:`UpstreamSendTimeout`, nginx's
        ``proxy_send_timeout``)."""
        if self.state is ConnState.CLOSED or self.transport is None:
            raise UpstreamClosed("backend closed the connection", before_response=not self._got_bytes)
        self.transport.write(data)
        if self._write_paused:
            waiter = self._drain_waiter = self._loop.create_future()
            self._timeout = (UpstreamSendTimeout, timeout)
            self._deadlines.arm(self, self._loop.time() + timeout)
            try:
                await waiter
            finally:
                self._drain_waiter = None       # the deadline lapses unheard (lazy)

    async def read_head(self, timeout: float) -> ResponseHead:
        """Wait up to ``timeout`` seconds for the final response head."""
        if self._head is None and self._exc is None:
            try:
                await self._start_wait(timeout, UpstreamResponseTimeout)
            finally:
                self._end_wait()
        if self._head is None:
            assert self._exc is not None
            raise self._exc
        return self._head

    async def read_body(self, timeout: float) -> bytes:
        """Next body bytes; ``b""`` at the end. ``timeout`` bounds an idle gap, not the whole body."""
        while not self._body:
            if self._complete:
                return b""
            if self._exc is not None:
                raise self._exc
            try:
                await self._start_wait(timeout, UpstreamReadTimeout)
            finally:
                self._end_wait()
        return self.take_body()

    def take_body(self) -> bytes:
        """All buffered body bytes at once (the whole body, once the response is complete)."""
        body = self._body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self._body_size = 0
        self._resume_reading()
        return data

    def _resume_reading(self) -> None:
        # Every way the buffer empties must resume: a connection pooled while paused would never see
        # its next response (a complete body over HIGH_WATER, taken whole, once left it so: a 504).
        if self._read_paused:
            self._read_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    @property
    def response_complete(self) -> bool:
        return self._complete

    def _start_wait(self, timeout: float, error: type[Exception]) -> asyncio.Future[None]:
        """A waiter for the next bytes, with its deadline armed; the caller awaits it and then calls
        :meth:`_end_wait` (no coroutine of its own: one level less on every request)."""
        waiter = self._waiter = self._loop.create_future()
        self._timeout = (error, timeout)
        self._deadlines.arm(self, self._loop.time() + timeout)
        return waiter

    def _end_wait(self) -> None:
        self._waiter = None                 # the deadline lapses unheard (lazy): no wheel operation

    def deadline_passed(self, now: float) -> None:
        """Called by the wheel: nothing arrived, or nothing was taken, in time."""
        error, timeout = self._timeout
        waiter = self._waiter if error is not UpstreamSendTimeout else self._drain_waiter
        if waiter is not None and not waiter.done():
            what = "taken by" if error is UpstreamSendTimeout else "from"
            waiter.set_exception(error(f"no data {what} backend within {timeout:g}s"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None and not self._complete:
            self._exc = exc
        self._wake()

    def info(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "age_s": round(now - self.created_at, 3),
            "idle_s": round(now - self.idle_since, 3) if self.state is ConnState.IDLE else 0.0,
            "requests": self.requests,
        }

    def __repr__(self) -> str:
        return (f"<UpstreamConnection {self.address} {self.state.value} requests={self.requests}"
                f"{' reason=' + self.close_reason if self.close_reason else ''}>")


class _StopAfterHead(Exception):
    """Raised inside the parser callback to end a bodiless (HEAD) response at its head."""


class _ExtraBytes(Exception):
    """Raised inside the parser callback: a response began after the complete one."""
