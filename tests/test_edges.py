"""Edge cases of the request path on raw sockets: smuggling through upgrades and stray response bytes,
invalid upstream statuses and oversized heads, the client/upstream/tunnel timeouts, shutdown with a
request stuck, clients that leave, pipelining after `Connection: close`, Host upstream, and retries
(connect refusals whatever the method; never a replay of a non-idempotent request that was sent).

Backends are scripted per connection with :mod:`tests.misbehave`; every test bounds its waits with
a deadline, so a rule that is broken fails with a message instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import async_wait_until, free_port
from tests.misbehave import Backend, Conn, Request, Script, ok_path, response, serve, silent

Factory = Callable[..., Awaitable[Any]]
StartBackend = Callable[..., Awaitable[Backend]]


def config(*ports: int, pool: str = "", top: str = "") -> str:
    """One pool `web` of external servers; ``pool`` lines are indented under it (4 spaces), ``top``
    lines are top-level. A short drain keeps teardown quick when a rule is broken and a request hangs."""
    servers = ", ".join(f"{{address: 127.0.0.1:{p}}}" for p in ports)
    return (f"listen: {{host: 127.0.0.1, port: 0}}\nshutdown: {{drain_timeout: 1s}}\n{top}\n"
            f"pools:\n  web:\n    servers: [{servers}]\n{pool}\n")


@pytest.fixture
async def backend() -> AsyncIterator[StartBackend]:
    started: list[Backend] = []

    async def start(script: Script | None = None) -> Backend:
        b = await Backend(script or serve()).start()
        started.append(b)
        return b

    yield start
    for b in started:
        await b.aclose()


class Response:
    __slots__ = ("body", "head", "status")

    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        self.status = int(head[9:12])
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def parse_responses(data: bytes, method: bytes = b"GET") -> tuple[list[Response], bytes]:
    """Every complete response framed in ``data`` (a close-delimited body takes the rest); and what
    is left over that is not a complete response."""
    out: list[Response] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end == -1 or not data.startswith(b"HTTP/1."):
            break
        head, rest = data[:end + 4], data[end + 4:]
        r = Response(head, b"")
        if method == b"HEAD" or r.status in (204, 304) or 100 <= r.status < 200:
            data = rest
        elif r.header(b"content-length") is not None:
            length = int(r.header(b"content-length") or b"0")
            if len(rest) < length:
                break
            r.body, data = rest[:length], rest[length:]
        elif (r.header(b"transfer-encoding") or b"").lower() == b"chunked":
            body = b""
            while True:
                line_end = rest.find(b"\r\n")
                if line_end == -1:
                    return out, data
                size = int(rest[:line_end].split(b";")[0], 16)
                body, rest = body + rest[line_end + 2:line_end + 2 + size], rest[line_end + 4 + size:]
                if size == 0:
                    break
            r.body, data = body, rest
        else:
            r.body, data = rest, b""
        out.append(r)
    return out, data


class Client:
    """One raw client connection to balancer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_head(self, timeout: float = 5.0) -> bytes:
        """A response head; an AssertionError if balancer closes the connection before one."""
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise AssertionError(f"connection closed with no response head (got {exc.partial[:200]!r})") from None

    async def read_response(self, timeout: float = 5.0) -> Response:
        """One response, by its framing (Content-Length, chunked, else to EOF)."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            r = Response(head, b"")
            if r.status in (204, 304) or 100 <= r.status < 200:
                return r
            length = r.header(b"content-length")
            if length is not None:
                r.body = await self.reader.readexactly(int(length))
            elif (r.header(b"transfer-encoding") or b"").lower() == b"chunked":
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    r.body += (await self.reader.readexactly(size + 2))[:-2]
                    if size == 0:
                        break
            else:
                r.body = await self.reader.read()
            return r

    async def read_to_eof(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    async def aclose(self) -> None:
        self.writer.transport.abort()       # never wait on a send buffer the peer does not read
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[Callable[[int], Awaitable[Client]]]:
    opened: list[Client] = []

    async def connect(port: int) -> Client:
        c = Client(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 21))
        opened.append(c)
        return c

    yield connect
    for c in opened:
        await c.aclose()


async def one_exchange(connect: Callable[[int], Awaitable[Client]], port: int, request: bytes,
                       timeout: float = 5.0) -> bytes:
    """Send ``request`` (which should carry `Connection: close`) on a new connection; all bytes back."""
    c = await connect(port)
    c.send(request)
    return await c.read_to_eof(timeout)


def get(path: bytes, extra: bytes = b"", close: bool = True) -> bytes:
    return (b"GET %s HTTP/1.1\r\nHost: h\r\n%s%s\r\n" % (path, extra, b"Connection: close\r\n" if close else b""))


def post(path: bytes, body: bytes = b"data", extra: bytes = b"", close: bool = True) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n%s%s\r\n%s"
            % (path, len(body), extra, b"Connection: close\r\n" if close else b"", body))


# --- 1. an Upgrade request's body is not a second request -----------------------------------------------

async def test_upgrade_request_body_is_never_a_second_request(balancer_factory: Factory, backend: StartBackend,
                                                              client: Any) -> None:
    """An Upgrade request's body is never parsed by the backend as a request (`/smuggled`); the next client is unharmed."""
    be = await backend(serve(ok_path))          # does not upgrade: 200 naming the path it parsed
    balancer = await balancer_factory(config(be.port))
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    attacker = await client(balancer.port)
    attacker.send(b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
    first = await attacker.read_response()
    victim = await one_exchange(client, balancer.port, get(b"/victim"))
    assert b"/smuggled" not in be.targets, f"the backend parsed the body as a request: {be.targets}"
    responses, rest = parse_responses(victim)
    assert [(r.status, r.body) for r in responses] == [(200, b"/victim")] and rest == b"", victim
    assert first.status in (200, 400), first.head
    if first.status == 200:
        assert first.body == b"/echo"
        (echo,) = (r for r in be.requests if r.target == b"/echo")
        assert smuggled in echo.body, f"the upgrade request reached the backend without its body: {echo.raw!r}"


# --- 2. bytes after a complete response ---------------------------------------------------------------

INJECTED = b"HTTP/1.1 200 OK\r\nX-Injected: 1\r\nContent-Length: 4\r\n\r\nEVIL"


@pytest.mark.parametrize(("reply", "expected"), [
    (response(200, b"hi") + INJECTED, (200, b"hi")),
    (response(200, b"hi") + b"HTTP/1.1 403 Forb", (200, b"hi")),
    (b"HTTP/1.1 204 No Content\r\n\r\n" + INJECTED, (204, b"")),
], ids=["full-response-after", "partial-head-after", "response-after-204"])
async def test_bytes_after_a_complete_response_go_nowhere(balancer_factory: Factory, backend: StartBackend,
                                                          client: Any, reply: bytes,
                                                          expected: tuple[int, bytes]) -> None:
    """Bytes after a complete response reach no client, and the upstream connection that sent them is not reused."""
    be = await backend(serve(lambda req: reply if req.target == b"/first" else ok_path(req)))
    balancer = await balancer_factory(config(be.port))
    c = await client(balancer.port)
    c.send(get(b"/first", close=False))
    first = await c.read_response()
    assert (first.status, first.body) == expected, first.head
    assert first.header(b"x-injected") is None
    c.send(get(b"/next"))
    rest = await c.read_to_eof()
    responses, leftover = parse_responses(rest)
    assert [(r.status, r.body) for r in responses] == [(200, b"/next")] and leftover == b"", rest
    assert b"X-Injected" not in rest and b"EVIL" not in rest and b"403" not in rest
    assert len(be.connections) == 2, "the connection that sent stray bytes was reused"
    assert [h.target for h in be.connections[0].heads] == [b"/first"]
    assert [h.target for h in be.connections[1].heads] == [b"/next"]


# --- 3. invalid upstream statuses and codings ---------------------------------------------------------

@pytest.mark.parametrize(("reply", "close"), [
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", False),
    (b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00compressed-ish", True),
], ids=["101-without-upgrade", "status-099", "status-600", "te-gzip-close-delimited"])
async def test_invalid_upstream_status_or_coding_gives_502(balancer_factory: Factory, backend: StartBackend,
                                                           client: Any, reply: bytes, close: bool) -> None:
    """An unsolicited 101, a status outside 100-599 or a non-chunked Transfer-Encoding upstream is a 502."""

    async def script(conn: Conn) -> None:
        if await conn.read_request() is None:
            return
        conn.write(reply)
        await conn.drain()
        if not close:
            await conn.until_eof()

    be = await backend(script)
    balancer = await balancer_factory(config(be.port))
    c = await client(balancer.port)
    c.send(get(b"/"))
    head = await c.read_head(timeout=3)
    assert head.startswith(b"HTTP/1.1 502 "), head


# --- 4. response head over limits.max_response_header -------------------------------------------------

BIG_HEAD = (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Fill-%03d: %s\r\n" % (i, b"v" * 1000) for i in range(100))
            + b"Content-Length: 2\r\n\r\nok")


@pytest.mark.parametrize("mode", ["100KiB-block", "endless-stream"])
async def test_response_head_over_limit_gives_502(balancer_factory: Factory, backend: StartBackend,
                                                  client: Any, mode: str) -> None:
    """A response head over limits.max_response_header (a block or endless) is a 502; the next request is served."""

    async def script(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.target != b"/big":
                conn.write(ok_path(request))
            elif mode == "100KiB-block":
                conn.write(BIG_HEAD)
            else:                              # ~800 KiB/s of header lines for at most 4 s
                conn.write(b"HTTP/1.1 200 OK\r\n")
                deadline = time.monotonic() + 4
                n = 0
                while time.monotonic() < deadline and not conn.writer.transport.is_closing():
                    conn.write(b"".join(b"X-Line-%08d: %s\r\n" % (n + i, b"v" * 100) for i in range(64)))
                    n += 64
                    await conn.drain()
                    await asyncio.sleep(0.01)
                return
            await conn.drain()

    be = await backend(script)
    balancer = await balancer_factory(config(be.port, pool="    timeouts: {response: 5s}",
                                             top="limits: {max_response_header: 8KiB}"))
    c = await client(balancer.port)
    c.send(get(b"/big"))
    try:
        head = await c.read_head(timeout=3)
    except TimeoutError:
        raise AssertionError("no response 3 s into an endless response head") from None
    assert head.startswith(b"HTTP/1.1 502 "), f"{len(head)} bytes of head: {head[:200]!r}"
    after = await one_exchange(client, balancer.port, get(b"/after"))
    responses, _ = parse_responses(after)
    assert [(r.status, r.body) for r in responses] == [(200, b"/after")], after[:200]


# --- 5. timeouts.client_body ---------------------------------------------------------------------------

@pytest.mark.parametrize("length", [100, 1 << 20], ids=["small-body", "streamed-body"])
async def test_stalled_request_body_gets_408(balancer_factory: Factory, backend: StartBackend, client: Any,
                                             length: int) -> None:
    """A request body stalled past timeouts.client_body gets 408 and a close; the upstream request is cancelled."""
    be = await backend(serve(ok_path))
    balancer = await balancer_factory(config(be.port, top="timeouts: {client_body: 300ms}"))
    c = await client(balancer.port)
    c.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % length + b"x" * 10)
    started = time.monotonic()
    try:
        head = await c.read_head(timeout=3)
    except TimeoutError:
        raise AssertionError("no response 3 s after the body stalled (timeouts.client_body: 300ms)") from None
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert time.monotonic() - started >= 0.25
    await c.read_to_eof(timeout=2)          # the 408's body, then EOF: the connection is closed
    assert be.requests == [], "the backend got a complete request"
    await async_wait_until(lambda: all(conn.peer_closed.is_set() for conn in be.connections), timeout=3,
                           message="balancer to close the upstream connection of the cancelled request")


# --- 6. pools.NAME.timeouts.send -----------------------------------------------------------------------

async def test_backend_not_reading_the_body_gives_504(balancer_factory: Factory, backend: StartBackend,
                                                      client: Any) -> None:
    """A backend that stops reading the body gives a 504 after the pool's timeouts.send, and its connection closes."""
    resume = asyncio.Event()

    async def script(conn: Conn) -> None:
        if await conn.read_head() is None:
            return
        await resume.wait()                  # not reading: the socket buffers fill up
        await conn.until_eof()

    be = await backend(script)
    balancer = await balancer_factory(config(be.port, pool="    timeouts: {send: 300ms}"))
    c = await client(balancer.port)
    size = 64 << 20
    c.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
    piece = b"u" * (1 << 20)

    async def upload() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(size // len(piece)):
                c.writer.write(piece)
                await c.writer.drain()       # blocks once balancer stops taking the body

    uploader = asyncio.create_task(upload())
    try:
        await async_wait_until(lambda: be.heads, timeout=5, message="request head at the backend")
        try:
            head = await c.read_head(timeout=5)
        except TimeoutError:
            raise AssertionError("no response 5 s into an upload the backend does not read "
                                 "(pools.web.timeouts.send: 300ms)") from None
        assert head.startswith(b"HTTP/1.1 504 "), head
    finally:
        uploader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await uploader
        resume.set()
    await async_wait_until(lambda: be.connections[0].peer_closed.is_set(), timeout=5,
                           message="balancer to close the stalled upstream connection")


# --- 7. timeouts.tunnel_idle ---------------------------------------------------------------------------

async def test_idle_tunnel_is_closed_both_ways(balancer_factory: Factory, backend: StartBackend,
                                               client: Any) -> None:
    """A tunnel with no byte either way for timeouts.tunnel_idle is closed on the client and the backend side."""

    async def script(conn: Conn) -> None:
        if await conn.read_head() is None:
            return
        conn.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while data := await conn.reader.read(1 << 16):      # echo
                conn.write(data)
        conn.peer_closed.set()

    be = await backend(script)
    balancer = await balancer_factory(config(be.port, top="timeouts: {tunnel_idle: 300ms}"))
    c = await client(balancer.port)
    c.send(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    head = await c.read_head()
    assert head.startswith(b"HTTP/1.1 101 "), head
    c.send(b"ping")
    async with asyncio.timeout(5):
        assert await c.reader.readexactly(4) == b"ping"     # the tunnel works
    try:
        tail = await c.read_to_eof(timeout=3)
    except TimeoutError:
        raise AssertionError("idle tunnel still open 3 s later (timeouts.tunnel_idle: 300ms)") from None
    assert tail == b""
    await async_wait_until(lambda: be.connections[0].peer_closed.is_set(), timeout=3,
                           message="the backend side of the idle tunnel to be closed")


async def test_tunnel_flood_towards_a_backend_that_does_not_read_is_held_back(
        balancer_factory: Factory, backend: StartBackend, client: Any) -> None:
    """A client flooding a tunnel whose backend reads nothing is held back by backpressure: balancer
    stops reading the client once the backend's buffers are full, so the client cannot push more than
    a few socket buffers' worth (it pushed 300 MB into balancer's memory before)."""
    stop = asyncio.Event()

    async def script(conn: Conn) -> None:
        if await conn.read_head() is None:
            return
        conn.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
        await stop.wait()                   # and never read another byte

    be = await backend(script)
    balancer = await balancer_factory(config(be.port))
    c = await client(balancer.port)
    c.send(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
    assert (await c.read_head()).startswith(b"HTTP/1.1 101 ")
    chunk = b"x" * (1 << 20)
    pushed = 0
    try:
        async with asyncio.timeout(1.5):
            while pushed < 300 * len(chunk):
                c.send(chunk)
                await c.writer.drain()
                pushed += len(chunk)
    except TimeoutError:
        pass
    finally:
        stop.set()
    # Loopback socket buffers (client send, balancer receive and send, backend receive) autotune to a
    # few MiB each; without backpressure the whole 300 MiB went through in under 1.5 s.
    assert pushed < 64 * len(chunk), f"{pushed >> 20} MiB accepted by a tunnel whose backend reads nothing"


# --- 8. a connection that sends nothing --------------------------------------------------------------

async def test_silent_new_connection_closed_after_client_header(balancer_factory: Factory,
                                                                 backend: StartBackend, client: Any) -> None:
    """A new connection that sends nothing is closed after timeouts.client_header (not client_idle)."""
    be = await backend()
    balancer = await balancer_factory(config(be.port, top="timeouts: {client_header: 300ms, client_idle: 60s}"))
    c = await client(balancer.port)
    started = time.monotonic()
    try:
        data = await c.read_to_eof(timeout=2.5)
    except TimeoutError:
        raise AssertionError("a connection that sent nothing was still open 2.5 s later "
                             "(timeouts.client_header: 300ms)") from None
    except ConnectionResetError:
        data = b""
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
    assert time.monotonic() - started < 2.5
    assert be.connections == []


# --- 9. SIGTERM with a request stuck on a backend ------------------------------------------------------

async def test_sigterm_with_a_stuck_request_exits_after_drain_timeout(balancer_process: Any,
                                                                      backend: StartBackend,
                                                                      client: Any) -> None:
    """SIGTERM with a request stuck upstream: exit within drain_timeout + 5 s; the client gets a response or EOF."""
    be = await backend(silent)
    proc = balancer_process("listen: {host: 127.0.0.1, port: 0}\nshutdown: {drain_timeout: 500ms}\n"
                            f"pools: {{web: {{servers: [{{address: 127.0.0.1:{be.port}}}]}}}}\n")

    def port() -> int | None:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", proc.log())
        return int(found.group(1)) if found else None

    data_port = await async_wait_until(port, timeout=20, message="balancer listening")
    c = await client(data_port)
    c.send(get(b"/stuck", close=False))
    await async_wait_until(lambda: be.heads, timeout=5, message="request at the backend")
    proc.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        await async_wait_until(lambda: proc.proc.poll() is not None, timeout=5.5, message="balancer exit")
    except AssertionError:
        raise AssertionError(f"balancer still running 5.5 s after SIGTERM; log:\n{proc.log()[-2000:]}") from None
    assert time.monotonic() - started < 5.5
    assert proc.proc.returncode == 0, proc.log()[-2000:]
    try:
        reply = await c.read_to_eof(timeout=2)
    except ConnectionResetError:
        raise AssertionError("client connection reset instead of a response or EOF") from None
    assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:200]


# --- 10. clients gone mid-request ---------------------------------------------------------------------

async def test_clients_gone_mid_request_free_the_backend(balancer_factory: Factory, backend: StartBackend,
                                                         client: Any) -> None:
    """Clients gone mid-request (one waiting, one uploading): in_flight in /stats returns to 0, upstream conns close."""
    be = await backend(silent)
    balancer = await balancer_factory(config(be.port, top="admin: {host: 127.0.0.1, port: 0}"))
    waiting = await client(balancer.port)
    waiting.send(get(b"/waiting", close=False))
    uploading = await client(balancer.port)
    uploading.send(b"POST /uploading HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (1 << 20)
                   + b"x" * (256 << 10))
    await async_wait_until(lambda: {b"/waiting", b"/uploading"} <= set(be.targets), timeout=5,
                           message="both requests at the backend")
    admin = f"http://127.0.0.1:{balancer.admin.bound_port}"

    async with aiohttp.ClientSession() as session:
        async def in_flight() -> int:
            async with session.get(admin + "/stats") as resp:
                assert resp.status == 200
                stats = await resp.json()
            return sum(b["in_flight"] for p in stats["pools"].values() for b in p["backends"])

        assert await in_flight() == 2
        for c in (waiting, uploading):
            c.writer.close()
        await async_wait_until(lambda: in_flight_zero(in_flight), timeout=5, message="in_flight back to 0")
    await async_wait_until(lambda: all(conn.peer_closed.is_set() for conn in be.connections), timeout=5,
                           message="upstream connections closed")
    assert len(be.connections) == 2


async def in_flight_zero(in_flight: Callable[[], Awaitable[int]]) -> bool:
    return await in_flight() == 0


# --- 11. Connection: close with more pipelined bytes ---------------------------------------------------

async def test_nothing_after_connection_close_is_served(balancer_factory: Factory, backend: StartBackend,
                                                        client: Any) -> None:
    """`Connection: close` with a request pipelined behind it: one response, then EOF; the backend never sees /b."""
    be = await backend(serve(ok_path))
    balancer = await balancer_factory(config(be.port))
    reply = await one_exchange(client, balancer.port, get(b"/a") + get(b"/b", close=False))
    responses, rest = parse_responses(reply)
    assert [(r.status, r.body) for r in responses] == [(200, b"/a")] and rest == b"", reply
    after = await one_exchange(client, balancer.port, get(b"/c"))
    assert parse_responses(after)[0][0].body == b"/c"
    assert be.targets == [b"/a", b"/c"]


# --- 12. Host upstream ---------------------------------------------------------------------------------

async def test_backend_always_gets_exactly_one_host(balancer_factory: Factory, backend: StartBackend,
                                                    client: Any) -> None:
    """The backend gets exactly one Host: added for HTTP/1.0 without one, kept despite `Connection: host`."""
    be = await backend(serve(ok_path))
    balancer = await balancer_factory(config(be.port))
    reply = await one_exchange(client, balancer.port, b"GET /v10 HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    c = await client(balancer.port)
    c.send(b"GET /conn-host HTTP/1.1\r\nHost: example.test\r\nConnection: host\r\n\r\n")
    assert (await c.read_response()).status == 200
    v10, named = be.heads
    problems = []
    if v10.count(b"host") != 1:
        problems.append(f"HTTP/1.0 without Host arrived with {v10.count(b'host')} Host fields: {v10.raw!r}")
    if named.count(b"host") != 1 or named.header(b"host") != b"example.test":
        problems.append(f"`Connection: host` changed the Host sent: {named.raw!r}")
    assert not problems, problems


# --- 13. connect refusals are retried whatever the method ---------------------------------------------

async def test_connect_refusal_is_retried_for_any_method(balancer_factory: Factory, backend: StartBackend,
                                                         client: Any) -> None:
    """A refused connect is retried on another backend whatever the method: 20 POSTs all get 200."""
    be = await backend(serve(ok_path))
    balancer = await balancer_factory(config(free_port(), be.port,
                                             pool="    balance: round_robin\n    passive: {enabled: false}"))
    statuses = []
    for i in range(20):
        reply = await one_exchange(client, balancer.port, post(b"/p%d" % i, b"body-%d" % i))
        statuses.append(int(reply[9:12]))
    assert statuses == [200] * 20
    assert len(be.requests) == 20


# --- 14. a sent non-idempotent request is never replayed ----------------------------------------------

async def test_sent_post_is_never_replayed(balancer_factory: Factory, backend: StartBackend,
                                           client: Any) -> None:
    """A POST the backend read whole is never sent again (fresh or reused connection): 502; keyed/GET retries bounded."""

    def respond(request: Request) -> bytes | None:
        return None if request.method == b"POST" or request.target == b"/close" else ok_path(request)

    be = await backend(serve(respond))
    balancer = await balancer_factory(config(be.port))
    reply = await one_exchange(client, balancer.port, post(b"/fresh"))
    assert reply.startswith(b"HTTP/1.1 502 "), reply[:100]
    assert [r.target for r in be.requests].count(b"/fresh") == 1
    # A kept-alive upstream connection first: the POST goes out on a reused connection.
    assert (await one_exchange(client, balancer.port, get(b"/warm"))).startswith(b"HTTP/1.1 200 ")
    reply = await one_exchange(client, balancer.port, post(b"/reused"))
    assert reply.startswith(b"HTTP/1.1 502 "), reply[:100]
    assert [r.target for r in be.requests].count(b"/reused") == 1, \
        "a POST the backend had received whole was sent again"

    # Idempotency-Key or GET: may be retried, within `retries` (2) + 1 tries.
    closing = [await backend(serve(lambda _: None)) for _ in range(2)]
    other = await balancer_factory(config(*(b.port for b in closing)))
    reply = await one_exchange(client, other.port, post(b"/keyed", extra=b"Idempotency-Key: k1\r\n"))
    assert reply.startswith(b"HTTP/1.1 502 "), reply[:100]
    assert 1 <= sum(len(b.requests) for b in closing) <= 3
    reply = await one_exchange(client, other.port, get(b"/close"))
    assert reply.startswith(b"HTTP/1.1 502 "), reply[:100]
    assert (await one_exchange(client, balancer.port, get(b"/still-up"))).startswith(b"HTTP/1.1 200 ")


# --- 15. the keep-alive race ---------------------------------------------------------------------------

async def test_backend_idle_close_race_loses_no_get(balancer_factory: Factory, backend: StartBackend,
                                                    client: Any) -> None:
    """Backend idle-closing at 1 s, clients pausing 0.9-1.1 s: no GET fails, at most one POST (the keep-alive race)."""
    failures = {b"GET": 0, b"POST": 0}
    done = 0
    idle_closes = 0

    async def run(seed: int) -> None:
        # One balancer and backend per client: each upstream connection idles as long as its client
        # pauses, so about half the requests meet a connection the backend closes at about that time.
        nonlocal done, idle_closes
        be = await backend(serve(ok_path, idle_close=1.0))
        balancer = await balancer_factory(config(be.port))
        rng = random.Random(seed)
        c = await client(balancer.port)
        for i in range(5):
            method = b"GET" if (i + seed) % 2 else b"POST"
            path = b"/%d-%d" % (seed, i)
            try:
                c.send(get(path, close=False) if method == b"GET" else post(path, close=False))
                r = await c.read_response(timeout=5)
                if (r.status, r.body) != (200, path):
                    raise ValueError(r.head)
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
                failures[method] += 1
                c = await client(balancer.port)
            done += 1
            if i < 4:
                await asyncio.sleep(rng.uniform(0.9, 1.1))
        idle_closes += be.idle_closes

    await asyncio.gather(*(run(seed) for seed in range(12)))
    assert done == 60
    assert idle_closes >= 10, "the backends hardly ever closed an idle connection: no race tested"
    assert failures[b"GET"] == 0 and failures[b"POST"] <= 1, failures


# --- found in review: bounds and reuse after partial work ------------------------------------------------

async def test_pipelining_client_that_reads_nothing_is_not_served_ahead(balancer_factory: Factory,
                                                                         backend: StartBackend,
                                                                         client: Any) -> None:
    """A client that pipelines 50 requests for 1 MiB (streamed) responses and reads none of them:
    balancer stops fetching responses once the client's socket buffer is full, so memory holds a few
    responses, not 50 (the whole-response path is held by tests/test_frontdoor.py)."""
    big = b"r" * (1 << 20)
    be = await backend(serve(lambda request: response(200, big)))
    balancer = await balancer_factory(config(be.port))
    c = await client(balancer.port)
    c.send(b"".join(get(b"/%d" % i, close=False) for i in range(50)))
    await async_wait_until(lambda: sum(len(conn.requests) for conn in be.connections) >= 2, timeout=5,
                           message="the first requests to reach the backend")
    served = -1
    for _ in range(50):                 # until the count stops growing (polled, bounded)
        now = sum(len(conn.requests) for conn in be.connections)
        if now == served:
            break
        served = now
        await asyncio.sleep(0.05)
    assert served < 20, f"{served} responses of 1 MiB fetched for a client that reads nothing"
    data = await c.reader.readexactly(1 << 16)      # the client starts reading: it is served
    assert data.startswith(b"HTTP/1.1 200 ")


async def test_connection_with_a_partly_sent_body_is_never_reused(balancer_factory: Factory,
                                                                  backend: StartBackend,
                                                                  client: Any) -> None:
    """A backend that answers 413 early and stops reading a streamed upload: the upstream connection
    carried only part of the body, so it is closed, never pooled; the next request goes on a new
    connection and is parsed as a request, not as the rest of the upload."""
    stop = asyncio.Event()

    async def script(conn: Conn) -> None:
        while True:
            request = await conn.read_head(timeout=5)
            if request is None:
                return
            if request.method == b"POST":
                conn.write(response(413, b"too big"))
                await conn.drain()
                await stop.wait()               # and read no more of the body
                return
            conn.write(response(200, request.target))
            await conn.drain()

    be = await backend(script)
    balancer = await balancer_factory(config(be.port, pool="    timeouts: {send: 300ms}"))
    c = await client(balancer.port)
    c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (64 << 20))
    with contextlib.suppress(ConnectionError, TimeoutError):
        for _ in range(64):
            c.send(b"u" * (1 << 20))
            await asyncio.wait_for(c.writer.drain(), 2)
    with contextlib.suppress(TimeoutError, ConnectionError):
        await c.read_to_eof(timeout=3)
    try:
        reply = await one_exchange(client, balancer.port, get(b"/after"))
    finally:
        stop.set()
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"/after"), reply[:200]
    assert len(be.connections) == 2, "the connection with a partly sent body was reused"


@pytest.mark.parametrize("name", ["pipelined-body-then-split-head", "tiny-chunks"])
async def test_size_limits_count_only_what_they_bound(balancer_factory: Factory, backend: StartBackend,
                                                      client: Any, name: str) -> None:
    """A head that begins after a 60 KB body in the same read, and a body of 8,000 16-byte chunks in
    one read, are not taken for an oversized head or oversized chunk framing."""
    be = await backend()
    balancer = await balancer_factory(config(be.port))
    c = await client(balancer.port)
    if name == "pipelined-body-then-split-head":
        c.send(post(b"/a", b"b" * 60000, close=False) + b"GET /b HTTP/1.1\r\nHost: h\r\n")
        first = await c.read_response()
        c.send(b"Connection: close\r\n\r\n")
        second = await c.read_response()
        assert (first.status, first.body, second.status, second.body) == (200, b"/a", 200, b"/b")
    else:
        chunks = b"".join(b"10\r\n%s\r\n" % (b"c" * 16) for _ in range(8000)) + b"0\r\n\r\n"
        c.send(b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + chunks)
        reply = await c.read_response()
        assert (reply.status, reply.body) == (200, b"/c")


async def test_endless_upstream_trailers_cut_the_response(balancer_factory: Factory, backend: StartBackend,
                                                          client: Any) -> None:
    """A chunked response whose trailer section never ends is cut (the status has gone), not buffered:
    the client sees the connection close without the last chunk."""
    async def script(conn: Conn) -> None:
        if await conn.read_request() is None:
            return
        conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-T: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(64):
                conn.write(b"t" * 65536)
                await conn.drain()
        await conn.until_eof()

    be = await backend(script)
    balancer = await balancer_factory(config(be.port, top="limits: {max_response_header: 16KiB}"))
    c = await client(balancer.port)
    c.send(get(b"/t"))
    data = await c.read_to_eof(timeout=5)
    assert data.startswith(b"HTTP/1.1 200 ") and not data.endswith(b"0\r\n\r\n"), data[-80:]


async def test_too_many_pipelined_requests_in_one_read_are_refused(balancer_factory: Factory,
                                                                   backend: StartBackend,
                                                                   client: Any) -> None:
    """Hundreds of tiny requests in one read are not all parsed ahead: past MAX_PIPELINED (128) the
    rest is refused with 400, after the earlier ones are answered in order."""
    be = await backend()
    balancer = await balancer_factory(config(be.port))
    c = await client(balancer.port)
    c.send(b"".join(get(b"/%d" % i, close=False) for i in range(400)))
    data = await c.read_to_eof(timeout=10)
    responses, _ = parse_responses(data)
    statuses = [r.status for r in responses]
    assert statuses[-1] == 400 and 100 <= statuses.count(200) <= 130, statuses[-3:]
    assert [r.body for r in responses if r.status == 200] == [b"/%d" % i for i in range(statuses.count(200))]
