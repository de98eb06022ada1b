"""Spawn, watch and restart the worker processes of ``spawn`` pools.

Theory of operation
-------------------
Each worker slot (``web/1`` .. ``web/N``) is driven by one task that loops::

    spawn -> wait until it accepts on its port -> alive -> await process exit -> not alive
          -> classify the exit -> back off (or quarantine) -> spawn again

*Liveness* is this module's business; *readiness* (health checks passing) is :mod:`.health`'s.
The task awaits the process object, so an exit is seen in the event-loop turn the child watcher reports
it, and the backend leaves rotation at once through ``Registry.set_alive``; nothing polls.

Restarts follow :class:`RestartPolicy` (pure): exponential backoff with jitter, reset after a stable
uptime; too many crashes inside a window quarantines the slot (logged, visible in stats) instead of
looping forever, as gunicorn's arbiter halts.

Workers never outlive balancer: each child is put in its own process group (so a terminal's Ctrl-C
reaches only balancer, which stops them in order) and asks the kernel for SIGTERM when balancer dies
(``PR_SET_PDEATHSIG``), which covers ``kill -9`` of balancer. Stopping is SIGTERM, a deadline, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import logging
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ..config.models import SpawnConfig
from .registry import Backend, Registry

log = logging.getLogger(__name__)

# balancer's own secrets in its environment, for its proxy replicas: never handed to workers.
PRIVATE_ENV = frozenset({"BALANCER_STICKY_SECRET"})

_PR_SET_PDEATHSIG = 1


class WorkerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    QUARANTINED = "quarantined"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When to restart a worker that exited. Pure: the caller passes times in."""

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2             # up to +20 %, so crashed workers do not restart in lockstep
    stable_after_s: float = 60.0    # an uptime this long resets the backoff
    max_crashes: int = 5            # this many crashes ...
    window_s: float = 60.0          # ... within this window -> quarantine

    def next_delay(self, crashes: Sequence[float], now: float, failures_in_a_row: int,
                   rand: Callable[[], float] = random.random) -> float | None:
        """Seconds to wait before the next start, or None to quarantine the slot."""
        recent = [t for t in crashes if now - t <= self.window_s]
        if len(recent) >= self.max_crashes:
            return None
        base = min(self.initial_s * self.factor ** max(failures_in_a_row - 1, 0), self.max_s)
        return base * (1.0 + self.jitter * rand())


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """How to start the workers of one pool: its ``spawn`` section, as configured."""

    pool: str
    spawn: SpawnConfig
    host: str = "127.0.0.1"


def describe_exit(returncode: int) -> str:
    """gunicorn-style cause of an exit, for logs and stats."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (perhaps out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return "exited cleanly" if returncode == 0 else f"exited with status {returncode}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def build_command(command: Sequence[str], port: int, worker_id: str) -> list[str]:
    """``python`` means our own interpreter; ``{port}``/``{id}`` placeholders, else ``--port N``."""
    argv = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    if any("{port}" in a for a in argv):
        return [a.replace("{port}", str(port)).replace("{id}", worker_id) for a in argv]
    return [a.replace("{id}", worker_id) for a in argv] + ["--port", str(port)]


def child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass(eq=False)
class Worker:
    """One supervised slot; survives restarts of its process."""

    spec: WorkerSpec
    index: int
    backend: Backend
    state: WorkerState = WorkerState.STOPPED
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    last_exit: str = ""
    started_at: float = 0.0
    next_start_at: float | None = None
    crashes: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    failures_in_a_row: int = 0
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    pump: asyncio.Task[None] | None = None      # reads the process's stderr
    retiring: bool = False                      # being stopped for good: no restart

    @property
    def id(self) -> str:
        return self.backend.id

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    def info(self) -> dict[str, object]:
        return {"pid": self.pid, "port": self.backend.port, "state": self.state.value,
                "restarts": self.restarts, "last_exit": self.last_exit,
                "next_start_in_s": (round(max(self.next_start_at - time.monotonic(), 0), 3)
                                    if self.next_start_at is not None else None)}

    def __repr__(self) -> str:
        return f"<Worker {self.id} pid={self.pid} {self.state.value} restarts={self.restarts}>"


class Supervisor:
    """Runs the worker slots of every spawn pool. Owner calls ``start`` then ``aclose``.

    Slots can be added and retired while running (reload, rolling restart); ``added_listeners`` and
    ``removed_listeners`` tell the owner so it can give a new backend its connections and health
    checks, and take them away again. Slot numbers only grow: a replacement of ``web/1`` is
    ``web/5``, so logs and stats never confuse two processes.
    """

    def __init__(self, registry: Registry, specs: Sequence[WorkerSpec], *,
                 policy: RestartPolicy = RestartPolicy(),
                 clock: Callable[[], float] = time.monotonic,
                 echo_stderr: bool = True) -> None:
        self.registry = registry
        self.policy = policy
        self._clock = clock
        self._echo_stderr = echo_stderr
        self.workers: list[Worker] = []
        self.specs: dict[str, WorkerSpec] = {}
        self._tasks: dict[Worker, asyncio.Task[None]] = {}
        self._next_index: dict[str, int] = {}
        self._started = False
        self._stopping = False
        self.added_listeners: list[Callable[[Backend], None]] = []
        self.removed_listeners: list[Callable[[Backend], None]] = []
        for spec in specs:
            self.specs[spec.pool] = spec
            for _ in range(spec.spawn.count):
                self._new_slot(spec)

    def _new_slot(self, spec: WorkerSpec) -> Worker:
        index = self._next_index.get(spec.pool, 0) + 1
        self._next_index[spec.pool] = index
        backend = Backend(id=f"{spec.pool}/{index}", pool=spec.pool, host=spec.host,
                          port=free_port(spec.host), spawned=True, alive=False, reason="starting")
        self.registry.pool(spec.pool).add(backend)
        worker = Worker(spec, index, backend)
        self.workers.append(worker)
        return worker

    def pool_workers(self, pool: str) -> list[Worker]:
        return [w for w in self.workers if w.spec.pool == pool and not w.retiring]

    async def start(self, wait: bool = True) -> None:
        """Start every slot; with ``wait``, return once each worker accepts or its first start failed."""
        self._started = True
        for worker in self.workers:
            self._start_slot(worker)
        if wait and self.workers:
            await self._wait_started(self.workers)

    def _start_slot(self, worker: Worker) -> None:
        self._tasks[worker] = asyncio.get_running_loop().create_task(self._run_slot(worker),
                                                                     name=f"worker {worker.id}")

    async def _wait_started(self, workers: Sequence[Worker]) -> None:
        deadline = max(w.spec.spawn.start_timeout_s for w in workers) + 1.0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                await asyncio.gather(*(w.ready_event.wait() for w in workers))

    # --- changing the set of slots (reload, rolling restart) -------------------------------------------

    def add_pool(self, spec: WorkerSpec) -> None:
        """A spawn pool added by a reload: remember its spec and start its workers."""
        self.specs[spec.pool] = spec
        for _ in range(spec.spawn.count):
            self.add_worker(spec)

    def forget_pool(self, pool: str) -> None:
        """A spawn pool that left the configuration, once its workers are retired."""
        self.specs.pop(pool, None)

    def add_worker(self, spec: WorkerSpec) -> Worker:
        """A new slot for ``spec.pool``, started at once; the owner is told through added_listeners."""
        self.specs[spec.pool] = spec
        worker = self._new_slot(spec)
        for listener in self.added_listeners:
            listener(worker.backend)
        if self._started:
            self._start_slot(worker)
        return worker

    async def retire(self, worker: Worker, timeout: float) -> None:
        """Stop one slot for good (no restart): SIGTERM, SIGKILL after ``timeout``, forget it."""
        worker.retiring = True
        if worker.process is not None:
            await self._terminate(worker.process, timeout)
        task = self._tasks.pop(worker, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if worker.pump is not None:
            worker.pump.cancel()
            await asyncio.gather(worker.pump, return_exceptions=True)
        worker.state = WorkerState.STOPPED
        self.workers.remove(worker)
        backend_set = self.registry.pool(worker.spec.pool)
        if backend_set.get(worker.id) is not None:
            backend_set.remove(worker.id)
        for listener in self.removed_listeners:
            listener(worker.backend)
        log.info("worker %s retired", worker.id)

    async def replace(self, pool: str, spec: WorkerSpec, *, ready_timeout: float,
                      drain: Callable[[Backend], Awaitable[object]], stop_timeout: float) -> int:
        """Surge-then-drain: for each old worker, start a new one from ``spec``, wait until it is
        ready (process up and health passed), then drain and retire the old one. The pool never has
        fewer ready workers than before. Then grow or shrink to ``spec.spawn.count``. Returns how many
        workers were started. A new worker that does not become ready stops the rollout (the old
        ones stay)."""
        old = self.pool_workers(pool)
        started = 0
        for previous in old:
            fresh = self.add_worker(spec)
            started += 1
            if not await self._wait_ready(fresh, ready_timeout):
                log.error("rollout of pool %s stopped: %s not ready within %gs (%s); keeping the old "
                          "workers", pool, fresh.id, ready_timeout, fresh.last_exit or fresh.backend.reason)
                await self.retire(fresh, stop_timeout)
                return started
            await drain(previous.backend)
            await self.retire(previous, stop_timeout)
        return started + await self.scale(pool, spec, ready_timeout=ready_timeout, drain=drain,
                                          stop_timeout=stop_timeout)

    async def scale(self, pool: str, spec: WorkerSpec, *, ready_timeout: float,
                    drain: Callable[[Backend], Awaitable[object]], stop_timeout: float) -> int:
        """Add or retire (drained, newest first) workers until the pool has ``spec.spawn.count``."""
        self.specs[pool] = spec
        current = self.pool_workers(pool)
        added = [self.add_worker(spec) for _ in range(spec.spawn.count - len(current))]
        for worker in added:
            await self._wait_ready(worker, ready_timeout)
        for worker in reversed(current[spec.spawn.count:]):
            await drain(worker.backend)
            await self.retire(worker, stop_timeout)
        return len(added)

    async def _wait_ready(self, worker: Worker, timeout: float) -> bool:
        deadline = self._clock() + timeout
        while self._clock() < deadline:
            if worker.backend.is_ready:
                return True
            if worker.state is WorkerState.QUARANTINED:
                return False
            await asyncio.sleep(0.02)
        return worker.backend.is_ready

    # --- one slot --------------------------------------------------------------------------------------

    async def _run_slot(self, worker: Worker) -> None:
        while not self._stopping and not worker.retiring:
            started = await self._spawn(worker)
            if started:
                await self._watch(worker)
            worker.ready_event.set()
            if self._stopping or worker.retiring:
                break
            now = self._clock()
            worker.crashes.append(now)
            delay = self.policy.next_delay(worker.crashes, now, worker.failures_in_a_row)
            if delay is None:
                worker.state = WorkerState.QUARANTINED
                worker.next_start_at = None
                self.registry.set_alive(worker.backend, False, "quarantined")
                log.error("worker %s quarantined: %d crashes within %gs (last: %s); not restarting",
                          worker.id, len(worker.crashes), self.policy.window_s, worker.last_exit)
                return
            worker.state = WorkerState.BACKOFF
            worker.next_start_at = now + delay
            log.warning("worker %s %s; restarting in %.2fs", worker.id, worker.last_exit, delay)
            await asyncio.sleep(delay)
            worker.restarts += 1
        worker.state = WorkerState.STOPPED

    async def _spawn(self, worker: Worker) -> bool:
        """Start the process and wait until it accepts connections. False if it never did."""
        spec, backend = worker.spec, worker.backend
        argv = build_command(spec.spawn.command, backend.port, worker.id)
        inherited = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        env = {**inherited, **dict(spec.spawn.env),
               "BALANCER_PORT": str(backend.port), "BALANCER_HOST": backend.host,
               "BALANCER_WORKER_ID": worker.id, "BALANCER_PARENT_PID": str(os.getpid()),
               "BALANCER_KEEPALIVE_TIMEOUT": f"{spec.spawn.keepalive_timeout_s:g}"}
        worker.state = WorkerState.STARTING
        worker.next_start_at = None
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=spec.spawn.cwd, stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, preexec_fn=child_setup)
        except OSError as exc:
            worker.last_exit = f"could not start {argv[0]!r}: {exc.strerror or exc}"
            worker.failures_in_a_row += 1
            log.error("worker %s: %s", worker.id, worker.last_exit)
            return False
        worker.process = process
        worker.started_at = self._clock()
        assert process.stderr is not None
        pump = worker.pump = asyncio.get_running_loop().create_task(
            self._pump_stderr(worker, process.stderr))
        if await self._wait_accepting(worker, process):
            worker.state = WorkerState.RUNNING
            worker.ready_event.set()
            self.registry.set_alive(backend, True)
            log.info("worker %s pid %d accepting on %s", worker.id, process.pid, backend.address)
            return True
        # It never accepted: it exited, or hung past the start timeout.
        if process.returncode is None:
            await self._terminate(process, spec.spawn.start_timeout_s)
            cause = f"did not accept connections within {spec.spawn.start_timeout_s:g}s"
        else:
            cause = describe_exit(process.returncode)
        await asyncio.wait([pump], timeout=1.0)
        worker.last_exit = f"failed to start ({cause})"
        worker.failures_in_a_row += 1
        tail = "\n    ".join(worker.stderr_tail) or "(no output)"
        log.error("worker %s %s; last stderr lines:\n    %s", worker.id, worker.last_exit, tail)
        return False

    async def _wait_accepting(self, worker: Worker, process: asyncio.subprocess.Process) -> bool:
        """Poll-connect the worker's port until it accepts, it exits, or the start timeout passes."""
        deadline = self._clock() + worker.spec.spawn.start_timeout_s
        exited = asyncio.ensure_future(process.wait())
        try:
            delay = 0.01
            while self._clock() < deadline and not exited.done() and not self._stopping:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection(worker.backend.host, worker.backend.port)
                    writer.close()
                    return True
                await asyncio.wait([exited], timeout=delay)
                delay = min(delay * 2, 0.2)
            return False
        finally:
            if not exited.done():
                exited.cancel()

    async def _watch(self, worker: Worker) -> None:
        """Await the process; the moment it exits, take the backend out of rotation."""
        process = worker.process
        assert process is not None
        returncode = await process.wait()
        self.registry.set_alive(worker.backend, False, describe_exit(returncode))
        worker.last_exit = describe_exit(returncode)
        uptime = self._clock() - worker.started_at
        if uptime >= self.policy.stable_after_s:
            worker.failures_in_a_row = 1
            worker.crashes.clear()
        else:
            worker.failures_in_a_row += 1
        if self._stopping:
            log.info("worker %s pid %d %s", worker.id, process.pid, worker.last_exit)

    async def _pump_stderr(self, worker: Worker, stream: asyncio.StreamReader) -> None:
        """Keep the last lines of the worker's stderr and echo them with the worker's name."""
        while True:
            try:
                line = await stream.readline()
            except ValueError:          # a line longer than the stream limit
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            worker.stderr_tail.append(text)
            if self._echo_stderr:
                # Through logging (written by the log thread), never a blocking write on the loop.
                logging.getLogger(f"worker.{worker.id}").info("%s", text)

    async def _terminate(self, process: asyncio.subprocess.Process, timeout: float) -> None:
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(timeout):
                await process.wait()
        except TimeoutError:
            log.warning("pid %d ignored SIGTERM for %gs: SIGKILL", process.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    # --- shutdown ------------------------------------------------------------------------------------

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop restarting, SIGTERM every worker, SIGKILL what is left after ``timeout``."""
        self._stopping = True
        for worker in self.workers:
            if worker.pid is not None:
                worker.state = WorkerState.STOPPING
        running = [w.process for w in self.workers if w.process is not None and w.pid is not None]
        await asyncio.gather(*(self._terminate(p, timeout) for p in running))
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        pumps = [w.pump for w in self.workers if w.pump is not None]
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for worker in self.workers:
            worker.state = WorkerState.STOPPED

    def kill_now(self) -> None:
        """Second signal: SIGKILL every worker at once (the fast exit)."""
        self._stopping = True
        for worker in self.workers:
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
