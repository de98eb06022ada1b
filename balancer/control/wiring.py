"""How configuration becomes the settings of each part (connection limits, health policy, worker
spec, the proxy's per-pool runtime, the router). Pure functions, the one place each is derived,
shared by start-up (:mod:`.balancer`) and reload (:mod:`.reload`).
"""

from __future__ import annotations

from ..config.models import Config, HeaderRules, HealthConfig, LimitsConfig, PoolConfig, RouteConfig
from ..dataplane.affinity import StickyCookie
from ..dataplane.connections import ConnectionLimits
from ..dataplane.faults import Faults
from ..dataplane.guards import BasicAuth, Guards, RateLimiter
from ..dataplane.headers import AddressSet, HeaderEdits
from ..dataplane.proxy import PoolRuntime
from ..dataplane.routing import Route, Router
from ..lb.hashing import ConsistentHash
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


def pool_runtime(p: PoolConfig, backend_set: BackendSet, sticky_secret: bytes = b"") -> PoolRuntime:
    selector = make_selector(p.balance)
    sticky = None
    if p.sticky is not None:
        secret = p.sticky.secret.encode() if p.sticky.secret else sticky_secret
        sticky = StickyCookie(p.sticky.cookie, p.sticky.ttl_s, secret)
    return PoolRuntime(name=p.name, backends=backend_set, selector=selector,
                       response_timeout_s=p.timeouts.response_s,
                       read_timeout_s=p.timeouts.read_s, send_timeout_s=p.timeouts.send_s,
                       retries=p.retries, hasher=selector if isinstance(selector, ConsistentHash) else None,
                       hash_by=p.hash.key, sticky=sticky)


def health_policy(pool: PoolConfig) -> HealthConfig | None:
    """The checks a pool's backends get, or None. No section: on for spawned workers and discovered
    backends (defaults), off for external servers."""
    h = pool.health
    if h is None:
        return HealthConfig() if pool.spawn is not None or pool.discovery is not None else None
    return h if h.enabled else None


def router_for(config: Config, previous: Router | None = None) -> Router:
    """The routes, ready to match. A route of ``previous`` (the router a reload replaces) with the
    same name and the same rate limit keeps its limiter, so a reload does not refill every bucket."""
    return Router([_route(r, previous) for r in config.routes])


def _route(r: RouteConfig, previous: Router | None) -> Route:
    limiter = None
    if r.rate_limit is not None:
        old = previous.route(r.name) if previous is not None else None
        kept = old.guards.limiter if old is not None and old.guards is not None else None
        if kept is not None and old is not None and old.limit_config == r.rate_limit:
            limiter = kept
        else:
            limit = r.rate_limit
            limiter = RateLimiter(limit.rate, limit.burst, limit.key, limit.max_keys)
    guards = None
    if r.allow or r.deny or r.basic_auth is not None or limiter is not None:
        auth = BasicAuth(r.basic_auth.realm, r.basic_auth.users) if r.basic_auth is not None else None
        guards = Guards(AddressSet(r.allow) if r.allow else None, AddressSet(r.deny) if r.deny else None,
                        auth, limiter)
    redirect = (r.redirect.to.encode(), r.redirect.status, r.redirect.keep_path) if r.redirect else None
    respond = (r.respond.status, r.respond.body.encode(), r.respond.content_type.encode()) \
        if r.respond else None
    route = Route(r.name, r.pool, r.path_prefix.encode(), r.host.encode() if r.host else None,
                  methods=frozenset(r.methods) if r.methods else None,
                  headers=tuple((n.encode(), v.encode()) for n, v in r.headers),
                  strip_prefix=r.strip_prefix, add_prefix=(r.add_prefix or "").encode(),
                  request_edits=_edits(r.request_headers), response_edits=_edits(r.response_headers),
                  guards=guards, redirect=redirect, respond=respond, limit_config=r.rate_limit,
                  faults=Faults(r.fault) if r.fault is not None else None)
    return route


def _edits(rules: HeaderRules) -> HeaderEdits | None:
    if not (rules.set or rules.add or rules.remove):
        return None
    return HeaderEdits(rules.set, rules.add, rules.remove)
