"""The test worker (`python -m backends`), run as a real subprocess on 127.0.0.1.

Every wait polls with a deadline; every started process is killed and reaped in a finaliser.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import pytest

from backends.app import PATTERN
from backends.parent import watch_parent

REPO = Path(__file__).resolve().parent.parent
START_DEADLINE_S = 10.0
STOP_DEADLINE_S = 5.0
PORT_ATTEMPTS = 5


# --- helpers -------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], deadline_s: float, what: str) -> None:
    """Poll `predicate` every 20 ms until it holds; fail the test naming `what` after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raw_request(port: int, request: bytes, timeout_s: float = 5.0) -> tuple[bytes, bytes]:
    """Send `request` verbatim (no client normalisation), read to EOF; return (head, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body


def answers_as(port: int, worker_id: str) -> bool:
    """Is a worker named `worker_id` (and not some other process that grabbed the port) serving?"""
    try:
        head, _ = raw_request(port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 1.0)
    except OSError:
        return False
    return f"\r\nX-Backend: {worker_id}".encode() in head


def is_pid_gone(pid: int) -> bool:
    """True once `pid` has exited, even if no one reaps it (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no procfs: fall back to signal 0, which cannot tell a zombie from a live one
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state in ("Z", "X")


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int
    worker_id: str
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running {STOP_DEADLINE_S} s after being asked to stop")


def spawn(args: list[str], stderr_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with stderr_path.open("wb") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "backends", *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )


def kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=STOP_DEADLINE_S)
    if proc.stdout is not None:
        proc.stdout.close()


def has_started_or_exited(proc: subprocess.Popen[bytes], port: int, worker_id: str) -> bool:
    return proc.poll() is not None or answers_as(port, worker_id)


def start_on_free_port(
    launch: Callable[[int, Path], subprocess.Popen[bytes]], tmp_path: Path, worker_id: str | None = None
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Run `launch(port, stderr_path)` until the worker it starts answers on `port` as `worker_id`.

    free_port() can race with another process taking the port before the worker binds it; the worker
    then exits reporting EADDRINUSE and we try another port. `launch` owns reaping what it starts.
    """
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        stderr_path = tmp_path / f"{port}.stderr"
        proc = launch(port, stderr_path)
        expected_id = worker_id or f"w{port}"
        wait_until(partial(has_started_or_exited, proc, port, expected_id), START_DEADLINE_S, "the worker")
        if proc.poll() is None:
            return proc, port, stderr_path
        if os.strerror(errno.EADDRINUSE) not in stderr_path.read_text():
            pytest.fail(f"worker exited with {proc.returncode}: {stderr_path.read_text()}")
    pytest.fail(f"no free port after {PORT_ATTEMPTS} attempts")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started; each is killed and reaped at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        kill_and_reap(proc)


@pytest.fixture
def start_worker(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> Callable[..., Worker]:
    """Factory: start a worker with extra options on a free port and wait until it answers."""

    def start(*options: str) -> Worker:
        def launch(port: int, stderr_path: Path) -> subprocess.Popen[bytes]:
            procs.append(spawn(["--port", str(port), *options], stderr_path))
            return procs[-1]

        worker_id = options[options.index("--id") + 1] if "--id" in options else None
        proc, port, stderr_path = start_on_free_port(launch, tmp_path, worker_id)
        return Worker(proc, port, worker_id or f"w{port}", stderr_path)

    return start


@pytest.fixture
def worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker()


# --- endpoints -----------------------------------------------------------------------------------


async def test_root_names_the_worker_and_sets_x_backend(worker: Worker) -> None:
    """GET / says which worker and port answered, and X-Backend names it."""
    async with aiohttp.ClientSession() as session, session.get(worker.url + "/") as response:
        assert response.status == 200
        assert await response.text() == f"worker w{worker.port} port {worker.port}\n"
        assert response.headers["X-Backend"] == f"w{worker.port}"


async def test_x_backend_is_on_errors_too(start_worker: Callable[..., Worker]) -> None:
    """A 404 and a 405 also carry X-Backend, with the --id name."""
    worker = start_worker("--id", "alpha")
    async with aiohttp.ClientSession() as session:
        async with session.get(worker.url + "/no/such/path") as response:
            assert (response.status, response.headers["X-Backend"]) == (404, "alpha")
        async with session.post(worker.url + "/health") as response:
            assert (response.status, response.headers["X-Backend"]) == (405, "alpha")


def test_echo_reports_the_request_target_byte_for_byte(worker: Worker) -> None:
    """/echo returns the target as sent: no %7E decoding, no '..' resolution, trailing '&' kept."""
    target = b"/echo/%7E/a/../b?x=1&"
    request = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nX-Dup: 1\r\nx-dup: 2\r\nConnection: close\r\n\r\n"
    head, body = raw_request(worker.port, request)
    assert head.startswith(b"HTTP/1.1 200 ")
    report = json.loads(body)
    assert report["raw_path"] == target.decode()
    assert report["method"] == "GET"
    assert report["version"] == "1.1"
    # Order and case of header names are preserved, duplicates included.
    assert report["headers"] == [["Host", "t"], ["X-Dup", "1"], ["x-dup", "2"], ["Connection", "close"]]
    assert (report["body_length"], report["body"]) == (0, "")


async def test_echo_digests_a_large_body_without_returning_it(worker: Worker) -> None:
    """A 1 MiB POST comes back as its length and sha256; the text is omitted above 64 KiB."""
    body = random.Random(1).randbytes(1024 * 1024)
    async with aiohttp.ClientSession() as session:
        async with session.post(worker.url + "/echo/upload", data=body) as response:
            report = await response.json()
    assert report["body_length"] == len(body)
    assert report["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert report["body"] is None


async def test_echo_returns_a_small_body_as_text(worker: Worker) -> None:
    """A small body is echoed as text, with undecodable bytes replaced."""
    async with aiohttp.ClientSession() as session:
        async with session.put(worker.url + "/echo", data=b"h\xc3\xa9llo \xff") as response:
            report = await response.json()
    assert (report["method"], report["body_length"], report["body"]) == ("PUT", 8, "héllo \ufffd")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_bytes_streams_the_requested_length(worker: Worker, chunked: bool) -> None:
    """/bytes/1048576 sends exactly 1 MiB of the pattern, framed by Content-Length or chunked."""
    n = 1024 * 1024
    query = "?chunked=1" if chunked else ""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{worker.url}/bytes/{n}{query}") as response:
            body = await response.read()
            if chunked:
                assert "Content-Length" not in response.headers
                assert response.headers["Transfer-Encoding"] == "chunked"
            else:
                assert response.headers["Content-Length"] == str(n)
    assert len(body) == n
    assert body == (PATTERN * (n // len(PATTERN)))


async def test_status_answers_with_the_requested_code(worker: Worker) -> None:
    """/status/503 answers 503 with X-Backend; /status/204 has no body."""
    async with aiohttp.ClientSession() as session:
        async with session.get(worker.url + "/status/503") as response:
            assert response.status == 503
            assert response.headers["X-Backend"] == worker.worker_id
        async with session.get(worker.url + "/status/204") as response:
            assert (response.status, await response.read()) == (204, b"")


async def test_slow_waits_at_least_the_requested_time(worker: Worker) -> None:
    """/slow?ms=100 answers 'slow 100' no sooner than 100 ms."""
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.get(worker.url + "/slow", params={"ms": "100"}) as response:
            assert await response.text() == "slow 100"
        assert time.monotonic() - started >= 0.1


async def test_health_follows_the_control_endpoints(worker: Worker) -> None:
    """/health is 200 'ok', 503 after PUT /_control/health/503, and 200 again after reset."""
    async with aiohttp.ClientSession(base_url=worker.url) as session:
        async with session.get("/health") as response:
            assert (response.status, await response.text()) == (200, "ok")
        async with session.put("/_control/health/503") as response:
            assert response.status == 200
        async with session.get("/health") as response:
            assert response.status == 503
        async with session.put("/_control/reset") as response:
            assert response.status == 200
        async with session.get("/health") as response:
            assert (response.status, await response.text()) == (200, "ok")


async def test_hang_accepts_connections_but_never_answers(worker: Worker) -> None:
    """After PUT /_control/hang, /health connects but does not answer; reset restores it."""
    async with aiohttp.ClientSession(base_url=worker.url) as session:
        async with session.put("/_control/hang") as response:
            assert response.status == 200
        timeout = aiohttp.ClientTimeout(connect=2.0, sock_read=0.3)
        with pytest.raises(asyncio.TimeoutError):
            async with session.get("/health", timeout=timeout):
                pass
        async with session.put("/_control/reset") as response:
            assert response.status == 200
        async with session.get("/health") as response:
            assert response.status == 200


async def test_websocket_echoes_text_and_binary(worker: Worker) -> None:
    """/ws sends back each text and binary message unchanged."""
    async with aiohttp.ClientSession() as session, session.ws_connect(worker.url + "/ws") as ws:
        await ws.send_str("héllo")
        assert await ws.receive_str(timeout=5) == "héllo"
        await ws.send_bytes(b"\x00\x01\xff")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01\xff"


def test_idle_keepalive_connection_is_closed_after_the_timeout(start_worker: Callable[..., Worker]) -> None:
    """--keepalive-timeout 0.5 closes an idle keep-alive connection well before the 75 s default."""
    worker = start_worker("--keepalive-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10.0) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        data = bytearray()
        started = time.monotonic()
        while chunk := sock.recv(65536):  # EOF is the server closing the idle connection
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nok")
    assert time.monotonic() - started < 5.0


def test_options_fall_back_to_environment_variables(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """With no options, BALANCER_PORT and BALANCER_WORKER_ID configure the worker."""

    def launch(port: int, stderr_path: Path) -> subprocess.Popen[bytes]:
        procs.append(spawn([], stderr_path, env={"BALANCER_PORT": str(port), "BALANCER_WORKER_ID": "env"}))
        return procs[-1]

    start_on_free_port(launch, tmp_path, "env")  # fails the test unless it answers as "env"


# --- lifecycle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_cleanly(worker: Worker, signum: signal.Signals) -> None:
    """SIGTERM or SIGINT makes the worker exit with status 0 and no traceback."""
    worker.proc.send_signal(signum)
    assert worker.wait_exit() == 0
    assert "Traceback" not in worker.stderr()


def send_in_flight(port: int, target: str) -> socket.socket:
    """Send a GET and return once the worker has routed it (it answered `Expect: 100-continue`).

    aiohttp answers the expectation after routing and before the handler, so this is a sync point
    for "the request is in flight" that needs no sleep.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=STOP_DEADLINE_S)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n".encode())
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        interim += sock.recv(1)
    assert interim.startswith(b"HTTP/1.1 100 ")
    return sock


def test_stop_lets_an_in_flight_request_finish(worker: Worker) -> None:
    """A request in flight when SIGTERM arrives still gets its response; then the exit status is 0."""
    with send_in_flight(worker.port, "/slow?ms=300") as sock:
        worker.proc.send_signal(signal.SIGTERM)
        response = bytearray()
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"slow 300")
    assert worker.wait_exit() == 0


def test_stop_is_bounded_when_a_request_hangs(worker: Worker) -> None:
    """A hung worker with a request in flight still exits 0 within the stop deadline."""
    raw_request(worker.port, b"PUT /_control/hang HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    with send_in_flight(worker.port, "/health"):
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait_exit() == 0
    assert "Traceback" not in worker.stderr()


async def test_stop_closes_open_websockets(worker: Worker) -> None:
    """An open WebSocket does not hold up the stop: the client gets a close frame, exit is 0."""
    async with aiohttp.ClientSession() as session, session.ws_connect(worker.url + "/ws") as ws:
        worker.proc.send_signal(signal.SIGTERM)
        message = await ws.receive(timeout=STOP_DEADLINE_S)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == aiohttp.WSCloseCode.GOING_AWAY
    assert worker.wait_exit() == 0


def test_port_in_use_exits_with_status_1(tmp_path: Path) -> None:
    """A port that cannot be bound is reported on stderr, exit status 1, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn(["--port", str(port)], tmp_path / "busy.stderr")
        try:
            status = proc.wait(timeout=START_DEADLINE_S)
        finally:
            kill_and_reap(proc)
    stderr = (tmp_path / "busy.stderr").read_text()
    assert status == 1
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr


INTERMEDIATE = """
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-m", "backends", "--port", sys.argv[1]],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
print(worker.pid, flush=True)
worker.wait()
"""


def test_worker_exits_when_its_parent_is_killed(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL the process that spawned the worker: the worker exits by itself within 3 s."""

    def launch(port: int, stderr_path: Path) -> subprocess.Popen[bytes]:
        with stderr_path.open("wb") as stderr:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", INTERMEDIATE, str(port)],
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                )
            )
        return procs[-1]

    parent, _, stderr_path = start_on_free_port(launch, tmp_path)
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait(timeout=STOP_DEADLINE_S)
        wait_until(partial(is_pid_gone, worker_pid), 3.0, "the orphaned worker to exit")
    finally:
        if not is_pid_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
    assert "Traceback" not in stderr_path.read_text()


async def test_parent_watch_fires_once_the_parent_pid_changes() -> None:
    """The polling fallback calls back as soon as getppid() stops returning the original parent."""
    answers = iter([100, 100, 1])
    orphaned = asyncio.Event()
    await asyncio.wait_for(
        watch_parent(100, orphaned.set, interval_s=0, getppid=lambda: next(answers)), timeout=5
    )
    assert orphaned.is_set()
