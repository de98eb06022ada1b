"""Helpers shared by the observability tests: in-process worker apps and admin-API calls."""

from __future__ import annotations

from typing import Any

import aiohttp


def config(ports: list[int], admin: str = "{host: 127.0.0.1, port: 0}", extra: str = "",
           pool: str = "web") -> str:
    servers = "\n".join(f"      - {{address: 127.0.0.1:{p}}}" for p in ports)
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {admin}
pools:
  {pool}:
    servers:
{servers}
{extra}
"""


async def get(session: aiohttp.ClientSession, url: str, n: int = 1) -> list[int]:
    """GET ``url`` ``n`` times in sequence, reading each body; return the statuses."""
    statuses = []
    for _ in range(n):
        async with session.get(url) as resp:
            await resp.read()
            statuses.append(resp.status)
    return statuses


class AdminClient:
    """The admin API of an in-process balancer."""

    def __init__(self, session: aiohttp.ClientSession, balancer: Any, token: str | None = None) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{balancer.admin.bound_port}"
        # An operator's client: the admin API's CSRF guard wants this header on changes.
        self.headers = {"Authorization": f"Bearer {token}"} if token else {"X-Balancer-Admin": "1"}

    async def json(self, path: str, method: str = "GET", status: int = 200) -> Any:
        async with self.session.request(method, self.base + path, headers=self.headers) as resp:
            assert resp.status == status, (path, resp.status, await resp.text())
            return await resp.json()

    async def text(self, path: str) -> str:
        async with self.session.get(self.base + path, headers=self.headers) as resp:
            assert resp.status == 200, (path, resp.status)
            return await resp.text()


def backend_of(stats: Any, backend_id: str) -> Any:
    for pool in stats["pools"].values():
        for backend in pool["backends"]:
            if backend["id"] == backend_id:
                return backend
    raise KeyError(backend_id)
