"""The front door: balancer's own HTTP/1.1 server protocol, one per client connection.

Theory of operation
-------------------
:class:`ClientConnection` is an asyncio protocol with llhttp (httptools' ``HttpRequestParser``)
parsing requests. It has explicit states and a transition table (as :mod:`.upstream` has)::

    WAITING --first head byte--> HEAD --head complete--> BUSY      (a request being served)
    WAITING --a whole head in one read--> BUSY
    BUSY --response done, keep-alive--> WAITING | HEAD | BUSY      (idle, next head started, pipelined)
    BUSY --response done, request body still coming--> LINGERING --EOF / deadline--> CLOSED
    BUSY --response done, Connection: close (or an Upgrade declined)--> CLOSED
    BUSY --101 from the backend--> TUNNEL --either side closes / idle--> CLOSED
    any --peer gone, deadline, refusal--> CLOSED

Each parsed request becomes an :class:`Exchange`: the request as parsed (method, raw target, raw
header fields, a :class:`RequestBody` stream) and the **only** writer of the response to the client.
The proxy (:mod:`.proxy`) is handed one Exchange per request, in a task of its own; nothing else
writes to the client transport or marks a response finished.

Every wait has a deadline, on one timing wheel (:mod:`.deadlines`):

* WAITING: ``client_header`` for a new connection (one that never sends a byte is closed after it),
  ``client_idle`` between keep-alive requests;
* HEAD: ``client_header`` from the first byte of a head (slowloris): 408 and close;
* a request body: ``client_body`` between two reads while the proxy waits for more (408);
* a response the client does not read: ``client_send`` while we wait for its socket to drain;
* LINGERING: :data:`LINGER_S`; TUNNEL: ``tunnel_idle`` (in :mod:`.tunnel`).

Every buffer has a bound: the request line (414) and header block (431) are counted as they arrive,
before llhttp has buffered more than one read of them; a request body buffers at most
:data:`BODY_HIGH_WATER` before reading pauses; pipelined requests pause reading as soon as a second
head starts, so at most one read's worth is parsed ahead.

What llhttp refuses (TE with CL, duplicate or signed CL, bad chunk sizes, obs-fold, whitespace before
the colon, bare CR/LF, control bytes) gets 400; what it accepts and a proxy must not, this module
refuses: HTTP/0.9 and 2+ (400/505), no or several Host fields (400), a Transfer-Encoding other than
a lone ``chunked``, a chunked body on an Upgrade request. An Upgrade request with a Content-Length
body is forwarded as a plain request with its body framed: llhttp hands such a body over as upgrade
bytes, which is how a body becomes smuggled requests.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

import httptools

from ..config.models import ClientTimeoutsConfig, LimitsConfig
from ..errors import ClientBodyInvalid, ClientBodyTimeout, ClientGone, ClientSendTimeout
from .deadlines import Deadlines, deadlines
from .tunnel import Tunnel

log = logging.getLogger(__name__)

# A request body buffers at most this much before reading from the client pauses.
BODY_HIGH_WATER = 256 * 1024
# Requests parsed ahead of the one being served, at most (one read of tiny requests could be thousands).
MAX_PIPELINED = 128
# A closing connection's last bytes get this long to reach the client before it is aborted.
FLUSH_S = 5.0
# After a response sent before the request body was read, unread bytes are drained this long before
# closing, so that the close does not reset the connection under the response (nginx lingering_close).
LINGER_S = 2.0


class Entrance:
    """What a client connection knows of the listener it came through, and that listener's counts
    (kept across reloads under its name: a reload that keeps a listener keeps its Entrance)."""

    __slots__ = ("connections", "handshake_failures", "name", "redirect_https", "requests", "scheme")

    def __init__(self, name: str, tls: bool = False, redirect_https: int | None = None) -> None:
        self.name = name
        self.scheme = b"https" if tls else b"http"
        self.redirect_https = redirect_https   # answer every request 308 to HTTPS on this port
        self.connections = 0
        self.requests = 0
        self.handshake_failures = 0

    def configure(self, tls: bool, redirect_https: int | None) -> None:
        """Reload: the listener's new settings (its counts go on)."""
        self.scheme = b"https" if tls else b"http"
        self.redirect_https = redirect_https

    def count_handshake_failure(self) -> None:
        self.handshake_failures += 1

    def snapshot(self) -> dict[str, object]:
        return {"scheme": self.scheme.decode(), "connections": self.connections, "requests": self.requests,
                "handshake_failures": self.handshake_failures, "redirect_https": self.redirect_https}


class State(enum.Enum):
    WAITING = "waiting"
    HEAD = "head"
    BUSY = "busy"
    LINGERING = "lingering"
    TUNNEL = "tunnel"
    CLOSED = "closed"

    __hash__ = object.__hash__      # identity hash in C (see upstream.ConnState)


_TRANSITIONS: dict[State, frozenset[State]] = {
    State.WAITING: frozenset({State.HEAD, State.BUSY, State.LINGERING, State.CLOSED}),
    State.HEAD: frozenset({State.BUSY, State.LINGERING, State.CLOSED}),
    State.BUSY: frozenset({State.WAITING, State.HEAD, State.BUSY, State.LINGERING, State.TUNNEL,
                           State.CLOSED}),
    State.LINGERING: frozenset({State.CLOSED}),
    State.TUNNEL: frozenset({State.CLOSED}),
    State.CLOSED: frozenset({State.CLOSED}),
}


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def plain_error(status: int, detail: str) -> bytes:
    """A complete close-delimited error response, for the paths where no request was parsed."""
    body = b"%d %s: %s\n" % (status, reason(status), detail.encode())
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, reason(status), len(body), body))


def must_be_empty(method: str, status: int) -> bool:
    """RFC 9110 6.4.1: responses that never carry content."""
    return method == "HEAD" or status < 200 or status == 204 or status == 304


class _Refusal(Exception):
    """Raised inside a parser callback: the request is refused with ``status``."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


# Header names the front door looks at, by length first (cheaper than lower-casing every name).
_HOST, _CL, _TE, _EXPECT, _IDEMPOTENCY = 1, 2, 3, 4, 5
_NAMES: dict[bytes, int] = {b"host": _HOST, b"content-length": _CL, b"transfer-encoding": _TE,
                            b"expect": _EXPECT, b"idempotency-key": _IDEMPOTENCY}
_NAME_LENGTHS = frozenset(len(n) for n in _NAMES)
_METHODS: dict[bytes, str] = {}
_NO_HEADERS: list[tuple[bytes, bytes]] = []   # never appended to: on_message_begin makes a new list


class RequestBody:
    """The request body as it arrives: a bounded buffer the proxy reads with :meth:`read`.

    Reading pauses at :data:`BODY_HIGH_WATER` buffered bytes and resumes when the proxy takes them;
    a read that waits longer than ``client_body`` for the next bytes raises
    :class:`~balancer.errors.ClientBodyTimeout`. ``Expect: 100-continue`` is answered at the first
    read: only a request the proxy will forward is told to send its body.
    """

    __slots__ = ("_chunks", "_conn", "_error", "_size", "_waiter", "complete", "deadline",
                 "deadline_slot", "expect_continue", "received")

    def __init__(self, conn: ClientConnection, expect_continue: bool) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.expect_continue = expect_continue
        self.received = 0
        self.deadline = 0.0
        self.deadline_slot = 0

    # --- fed by the connection ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.received += len(data)
        if self._size > BODY_HIGH_WATER:
            self._conn.pause_for_body()
        self._wake()

    def feed_eof(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.complete and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- read by the proxy -------------------------------------------------------------------------

    async def read(self) -> bytes:
        """The bytes received since the last read; ``b""`` once the body is complete."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            if self.expect_continue:
                self.expect_continue = False
                self._conn.send_continue()
            await self._wait()
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        self._conn.resume_for_body()
        return data

    async def _wait(self) -> None:
        conn = self._conn
        waiter = self._waiter = conn.loop.create_future()
        wheel = conn.wheel
        wheel.arm(self, conn.loop.time() + conn.timeouts.client_body_s)
        try:
            await waiter
        finally:
            wheel.disarm(self)
            self._waiter = None

    def deadline_passed(self, now: float) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientBodyTimeout(
                f"request body paused over {self._conn.timeouts.client_body_s:g}s"))


class Exchange:
    """One request on a client connection, and the one way its response goes out.

    Two ways out:

    * :meth:`send_whole` when the complete body is here (the common small response, and every
      error): head and body in one ``transport.write``;
    * :meth:`start`, :meth:`write`, :meth:`finish` for a streamed body: the head goes out with the
      first body bytes (one vectored write), chunked framing is added when the length is unknown, and
      a write waits (up to ``client_send``) while the client's socket buffer is over its high-water
      mark.

    :meth:`switch` hands the connection to a :class:`~.tunnel.Tunnel` after a 101.

    ``keep_alive`` starts from the request (``Connection: close``, HTTP/1.0) and may only go from true
    to false: :meth:`force_close` (draining, an error), an unread request body, or the framing.
    """

    __slots__ = ("_chunked", "_head", "body", "chunked", "conn", "content_length", "finished",
                 "has_idempotency_key", "headers", "host_count", "keep_alive", "method", "received",
                 "refused", "started", "target", "upgrade", "version")

    def __init__(self, conn: ClientConnection, method: str, target: bytes, version: str,
                 headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.conn = conn
        self.received = time.monotonic()      # the head is complete: latency counts from here
        self.method = method
        self.target = target                  # as received, byte for byte
        self.version = version                # "1.1", "1.0"
        self.headers = headers                # raw (name, value) pairs, in order
        self.keep_alive = keep_alive
        self.upgrade = False                  # a protocol switch may follow (Connection: Upgrade)
        self.content_length: int | None = None
        self.chunked = False
        self.host_count = 0
        self.has_idempotency_key = False
        self.body: RequestBody | None = None  # None: the request has no body
        self.refused: tuple[int, str] | None = None   # (status, why): parsed, but not to be forwarded
        self.started = False                  # a response head has been framed (sent or pending)
        self.finished = False                 # the response is complete
        self._chunked = False
        self._head = b""                      # a framed head not yet written

    @property
    def client_ip(self) -> str:
        return self.conn.peer_ip()

    @property
    def entrance(self) -> Entrance:
        return self.conn.entrance

    @property
    def client_ip_bytes(self) -> bytes:
        self.conn.peer_ip()
        return self.conn.client_ip_bytes

    def force_close(self) -> None:
        """This response is the connection's last: it carries ``Connection: close``."""
        self.keep_alive = False

    def _frame(self, status: int, reason: bytes, fields: bytes, length: int | None) -> bytes:
        """Decide framing and keep-alive; return the complete response head."""
        body = self.body
        if (body is not None and not body.complete) or self.upgrade:
            # The rest of the request body will not be read; or an Upgrade was declined (no 101):
            # llhttp stopped at its head, so the connection ends with this response, as it did
            # with aiohttp and does with nginx for an upgrade it cannot make.
            self.keep_alive = False
        keep_alive = self.keep_alive
        framing = b""
        if status == 101:
            keep_alive = False                # the connection leaves HTTP
        elif must_be_empty(self.method, status):
            if length is not None and self.method == "HEAD":
                framing = b"Content-Length: %d\r\n" % length
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif self.version == "1.1":
            self._chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            keep_alive = False                # HTTP/1.0 client, unknown length: the close delimits
        if status != 101:
            if not keep_alive:
                framing += b"Connection: close\r\n"
            elif self.version == "1.0":
                framing += b"Connection: keep-alive\r\n"
        self.keep_alive = keep_alive
        self.started = True
        return b"".join((b"HTTP/1.1 %d " % status, reason, b"\r\n", fields, framing, b"\r\n"))

    def send_whole(self, status: int, reason: bytes, fields: bytes, body: bytes,
                   head_length: int | None = None) -> None:
        """The complete response in one write, framed by ``len(body)``; ``head_length`` is the
        Content-Length announced for a body that must stay empty (the answer to a HEAD)."""
        transport = self.conn.writable()
        if must_be_empty(self.method, status):
            transport.write(self._frame(status, reason, fields, head_length))
        else:
            transport.write(self._frame(status, reason, fields, len(body)) + body)
        self.finished = True

    def send_error(self, status: int, kind: str, request_id: bytes = b"", close: bool = False,
                   extra: bytes = b"") -> None:
        """balancer's own short answer (503, 502, 400, ...): text body, ``X-Balancer-Error: kind``,
        ``Retry-After`` on 503 (unless ``extra`` fields say when), the request id when there is one."""
        body = b"%d %s\n" % (status, reason(status))
        fields = b"Content-Type: text/plain; charset=utf-8\r\nX-Balancer-Error: %s\r\n%b" % (
            kind.encode(), extra)
        if status == 503 and b"Retry-After" not in extra:
            fields += b"Retry-After: 1\r\n"
        if request_id:
            fields += b"X-Request-ID: " + request_id + b"\r\n"
        if close:
            self.keep_alive = False
        self.send_whole(status, reason(status), fields, body)

    def abandon(self) -> None:
        """The response cannot be completed (the client is gone, or the upstream body was cut): the
        connection is aborted so that the client sees a short body, never a wrong one."""
        self.keep_alive = False
        self.finished = True
        self.conn.abort()

    def start(self, status: int, reason: bytes, fields: bytes, length: int | None) -> None:
        """Frame a streamed response; its head goes out with the first :meth:`write`."""
        self._head = self._frame(status, reason, fields, length)

    async def write(self, data: bytes) -> None:
        transport = self.conn.writable()
        if self._chunked:
            parts = [b"%x\r\n" % len(data), data, b"\r\n"]
        else:
            parts = [data]
        if self._head:
            parts.insert(0, self._head)
            self._head = b""
        transport.writelines(parts)
        if self.conn.write_paused:
            await self.conn.drain()

    async def finish(self, trailers: bytes = b"") -> None:
        """End the response: the pending head if no body was written, the last chunk (with
        ``trailers``, RFC 9112 7.1.2) if chunked."""
        if self.finished:
            return
        tail = b"0\r\n" + trailers + b"\r\n" if self._chunked else b""
        if self._head or tail:
            self.conn.writable().write(self._head + tail)
            self._head = b""
        self.finished = True
        if self.conn.write_paused:
            await self.conn.drain()

    def switch(self, head: bytes, backend: asyncio.Transport, backend_tail: bytes) -> Tunnel:
        """Send the 101 ``head`` and hand both connections to a tunnel (see :mod:`.tunnel`)."""
        self.started = True
        self.keep_alive = False
        self.conn.writable().write(head + backend_tail)
        self.finished = True
        return self.conn.switch_to_tunnel(backend, len(backend_tail))


Handler = Callable[[Exchange], Awaitable[None]]


class ClientConnection:
    """One client connection. See the module docstring.

    An asyncio protocol by its methods, not by inheritance: a subclass of ``asyncio.Protocol`` (a
    Python class) would stay a Python class in the compiled build, with every attribute in a dict.
    Slotted, and the pipeline queue made only when a client pipelines: an idle keep-alive
    connection is what ten thousand clients cost (``bench/idle_connections.py``).
    """

    __slots__ = (
        "_began",
        "_body_fed",
        "_body_left",
        "_current",
        "_drain_waiter",
        "_framing_bytes",
        "_head_bytes",
        "_header_size",
        "_headers",
        "_in_head",
        "_linger",
        "_no_more",
        "_parser",
        "_parsing",
        "_paused_for",
        "_queue",
        "_read_paused",
        "_task",
        "_tunnel",
        "_upgrade_tail",
        "_url",
        "client_ip",
        "client_ip_bytes",
        "deadline",
        "deadline_slot",
        "door",
        "entrance",
        "limits",
        "loop",
        "requests",
        "state",
        "timeouts",
        "transport",
        "wheel",
        "write_paused",
    )

    def __init__(self, door: FrontDoor, entrance: Entrance) -> None:
        self.door = door
        self.entrance = entrance
        entrance.connections += 1
        self.loop = door.loop
        self.wheel: Deadlines = door.wheel
        self.limits: LimitsConfig = door.limits
        self.timeouts: ClientTimeoutsConfig = door.timeouts
        self.state = State.WAITING
        self.transport: asyncio.Transport | None = None
        self.client_ip: str | None = None
        self.client_ip_bytes = b"-"
        self.requests = 0
        self.write_paused = False
        self.deadline = 0.0
        self.deadline_slot = 0
        self._parser: Any = httptools.HttpRequestParser(self)
        self._current: Exchange | None = None     # being served
        self._parsing: Exchange | None = None     # head parsed, body still arriving
        self._queue: deque[Exchange] | None = None    # parsed, waiting for the current one (pipelining)
        self._task: asyncio.Task[None] | None = None
        self._in_head = False                     # a head has begun and is not complete
        self._head_bytes = 0                      # bytes read while a head was incomplete
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_size = 0
        self._no_more = False                     # a request said close, or parsing failed
        self._read_paused = False
        self._paused_for = 0                      # reasons reading is paused (bit set, below)
        self._drain_waiter: asyncio.Future[None] | None = None
        self._tunnel: Tunnel | None = None
        self._upgrade_tail: bytes | None = None   # bytes after an Upgrade head, until we know
        self._body_left = 0                       # Content-Length body of an Upgrade request, ours to count
        self._linger = False                      # unread request bytes may follow: linger on close
        self._body_fed = 0                        # request body bytes parsed, all requests
        self._framing_bytes = 0                   # bytes of reads without body bytes, inside a body
        self._began = False                       # a head began in the read being parsed

    # --- state ---------------------------------------------------------------------------------------

    def _set_state(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal client connection transition {self.state.value} -> {new.value}")
        self.state = new

    @property
    def is_busy(self) -> bool:
        """A request is being served or waits in the pipeline, or the connection is a tunnel."""
        return self._current is not None or bool(self._queue) or self.state is State.TUNNEL

    def peer_ip(self) -> str:
        """The client's address, looked up once per connection (not per request)."""
        ip = self.client_ip
        if ip is None:
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            ip = self.client_ip = str(peer[0]) if peer else "-"
            self.client_ip_bytes = ip.encode()
        return ip

    # --- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport, same interface
        self.wheel.arm(self, self.loop.time() + self.timeouts.client_header_s)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is State.TUNNEL:
            assert self._tunnel is not None
            self._tunnel.client_data(data)
            return
        if state is State.LINGERING or state is State.CLOSED:
            return
        if self._body_left:
            data = self._take_counted_body(data)
            if not data:
                return
        if self._upgrade_tail is not None:
            # After an Upgrade head: hold the bytes until we know whether the protocol switches.
            self._upgrade_tail += data
            if len(self._upgrade_tail) > BODY_HIGH_WATER:
                self._pause(_PAUSE_UPGRADE)
            return
        if self._no_more:
            return                  # after `Connection: close` or a refusal: nothing more is read
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        body_before = self._body_fed
        self._began = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[int(exc.args[0]):] if exc.args else b""
            self._parser = httptools.HttpRequestParser(self)    # llhttp cannot go on after it
            if self._body_left:
                rest = self._take_counted_body(rest)
                if rest:
                    self._feed(rest)
            else:
                self._upgrade_tail = rest
                self._pause(_PAUSE_UPGRADE)
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self._refuse(cause.status, cause.why)
            else:
                log.exception("front door parser callback failed", exc_info=cause)
                self._refuse(400, "bad request")
            return
        except httptools.HttpParserError as exc:
            if not self._no_more:   # "data after Connection: close" is the pipeline ending, not an error
                self._refuse(414 if isinstance(exc, httptools.HttpParserInvalidURLError) and
                             len(self._url) > self.limits.max_request_line else 400,
                             str(exc) or type(exc).__name__)
            return
        if self._parsing is not None:
            # Inside a body, reads that carry none of it (a chunk's header and extensions, the
            # trailer section) are bounded like a header block: llhttp buffers a trailer line until
            # it ends. A read with body bytes starts the count again (bounded by one read).
            if self._body_fed != body_before:
                self._framing_bytes = 0
            else:
                self._framing_bytes += len(data)
                if self._framing_bytes > self.limits.max_header_size:
                    self._refuse(431, f"chunk framing or trailers over {self.limits.max_header_size} bytes")
                    return
        if self._in_head:
            # A head spread over reads: bound what llhttp buffers, and time it (slowloris). In the
            # read where it began, only its own bytes count (not the requests before it).
            if self._began:
                self._head_bytes = len(self._url) + self._header_size
            else:
                self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_size + self.limits.max_request_line:
                self._refuse(431, f"header block over {self.limits.max_header_size} bytes")
            elif self.state is State.WAITING:
                self._set_state(State.HEAD)
                self.wheel.arm(self, self.loop.time() + self.timeouts.client_header_s)

    def eof_received(self) -> bool:
        # A client that half-closes while its request is served has gone, as nginx sees it: the
        # upstream request is cancelled (connection_lost follows as the transport closes).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
        self.wheel.disarm(self)
        gone = ClientGone("client closed the connection")
        if self._tunnel is not None:
            self._tunnel.client_closed()
        for exchange in (self._parsing, self._current, *(self._queue or ())):
            if exchange is not None and exchange.body is not None:
                exchange.body.fail(gone)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)
        if self._task is not None and self._tunnel is None:
            self._task.cancel()      # a tunnel's task ends as the tunnel closes: not an error
        self._parser = None          # the parser holds us: break the cycle now
        self.door.forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._tunnel is not None:
            self._tunnel.client_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._tunnel is not None:
            self._tunnel.client_resume_writing()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- llhttp callbacks ------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._began = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        self._header_size = 0
        if self._current is not None:
            self._pause(_PAUSE_PIPELINE)    # a pipelined request: parse no further ahead than this read

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_request_line:
            raise _Refusal(414, f"request target over {self.limits.max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return                  # a chunked body's trailer fields: not forwarded (see README)
        self._headers.append((name, value))
        self._header_size += len(name) + len(value) + 4
        if self._header_size > self.limits.max_header_size:
            raise _Refusal(431, f"header block over {self.limits.max_header_size} bytes")
        if len(self._headers) > self.limits.max_headers:
            raise _Refusal(431, f"more than {self.limits.max_headers} header fields")

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = raw_method.decode("ascii", "replace")
            if len(_METHODS) < 64:
                _METHODS[raw_method] = method
        exchange = Exchange(self, method, self._url, parser.get_http_version(), self._headers,
                            parser.should_keep_alive())
        self._headers = _NO_HEADERS         # the exchange owns the list now
        self._inspect(exchange, parser.should_upgrade())
        self.requests += 1
        self.entrance.requests += 1
        if exchange.body is not None:
            self._parsing = exchange
        if self._current is None and not self._queue:
            self._dispatch(exchange)
        else:
            self._enqueue(exchange)

    def _inspect(self, exchange: Exchange, upgrade: bool) -> None:
        """Framing and the checks llhttp does not make (see the module docstring)."""
        expect_continue = False
        te_ok = True
        for name, value in exchange.headers:
            if len(name) not in _NAME_LENGTHS:
                continue
            kind = _NAMES.get(name.lower(), 0)
            if kind == _HOST:
                exchange.host_count += 1
            elif kind == _CL:
                exchange.content_length = int(value)       # llhttp has checked: digits, one value
            elif kind == _TE:
                exchange.chunked = True
                te_ok = te_ok and value.strip().lower() == b"chunked"
            elif kind == _EXPECT:
                expect_continue = value.strip().lower() == b"100-continue"
            elif kind == _IDEMPOTENCY:
                exchange.has_idempotency_key = True
        version = exchange.version
        if version != "1.1" and version != "1.0":
            exchange.refused = (505, f"HTTP/{version}") if version >= "2" else (400, f"HTTP/{version}")
        elif exchange.host_count > 1:
            exchange.refused = (400, "more than one Host field")
        elif exchange.host_count == 0 and version == "1.1":
            exchange.refused = (400, "no Host field")
        elif not te_ok:
            # llhttp accepts codings before a final `chunked` ("gzip, chunked"). We re-frame bodies, so
            # a coding we would drop must not pass: only a lone `chunked` (as nginx, 400 not 501).
            exchange.refused = (400, "Transfer-Encoding other than chunked")
        has_body = exchange.chunked or bool(exchange.content_length)
        if upgrade:
            if exchange.chunked:
                exchange.refused = exchange.refused or (400, "Upgrade request with a chunked body")
            elif has_body:
                # llhttp would pass the body on as upgrade bytes. Forward the request as a plain one
                # with its body framed; we count the body ourselves after llhttp stops.
                assert exchange.content_length is not None
                self._body_left = exchange.content_length
            else:
                exchange.upgrade = True
        if has_body:
            exchange.body = RequestBody(self, expect_continue)
        if exchange.refused is not None:
            self._no_more = True            # nothing after a refused request is read

    def on_body(self, data: bytes) -> None:
        self._body_fed += len(data)
        exchange = self._parsing
        if exchange is not None and exchange.body is not None:
            exchange.body.feed(data)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        if exchange is not None and not self._body_left:
            self._parsing = None
            if exchange.body is not None:
                exchange.body.feed_eof()
        if not self._parser.should_keep_alive():
            self._no_more = True            # `Connection: close` or HTTP/1.0: the last request

    def _take_counted_body(self, data: bytes) -> bytes:
        """Body bytes of an Upgrade request with Content-Length; returns what follows the body."""
        exchange = self._parsing
        take = data[:self._body_left]
        self._body_left -= len(take)
        if exchange is not None and exchange.body is not None:
            if take:
                exchange.body.feed(take)
            if not self._body_left:
                self._parsing = None
                exchange.body.feed_eof()
        return data[len(take):]

    # --- serving ---------------------------------------------------------------------------------------

    def _dispatch(self, exchange: Exchange) -> None:
        self._current = exchange
        self._set_state(State.BUSY)             # the head/idle deadline lapses unheard (lazy)
        self._task = self.loop.create_task(self._serve(exchange))

    async def _serve(self, exchange: Exchange) -> None:
        try:
            await self.door.handler(exchange)
            if not exchange.finished:
                raise RuntimeError("request handler returned without finishing the response")
            if self.write_paused and self._tunnel is None:
                await self.drain()      # no next response before the client took this one
        except asyncio.CancelledError:
            exchange.finished = True        # the client went away, or the hard stop: nothing to send
        except (ConnectionError, ClientGone, ClientSendTimeout):
            exchange.abandon()
        except Exception:
            log.exception("error handling a request")
            if not exchange.started and self.transport is not None and not self.transport.is_closing():
                exchange.send_error(500, "internal", close=True)
            else:
                exchange.abandon()
        finally:
            self._task = None
            self._done(exchange)

    def _done(self, exchange: Exchange) -> None:
        """The response to ``exchange`` is complete: the next request, idle, or close."""
        self._current = None
        if self.state is State.CLOSED or self.state is State.TUNNEL:
            return
        if not exchange.keep_alive or self.door.draining:
            self._close_after_response()
            return
        if self._queue:
            self._set_state(State.BUSY)
            self._dispatch_next()
            return
        if self._no_more:
            self._close_after_response()
            return
        self._resume(_PAUSE_PIPELINE | _PAUSE_BODY)   # an unread complete body paused reading too
        if self._current is None and self.state is State.BUSY:
            self._set_state(State.HEAD if self._in_head else State.WAITING)
            timeout = self.timeouts.client_header_s if self._in_head else self.timeouts.client_idle_s
            self.wheel.arm(self, self.loop.time() + timeout)

    def _enqueue(self, exchange: Exchange) -> None:
        if self._queue is None:
            self._queue = deque()
        elif len(self._queue) >= MAX_PIPELINED and exchange.refused is None:
            raise _Refusal(400, f"more than {MAX_PIPELINED} pipelined requests at once")
        self._queue.append(exchange)
        self._pause(_PAUSE_PIPELINE)

    def _dispatch_next(self) -> None:
        assert self._queue is not None
        exchange = self._queue.popleft()
        self._current = exchange
        self._task = self.loop.create_task(self._serve(exchange))
        if not self._queue:
            self._resume(_PAUSE_PIPELINE)

    def _close_after_response(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.state = State.CLOSED
            return
        if self._parsing is not None or self._body_left or self._linger:
            # The request body is still arriving: stop sending, drain what comes for a moment, then
            # close (closing with unread bytes would reset the connection under the response).
            self._set_state(State.LINGERING)
            self._paused_for = 0
            self._set_reading(True)
            if transport.can_write_eof():
                transport.write_eof()
            self.wheel.arm(self, self.loop.time() + LINGER_S)
            return
        self._set_state(State.CLOSED)
        self.close()

    def close(self) -> None:
        """Close after what was written is flushed, for at most :data:`FLUSH_S`: a client that reads
        nothing more does not keep its connection (and its place under max_connections)."""
        self.state = State.CLOSED
        if self.transport is not None:
            self.transport.close()
            self.wheel.arm(self, self.loop.time() + FLUSH_S)   # connection_lost disarms it

    def _refuse(self, status: int, why: str) -> None:
        """A request llhttp or our limits refused: answered in its turn, then the connection closes."""
        self._no_more = True
        self._linger = True
        self._in_head = False
        exchange = Exchange(self, "GET", self._url, "1.1", self._headers, False)
        exchange.refused = (status, why)
        level = logging.DEBUG if status == 400 and "method" in why.lower() else logging.INFO
        log.log(level, "refused request from %s: %d %s", self.peer_ip(), status, why.splitlines()[0]
                if why else "")
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.fail(ClientBodyInvalid(why, status))
            self._parsing = None
        if self._current is None and not self._queue:
            # Answered here: an unparsable request has no record.
            self._current = exchange
            if self.state is not State.BUSY:
                self._set_state(State.BUSY)
            exchange.send_error(status, "refused", close=True)
            self._done(exchange)
        else:
            self._enqueue(exchange)

    # --- the connection's own waits ----------------------------------------------------------------------

    def deadline_passed(self, now: float) -> None:
        state = self.state
        transport = self.transport
        if transport is None:
            return
        if state is State.CLOSED:
            transport.abort()               # closed, and still not flushed after FLUSH_S
        elif state is State.HEAD:
            log.info("request head from %s not received within %gs: 408", self.peer_ip(),
                     self.timeouts.client_header_s)
            self._no_more = True
            transport.write(plain_error(408, "request head not received in time"))
            self.close()
        elif state is State.BUSY:
            waiter = self._drain_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(ClientSendTimeout(
                    f"client read nothing for {self.timeouts.client_send_s:g}s"))
        else:                               # WAITING (idle keep-alive, or never a byte), LINGERING
            self.close()

    async def drain(self) -> None:
        """Wait until the client's socket buffer is below its low-water mark, up to ``client_send``."""
        if self.transport is None or self.transport.is_closing():
            raise ClientGone("client connection closed")
        waiter = self._drain_waiter = self.loop.create_future()
        self.wheel.arm(self, self.loop.time() + self.timeouts.client_send_s)
        try:
            await waiter
        finally:
            self._drain_waiter = None           # the deadline lapses unheard (lazy)

    def writable(self) -> asyncio.Transport:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ClientGone("client connection closed")
        return transport

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def send_continue(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def switch_to_tunnel(self, backend: asyncio.Transport, backend_bytes: int) -> Tunnel:
        assert self.transport is not None
        tail, self._upgrade_tail = self._upgrade_tail or b"", None
        self._set_state(State.TUNNEL)
        tunnel = Tunnel(self.transport, backend, self.timeouts.tunnel_idle_s, self.wheel, self.loop)
        tunnel.bytes_down = backend_bytes
        self._tunnel = tunnel
        self._paused_for = 0
        self._set_reading(True)
        if tail:
            tunnel.client_data(tail)
        if self.write_paused:            # paused by the 101's own write: uvloop says so only once
            tunnel.client_pause_writing()
        return tunnel

    # --- read pausing: several reasons, one switch ------------------------------------------------------

    def pause_for_body(self) -> None:
        self._pause(_PAUSE_BODY)

    def resume_for_body(self) -> None:
        self._resume(_PAUSE_BODY)

    def _pause(self, why: int) -> None:
        self._paused_for |= why
        self._set_reading(False)

    def _resume(self, why: int) -> None:
        if self._paused_for & why:
            self._paused_for &= ~why
            if not self._paused_for:
                self._set_reading(True)

    def _set_reading(self, on: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._read_paused is not on:
            return
        self._read_paused = not on
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def __repr__(self) -> str:
        return (f"<ClientConnection {self.client_ip or '?'} {self.state.value} requests={self.requests}"
                f" queued={len(self._queue or ())}>")


_PAUSE_BODY, _PAUSE_PIPELINE, _PAUSE_UPGRADE = 1, 2, 4


class _Refuse(asyncio.Protocol):
    """The protocol for a connection over ``limits.max_connections``: 503, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_OVERLOADED)  # type: ignore[attr-defined]
        transport.close()


_OVERLOADED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"X-Balancer-Error: max_connections\r\nRetry-After: 1\r\nContent-Length: 24\r\n"
               b"Connection: close\r\n\r\n503 Service Unavailable\n")


class FrontDoor:
    """The protocol factory of the data port, and the owner of its client connections.

    It counts them for ``limits.max_connections`` (from the factory call: a burst of accepted
    connections is made before any of them reaches ``connection_made``), holds the client-side
    settings (:meth:`apply` on reload; connections made afterwards use the new ones), and drains and
    stops them on shutdown.
    """

    def __init__(self, handler: Handler, limits: LimitsConfig, timeouts: ClientTimeoutsConfig) -> None:
        self.default_entrance = Entrance("default")
        self.loop = asyncio.get_running_loop()
        self.wheel = deadlines(self.loop)
        self.handler = handler
        self.limits = limits
        self.timeouts = timeouts
        self.connections: set[ClientConnection] = set()
        self.refused_connections = 0
        self.draining = False

    def apply(self, limits: LimitsConfig, timeouts: ClientTimeoutsConfig) -> None:
        self.limits = limits
        self.timeouts = timeouts

    def __call__(self) -> asyncio.Protocol:
        return self.connect(self.default_entrance)

    def connect(self, entrance: Entrance) -> asyncio.Protocol:
        """The protocol for a connection accepted through ``entrance``'s listener."""
        if self.limits.max_connections and len(self.connections) >= self.limits.max_connections:
            # Over limits.max_connections: a clean 503 and close, costing no parser.
            self.refused_connections += 1
            return _Refuse()
        conn = ClientConnection(self, entrance)
        self.connections.add(conn)
        return cast(asyncio.Protocol, conn)

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)

    def close_idle(self) -> None:
        """Start draining: idle connections close now, busy ones after their response."""
        self.draining = True
        for conn in list(self.connections):
            if not conn.is_busy:
                conn.close()

    async def shutdown(self, timeout: float) -> int:
        """Drain for up to ``timeout`` seconds, then stop hard: every connection still open is
        aborted and its request cancelled (HAProxy's hard-stop-after). Returns how many requests
        were cut."""
        self.close_idle()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            if not any(c.is_busy for c in self.connections):
                break
            await asyncio.sleep(0.02)
        cut = 0
        for conn in list(self.connections):
            if conn.is_busy:
                cut += 1
            if conn.transport is not None:
                conn.transport.abort()      # connection_lost follows: its request task is cancelled
        # Give the cancelled requests a bounded moment to run their cleanup (lease release, records).
        end = self.loop.time() + 1.0
        while self.connections and self.loop.time() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return cut
