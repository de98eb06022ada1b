"""The upstream pool: decision steps with a fake clock and connections, then real loopback traffic."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer.dataplane.connections import BackendConnections, ConnectionLimits
from balancer.dataplane.upstream import ConnState, ResponseHead, UpstreamConnection
from balancer.errors import PoolTimeout, UpstreamConnectError
from tests.conftest import async_wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(clock: FakeClock, **limits: Any) -> tuple[BackendConnections, list[UpstreamConnection]]:
    opened: list[UpstreamConnection] = []

    async def connect(host: str, port: int, timeout: float, max_head: int = 65536) -> UpstreamConnection:
        conn = UpstreamConnection(f"{host}:{port}", clock=clock)
        opened.append(conn)
        return conn

    return BackendConnections("127.0.0.1", 9, ConnectionLimits(**limits), connect=connect, clock=clock), opened


def finish(conn: UpstreamConnection, keep_alive: bool = True) -> UpstreamConnection:
    """Pretend the response on ``conn`` was read completely."""
    head = ResponseHead()
    head.status = 200
    head.keep_alive = keep_alive
    conn._head = head
    conn._complete = True
    conn.end_request()              # the request went out whole
    return conn


async def test_released_connection_is_reused_most_recent_first() -> None:
    """Idle connections are a stack: the last one released is the next one leased."""
    clock = FakeClock()
    pool, _opened = make_pool(clock)
    a, b = await pool.acquire(), await pool.acquire()
    pool.release(finish(a))
    pool.release(finish(b))
    assert await pool.acquire() is b
    assert pool.stats.created == 2 and pool.stats.reused == 1
    assert "in_use=1 idle=1" in repr(pool)


async def test_dirty_connection_is_closed_not_pooled() -> None:
    """A connection whose response was not read to the end is closed and its slot freed."""
    pool, _ = make_pool(FakeClock())
    conn = await pool.acquire()
    pool.release(conn)                      # response incomplete
    assert conn.state is ConnState.CLOSED
    assert pool.idle == 0 and pool.in_use == 0
    assert pool.stats.closed["error"] == 1


async def test_backend_connection_close_is_obeyed() -> None:
    """A response with Connection: close ends the connection's life."""
    pool, _ = make_pool(FakeClock())
    conn = await pool.acquire()
    pool.release(finish(conn, keep_alive=False))
    assert conn.is_closed and pool.idle == 0


async def test_idle_timeout_lifetime_and_max_requests_expire_connections() -> None:
    """Expired idle connections are discarded on acquire, each counted under its reason."""
    clock = FakeClock()
    pool, _opened = make_pool(clock, idle_timeout_s=5, max_lifetime_s=100, max_requests=3)
    conn = await pool.acquire()
    pool.release(finish(conn))
    clock.now += 6
    fresh = await pool.acquire()
    assert fresh is not conn and pool.stats.closed["idle_timeout"] == 1
    for _ in range(2):                      # requests 1 and 2 on the same connection
        fresh.requests += 1
        pool.release(finish(fresh))
        assert await pool.acquire() is fresh
    fresh.requests += 1                     # the third request reaches the limit
    pool.release(finish(fresh))
    assert fresh.is_closed and pool.stats.closed["max_requests"] == 1
    assert await pool.acquire() is not fresh


async def test_backend_keepalive_timeout_header_is_obeyed() -> None:
    """`Keep-Alive: timeout=N` from the backend sets an expiry a second before N."""
    clock = FakeClock()
    pool, _ = make_pool(clock)
    conn = await pool.acquire()
    conn._note_keepalive(b"timeout=3, max=100")
    pool.release(finish(conn))
    clock.now += 2.5
    assert await pool.acquire() is not conn
    assert pool.stats.closed["idle_timeout"] == 1


async def test_stale_idle_connection_is_never_reused() -> None:
    """An idle connection that became readable (backend closing) is discarded, never sent on."""
    pool, _ = make_pool(FakeClock())
    conn = await pool.acquire()
    pool.release(finish(conn))
    conn.data_received(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    other = await pool.acquire()
    assert other is not conn and conn.is_closed
    assert pool.stats.closed["stale"] == 1


async def test_max_connections_queue_fifo_and_time_out() -> None:
    """At `max`, acquirers wait in order; a released connection goes to the first; others time out."""
    pool, _ = make_pool(FakeClock(), max=1, acquire_timeout_s=0.2)
    held = await pool.acquire()
    order: list[str] = []

    async def waiter(name: str) -> None:
        conn = await pool.acquire()
        order.append(name)
        pool.release(finish(conn))

    first = asyncio.create_task(waiter("first"))
    second = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0)
    assert pool.waiting == 2
    pool.release(finish(held))
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    held = await pool.acquire()
    started = time.monotonic()
    with pytest.raises(PoolTimeout):
        await pool.acquire()
    assert 0.15 < time.monotonic() - started < 1.0
    assert pool.total == 1 and pool.waiting == 0


async def test_freed_slot_is_reserved_for_the_waiter() -> None:
    """When a dirty connection frees a slot, the waiter opens the new one; nobody jumps the queue."""
    pool, opened = make_pool(FakeClock(), max=1)
    held = await pool.acquire()
    task = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    pool.release(held)                      # dirty: closed, slot freed
    assert pool.total == 1                  # reserved for the waiter
    conn = await task
    assert conn is opened[1] and pool.total == 1


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    """A waiter cancelled while queued leaves the counts as they were."""
    pool, _ = make_pool(FakeClock(), max=1)
    held = await pool.acquire()
    task = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pool.release(finish(held))
    assert pool.in_use == 0 and pool.idle == 1 and pool.waiting == 0


async def test_reaper_and_close_idle() -> None:
    """The reaper closes expired idle connections; close_idle empties the pool (backend left)."""
    clock = FakeClock()
    pool, _ = make_pool(clock, idle_timeout_s=5)
    conns = [await pool.acquire() for _ in range(3)]
    for conn in conns:
        pool.release(finish(conn))
    clock.now += 10
    pool.run_reaper()
    assert pool.idle == 0 and pool.stats.closed["idle_timeout"] == 3
    conn = await pool.acquire()
    pool.release(finish(conn))
    assert pool.close_idle() == 1 and pool.idle == 0


async def test_min_idle_is_opened_ahead_and_max_idle_caps_the_stack() -> None:
    """top_up opens `min_idle` connections; idle ones beyond `max_idle` are trimmed once unused."""
    clock = FakeClock()
    pool, opened = make_pool(clock, min_idle=2, max_idle=2)
    await pool.top_up()
    assert pool.idle == 2 and len(opened) == 2
    conns = [await pool.acquire() for _ in range(3)]
    for conn in conns:
        pool.release(finish(conn))
    assert pool.idle == 3                   # a burst's connections are kept for a moment ...
    pool.run_reaper()
    assert pool.idle == 3
    clock.now += 2                          # ... and the surplus, unused for a while, trimmed
    pool.run_reaper()
    assert pool.idle == 2 and pool.stats.closed["surplus"] == 1


async def test_connect_failure_frees_the_slot() -> None:
    """A failed connect is an error for the caller and leaves no slot taken."""
    async def refuse(host: str, port: int, timeout: float, max_head: int = 65536) -> UpstreamConnection:
        raise UpstreamConnectError("refused")

    pool = BackendConnections("127.0.0.1", 9, ConnectionLimits(max=1), connect=refuse)
    with pytest.raises(UpstreamConnectError):
        await pool.acquire()
    assert pool.total == 0


# --- on loopback -----------------------------------------------------------------------------------


async def _counting_backend(keepalive_timeout: float) -> tuple[web.AppRunner, int, set[Any]]:
    """A backend that records each client connection (by peer address) and can hold a request."""
    peers: set[Any] = set()

    async def handler(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        await asyncio.sleep(float(request.query.get("hold", "0")))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1], peers


async def test_keepalive_race_gives_zero_errors(balancer_factory: Any) -> None:
    """A backend closing idle connections after 1 s, hit every ~1 s: no client sees an error."""
    runner, port, _accepted = await _counting_backend(keepalive_timeout=1.0)
    try:
        balancer = await balancer_factory(f"""
listen: {{host: 127.0.0.1, port: 0}}
pools:
  web:
    servers: [{{address: 127.0.0.1:{port}}}]
    connections: {{idle_timeout: 30s}}
""")
        rng = random.Random(7)
        statuses = []
        async with aiohttp.ClientSession() as session:
            for _ in range(8):
                async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                    statuses.append(resp.status)
                    await resp.read()
                await asyncio.sleep(rng.uniform(0.97, 1.03))  # the race under test, not a sync wait
        assert statuses == [200] * 8
        stats = balancer.connections.items()[0][1].stats
        print(dict(stats.closed), stats.replayed, stats.created, stats.reused)
        assert stats.closed["stale"] + stats.closed["backend_close"] + stats.replayed >= 1
    finally:
        await runner.cleanup()


async def test_max_connections_per_backend_holds_under_200_concurrent(balancer_factory: Any) -> None:
    """200 concurrent requests over 4 backends with max 8: at most 8 accepts each, all succeed."""
    backends = [await _counting_backend(keepalive_timeout=30) for _ in range(4)]
    try:
        servers = ", ".join(f"{{address: 127.0.0.1:{port}}}" for _, port, _ in backends)
        balancer = await balancer_factory(f"""
listen: {{host: 127.0.0.1, port: 0}}
pools:
  web:
    servers: [{servers}]
    connections: {{max: 8, acquire_timeout: 20s}}
""")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one() -> int:
                async with session.get(f"http://127.0.0.1:{balancer.port}/?hold=0.02") as resp:
                    await resp.read()
                    return resp.status
            statuses = await asyncio.gather(*(one() for _ in range(200)))
        assert statuses == [200] * 200
        assert all(1 <= len(peers) <= 8 for _, _, peers in backends), \
            [len(p) for _, _, p in backends]
        assert all(p.in_use == 0 for _, p in balancer.connections.items())
    finally:
        for runner, _, _ in backends:
            await runner.cleanup()


async def test_acquire_timeout_gives_503_within_bound(balancer_factory: Any) -> None:
    """With the only connection busy, a second request gets 503 + Retry-After after acquire_timeout."""
    runner, port, _ = await _counting_backend(keepalive_timeout=30)
    try:
        balancer = await balancer_factory(f"""
listen: {{host: 127.0.0.1, port: 0}}
pools:
  web:
    servers: [{{address: 127.0.0.1:{port}}}]
    connections: {{max: 1, acquire_timeout: 300ms}}
""")
        async with aiohttp.ClientSession() as session:
            slow = asyncio.create_task(session.get(f"http://127.0.0.1:{balancer.port}/?hold=2"))
            pool = balancer.connections.items()[0][1]
            await async_wait_until(lambda: pool.in_use, timeout=5, message="request in flight")
            started = time.monotonic()
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert resp.headers["X-Balancer-Error"] == "pool_timeout"
            assert 0.25 < time.monotonic() - started < 1.5
            (await slow).close()
    finally:
        await runner.cleanup()


async def test_bounded_queue_refuses_at_once() -> None:
    """With max_waiting reached, a further acquire is refused immediately (no unbounded queue)."""
    from balancer.errors import PoolQueueFull
    pool, _ = make_pool(FakeClock(), max=1, max_waiting=1, acquire_timeout_s=5)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    with pytest.raises(PoolQueueFull):
        await pool.acquire()
    pool.release(finish(held))
    pool.release(finish(await waiter))
    assert pool.in_use == 0 and pool.waiting == 0


async def test_a_connection_closed_on_its_way_to_a_waiter_is_replaced() -> None:
    """At max, a released connection handed to a waiting request but closed by the backend before that
    request runs: the waiter gets a new connection, and the closed one holds no slot."""
    clock = FakeClock()
    pool, opened = make_pool(clock, max=1)
    first = await pool.acquire()
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)                      # queued for the slot
    pool.release(finish(first))                 # handed over ...
    first.close("backend_close")                # ... and closed before the waiter runs
    second = await asyncio.wait_for(waiting, 1)
    assert second is not first and not second.is_closed and len(opened) == 2
    pool.release(finish(second))
    assert pool.total == 1 and pool.in_use == 0


async def test_a_slot_handed_over_as_the_wait_times_out_is_not_lost() -> None:
    """A connection handed to a waiter in the same turn its acquire_timeout passes is taken, not lost
    with the slot it holds."""
    clock = FakeClock()
    pool, _opened = make_pool(clock, max=1, acquire_timeout_s=0.05)
    first = await pool.acquire()
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0.049)
    loop = asyncio.get_running_loop()
    loop.call_later(0.001, lambda: pool.release(finish(first)))
    try:
        got = await asyncio.wait_for(waiting, 1)
    except Exception:                           # the deadline won: then nothing may stay taken
        assert pool.in_use == 0 and pool.total == 1
    else:
        pool.release(finish(got))
        assert pool.in_use == 0 and pool.total == 1
