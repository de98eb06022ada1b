"""Reload: a new configuration applied in place, without failing a request."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from balancer.config.load import parse_config
from balancer.errors import ConfigError
from tests.conftest import async_wait_until, wait_until
from tests.load import Load


def servers(*ports: int, weights: dict[int, int] | None = None) -> str:
    weights = weights or {}
    return ", ".join(f"{{address: 127.0.0.1:{p}, weight: {weights.get(p, 1)}}}" for p in ports)


async def test_servers_added_reweighted_and_removed_under_load(backend_ports: Any, balancer_factory: Any) -> None:
    """Adding, reweighting and removing external servers under steady load fails no request."""
    a, b, c = await backend_ports(3)
    base = "listen: {host: 127.0.0.1, port: 0}\npools:\n  web:\n    servers: [%s]\n"
    balancer = await balancer_factory(base % servers(a, b))
    load = Load(f"http://127.0.0.1:{balancer.port}")
    await async_wait_until(lambda: load.ok > 50, timeout=10, message="traffic")
    changes = await balancer.reload(parse_config(base % servers(a, b, c, weights={b: 3})))
    assert any("added" in c_ for c_ in changes) and any("weight 1 -> 3" in c_ for c_ in changes)
    await async_wait_until(lambda: load.backends["b3"] > 20, timeout=10, message="new server used")
    changes = await balancer.reload(parse_config(base % servers(b, c)))
    assert any("removed" in c_ for c_ in changes)
    assert await balancer.wait_rollouts(10)
    before = load.backends["b1"]
    await async_wait_until(lambda: load.ok > before + 100, timeout=10, message="more traffic")
    await load.stop()
    assert load.failures == {}
    assert load.backends["b1"] == before           # the removed server got nothing more
    assert balancer.registry.find(f"web/127.0.0.1:{a}") is None
    assert balancer.connections.get(f"web/127.0.0.1:{a}") is None


async def test_routes_timeouts_and_new_pool_apply(backend_ports: Any, balancer_factory: Any) -> None:
    """A new pool and route take effect at once; the old route keeps working."""
    a, b = await backend_ports(2)
    balancer = await balancer_factory(
        f"listen: {{host: 127.0.0.1, port: 0}}\npools:\n  web:\n    servers: [{servers(a)}]\n")
    new = parse_config(
        f"listen: {{host: 127.0.0.1, port: 0}}\npools:\n  web:\n    servers: [{servers(a)}]\n"
        f"    timeouts: {{response: 5s}}\n  api:\n    servers: [{servers(b)}]\n"
        "routes:\n  - {path_prefix: /api, pool: api}\n  - {path_prefix: /, pool: web}\n")
    changes = await balancer.reload(new)
    assert "pool api added" in changes and "routes replaced" in changes
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{balancer.port}/api/echo") as resp:
            assert resp.headers["X-Backend"] == "b2"
        async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
            assert resp.headers["X-Backend"] == "b1"
    assert balancer.proxy.pools["web"].response_timeout_s == 5.0


async def test_invalid_file_keeps_the_old_configuration(tmp_path: Path, backend_ports: Any,
                                                        balancer_factory: Any) -> None:
    """An invalid file is refused with its error; the running configuration is untouched."""
    (a,) = await backend_ports(1)
    balancer = await balancer_factory(
        f"listen: {{host: 127.0.0.1, port: 0}}\npools:\n  web:\n    servers: [{servers(a)}]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  web:\n    servers: [{address: nowhere}]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: pools.web.servers\[0\].address"):
        await balancer.reload_file(str(bad))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
            assert resp.status == 200


SPAWN = """listen: {host: 127.0.0.1, port: 0}
pools:
  web:
    spawn: {command: [python, -m, backends], count: %d, env: {GENERATION: "%s"}}
    health: {interval: 100ms, timeout: 1s, rise: 1, fall: 2}
"""


async def test_changed_workers_are_replaced_surge_then_drain(balancer_factory: Any) -> None:
    """A changed spawn command/env replaces every worker, never dropping below the ready count,
    with no failed request; then a count change adds a worker."""
    balancer = await balancer_factory(SPAWN % (2, "one"))
    old_pids = {w.pid for w in balancer.supervisor.workers}
    load = Load(f"http://127.0.0.1:{balancer.port}")
    await async_wait_until(lambda: load.ok > 50, timeout=10, message="traffic")
    lowest = [2]

    async def watch_ready() -> None:
        while True:
            lowest[0] = min(lowest[0], len(balancer.registry.pool("web").ready))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch_ready())
    changes = await balancer.reload(parse_config(SPAWN % (2, "two")))
    assert "pool web: workers replaced surge-then-drain" in changes
    assert await balancer.wait_rollouts(60)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    workers = balancer.supervisor.workers
    assert len(workers) == 2 and not old_pids & {w.pid for w in workers}
    assert [w.id for w in workers] == ["web/3", "web/4"]
    assert lowest[0] >= 2
    await balancer.reload(parse_config(SPAWN % (3, "two")))
    assert await balancer.wait_rollouts(30)
    await async_wait_until(lambda: len(balancer.registry.pool("web").ready) == 3, timeout=10,
                           message="third worker ready")
    await load.stop()
    assert load.failures == {}


async def test_restart_workers_replaces_every_process(balancer_factory: Any) -> None:
    """restart-workers: same settings, new processes, no failed request."""
    balancer = await balancer_factory(SPAWN % (2, "x"))
    old_pids = {w.pid for w in balancer.supervisor.workers}
    load = Load(f"http://127.0.0.1:{balancer.port}")
    await async_wait_until(lambda: load.ok > 20, timeout=10, message="traffic")
    await balancer.restart_workers()
    assert await balancer.wait_rollouts(60)
    await load.stop()
    assert load.failures == {}
    assert not old_pids & {w.pid for w in balancer.supervisor.workers}


def _log_ports(proc: Any) -> tuple[int, int] | None:
    if proc.proc.poll() is not None:
        raise AssertionError(proc.log())
    data = re.findall(r"listening on http://127\.0\.0\.1:(\d+)", proc.log())
    admin = re.search(r"admin on http://127\.0\.0\.1:(\d+)", proc.log())
    return (int(data[-1]), int(admin.group(1))) if data and admin else None


def test_sighup_reloads_and_refuses_a_broken_file(tmp_path: Path, balancer_process: Any) -> None:
    """SIGHUP re-reads the file: a valid change applies; a broken one is refused and logged."""
    text = ("listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n"
            "pools:\n  web:\n    spawn: {command: [python, -m, backends], count: 1}\n")
    proc = balancer_process(text)
    port, admin = wait_until(lambda: _log_ports(proc), timeout=20, message="listening")
    config_file = next(tmp_path.glob("balancer0.yaml"))
    config_file.write_text(text.replace("count: 1", "count: 2"))
    proc.proc.send_signal(signal.SIGHUP)

    def workers() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as resp:
            import json
            return int(json.load(resp)["pools"]["web"])

    wait_until(lambda: workers() == 2, timeout=30, message="second worker after SIGHUP")
    config_file.write_text("pools: {web: {servers: [{address: nowhere}]}}\n")
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in proc.log(), timeout=10, message="refusal logged")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        assert resp.status == 200


def test_cli_reload_reports_changes_and_refusals(balancer_process: Any, tmp_path: Path) -> None:
    """`balancer reload` prints what changed (exit 0), or the file's error (exit 1)."""
    import subprocess
    import sys
    text = ("listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n"
            "pools:\n  web:\n    spawn: {command: [python, -m, backends], count: 2}\n")
    proc = balancer_process(text)
    _, admin = wait_until(lambda: _log_ports(proc), timeout=20, message="listening")
    config_file = next(tmp_path.glob("balancer0.yaml"))
    config_file.write_text(text.replace("count: 2", "count: 1"))
    cli = [sys.executable, "-m", "balancer", "reload", "--admin", f"http://127.0.0.1:{admin}", "--wait", "30s"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pool web: workers 2 -> 1" in done.stdout
    config_file.write_text("pools: {web: {}}\n")
    refused = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "empty pool" in refused.stderr
