"""The proxy end to end in one process: balancer in front of in-process worker apps."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tests.conftest import async_wait_until, free_port, raw_request


def servers_config(ports: list[int], extra: str = "") -> str:
    servers = "\n".join(f"      - {{address: 127.0.0.1:{p}}}" for p in ports)
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
pools:
  web:
    servers:
{servers}
{extra}
"""


async def test_round_robin_spreads_100_requests_evenly(backend_ports: Any, balancer_factory: Any) -> None:
    """100 sequential requests over 4 backends land 25 on each."""
    ports = await backend_ports(4)
    balancer = await balancer_factory(servers_config(ports))
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                assert resp.status == 200
                seen[resp.headers["X-Backend"]] += 1
                await resp.read()
    assert seen == {"b1": 25, "b2": 25, "b3": 25, "b4": 25}


async def test_upstream_connections_are_reused(backend_ports: Any, balancer_factory: Any) -> None:
    """Sequential requests reuse one keep-alive connection per backend instead of opening new ones."""
    ports = await backend_ports(2)
    balancer = await balancer_factory(servers_config(ports))
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                await resp.read()
    created = sum(p.stats.created for _, p in balancer.connections.items())
    reused = sum(p.stats.reused for _, p in balancer.connections.items())
    assert created == 2
    assert reused == 48


async def test_one_mib_post_body_arrives_intact(backend_ports: Any, balancer_factory: Any) -> None:
    """A 1 MiB request body reaches the backend byte for byte (length and hash)."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(servers_config(ports))
    body = bytes(range(256)) * 4096
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{balancer.port}/echo", data=body) as resp:
            assert resp.status == 200
            echo = await resp.json()
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_chunked_upload_is_streamed(backend_ports: Any, balancer_factory: Any) -> None:
    """A chunked request body of unknown length is forwarded chunked and arrives whole."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(servers_config(ports))
    parts = [b"a" * 70000, b"b" * 5, b"c" * 100000]

    async def gen() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{balancer.port}/echo", data=gen()) as resp:
            echo = await resp.json()
    whole = b"".join(parts)
    assert echo["body_length"] == len(whole)
    assert echo["body_sha256"] == hashlib.sha256(whole).hexdigest()


async def test_one_mib_response_arrives_intact(backend_ports: Any, balancer_factory: Any) -> None:
    """A 1 MiB streamed response comes back complete, with its Content-Length."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(servers_config(ports))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{balancer.port}/bytes/1048576") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == "1048576"
            data = await resp.read()
        async with session.get(f"http://127.0.0.1:{balancer.port}/bytes/300000?chunked=1") as resp:
            assert "Content-Length" not in resp.headers
            chunked = await resp.read()
    assert len(data) == 1048576
    assert len(chunked) == 300000


async def test_path_and_query_pass_through_exactly(backend_ports: Any, balancer_factory: Any) -> None:
    """The request target reaches the backend byte for byte: no re-quoting, no dot-segment removal."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(servers_config(ports))
    target = b"/echo/%7E/a/../b//c?x=1&y=%2F&"
    reply = await raw_request(balancer.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert b'"raw_path": "' + target + b'"' in reply


async def test_hop_by_hop_stripped_and_forwarded_for_set(backend_ports: Any,
                                                          balancer_factory: Any) -> None:
    """Hop-by-hop fields and those named in Connection are removed; X-Forwarded-* are set."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(servers_config(ports))
    reply = await raw_request(balancer.port, b"GET /echo HTTP/1.1\r\nHost: front.example\r\n"
                              b"Connection: close, X-Secret\r\nX-Secret: 1\r\nTE: trailers\r\n"
                              b"X-Forwarded-For: 6.6.6.6\r\nKeep-Alive: timeout=5\r\n\r\n")
    body = reply.split(b"\r\n\r\n", 1)[1].lower()
    for name in (b"x-secret", b"\"te\"", b"keep-alive", b"6.6.6.6"):
        assert name not in body
    assert b'["x-forwarded-for", "127.0.0.1"]' in body
    assert b'["x-forwarded-host", "front.example"]' in body
    assert b'["x-forwarded-proto", "http"]' in body


async def test_refused_backend_gives_502(balancer_factory: Any) -> None:
    """A backend that refuses connections gives 502, and the balancer keeps serving."""
    balancer = await balancer_factory(servers_config([free_port()]))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(f"http://127.0.0.1:{balancer.port}/x") as resp:
                assert resp.status == 502
                assert resp.headers["X-Balancer-Error"] == "connect_error"


async def test_no_ready_backend_gives_503(backend_ports: Any, balancer_factory: Any) -> None:
    """With every backend out of rotation the answer is 503 with Retry-After."""
    ports = await backend_ports(2)
    balancer = await balancer_factory(servers_config(ports))
    for backend in list(balancer.registry.backends()):
        balancer.registry.set_healthy(backend, False, "test")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"


async def test_client_disconnect_mid_response_frees_connection(backend_ports: Any,
                                                                balancer_factory: Any) -> None:
    """A client that goes away mid-body leaves no leased upstream connection behind."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(servers_config(ports))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"GET /bytes/50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readexactly(100000)
    writer.close()
    pool = next(p for _, p in balancer.connections.items())
    await async_wait_until(lambda: pool.in_use == 0, timeout=10, message="in_use back to 0")
    assert pool.idle == 0       # the half-read connection was closed, not pooled
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
            assert resp.status == 200


async def test_head_response_has_no_body(backend_ports: Any, balancer_factory: Any) -> None:
    """HEAD is answered with the GET's headers and no body, and the connection stays usable."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(servers_config(ports))
    async with aiohttp.ClientSession() as session:
        async with session.head(f"http://127.0.0.1:{balancer.port}/bytes/1000") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == "1000"
            assert await resp.read() == b""
        async with session.get(f"http://127.0.0.1:{balancer.port}/bytes/10") as resp:
            assert await resp.read() == b"x" * 10 or len(await resp.read()) == 10
