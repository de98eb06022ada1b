"""The front door: aiohttp's low-level server with the gaps a proxy must close.

aiohttp's request parser (llhttp) already refuses most smuggling vectors (TE with CL, duplicate or
non-numeric CL, bad chunk sizes, obs-fold, whitespace before the colon, bare CR/LF, NUL and control
bytes). What it does not do, this module does:

* **statuses for limits**: an over-long request line is 414, an over-long or too-many header block is
  431 (aiohttp answers 400 for all of them), each with ``Connection: close``;
* **a request-head read timeout** (slowloris): bytes of a request head trickling in for longer than
  ``timeouts.client_header`` get 408 and the connection closed; aiohttp has none;
* **one quiet log line** per refused request instead of aiohttp's traceback;
* **a lean request loop**: :class:`FrontDoorHandler` keeps aiohttp's connection handling and parser but
  hands each parsed request straight to the proxy as an :class:`Exchange` (no ``BaseRequest``,
  ``StreamResponse`` or task per request), and the response head is written from raw bytes.

The remaining request checks that need the parsed message (HTTP version, Transfer-Encoding codings,
header block size, body size) are in :func:`refusal`, called by the proxy before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Protocol, TypeVar, cast

from aiohttp import web, web_protocol
from aiohttp.helpers import must_be_empty_body
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.http_writer import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from multidict import CIMultiDictProxy

from .models import LimitsConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


class ParsedRequest(Protocol):
    """What the proxy reads of a request aiohttp parsed.

    aiohttp's type hints name its ``RawRequestMessage`` NamedTuple, but its C parser returns a class of
    its own with the same fields. A protocol describes both; the NamedTuple's name would be a lie that
    the compiled build (mypyc checks declared classes at run time) turns into a TypeError.
    """

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def version(self) -> HttpVersion: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]: ...
    @property
    def should_close(self) -> bool: ...
    @property
    def upgrade(self) -> bool: ...
    @property
    def chunked(self) -> bool: ...


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def plain_error(status: int, detail: str) -> bytes:
    """A complete close-delimited error response, for the paths where no handler runs."""
    body = b"%d %s: %s\n" % (status, reason(status), detail.encode())
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, reason(status), len(body), body))


class Exchange:
    """One request on a client connection, and the one way its response goes out.

    The proxy's handler gets an ``Exchange`` instead of aiohttp's ``BaseRequest``/``StreamResponse``
    pair: the request is aiohttp's parsed message and body stream as they are, and the response head is
    the upstream's raw field bytes plus the framing decided here. Two ways out:

    * :meth:`send_whole` when the complete body is already here (the common small response, and every
      error): head and body in one ``transport.write``;
    * :meth:`start`, :meth:`write`, :meth:`finish` for a streamed body: the head goes out with the
      first body bytes (one vectored write), chunked framing is added when the length is unknown, and
      a write waits while the client's socket buffer is over its high-water mark.

    ``keep_alive`` starts from the request (``Connection: close``, HTTP/1.0) and may only go from true
    to false: :meth:`force_close` (draining, an error) or the framing (a close-delimited body).
    """

    __slots__ = ("_chunked", "_head", "finished", "keep_alive", "message", "method", "payload",
                 "protocol", "started", "transport", "version")

    def __init__(self, protocol: FrontDoorHandler, message: ParsedRequest, payload: StreamReader) -> None:
        self.protocol = protocol
        self.transport = protocol.transport
        self.message = message
        self.payload = payload
        self.method: str = message.method
        self.version = message.version
        self.keep_alive = not message.should_close
        self.started = False          # a response head has been framed (sent or pending)
        self.finished = False         # the response is complete
        self._chunked = False
        self._head = b""              # a framed head not yet written (goes out with the first body bytes)

    @property
    def content_length(self) -> int | None:
        value = self.message.headers.get("Content-Length")
        return int(value) if value is not None else None   # llhttp has checked it is digits

    @property
    def body_exists(self) -> bool:
        return self.payload is not EMPTY_PAYLOAD

    def force_close(self) -> None:
        """This response is the connection's last: it carries ``Connection: close``."""
        self.keep_alive = False

    def _frame(self, status: int, reason: bytes, fields: bytes, length: int | None) -> bytes:
        """Decide framing and keep-alive; return the complete response head."""
        keep_alive = self.keep_alive
        framing = b""
        if status == 101:
            keep_alive = False           # the connection leaves HTTP; the caller relays bytes
        elif must_be_empty_body(self.method, status):
            if length is not None and self.method == "HEAD":
                framing = b"Content-Length: %d\r\n" % length
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif self.version >= HttpVersion11:
            self._chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            keep_alive = False           # HTTP/1.0 client, unknown length: the close delimits
        if status != 101:
            if not keep_alive:
                framing += b"Connection: close\r\n"
            elif self.version == HttpVersion10:
                framing += b"Connection: keep-alive\r\n"
        self.keep_alive = keep_alive
        self.started = True
        return b"".join((b"HTTP/1.1 %d " % status, reason, b"\r\n", fields, framing, b"\r\n"))

    def _transport(self) -> asyncio.Transport:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client connection closed")
        return transport

    def send_whole(self, status: int, reason: bytes, fields: bytes, body: bytes,
                   head_length: int | None = None) -> None:
        """The complete response in one write, framed by ``len(body)``; ``head_length`` is the
        Content-Length announced for a body that must stay empty (the answer to a HEAD)."""
        transport = self._transport()
        if must_be_empty_body(self.method, status):
            transport.write(self._frame(status, reason, fields, head_length))
        else:
            transport.write(self._frame(status, reason, fields, len(body)) + body)
        self.finished = True

    def send_error(self, status: int, kind: str, request_id: bytes = b"", close: bool = False) -> None:
        """balancer's own short answer (503, 502, 400, ...): text body, ``X-Balancer-Error: kind``,
        ``Retry-After`` on 503, the request id when there is one."""
        body = b"%d %s\n" % (status, reason(status))
        fields = b"Content-Type: text/plain; charset=utf-8\r\nX-Balancer-Error: %s\r\n" % kind.encode()
        if status == 503:
            fields += b"Retry-After: 1\r\n"
        if request_id:
            fields += b"X-Request-ID: " + request_id + b"\r\n"
        if close:
            self.keep_alive = False
        self.send_whole(status, reason(status), fields, body)

    def start(self, status: int, reason: bytes, fields: bytes, length: int | None) -> None:
        """Frame a streamed response; its head goes out with the first :meth:`write`."""
        self._head = self._frame(status, reason, fields, length)

    async def write(self, data: bytes) -> None:
        transport = self._transport()
        if self._chunked:
            parts = [b"%x\r\n" % len(data), data, b"\r\n"]
        else:
            parts = [data]
        if self._head:
            parts.insert(0, self._head)
            self._head = b""
        transport.writelines(parts)
        if self.protocol._paused:     # over the transport's high-water mark: wait for the client
            await self.protocol._drain_helper()

    async def finish(self, trailers: bytes = b"") -> None:
        """End the response: the pending head if no body was written, the last chunk (with
        ``trailers``, RFC 9112 7.1.2) if chunked."""
        if self.finished:
            return
        tail = b"0\r\n" + trailers + b"\r\n" if self._chunked else b""
        if self._head or tail:
            self._transport().write(self._head + tail)
            self._head = b""
        self.finished = True
        if self.protocol._paused:
            await self.protocol._drain_helper()


def refusal(message: ParsedRequest, header_size: int, limits: LimitsConfig) -> tuple[int, str] | None:
    """(status, reason) if the parsed request must be refused before it reaches a backend."""
    version = message.version
    if version[0] != 1 or version[1] not in (0, 1):
        return (505, f"HTTP/{version[0]}.{version[1]}") if version[0] >= 2 else (400, "HTTP/0.9")
    if header_size > limits.max_header_size:
        return 431, f"header block over {limits.max_header_size} bytes"
    if message.chunked:
        # llhttp accepts codings before a final `chunked` ("gzip, chunked"). We re-frame bodies, so a
        # coding we would drop must not pass: only a lone `chunked` is allowed (as nginx, 400 not 501).
        for name, value in message.raw_headers:
            if name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
                return 400, "Transfer-Encoding other than chunked"
    return None


def _python_class(cls: type[T]) -> type[T]:
    """Leave a class a Python class in the compiled build (its methods are still compiled).

    mypyc makes a native class of every class without other decorators, and a native class cannot
    extend aiohttp's ``RequestHandler`` (a Python class with ``__slots__``): a decorator is its way out.
    """
    return cls


# aiohttp's placeholder message for a request it could not parse, read through vars() as Any: its
# declared class (the NamedTuple) is not its class with the C parser, see ParsedRequest.
_UNPARSABLE: ParsedRequest = vars(web_protocol)["ERROR"]


@_python_class
class FrontDoorHandler(RequestHandler):
    """aiohttp's per-connection protocol, with a lean request loop, a request-head timeout and
    proxy-style error statuses.

    aiohttp's own loop (``RequestHandler.start``) wraps every request in a ``BaseRequest``, a
    ``StreamWriter``, a ``StreamResponse`` and a new ``Task``, and prepares the response through its
    writer layers: about as much CPU as the whole rest of a proxied request (measured: 61 -> 36 µs
    per small request with the same parser and pool). :meth:`start` keeps what that loop does for the
    connection (the message queue and its read pausing, keep-alive and its idle timer, lingering on
    an unread body, a declined upgrade's tail, shutdown's handshake) and calls the proxy directly,
    in this connection's task, with an :class:`Exchange`.

    The head timeout costs one float per request: ``head_started`` is set when the first bytes of a
    head arrive and cleared when the head is complete; :class:`FrontDoor` sweeps its connections
    twice a second for heads that are late (no timer per request).
    """

    def __init__(self, manager: FrontDoor, *, max_line_size: int, **kwargs: Any) -> None:
        super().__init__(manager, max_line_size=max_line_size, **kwargs)
        self._max_line = max_line_size
        self._handle = manager.handle_exchange
        self.head_started: float | None = None
        self.client_ip: str | None = None      # see peer_ip()
        self.client_ip_bytes = b"-"

    def data_received(self, data: bytes) -> None:
        if self.head_started is None and not self._request_in_progress and not self._messages:
            self.head_started = self._loop.time()
        super().data_received(data)
        if self._messages or self._request_in_progress or self._upgraded:
            self.head_started = None

    def is_head_late(self, now: float, timeout: float) -> bool:
        return (self.head_started is not None and now - self.head_started > timeout
                and not self._messages and not self._request_in_progress)

    def refuse_late_head(self, timeout: float) -> None:
        self.head_started = None
        if self.transport is None:
            return
        log.info("request head not received within %gs: 408", timeout)
        self.transport.write(plain_error(408, "request head not received in time"))
        self.force_close()

    async def start(self) -> None:
        loop = self._loop
        manager = self._manager
        assert manager is not None
        handle = self._handle
        while not self._force_close:
            if not self._messages:
                try:
                    self._waiter = loop.create_future()
                    await self._waiter
                finally:
                    self._waiter = None
            # Any, then the protocol: aiohttp's hints say RawRequestMessage, its C parser's class is not.
            item: Any = self._messages.popleft()
            message: ParsedRequest | _ErrInfo = item[0]
            payload: StreamReader = item[1]
            if self._parser is not None:
                self._parser.message_consumed()
            if self._buffer_paused and len(self._messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()
            manager.requests_count += 1

            self._request_in_progress = True
            done = False        # no `break` inside try/finally: mypyc does not compile one
            try:
                if isinstance(message, _ErrInfo):
                    exchange = Exchange(self, _UNPARSABLE, payload)
                    self._refuse_unparsable(exchange, message.exc)
                else:
                    exchange = Exchange(self, message, payload)
                    await handle(exchange)
                    if not exchange.finished:
                        raise RuntimeError("request handler returned without finishing the response")
            except asyncio.CancelledError:
                self.force_close()
                raise
            except ConnectionError:
                self.force_close()      # the client went away
                done = True
            except Exception:
                log.exception("error handling a request")
                if not exchange.started and self.transport is not None:
                    with contextlib.suppress(ConnectionError):
                        exchange.send_error(500, "internal", close=True)
                self.force_close()
                done = True
            finally:
                self._request_in_progress = False
                waiter = self._handler_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            if done:
                break
            self._keepalive = exchange.keep_alive
            try:
                if self._upgraded and not self._messages and self._payload_parser is None:
                    self._reparse_tail()
                if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                    await self._linger(payload)
            except asyncio.CancelledError:
                self.force_close()
                raise
            except Exception as exc:    # a broken body while lingering: this connection is done
                log.debug("closing after the response: %r", exc)
                self.force_close()
                break

            if self._keepalive and not self._close and not self._force_close:
                close_time = loop.time() + self._keepalive_timeout
                self._next_keepalive_close_time = close_time
                if self._keepalive_handle is None:
                    self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
            else:
                break
        if not self._force_close:
            self._task_handler = None
            if self.transport is not None:
                self.transport.close()

    async def _linger(self, payload: StreamReader) -> None:
        """The response went out before the request body was read (an error, a 413): read and drop
        the rest for a while, so that closing does not reset the connection under the response."""
        if not self._force_close and self._lingering_time:
            try:
                async with asyncio.timeout(self._lingering_time):
                    while not payload.is_eof():
                        await payload.readany()
            except TimeoutError:
                pass
        if not payload.is_eof() and not self._force_close:
            self.close()

    def _reparse_tail(self) -> None:
        """An upgrade request that was answered without upgrading (the backend did not send 101):
        the bytes that followed it are HTTP again."""
        if self._parser is None:
            return
        self._parser.set_upgraded(False)
        self._upgraded = False
        tail, self._message_tail = self._message_tail, b""
        if not tail:
            return
        try:
            messages, upgraded, rest = self._parser.feed_data(tail)
        except HttpProcessingError as exc:
            messages, upgraded, rest = [(_ErrInfo(status=400, exc=exc, message=exc.message),
                                         EMPTY_PAYLOAD)], False, b""
        self._upgraded = upgraded
        self._message_tail = rest
        for item in messages:
            self._request_count = self._request_count + 1     # mypyc: `+=` on an inherited slot
            self._messages.append(item)
        if len(self._messages) >= self._max_msg_queue_size:
            self._pause_reading_for_buffer()
        elif self._buffer_paused:
            self._resume_reading_if_drained()

    def _refuse_unparsable(self, exchange: Exchange, exc: BaseException) -> None:
        """A request llhttp refused: 414/431 for the limits (aiohttp says 400 to all), else 400."""
        status = 400
        if isinstance(exc, LineTooLong):
            status = 414 if exc.args[1] == self._max_line else 431
        elif isinstance(exc, HttpProcessingError) and "Too many headers" in str(exc.message):
            status = 431
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
        detail = str(getattr(exc, "message", "") or "").strip()
        log.log(level, "refused request from %s: %d %s", self.peer_ip(), status,
                detail.splitlines()[0] if detail else type(exc).__name__)
        exchange.send_error(status, "refused", close=True)

    def peer_ip(self) -> str:
        """The client's address, looked up once per connection (not per request)."""
        ip = self.client_ip
        if ip is None:
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            ip = self.client_ip = str(peer[0]) if peer else "-"
            self.client_ip_bytes = ip.encode()
        return ip


class _Refuse(asyncio.Protocol):
    """The protocol for a connection over ``limits.max_connections``: 503, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(_OVERLOADED)
        transport.close()


_OVERLOADED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"X-Balancer-Error: max_connections\r\nRetry-After: 1\r\nContent-Length: 24\r\n"
               b"Connection: close\r\n\r\n503 Service Unavailable\n")


class FrontDoor(web.Server):
    """``web.Server`` that builds :class:`FrontDoorHandler` protocols and enforces the head timeout."""

    SWEEP_INTERVAL_S = 0.5

    def __init__(self, handler: Callable[[Exchange], Awaitable[None]], *, header_timeout: float,
                 max_connections: int = 0, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]  # FrontDoorHandler calls it
        self.handle_exchange = handler
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._sweeper: asyncio.TimerHandle | None = None
        self.refused_connections = 0
        # Handlers made and not yet lost: counted from the factory call, because a burst of accepted
        # connections is made before any of them reaches connection_made.
        self._admitted: set[RequestHandler] = set()

    def __call__(self) -> RequestHandler:  # or a _Refuse over the limit
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self.SWEEP_INTERVAL_S, self._sweep)
        if self._max_connections and len(self._admitted) >= self._max_connections:
            # Over limits.max_connections: a clean 503 and close, costing no parser or handler.
            self.refused_connections += 1
            return _Refuse()  # type: ignore[return-value]
        handler = FrontDoorHandler(self, loop=self._loop, **self._kwargs)
        self._admitted.add(handler)
        return handler

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._admitted.discard(handler)
        super().connection_lost(handler, exc)

    def _sweep(self) -> None:
        now = self._loop.time()
        timeout = self._header_timeout
        for handler in list(self._connections):
            if isinstance(handler, FrontDoorHandler) and handler.is_head_late(now, timeout):
                handler.refuse_late_head(timeout)
        self._sweeper = self._loop.call_later(self.SWEEP_INTERVAL_S, self._sweep)

    @property
    def busy_connections(self) -> int:
        """Client connections with a request being handled or queued (pipelined)."""
        return sum(1 for h in self._connections if h._request_in_progress or h._messages)

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await super().shutdown(timeout)
