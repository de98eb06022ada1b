"""Request routing: the ordered route table, first match wins (host, then path prefix).

Built once from the configuration; ``match`` is a scan over the routes a request's host can reach,
grouped by host at build time so that host-specific tables do not slow down the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    pool: str
    path_prefix: bytes = b"/"
    host: bytes | None = None      # lower-case, without port; None = any host


class Router:
    """First matching route for (host, target). ``host`` is the Host field without its port."""

    __slots__ = ("_any_host", "_by_host", "_only_root", "uses_host")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.uses_host = any(r.host is not None for r in routes)
        hosts = {r.host for r in routes if r.host is not None}
        # Each host's table keeps the global order: its own routes and the any-host ones interleaved.
        self._by_host = {h: tuple(r for r in routes if r.host in (h, None)) for h in hosts}
        self._any_host = tuple(r for r in routes if r.host is None)
        # The common single catch-all route: no scan at all.
        self._only_root = (routes[0] if len(routes) == 1 and routes[0].path_prefix == b"/"
                           and routes[0].host is None else None)

    def match(self, host: bytes, target: bytes) -> Route | None:
        if self._only_root is not None:
            return self._only_root
        table = self._any_host
        if self.uses_host:
            table = self._by_host.get(host.lower().rsplit(b":", 1)[0] if b"]" not in host else
                                      host.lower().rsplit(b"]", 1)[0] + b"]", table)
        for route in table:
            if target.startswith(route.path_prefix):
                return route
        return None
