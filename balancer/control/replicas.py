"""Several proxy processes on one port: ``processes: N`` (``auto`` = cores; old key: ``workers``).

Theory of operation
-------------------
The process started by ``balancer run`` (the *main* process) is the only one that owns state: it
spawns and supervises the backend workers, runs the health checks and passive health, serves the admin
API, and applies reloads. It also proxies, like every other process: with ``processes: N`` it starts
N - 1 *replica* processes, and all N bind the data port with ``SO_REUSEPORT``, so the kernel spreads
client connections over them. Each process has its own event loop, upstream connections and
in-flight counts (as nginx worker processes do; ``least_loaded`` therefore balances per process).

One health checker, whose results reach every process: the main process sends each replica a snapshot
of every backend (address, weight, effective weight, alive/healthy/ejected/admin flags) whenever its
registry changes (checked every 20 ms, and at once on a readiness flip), over a socketpair, as JSON
lines. A replica applies the snapshot to its own registry replica, so a backend that dies, fails its
checks, is drained or disabled leaves rotation in every process.

What happens in replicas flows back the same way, batched every 100 ms: each finished request's record
(so /stats, /metrics and the slow log count every process), each attempt's outcome (so passive health
sees all traffic), and the replica's in-flight count per backend (so a drain waits for all of them).
Replicas write their own access-log lines.

A replica that dies is restarted (with backoff); one that cannot reach its main process (EOF on the
socketpair, or the kernel's parent-death signal) exits. Reload: the main process applies the file, then
tells replicas to re-read it for routes, pool settings and limits (backends come with the next
snapshot). Stop: replicas are told to drain and exit, then the main process drains itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from ..config.models import Config, HealthConfig, PoolConfig, PoolMap
from ..dataplane.connections import ConnectionTable
from ..dataplane.proxy import Proxy
from ..dataplane.record import RequestRecord
from ..lb.registry import AdminState, Backend, Registry
from ..lb.supervisor import RestartPolicy, child_setup, describe_exit

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.02
RESYNC_INTERVAL_S = 1.0
BATCH_INTERVAL_S = 0.1
# The channel: JSON messages, each after its length (4 bytes, big-endian); a longer one is an error
# that restarts the replica, never a silent stop.
FRAME = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
# A replica whose channel is backed up this far stops writing until it drains; meanwhile it keeps up
# to MAX_PENDING_RECORDS records, and folds the rest into counts per (pool, backend, route, status).
HIGH_WATER = 1024 * 1024
MAX_PENDING_RECORDS = 20_000
SYNC_ACK_TIMEOUT_S = 2.0


class ChannelError(Exception):
    """The channel between the main process and a replica carried something it must not."""


def frame(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    if len(payload) > MAX_FRAME:
        raise ChannelError(f"message of {len(payload)} bytes, over {MAX_FRAME}")
    return FRAME.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message; None at a clean end of the channel."""
    try:
        head = await reader.readexactly(FRAME.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ChannelError("channel closed inside a frame header") from None
    (size,) = FRAME.unpack(head)
    if size > MAX_FRAME:
        raise ChannelError(f"frame of {size} bytes, over {MAX_FRAME}")
    try:
        message: dict[str, Any] = json.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        raise ChannelError("channel closed inside a frame") from None
    return message
_RECORD_FIELDS = ("start", "wall", "method", "client", "route", "pool", "backend", "status",
                  "upstream_status", "attempts", "error", "bytes_in", "bytes_out", "queue_s", "connect_s",
                  "ttfb_s", "total_s", "version", "listener", "fault")
_TOTAL_S = _RECORD_FIELDS.index("total_s")


class Host(Protocol):
    """What this module reads of the balancer it runs in (main or replica), and may ask of it."""

    @property
    def config(self) -> Config: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def connections(self) -> ConnectionTable: ...
    @property
    def proxy(self) -> Proxy: ...
    @property
    def stop_event(self) -> asyncio.Event: ...

    def attach_backend(self, backend: Backend, p: PoolConfig | None = None) -> None: ...
    def remote_observers(self) -> list[Callable[[RequestRecord], None]]: ...
    def start_rollout(self, work: Any, name: str) -> None: ...
    async def reload(self, config: Config) -> list[str]: ...
    async def startup(self) -> None: ...
    async def shutdown(self, drain_timeout: float | None = None) -> None: ...
    @property
    def ports(self) -> tuple[int, ...]: ...


def backend_state(b: Backend) -> dict[str, Any]:
    return {"id": b.id, "pool": b.pool, "host": b.host, "port": b.port, "weight": b.weight,
            "ew": b.effective_weight, "alive": b.alive, "healthy": b.healthy, "ejected": b.ejected,
            "admin": b.admin.value, "spawned": b.spawned, "reason": b.reason}


def replica_config(config: Config) -> Config:
    """A replica's view: same routes and pool settings, but no backends, workers or checks of its
    own (they come from the main process) and no admin listener."""
    pools = PoolMap(replace(p, spawn=None, servers=(), discovery=None, health=HealthConfig(enabled=False),
                            passive=replace(p.passive, enabled=False))
                    for p in config.pools.values())
    return replace(config, pools=pools, admin=None, monitor=None, processes=1)


# --- the main process's side -------------------------------------------------------------------------


class Replica:
    """One replica process and its socketpair, seen from the main process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.restarts = 0
        self.in_flight: dict[str, int] = {}
        self.last_exit = ""
        self.acked = 0                    # the last snapshot it said it applied
        self.acked_event = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None


class ProxyProcesses:
    """The main process's replicas: started, kept in sync, fed back, restarted, stopped."""

    def __init__(self, balancer: Host, count: int, config_path: str,
                 policy: RestartPolicy | None = None) -> None:
        self.balancer = balancer
        self.replicas = [Replica(i) for i in range(1, count)]
        self.config_path = config_path
        self.policy = policy or RestartPolicy()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._synced_version: object = None
        self._wake = asyncio.Event()
        self._seq = 0

    async def start(self, ports: tuple[int, ...]) -> None:
        self.ports = ports
        loop = asyncio.get_running_loop()
        for backend_set in self.balancer.registry.pools.values():
            backend_set.subscribe(lambda b, ready: self._wake.set())
        self._tasks.append(loop.create_task(self._sync_forever(), name="replica sync"))
        for replica in self.replicas:
            self._tasks.append(loop.create_task(self._run(replica), name=f"replica {replica.index}"))

    def _version(self) -> object:
        return tuple((name, s.version) for name, s in self.balancer.registry.pools.items())

    def snapshot(self) -> bytes:
        self._seq += 1
        backends = [backend_state(b) for b in self.balancer.registry.backends()]
        return frame({"t": "state", "seq": self._seq, "backends": backends})

    async def sync(self, timeout: float = SYNC_ACK_TIMEOUT_S) -> bool:
        """Send the registry now and wait until every running replica says it applied it (an
        operator's drain returns once every process stops sending new requests there)."""
        self.broadcast(self.snapshot())
        seq = self._seq
        live = [r for r in self.replicas if r.writer is not None and not r.writer.is_closing()]
        deadline = asyncio.get_running_loop().time() + timeout
        for replica in live:
            while replica.acked < seq and replica.writer is not None:
                replica.acked_event.clear()
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await replica.acked_event.wait()
        return True

    async def _sync_forever(self) -> None:
        last_sent = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SYNC_INTERVAL_S):
                    await self._wake.wait()
            self._wake.clear()
            version = self._version()
            # On every change, and once a second regardless (a replica that missed or could not yet
            # use an update, e.g. during a reload, catches up).
            if version != self._synced_version or time.monotonic() - last_sent >= RESYNC_INTERVAL_S:
                self._synced_version = version
                last_sent = time.monotonic()
                self.broadcast(self.snapshot())

    def broadcast(self, line: bytes) -> None:
        for replica in self.replicas:
            if replica.writer is not None and not replica.writer.is_closing():
                replica.writer.write(line)

    def tell_reload(self) -> None:
        """The new backends first, then the reload: a replica that adds a pool finds its backends."""
        self.broadcast(self.snapshot())
        self.broadcast(frame({"t": "reload"}))

    async def _run(self, replica: Replica) -> None:
        """Start the replica, feed it, restart it when it dies (backoff), until stopped."""
        crashes: list[float] = []
        while not self._stopping:
            started = time.monotonic()
            await self._serve_one(replica)
            if self._stopping:
                return
            crashes.append(time.monotonic())
            failures = 1 if time.monotonic() - started >= self.policy.stable_after_s else len(crashes)
            delay = self.policy.next_delay(crashes, time.monotonic(), failures) or self.policy.max_s
            log.warning("proxy process %d %s; restarting in %.2fs", replica.index, replica.last_exit, delay)
            await asyncio.sleep(delay)
            replica.restarts += 1

    async def _serve_one(self, replica: Replica) -> None:
        ours, theirs = socket.socketpair()
        try:
            replica.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "balancer", "_replica", "-c", self.config_path,
                "--fd", str(theirs.fileno()), "--ports", ",".join(map(str, self.ports)),
                "--index", str(replica.index),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL, preexec_fn=child_setup)
        finally:
            theirs.close()
        reader, replica.writer = await asyncio.open_connection(sock=ours)
        replica.writer.write(self.snapshot())
        log.info("proxy process %d pid %d started", replica.index, replica.process.pid)
        feed = self.watch_feed(replica, reader)
        code = await replica.process.wait()
        replica.last_exit = describe_exit(code)
        feed.cancel()
        await asyncio.gather(feed, return_exceptions=True)
        replica.writer.close()
        replica.writer = None
        replica.in_flight = {}
        replica.acked_event.set()
        self._apply_in_flight()

    def watch_feed(self, replica: Replica, reader: asyncio.StreamReader) -> asyncio.Task[None]:
        """Read what ``replica`` reports, in a task that must not end while the replica runs: if the
        channel fails, the failure is logged and the replica killed (its runner restarts it)."""
        feed = asyncio.get_running_loop().create_task(self._feed(replica, reader))
        feed.add_done_callback(lambda task: self._feed_ended(replica, task))
        return feed

    def _feed_ended(self, replica: Replica, task: asyncio.Task[None]) -> None:
        """The feed must not stop while its replica runs: if it does, the replica is restarted."""
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is not None:
            log.error("proxy process %d: its channel failed (%s: %s); restarting it", replica.index,
                      exc.__class__.__name__, exc)
        if replica.process is not None and replica.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                replica.process.kill()

    async def _feed(self, replica: Replica, reader: asyncio.StreamReader) -> None:
        """What the replica reports: request records (and counts of those it folded), attempt
        outcomes, in-flight counts, acknowledgements."""
        b = self.balancer
        while (message := await read_frame(reader)) is not None:
            backends = {x.id: x for x in b.registry.backends()}
            observers = b.remote_observers()
            for values in message.get("records", ()):
                record = _record(values)
                for observer in observers:
                    observer(record)
            for values, count in message.get("folded", ()):
                for _ in range(count):
                    record = _record(values)
                    for observer in observers:
                        observer(record)
            if "ack" in message:
                replica.acked = int(message["ack"])
                replica.acked_event.set()
            for backend_id, ok, status in message.get("outcomes", ()):
                backend = backends.get(backend_id)
                if backend is not None:
                    b.proxy.report_outcome(backend, ok, status)
            if "in_flight" in message:
                replica.in_flight = message["in_flight"]
                self._apply_in_flight()

    def _apply_in_flight(self) -> None:
        totals: dict[str, int] = {}
        for replica in self.replicas:
            for backend_id, n in replica.in_flight.items():
                totals[backend_id] = totals.get(backend_id, 0) + n
        registry = self.balancer.registry
        for backend in registry.backends():
            registry.set_remote_in_flight(backend, totals.get(backend.id, 0))

    async def aclose(self, drain_timeout: float) -> None:
        """Tell every replica to drain and exit; SIGKILL the ones still there after the deadline."""
        self._stopping = True
        self.broadcast(frame({"t": "stop", "timeout": drain_timeout}))
        running = [r.process for r in self.replicas if r.process is not None and r.pid is not None]
        for process in running:          # the same request by signal, should a replica not be listening
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout + 2.0):
                await asyncio.gather(*(p.wait() for p in running))
        for process in running:
            if process.returncode is None:
                log.warning("proxy process pid %d did not stop in time: SIGKILL", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def info(self) -> list[dict[str, Any]]:
        return [{"index": r.index, "pid": r.pid, "restarts": r.restarts, "last_exit": r.last_exit}
                for r in self.replicas]


def _record(values: list[Any]) -> RequestRecord:
    fields = dict(zip(_RECORD_FIELDS, values, strict=False))
    record = RequestRecord(fields["start"], fields["wall"], fields["method"], values[-2].encode("latin-1"),
                           fields["client"])
    for name in _RECORD_FIELDS[4:]:
        setattr(record, name, fields[name])
    record.request_id = values[-1].encode("latin-1")
    return record


def record_values(r: RequestRecord) -> list[Any]:
    return [*(getattr(r, name) for name in _RECORD_FIELDS), r.target.decode("latin-1"),
            r.request_id.decode("latin-1")]


# --- the replica's side ------------------------------------------------------------------------------


class ReplicaLink:
    """In a replica: applies the main process's snapshots, batches records and outcomes back."""

    def __init__(self, balancer: Host, fd: int, on_stop: Callable[[float], None],
                 on_reload: Callable[[], None]) -> None:
        self.balancer = balancer
        self._fd = fd
        self._on_stop = on_stop
        self._on_reload = on_reload
        self._records: list[list[Any]] = []
        self._folded: dict[str, tuple[list[Any], int]] = {}     # records over the cap, counted
        self._outcomes: list[tuple[str, bool, int]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.first_state = asyncio.Event()
        self.last_states: list[dict[str, Any]] = []

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=socket.socket(fileno=self._fd))
        self.balancer.proxy.add_observer(self._keep)
        self.balancer.proxy.add_outcome_listener(self._keep_outcome)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(reader)), loop.create_task(self._report())]

    def _keep_outcome(self, backend: Backend, ok: bool, status: int) -> None:
        if len(self._outcomes) < MAX_PENDING_RECORDS:      # past it (backed up): passive health is
            self._outcomes.append((backend.id, ok, status))  # told the first ones, enough to eject

    def _keep(self, record: RequestRecord) -> None:
        """Observer: a finished request, to report. Past the cap (the channel is backed up), it is
        folded into a count of requests like it, with their mean duration."""
        if len(self._records) < MAX_PENDING_RECORDS:
            self._records.append(record_values(record))
            return
        key = f"{record.pool}\0{record.backend}\0{record.route}\0{record.status}\0{record.error}"
        held = self._folded.get(key)
        if held is None:
            self._folded[key] = (record_values(record), 1)
        else:
            values, count = held
            values[_TOTAL_S] = (values[_TOTAL_S] * count + record.total_s) / (count + 1)
            self._folded[key] = (values, count + 1)

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await read_frame(reader)) is not None:
                try:
                    if message["t"] == "state":
                        self.last_states = message["backends"]
                        self.apply(self.last_states)
                        self.first_state.set()
                        self._writer.write(frame({"ack": message.get("seq", 0)}))
                    elif message["t"] == "reload":
                        self._on_reload()
                    elif message["t"] == "stop":
                        self._on_stop(float(message["timeout"]))
                except Exception:
                    log.exception("proxy process: bad message from the main process: %r", str(message)[:200])
        except ChannelError as exc:
            log.error("proxy process: channel from the main process failed: %s", exc)
        log.warning("main process gone: stopping")
        self._on_stop(1.0)

    def apply(self, states: list[dict[str, Any]]) -> None:
        """Make this process's registry match the main process's snapshot."""
        b = self.balancer
        seen: set[str] = set()
        for state in states:
            seen.add(state["id"])
            if state["pool"] not in b.config.pools:
                continue          # a pool from a reload this process has not read yet: next time
            backend_set = b.registry.pool(state["pool"])
            backend = backend_set.get(state["id"])
            if backend is None:
                backend = Backend(id=state["id"], pool=state["pool"], host=state["host"], port=state["port"],
                                  weight=state["weight"], spawned=state["spawned"], alive=False)
                backend_set.add(backend)
                b.attach_backend(backend)
            if (backend.host, backend.port) != (state["host"], state["port"]):
                b.connections.remove(backend.id)
                b.registry.move(backend, state["host"], state["port"])
                b.attach_backend(backend)
            b.registry.copy_state(backend, weight=state["weight"], effective_weight=float(state["ew"]),
                                  alive=state["alive"], healthy=state["healthy"], ejected=state["ejected"],
                                  admin=AdminState(state["admin"]), reason=state["reason"])
        for backend in list(b.registry.backends()):
            if backend.id not in seen:
                b.registry.pool(backend.pool).remove(backend.id)
                b.connections.remove(backend.id)

    async def _report(self) -> None:
        transport = self._writer.transport
        while True:
            await asyncio.sleep(BATCH_INTERVAL_S)
            if transport.get_write_buffer_size() > HIGH_WATER:
                continue                # backed up: keep (and past the cap, fold) until it drains
            in_flight = {x.id: x.in_flight for x in self.balancer.registry.backends() if x.in_flight}
            message: dict[str, Any] = {"in_flight": in_flight}
            if self._records:
                message["records"], self._records = self._records, []
            if self._folded:
                message["folded"] = list(self._folded.values())
                self._folded = {}
            if self._outcomes:
                message["outcomes"], self._outcomes = self._outcomes, []
            self._writer.write(frame(message))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            self._writer.close()


async def run_replica(make_balancer: Callable[..., Host], config: Config, fd: int, ports: tuple[int, ...],
                      index: int) -> None:
    """The body of ``balancer _replica``: a proxy process fed by the main process.
    ``make_balancer`` builds the process's balancer (the composition root, passed in so that this
    module does not import it)."""
    # A reload here adds pools without backends (they come from the main process): fill them in
    # before the new routes are switched on, so no request meets an empty new pool.
    link: ReplicaLink | None = None

    def fill_new_pools() -> None:
        if link is not None:
            link.apply(link.last_states)

    balancer = make_balancer(replica_config(config), listen_ports=ports, reuse_port=True,
                             before_routes_swap=fill_new_pools)
    loop = asyncio.get_running_loop()
    stop_timeout = [config.shutdown.drain_timeout_s]

    def on_stop(timeout: float) -> None:
        stop_timeout[0] = timeout
        balancer.stop_event.set()

    def on_reload() -> None:
        async def reload() -> None:
            from ..config.load import load_config
            try:
                await balancer.reload(replica_config(load_config(config.source)))
            except Exception:
                log.exception("proxy process %d: reload failed", index)
                return
            fill_new_pools()                 # backends of pools that only now exist here
        balancer.start_rollout(reload(), "replica reload")

    link = ReplicaLink(balancer, fd, on_stop, on_reload)
    await link.start()
    async with asyncio.timeout(30):
        await link.first_state.wait()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, balancer.stop_event.set)
    try:
        await balancer.startup()
        log.info("proxy process %d pid %d serving on port %s", index, os.getpid(),
                 ",".join(map(str, balancer.ports)))
        await balancer.stop_event.wait()
    finally:
        await balancer.shutdown(drain_timeout=stop_timeout[0])
        await link.aclose()

