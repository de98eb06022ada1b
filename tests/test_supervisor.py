"""The supervisor with real worker processes: readiness, kill -9, backoff, quarantine, shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import urllib.request
from collections import Counter
from typing import Any

import aiohttp
import pytest

from balancer.lb.supervisor import RestartPolicy, WorkerState, build_command, describe_exit
from tests.conftest import async_wait_until, pid_alive, wait_until

SPAWN_CONFIG = """
listen: {host: 127.0.0.1, port: 0}
pools:
  web:
    spawn: {command: [python, -m, backends], count: %d}
    health: {interval: 200ms, timeout: 500ms, rise: 2, fall: 2}
"""


def test_exit_causes_are_classified() -> None:
    """Exit statuses and signals are described for operators (gunicorn style)."""
    assert describe_exit(0) == "exited cleanly"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL (perhaps out of memory?)"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"


def test_command_gets_port_and_our_interpreter() -> None:
    """`python` means balancer's interpreter; the port is appended or substituted."""
    assert build_command(["python", "-m", "backends"], 9000, "web/1") == [
        sys.executable, "-m", "backends", "--port", "9000"]
    assert build_command(["./srv", "--listen=:{port}", "--name={id}"], 9000, "web/1") == [
        "./srv", "--listen=:9000", "--name=web/1"]


def test_restart_policy_backs_off_then_quarantines() -> None:
    """Delays double up to the cap; too many crashes in the window stop the restarts."""
    policy = RestartPolicy(initial_s=0.5, max_s=4, jitter=0, max_crashes=5, window_s=60)
    delays = [policy.next_delay([0.0] * n, 1.0, n) for n in range(1, 5)]
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert policy.next_delay([0.0] * 5, 1.0, 5) is None
    assert policy.next_delay([0.0] * 5, 100.0, 5) == 4.0     # old crashes left the window


async def test_spawned_workers_serve_round_robin(balancer_factory: Any) -> None:
    """Four spawned workers each take a quarter of sequential requests."""
    balancer = await balancer_factory(SPAWN_CONFIG % 4)
    assert len(balancer.registry.pool("web").ready) == 4
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(40):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                assert resp.status == 200
                seen[resp.headers["X-Backend"]] += 1
    assert sorted(seen.values()) == [10, 10, 10, 10]
    assert set(seen) == {"web/1", "web/2", "web/3", "web/4"}


async def test_kill_9_takes_worker_out_at_once_and_replaces_it(balancer_factory: Any) -> None:
    """kill -9 of a worker: out of rotation immediately, restarted, and the replacement serves."""
    balancer = await balancer_factory(SPAWN_CONFIG % 2,
                                      restart_policy=RestartPolicy(initial_s=0.2, jitter=0))
    worker = balancer.supervisor.workers[0]
    old_pid = worker.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    # Out of rotation as soon as the exit is reported (no health-check round trip).
    await async_wait_until(lambda: not worker.backend.alive, timeout=2, interval=0.005,
                           message="backend marked dead")
    assert worker.backend not in balancer.registry.pool("web").ready
    assert "SIGKILL" in worker.last_exit
    # Requests meanwhile all succeed on the other worker.
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                assert resp.status == 200
                assert resp.headers["X-Backend"] == "web/2"
    await async_wait_until(lambda: worker.backend.is_ready, timeout=10, message="replacement ready")
    assert worker.pid not in (None, old_pid)
    assert worker.restarts == 1
    async with aiohttp.ClientSession() as session:
        backends = set()
        for _ in range(4):
            async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
                backends.add(resp.headers["X-Backend"])
    assert backends == {"web/1", "web/2"}


async def test_crashing_worker_backs_off_then_is_quarantined(balancer_factory: Any) -> None:
    """A worker that always dies at start is restarted with growing delays, then quarantined."""
    config = """
listen: {host: 127.0.0.1, port: 0}
pools:
  web:
    spawn: {command: [python, -c, "import sys; print('boom: bad settings', file=sys.stderr); sys.exit(3)"], count: 1, start_timeout: 5s}
"""
    policy = RestartPolicy(initial_s=0.05, factor=2, jitter=0, max_crashes=4, window_s=30)
    balancer = await balancer_factory(config, restart_policy=policy)
    worker = balancer.supervisor.workers[0]
    delays: list[float] = []

    def quarantined() -> bool:
        if worker.next_start_at is not None and worker.state is WorkerState.BACKOFF:
            delay = round(worker.next_start_at - worker.crashes[-1], 3)
            if not delays or delays[-1] != delay:
                delays.append(delay)
        return worker.state is WorkerState.QUARANTINED

    await async_wait_until(quarantined, timeout=10, interval=0.005, message="quarantine")
    assert delays == [0.05, 0.1, 0.2]
    assert worker.restarts == 3
    assert "exited with status 3" in worker.last_exit
    assert "boom: bad settings" in "\n".join(worker.stderr_tail)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{balancer.port}/") as resp:
            assert resp.status == 503


def _stats(admin_port: int) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as resp:
        return json.load(resp)


def _ports_from_log(proc: Any) -> tuple[int, int] | None:
    text = proc.log()
    data = re.search(r"listening on http://127\.0\.0\.1:(\d+)", text)
    admin = re.search(r"admin on http://127\.0\.0\.1:(\d+)", text)
    if proc.proc.poll() is not None:
        raise AssertionError(f"balancer exited early:\n{text}")
    return (int(data.group(1)), int(admin.group(1))) if data and admin else None


PROCESS_CONFIG = """
listen: {host: 127.0.0.1, port: 0}
admin: {host: 127.0.0.1, port: 0}
pools:
  web:
    spawn: {command: [python, -m, backends], count: 2}
"""


def test_sigterm_leaves_no_process_behind(balancer_process: Any) -> None:
    """SIGTERM to balancer: it exits 0 and every worker PID is gone."""
    proc = balancer_process(PROCESS_CONFIG)
    port, admin = wait_until(lambda: _ports_from_log(proc), timeout=20, message="listening")
    pids = [b["worker"]["pid"] for b in _stats(admin)["pools"]["web"]["backends"]]
    assert len(pids) == 2 and all(pids)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        assert resp.status == 200
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(20) == 0
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5, message="workers gone")


def test_sigkill_of_balancer_takes_workers_down(balancer_process: Any) -> None:
    """SIGKILL to balancer: its workers notice the parent's death and exit within seconds."""
    proc = balancer_process(PROCESS_CONFIG)
    _, admin = wait_until(lambda: _ports_from_log(proc), timeout=20, message="listening")
    pids = [b["worker"]["pid"] for b in _stats(admin)["pools"]["web"]["backends"]]
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(5)
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5, message="workers gone")


@pytest.mark.parametrize("config_file", ["config/balancer.yaml"])
def test_default_config_serves_from_workers(balancer_process: Any, config_file: str) -> None:
    """`balancer run -c config/balancer.yaml` (ports moved to 0) answers GET / from a worker."""
    from tests.conftest import ROOT
    text = (ROOT / config_file).read_text()
    text = re.sub(r"port: 808[01]", "port: 0", text)
    assert "port: 0" in text
    proc = balancer_process(text)
    port, _ = wait_until(lambda: _ports_from_log(proc), timeout=20, message="listening")
    backends = set()
    for _ in range(8):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert resp.status == 200
            backends.add(resp.headers["X-Backend"])
    assert backends == {"web/1", "web/2", "web/3", "web/4"}
