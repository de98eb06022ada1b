"""Applying a new configuration to a running balancer without failing a request.

Theory of operation
-------------------
The new file has been read and validated before we get here (an invalid one never reaches this
module: the old configuration stays, as with ``nginx -s reload``). The change is then applied in place,
in an order that keeps every request answerable:

1. new pools and new backends are added first (and, for spawned pools, their workers started);
2. pools that stay get their new settings: a fresh :class:`PoolRuntime` (selector, timeouts,
   retries) swapped into the proxy's table, new connection limits, health policy, passive policy;
3. the router and client-side settings are swapped (a request in flight keeps the objects it holds);
4. what went away is drained -- no new requests, in-flight ones finish (bounded by
   ``shutdown.drain_timeout``) -- and only then closed, its workers stopped;
5. spawned pools whose command, environment or keep-alive changed are replaced surge-then-drain
   (start a new worker, wait until it passes its checks, drain and stop an old one), in a background
   rollout so the reload call returns at once; a count change adds or drains workers the same way.

A listen address change opens the new socket before closing the old one. ``processes`` changes need a
restart (reported, not applied).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from ..config.models import ClientTimeoutsConfig, Config, LimitsConfig, ListenConfig, PoolConfig
from ..dataplane.connections import ConnectionTable
from ..dataplane.headers import AddressSet
from ..dataplane.proxy import PoolRuntime, Proxy
from ..dataplane.tls import ServerTLS
from ..lb.health import HealthChecker
from ..lb.passive import PassiveHealth
from ..lb.registry import Backend, Registry
from ..lb.supervisor import Supervisor, Worker, WorkerSpec
from .wiring import connection_limits, health_policy, pool_runtime, router_for, worker_spec

log = logging.getLogger(__name__)


class Reloadable(Protocol):
    """What a reload reads of the running balancer and what it may ask of it. Each part it changes
    is changed through that part's own methods."""

    @property
    def registry(self) -> Registry: ...
    @property
    def supervisor(self) -> Supervisor: ...
    @property
    def proxy(self) -> Proxy: ...
    @property
    def health(self) -> HealthChecker: ...
    @property
    def passive(self) -> PassiveHealth: ...
    @property
    def connections(self) -> ConnectionTable: ...
    @property
    def before_routes_swap(self) -> Callable[[], None] | None: ...
    @property
    def sticky_secret(self) -> bytes: ...

    def setup_pool(self, p: PoolConfig) -> PoolRuntime: ...
    def attach_backend(self, backend: Backend, p: PoolConfig | None = None) -> None: ...
    async def detach_backend(self, backend: Backend) -> None: ...
    def start_rollout(self, work: Awaitable[object], name: str) -> None: ...
    async def apply_listen(self, listen: tuple[ListenConfig, ...], timeouts: ClientTimeoutsConfig,
                           tls: list[ServerTLS | None]) -> list[str]: ...
    def set_upstream_tls(self, p: PoolConfig) -> None: ...
    async def apply_admin_and_log(self, old: Config, new: Config) -> list[str]: ...
    def roll_out_workers(self, p: PoolConfig, spec: WorkerSpec, *, replace: bool) -> None: ...
    async def drain_backend(self, backend: Backend) -> None: ...
    async def retire_backend(self, backend: Backend) -> None: ...
    def restart_discovery(self, p: PoolConfig) -> None: ...
    def stop_discovery(self, pool: str) -> None: ...
    def apply_client_settings(self, limits: LimitsConfig, timeouts: ClientTimeoutsConfig) -> None: ...


def _spawn_identity(p: PoolConfig) -> object:
    """What makes a spawned worker different (everything but the count)."""
    return None if p.spawn is None else replace(p.spawn, count=0)


class Reload:
    """One reload: compare ``old`` and ``new`` and apply the difference to ``balancer``, which
    runs on ``new`` already (its pool settings are read from there)."""

    def __init__(self, balancer: Reloadable, old: Config, new: Config,
                 listen_tls: list[ServerTLS | None]) -> None:
        self.b = balancer
        self.old = old
        self.new = new
        self.listen_tls = listen_tls        # the listeners' certificates, loaded already
        self.changes: list[str] = []
        self._retired: list[Backend] = []

    async def apply(self) -> list[str]:
        b, old, new = self.b, self.old, self.new
        if new.monitor != old.monitor:
            self.changes.append("monitor changed: needs a restart, not applied")
        if new.processes != old.processes:
            self.changes.append(f"processes {old.processes} -> {new.processes}: needs a restart, not applied")
        for name, p in new.pools.items():
            if name not in old.pools:
                self._add_pool(p)
            else:
                await self._update_pool(old.pools[name], p)
        # 3. Routing and client-side settings; requests in flight keep what they hold.
        if b.before_routes_swap is not None:
            b.before_routes_swap()
        b.proxy.apply(router_for(new, b.proxy.router), AddressSet(new.trusted_proxies), new.limits)
        b.apply_client_settings(new.limits, new.timeouts)
        if new.routes != old.routes:
            self.changes.append("routes replaced")
        self.changes += await b.apply_listen(new.listen, new.timeouts, self.listen_tls)
        self.changes += await b.apply_admin_and_log(old, new)
        # 4. Whatever left: drain, then close.
        for name in old.pools:
            if name not in new.pools:
                await self._remove_pool(name)
        self._drain_and_detach(self._retired)
        log.info("configuration reloaded from %s: %s", new.source, "; ".join(self.changes) or "no change")
        return self.changes

    # --- pools ---------------------------------------------------------------------------------------

    def _add_pool(self, p: PoolConfig) -> None:
        b = self.b
        if p.spawn is not None:
            b.supervisor.add_pool(worker_spec(p))
        b.proxy.set_pool(b.setup_pool(p))
        self.changes.append(f"pool {p.name} added")

    async def _remove_pool(self, name: str) -> None:
        """Drain every backend of a pool that left the configuration, then forget the pool."""
        b = self.b
        b.proxy.remove_pool(name)              # unreachable already: the new router has no route to it
        b.stop_discovery(name)
        workers = list(b.supervisor.pool_workers(name))
        servers = [x for x in b.registry.pool(name) if not x.spawned]

        async def remove() -> None:
            await asyncio.gather(*(self._retire_worker(w) for w in workers),
                                 *(self.b.retire_backend(x) for x in servers))
            b.registry.remove_pool(name)
            b.supervisor.forget_pool(name)

        b.start_rollout(remove(), f"remove pool {name}")
        self.changes.append(f"pool {name} removed (draining)")

    async def _retire_worker(self, worker: Worker) -> None:
        b = self.b
        await b.drain_backend(worker.backend)
        await b.supervisor.retire(worker, self.new.shutdown.worker_stop_timeout_s)

    async def _update_pool(self, old: PoolConfig, new: PoolConfig) -> None:
        b = self.b
        backend_set = b.registry.pool(new.name)
        # External servers: add new, reweigh kept, drain removed.
        old_servers = {s.address: s for s in old.servers}
        new_servers = {s.address: s for s in new.servers}
        for address, server in new_servers.items():
            backend_id = f"{new.name}/{address}"
            if address not in old_servers:
                backend = Backend(id=backend_id, pool=new.name, host=server.host, port=server.port,
                                  weight=server.weight)
                backend_set.add(backend)
                b.attach_backend(backend, new)
                self.changes.append(f"{backend_id} added")
            elif server.weight != old_servers[address].weight:
                kept = backend_set.get(backend_id)
                if kept is not None:
                    b.registry.set_weight(kept, server.weight)
                    self.changes.append(f"{backend_id} weight {old_servers[address].weight} -> "
                                        f"{server.weight}")
        for address in old_servers.keys() - new_servers.keys():
            gone = backend_set.get(f"{new.name}/{address}")
            if gone is not None:
                self._retired.append(gone)
                self.changes.append(f"{gone.id} removed (draining)")
        # Settings of every backend that stays: connection limits and health checks.
        limits, policy = connection_limits(new, self.new.limits), health_policy(new)
        if limits != connection_limits(old, self.old.limits) or policy != health_policy(old):
            for backend in backend_set:
                conns = b.connections.get(backend.id)
                if conns is not None:
                    conns.set_limits(limits)
                if policy is not None and b.health.is_checked(backend):
                    b.health.set_policy(backend, policy)
                elif policy is not None:
                    b.health.add(backend, policy, start_healthy=backend.healthy)
                elif b.health.is_checked(backend):
                    await b.health.remove(backend.id)
                    b.registry.set_healthy(backend, True, "")
            self.changes.append(f"pool {new.name}: connection or health settings changed")
        if new.passive != old.passive:
            b.passive.add_pool(new.name, new.passive)
        if new.discovery != old.discovery:
            b.restart_discovery(new)
            self.changes.append(f"pool {new.name}: discovery changed")
        if new.tls != old.tls:
            b.set_upstream_tls(new)
            self.changes.append(f"pool {new.name}: TLS to backends changed")
        # The runtime: selector, timeouts, retries.
        b.proxy.set_pool(pool_runtime(new, backend_set, b.sticky_secret))
        if (new.balance, new.timeouts, new.retries) != (old.balance, old.timeouts, old.retries):
            self.changes.append(f"pool {new.name}: balance/timeouts/retries applied")
        self._update_spawn(old, new)

    def _update_spawn(self, old: PoolConfig, new: PoolConfig) -> None:
        b = self.b
        if new.spawn is None:
            for worker in list(b.supervisor.pool_workers(new.name)):
                b.start_rollout(self._retire_worker(worker), f"retire {worker.id}")
            if old.spawn is not None:
                self.changes.append(f"pool {new.name}: spawned workers removed (draining)")
            return
        spec = worker_spec(new)
        if old.spawn is None or _spawn_identity(old) != _spawn_identity(new):
            b.roll_out_workers(new, spec, replace=True)
            self.changes.append(f"pool {new.name}: workers replaced surge-then-drain")
        elif old.spawn.count != new.spawn.count:
            b.roll_out_workers(new, spec, replace=False)
            self.changes.append(f"pool {new.name}: workers {old.spawn.count} -> {new.spawn.count}")

    def _drain_and_detach(self, backends: list[Backend]) -> None:
        if backends:
            self.b.start_rollout(asyncio.gather(*(self.b.retire_backend(x) for x in backends)),
                                 "drain removed backends")
