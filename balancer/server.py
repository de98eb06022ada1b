"""The front door: aiohttp's low-level server with the gaps a proxy must close.

aiohttp's request parser (llhttp) already refuses most smuggling vectors (TE with CL, duplicate or
non-numeric CL, bad chunk sizes, obs-fold, whitespace before the colon, bare CR/LF, NUL and control
bytes). What it does not do, this module does:

* **statuses for limits**: an over-long request line is 414, an over-long or too-many header block is
  431 (aiohttp answers 400 for all of them), each with ``Connection: close``;
* **a request-head read timeout** (slowloris): bytes of a request head trickling in for longer than
  ``timeouts.client_header`` get 408 and the connection closed; aiohttp has none;
* **one quiet log line** per refused request instead of aiohttp's traceback.

The remaining request checks that need the parsed message (HTTP version, Transfer-Encoding codings,
header block size, body size) are in :func:`refusal`, called by the proxy before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.helpers import must_be_empty_body
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import HttpVersion10, HttpVersion11, StreamWriter
from aiohttp.web_protocol import RequestHandler

from .models import LimitsConfig

log = logging.getLogger(__name__)

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


class ProxyResponse(web.StreamResponse):
    """A streamed response whose head is the upstream's raw header bytes plus framing we derive.

    Two ways out: aiohttp's usual ``prepare``/``write``/``write_eof`` (bodies streamed in pieces), or
    :meth:`send_whole` when the complete body is already here (the common small response): head and
    body in one ``transport.write``, skipping aiohttp's writer layers.
    """

    _send_headers_immediately = False   # head goes out with the first body bytes, in one write

    def __init__(self, status: int, reason: bytes, fields: bytes, length: int | None) -> None:
        super().__init__(status=status)
        self._raw_reason = reason
        self._raw_fields = fields
        self._raw_length = length
        self._framing = b""

    def _frame(self, request: web.BaseRequest, writer: StreamWriter | None) -> bytes:
        """Decide framing and keep-alive; return the complete response head."""
        keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        framing = b""
        if self._status == 101:
            keep_alive = False           # the connection leaves HTTP; our caller relays bytes
        elif self._must_be_empty_body:
            if self._raw_length is not None and request.method == "HEAD":
                framing = b"Content-Length: %d\r\n" % self._raw_length
        elif self._raw_length is not None:
            if writer is not None:
                writer.length = self._raw_length
            framing = b"Content-Length: %d\r\n" % self._raw_length
        elif request.version >= HttpVersion11:
            if writer is not None:
                writer.enable_chunking()
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            keep_alive = False           # HTTP/1.0 client, unknown length: the close delimits
        if self._status != 101:
            if not keep_alive:
                framing += b"Connection: close\r\n"
            elif request.version == HttpVersion10:
                framing += b"Connection: keep-alive\r\n"
        self._keep_alive = keep_alive
        return b"".join((b"HTTP/1.1 %d " % self._status, self._raw_reason, b"\r\n",
                         self._raw_fields, framing, b"\r\n"))

    async def _prepare_headers(self) -> None:
        assert self._req is not None
        self._head = self._frame(self._req, cast(StreamWriter, self._payload_writer))

    async def _write_headers(self) -> None:
        # aiohttp keeps the serialized head in the writer until the first body write, then sends both
        # in one write; we put our bytes there instead of its str-headers serialization.
        writer = cast(StreamWriter, self._payload_writer)
        writer._headers_buf = self._head
        writer._headers_written = False

    async def write_trailers(self, fields: bytes) -> None:
        """End a chunked body with trailer fields (RFC 9112 7.1.2) instead of a bare last chunk."""
        writer = cast(StreamWriter, self._payload_writer)
        if not writer.chunked:
            return                       # not chunked to this client (HTTP/1.0): no place for them
        writer.chunked = False           # we write the last chunk ourselves; write_eof adds nothing
        await writer.write(b"0\r\n" + fields + b"\r\n")

    def send_whole(self, request: web.BaseRequest, body: bytes) -> None:
        """Send head and complete ``body`` in one write and mark the response finished, so that
        aiohttp's own ``prepare``/``write_eof`` after the handler do nothing."""
        self._req = request
        self._payload_writer = writer = request._payload_writer
        self._must_be_empty_body = must_be_empty_body(request.method, self._status)
        if not self._must_be_empty_body:
            self._raw_length = len(body)     # the whole body is here: its length frames it
        head = self._frame(request, None)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client connection closed")
        transport.write(head + body if body and not self._must_be_empty_body else head)
        writer.output_size += len(body)
        self._eof_sent = True

class ErrorResponse(ProxyResponse):
    """balancer's own short error answer (503, 502, 400, ...): text body, ``X-Balancer-Error: kind``,
    ``Retry-After`` on 503, the request id when there is one."""

    def __init__(self, status: int, kind: str, request_id: bytes = b"", close: bool = False) -> None:
        body = b"%d %s\n" % (status, reason(status))
        fields = b"Content-Type: text/plain; charset=utf-8\r\nX-Balancer-Error: %s\r\n" % kind.encode()
        if status == 503:
            fields += b"Retry-After: 1\r\n"
        if request_id:
            fields += b"X-Request-ID: " + request_id + b"\r\n"
        super().__init__(status, reason(status), fields, len(body))
        self._error_body = body
        if close:
            self.force_close()

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(b"" if self._must_be_empty_body else self._error_body)



def refusal(message: RawRequestMessage, header_size: int, limits: LimitsConfig) -> tuple[int, str] | None:
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


class FrontDoorHandler(RequestHandler):
    """aiohttp's per-connection protocol plus a request-head timeout and proxy-style error statuses.

    The head timeout costs one float per request: ``head_started`` is set when the first bytes of a
    head arrive and cleared when the head is complete; :class:`FrontDoor` sweeps its connections
    twice a second for heads that are late (no timer per request).
    """

    def __init__(self, manager: web.Server, *, max_line_size: int, **kwargs: Any) -> None:
        super().__init__(manager, max_line_size=max_line_size, **kwargs)
        self._max_line = max_line_size
        self.head_started: float | None = None
        self.client_ip: str | None = None      # cached by the proxy on the first request

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
        self.transport.close()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            if isinstance(exc, LineTooLong):
                status = 414 if exc.args[1] == self._max_line else 431
            elif "Too many headers" in str(exc.message):
                status = 431
            else:
                status = 400
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
            log.log(level, "refused request from %s: %d %s", request.remote, status,
                    str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__)
            return ErrorResponse(status, "refused", close=True)
        return super().handle_error(request, status, exc, message)


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

    def __init__(self, handler: Any, *, header_timeout: float, max_connections: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._sweeper: asyncio.TimerHandle | None = None
        self.refused_connections = 0

    def __call__(self) -> RequestHandler:  # or a _Refuse over the limit
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self.SWEEP_INTERVAL_S, self._sweep)
        if self._max_connections and len(self._connections) >= self._max_connections:
            # Over limits.max_connections: a clean 503 and close, costing no parser or handler.
            self.refused_connections += 1
            return _Refuse()  # type: ignore[return-value]
        return FrontDoorHandler(self, loop=self._loop, **self._kwargs)

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
