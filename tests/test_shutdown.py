"""Graceful shutdown: in-flight requests finish, keep-alive clients are told to close, nothing is lost."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import async_wait_until


async def test_shutdown_lets_in_flight_finish_with_connection_close(backend_ports: Any,
                                                                   balancer_factory: Any) -> None:
    """A request in flight at shutdown completes (200, Connection: close); new connections are refused."""
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(
        f"listen: {{host: 127.0.0.1, port: 0}}\npools: {{web: {{servers: [{{address: 127.0.0.1:{port}}}]}}}}\n")
    data_port = balancer.port
    reader, writer = await asyncio.open_connection("127.0.0.1", data_port)
    writer.write(b"GET /slow?ms=400 HTTP/1.1\r\nHost: h\r\n\r\n")
    await writer.drain()
    pool = balancer.connections.items()[0][1]
    await async_wait_until(lambda: pool.in_use, timeout=5, message="request in flight")
    shutdown = asyncio.create_task(balancer.shutdown())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
    assert await asyncio.wait_for(reader.read(), 5) == b"slow 400"
    writer.close()
    await asyncio.wait_for(shutdown, 10)
    try:
        _, w = await asyncio.open_connection("127.0.0.1", data_port)
    except OSError:
        pass
    else:
        w.close()
        raise AssertionError("listener still accepting after shutdown")


async def test_keepalive_client_under_load_loses_nothing(backend_ports: Any, balancer_factory: Any) -> None:
    """A client sending back-to-back keep-alive requests through shutdown sees no failed request:
    each request either completes or is never accepted (it stops when told to close)."""
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(
        f"listen: {{host: 127.0.0.1, port: 0}}\npools: {{web: {{servers: [{{address: 127.0.0.1:{port}}}]}}}}\n")
    completed = 0
    told_to_close = 0

    async def client() -> None:
        nonlocal completed, told_to_close
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            for _ in range(10000):
                writer.write(b"GET /slow?ms=5 HTTP/1.1\r\nHost: h\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                assert head.startswith(b"HTTP/1.1 200")
                completed += 1
                if b"Connection: close" in head:
                    told_to_close += 1
                    return
        finally:
            writer.close()

    clients = [asyncio.create_task(client()) for _ in range(8)]
    await async_wait_until(lambda: completed >= 50, timeout=10, message="traffic flowing")
    await balancer.shutdown()
    await asyncio.wait_for(asyncio.gather(*clients), 10)   # raises if any request failed
    assert told_to_close == 8 and completed > 50
