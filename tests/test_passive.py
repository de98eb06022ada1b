"""Passive health: consecutive-failure ejection (pure decisions), then live 502s from in-process backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer.config.models import PassiveConfig
from balancer.lb.passive import Ejection, PassiveHealth, PassiveTracker, Refusal
from balancer.lb.registry import Backend, Registry
from tests.conftest import async_wait_until


def make_backends(n: int, pool: str = "p") -> list[Backend]:
    return [Backend(id=f"{pool}/{i}", pool=pool, host="127.0.0.1", port=9000 + i) for i in range(n)]


def fail(tracker: PassiveTracker, backend: Backend, times: int) -> bool:
    return [tracker.record(backend, False) for _ in range(times)][-1]


POLICY = PassiveConfig(consecutive_failures=3, ejection_time_s=30, max_ejection_time_s=100,
                       max_ejected_percent=50)


def test_consecutive_failures_reach_threshold_and_a_success_resets() -> None:
    """Only `consecutive_failures` failures in a row count; one success starts again."""
    tracker = PassiveTracker(POLICY)
    (a,) = make_backends(1)
    assert not fail(tracker, a, 2)
    assert not tracker.record(a, True)
    assert not fail(tracker, a, 2)
    assert tracker.record(a, False)


def test_ejection_time_grows_with_each_ejection_capped_then_decays() -> None:
    """30s, 60s, 90s, then the 100s cap; a calm spell of 2 x ejection_time takes two steps off."""
    tracker = PassiveTracker(POLICY)
    a, _b, _c, _d = make_backends(4)
    durations = []
    now = 0.0
    for _ in range(4):
        assert fail(tracker, a, 3)
        decision = tracker.decide(a, now, pool_size=4, ready_others=3)
        assert isinstance(decision, Ejection)
        durations.append(decision.duration_s)
        now += decision.duration_s
        assert tracker.end(a, now)
    assert durations == [30, 60, 90, 100]
    assert isinstance(decision, Ejection)
    assert decision.reason == "passive: 3 consecutive failures" and decision.count == 4
    now += 60                                     # two ejection_times without trouble
    fail(tracker, a, 3)
    later = tracker.decide(a, now, pool_size=4, ready_others=3)
    assert isinstance(later, Ejection) and later.count == 3 and later.duration_s == 90


def test_a_pool_with_one_backend_is_never_emptied() -> None:
    """The only backend of a pool is never ejected, however often it fails."""
    tracker = PassiveTracker(PassiveConfig(consecutive_failures=1, max_ejected_percent=100))
    (a,) = make_backends(1)
    assert fail(tracker, a, 10)
    decision = tracker.decide(a, 0.0, pool_size=1, ready_others=0)
    assert isinstance(decision, Refusal) and "one backend" in decision.reason
    assert not tracker.is_ejected(a)


def test_max_ejected_percent_holds() -> None:
    """50 % of 5 backends: two ejections allowed, the third refused until one returns."""
    tracker = PassiveTracker(POLICY)
    backends = make_backends(5)
    results = []
    for b in backends[:3]:
        fail(tracker, b, 3)
        results.append(tracker.decide(b, 0.0, pool_size=5, ready_others=4))
    assert [type(r) for r in results] == [Ejection, Ejection, Refusal]
    assert "max_ejected_percent 50" in results[2].reason and tracker.ejected == 2
    tracker.end(backends[0], 30.0)
    assert fail(tracker, backends[2], 1)           # still over the threshold: the next failure ejects
    assert isinstance(tracker.decide(backends[2], 31.0, pool_size=5, ready_others=4), Ejection)


def test_the_last_ready_backend_is_never_ejected() -> None:
    """Even at max_ejected_percent 100, ejecting must leave a ready backend in the pool."""
    tracker = PassiveTracker(PassiveConfig(consecutive_failures=1, max_ejected_percent=100))
    a, b = make_backends(2)
    fail(tracker, a, 1)
    assert isinstance(tracker.decide(a, 0.0, pool_size=2, ready_others=1), Ejection)
    fail(tracker, b, 1)
    refusal = tracker.decide(b, 0.0, pool_size=2, ready_others=0)
    assert isinstance(refusal, Refusal) and "last ready" in refusal.reason


def test_outcomes_of_requests_in_flight_at_ejection_are_ignored() -> None:
    """Failures that arrive while a backend is already ejected do not count towards the next one."""
    tracker = PassiveTracker(POLICY)
    a, _ = make_backends(2)
    fail(tracker, a, 3)
    tracker.decide(a, 0.0, pool_size=2, ready_others=1)
    assert not fail(tracker, a, 5) and tracker.failures(a) == 3
    tracker.end(a, 30.0)
    assert tracker.failures(a) == 0


async def test_shell_ejects_and_returns_directly_without_active_checks() -> None:
    """No active checks: the ejection timer ends, the backend is ready again, each step logged once."""
    registry = Registry()
    pool = registry.pool("p")
    a, b = make_backends(2)
    pool.add(a)
    pool.add(b)
    passive = PassiveHealth(registry)
    passive.add_pool("p", PassiveConfig(consecutive_failures=2, ejection_time_s=0.05))
    flips: list[tuple[str, bool]] = []
    pool.subscribe(lambda x, ready: flips.append((x.id, ready)))
    passive.on_outcome(a, False)
    passive.on_outcome(a, False)
    assert a.state == "ejected" and pool.ready == (b,)
    passive.on_outcome(b, False)        # b is the last ready one: one failure, no ejection
    await async_wait_until(lambda: a.is_ready, timeout=5, message="return after ejection_time")
    assert flips == [("p/0", False), ("p/0", True)] and a.reason == ""
    await passive.aclose()


async def test_process_exit_ends_an_ejection() -> None:
    """A worker whose process exits leaves its ejection behind; the replacement starts clean."""
    registry = Registry()
    pool = registry.pool("p")
    a, b = make_backends(2)
    pool.add(a)
    pool.add(b)
    passive = PassiveHealth(registry)
    passive.add_pool("p", PassiveConfig(consecutive_failures=1, ejection_time_s=300))
    registry.alive_listeners.append(passive.on_alive_changed)
    passive.on_outcome(a, False)
    assert a.ejected
    registry.set_alive(a, False, "killed by SIGKILL")
    assert not a.ejected and a.state == "down" and "SIGKILL" in a.reason
    registry.set_alive(a, True)
    assert a.is_ready and passive.tracker("p").ejected == 0
    await passive.aclose()


# --- live traffic against in-process backends ---------------------------------------------------------

AiohttpServer = Callable[[web.Application], Awaitable[Any]]


def flaky_app(name: str, state: dict[str, int]) -> web.Application:
    """Answers `state["status"]` on `/` (502 when told to) and 200 on /health; counts requests."""
    async def root(request: web.Request) -> web.Response:
        state["hits"] = state.get("hits", 0) + 1
        return web.Response(status=state.get("status", 200), text=name, headers={"X-Backend": name})

    async def health(request: web.Request) -> web.Response:
        state["probes"] = state.get("probes", 0) + 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", root)
    app.router.add_get("/health", health)
    return app


def pool_config(ports: list[int], extra: str = "") -> str:
    servers = ", ".join(f"{{address: 127.0.0.1:{p}}}" for p in ports)
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
pools:
  web:
    servers: [{servers}]
    retries: 0
{extra}"""


async def test_consecutive_502s_eject_a_backend_until_ejection_time_ends(
        aiohttp_server: AiohttpServer, balancer_factory: Any) -> None:
    """Three 502s in a row eject a backend; the others take all traffic; it returns after 300ms."""
    states: list[dict[str, int]] = [{"status": 502}, {}, {}]
    servers = [await aiohttp_server(flaky_app(f"b{i}", s)) for i, s in enumerate(states)]
    balancer = await balancer_factory(pool_config(
        [s.port for s in servers],
        "    passive: {consecutive_failures: 3, ejection_time: 300ms, max_ejected_percent: 50,\n"
        "              statuses: [502, 503, 504]}\n"))
    bad = balancer.registry.find(f"web/127.0.0.1:{servers[0].port}")
    url = f"http://127.0.0.1:{balancer.port}/"
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(9):                       # round-robin: the bad one gets every third
            async with session.get(url) as resp:
                statuses.append(resp.status)
        assert statuses.count(502) == 3 and bad.state == "ejected"
        assert bad.reason == "passive: 3 consecutive failures"
        ejected_at = time.monotonic()
        hits = states[0]["hits"]
        for _ in range(6):
            async with session.get(url) as resp:
                assert resp.status == 200
        assert states[0]["hits"] == hits         # no traffic while ejected
        states[0]["status"] = 200
        await async_wait_until(lambda: bad.is_ready, timeout=5, message="return after ejection")
        assert time.monotonic() - ejected_at >= 0.25
        seen = set()
        for _ in range(6):
            async with session.get(url) as resp:
                seen.add(resp.headers["X-Backend"])
        assert seen == {"b0", "b1", "b2"}


async def test_ejected_backend_returns_through_active_checks(
        aiohttp_server: AiohttpServer, balancer_factory: Any) -> None:
    """With active checks configured, an ejection ends as 'down' and `rise` passes readmit it."""
    states: list[dict[str, int]] = [{"status": 503}, {}]
    servers = [await aiohttp_server(flaky_app(f"b{i}", s)) for i, s in enumerate(states)]
    balancer = await balancer_factory(pool_config(
        [s.port for s in servers],
        "    passive: {consecutive_failures: 2, ejection_time: 200ms, statuses: [503]}\n"
        "    health: {interval: 1s, timeout: 500ms, rise: 3, fall: 3}\n"))
    bad = balancer.registry.find(f"web/127.0.0.1:{servers[0].port}")
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                assert resp.status in (200, 503)
    assert bad.state == "ejected"
    await async_wait_until(lambda: not bad.ejected, timeout=5, message="ejection over")
    assert bad.state == "down" and "waiting for 3 passing checks" in bad.reason
    tracker = balancer.health.tracker(bad.id)
    passes_while_out: set[int] = set()

    def readmitted() -> bool:
        if not bad.is_ready:
            passes_while_out.add(tracker.passes)
        return bool(bad.is_ready)
    await async_wait_until(readmitted, timeout=5, interval=0.01, message="readmitted by checks")
    assert {1, 2} <= passes_while_out             # still out after one and two passes


async def test_max_ejected_percent_holds_when_every_backend_fails(
        aiohttp_server: AiohttpServer, balancer_factory: Any) -> None:
    """Four backends all answering 502: exactly two are ejected, two keep serving (the 502s)."""
    states: list[dict[str, int]] = [{"status": 502} for _ in range(4)]
    servers = [await aiohttp_server(flaky_app(f"b{i}", s)) for i, s in enumerate(states)]
    balancer = await balancer_factory(pool_config(
        [s.port for s in servers],
        "    passive: {consecutive_failures: 2, ejection_time: 30s, max_ejected_percent: 50, statuses: [502]}\n"))
    pool = balancer.registry.pool("web")
    async with aiohttp.ClientSession() as session:
        for _ in range(40):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                assert resp.status == 502
            assert sum(b.ejected for b in pool) <= 2
    assert sum(b.ejected for b in pool) == 2 and len(pool.ready) == 2


@pytest.mark.parametrize("status", [404, 500])
async def test_client_errors_and_500_do_not_eject(
        aiohttp_server: AiohttpServer, balancer_factory: Any, status: int) -> None:
    """4xx and a plain 500 are the application's answer, not a sick backend: never ejected."""
    states: list[dict[str, int]] = [{"status": status}, {"status": status}]
    servers = [await aiohttp_server(flaky_app(f"b{i}", s)) for i, s in enumerate(states)]
    balancer = await balancer_factory(pool_config(
        [s.port for s in servers], "    passive: {consecutive_failures: 2}\n"))
    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                assert resp.status == status
    assert len(balancer.registry.pool("web").ready) == 2


async def start_app(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    return runner, int(runner.addresses[0][1])


async def test_a_killed_backend_is_ejected_then_readmitted_by_its_checks_within_a_second(
        balancer_factory: Any) -> None:
    """Passive health at its defaults decides when a backend leaves (transport failures), the active
    checks when it returns: with interval 1s and rise 2, within a second of it accepting again, long
    before the 30 s ejection would end. Clients see no failure (GETs are retried elsewhere)."""
    runners = [await start_app(flaky_app(f"b{i}", {})) for i in range(3)]
    servers = ", ".join(f"{{address: 127.0.0.1:{port}}}" for _, port in runners)
    balancer = await balancer_factory(
        "listen: {host: 127.0.0.1, port: 0}\npools:\n  web:\n"
        f"    servers: [{servers}]\n    health: {{interval: 1s, timeout: 500ms, rise: 2}}\n")
    victim_runner, victim_port = runners[0]
    victim = balancer.registry.find(f"web/127.0.0.1:{victim_port}")
    statuses: list[int] = []
    stop = False

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop:
                async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                    await resp.read()
                    statuses.append(resp.status)

    task = asyncio.create_task(load())
    try:
        await async_wait_until(lambda: len(statuses) > 50, message="load running")
        await victim_runner.cleanup()                                  # killed: connections refused
        killed_at = time.monotonic()
        await async_wait_until(lambda: victim.ejected, timeout=5, message="ejected by passive health")
        ejected_after = time.monotonic() - killed_at
        assert victim.reason.startswith("passive: 5 consecutive failures")
        restarted, _ = await start_app(flaky_app("b0", {}), victim_port)
        runners[0] = (restarted, victim_port)
        back_at = time.monotonic()
        await async_wait_until(lambda: victim.is_ready, timeout=5, interval=0.01, message="readmitted")
        readmitted_after = time.monotonic() - back_at
        assert readmitted_after <= 1.0, readmitted_after
        assert ejected_after < 2.0
    finally:
        stop = True
        await task
        for runner, _ in runners:
            await runner.cleanup()
    print(f"\nkilled -> ejected {ejected_after * 1000:.0f} ms; accepting -> readmitted "
          f"{readmitted_after * 1000:.0f} ms; {len(statuses)} requests, {sum(s != 200 for s in statuses)} failed")
    assert set(statuses) == {200}


async def test_by_default_a_status_never_ejects(aiohttp_server: AiohttpServer, balancer_factory: Any) -> None:
    """Twelve 503s in a row (an application's own maintenance answer, say): with the default
    passive settings statuses do not count, so a client cannot eject a healthy backend."""
    states: list[dict[str, int]] = [{"status": 503}, {"status": 503}]
    servers = [await aiohttp_server(flaky_app(f"b{i}", s)) for i, s in enumerate(states)]
    balancer = await balancer_factory(pool_config([s.port for s in servers]))
    async with aiohttp.ClientSession() as session:
        for _ in range(12):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                assert resp.status == 503
    assert len(balancer.registry.pool("web").ready) == 2
