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
    """A streamed response whose head is the upstream's raw header bytes plus framing we derive."""

    _send_headers_immediately = False   # head goes out with the first body bytes, in one write

    def __init__(self, status: int, reason: bytes, fields: bytes, length: int | None) -> None:
        super().__init__(status=status)
        self._raw_reason = reason
        self._raw_fields = fields
        self._raw_length = length

    async def _prepare_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and writer is not None
        keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        framing = b""
        if self._status == 101:
            self._keep_alive = False     # the connection leaves HTTP; our caller relays bytes
            self._framing = b""
            return
        if self._must_be_empty_body:
            if self._raw_length is not None and request.method == "HEAD":
                framing = b"Content-Length: %d\r\n" % self._raw_length
        elif self._raw_length is not None:
            writer.length = self._raw_length
            framing = b"Content-Length: %d\r\n" % self._raw_length
        elif request.version >= HttpVersion11:
            writer.enable_chunking()
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            keep_alive = False          # HTTP/1.0 client, unknown length: the close delimits
        if not keep_alive:
            framing += b"Connection: close\r\n"
        elif keep_alive and request.version == HttpVersion10:
            framing += b"Connection: keep-alive\r\n"
        self._keep_alive = keep_alive
        self._framing = framing

    async def _write_headers(self) -> None:
        # aiohttp keeps the serialized head in the writer until the first body write, then sends both
        # in one write; we put our bytes there instead of its str-headers serialization.
        writer = cast(StreamWriter, self._payload_writer)
        writer._headers_buf = b"".join((
            b"HTTP/1.1 %d " % self._status, self._raw_reason, b"\r\n",
            self._raw_fields, self._framing, b"\r\n"))
        writer._headers_written = False


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



def refusal(message: RawRequestMessage, limits: LimitsConfig) -> tuple[int, str] | None:
    """(status, reason) if the parsed request must be refused before it reaches a backend."""
    version = message.version
    if version[0] != 1 or version[1] not in (0, 1):
        return (505, f"HTTP/{version[0]}.{version[1]}") if version[0] >= 2 else (400, "HTTP/0.9")
    size = 0
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4
    if size > limits.max_header_size:
        return 431, f"header block over {limits.max_header_size} bytes"
    if message.chunked:
        # llhttp accepts codings before a final `chunked` ("gzip, chunked"). We re-frame bodies, so a
        # coding we would drop must not pass: only a lone `chunked` is allowed (as nginx, 400 not 501).
        for name, value in message.raw_headers:
            if name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
                return 400, "Transfer-Encoding other than chunked"
    return None


class FrontDoorHandler(RequestHandler):
    """aiohttp's per-connection protocol plus a request-head timeout and proxy-style error statuses."""

    def __init__(self, manager: web.Server, *, header_timeout: float, max_line_size: int,
                 **kwargs: Any) -> None:
        super().__init__(manager, max_line_size=max_line_size, **kwargs)
        self._header_timeout = header_timeout
        self._max_line = max_line_size
        self._header_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and not self._request_in_progress and not self._messages:
            # The first bytes of a request head: it must be complete within the timeout.
            self._header_timer = self._loop.call_later(self._header_timeout, self._on_header_timeout)
        super().data_received(data)
        if self._header_timer is not None and (self._messages or self._request_in_progress
                                               or self._upgraded):
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        log.info("request head not received within %gs: 408", self._header_timeout)
        self.transport.write(plain_error(408, "request head not received in time"))
        self.force_close()
        self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

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


class FrontDoor(web.Server):
    """``web.Server`` that builds :class:`FrontDoorHandler` protocols."""

    def __init__(self, handler: Any, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return FrontDoorHandler(self, loop=self._loop, header_timeout=self._header_timeout,
                                **self._kwargs)
