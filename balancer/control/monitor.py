"""The monitoring listener: liveness, readiness and (optionally) metrics, for probes and scrapers.

``monitor: {host: 0.0.0.0, port: 8082, metrics: true}`` serves ``GET /healthz``, ``GET /readyz`` and,
with ``metrics``, ``GET /metrics``; nothing else, and with no token: it is meant for the pod network
(kubelet probes, Prometheus), where the admin listener and its switches must not be.

* ``/healthz``: 200 while the process runs (a backend outage must never restart balancer);
* ``/readyz``: 200 when the data listeners are up, every pool has a ready backend and balancer is not
  shutting down; 503 otherwise, with the reason. A draining pod leaves its Service.
"""

from __future__ import annotations

import logging
from typing import Protocol

from aiohttp import web

from ..config.models import MonitorConfig
from ..lb.registry import Registry
from ..observe.metrics import CONTENT_TYPE
from .weblistener import WebListener

log = logging.getLogger(__name__)


class Watched(Protocol):
    """What the monitor reads of the balancer."""

    @property
    def registry(self) -> Registry: ...
    def serving(self) -> bool: ...
    def metrics_page(self) -> bytes | None: ...


class Monitor:
    """The listener; the owner calls :meth:`start` and :meth:`aclose`."""

    def __init__(self, config: MonitorConfig, balancer: Watched) -> None:
        self.config = config
        self.balancer = balancer
        self._listener = WebListener(config.host, config.port)

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if self.config.metrics:
            app.router.add_get("/metrics", self.metrics)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        pools = {name: len(s.ready) for name, s in self.balancer.registry.pools.items()}
        serving = self.balancer.serving()
        ready = serving and all(pools.values())
        if ready:
            reason = ""
        elif not serving:
            reason = "not serving (starting or shutting down)"
        else:
            reason = "no ready backend in " + ", ".join(n for n, c in pools.items() if not c)
        return web.json_response({"ready": ready, "pools": pools, "reason": reason},
                                 status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        page = self.balancer.metrics_page()
        if page is None:
            raise web.HTTPNotFound(text="metrics need the admin section (its statistics)\n")
        return web.Response(body=page, headers={"Content-Type": CONTENT_TYPE})

    async def start(self) -> None:
        await self._listener.start(self.application())
        log.info("monitor on http://%s:%d (healthz, readyz%s)", self.config.host, self.bound_port,
                 ", metrics" if self.config.metrics else "")

    @property
    def bound_port(self) -> int:
        return self._listener.bound_port

    async def aclose(self) -> None:
        await self._listener.aclose()
