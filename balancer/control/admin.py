"""The admin listener: health, stats, metrics, slow log, dashboard, and the operator's switches.

A separate aiohttp ``Application`` on its own port (loopback by default), so the data port carries no
router. It sees the balancer through :class:`Operated`: what it reads, and what it may ask for (a
reload, a worker restart); backend switches are registry methods. Creating an :class:`Admin`
registers two proxy observers (:class:`~balancer.observe.stats.Traffic` and
:class:`~balancer.observe.slowlog.SlowLog`); without an ``admin:`` section neither exists and
requests pay nothing for them.

A web page the operator visits must not drive this API (CSRF), nor read it through DNS rebinding: on a
loopback listener the Host must name loopback; an ``Origin`` must be this listener's; and without a
token, a state-changing request needs the ``X-Balancer-Admin`` header or a JSON body (neither can be
sent cross-origin without a preflight, which is never answered). All three answer 403.

With a token configured, every endpoint but ``/healthz`` and the dashboard page itself requires
``Authorization: Bearer TOKEN`` (compared in constant time). The page holds no data: its script reads
the token from the URL fragment (``/#token=...``, never sent to the server) and sends it with each poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import ipaddress
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config.load import parse_duration
from ..config.models import AdminConfig, Config
from ..dataplane.connections import ConnectionTable
from ..dataplane.proxy import Proxy
from ..errors import ConfigError
from ..lb.registry import AdminState, Backend, Registry, wait_drained
from ..lb.supervisor import Supervisor, Worker, WorkerState
from ..observe.accesslog import AccessLog
from ..observe.metrics import CONTENT_TYPE, BalancerCollector, exposition, new_registry
from ..observe.slowlog import SlowLog
from ..observe.stats import WINDOWS, Traffic
from ..observe.units import iso_utc
from .weblistener import WebListener

log = logging.getLogger(__name__)

# Without a token, a state-changing request must carry this header (or a JSON body): a cross-origin
# page can send neither without a CORS preflight, which this API never answers.
ADMIN_HEADER = "X-Balancer-Admin"
MAX_DRAIN_WAIT_S = 3600.0
DRAIN_POLL_S = 0.05
SERIES_SECONDS = 300
OPEN_PATHS = frozenset({"/healthz", "/"})
DASHBOARD = "static/dashboard.html"       # package data


class Operated(Protocol):
    """What the admin API reads of the balancer it runs in, and what it may ask of it. Backend
    switches go through the registry's methods; nothing here assigns another part's attributes."""

    @property
    def config(self) -> Config: ...
    @property
    def started_at(self) -> float: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def connections(self) -> ConnectionTable: ...
    @property
    def supervisor(self) -> Supervisor: ...
    @property
    def proxy(self) -> Proxy: ...
    @property
    def access_log(self) -> AccessLog | None: ...
    @property
    def stop_event(self) -> asyncio.Event: ...

    async def reload_file(self, path: str | None = None) -> list[str]: ...
    async def restart_workers(self) -> list[str]: ...
    def rollouts_running(self) -> bool: ...
    async def sync_processes(self) -> None: ...
    def discovery_state(self, pool: str) -> dict[str, object] | None: ...
    def listener_stats(self) -> dict[str, dict[str, object]]: ...
    async def wait_rollouts(self, timeout: float) -> bool: ...


class Admin:
    """The admin listener, and the observers it feeds from. The app calls ``start`` and ``aclose``."""

    def __init__(self, balancer: Operated) -> None:
        self.balancer = balancer
        cfg = balancer.config.admin
        assert cfg is not None
        self.host = cfg.host
        self.port = cfg.port
        self.token = cfg.token
        self._listener = WebListener(cfg.host, cfg.port)
        self._loopback = _loopback_host(cfg.host)
        self.traffic = Traffic()
        self.slowlog = SlowLog(cfg.slowlog_threshold_s, cfg.slowlog_size)
        balancer.proxy.add_observer(self.traffic.observe)
        balancer.proxy.add_observer(self.slowlog.observe)
        balancer.proxy.add_outcome_listener(self.traffic.on_outcome)
        for backend_set in balancer.registry.pools.values():
            backend_set.subscribe(self._on_readiness)
        for backend in balancer.registry.backends():
            self.traffic.states.note(backend.id, self.state_of(backend))
        self.metrics = new_registry(BalancerCollector(
            self.traffic, balancer.registry, balancer.connections, balancer.supervisor,
            state_of=self.state_of, started_at=balancer.started_at,
            config_sha256=balancer.config.text_hash, extra=self._extra_metrics))
        self._dashboard: bytes | None = None
        self._connection_baselines: dict[str, dict[str, Any]] = {}
        self.run_id = uuid.uuid4().hex[:12]      # new at each POST /stats/reset

    def _worker(self, backend_id: str) -> Worker | None:
        """The spawned worker behind a backend, as the supervisor has it now (workers come and go)."""
        return next((w for w in self.balancer.supervisor.workers if w.id == backend_id), None)

    def forget_backend(self, backend: Backend) -> None:
        """A backend gone for good: its statistics series go (its counts stay in its pool's)."""
        self.traffic.forget_backend(backend.pool, backend.id)
        self._connection_baselines.pop(backend.id, None)

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard, self._auth])
        app.router.add_get("/", self.dashboard)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/stats/reset", self.stats_reset)
        app.router.add_get("/stats/series", self.stats_series)
        app.router.add_get("/stats/backends/{pool}/{name}", self.backend_stats)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/slowlog", self.slowlog_page)
        app.router.add_post("/slowlog/reset", self.slowlog_reset)
        app.router.add_post("/reload", self.reload)
        app.router.add_post("/restart-workers", self.restart_workers)
        for action in ("drain", "disable", "enable"):
            app.router.add_post(f"/backends/{{pool}}/{{name}}/{action}", self.set_admin_state)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """What a web page the operator visits must not be able to do (see the module docstring)."""
        if self._loopback and not _loopback_host(request.host):
            return web.json_response({"error": f"Host {request.host!r} is not this loopback listener's"},
                                     status=403)
        origin = request.headers.get("Origin")
        if origin is not None and origin not in (f"http://{request.host}", f"https://{request.host}"):
            return web.json_response({"error": f"cross-origin request from {origin!r}"}, status=403)
        if request.method not in ("GET", "HEAD") and not self.token and ADMIN_HEADER not in request.headers \
                and request.content_type != "application/json":
            return web.json_response({"error": f"a change needs the {ADMIN_HEADER} header (or a token)"},
                                     status=403)
        result: web.StreamResponse = await handler(request)
        return result

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token and request.path not in OPEN_PATHS:
            # The scheme is case-insensitive (RFC 9110 11.1); a value that is not UTF-8 is just wrong.
            scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
            offered = given.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered, self.token.encode()):
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        result: web.StreamResponse = await handler(request)
        return result

    async def apply(self, cfg: AdminConfig) -> list[str]:
        """Reload: the token, the slow log's settings and the address (the new socket first)."""
        changes = []
        if cfg.token != self.token:
            self.token = cfg.token
            changes.append("admin token changed")
        if (cfg.slowlog_threshold_s, cfg.slowlog_size) != (self.slowlog.threshold_s, self.slowlog.size):
            self.slowlog.configure(cfg.slowlog_threshold_s, cfg.slowlog_size)
            changes.append("slow log settings changed")
        if (cfg.host, cfg.port) != (self.host, self.port):
            moved = WebListener(cfg.host, cfg.port)
            await moved.start(self.application())
            old, self._listener = self._listener, moved
            self.host, self.port = cfg.host, cfg.port
            self._loopback = _loopback_host(cfg.host)
            await old.aclose()
            changes.append(f"admin moved to {cfg.host}:{self.bound_port}")
        return changes

    async def start(self) -> None:
        await self._listener.start(self.application())

    @property
    def bound_port(self) -> int:
        return self._listener.bound_port

    async def aclose(self) -> None:
        await self._listener.aclose()

    # --- state -----------------------------------------------------------------------------------------

    def state_of(self, backend: Backend) -> str:
        """up, down, ejected, draining, disabled, or quarantined (a worker that crashed too often)."""
        state = backend.state
        if state == "down":
            worker = self._worker(backend.id)
            if worker is not None and worker.state is WorkerState.QUARANTINED:
                return "quarantined"
        return state

    def _on_readiness(self, backend: Backend, is_ready: bool) -> None:
        # Most state changes flip readiness and are timed exactly here; the rest (e.g. a down backend
        # drained) are noticed when a snapshot is taken.
        self.traffic.states.note(backend.id, self.state_of(backend))
        if not is_ready and backend.admin is AdminState.ENABLED and backend.weight > 0:
            self.traffic.states.eject(backend.id)

    # --- handlers --------------------------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.Response:
        if self._dashboard is None:
            self._dashboard = importlib.resources.files("balancer").joinpath(DASHBOARD).read_bytes()
        return web.Response(body=self._dashboard, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        pools = {name: len(s.ready) for name, s in self.balancer.registry.pools.items()}
        ready = all(pools.values())
        return web.json_response({"ready": ready, "pools": pools}, status=200 if ready else 503)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def stats_reset(self, request: web.Request) -> web.Response:
        """Start a run: the counters start over; the answer's ``run`` id is in every /stats after it."""
        self.reset()
        return web.json_response({"reset": True, "run": self.run_id,
                                  "stats_since": iso_utc(self.traffic.reset_at)})

    async def stats_series(self, request: web.Request) -> web.Response:
        now_sec = self.traffic.now_sec()
        until = now_sec - 1                     # complete seconds only: each is sent once, final
        # Never before the stats began: there is nothing there but zeros.
        since = max(until - SERIES_SECONDS, self.traffic.started_sec() - 1)
        with contextlib.suppress(KeyError, ValueError):
            since = max(self.traffic.mono_of(int(request.query["since"])), since)
        return web.json_response(self.series(since, until))

    async def backend_stats(self, request: web.Request) -> web.Response:
        backend = self._find(request)
        data = self.backend_snapshot(backend)
        conns = self.balancer.connections.get(backend.id)
        data["connections"] = conns.connections() if conns is not None else []
        return web.json_response(data)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=exposition(self.metrics), headers={"Content-Type": CONTENT_TYPE})

    async def slowlog_page(self, request: web.Request) -> web.Response:
        order = request.query.get("order", "slowest")
        if order not in ("slowest", "recent"):
            raise web.HTTPBadRequest(text="order must be 'slowest' or 'recent'\n")
        try:
            limit = int(request.query["limit"]) if "limit" in request.query else None
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be an integer\n") from None
        return web.json_response(self.slowlog.view(order, limit))

    async def slowlog_reset(self, request: web.Request) -> web.Response:
        self.slowlog.reset()
        return web.json_response({"reset": True})

    async def reload(self, request: web.Request) -> web.Response:
        """Re-read the configuration file; 400 with the reason (and nothing changed) if invalid.
        ``?wait=30s`` waits for worker rollouts to finish."""
        try:
            changes = await self.balancer.reload_file()
        except ConfigError as exc:
            log.error("reload refused, still running on the old configuration: %s", exc)
            return web.json_response({"reloaded": False, "error": str(exc)}, status=400)
        done = await self._wait_rollouts(request)
        return web.json_response({"reloaded": True, "changes": changes, "rollouts_done": done})

    async def restart_workers(self, request: web.Request) -> web.Response:
        """Replace every spawned worker surge-then-drain (e.g. after a code deploy)."""
        changes = await self.balancer.restart_workers()
        done = await self._wait_rollouts(request)
        return web.json_response({"restarted": True, "changes": changes, "rollouts_done": done})

    async def _wait_rollouts(self, request: web.Request) -> bool:
        wait = request.query.get("wait")
        if not wait:
            return not self.balancer.rollouts_running()
        try:
            seconds = parse_duration(wait)
        except ConfigError as exc:
            raise web.HTTPBadRequest(text=f"wait: {exc}\n") from None
        return await self.balancer.wait_rollouts(seconds)

    async def set_admin_state(self, request: web.Request) -> web.Response:
        backend = self._find(request)
        action = request.path.rsplit("/", 1)[1]
        state = {"drain": AdminState.DRAINING, "disable": AdminState.DISABLED,
                 "enable": AdminState.ENABLED}[action]
        wait_s: float | None = None
        if action == "drain" and "wait" in request.query:
            try:
                wait_s = min(parse_duration(request.query["wait"]), MAX_DRAIN_WAIT_S)
            except ConfigError as exc:
                raise web.HTTPBadRequest(text=f"wait: {exc}\n") from None
        self.balancer.registry.set_admin(backend, state)
        self.traffic.states.note(backend.id, self.state_of(backend))
        # Every proxy process has applied it before we answer (processes > 1).
        await self.balancer.sync_processes()
        if wait_s is None:
            return web.json_response(self.backend_snapshot(backend))
        report = await self._wait_drained(backend, wait_s)
        data = self.backend_snapshot(backend)
        data["drain"] = report
        return web.json_response(data, status=200 if report["drained"] else 202)

    async def _wait_drained(self, backend: Backend, wait_s: float) -> dict[str, Any]:
        """Wait until ``backend`` has nothing in flight or ``wait_s`` passed; say what is left."""
        start = time.monotonic()
        # Shutdown ends the wait early rather than holding the admin listener open.
        waiter = asyncio.ensure_future(wait_drained(backend, wait_s, DRAIN_POLL_S))
        stopping = asyncio.ensure_future(self.balancer.stop_event.wait())
        try:
            await asyncio.wait([waiter, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, stopping):
                task.cancel()
            await asyncio.gather(waiter, stopping, return_exceptions=True)
        waited = time.monotonic() - start
        in_flight = backend.in_flight + backend.remote_in_flight
        report: dict[str, Any] = {"drained": in_flight == 0, "waited_s": round(waited, 3),
                                  "in_flight": in_flight}
        if in_flight:
            conns = self.balancer.connections.get(backend.id)
            report["busy_connections"] = [c for c in (conns.connections() if conns else [])
                                          if c.get("state") != "idle"]
            log.warning("drain of %s: %d requests still in flight after %.1fs", backend.id,
                        in_flight, waited)
        return report

    def _find(self, request: web.Request) -> Backend:
        backend_id = f"{request.match_info['pool']}/{request.match_info['name']}"
        backend = self.balancer.registry.find(backend_id)
        if backend is None:
            raise web.HTTPNotFound(text=f"no backend {backend_id!r}\n")
        return backend

    # --- views -----------------------------------------------------------------------------------------

    def reset(self) -> None:
        """``POST /stats/reset``: counters, windows, slow log and backend connection counters start over.
        Prometheus counters are not reset (they must never go backwards): the views subtract a baseline.
        """
        self.traffic.reset()
        self.slowlog.reset()
        self.run_id = uuid.uuid4().hex[:12]
        self._connection_baselines = {backend_id: conns.snapshot() for backend_id, conns in
                                      self.balancer.connections.items()}

    def backend_snapshot(self, backend: Backend) -> dict[str, Any]:
        conns = self.balancer.connections.get(backend.id)
        state = self.state_of(backend)
        since = self.traffic.states.note(backend.id, state)
        traffic = self.traffic
        data: dict[str, Any] = {
            "id": backend.id, "address": backend.address, "state": state, "since": iso_utc(since),
            "since_s": round(time.time() - since, 3),
            "ready": backend.is_ready, "alive": backend.alive, "healthy": backend.healthy,
            "admin": backend.admin.value, "reason": backend.reason, "weight": backend.weight,
            "effective_weight": round(backend.effective_weight, 3),
            "in_flight": backend.in_flight + backend.remote_in_flight, "spawned": backend.spawned,
            "ejections": traffic.states.ejections_since_reset(backend.id),
            "failed_attempts": traffic.failed_attempts_since_reset(backend.id),
        }
        key = (backend.pool, backend.id)
        data.update(traffic.counters(traffic.keys(backend.pool, backend.id)))
        window = traffic.windows.get(key)
        data["latency"] = traffic.latency([window] if window is not None else [])
        # "pool" here is the backend's connection figures: the key predates the word's one meaning,
        # and scripts read it.
        data["pool"] = self._connection_view(backend.id, conns.snapshot()) if conns is not None else None
        worker = self._worker(backend.id)
        if worker is not None:
            data["worker"] = worker.info()
        return data

    def pool_snapshot(self, name: str) -> dict[str, Any]:
        backend_set = self.balancer.registry.pools[name]
        traffic = self.traffic
        data: dict[str, Any] = {"ready": len(backend_set.ready), "size": len(backend_set)}
        data.update(traffic.counters(traffic.keys(name)))
        data["latency"] = traffic.latency(w for k, w in traffic.windows.items() if k[0] == name)
        data["backends"] = [self.backend_snapshot(b) for b in backend_set]
        discovery = self.balancer.discovery_state(name)
        if discovery is not None:
            data["discovery"] = discovery
        return data

    def snapshot(self) -> dict[str, Any]:
        b = self.balancer
        traffic = self.traffic
        totals = traffic.counters(traffic.keys())
        totals["latency"] = traffic.latency(traffic.windows.values())
        return {
            "uptime_s": round(time.time() - b.started_at, 3),
            "started_at": iso_utc(b.started_at),
            "stats_since": iso_utc(traffic.reset_at),
            "run": self.run_id,
            "config": {"file": b.config.source, "sha256": b.config.text_hash},
            "requests": totals["requests"],
            "windows": [name for name, _ in WINDOWS],
            "totals": totals,
            "listeners": b.listener_stats(),
            "routes": {r.name: self.traffic.counters([k for k in self.traffic.cells if k[2] == r.name])
                       for r in b.config.routes},
            "pools": {name: self.pool_snapshot(name) for name in b.registry.pools},
            "workers": [{"id": w.id, "pool": w.spec.pool, **w.info()} for w in b.supervisor.workers],
            "slowlog": {"threshold_ms": round(self.slowlog.threshold_s * 1000, 3), "kept": len(self.slowlog),
                        "seen": self.slowlog.seen},
        }

    def series(self, since: int, until: int) -> dict[str, Any]:
        """Per-second requests, failures and p99 for each pool and backend, for the dashboard's charts."""
        traffic = self.traffic
        windows = traffic.windows
        return {
            "seconds": [traffic.wall_of(s) for s in range(since + 1, until + 1)],
            "pools": {name: traffic.series((w for k, w in windows.items() if k[0] == name), since, until)
                      for name in self.balancer.registry.pools},
            "backends": {b.id: traffic.series([w] if (w := windows.get((b.pool, b.id))) else [], since, until)
                         for b in self.balancer.registry.backends()},
        }

    def _connection_view(self, backend_id: str, snap: dict[str, Any]) -> dict[str, Any]:
        """The pool's snapshot with its counters counted from the last reset (``wait_max_s``: since
        start; gauges as they are)."""
        base = self._connection_baselines.get(backend_id)
        if base is None:
            return snap
        for key in ("created", "reused", "replayed", "acquires", "waits"):
            snap[key] -= base[key]
        snap["wait_total_s"] = round(snap["wait_total_s"] - base["wait_total_s"], 6)
        snap["closed"] = {reason: n - base["closed"].get(reason, 0) for reason, n in snap["closed"].items()}
        leased = snap["created"] + snap["reused"]
        snap["reuse_ratio"] = round(snap["reused"] / leased, 4) if leased else 0.0
        return snap

    def _extra_metrics(self) -> Iterator[Metric]:
        slow = CounterMetricFamily("balancer_slow_requests", "Requests slower than the slow-log threshold")
        slow.add_metric([], self.slowlog.total)
        yield slow
        access_log = self.balancer.access_log
        if access_log is not None:
            yield CounterMetricFamily("balancer_access_log_lines", "Access log lines written",
                                      value=access_log.written)
            yield CounterMetricFamily("balancer_access_log_dropped", "Access log lines dropped",
                                      value=access_log.dropped)
        yield GaugeMetricFamily("balancer_uptime_seconds", "Seconds since balancer started",
                                value=time.time() - self.balancer.started_at)


def _loopback_host(host: str) -> bool:
    """``host`` (a listener's, or a request's Host with its port) names this machine's loopback."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or (host.startswith("[") and "]:" in host) else host
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
