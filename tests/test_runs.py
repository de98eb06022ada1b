"""Statistics that bracket a load-test run: a run id from POST /stats/reset, latency counted from the
complete request head (queueing shows), and `balancer status --watch`."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from tests.conftest import raw_request


def config(port: int) -> str:
    return ("listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n"
            f"pools:\n  web:\n    servers: [{{address: 127.0.0.1:{port}}}]\n")


async def admin(balancer: Any, path: str, method: str = "GET") -> dict[str, Any]:
    answer = await raw_request(balancer.admin.bound_port,
                               f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Balancer-Admin: 1\r\n"
                               "Content-Length: 0\r\n"
                               "Connection: close\r\n\r\n".encode())
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


async def test_a_reset_starts_a_run_that_stats_name(balancer_factory: Any, backend_ports: Any) -> None:
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(config(port))
    await raw_request(balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    run = (await admin(balancer, "/stats/reset", "POST"))["run"]
    stats = await admin(balancer, "/stats")
    assert stats["run"] == run and stats["requests"] == 0
    assert (await admin(balancer, "/stats/reset", "POST"))["run"] != run


async def test_latency_counts_from_the_complete_head(balancer_factory: Any, backend_ports: Any) -> None:
    """A pipelined request waits behind a slow one: its latency shows the wait."""
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(config(port))
    records: list[Any] = []
    balancer.proxy.add_observer(records.append)
    await raw_request(balancer.port, b"GET /slow?ms=200 HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    quick = next(r for r in records if r.target == b"/")
    assert quick.total_s >= 0.19


async def test_status_watch_redraws(balancer_factory: Any, backend_ports: Any) -> None:
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(config(port))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "balancer", "status", "--watch", "--admin",
        f"http://127.0.0.1:{balancer.admin.bound_port}", stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        seen = b""
        async with asyncio.timeout(10):
            while seen.count(b"\x1b[2J") < 2:
                seen += await process.stdout.read(4096)
    finally:
        process.terminate()
        await process.wait()
    assert seen.count(b"web") >= 2
