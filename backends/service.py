"""The knobs' async shell: apply one request's `Plan` (see backends.knobs) around an endpoint.

Order for one request, in `run_with_knobs`:

1. knobs = the worker's defaults overridden by the query's knob parameters (a bad value: 400);
2. wait the drawn delay;
3. then exactly one of: reset the connection (no response at all); answer the injected error
   (`error_status`, the endpoint never runs); or run the endpoint (an unrouted path gets the service
   answer, `GET /`'s) with the drawn `status`, `headers`, `chunked` and `close` applied before the
   response head goes out.

`size` makes the service answer that many bytes of PATTERN; `drip` paces the bodies generated here
(`send_pattern`: that one, `/bytes`, `/stream-bytes`); other endpoints keep their own bodies.
`/_control/...` and `/ws` take no knobs; `/health` takes the query's but not the worker's defaults,
so a pool started slow or flaky still passes its health checks.

A worker without defaults skips all of this for a request without a query string (`Service.is_plain`,
checked in backends.app's middleware): the load-test hot path pays one substring test.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import socket
import struct
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from backends.knobs import NO_KNOBS, DelaySpec, KnobError, Knobs, Plan, decide, parse_knobs

CHUNK_SIZE = 64 * 1024
"""Generated bodies are written in pieces of at most this many bytes (memory stays bounded)."""
DRIP_CHUNK = 1024
"""With `drip`, a generated body goes out in chunks of this many bytes, a pause between two ..."""
KNOBS_REMEMBERED = 1024
"""How many distinct query strings `Service.knobs_for` keeps parsed."""
MAX_DRIP_PAUSES = 1000
"""... or in larger chunks when it would need more pauses than this (1 GiB: 1000 chunks of ~1 MiB)."""

# Generated bodies repeat PATTERN, so byte i is PATTERN[i % 64]: printable in a terminal, and a
# shifted, truncated or duplicated span is detectable by the client (unlike b"x" * n).
PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
_PATTERN_RUN = memoryview(PATTERN * (CHUNK_SIZE // len(PATTERN) + 1))  # any ≤ CHUNK_SIZE span, any phase

_PLAN: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("backends_plan", default=None)
"""The Plan of the request being handled, for the endpoints that write their own response head (set
around the endpoint's call only, so it never outlives its request). A context variable because
request storage needs `web.RequestKey` from aiohttp 3.14 on and a str key warns there."""

_CONTROL_PREFIX = "/_control/"
_WEBSOCKET_PATH = "/ws"
_HEALTH_PATH = "/health"


@dataclass(slots=True)
class Service:
    """The worker's knob settings: command-line `defaults`, `catch_all`, and the seams to fake."""

    defaults: Knobs = NO_KNOBS
    catch_all: bool = False
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    is_plain: bool = field(init=False)
    """No defaults and no catch-all: a request without a query string needs nothing from us."""

    _parsed: dict[tuple[str, bool], Knobs] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.is_plain = self.defaults is NO_KNOBS and not self.catch_all

    def knobs_for(self, query: str, *, with_defaults: bool = True) -> Knobs:
        """The knobs of a raw query string (`delay=20ms&x=1`) over the defaults (or over none),
        remembered per query string: a load test sends the same few again and again, and parsing one
        costs about as much as the rest of the request. Raises KnobError (never remembered)."""
        key = (query, with_defaults)
        knobs = self._parsed.get(key)
        if knobs is None:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
            knobs = parse_knobs(pairs, self.defaults if with_defaults else NO_KNOBS)
            if len(self._parsed) >= KNOBS_REMEMBERED:  # a crawl of distinct queries: start afresh
                self._parsed.clear()
            self._parsed[key] = knobs
        return knobs


SERVICE = web.AppKey("service", Service)


async def run_with_knobs(request: web.Request, handler: Handler, answer: Handler) -> web.StreamResponse:
    """Run `handler` under the request's knobs (see the module doc). `answer` is the service answer
    (`GET /`): it also answers unrouted paths when a knob or the catch-all asks, and when the knobs
    ask for a `size` its body becomes that many bytes of the pattern."""
    service = request.app[SERVICE]
    path = request.path
    if path.startswith(_CONTROL_PREFIX) or path == _WEBSOCKET_PATH:
        return await handler(request)
    with_defaults = path != _HEALTH_PATH
    query = request.raw_path.partition("?")[2]
    try:
        knobs = service.knobs_for(query, with_defaults=with_defaults) if query else None
    except KnobError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    if knobs is None:
        knobs = service.defaults if with_defaults else NO_KNOBS
    is_unrouted = isinstance(request.match_info.http_exception, web.HTTPNotFound)
    if knobs is NO_KNOBS:  # no knob in the request, none by default
        return await (answer if is_unrouted and service.catch_all else handler)(request)
    plan = decide(knobs, service.rng)
    if plan.delay_s > 0:
        await service.sleep(plan.delay_s)
    if plan.is_reset:
        reset_connection(request)
        # Nothing can be written any more; aiohttp drops this quietly (a ConnectionError on prepare).
        return web.Response()
    if plan.error_status is not None:
        response: web.StreamResponse = text_response(plan.error_status, f"error {plan.error_status}\n")
        apply_plan(request, response, plan)
        return response
    if is_unrouted or request.match_info.handler is answer:
        if knobs.size is not None:
            generated = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            return await send_pattern(request, generated, knobs.size, plan=plan)
        handler = answer
    token = _PLAN.set(plan)
    try:
        response = await handler(request)
    finally:
        _PLAN.reset(token)
    if not response.prepared:
        apply_plan(request, response, plan)
    return response


def apply_plan(request: web.BaseRequest, response: web.StreamResponse, plan: Plan) -> None:
    """Status, extra headers, chunked and close, on a response whose head is not written yet."""
    knobs = plan.knobs
    if plan.status is not None:
        response.set_status(plan.status)
    if knobs.close:
        response.force_close()
    if knobs.chunked and request.version >= (1, 1) and "Content-Length" not in response.headers:
        response.enable_chunked_encoding()
    replaced: set[str] = set()
    for name, value in knobs.headers:
        if name.lower() in replaced:
            response.headers.add(name, value)
        else:
            response.headers[name] = value
            replaced.add(name.lower())


def current_plan() -> Plan | None:
    """The Plan of the request being handled (None without knobs): for endpoints that prepare their
    own response and so must apply it themselves (`apply_plan`) before the head goes out."""
    return _PLAN.get()


def text_response(status: int, text: str) -> web.Response:
    if status in (204, 304):  # these must not carry a body
        return web.Response(status=status)
    return web.Response(status=status, text=text)


def reset_connection(request: web.BaseRequest) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0): the client sees a reset, not a FIN."""
    transport = request.transport
    if transport is None:  # already gone
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def pattern_span(offset: int, length: int) -> memoryview:
    """Bytes `offset` to `offset + length` of the endless PATTERN stream; `length` ≤ CHUNK_SIZE."""
    start = offset % len(PATTERN)
    return _PATTERN_RUN[start : start + length]


def drip_chunk_size(size: int) -> int:
    return max(DRIP_CHUNK, -(-size // MAX_DRIP_PAUSES))


async def send_pattern(
    request: web.Request,
    response: web.StreamResponse,
    size: int,
    *,
    chunk_size: int | None = None,
    drip: DelaySpec | None = None,
    plan: Plan | None = None,
) -> web.StreamResponse:
    """Send `size` bytes of PATTERN on `response` (not yet prepared), framed by Content-Length, or
    chunked when the plan or `chunk_size` asks for it (HTTP/1.1 only). `plan` defaults to the current
    request's. With `drip` (the plan's unless given), the body goes out in `drip_chunk_size(size)`
    chunks with a drawn pause between two; `chunk_size` alone sets the chunks of an unpaced chunked
    body."""
    plan = plan or current_plan()
    if plan is not None:
        apply_plan(request, response, plan)
        if drip is None:
            drip = plan.knobs.drip
    if chunk_size is not None and request.version >= (1, 1):
        response.enable_chunked_encoding()
    elif not response.chunked:
        response.content_length = size
    await response.prepare(request)
    if request.method != "HEAD" and response.status not in (204, 304):
        service = request.app[SERVICE]
        step = drip_chunk_size(size) if drip is not None else chunk_size or CHUNK_SIZE
        sent = 0
        while sent < size:
            end = min(sent + step, size)
            while sent < end:  # one chunk, in pieces of at most CHUNK_SIZE
                piece = pattern_span(sent, min(end - sent, CHUNK_SIZE))
                await response.write(piece)  # waits for the transport to drain: memory stays bounded
                sent += len(piece)
            if drip is not None and sent < size:
                await service.sleep(drip.draw(service.rng))
    await response.write_eof()
    return response
