"""Rollouts of spawned workers leave nothing behind: after restart-workers, a retired worker's
connections, probe task, passive state, statistics series and registry entry are gone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from balancer.observe.metrics import exposition

CONFIG = """
listen: {host: 127.0.0.1, port: 0}
admin: {host: 127.0.0.1, port: 0}
shutdown: {drain_timeout: 2s, worker_stop_timeout: 2s}
pools:
  web:
    spawn: {command: [python, -m, backends], count: 1, start_timeout: 10s}
    health: {interval: 200ms, timeout: 500ms, rise: 1, fall: 2}
"""


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def counts(balancer: Any) -> dict[str, int]:
    series = [line for line in exposition(balancer.admin.metrics).decode().splitlines()
              if line and not line.startswith("#")]
    return {"backends": len(list(balancer.registry.backends())),
            "connection tables": len(balancer.connections.items()),
            "workers": len(balancer.supervisor.workers),
            "tasks": len(asyncio.all_tasks()),
            "series": len(series)}


async def test_twenty_restarts_under_load_leave_counts_flat(balancer_factory: Any) -> None:
    balancer = await balancer_factory(CONFIG)
    done = 0
    failed = 0
    stop = False

    async def load() -> None:
        nonlocal done, failed
        async with aiohttp.ClientSession() as session:
            while not stop:
                async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                    await resp.read()
                    done += 1
                    failed += resp.status != 200
                await asyncio.sleep(0.005)

    task = asyncio.create_task(load())
    try:
        for round_no in range(20):
            await balancer.restart_workers()
            assert await balancer.wait_rollouts(30), f"restart {round_no} did not finish"
            if round_no == 4:                       # warmed up: the baseline
                before, rss_before = counts(balancer), rss_mib()
        after, rss_after = counts(balancer), rss_mib()
    finally:
        stop = True
        await task
    print(f"\n20 restart-workers, {done} requests ({failed} failed): {before} -> {after}; "
          f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB")
    assert after["backends"] == after["connection tables"] == after["workers"] == 1
    assert after["tasks"] <= before["tasks"] + 3          # a probe or a connect may be under way; a
    #                                                       leak would be 15 more (one per retired worker)
    assert after["series"] <= before["series"]
    assert rss_after - rss_before < 8.0
    assert failed == 0
