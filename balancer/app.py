"""The composition root: builds every part from the configuration and runs the lifecycle.

``startup -> serve until a signal -> shutdown`` (uvicorn's shape). The only module that imports
everything; nothing here decides anything a module below could decide itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field

from aiohttp import web

from .accesslog import AccessLog
from .admin import Admin
from .config import Config, PoolConfig
from .headers import TrustedProxies
from .health import HealthChecker, HealthPolicy, SlowStart
from .passive import PassiveHealth
from .pool import PoolLimits, UpstreamPools
from .proxy import PoolRuntime, Proxy
from .registry import Backend, Registry
from .routing import Route, Router
from .selection import make_selector
from .server import FrontDoor
from .supervisor import RestartPolicy, Supervisor, WorkerSpec

log = logging.getLogger(__name__)

# Idle upstream connections to our own workers are closed this long before the worker's keep-alive
# would close them, so the backend never closes one under us (the keep-alive race).
KEEPALIVE_MARGIN_S = 2.0
EXTERNAL_IDLE_TIMEOUT_S = 15.0
# On shutdown, how long idle keep-alive clients may still send one more request (answered with
# `Connection: close`) before their connections are closed.
KEEPALIVE_GRACE_S = 1.0


def pool_limits(pool: PoolConfig) -> PoolLimits:
    c = pool.connections
    idle_timeout = c.idle_timeout_s
    if idle_timeout is None:
        if pool.spawn is not None:
            keepalive = pool.spawn.keepalive_timeout_s
            idle_timeout = max(keepalive - KEEPALIVE_MARGIN_S, keepalive / 2)
        else:
            idle_timeout = EXTERNAL_IDLE_TIMEOUT_S
    return PoolLimits(max=c.max, max_idle=c.max_idle, min_idle=c.min_idle, idle_timeout_s=idle_timeout,
                      max_requests=c.max_requests, max_lifetime_s=c.max_lifetime_s,
                      acquire_timeout_s=c.acquire_timeout_s, connect_timeout_s=pool.timeouts.connect_s)


def health_policy(pool: PoolConfig) -> HealthPolicy | None:
    h = pool.health
    if h is None:
        # No section: checks on for spawned workers (defaults), off for external servers.
        return HealthPolicy() if pool.spawn is not None else None
    if not h.enabled:
        return None
    return HealthPolicy(path=h.path, interval_s=h.interval_s, timeout_s=h.timeout_s, rise=h.rise,
                        fall=h.fall, expect=h.expect)


@dataclass
class Balancer:
    """Everything one balancer process runs."""

    config: Config
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    echo_worker_stderr: bool = True

    def __post_init__(self) -> None:
        cfg = self.config
        self.started_at = time.time()
        self.registry = Registry()
        self.upstream = UpstreamPools()
        self.health = HealthChecker(self.registry)
        # Passive health (live-traffic ejection) and slow start: see balancer/passive.py, health.py.
        self.passive = PassiveHealth(self.registry, self.health)
        self.slow_start = SlowStart(self.registry)
        specs = [WorkerSpec(pool=p.name, command=p.spawn.command, count=p.spawn.count, env=p.spawn.env,
                            cwd=p.spawn.cwd, start_timeout_s=p.spawn.start_timeout_s,
                            keepalive_timeout_s=p.spawn.keepalive_timeout_s)
                 for p in cfg.pools.values() if p.spawn is not None]
        for p in cfg.pools.values():
            backend_set = self.registry.pool(p.name)
            for i, server in enumerate(p.servers, start=1):
                backend_set.add(Backend(id=f"{p.name}/{server.address}" if server.address else
                                        f"{p.name}/s{i}", pool=p.name, host=server.host,
                                        port=server.port, weight=server.weight))
        self.supervisor = Supervisor(self.registry, specs, policy=self.restart_policy,
                                     echo_stderr=self.echo_worker_stderr)
        runtimes: dict[str, PoolRuntime] = {}
        for p in cfg.pools.values():
            backend_set = self.registry.pool(p.name)
            limits = pool_limits(p)
            policy = health_policy(p)
            for backend in backend_set:
                self.upstream.add(backend.id, backend.host, backend.port, limits)
                if policy is not None:
                    self.health.add(backend, policy, start_healthy=not backend.spawned)
            backend_set.subscribe(lambda b, ready: self.upstream.on_readiness(b.id, ready))
            self.passive.add_pool(p.name, p.passive)
            self.slow_start.add_pool(backend_set, p.slow_start_s)
            runtimes[p.name] = PoolRuntime(
                name=p.name, backends=backend_set, selector=make_selector(p.balance),
                connect_timeout_s=p.timeouts.connect_s, response_timeout_s=p.timeouts.response_s,
                read_timeout_s=p.timeouts.read_s, retries=p.retries)
        self.registry.alive_listeners.append(self.health.on_alive_changed)
        self.registry.alive_listeners.append(self.passive.on_alive_changed)
        router = Router([Route(name=r.name, pool=r.pool, path_prefix=r.path_prefix.encode(),
                               host=r.host.encode() if r.host else None) for r in cfg.routes])
        self.proxy = Proxy(router, runtimes, self.registry, self.upstream,
                           TrustedProxies(cfg.trusted_proxies), cfg.limits)
        self.proxy.outcome_listeners.append(self.passive.on_outcome)
        self.admin = Admin(self) if cfg.admin is not None else None
        # Off by default, and then not an observer at all: zero cost per request.
        self.access_log = (AccessLog(cfg.log.access_log_format, cfg.log.access_log_path)
                           if cfg.log.access_log else None)
        if self.access_log is not None:
            self.proxy.observers.append(self.access_log.observe)
        self._web_server: FrontDoor | None = None
        self._shut_down = False
        self._listener: asyncio.Server | None = None
        self.stop_event = asyncio.Event()

    @property
    def port(self) -> int:
        """The data port actually bound (useful with ``listen.port: 0``)."""
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    # --- lifecycle -------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start workers, checks and pools; open the listeners once backends can serve."""
        cfg = self.config
        await self.health.start()
        self.upstream.start()
        await self.supervisor.start(wait=True)
        await self._wait_ready(max((p.spawn.start_timeout_s for p in cfg.pools.values() if p.spawn),
                                   default=0.0))
        # After the start-up wait: workers that came up together are not slow-started.
        self.slow_start.start()
        if self.access_log is not None:
            self.access_log.start()
        limits = cfg.limits
        self._web_server = FrontDoor(
            self.proxy.handle, header_timeout=cfg.timeouts.client_header_s, access_log=None,
            auto_decompress=False, keepalive_timeout=cfg.timeouts.client_idle_s,
            # A client that goes away cancels its handler: the upstream request ends, its connection
            # is closed and its slot freed.
            handler_cancellation=True,
            max_line_size=limits.max_request_line, max_field_size=limits.max_header_size,
            max_headers=limits.max_headers)
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(self._web_server, cfg.listen.host, cfg.listen.port,
                                                  reuse_address=True, backlog=1024)
        if self.admin is not None:
            await self.admin.start()
            log.info("admin on http://%s:%d", self.admin.host, self.admin.bound_port)
        log.info("balancer listening on http://%s:%d (%s)", cfg.listen.host, self.port,
                 ", ".join(f"{name}: {len(s.ready)}/{len(s)} ready" for name, s in
                           self.registry.pools.items()))

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

    async def shutdown(self) -> None:
        """The shutdown sequence; every wait has a deadline. Idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        cfg = self.config
        # 1. Stop accepting new client connections.
        if self._listener is not None:
            self._listener.close()
        # 2. Drain: in-flight requests finish; each keep-alive client's next response carries
        #    `Connection: close` (we give idle clients a moment to send it), then idle connections
        #    are closed and whatever is still running after the deadline is cancelled.
        if self._web_server is not None:
            self.proxy.draining = True
            await self._drain(self._web_server, cfg.shutdown.drain_timeout_s)
        # 3. The admin listener, health probes and upstream connections.
        if self.admin is not None:
            await self.admin.aclose()
        if self.access_log is not None:
            await self.access_log.aclose()
        await self.health.aclose()
        await self.passive.aclose()
        await self.slow_start.aclose()
        await self.upstream.aclose()
        # 4. The workers: SIGTERM, then SIGKILL after the deadline.
        await self.supervisor.aclose(cfg.shutdown.worker_stop_timeout_s)
        log.info("balancer stopped")

    async def _drain(self, server: FrontDoor, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        grace_end = loop.time() + min(KEEPALIVE_GRACE_S, timeout)
        while loop.time() < deadline:
            if not server.connections or (not server.busy_connections and loop.time() >= grace_end):
                break
            await asyncio.sleep(0.02)
        busy = server.busy_connections
        await server.shutdown(max(deadline - loop.time(), 0.0))
        if busy:
            log.warning("drain deadline (%gs) passed with %d requests in flight: cut", timeout, busy)

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

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            try:
                await self.startup()
                await self.stop_event.wait()
            finally:
                await self.shutdown()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signum)
