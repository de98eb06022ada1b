"""Failover with real workers: hung and stopped workers, kill -9 under load, flapping health, and
least-loaded against round-robin with a stuck backend."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from balancer.lb.registry import Backend
from balancer.lb.supervisor import RestartPolicy
from tests.conftest import async_wait_until

AiohttpServer = Callable[[web.Application], Awaitable[Any]]

TWO_WORKERS = """
listen: {host: 127.0.0.1, port: 0}
pools:
  web:
    spawn: {command: [python, -m, backends], count: 2}
    health: {interval: 100ms, timeout: 300ms, rise: 2, fall: 2}
    timeouts: {response: 500ms}
    passive: {enabled: false}
"""


async def get_all(session: aiohttp.ClientSession, url: str, n: int) -> list[tuple[int, str]]:
    """``n`` sequential GETs: (status, X-Backend) of each."""
    results = []
    for _ in range(n):
        async with session.get(url) as resp:
            await resp.read()
            results.append((resp.status, resp.headers.get("X-Backend", "")))
    return results


async def test_hung_worker_is_ejected_by_probe_timeouts(balancer_factory: Any) -> None:
    """A worker that accepts but never answers: probes time out and eject it after `fall`; GETs then
    go to the other worker; once it answers again, `rise` passes readmit it."""
    balancer = await balancer_factory(TWO_WORKERS)
    hung = balancer.supervisor.workers[0].backend
    url = f"http://127.0.0.1:{balancer.port}/"
    async with aiohttp.ClientSession() as session:
        async with session.put(f"http://{hung.address}/_control/hang") as resp:
            assert resp.status == 200
        hung_at = time.monotonic()
        await async_wait_until(lambda: not hung.is_ready, timeout=5, message="hung worker ejected")
        # fall=2 probes, each given up after 300ms: about 0.6-0.8s after the hang.
        assert time.monotonic() - hung_at >= 0.5
        assert hung.state == "down" and hung.reason == "health: timeout after 0.3s"
        assert await get_all(session, url, 4) == [(200, "web/2")] * 4
        async with session.put(f"http://{hung.address}/_control/reset") as resp:
            assert resp.status == 200
        await async_wait_until(lambda: hung.is_ready, timeout=5, message="readmitted")


async def test_gets_to_a_hung_worker_fail_over_before_it_is_ejected(balancer_factory: Any) -> None:
    """GETs that meet the hung worker before its ejection time out (500ms) and are retried on the
    other worker: no client-visible failure."""
    balancer = await balancer_factory(TWO_WORKERS)
    hung = balancer.supervisor.workers[0].backend
    async with aiohttp.ClientSession() as session:
        async with session.put(f"http://{hung.address}/_control/hang") as resp:
            assert resp.status == 200
        results = await get_all(session, f"http://127.0.0.1:{balancer.port}/", 4)
    assert results == [(200, "web/2")] * 4
    assert balancer.proxy.retries >= 1


async def test_sigstop_ejects_a_worker_and_sigcont_readmits_it(balancer_factory: Any) -> None:
    """SIGSTOP: probes time out and the worker leaves rotation (its process is still alive);
    SIGCONT: it passes `rise` checks and takes traffic again."""
    balancer = await balancer_factory(TWO_WORKERS)
    worker = balancer.supervisor.workers[0]
    stopped = worker.backend
    pid = worker.pid
    assert pid is not None
    url = f"http://127.0.0.1:{balancer.port}/"
    os.kill(pid, signal.SIGSTOP)
    try:
        await async_wait_until(lambda: not stopped.is_ready, timeout=5, message="stopped worker out")
        assert "timeout" in stopped.reason and stopped.alive
        async with aiohttp.ClientSession() as session:
            assert await get_all(session, url, 4) == [(200, "web/2")] * 4
            os.kill(pid, signal.SIGCONT)
            await async_wait_until(lambda: stopped.is_ready, timeout=5, message="continued worker back")
            assert {b for _, b in await get_all(session, url, 4)} == {"web/1", "web/2"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


class Timeline:
    """Registry events with their times: readiness flips and liveness changes, per backend."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []

    def on_ready(self, backend: Backend, is_ready: bool) -> None:
        self.events.append((time.monotonic(), backend.id, "ready" if is_ready else "unready"))

    def on_alive(self, backend: Backend) -> None:
        self.events.append((time.monotonic(), backend.id, "alive" if backend.alive else "dead"))

    def first(self, backend_id: str, what: str, after: float) -> float | None:
        return next((t for t, b, w in self.events if b == backend_id and w == what and t >= after), None)


KILL_CONFIG = """
listen: {host: 127.0.0.1, port: 0}
pools:
  web:
    spawn: {command: [python, -m, backends], count: 3}
"""


async def test_kill_9_under_steady_load_costs_no_get(balancer_factory: Any) -> None:
    """kill -9 of a worker under 6 concurrent GET loops: zero client-visible failures; out of rotation
    at once, back after restart and one passing check (default health: 2s interval, rise 2, fall 3)."""
    balancer = await balancer_factory(KILL_CONFIG, restart_policy=RestartPolicy(initial_s=0.2, jitter=0))
    timeline = Timeline()
    balancer.registry.pool("web").subscribe(timeline.on_ready)
    balancer.registry.alive_listeners.append(timeline.on_alive)
    worker = balancer.supervisor.workers[0]
    victim = worker.backend
    url = f"http://127.0.0.1:{balancer.port}/"
    statuses: Counter[int] = Counter()
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
            except aiohttp.ClientError as exc:
                errors.append(exc)

    async with aiohttp.ClientSession() as session:
        clients = [asyncio.create_task(client(session)) for _ in range(6)]
        try:
            await async_wait_until(lambda: statuses.total() >= 100, timeout=10, message="warm-up load")
            pid = worker.pid
            assert pid is not None
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            await async_wait_until(lambda: victim.is_ready and worker.pid not in (None, pid),
                                   timeout=15, message="replacement back in rotation")
            served = statuses.total()
            await async_wait_until(lambda: statuses.total() >= served + 100, timeout=10,
                                   message="load after the replacement joined")
        finally:
            stop.set()
            await asyncio.gather(*clients)
    assert errors == [] and set(statuses) == {200}, (statuses, errors[:3])
    out_at = timeline.first(victim.id, "unready", killed_at)
    alive_at = timeline.first(victim.id, "alive", killed_at)
    back_at = timeline.first(victim.id, "ready", killed_at)
    assert out_at is not None and alive_at is not None and back_at is not None
    out_s, restart_s, back_s = out_at - killed_at, back_at - alive_at, back_at - killed_at
    print(f"\nkill -9 -> out of rotation {out_s * 1000:.1f} ms; process accepting -> back in "
          f"{restart_s * 1000:.1f} ms; kill -> back in {back_s * 1000:.0f} ms (restart backoff 200 ms); "
          f"{statuses.total()} GETs, all 200, {balancer.proxy.retries} retried")
    assert out_s < 0.5 and restart_s < 1.0


async def test_flapping_health_does_not_flap_membership(
        aiohttp_server: AiohttpServer, balancer_factory: Any) -> None:
    """/health alternating pass/fail on every probe never changes membership (rise 2, fall 2)."""
    probes: list[int] = []

    async def alternating(request: web.Request) -> web.Response:
        probes.append(503 if len(probes) % 2 else 200)
        return web.Response(status=probes[-1])
    app = web.Application()
    app.router.add_get("/health", alternating)
    server = await aiohttp_server(app)
    balancer = await balancer_factory(f"""
listen: {{host: 127.0.0.1, port: 0}}
pools:
  web:
    servers: [{{address: 127.0.0.1:{server.port}}}]
    health: {{interval: 50ms, timeout: 500ms, rise: 2, fall: 2}}
""")
    timeline = Timeline()
    balancer.registry.pool("web").subscribe(timeline.on_ready)
    backend = next(iter(balancer.registry.pool("web")))
    await async_wait_until(lambda: len(probes) >= 30, timeout=10, message="30 probes")
    assert timeline.events == [] and backend.is_ready
    assert Counter(probes[:30]) == {200: 15, 503: 15}


def gated_app(name: str, state: dict[str, Any]) -> web.Application:
    """Counts requests; while ``state["gate"]`` is an unset Event, every request waits on it."""
    async def handle(request: web.Request) -> web.Response:
        state["hits"] += 1
        gate = state.get("gate")
        if gate is not None:
            await gate.wait()
        return web.Response(text=name, headers={"X-Backend": name})
    app = web.Application()
    app.router.add_get("/", handle)
    return app


async def requests_sent_to_stuck(balancer: Any, a_state: dict[str, Any]) -> int:
    """Get one request stuck on A, then send ten, each once the previous one finished or got stuck;
    return how many of the ten went to A. Releases A at the end."""
    a_state["gate"] = asyncio.Event()
    a_state["hits"] = 0
    url = f"http://127.0.0.1:{balancer.port}/"
    async with aiohttp.ClientSession() as session:
        async def fetch() -> int:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status

        async def send_one() -> asyncio.Task[int]:
            hits = a_state["hits"]
            task = asyncio.create_task(fetch())
            await async_wait_until(lambda: task.done() or a_state["hits"] > hits, timeout=5,
                                   message="request answered or stuck")
            return task

        tasks = [await send_one()]
        while a_state["hits"] == 0:
            tasks.append(await send_one())
        tasks += [await send_one() for _ in range(10)]
        sent = a_state["hits"] - 1
        a_state["gate"].set()
        assert set(await asyncio.gather(*tasks)) == {200}
    return int(sent)


async def test_least_loaded_steers_away_from_a_stuck_backend_round_robin_does_not(
        aiohttp_server: AiohttpServer, balancer_factory: Any) -> None:
    """Backend A hangs every request, B answers at once. Once A holds a request, of ten more sent one
    after another round_robin still gives A five, least_loaded none."""
    a_state: dict[str, Any] = {"hits": 0}
    servers = [await aiohttp_server(gated_app("a", a_state)),
               await aiohttp_server(gated_app("b", {"hits": 0}))]
    sent_to_a = {}
    for policy in ("round_robin", "least_loaded"):
        balancer = await balancer_factory(f"""
listen: {{host: 127.0.0.1, port: 0}}
pools:
  web:
    balance: {policy}
    servers: [{{address: 127.0.0.1:{servers[0].port}}}, {{address: 127.0.0.1:{servers[1].port}}}]
    passive: {{enabled: false}}
""")
        sent_to_a[policy] = await requests_sent_to_stuck(balancer, a_state)
    assert sent_to_a == {"round_robin": 5, "least_loaded": 0}
