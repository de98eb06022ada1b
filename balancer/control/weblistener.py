"""An aiohttp application on a port of its own: the admin API and the monitor listener each run one."""

from __future__ import annotations

from aiohttp import web


class WebListener:
    """Serves ``app`` on ``host:port`` between :meth:`start` and :meth:`aclose`."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self, app: web.Application) -> None:
        # A short shutdown timeout: a request still waiting (a drain?wait=) must not hold a shutdown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()

    @property
    def bound_port(self) -> int:
        """The port as bound (``port: 0`` asks for any free one)."""
        assert self._runner is not None
        return int(self._runner.addresses[0][1])

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
