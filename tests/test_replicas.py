"""`processes: N`: several proxy processes on one port, one state (the main process's), one set of stats."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from typing import Any

from tests.conftest import pid_alive, wait_until

CONFIG = """
listen: {host: 127.0.0.1, port: 0}
admin: {host: 127.0.0.1, port: 0}
processes: 2
pools:
  web:
    spawn: {command: [python, -m, backends], count: 2}
    health: {interval: 200ms, timeout: 500ms, rise: 1, fall: 1}
"""


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, dict(resp.headers), resp.read()


def _post(url: str) -> Any:
    request = urllib.request.Request(url, method="POST", data=b"", headers={"X-Balancer-Admin": "1"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def _started(proc: Any) -> tuple[int, int, int] | None:
    log = proc.log()
    if proc.proc.poll() is not None:
        raise AssertionError(log)
    data = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log)
    admin = re.search(r"admin on http://127\.0\.0\.1:(\d+)", log)
    replica = re.search(r"proxy process 1 pid (\d+) serving on port (\d+)", log)
    if data and admin and replica:
        assert replica.group(2) == data.group(1)          # the replica shares the main's port
        return int(data.group(1)), int(admin.group(1)), int(replica.group(1))
    return None


def test_two_proxy_processes_share_the_port_state_and_stats(balancer_process: Any) -> None:
    """Both processes serve; every request is counted in the main /stats; a drain and a dead worker
    reach the replica; SIGTERM stops main, replica and workers."""
    proc = balancer_process(CONFIG)
    port, admin, replica_pid = wait_until(lambda: _started(proc), timeout=30, message="both processes up")
    for _ in range(60):                                   # new connection each: the kernel spreads them
        assert _get(f"http://127.0.0.1:{port}/")[0] == 200
    stats = wait_until(lambda: (s := json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats",
                                                                      timeout=5)))["totals"]["requests"] >= 60
                       and s, timeout=5, message="requests of both processes counted")
    assert stats["totals"]["requests"] == 60
    with open(f"/proc/{replica_pid}/stat") as f:
        replica_ticks = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
    assert replica_ticks > 0

    # An operator's drain reaches every process: then no request of 40 goes to web/1. The replica
    # learns it from the next snapshot, a few ms after the admin call returns (README: ~20 ms).
    _post(f"http://127.0.0.1:{admin}/backends/web/1/drain")
    wait_until(lambda: {_get(f"http://127.0.0.1:{port}/")[1]["X-Backend"] for _ in range(40)} == {"web/2"},
               timeout=5, message="the drain reached both processes")
    _post(f"http://127.0.0.1:{admin}/backends/web/1/enable")

    # A worker killed: out of rotation in every process.
    pids = [b["worker"]["pid"] for b in json.load(urllib.request.urlopen(
        f"http://127.0.0.1:{admin}/stats", timeout=5))["pools"]["web"]["backends"]]
    import os
    os.kill(pids[1], signal.SIGKILL)
    wait_until(lambda: json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5))
               ["pools"]["web"] == 1, timeout=5, message="web/2 out")
    for _ in range(30):
        status, headers, _ = _get(f"http://127.0.0.1:{port}/")
        assert status == 200 and headers["X-Backend"] == "web/1"

    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0
    wait_until(lambda: not pid_alive(replica_pid) and not pid_alive(pids[0]), timeout=10,
               message="replica and workers gone")


def test_a_killed_replica_is_restarted(balancer_process: Any) -> None:
    """kill -9 of a proxy process: the main process starts a new one on the same port."""
    proc = balancer_process(CONFIG)
    port, _, replica_pid = wait_until(lambda: _started(proc), timeout=30, message="both processes up")
    import os
    os.kill(replica_pid, signal.SIGKILL)
    wait_until(lambda: len(re.findall(r"proxy process 1 pid \d+ serving", proc.log())) == 2, timeout=20,
               message="replacement serving")
    for _ in range(20):
        assert _get(f"http://127.0.0.1:{port}/")[0] == 200


async def test_reload_reaches_every_proxy_process(balancer_process: Any, backend_ports: Any,
                                                  tmp_path: Any) -> None:
    """A reload adding a pool and a route applies in the replica too: every request is routed."""
    import aiohttp

    from tests.conftest import async_wait_until
    (api_port,) = await backend_ports(1)
    proc = balancer_process(CONFIG)
    port, admin, _ = await async_wait_until(lambda: _started(proc), timeout=30, message="both up")
    config_file = next(tmp_path.glob("balancer0.yaml"))
    config_file.write_text(CONFIG + f"  api:\n    servers: [{{address: 127.0.0.1:{api_port}}}]\n"
                           "routes:\n  - {path_prefix: /api, pool: api}\n  - {path_prefix: /, pool: web}\n")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{admin}/reload?wait=10s",
                                headers={"X-Balancer-Admin": "1"}) as resp:
            assert (await resp.json())["reloaded"] is True

        async def backends_seen() -> set[str]:
            seen = set()
            for _ in range(30):                 # a new connection each time: both processes answer
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(f"http://127.0.0.1:{port}/api/echo") as resp:
                        seen.add(resp.headers.get("X-Backend", str(resp.status)))
            return seen

        async def all_routed() -> bool:      # replicas apply a reload within milliseconds of the main
            return await backends_seen() == {"b1"}

        await async_wait_until(all_routed, timeout=10, message="every process routes /api to b1")


async def test_every_request_of_two_processes_is_counted_and_a_drain_is_acknowledged(
        balancer_process: Any) -> None:
    """20,000 requests over many keep-alive connections (the kernel spreads them over both
    processes): /stats counts every one. A drain answers once both processes have applied it."""
    import asyncio

    from tests.conftest import async_wait_until
    proc = balancer_process(CONFIG)
    port, admin, _ = await async_wait_until(lambda: _started(proc), timeout=30, message="both up")
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    marker = b"HTTP/1.1 200 OK\r\n"

    async def client(n: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        seen, data = 0, b""
        for _ in range(n // 50):                  # 50 pipelined requests at a time
            writer.write(request * 50)
            target = seen + 50
            while seen < target:
                chunk = await reader.read(65536)
                assert chunk, "connection closed"
                data += chunk
                seen = data.count(marker)
        writer.close()
        return seen

    answered = sum(await asyncio.gather(*(client(1000) for _ in range(20))))
    assert answered == 20_000

    def counted() -> int:
        return int(json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5))
                   ["totals"]["requests"])
    await async_wait_until(lambda: counted() >= 20_000, timeout=10, message="all counted")
    assert counted() == 20_000
    # Acknowledged: right after the drain returns, no process sends web/1 a new request.
    _post(f"http://127.0.0.1:{admin}/backends/web/1/drain")
    backends = set()
    for _ in range(40):                           # new connections: both processes answer
        backends.add(_get(f"http://127.0.0.1:{port}/")[1]["X-Backend"])
    assert backends == {"web/2"}


async def test_stats_in_flight_counts_every_process(balancer_process: Any) -> None:
    """Slow requests spread over both processes: /stats' in-flight sums them all."""
    import asyncio

    from tests.conftest import async_wait_until
    proc = balancer_process(CONFIG)
    port, admin, _ = await async_wait_until(lambda: _started(proc), timeout=30, message="both up")

    async def slow() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow?ms=2500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await reader.read()
        writer.close()

    requests = [asyncio.create_task(slow()) for _ in range(16)]

    def in_flight() -> int:
        stats = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5))
        return sum(b["in_flight"] for b in stats["pools"]["web"]["backends"])
    try:
        await async_wait_until(lambda: in_flight() == 16, timeout=2.2, message="16 in flight, all processes")
    finally:
        await asyncio.gather(*requests)
