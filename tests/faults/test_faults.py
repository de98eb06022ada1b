"""Faults under steady load: what a client sees when a worker crashes, hangs, stops or fails its
checks, when a backend races keep-alive closes, on a reload and on shutdown.

Each test asserts its target (zero failed GETs, except where a hang bounds failures by the response
timeout: here GETs are retried elsewhere, so zero too) and records a row for the table printed at the
end of the run (tests/faults/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from balancer.config.load import parse_config
from tests.conftest import async_wait_until
from tests.faults.conftest import ROWS
from tests.load import Load

CONFIG = """
listen: {host: 127.0.0.1, port: 0}
pools:
  web:
    spawn: {command: [python, -m, backends], count: 3, env: {GENERATION: "%s"}}
    health: {interval: 200ms, timeout: 300ms, rise: 2, fall: 2}
    timeouts: {response: 1s}
"""


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


async def _fault(balancer: Any, name: str, inject: Callable[[], Awaitable[None]],
                 recover: Callable[[], Awaitable[None]] | None = None,
                 ejects: bool = True) -> Load:
    """Run ``inject`` under load; time ejection and readmission of worker web/1; record the row."""
    backend = balancer.supervisor.workers[0].backend
    load = Load(f"http://127.0.0.1:{balancer.port}/", concurrency=4)
    await async_wait_until(lambda: load.ok > 100, timeout=15, message="steady load")
    started = time.monotonic()
    await inject()
    eject = readmit = None
    if ejects:
        await async_wait_until(lambda: not backend.is_ready, timeout=10, interval=0.002,
                               message=f"{name}: out of rotation")
        eject = time.monotonic() - started
        if recover is not None:
            await recover()
        worker = balancer.supervisor.workers[0]
        await async_wait_until(lambda: worker.backend.is_ready, timeout=20, interval=0.002,
                               message=f"{name}: back in rotation")
        readmit = time.monotonic() - started
    ended = time.monotonic()
    settled = load.ok
    await async_wait_until(lambda: load.ok > settled + 50, timeout=10, message="load after the fault")
    await load.stop()
    ROWS.append({"fault": name, "requests": load.sent, "failures": dict(load.failures),
                 "p99_ms": load.p99_ms(started, ended + 0.001), "eject": _ms(eject),
                 "readmit": _ms(readmit)})
    return load


async def _put(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.put(url) as resp:
            assert resp.status == 200


async def test_kill_9_of_a_worker(balancer_factory: Any) -> None:
    """kill -9 of a worker under load: zero failed GETs; it is replaced and readmitted."""
    balancer = await balancer_factory(CONFIG % "a")
    pid = balancer.supervisor.workers[0].pid

    async def kill() -> None:
        os.kill(pid, signal.SIGKILL)

    load = await _fault(balancer, "kill -9 worker", kill)
    assert load.failures == {}


async def test_health_check_failing(balancer_factory: Any) -> None:
    """A worker whose /health fails is ejected after `fall` checks: zero failed GETs."""
    balancer = await balancer_factory(CONFIG % "a")
    address = balancer.supervisor.workers[0].backend.address
    load = await _fault(balancer, "health check fails",
                        lambda: _put(f"http://{address}/_control/health/503"),
                        lambda: _put(f"http://{address}/_control/reset"))
    assert load.failures == {}


async def test_hung_worker(balancer_factory: Any) -> None:
    """A worker that accepts and never answers: GETs to it time out (1 s) and are retried elsewhere."""
    balancer = await balancer_factory(CONFIG % "a")
    address = balancer.supervisor.workers[0].backend.address
    load = await _fault(balancer, "worker hangs", lambda: _put(f"http://{address}/_control/hang"),
                        lambda: _put(f"http://{address}/_control/reset"))
    assert load.failures == {}
    assert load.p99_ms() < 3000        # bounded by timeouts.response, not by the hang


async def test_sigstop_sigcont(balancer_factory: Any) -> None:
    """SIGSTOP a worker (probes time out), SIGCONT it: zero failed GETs."""
    balancer = await balancer_factory(CONFIG % "a")
    pid = balancer.supervisor.workers[0].pid

    async def stop() -> None:
        os.kill(pid, signal.SIGSTOP)

    async def cont() -> None:
        os.kill(pid, signal.SIGCONT)

    try:
        load = await _fault(balancer, "SIGSTOP/SIGCONT worker", stop, cont)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert load.failures == {}


async def test_reload_with_a_changed_pool(balancer_factory: Any) -> None:
    """A reload that replaces every worker (changed env): zero failed GETs."""
    balancer = await balancer_factory(CONFIG % "a")

    async def reload() -> None:
        await balancer.reload(parse_config(CONFIG % "b"))

    load = Load(f"http://127.0.0.1:{balancer.port}/", concurrency=4)
    await async_wait_until(lambda: load.ok > 100, timeout=15, message="steady load")
    started = time.monotonic()
    await reload()
    assert await balancer.wait_rollouts(60)
    ended = time.monotonic()
    await load.stop()
    ROWS.append({"fault": "reload replacing all workers", "requests": load.sent,
                 "failures": dict(load.failures), "p99_ms": load.p99_ms(started, ended),
                 "eject": "-", "readmit": _ms(ended - started) + " (rollout)"})
    assert load.failures == {}


async def test_backend_closing_idle_connections_every_second(balancer_factory: Any) -> None:
    """A backend with a 1 s keep-alive, hit at ~1 s intervals (the keep-alive race): zero errors."""
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        balancer = await balancer_factory(
            "listen: {host: 127.0.0.1, port: 0}\npools:\n  web:\n"
            f"    servers: [{{address: 127.0.0.1:{runner.addresses[0][1]}}}]\n"
            "    connections: {idle_timeout: 30s}\n")
        failures: dict[str, int] = {}
        latencies: list[float] = []
        rng = random.Random(3)

        async def client() -> None:
            async with aiohttp.ClientSession() as session:
                for _ in range(6):
                    started = time.monotonic()
                    try:
                        async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                            await resp.read()
                            if resp.status != 200:
                                failures[f"status {resp.status}"] = failures.get(f"status {resp.status}", 0) + 1
                    except aiohttp.ClientError as exc:
                        failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(rng.uniform(0.97, 1.03))   # the race under test

        await asyncio.gather(*(client() for _ in range(4)))
        stats = balancer.connections.items()[0][1].stats
        latencies.sort()
        ROWS.append({"fault": "backend closes idle keep-alive every 1 s", "requests": len(latencies),
                     "failures": failures, "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
                     "eject": f"{stats.closed['backend_close'] + stats.closed['stale']} closed idle, "
                              f"{stats.replayed} replayed", "readmit": "-"})
        assert failures == {}
    finally:
        await runner.cleanup()


async def test_shutdown_under_load(balancer_factory: Any) -> None:
    """Shutdown (what SIGTERM runs) under load: clients told `Connection: close` stop; none fails."""
    balancer = await balancer_factory(CONFIG % "a")
    port = balancer.port
    completed = 0
    failures: dict[str, int] = {}

    async def client() -> None:
        nonlocal completed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(100000):
                writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    return
                completed += 1
                if b"Connection: close" in head:
                    return
        finally:
            writer.close()

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await async_wait_until(lambda: completed > 100, timeout=15, message="steady load")
    started = time.monotonic()
    await balancer.shutdown()
    await asyncio.wait_for(asyncio.gather(*clients), 15)
    ROWS.append({"fault": "shutdown (SIGTERM) under load", "requests": completed,
                 "failures": failures, "p99_ms": 0.0, "eject": "-",
                 "readmit": f"stopped in {_ms(time.monotonic() - started)}"})
    assert failures == {}
