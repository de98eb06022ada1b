"""The admin listener: liveness, readiness and a JSON view of pools, backends, connections, workers.

A separate aiohttp ``Application`` on its own port (loopback by default), so the data port carries no
router. It observes through public attributes only; the operations it triggers are registry methods.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .registry import AdminState, Backend

if TYPE_CHECKING:
    from .app import Balancer


class Admin:
    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        cfg = balancer.config.admin
        assert cfg is not None
        self.host = cfg.host
        self.port = cfg.port
        self.token = cfg.token
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/stats/backends/{pool}/{name}", self.backend_stats)
        for action in ("drain", "disable", "enable"):
            app.router.add_post(f"/backends/{{pool}}/{{name}}/{action}", self.set_admin_state)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token and request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        result: web.StreamResponse = await handler(request)
        return result

    async def start(self) -> None:
        self._runner = web.AppRunner(self.application(), access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    @property
    def bound_port(self) -> int:
        assert self._runner is not None
        return int(self._runner.addresses[0][1])

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- handlers --------------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        pools = {name: len(s.ready) for name, s in self.balancer.registry.pools.items()}
        ready = all(pools.values())
        return web.json_response({"ready": ready, "pools": pools}, status=200 if ready else 503)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def backend_stats(self, request: web.Request) -> web.Response:
        backend = self._find(request)
        data = self.backend_snapshot(backend)
        pool = self.balancer.upstream.get(backend.id)
        data["connections"] = pool.connections() if pool is not None else []
        return web.json_response(data)

    async def set_admin_state(self, request: web.Request) -> web.Response:
        backend = self._find(request)
        action = request.path.rsplit("/", 1)[1]
        state = {"drain": AdminState.DRAINING, "disable": AdminState.DISABLED,
                 "enable": AdminState.ENABLED}[action]
        self.balancer.registry.set_admin(backend, state)
        return web.json_response(self.backend_snapshot(backend))

    def _find(self, request: web.Request) -> Backend:
        backend_id = f"{request.match_info['pool']}/{request.match_info['name']}"
        backend = self.balancer.registry.find(backend_id)
        if backend is None:
            raise web.HTTPNotFound(text=f"no backend {backend_id!r}\n")
        return backend

    # --- views -----------------------------------------------------------------------------------------

    def backend_snapshot(self, backend: Backend) -> dict[str, Any]:
        pool = self.balancer.upstream.get(backend.id)
        data: dict[str, Any] = {
            "id": backend.id, "address": backend.address, "state": backend.state,
            "ready": backend.is_ready, "alive": backend.alive, "healthy": backend.healthy,
            "admin": backend.admin.value, "reason": backend.reason, "weight": backend.weight,
            "in_flight": backend.in_flight, "spawned": backend.spawned,
            "pool": pool.snapshot() if pool is not None else None,
        }
        worker = next((w for w in self.balancer.supervisor.workers if w.backend is backend), None)
        if worker is not None:
            data["worker"] = worker.info()
        return data

    def snapshot(self) -> dict[str, Any]:
        b = self.balancer
        return {
            "uptime_s": round(time.time() - b.started_at, 3),
            "config": {"file": b.config.source, "sha256": b.config.text_hash},
            "requests": b.proxy.requests,
            "pools": {
                name: {"ready": len(s.ready), "backends": [self.backend_snapshot(x) for x in s]}
                for name, s in b.registry.pools.items()
            },
        }
