"""The admin API end to end: an in-process balancer in front of in-process worker apps."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp

from balancer.lb.supervisor import RestartPolicy
from tests.conftest import ROOT, async_wait_until, free_port
from tests.observe_helpers import AdminClient, backend_of, config, get


async def test_token_required_except_healthz(backend_ports: Any, balancer_factory: Any) -> None:
    """With a token, /stats, /metrics and actions need it (401 without or wrong); /healthz does not."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(config(ports, admin="{host: 127.0.0.1, port: 0, token: s3cret}"))
    base = f"http://127.0.0.1:{balancer.admin.bound_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/healthz") as resp:
            assert resp.status == 200
        for path in ("/stats", "/metrics", "/slowlog", "/readyz", "/stats/series"):
            async with session.get(base + path) as resp:
                assert resp.status == 401, path
                assert resp.headers["WWW-Authenticate"] == "Bearer"
            async with session.get(base + path, headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401, path
            async with session.get(base + path, headers={"Authorization": "Bearer s3cret"}) as resp:
                assert resp.status == 200, path
        async with session.post(f"{base}/backends/web/127.0.0.1:{ports[0]}/drain",
                                headers={"X-Balancer-Admin": "1"}) as resp:
            assert resp.status == 401
        assert balancer.registry.pools["web"].ready        # the refused action did nothing


async def test_stats_counts_requests_per_backend(backend_ports: Any, balancer_factory: Any) -> None:
    """/stats counts requests by status class, bytes and latency per backend and pool, with state."""
    ports = await backend_ports(2)
    balancer = await balancer_factory(config(ports))
    url = f"http://127.0.0.1:{balancer.port}"
    async with aiohttp.ClientSession() as session:
        await get(session, url + "/bytes/100", 20)
        assert await get(session, url + "/status/503", 4) == [503] * 4
        assert await get(session, url + "/status/404", 2) == [404] * 2
        stats = await AdminClient(session, balancer).json("/stats")
    assert stats["requests"] == 26
    assert stats["config"] == {"file": "<test>", "sha256": balancer.config.text_hash}
    pool = stats["pools"]["web"]
    assert (pool["ready"], pool["size"], pool["requests"]) == (2, 2, 26)
    assert pool["status"] == {"1xx": 0, "2xx": 20, "3xx": 0, "4xx": 2, "5xx": 4}
    assert pool["bytes_out"] >= 2000
    for window in ("10s", "1m", "5m"):
        lat = pool["latency"][window]
        assert lat["count"] == 26
        assert lat["failed"] == 4
        assert lat["error_rate"] == round(4 / 26, 4)
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["p999_ms"] <= lat["max_ms"]
    backends = pool["backends"]
    assert sum(b["requests"] for b in backends) == 26
    assert {b["requests"] for b in backends} == {13}        # round robin
    for b in backends:
        assert b["state"] == "up"
        assert b["since"].endswith("Z") and b["since_s"] >= 0
        assert b["latency"]["10s"]["count"] == 13
        assert b["pool"]["created"] == 1 and b["pool"]["reused"] == 12
        assert b["pool"]["idle"] == 1 and b["pool"]["in_use"] == 0
    assert stats["workers"] == []


async def test_stats_reset_brackets_a_run(backend_ports: Any, balancer_factory: Any) -> None:
    """POST /stats/reset zeroes /stats counters, windows and pool counters; /metrics keeps counting."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(config(ports))
    url = f"http://127.0.0.1:{balancer.port}"
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(session, balancer)
        await get(session, url + "/", 10)
        reply = await admin.json("/stats/reset", method="POST")
        assert reply["reset"] is True
        stats = await admin.json("/stats")
        assert stats["requests"] == 0
        assert stats["pools"]["web"]["latency"]["1m"]["count"] == 0
        await get(session, url + "/", 3)
        stats = await admin.json("/stats")
        metrics = await admin.text("/metrics")
    backend = stats["pools"]["web"]["backends"][0]
    assert stats["requests"] == backend["requests"] == 3
    assert backend["latency"]["5m"]["count"] == 3
    assert (backend["pool"]["created"], backend["pool"]["reused"]) == (0, 3)
    assert 'code_class="2xx",pool="web",route="default"} 13.0' in metrics


async def test_failed_attempts_retries_and_errors(backend_ports: Any, balancer_factory: Any) -> None:
    """A refused backend shows failed attempts, the retries land on the good one; a dead pool's
    requests count as connect_error failures."""
    ports = await backend_ports(1)
    dead = free_port()
    extra = f"""
  dead:
    servers: [{{address: 127.0.0.1:{free_port()}}}]
    retries: 0
routes:
  - {{path_prefix: /dead/, pool: dead, name: deadroute}}
  - {{path_prefix: /, pool: web, name: main}}
"""
    balancer = await balancer_factory(config([ports[0], dead], extra=extra))
    url = f"http://127.0.0.1:{balancer.port}"
    async with aiohttp.ClientSession() as session:
        assert await get(session, url + "/", 6) == [200] * 6
        assert await get(session, url + "/dead/x", 2) == [502] * 2
        stats = await AdminClient(session, balancer).json("/stats")
    web = stats["pools"]["web"]
    assert web["retries"] >= 1
    assert web["status"]["2xx"] == 6
    assert backend_of(stats, f"web/127.0.0.1:{dead}")["failed_attempts"] >= 1
    assert backend_of(stats, f"web/127.0.0.1:{ports[0]}")["retries"] == web["retries"]
    dead_pool = stats["pools"]["dead"]
    assert dead_pool["errors"] == {"connect_error": 2}
    assert dead_pool["status"]["5xx"] == 2
    assert dead_pool["latency"]["10s"]["error_rate"] == 1.0


async def test_drain_disable_enable(backend_ports: Any, balancer_factory: Any) -> None:
    """The three actions change the state and its 'since'; an unknown backend is a 404."""
    ports = await backend_ports(2)
    balancer = await balancer_factory(config(ports))
    name = f"127.0.0.1:{ports[0]}"
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(session, balancer)
        before = backend_of(await admin.json("/stats"), f"web/{name}")
        data = await admin.json(f"/backends/web/{name}/drain", method="POST")
        assert (data["state"], data["ready"], data["admin"]) == ("draining", False, "draining")
        assert data["since"] >= before["since"] and data["since_s"] < 5
        assert (await admin.json(f"/backends/web/{name}/disable", method="POST"))["state"] == "disabled"
        assert len(balancer.registry.pools["web"].ready) == 1
        assert (await admin.json(f"/backends/web/{name}/enable", method="POST"))["state"] == "up"
        assert len(balancer.registry.pools["web"].ready) == 2
        async with session.post(admin.base + "/backends/web/nope/drain", headers=admin.headers) as resp:
            assert resp.status == 404
        one = await admin.json(f"/stats/backends/web/{name}")
    assert one["id"] == f"web/{name}"
    assert one["connections"] == [] or {c["state"] for c in one["connections"]} <= {"idle", "active"}


async def test_drain_wait_returns_when_in_flight_ends(backend_ports: Any, balancer_factory: Any) -> None:
    """drain?wait= answers 200 once the slow request finished, 202 with what is left if it did not."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(config(ports))
    backend = next(balancer.registry.backends())
    path = f"/backends/web/127.0.0.1:{ports[0]}/drain"
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(session, balancer)
        slow = asyncio.ensure_future(get(session, f"http://127.0.0.1:{balancer.port}/slow?ms=3000"))
        await async_wait_until(lambda: backend.in_flight == 1, message="slow request in flight")
        cut = await admin.json(path + "?wait=200ms", method="POST", status=202)
        assert cut["drain"]["drained"] is False
        assert cut["drain"]["in_flight"] == 1
        assert len(cut["drain"]["busy_connections"]) == 1
        async with session.post(admin.base + path + "?wait=soon", headers=admin.headers) as resp:
            assert resp.status == 400
        done = await admin.json(path + "?wait=20s", method="POST")
        assert done["drain"]["drained"] is True
        assert done["drain"]["waited_s"] > 0.5
        assert await slow == [200]      # the drain let it finish


async def test_workers_and_quarantine_in_stats(balancer_factory: Any) -> None:
    """Spawned workers appear with pid and restarts; a crash-looping one shows as quarantined."""
    text = """
listen: {host: 127.0.0.1, port: 0}
admin: {host: 127.0.0.1, port: 0}
pools:
  web:
    spawn: {count: 1}
  bad:
    spawn: {command: [python, -c, "import sys; sys.exit(3)"], count: 1, start_timeout: 5s}
routes:
  - {path_prefix: /, pool: web}
"""
    policy = RestartPolicy(initial_s=0.02, factor=1, jitter=0, max_crashes=2, window_s=30)
    balancer = await balancer_factory(text, restart_policy=policy)
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(session, balancer)

        async def quarantined() -> Any:
            stats = await admin.json("/stats")
            return stats if backend_of(stats, "bad/1")["state"] == "quarantined" else None

        stats = await async_wait_until(quarantined, timeout=15, message="bad/1 quarantined")
        metrics = await admin.text("/metrics")
    workers = {w["id"]: w for w in stats["workers"]}
    assert workers["web/1"]["pid"] and workers["web/1"]["state"] == "running"
    assert workers["bad/1"]["state"] == "quarantined" and workers["bad/1"]["restarts"] >= 1
    assert "exited with status 3" in workers["bad/1"]["last_exit"]
    assert backend_of(stats, "web/1")["worker"]["pid"] == workers["web/1"]["pid"]
    assert 'balancer_worker_quarantined{pool="bad",worker="bad/1"} 1.0' in metrics
    assert 'balancer_backend_state{backend="bad/1",pool="bad",state="quarantined"} 1.0' in metrics


async def test_series_has_per_second_counts(backend_ports: Any, balancer_factory: Any) -> None:
    """/stats/series gives each complete second once; its counts add up to the traffic sent."""
    ports = await backend_ports(2)
    balancer = await balancer_factory(config(ports))
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(session, balancer)
        await get(session, f"http://127.0.0.1:{balancer.port}/", 12)
        first = await admin.json("/stats/series")
        got = {"web": sum(first["pools"]["web"]["requests"])}

        async def all_seen() -> bool:
            last = first["seconds"][-1] if first["seconds"] else 0
            more = await admin.json(f"/stats/series?since={last}")
            assert not set(more["seconds"]) & set(first["seconds"])
            first["seconds"] += more["seconds"]
            got["web"] += sum(more["pools"]["web"]["requests"])
            return bool(got["web"] == 12)

        await async_wait_until(all_seen, timeout=5, interval=0.2, message="12 requests in the series")
    assert first["seconds"] == sorted(first["seconds"])


async def test_slowlog_keeps_slow_requests(backend_ports: Any, balancer_factory: Any) -> None:
    """Requests over the threshold enter /slowlog, slowest first, with their timings and ids."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(config(ports, admin="{host: 127.0.0.1, port: 0, "
                                             "slowlog_threshold: 100ms, slowlog_size: 3}"))
    url = f"http://127.0.0.1:{balancer.port}"
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(session, balancer)
        await get(session, url + "/", 5)
        ids = []
        for ms in (150, 300, 200, 250):
            async with session.get(f"{url}/slow?ms={ms}") as resp:
                await resp.read()
                ids.append(resp.headers["X-Request-ID"])
        log = await admin.json("/slowlog")
        assert (log["threshold_ms"], log["size"], log["seen"]) == (100.0, 3, 4)
        entries = log["entries"]
        assert [e["path"] for e in entries] == ["/slow?ms=300", "/slow?ms=250", "/slow?ms=200"]
        top = entries[0]
        assert top["duration_ms"] >= 300 and top["upstream_ms"] >= 290
        assert top["request_id"] == ids[1]
        assert (top["method"], top["status"], top["route"], top["pool"]) == ("GET", 200, "default", "web")
        assert top["backend"] == f"web/127.0.0.1:{ports[0]}"
        for key in ("queue_ms", "connect_ms", "ttfb_ms", "bytes_out", "attempts", "time"):
            assert key in top
        recent = await admin.json("/slowlog?order=recent&limit=1")
        assert [e["path"] for e in recent["entries"]] == ["/slow?ms=250"]
        await admin.json("/slowlog/reset", method="POST")
        assert (await admin.json("/slowlog"))["entries"] == []


async def test_cli_status_and_drain(backend_ports: Any, balancer_factory: Any, tmp_path: Any) -> None:
    """`balancer status` prints one row per backend; `balancer drain/enable ID` act through the API."""
    ports = await backend_ports(2)
    balancer = await balancer_factory(config(ports, admin="{host: 127.0.0.1, port: 0, token: tok}"))
    async with aiohttp.ClientSession() as session:
        await get(session, f"http://127.0.0.1:{balancer.port}/", 4)
    admin = f"http://127.0.0.1:{balancer.admin.bound_port}"

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "balancer", *args, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await cli("status", "--admin", admin, "--token", "tok")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"balancer at {admin}: up ")
    assert any(line.startswith("pool web: 2/2 ready") for line in lines)
    header = next(line for line in lines if line.startswith("BACKEND"))
    assert header.split()[:4] == ["BACKEND", "ADDRESS", "STATE", "SINCE"]
    for port in ports:
        row = next(line for line in lines if line.startswith(f"web/127.0.0.1:{port}"))
        assert row.split()[2] == "up" and row.split()[6] == "2"     # state, requests

    code, out, err = await cli("status", "--admin", admin)
    assert code == 1 and "HTTP 401" in err

    path = tmp_path / "b.yaml"
    path.write_text(f"admin: {{host: 127.0.0.1, port: {balancer.admin.bound_port}, token: tok}}\n"
                    f"pools: {{web: {{servers: [{{address: 127.0.0.1:{ports[0]}}}]}}}}\n")
    code, out, err = await cli("drain", f"web/127.0.0.1:{ports[0]}", "-c", str(path), "--wait", "5s")
    assert code == 0, err
    assert "drain -> draining" in out and "drained after" in out
    assert backend_of(json.loads((await cli("status", "-c", str(path), "--json"))[1]),
                      f"web/127.0.0.1:{ports[0]}")["state"] == "draining"
    code, out, err = await cli("enable", f"web/127.0.0.1:{ports[0]}", "-c", str(path))
    assert code == 0 and "enable -> up" in out
    code, out, err = await cli("disable", "nopool", "--admin", admin, "--token", "tok")
    assert code == 1 and "POOL/NAME" in err
