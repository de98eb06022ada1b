"""The worker's HTTP application: the endpoints balancer's tests and benchmarks talk to.

Every endpoint is deterministic and cheap so that, behind the proxy, any difference a test sees is
the proxy's doing. Two properties matter more than the rest:

- `/echo` reports the request exactly as it arrived (target, header order, body digest), so a test can
  check what the proxy forwarded byte for byte;
- nothing buffers a whole body (`/echo` hashes as it reads, `/bytes` writes in fixed chunks), so
  1 GiB transfers cost a few KiB of memory here and any blow-up is the proxy's. (httpbin's reports,
  `/anything` and `/delay`, read bodies of at most 1 MiB: aiohttp's client_max_size, 413 above.)

Misbehaviour for health-check and timeout tests is switched on over HTTP (`/_control/...`) and held in
one `Control` object per application. Misbehaviour for load tests (slow, flaky, big, dribbling
responses) is asked for per request by query parameters or per worker by its command line: the
knobs (`backends.knobs` parses them, `backends.service` applies them); `backends.httpbin` adds
httpbin's endpoints.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from backends import httpbin
from backends.knobs import KnobError, parse_size, parse_statuses
from backends.service import PATTERN as PATTERN
from backends.service import SERVICE, Service, run_with_knobs, send_pattern, text_response

ECHO_BODY_LIMIT = 64 * 1024
"""`/echo` returns the body text only below this many bytes; above, the length and digest suffice."""

_TEXT_HEADERS = CIMultiDict({"Content-Type": "text/plain; charset=utf-8"})

WS_CLOSE_TIMEOUT_S = 1.0
"""How long a WebSocket close waits for the peer's close frame (aiohttp's default is 10 s)."""


@dataclass(slots=True)
class Control:
    """Test-controlled misbehaviour; changed only through the `/_control/...` endpoints.

    `health_status` is what `/health` answers with. While `is_hanging`, every request except
    `/_control/...` waits on `never`, which nothing sets: the socket stays open and accepted, but no
    response ever comes (the "wedged process" a health check must eject).
    """

    health_status: int = 200
    is_hanging: bool = False
    never: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        self.health_status = 200
        self.is_hanging = False


@dataclass(frozen=True, slots=True)
class Identity:
    worker_id: str
    port: int
    root_body: bytes = field(init=False, repr=False)
    """What `GET /` answers, encoded once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root_body", f"worker {self.worker_id} port {self.port}\n".encode())


IDENTITY = web.AppKey("identity", Identity)
CONTROL = web.AppKey("control", Control)
# Open WebSockets, so a stop can close them; weak so a finished handler never leaks its socket.
WEBSOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")


def make_app(worker_id: str, port: int, service: Service | None = None) -> web.Application:
    """Build the worker application; `port` is only reported (by `GET /`), never bound here.

    `service` holds the worker's default knobs and catch-all setting (none by default: a path that is
    not routed is a 404 unless the request carries a knob).
    """
    app = web.Application(middlewares=[service_middleware])
    app[IDENTITY] = Identity(worker_id, port)
    app[CONTROL] = Control()
    app[SERVICE] = service or Service()
    app[WEBSOCKETS] = weakref.WeakSet()
    app.on_response_prepare.append(add_backend_header)
    app.on_shutdown.append(close_websockets)
    app.router.add_route("*", "/", handle_root)
    app.router.add_get("/health", handle_health)
    app.router.add_put("/_control/health/{code:\\d{3}}", handle_control_health)
    app.router.add_put("/_control/hang", handle_control_hang)
    app.router.add_put("/_control/reset", handle_control_reset)
    app.router.add_route("*", "/echo", handle_echo)
    app.router.add_route("*", "/echo/{tail:.*}", handle_echo)
    app.router.add_get("/slow", handle_slow)
    app.router.add_route("*", "/status/{codes}", handle_status)
    app.router.add_get("/bytes/{n}", handle_bytes)
    app.router.add_get("/ws", handle_ws)
    httpbin.add_routes(app.router)
    return app


async def add_backend_header(request: web.Request, response: web.StreamResponse) -> None:
    # A signal rather than a middleware so 404/405 and handler errors carry the header too. Only
    # responses aiohttp writes before routing (400 for an unparsable request) go out without it.
    response.headers["X-Backend"] = request.app[IDENTITY].worker_id


@web.middleware
async def service_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    control = app[CONTROL]
    # /_control stays responsive, or a test could never undo the hang.
    if control.is_hanging and not request.path.startswith("/_control/"):
        await control.never.wait()
    if app[SERVICE].is_plain and "?" not in request.raw_path:
        return await handler(request)  # the hot path: no knob can apply
    return await run_with_knobs(request, handler, handle_root)


async def handle_root(request: web.Request) -> web.Response:
    """Which worker answered: `GET /` (any method), and any unrouted path when a knob or --catch-all
    asks (with a `size` knob, backends.service sends that many bytes instead). The hot path of a load
    test: the body is encoded once, the headers copied from a constant."""
    return web.Response(body=request.app[IDENTITY].root_body, headers=_TEXT_HEADERS)


async def handle_health(request: web.Request) -> web.Response:
    status = request.app[CONTROL].health_status
    return web.Response(status=status, text="ok" if status == 200 else f"health {status}")


async def handle_control_health(request: web.Request) -> web.Response:
    code = _status_from(request)
    request.app[CONTROL].health_status = code
    return web.Response(text=f"health {code}\n")


async def handle_control_hang(request: web.Request) -> web.Response:
    request.app[CONTROL].is_hanging = True
    return web.Response(text="hanging\n")


async def handle_control_reset(request: web.Request) -> web.Response:
    request.app[CONTROL].reset()
    return web.Response(text="reset\n")


async def handle_echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    head = bytearray()  # kept only while the body is still under ECHO_BODY_LIMIT
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
        if length < ECHO_BODY_LIMIT:
            head += chunk
        elif head:
            head = bytearray()
    report: dict[str, Any] = {
        "worker": request.app[IDENTITY].worker_id,
        "method": request.method,
        # raw_path is the request target exactly as the parser saw it. request.path and
        # request.rel_url come from yarl, which decodes %7E and resolves "..": useless for checking
        # that a proxy forwarded the target unchanged.
        "raw_path": request.raw_path,
        "version": f"{request.version.major}.{request.version.minor}",
        "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in request.raw_headers],
        "body_length": length,
        "body_sha256": digest.hexdigest(),
        "body": head.decode("utf-8", errors="replace") if length < ECHO_BODY_LIMIT else None,
    }
    return web.json_response(report)


async def handle_slow(request: web.Request) -> web.Response:
    try:
        ms = int(request.query.get("ms", "0"))
    except ValueError:
        ms = -1
    if ms < 0:
        raise web.HTTPBadRequest(text="ms must be a non-negative integer\n")
    await asyncio.sleep(ms / 1000)
    return web.Response(text=f"slow {ms}")


async def handle_status(request: web.Request) -> web.Response:
    """`/status/503`, or httpbin's weighted pick `/status/200:0.9,503:0.1` (weights default to 1)."""
    try:
        choice = parse_statuses(request.match_info["codes"])
    except KnobError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    code = choice.draw(request.app[SERVICE].rng)
    return text_response(code, f"status {code}\n")


async def handle_bytes(request: web.Request) -> web.StreamResponse:
    """`n` bytes of the pattern (`/bytes/1048576`, `/bytes/1MiB`), streamed; Content-Length unless the
    `chunked` knob asks (HTTP/1.1 only: an HTTP/1.0 client gets Content-Length whatever it asked for)."""
    try:
        n = parse_size(request.match_info["n"], "n")
    except KnobError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    return await send_pattern(request, response, n)


async def handle_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(timeout=WS_CLOSE_TIMEOUT_S)
    await ws.prepare(request)
    sockets = request.app[WEBSOCKETS]
    sockets.add(ws)
    try:
        async for message in ws:  # ping/pong and close frames are answered by aiohttp itself
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
    finally:
        sockets.discard(ws)
    return ws


async def close_websockets(app: web.Application) -> None:
    # An open WebSocket is an in-flight request that never finishes on its own; without this the
    # graceful stop would always run to its deadline and then cut the connection without a close frame.
    sockets = app[WEBSOCKETS]
    await asyncio.gather(
        *[ws.close(code=WSCloseCode.GOING_AWAY, message=b"worker stopping") for ws in list(sockets)]
    )


def _status_from(request: web.Request) -> int:
    code = int(request.match_info["code"])
    # 1xx are not final responses: aiohttp would send a head and leave the client waiting.
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text=f"status must be 200-599, got {code}\n")
    return code
