"""Health thresholds (pure) and active checks against a real backend."""

from __future__ import annotations

from typing import Any

import aiohttp

from balancer.health import HealthTracker
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
