"""How configuration becomes the settings of each part (connection limits, health policy, worker
spec, the proxy's per-pool runtime, the router). Pure functions, the one place each is derived,
shared by start-up (:mod:`.balancer`) and reload (:mod:`.reload`).
"""

from __future__ import annotations

from ..config.models import Config, HealthConfig, LimitsConfig, PoolConfig
from ..dataplane.connections import ConnectionLimits
from ..dataplane.proxy import PoolRuntime
from ..dataplane.routing import Route, Router
from ..lb.registry import BackendSet
from ..lb.selection import make_selector
from ..lb.supervisor import WorkerSpec

# Idle upstream connections to our own workers are closed this long before the worker's keep-alive
# would close them, so the backend never closes one under us (the keep-alive race).
KEEPALIVE_MARGIN_S = 2.0
EXTERNAL_IDLE_TIMEOUT_S = 15.0


def connection_limits(pool: PoolConfig, limits: LimitsConfig) -> ConnectionLimits:
    c = pool.connections
    idle_timeout = c.idle_timeout_s
    if idle_timeout is None:
        if pool.spawn is not None:
            keepalive = pool.spawn.keepalive_timeout_s
            idle_timeout = max(keepalive - KEEPALIVE_MARGIN_S, keepalive / 2)
        else:
            idle_timeout = EXTERNAL_IDLE_TIMEOUT_S
    return ConnectionLimits(max=c.max, max_idle=c.max_idle, min_idle=c.min_idle, idle_timeout_s=idle_timeout,
                            max_requests=c.max_requests, max_lifetime_s=c.max_lifetime_s,
                            acquire_timeout_s=c.acquire_timeout_s, connect_timeout_s=pool.timeouts.connect_s,
                            max_waiting=c.max_waiting, max_response_header=limits.max_response_header)


def worker_spec(p: PoolConfig) -> WorkerSpec:
    assert p.spawn is not None
    return WorkerSpec(pool=p.name, spawn=p.spawn)


def pool_runtime(p: PoolConfig, backend_set: BackendSet) -> PoolRuntime:
    return PoolRuntime(name=p.name, backends=backend_set, selector=make_selector(p.balance),
                       response_timeout_s=p.timeouts.response_s,
                       read_timeout_s=p.timeouts.read_s, send_timeout_s=p.timeouts.send_s,
                       retries=p.retries)


def health_policy(pool: PoolConfig) -> HealthConfig | None:
    """The checks a pool's backends get, or None. No section: on for spawned workers (defaults),
    off for external servers."""
    h = pool.health
    if h is None:
        return HealthConfig() if pool.spawn is not None else None
    return h if h.enabled else None


def router_for(config: Config) -> Router:
    return Router([Route(name=r.name, pool=r.pool, path_prefix=r.path_prefix.encode(),
                         host=r.host.encode() if r.host else None) for r in config.routes])
