"""Shared pieces of the bench scripts: a balancer process from this checkout, RSS sampling."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("balancer did not answer in time")


@contextlib.contextmanager
def balancer(config: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``balancer run`` on ``config`` (YAML text) until the block ends; SIGTERM, then wait.

    The balancer of the environment running the script: ``.venv/bin/python bench/X.py`` measures the
    interpreted build, ``.venv-native/bin/python bench/X.py`` the compiled one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "balancer.yaml"
        path.write_text(config)
        command = Path(sys.executable).parent / "balancer"
        proc = subprocess.Popen([str(command), "run", "-c", str(path)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_ready(port, time.monotonic() + 30)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def wait_port(port: int, deadline: float) -> None:
    """Until something accepts on 127.0.0.1:``port``, or SystemExit at ``deadline`` (monotonic)."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


@contextlib.contextmanager
def process(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` running (in its own session) until the block ends, once it listens on ``port``."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, time.monotonic() + 30)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class RssSampler:
    """Peak RSS of a process, sampled in a thread while the block runs."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.idle = rss_mib(pid)
        self.peak = self.idle
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
