"""The composition root: builds every part from the configuration and runs the lifecycle.

``startup -> serve until a signal -> shutdown`` (uvicorn's shape). The only module that imports
everything; nothing here decides anything a module below could decide itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..config.load import Config, PoolConfig, load_config
from ..config.models import ClientTimeoutsConfig, LimitsConfig, ListenConfig
from ..dataplane import compiled
from ..dataplane.connections import ConnectionTable
from ..dataplane.frontdoor import FrontDoor
from ..dataplane.headers import AddressSet
from ..dataplane.proxy import PoolRuntime, Proxy
from ..dataplane.record import RequestRecord
from ..dataplane.tls import ClientTLS, ServerTLS, client_tls
from ..errors import ConfigError
from ..lb.discovery import DnsDiscovery
from ..lb.health import HealthChecker, SlowStart
from ..lb.passive import PassiveHealth
from ..lb.registry import AdminState, Backend, Registry, wait_drained
from ..lb.supervisor import RestartPolicy, Supervisor, WorkerSpec
from ..observe.accesslog import AccessLog
from ..observe.metrics import exposition
from .admin import Admin
from .listeners import Listeners, load_tls
from .monitor import Monitor
from .reload import Reload
from .replicas import SYNC_ACK_TIMEOUT_S, ProxyProcesses
from .wiring import connection_limits, health_policy, pool_runtime, router_for, worker_spec

log = logging.getLogger(__name__)

# The main process's secret for sticky cookies that have none configured; its proxy replicas (child
# processes) read it from here, so that every process of one balancer signs alike.
STICKY_SECRET_ENV = "BALANCER_STICKY_SECRET"

# On shutdown, how long idle keep-alive clients may still send one more request (answered with
# `Connection: close`) before their connections are closed.
KEEPALIVE_GRACE_S = 1.0


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sticky_secret() -> bytes:
    """The process's secret for sticky cookies: its parent's (a replica), else a new one."""
    secret = os.environ.get(STICKY_SECRET_ENV)
    if not secret:
        secret = os.environ[STICKY_SECRET_ENV] = os.urandom(32).hex()
    return bytes.fromhex(secret)


@dataclass
class Balancer:
    """Everything one balancer process runs."""

    config: Config
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    echo_worker_stderr: bool = True
    listen_ports: tuple[int, ...] | None = None  # override listen[].port (replicas bind the main's ports)
    reuse_port: bool = False              # SO_REUSEPORT on the data port (processes > 1)
    # In a proxy replica: fills new pools with the main process's backends during a reload, before
    # the new routes are switched on.
    before_routes_swap: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        cfg = self.config
        self.started_at = time.time()
        self._upstream_tls: dict[str, ClientTLS | None] = {}     # pool name -> TLS to its backends
        self._discoveries: dict[str, DnsDiscovery] = {}          # pool name -> its DNS discovery
        self._running = False
        self.sticky_secret = sticky_secret()
        self.registry = Registry()
        self.connections = ConnectionTable()
        self.health = HealthChecker(self.registry)
        # Passive health (live-traffic ejection) and slow start: see balancer/lb/passive.py, health.py.
        self.passive = PassiveHealth(self.registry, self.health)
        self.slow_start = SlowStart(self.registry)
        self.supervisor = Supervisor(self.registry, [worker_spec(p) for p in cfg.pools.values() if p.spawn],
                                     policy=self.restart_policy, echo_stderr=self.echo_worker_stderr)
        self.supervisor.added_listeners.append(self.attach_backend)
        self.supervisor.removed_listeners.append(self.forget_backend)
        runtimes: dict[str, PoolRuntime] = {}
        for p in cfg.pools.values():
            runtimes[p.name] = self.setup_pool(p)
        self.registry.alive_listeners.append(self.health.on_alive_changed)
        self.registry.alive_listeners.append(self.passive.on_alive_changed)
        self.proxy = Proxy(router_for(cfg), runtimes, self.connections,
                           AddressSet(cfg.trusted_proxies), cfg.limits)
        self.proxy.add_outcome_listener(self.passive.on_outcome)
        self.admin = Admin(self) if cfg.admin is not None else None
        self.monitor = Monitor(cfg.monitor, self) if cfg.monitor is not None else None
        # Off by default, and then not an observer at all: zero cost per request.
        self.access_log = (AccessLog(cfg.log.access_log_format, cfg.log.access_log_path)
                           if cfg.log.access_log else None)
        if self.access_log is not None:
            self.proxy.add_observer(self.access_log.observe)
        self._front_door: FrontDoor | None = None
        self._shut_down = False
        self._reload_lock = asyncio.Lock()
        self.processes: ProxyProcesses | None = None      # replicas, with processes > 1
        self._rollouts: set[asyncio.Task[None]] = set()
        self._listeners: Listeners | None = None
        self.stop_event = asyncio.Event()

    # --- building pools and backends (start-up and reload) ----------------------------------------------

    def setup_pool(self, p: PoolConfig) -> PoolRuntime:
        """Registry entry, external servers, listeners and the proxy's runtime for one pool.
        Spawned workers' backends already exist (the supervisor made them) and are attached here."""
        self._upstream_tls[p.name] = client_tls(p.tls)
        if p.discovery is not None:
            self._start_discovery(p)
        backend_set = self.registry.pool(p.name)
        for server in p.servers:
            backend_set.add(Backend(id=f"{p.name}/{server.address}", pool=p.name, host=server.host,
                                    port=server.port, weight=server.weight))
        for backend in backend_set:
            self.attach_backend(backend, p)
        backend_set.subscribe(lambda b, ready: self.connections.on_readiness(b.id, ready))
        self.passive.add_pool(p.name, p.passive)
        self.slow_start.add_pool(backend_set, p.slow_start_s)
        return pool_runtime(p, backend_set, self.sticky_secret)

    def attach_backend(self, backend: Backend, p: PoolConfig | None = None, *,
                       start_healthy: bool | None = None) -> None:
        """Give a backend its connections (BackendConnections) and (if configured) its health checks
        (spawned and discovered backends start unhealthy: checked before they take traffic)."""
        p = p or self.config.pools[backend.pool]
        tls = self._upstream_tls.get(p.name)
        self.connections.add(backend.id, backend.host, backend.port, connection_limits(p, self.config.limits),
                             tls)
        policy = health_policy(p)
        if policy is not None:
            healthy = not backend.spawned if start_healthy is None else start_healthy
            self.health.add(backend, policy, start_healthy=healthy,
                            tls=tls.context if tls else None, server_name=tls.server_name if tls else None)

    def set_upstream_tls(self, p: PoolConfig) -> None:
        """Reload: a pool's TLS settings changed; its backends' new connections and probes use them."""
        tls = self._upstream_tls[p.name] = client_tls(p.tls)
        for backend in self.registry.pool(p.name):
            conns = self.connections.get(backend.id)
            if conns is not None:
                conns.set_tls(tls)
            self.health.set_tls(backend, tls.context if tls else None, tls.server_name if tls else None)

    async def detach_backend(self, backend: Backend) -> None:
        """Undo attach_backend for a backend that left (drained already): see forget_backend."""
        task = self._forget(backend)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def retire_backend(self, backend: Backend) -> None:
        """A backend that left (a removed server, a vanished address): drain, then forget it."""
        await self.drain_backend(backend)
        backend_set = self.registry.pool(backend.pool)
        if backend_set.get(backend.id) is not None:
            backend_set.remove(backend.id)
        await self.detach_backend(backend)

    # --- DNS discovery ------------------------------------------------------------------------------

    def _start_discovery(self, p: PoolConfig) -> None:
        assert p.discovery is not None
        old = self._discoveries.pop(p.name, None)
        if old is not None:
            self.start_rollout(old.aclose(), f"stop discovery of {p.name}")
        name = p.name

        def on_change(found: frozenset[tuple[str, int]]) -> None:
            self._discovered(name, found)
        discovery = self._discoveries[name] = DnsDiscovery(name, p.discovery, on_change)
        if self._running:
            discovery.start()

    def restart_discovery(self, p: PoolConfig) -> None:
        """Reload: a pool's discovery settings changed (or it has none any more)."""
        if p.discovery is not None:
            self._start_discovery(p)
        else:
            self.stop_discovery(p.name)

    def stop_discovery(self, pool: str) -> None:
        old = self._discoveries.pop(pool, None)
        if old is not None:
            self.start_rollout(old.aclose(), f"stop discovery of {pool}")

    def discovery_state(self, pool: str) -> dict[str, object] | None:
        discovery = self._discoveries.get(pool)
        return discovery.snapshot() if discovery is not None else None

    def _discovered(self, pool: str, found: frozenset[tuple[str, int]]) -> None:
        """New addresses join (checked before they take traffic); vanished ones are drained."""
        p = self.config.pools.get(pool)
        if p is None:
            return
        backend_set = self.registry.pool(pool)
        wanted = {f"{pool}/{_address(host, port)}": (host, port) for host, port in found}
        configured = {f"{pool}/{server.address}" for server in p.servers}
        for backend_id, (host, port) in wanted.items():
            if backend_set.get(backend_id) is None:
                backend = Backend(id=backend_id, pool=pool, host=host, port=port)
                backend_set.add(backend)
                self.attach_backend(backend, p, start_healthy=health_policy(p) is None)
        for backend in list(backend_set):
            if not backend.spawned and backend.id not in wanted and backend.id not in configured \
                    and backend.admin is not AdminState.DRAINING:
                self.start_rollout(self.retire_backend(backend), f"retire {backend.id}")

    def forget_backend(self, backend: Backend) -> None:
        """A backend gone for good (a retired worker, told by the supervisor): its connections,
        probe task, passive state and statistics series go; nothing of it is left behind."""
        self._forget(backend)

    def _forget(self, backend: Backend) -> asyncio.Task[None] | None:
        self.connections.remove(backend.id)
        self.passive.forget(backend)
        if self.admin is not None:
            self.admin.forget_backend(backend)
        return self.health.forget(backend.id)

    @property
    def front_door(self) -> FrontDoor:
        """The data port's connections (after :meth:`startup`)."""
        assert self._front_door is not None
        return self._front_door

    @property
    def port(self) -> int:
        """The first listener's port, as bound (useful with ``listen.port: 0``)."""
        return self.ports[0]

    @property
    def ports(self) -> tuple[int, ...]:
        """Every listener's port as bound, in the configuration's order."""
        assert self._listeners is not None
        return self._listeners.ports

    def serving(self) -> bool:
        """The data listeners are open and balancer is not shutting down (the monitor's readiness)."""
        return self._listeners is not None and not self._shut_down

    def metrics_page(self) -> bytes | None:
        return exposition(self.admin.metrics) if self.admin is not None else None

    def listener_stats(self) -> dict[str, dict[str, object]]:
        return self._listeners.snapshot() if self._listeners is not None else {}

    # --- reload -----------------------------------------------------------------------------------------

    async def reload(self, config: Config) -> list[str]:
        """Apply an already validated configuration in place (see :mod:`.reload`)."""
        async with self._reload_lock:
            listen_tls = load_tls(config.listen)       # certificates load, or nothing changes
            old, self.config = self.config, config     # attach_backend() reads pool settings from here
            changes = await Reload(self, old, config, listen_tls).apply()
        if self.processes is not None:
            self.processes.tell_reload()
        return changes

    async def reload_file(self, path: str | None = None) -> list[str]:
        """Read, validate and apply a configuration file (default: the one we run on). An invalid
        file raises ConfigError and changes nothing."""
        config = load_config(path or self.config.source)
        return await self.reload(config)

    async def restart_workers(self) -> list[str]:
        """Replace every spawned worker surge-then-drain with the same settings (after a deploy)."""
        started = []
        for name, spec in list(self.supervisor.specs.items()):
            self.roll_out_workers(self.config.pools[name], spec, replace=True)
            started.append(f"pool {name}: workers replaced surge-then-drain")
        return started

    def roll_out_workers(self, p: PoolConfig, spec: WorkerSpec, *, replace: bool) -> None:
        """The one rollout of spawned workers, for reload and restart-workers, in the background:
        ``replace`` every worker surge-then-drain (a new one ready before an old one drains), or
        only scale to ``spec``'s count. Retiring waits ``shutdown.worker_stop_timeout``."""
        ready = spec.spawn.start_timeout_s + 10 * (p.health.interval_s if p.health else 2.0)
        stop = self.config.shutdown.worker_stop_timeout_s
        run = self.supervisor.replace if replace else self.supervisor.scale
        work = run(p.name, spec, ready_timeout=ready, drain=self.drain_backend, stop_timeout=stop)
        self.start_rollout(work, f"{'replace' if replace else 'scale'} workers of {p.name}")

    async def drain_backend(self, backend: Backend) -> None:
        """No new requests to ``backend``; wait (up to ``shutdown.drain_timeout``) for those in flight."""
        self.registry.drain(backend)
        await wait_drained(backend, self.config.shutdown.drain_timeout_s)

    async def _reload_logged(self) -> None:
        try:
            await self.reload_file()
        except ConfigError as exc:
            log.error("reload refused, still running on the old configuration: %s", exc)

    def start_rollout(self, work: Awaitable[object], name: str) -> None:
        """Run a reload's slow part (worker replacement, draining) in the background, owned here:
        shutdown cancels what is still running."""
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("%s failed", name)
        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._rollouts.add(task)
        task.add_done_callback(self._rollouts.discard)

    async def sync_processes(self) -> None:
        """With proxy replicas: send them the registry now and wait until each applied it."""
        if self.processes is not None and not await self.processes.sync():
            log.warning("a proxy process did not confirm the registry change within %gs",
                        SYNC_ACK_TIMEOUT_S)

    def rollouts_running(self) -> bool:
        return bool(self._rollouts)

    async def wait_rollouts(self, timeout: float) -> bool:
        """Wait until background rollouts are done (tests, `balancer reload --wait`)."""
        if self._rollouts:
            _, pending = await asyncio.wait(set(self._rollouts), timeout=timeout)
            return not pending
        return True

    async def apply_admin_and_log(self, old: Config, new: Config) -> list[str]:
        """Reload: admin.* and log.* (an admin section added or removed needs a restart)."""
        changes: list[str] = []
        if (old.admin is None) != (new.admin is None):
            changes.append("admin section added or removed: needs a restart, not applied")
        elif self.admin is not None and new.admin is not None and new.admin != old.admin:
            changes += await self.admin.apply(new.admin)
        if new.log.level != old.log.level:
            logging.getLogger().setLevel(new.log.level.upper())
            changes.append(f"log level {old.log.level} -> {new.log.level}")
        log_cfg = new.log
        if (log_cfg.access_log, log_cfg.access_log_format, log_cfg.access_log_path) != \
                (old.log.access_log, old.log.access_log_format, old.log.access_log_path):
            retired = self.access_log
            self.access_log = None
            if log_cfg.access_log:
                self.access_log = AccessLog(log_cfg.access_log_format, log_cfg.access_log_path)
                self.access_log.start()
                self.proxy.add_observer(self.access_log.observe)
            if retired is not None:
                self.proxy.remove_observer(retired.observe)
                await retired.aclose()
            where = f"{log_cfg.access_log_format} to {log_cfg.access_log_path or 'stdout'}"
            changes.append(f"access log {where if log_cfg.access_log else 'off'}")
        return changes

    async def apply_listen(self, listen: tuple[ListenConfig, ...], timeouts: ClientTimeoutsConfig,
                           tls: list[ServerTLS | None]) -> list[str]:
        """Reload: new listeners open before old ones close; kept ones take new certificates."""
        assert self._listeners is not None
        return await self._listeners.apply(listen, timeouts, tls)

    # --- lifecycle -------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start workers, checks and pools; open the listeners once backends can serve."""
        cfg = self.config
        if self.monitor is not None:
            await self.monitor.start()          # alive (and not ready) from the start
        self._running = True
        for discovery in self._discoveries.values():
            discovery.start()
        if self._discoveries:                   # the first answers, before waiting for backends
            await asyncio.wait([asyncio.ensure_future(d.first.wait()) for d in self._discoveries.values()],
                               timeout=5.0)
        await self.health.start()
        self.connections.start()
        await self.supervisor.start(wait=True)
        await self._wait_ready(max((p.spawn.start_timeout_s for p in cfg.pools.values() if p.spawn),
                                   default=0.0))
        # After the start-up wait: workers that came up together are not slow-started.
        self.slow_start.start()
        if self.access_log is not None:
            self.access_log.start()
        self._front_door = FrontDoor(self.proxy.handle, cfg.limits, cfg.timeouts)
        self._listeners = Listeners(self._front_door, reuse_port=self.reuse_port or cfg.processes > 1)
        await self._listeners.open(cfg.listen, cfg.timeouts, self.listen_ports)
        if self.admin is not None:
            await self.admin.start()
            log.info("admin on http://%s:%d", self.admin.host, self.admin.bound_port)
        log.info("balancer serving on %s (%s; request path %s)",
                 ", ".join(f"{c.host}:{p}" for c, p in zip(cfg.listen, self.ports, strict=True)),
                 ", ".join(f"{name}: {len(s.ready)}/{len(s)} ready" for name, s in
                           self.registry.pools.items()),
                 "compiled" if compiled() else "interpreted")

    async def _wait_ready(self, timeout: float) -> None:
        """Give every running worker a bounded chance to pass its first check before accepting clients."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b.healthy for b in self.registry.backends() if b.alive):
                break
            await asyncio.sleep(0.02)
        for name, backend_set in self.registry.pools.items():
            if not backend_set.ready:
                log.warning("pool %s has no ready backend yet; its requests get 503 until one is", name)

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """The shutdown sequence; every wait has a deadline (``drain_timeout``: the configured
        ``shutdown.drain_timeout`` unless given). Idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        cfg = self.config
        if drain_timeout is None:
            drain_timeout = cfg.shutdown.drain_timeout_s
        # 0. Stop reload rollouts (worker replacements, drains) where they are.
        for task in list(self._rollouts):
            task.cancel()
        await asyncio.gather(*self._rollouts, return_exceptions=True)
        # 1. Other proxy processes drain and exit (concurrently with our own drain below);
        #    stop accepting new client connections.
        replicas = (asyncio.ensure_future(self.processes.aclose(drain_timeout))
                    if self.processes is not None else None)
        if self._listeners is not None:
            self._listeners.close()
        # 2. Drain: in-flight requests finish; each keep-alive client's next response carries
        #    `Connection: close` (we give idle clients a moment to send it), then idle connections
        #    are closed and whatever is still running after the deadline is cancelled.
        if self._front_door is not None:
            self.proxy.start_draining()
            await self._drain(self._front_door, drain_timeout)
        if replicas is not None:
            await replicas
        # 3. The admin listener, health probes and upstream connections.
        if self.admin is not None:
            await self.admin.aclose()
        if self.monitor is not None:
            await self.monitor.aclose()
        if self.access_log is not None:
            await self.access_log.aclose()
        for discovery in self._discoveries.values():
            await discovery.aclose()
        await self.health.aclose()
        await self.passive.aclose()
        await self.slow_start.aclose()
        await self.connections.aclose()
        # 4. The workers: SIGTERM, then SIGKILL after the deadline.
        await self.supervisor.aclose(cfg.shutdown.worker_stop_timeout_s)
        log.info("balancer stopped")

    def remote_observers(self) -> list[Callable[[RequestRecord], None]]:
        """Observers for requests served by other proxy processes (which write their own access log)."""
        skip = self.access_log.observe if self.access_log is not None else None
        return [o for o in self.proxy.observers if o != skip]

    async def _drain(self, front_door: FrontDoor, timeout: float) -> None:
        """Idle keep-alive clients get a moment to send one more request; then the front door drains
        for what is left of ``timeout`` and stops hard (see FrontDoor.shutdown)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        grace_end = loop.time() + min(KEEPALIVE_GRACE_S, timeout)
        while loop.time() < grace_end and front_door.connections:  # noqa: ASYNC110  (a deadline)
            await asyncio.sleep(0.02)
        cut = await front_door.shutdown(max(deadline - loop.time(), 0.0))
        if cut:
            log.warning("drain deadline (%gs) passed with %d requests in flight: cut", timeout, cut)

    def apply_client_settings(self, limits: LimitsConfig, timeouts: ClientTimeoutsConfig) -> None:
        """Reload: new client-side limits and timeouts, for connections accepted from now on."""
        if self._front_door is not None:
            self._front_door.apply(limits, timeouts)

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, shut down. A second signal kills workers and exits."""
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("%s received: shutting down (send again to force)", signal.Signals(signum).name)
                self.stop_event.set()
            else:
                log.warning("second signal: killing workers and exiting now")
                self.supervisor.kill_now()
                raise SystemExit(1)

        def on_hangup() -> None:
            log.info("SIGHUP received: reloading %s", self.config.source)
            self.start_rollout(self._reload_logged(), "reload on SIGHUP")

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        try:
            try:
                await self.startup()
                if self.config.processes > 1:
                    self.processes = ProxyProcesses(self, self.config.processes, self.config.source)
                    await self.processes.start(self.ports)
                gc.collect()
                gc.freeze()      # start-up objects live forever: keep them out of every collection
                await self.stop_event.wait()
            finally:
                await self.shutdown()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signum)
