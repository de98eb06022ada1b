"""The monitoring listener: liveness, readiness (pools, start and shutdown) and metrics, nothing else."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from balancer.config.load import parse_config
from balancer.errors import ConfigError
from tests.conftest import free_port


def config(*ports: int, metrics: bool = True) -> str:
    servers = ", ".join(f"{{address: 127.0.0.1:{p}}}" for p in ports)
    return ("listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n"
            f"monitor: {{host: 127.0.0.1, port: 0, metrics: {str(metrics).lower()}}}\n"
            f"pools:\n  web:\n    servers: [{servers}]\n    health: {{interval: 100ms, fall: 1}}\n")


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, await resp.text()


async def test_probes_and_metrics_and_nothing_else(balancer_factory: Any, backend_ports: Any) -> None:
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(config(port))
    monitor = balancer.monitor.bound_port
    assert await get(monitor, "/healthz") == (200, '{"status": "ok"}')
    status, body = await get(monitor, "/readyz")
    assert status == 200 and '"ready": true' in body
    status, body = await get(monitor, "/metrics")
    assert status == 200 and "balancer_info" in body
    for path in ("/stats", "/backends/web/x/drain", "/"):
        assert (await get(monitor, path))[0] == 404          # the admin API is not here


async def test_not_ready_without_a_backend_or_while_shutting_down(balancer_factory: Any) -> None:
    balancer = await balancer_factory(config(free_port()))     # nothing listens there
    monitor = balancer.monitor.bound_port
    await asyncio.sleep(0)
    for _ in range(100):
        status, body = await get(monitor, "/readyz")
        if status == 503:
            break
        await asyncio.sleep(0.02)
    assert status == 503 and "no ready backend in web" in body
    assert (await get(monitor, "/healthz"))[0] == 200         # alive all the same
    assert balancer.serving()
    shutdown = asyncio.create_task(balancer.shutdown())
    await asyncio.sleep(0)
    assert not balancer.serving()                               # /readyz says 503 while draining
    await shutdown


def test_metrics_on_the_monitor_need_the_admin_statistics() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml:1: monitor.metrics: metrics: true needs an admin section"):
        parse_config("monitor: {port: 0, metrics: true}\npools: {web: {servers: [127.0.0.1:9001]}}\n", "x.yaml")
