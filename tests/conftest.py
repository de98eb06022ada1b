"""Shared test helpers: polling with a deadline, free ports, in-process balancer and raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                           message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (send ``Connection: close``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@pytest.fixture
async def balancer_factory() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Like make_balancer, but shuts every balancer down (workers included) after the test."""
    from balancer.config.load import parse_config
    from balancer.control.balancer import Balancer
    from balancer.lb.supervisor import RestartPolicy

    started: list[Any] = []

    async def factory(text: str, restart_policy: RestartPolicy | None = None) -> Any:
        config = parse_config(text, source="<test>")
        balancer = Balancer(config, restart_policy=restart_policy or RestartPolicy(),
                            echo_worker_stderr=False)
        started.append(balancer)
        await balancer.startup()
        return balancer

    yield factory
    for balancer in started:
        await balancer.shutdown()


@pytest.fixture
async def backend_ports() -> AsyncIterator[Callable[[int], Awaitable[list[int]]]]:
    """Start N in-process worker apps (ids b1..bN, in start order) on 127.0.0.1 port 0; their ports."""
    from aiohttp import web

    from backends.app import make_app

    runners: list[web.AppRunner] = []

    async def start(n: int) -> list[int]:
        ports = []
        for _ in range(n):
            runner = web.AppRunner(make_app(f"b{len(runners) + 1}", 0), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            ports.append(int(runner.addresses[0][1]))
        return ports

    yield start
    for runner in runners:
        await runner.cleanup()


class BalancerProcess:
    """``balancer run -c FILE`` as a real subprocess (for signal and process-tree tests)."""

    def __init__(self, config_path: Path, cwd: Path = ROOT) -> None:
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balancer", "run", "-c", str(config_path)],
            cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def balancer_process(tmp_path: Path) -> Iterator[Callable[[str], BalancerProcess]]:
    procs: list[BalancerProcess] = []

    def start(config_text: str) -> BalancerProcess:
        path = tmp_path / f"balancer{len(procs)}.yaml"
        path.write_text(config_text)
        proc = BalancerProcess(path)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
