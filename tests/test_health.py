"""Health thresholds (pure) and active checks against a real backend."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer.lb.health import HealthTracker, SlowStart, next_step_in, ramp_level
from balancer.lb.registry import Backend, Registry
from tests.conftest import async_wait_until


def test_fall_consecutive_failures_eject() -> None:
    """A healthy backend is ejected after `fall` failures in a row, not after one."""
    t = HealthTracker(rise=2, fall=3, healthy=True)
    assert [t.record(False), t.record(False), t.record(True), t.record(False), t.record(False)] == \
        [None, None, None, None, None]
    assert t.record(False) is False and not t.healthy


def test_rise_consecutive_passes_readmit() -> None:
    """An ejected backend needs `rise` passes in a row to come back."""
    t = HealthTracker(rise=2, fall=1, healthy=True)
    assert t.record(False) is False
    assert t.record(True) is None
    assert t.record(False) is None
    assert t.record(True) is None
    assert t.record(True) is True


def test_fresh_worker_needs_one_pass_failed_one_needs_rise() -> None:
    """A just-started worker is admitted on its first pass; after a failure it needs `rise`."""
    fresh = HealthTracker(rise=3, fall=3)
    assert fresh.record(True) is True
    failed = HealthTracker(rise=3, fall=3)
    assert failed.record(False) is None
    assert [failed.record(True) for _ in range(3)] == [None, None, True]


def test_alternating_results_do_not_flap() -> None:
    """pass/fail alternating never changes membership when rise, fall >= 2."""
    t = HealthTracker(rise=2, fall=2, healthy=True)
    assert all(t.record(i % 2 == 0) is None for i in range(50))
    assert t.healthy


SPAWN = """
listen: {host: 127.0.0.1, port: 0}
pools:
  web:
    spawn: {command: [python, -m, backends], count: 2}
    health: {interval: 100ms, timeout: 500ms, rise: 2, fall: 2}
"""


async def test_failing_health_ejects_then_readmits(balancer_factory: Any) -> None:
    """A worker whose /health answers 503 is ejected after `fall` checks and readmitted after `rise`."""
    balancer = await balancer_factory(SPAWN)
    worker = balancer.supervisor.workers[0]
    backend = worker.backend
    base = f"http://{backend.address}"
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{base}/_control/health/503") as resp:
            assert resp.status == 200
        await async_wait_until(lambda: not backend.is_ready, timeout=5, message="ejected")
        assert "503" in backend.reason
        for _ in range(4):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                assert resp.headers["X-Backend"] == "web/2"
        async with session.put(f"{base}/_control/reset") as resp:
            assert resp.status == 200
        await async_wait_until(lambda: backend.is_ready, timeout=5, message="readmitted")


def test_require_rise_discards_probes_already_in_flight() -> None:
    """After a passive ejection ends, `rise` fresh passes are needed; the epoch marks older probes."""
    t = HealthTracker(rise=3, fall=3, healthy=True)
    epoch = t.epoch
    t.require_rise()
    assert not t.healthy and not t.fresh and t.epoch == epoch + 1
    assert [t.record(True) for _ in range(3)] == [None, None, True]


# --- slow start ------------------------------------------------------------------------------------


def test_ramp_levels_step_from_10_to_100_percent() -> None:
    """Ten steps over slow_start: 10 % at once, +10 % every slow_start/9, full at the end."""
    assert [ramp_level(t, 9.0) for t in (0, 0.99, 1.0, 4.5, 8.99, 9.0, 60)] == [1, 1, 2, 5, 9, 10, 10]
    assert next_step_in(0.0, 9.0) == pytest.approx(1.0)
    assert next_step_in(4.5, 9.0) == pytest.approx(0.5)


def two_backends() -> tuple[Registry, Backend, Backend]:
    registry = Registry()
    pool = registry.pool("p")
    a, b = (Backend(id=f"p/{i}", pool="p", host="127.0.0.1", port=9000 + i, weight=2) for i in range(2))
    pool.add(a)
    pool.add(b)
    return registry, a, b


async def test_slow_start_ramps_a_readmitted_backend() -> None:
    """A readmitted backend starts at 10 % of its weight and reaches 100 %, bumping the version."""
    registry, a, b = two_backends()
    pool = registry.pool("p")
    now = [100.0]
    slow = SlowStart(registry, clock=lambda: now[0])
    slow.add_pool(pool, 9.0)
    slow.start()
    try:
        registry.set_healthy(a, False, "health: status 503")
        registry.set_healthy(a, True)
        assert a.effective_weight == pytest.approx(0.2) and b.effective_weight == 2
        version = pool.version
        now[0] += 4.5
        assert slow.tick() == pytest.approx(0.5)
        assert a.effective_weight == pytest.approx(1.0) and pool.version > version
        now[0] += 4.5
        assert slow.tick() is None and a.effective_weight == 2
        assert "ramping=[]" in repr(slow)
    finally:
        await slow.aclose()


async def test_slow_start_skips_lone_backends_start_up_and_unconfigured_pools() -> None:
    """No ramp for the only ready backend, before start(), or when slow_start is 0 (no listener)."""
    registry, a, b = two_backends()
    pool = registry.pool("p")
    slow = SlowStart(registry)
    slow.add_pool(pool, 0.0)
    assert not slow.is_active and not pool._listeners
    slow.add_pool(pool, 5.0)
    registry.set_healthy(a, False)
    registry.set_healthy(a, True)               # not started yet: start-up, no ramp
    assert a.effective_weight == 2
    slow.start()
    try:
        registry.set_healthy(a, False)
        registry.set_healthy(b, False)
        registry.set_healthy(a, True)           # alone in the pool: no ramp
        assert a.effective_weight == 2
        registry.set_healthy(b, True)
        assert b.effective_weight == pytest.approx(0.2)
        registry.set_healthy(b, False)          # leaving rotation ends the ramp
        assert b.effective_weight == 2
    finally:
        await slow.aclose()


def health_app(state: dict[str, int]) -> web.Application:
    """/health answers ``state["status"]`` (200 unless a test changes it)."""
    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=state.get("status", 200))
    app = web.Application()
    app.router.add_get("/health", handle)
    return app


async def test_slow_start_configured_pool_ramps_after_readmission(
        aiohttp_server: Any, balancer_factory: Any) -> None:
    """`slow_start: 400ms`: a backend readmitted by its checks ramps to full weight on the ticker."""
    state: dict[str, int] = {}
    servers = [await aiohttp_server(health_app(state)), await aiohttp_server(health_app({}))]
    addresses = ", ".join(f"{{address: 127.0.0.1:{s.port}}}" for s in servers)
    balancer = await balancer_factory(f"""
listen: {{host: 127.0.0.1, port: 0}}
pools:
  web:
    servers: [{addresses}]
    health: {{interval: 100ms, timeout: 500ms, rise: 1, fall: 1}}
    slow_start: 400ms
""")
    backend = balancer.registry.find(f"web/127.0.0.1:{servers[0].port}")
    state["status"] = 503
    await async_wait_until(lambda: not backend.is_ready, timeout=5, message="down")
    state["status"] = 200
    await async_wait_until(lambda: backend.is_ready, timeout=5, message="readmitted")
    weights = {backend.effective_weight}

    def full() -> bool:
        weights.add(backend.effective_weight)
        return bool(backend.effective_weight == backend.weight)
    await async_wait_until(full, timeout=5, interval=0.01, message="full weight")
    assert min(weights) == pytest.approx(0.1) and len(weights) >= 4
