"""HTTP correctness on raw bytes: what the client sent, what the backend received, what came back."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from backends.app import make_app
from tests.conftest import async_wait_until, free_port, raw_request
from tests.rawbackend import OK, RawBackend

Factory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[..., Awaitable[RawBackend]]]:
    started: list[RawBackend] = []

    async def start(respond: Callable[[bytes], bytes | None] = lambda _: OK) -> RawBackend:
        backend = await RawBackend(respond).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.aclose()


def config(*ports: int, extra: str = "", top: str = "") -> str:
    servers = ", ".join(f"{{address: 127.0.0.1:{p}}}" for p in ports)
    return f"listen: {{host: 127.0.0.1, port: 0}}\n{top}\npools:\n  web:\n    servers: [{servers}]\n{extra}\n"


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    return await raw_request(port, data, timeout)


async def through(balancer_factory: Factory, raw_backend: Any, request: bytes, **kw: Any
                  ) -> tuple[bytes, list[bytes]]:
    backend = await raw_backend(kw.pop("respond", lambda _: OK))
    balancer = await balancer_factory(config(backend.port, **kw))
    reply = await exchange(balancer.port, request)
    return reply, backend.received


# --- the request path ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    b"/a%7E/b/../c//d?x=%2F&y=", b"/a?", b"/%00%ff/%2e%2e/", b"/p;param?q=1#frag", b"*"])
async def test_request_target_is_forwarded_byte_for_byte(balancer_factory: Factory, raw_backend: Any,
                                                         target: bytes) -> None:
    """Percent-encoding, dot segments, // and empty queries reach the backend unchanged."""
    method = b"OPTIONS" if target == b"*" else b"GET"
    reply, received = await through(balancer_factory, raw_backend,
                                     method + b" " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert received[0].startswith(method + b" " + target + b" HTTP/1.1\r\n")


async def test_non_ascii_header_bytes_pass_both_ways(balancer_factory: Factory, raw_backend: Any) -> None:
    """Header values with non-ASCII octets are forwarded unchanged, request and response."""
    response = b"HTTP/1.1 200 OK\r\nX-Out: caf\xc3\xa9 \xff\r\nContent-Length: 0\r\n\r\n"
    reply, received = await through(balancer_factory, raw_backend,
                                    b"GET / HTTP/1.1\r\nHost: h\r\nX-In: caf\xc3\xa9 \xff\r\nConnection: close\r\n\r\n",
                                    respond=lambda _: response)
    assert b"\r\nX-In: caf\xc3\xa9 \xff\r\n" in received[0]
    assert b"\r\nX-Out: caf\xc3\xa9 \xff\r\n" in reply


async def test_hop_by_hop_fields_stripped_both_ways(balancer_factory: Factory, raw_backend: Any) -> None:
    """Connection, Keep-Alive, TE, Trailer, Proxy-*, Upgrade and fields named in Connection go."""
    response = (b"HTTP/1.1 200 OK\r\nConnection: X-Up-Secret\r\nX-Up-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
                b"Proxy-Authenticate: Basic\r\nX-Kept: yes\r\nContent-Length: 0\r\n\r\n")
    reply, received = await through(
        balancer_factory, raw_backend,
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nTE: trailers\r\n"
        b"Trailer: X\r\nKeep-Alive: 300\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: x\r\n"
        b"X-Kept: yes\r\n\r\n", respond=lambda _: response)
    sent = received[0].lower()
    for name in (b"x-secret", b"\r\nte:", b"trailer:", b"keep-alive", b"proxy-", b"\r\nconnection:"):
        assert name not in sent
    assert b"x-kept: yes" in sent
    head = reply.split(b"\r\n\r\n")[0].lower()
    for name in (b"x-up-secret", b"keep-alive", b"proxy-authenticate"):
        assert name not in head
    assert b"x-kept: yes" in head


async def test_forwarded_headers_replaced_unless_trusted(balancer_factory: Factory, raw_backend: Any) -> None:
    """X-Forwarded-* from an untrusted client are replaced; from a trusted proxy, extended."""
    request = (b"GET / HTTP/1.1\r\nHost: front\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
               b"X-Forwarded-Host: evil\r\nConnection: close\r\n\r\n")
    backend = await raw_backend()
    untrusted = await balancer_factory(config(backend.port))
    await exchange(untrusted.port, request)
    trusted = await balancer_factory(config(backend.port, top="trusted_proxies: [127.0.0.0/8]"))
    await exchange(trusted.port, request)
    first, second = backend.received
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in first and b"6.6.6.6" not in first
    assert b"X-Forwarded-Proto: http\r\n" in first and b"X-Forwarded-Host: front\r\n" in first
    assert b"X-Forwarded-For: 6.6.6.6, 127.0.0.1\r\n" in second
    assert b"X-Forwarded-Proto: https\r\n" in second and b"X-Forwarded-Host: evil\r\n" in second


async def test_request_id_kept_or_generated_and_returned(balancer_factory: Factory, raw_backend: Any) -> None:
    """A well-formed X-Request-ID is kept; a missing or malformed one is replaced; both come back."""
    backend = await raw_backend()
    balancer = await balancer_factory(config(backend.port))
    reply = await exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: abc-123\r\n"
                                          b"Connection: close\r\n\r\n")
    assert b"X-Request-ID: abc-123\r\n" in backend.received[0] and b"X-Request-ID: abc-123\r\n" in reply
    reply = await exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: a b\r\n"
                                          b"Connection: close\r\n\r\n")
    generated = backend.received[1].split(b"X-Request-ID: ")[1].split(b"\r\n")[0]
    assert generated and generated != b"a b" and b"X-Request-ID: " + generated in reply


async def test_absolute_form_target_becomes_origin_form(balancer_factory: Factory, raw_backend: Any) -> None:
    """`GET http://host/path` works: the backend gets `/path` with Host from the target."""
    reply, received = await through(balancer_factory, raw_backend,
                                    b"GET http://example.com:81/p?q=1 HTTP/1.1\r\nHost: other\r\n"
                                    b"Connection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert received[0].startswith(b"GET /p?q=1 HTTP/1.1\r\n")
    assert b"Host: example.com:81\r\n" in received[0] and b"other" not in received[0]


SMUGGLING = {
    "te-and-cl": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-cl": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "non-numeric-cl": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4x\r\n\r\nabcd",
    "signed-cl": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +4\r\n\r\nabcd",
    "te-not-chunked": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
    "te-chunked-not-final": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-coding-before-chunked": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-xchunked": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "invalid-chunk-size": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: h\r\nX-A : a\r\n\r\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: h\n\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
    "control-in-value": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x01b\r\n\r\n",
    "nul-in-name": b"GET / HTTP/1.1\r\nHost: h\r\nX\x00A: a\r\n\r\n",
    "http-0.9": b"GET /\r\n\r\n",
    "no-host-1.1": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "non-ascii-target": b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n",
}


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_malformed_framing_is_refused_before_the_backend(balancer_factory: Factory, raw_backend: Any,
                                                               name: str) -> None:
    """Each smuggling or malformed-request vector gets 400 and reaches no backend."""
    reply, received = await through(balancer_factory, raw_backend, SMUGGLING[name])
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    assert b"Connection: close" in reply
    assert received == []


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", b"505"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", b"414"),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", b"431"),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(5))
     + b"\r\n", b"431"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"v" * 40000 + b"\r\n\r\n", b"431"),
])
async def test_limits_answer_with_their_status_and_close(balancer_factory: Factory, raw_backend: Any,
                                                         request_bytes: bytes, status: bytes) -> None:
    """HTTP/2 in a request line 505, long request line 414, header count or size 431; closed."""
    reply, received = await through(balancer_factory, raw_backend, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:80]
    assert received == []


async def test_body_limit_gives_413(balancer_factory: Factory, raw_backend: Any) -> None:
    """A body over limits.max_body is refused with 413, by Content-Length or while streaming chunks."""
    backend = await raw_backend()
    balancer = await balancer_factory(config(backend.port, top="limits: {max_body: 1000}"))
    reply = await exchange(balancer.port, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n"
                           + b"x" * 1001)
    assert reply.startswith(b"HTTP/1.1 413")
    chunks = b"".join(b"%x\r\n%s\r\n" % (300, b"y" * 300) for _ in range(5)) + b"0\r\n\r\n"
    reply = await exchange(balancer.port, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + chunks)
    assert reply.startswith(b"HTTP/1.1 413")
    reply = await exchange(balancer.port, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n"
                           b"Connection: close\r\n\r\n" + b"x" * 1000)
    assert reply.startswith(b"HTTP/1.1 200")


async def test_slow_request_head_gets_408(balancer_factory: Factory, raw_backend: Any) -> None:
    """A request head trickling in past timeouts.client_header gets 408 and the connection closes."""
    backend = await raw_backend()
    balancer = await balancer_factory(config(backend.port, top="timeouts: {client_header: 300ms}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n")
    async with asyncio.timeout(5):
        reply = await reader.read()
    writer.close()
    assert reply.startswith(b"HTTP/1.1 408")
    assert backend.received == []


async def test_chunked_body_and_trailers_forwarded(balancer_factory: Factory, raw_backend: Any) -> None:
    """A chunked request body arrives whole (re-chunked); the backend sees valid chunked framing."""
    body = b"".join(b"%x\r\n%s\r\n" % (n, b"z" * n) for n in (70000, 1, 30000)) + b"0\r\n\r\n"
    reply, received = await through(balancer_factory, raw_backend,
                                    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                                    b"Connection: close\r\n\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 200")
    head, sent = received[0].split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    data, rest = b"", sent
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        data, rest = data + rest[:size], rest[size + 2:]
    assert data == b"z" * 100001


async def test_expect_100_continue_does_not_deadlock(balancer_factory: Factory, raw_backend: Any) -> None:
    """A client waiting for 100 Continue gets it, sends the body, and gets the final answer."""
    backend = await raw_backend()
    balancer = await balancer_factory(config(backend.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                 b"Connection: close\r\n\r\n")
    async with asyncio.timeout(5):
        interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        final = await reader.read()
    writer.close()
    assert final.startswith(b"HTTP/1.1 200")
    assert backend.received[0].endswith(b"\r\n\r\nhello") and b"expect" not in backend.received[0].lower()


@pytest.mark.parametrize(("response", "status"), [
    (b"HTTP/1.1 204 No Content\r\n\r\n", b"204"),
    (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", b"304"),
])
async def test_bodiless_statuses_carry_no_body(balancer_factory: Factory, raw_backend: Any,
                                               response: bytes, status: bytes) -> None:
    """204 and 304 come back with no body and the connection stays usable."""
    backend = await raw_backend(lambda _: response)
    balancer = await balancer_factory(config(backend.port))
    reply = await exchange(balancer.port, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n"
                                          b"Connection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 " + status) == 2
    assert b"Transfer-Encoding" not in reply and reply.endswith(b"\r\n\r\n")


async def test_head_keeps_content_length_without_body(balancer_factory: Factory, raw_backend: Any) -> None:
    """HEAD: the backend's Content-Length is passed, no body follows, keep-alive continues."""
    backend = await raw_backend(lambda data: b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
                                if data.startswith(b"HEAD") else OK)
    balancer = await balancer_factory(config(backend.port))
    reply = await exchange(balancer.port, b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n"
                                          b"Connection: close\r\n\r\n")
    first, second = reply.split(b"HTTP/1.1 200 OK")[1:]
    assert b"Content-Length: 1234\r\n" in first and first.endswith(b"\r\n\r\n")
    assert second.endswith(b"\r\n\r\nok")


async def test_pipelined_requests_answered_in_order(balancer_factory: Factory, raw_backend: Any) -> None:
    """Three pipelined requests come back in the order sent."""
    backend = await raw_backend(lambda data: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
                                + data.split(b" ")[1][1:3])
    balancer = await balancer_factory(config(backend.port))
    reply = await exchange(balancer.port, b"GET /p1 HTTP/1.1\r\nHost: h\r\n\r\nGET /p2 HTTP/1.1\r\nHost: h\r\n"
                                          b"\r\nGET /p3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    bodies = [part.split(b"\r\n\r\n")[1][:2] for part in reply.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"p1", b"p2", b"p3"]


async def test_interim_103_is_absorbed(balancer_factory: Factory, raw_backend: Any) -> None:
    """An upstream 103 Early Hints is not taken for the final response."""
    reply, _ = await through(balancer_factory, raw_backend, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                             respond=lambda _: b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok")


@pytest.mark.parametrize("response", [
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x2\r\n\r\nok",
])
async def test_invalid_upstream_response_gives_502(balancer_factory: Factory, raw_backend: Any,
                                                   response: bytes) -> None:
    """Non-HTTP replies and bad upstream framing become 502, never passed through."""
    reply, _ = await through(balancer_factory, raw_backend, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n", respond=lambda _: response)
    assert reply.startswith(b"HTTP/1.1 502"), reply[:60]


async def test_response_timeout_gives_504_and_balancer_keeps_serving(balancer_factory: Factory,
                                                                      raw_backend: Any) -> None:
    """No response head within timeouts.response: 504 (POST is not retried)."""
    silent = await raw_backend(lambda _: b"")
    balancer = await balancer_factory(config(silent.port, extra="    timeouts: {response: 300ms}"))
    reply = await exchange(balancer.port, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n"
                                          b"Connection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 504") and b"response_timeout" in reply
    assert len(silent.received) == 1


async def test_idempotent_request_retried_on_another_backend(balancer_factory: Factory,
                                                             raw_backend: Any) -> None:
    """GET after a refused connect or an empty reply is retried on a different backend; POST is not."""
    dead = await raw_backend(lambda _: None)      # accepts, reads, closes without answering
    good = await raw_backend()
    balancer = await balancer_factory(config(dead.port, good.port))
    for _ in range(4):
        reply = await exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
    statuses = []
    for _ in range(2):
        reply = await exchange(balancer.port, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n"
                                              b"Connection: close\r\n\r\n")
        statuses.append(reply[9:12])
    assert b"502" in statuses
    reply = await exchange(balancer.port, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n"
                                          b"Idempotency-Key: k1\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")


async def test_websocket_round_trip(balancer_factory: Factory) -> None:
    """A WebSocket upgrade is proxied: 101 back, then frames both ways until close."""
    runner = web.AppRunner(make_app("ws1", 0), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        balancer = await balancer_factory(config(runner.addresses[0][1]))
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{balancer.port}/ws") as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=5)).data == "hello"
                await ws.send_bytes(b"\x00\x01" * 5000)
                assert (await ws.receive(timeout=5)).data == b"\x00\x01" * 5000
        pool = balancer.connections.items()[0][1]
        await async_wait_until(lambda: pool.in_use == 0, timeout=5, message="tunnel released")
    finally:
        await runner.cleanup()


async def test_h2c_upgrade_is_not_tunnelled(balancer_factory: Factory, raw_backend: Any) -> None:
    """`Upgrade: h2c` is stripped: the backend gets a plain HTTP/1.1 request."""
    reply, received = await through(balancer_factory, raw_backend,
                                    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                                    b"Upgrade: h2c\r\nHTTP2-Settings: AAA\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert b"upgrade" not in received[0].lower() and b"http2-settings" not in received[0].lower()


async def test_thousand_concurrent_connections_served(balancer_factory: Factory, raw_backend: Any) -> None:
    """1000 client connections at once all get their answer."""
    backend = await raw_backend()
    balancer = await balancer_factory(config(backend.port))

    async def one() -> bytes:
        with contextlib.suppress(OSError):
            return await exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                                  timeout=30)
        return b""

    replies = await asyncio.gather(*(one() for _ in range(1000)))
    assert sum(r.startswith(b"HTTP/1.1 200") for r in replies) == 1000


async def test_refused_port_gives_502_with_no_retry_target(balancer_factory: Factory) -> None:
    """Connection refused and nowhere else to go: 502 connect_error."""
    balancer = await balancer_factory(config(free_port()))
    reply = await exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 502") and b"connect_error" in reply


async def test_client_gone_while_waiting_frees_upstream_connection(balancer_factory: Factory,
                                                                   raw_backend: Any) -> None:
    """A client that disconnects while the backend thinks cancels the upstream request at once."""
    silent = await raw_backend(lambda _: b"")
    balancer = await balancer_factory(config(silent.port))
    _reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await async_wait_until(lambda: silent.received, timeout=5, message="request at the backend")
    pool = balancer.connections.items()[0][1]
    assert pool.in_use == 1
    writer.close()
    await async_wait_until(lambda: pool.in_use == 0, timeout=5, message="upstream connection freed")
    assert pool.idle == 0


def test_retry_budget_caps_extra_load() -> None:
    """Retries beyond ~20% of requests (after a small floor) are refused."""
    from balancer.dataplane.proxy import RetryBudget
    budget = RetryBudget(ratio=0.2, floor=2)
    for _ in range(100):
        budget.on_request()
    granted = sum(budget.take() for _ in range(100))
    assert granted == 22


async def test_max_connections_refuses_cleanly(balancer_factory: Factory, raw_backend: Any) -> None:
    """Over limits.max_connections a new client gets 503 + Retry-After and a close; others are served."""
    backend = await raw_backend()
    balancer = await balancer_factory(config(backend.port, top="limits: {max_connections: 2}"))
    held = [await asyncio.open_connection("127.0.0.1", balancer.port) for _ in range(2)]
    await async_wait_until(lambda: len(balancer.front_door.connections) == 2, timeout=5,
                           message="two connections registered")
    reply = await exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in reply
    reader, writer = held[0]
    writer.write(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
    for _, w in held:
        w.close()


async def test_max_connections_holds_for_a_burst(balancer_factory: Factory, raw_backend: Any) -> None:
    """30 clients connecting at once (accepted in one batch) against max_connections 5: 5 admitted."""
    backend = await raw_backend()
    balancer = await balancer_factory(config(backend.port, top="limits: {max_connections: 5}"))
    # The kernel completes these handshakes before the loop runs again: all 30 wait to be accepted.
    clients = [socket.create_connection(("127.0.0.1", balancer.port)) for _ in range(30)]
    try:
        server = balancer.front_door
        await async_wait_until(lambda: server.refused_connections == 25, timeout=5, message="25 refused")
        await async_wait_until(lambda: len(server.connections) == 5, timeout=5, message="5 admitted")
    finally:
        for c in clients:
            c.close()


async def test_small_chunked_response_is_framed_correctly(balancer_factory: Factory, raw_backend: Any) -> None:
    """A chunked upstream response that arrives whole is re-framed with its Content-Length."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    reply, _ = await through(balancer_factory, raw_backend, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                             respond=lambda _: chunked)
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"Content-Length: 11" in head and b"Transfer-Encoding" not in head
    assert body == b"hello world"


async def test_response_trailers_are_forwarded(balancer_factory: Factory, raw_backend: Any) -> None:
    """Trailer fields after a chunked upstream body reach an HTTP/1.1 client after the last chunk."""
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
    reply, _ = await through(balancer_factory, raw_backend, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                             respond=lambda _: response)
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"


def test_failure_log_is_throttled(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of the same failure logs one line a second per kind, with the count left out."""
    import logging

    from balancer.dataplane.throttledlog import ThrottledLog
    now = [100.0]
    throttled = ThrottledLog(logging.getLogger("balancer.dataplane.proxy"), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="balancer.dataplane.proxy"):
        for _ in range(50):
            throttled.log("no_backend", "503 %s", "x")
        throttled.log("connect_error", "502 %s", "y")
        now[0] += 1.5
        throttled.log("no_backend", "503 %s", "x")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["503 x", "502 y", "503 x (and 49 more like it in the last second)"]


async def test_request_trailers_are_dropped_and_never_reach_another_request(balancer_factory: Factory,
                                                                            raw_backend: Any) -> None:
    """Trailer fields after a chunked request body are not forwarded, and never become header fields
    of the next request on the connection (or of another client's)."""
    backend = await raw_backend()
    balancer = await balancer_factory(config(backend.port))
    reply = await exchange(balancer.port,
                           b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
                           b"GET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200") == 2
    reply = await exchange(balancer.port, b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert len(backend.received) == 3
    assert not any(b"x-trailer" in r.lower() for r in backend.received), backend.received


async def test_endless_request_trailers_are_bounded(balancer_factory: Factory, raw_backend: Any) -> None:
    """A trailer section larger than limits.max_header_size is refused, not buffered: the client gets
    an error status, and balancer serves the next client."""
    backend = await raw_backend()
    balancer = await balancer_factory(config(backend.port, top="limits: {max_header_size: 4096}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    try:
        writer.write(b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
                     b"X-Trailer: ")
        # 2 MiB of one trailer line: more than one read's worth (the bound is the limit plus a read).
        with contextlib.suppress(ConnectionError):
            for _ in range(32):
                writer.write(b"t" * 65536)
                await writer.drain()
        async with asyncio.timeout(5):
            reply = await reader.read(65536)
    finally:
        writer.close()
    assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), reply[:80]
    reply = await exchange(balancer.port, b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
