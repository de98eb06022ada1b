"""Request routing: the ordered route table, first match wins (host, then path prefix).

Built once from the configuration, grouped by host at build time. A small table (up to
``SCAN_LIMIT`` routes) is scanned in order; a larger one is a dictionary from prefix to its first
route, probed once per distinct prefix length, so the cost follows the number of different prefix
lengths (usually a handful), not the number of routes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SCAN_LIMIT = 8


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    pool: str
    path_prefix: bytes = b"/"
    host: bytes | None = None      # lower-case, without port; None = any host


class PrefixTable:
    """The first route (in configuration order) whose prefix starts the target."""

    __slots__ = ("_by_prefix", "_lengths", "_scan")

    def __init__(self, routes: Sequence[Route]) -> None:
        self._scan = tuple(routes) if len(routes) <= SCAN_LIMIT else None
        self._by_prefix: dict[bytes, tuple[int, Route]] = {}
        for index, route in enumerate(routes):
            self._by_prefix.setdefault(route.path_prefix, (index, route))
        self._lengths = sorted({len(p) for p in self._by_prefix})

    def match(self, target: bytes) -> Route | None:
        if self._scan is not None:
            for route in self._scan:
                if target.startswith(route.path_prefix):
                    return route
            return None
        best: tuple[int, Route] | None = None
        by_prefix = self._by_prefix
        for length in self._lengths:
            if length > len(target):
                break
            hit = by_prefix.get(target[:length])
            if hit is not None and (best is None or hit[0] < best[0]):
                best = hit
        return best[1] if best is not None else None


class Router:
    """First matching route for (host, target). ``host`` is the Host field without its port."""

    __slots__ = ("_any_host", "_by_host", "_only_root", "uses_host")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.uses_host = any(r.host is not None for r in routes)
        hosts = {r.host for r in routes if r.host is not None}
        # Each host's table keeps the global order: its own routes and the any-host ones interleaved.
        self._by_host = {h: PrefixTable([r for r in routes if r.host in (h, None)]) for h in hosts}
        self._any_host = PrefixTable([r for r in routes if r.host is None])
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
        return table.match(target)
