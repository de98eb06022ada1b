"""Request routing: the ordered route table, first match wins.

A route matches on the request's host (exact, or ``*.example.com`` for one more label; without case,
without port), its path prefix (on whole segments: ``/api`` matches ``/api`` and ``/api/x``, not
``/apix``), and optionally its method and exact header values.

Matching uses the path as a backend would see it: dot-segments removed (RFC 3986 5.2.4) and
percent-escapes of unreserved characters decoded (RFC 3986 2.3), so ``/evil/../api`` is ``/api`` and
``/%61pi`` is ``/api``. A path that climbs above the root (``/..``) is refused. The target sent
upstream stays byte for byte as received unless the route rewrites it (``strip_prefix``,
``add_prefix``); a rewrite is made from the normalised path.

Built once from the configuration, grouped by host at build time. A small table (up to
``SCAN_LIMIT`` routes) is scanned in order; a larger one is a dictionary from prefix to its routes,
probed once per distinct prefix length, so the cost follows the number of different prefix lengths
(usually a handful), not the number of routes.
"""

from __future__ import annotations

from collections.abc import Sequence

from .faults import Faults
from .guards import Guards
from .headers import HeaderEdits, RawHeaders

SCAN_LIMIT = 8
_NONE = 1 << 62          # an index past any route

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = b"0123456789abcdefABCDEF"


class PathEscapesRoot(ValueError):
    """The path climbs above ``/``."""


def normalise_path(path: bytes) -> bytes:
    """``path`` (no query) as matched: unreserved %-escapes decoded, dot-segments removed.

    Raises PathEscapesRoot for a path that goes above the root."""
    if b"%" in path:
        path = _decode_unreserved(path)
    if b"/." not in path:
        return path
    output: list[bytes] = []
    segments = path.split(b"/")
    last = len(segments) - 1
    for index, segment in enumerate(segments[1:], start=1):
        if segment == b".":
            if index == last:
                output.append(b"")
        elif segment == b"..":
            if not output:
                raise PathEscapesRoot(path)
            output.pop()
            if index == last:
                output.append(b"")
        else:
            output.append(segment)
    return b"/" + b"/".join(output)


def _decode_unreserved(path: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == 0x25 and i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
            value = int(path[i + 1:i + 3], 16)
            if value in _UNRESERVED:
                out.append(value)
                i += 3
                continue
        out.append(c)
        i += 1
    return bytes(out)


class Route:
    """One route, ready to match and act. ``pool`` None: answered here (``redirect``, ``respond``)."""

    __slots__ = ("add_prefix", "faults", "guards", "headers", "host", "limit_config", "methods", "name",
                 "path_prefix", "pool", "redirect", "request_edits", "respond", "response_edits", "rewrites",
                 "strip_prefix")

    def __init__(self, name: str, pool: str | None, path_prefix: bytes = b"/", host: bytes | None = None, *,
                 methods: frozenset[str] | None = None, headers: tuple[tuple[bytes, bytes], ...] = (),
                 strip_prefix: bool = False, add_prefix: bytes = b"",
                 request_edits: HeaderEdits | None = None, response_edits: HeaderEdits | None = None,
                 guards: Guards | None = None, redirect: tuple[bytes, int, bool] | None = None,
                 respond: tuple[int, bytes, bytes] | None = None, limit_config: object = None,
                 faults: Faults | None = None) -> None:
        self.name = name
        self.limit_config = limit_config    # what the limiter was built from (kept across reloads)
        self.pool = pool
        # Stored without a trailing slash (but "/" itself): matching is on whole segments.
        self.path_prefix = path_prefix.rstrip(b"/") or b"/"
        self.host = host               # lower-case, without port; b"*.example.com"; None = any host
        self.methods = methods
        self.headers = headers         # (lower-case name, exact value)
        self.strip_prefix = strip_prefix
        self.add_prefix = add_prefix.rstrip(b"/")
        self.rewrites = strip_prefix or bool(self.add_prefix)
        self.request_edits = request_edits
        self.response_edits = response_edits
        self.guards = guards
        self.redirect = redirect       # (to, status, keep_path)
        self.respond = respond         # (status, body, content type)
        self.faults = faults

    def covers(self, path: bytes) -> bool:
        """``path`` (normalised) is under this route's prefix, on whole segments."""
        prefix = self.path_prefix
        if prefix == b"/":
            return True
        return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == 0x2F)

    def accepts(self, method: str, headers: RawHeaders) -> bool:
        """The method and header conditions (host and path already matched)."""
        if self.methods is not None and method not in self.methods:
            return False
        for name, value in self.headers:
            if not any(n.lower() == name and v == value for n, v in headers):
                return False
        return True

    def remainder(self, path: bytes) -> bytes:
        """``path`` after this route's prefix (``/`` at least)."""
        if self.path_prefix == b"/":
            return path
        return path[len(self.path_prefix):] or b"/"

    def rewrite(self, path: bytes, query: bytes) -> bytes:
        """The target sent upstream: the prefix stripped and/or added, from the normalised path."""
        if self.strip_prefix:
            path = self.remainder(path)
        path = self.add_prefix + path if self.add_prefix else path
        return path + query

    def __repr__(self) -> str:
        return f"<Route {self.name} {(self.host or b'*').decode()}{self.path_prefix.decode()} -> {self.pool}>"


class PrefixTable:
    """The routes (in configuration order) whose prefix covers a path."""

    __slots__ = ("_by_prefix", "_lengths", "_scan")

    def __init__(self, routes: Sequence[Route]) -> None:
        self._scan = tuple(routes) if len(routes) <= SCAN_LIMIT else None
        self._by_prefix: dict[bytes, list[tuple[int, Route]]] = {}
        for index, route in enumerate(routes):
            self._by_prefix.setdefault(route.path_prefix, []).append((index, route))
        self._lengths = sorted({len(p) for p in self._by_prefix if p != b"/"})

    def match(self, path: bytes, method: str, headers: RawHeaders) -> Route | None:
        scan = self._scan
        if scan is not None:
            for route in scan:
                if route.covers(path) and ((route.methods is None and not route.headers)
                                           or route.accepts(method, headers)):
                    return route
            return None
        # Each probe gives the routes of one prefix, in configuration order; the answer is the
        # earliest route, over all probes, whose conditions hold.
        best: Route | None = None
        best_index = _NONE
        by_prefix = self._by_prefix
        root = by_prefix.get(b"/")
        if root is not None:
            best, best_index = _first(root, best_index, method, headers)
        size = len(path)
        for length in self._lengths:
            if length > size:
                break
            if length < size and path[length] != 0x2F:
                continue                    # not on a segment boundary: no prefix of this length covers
            hits = by_prefix.get(path[:length])
            if hits is not None and hits[0][0] < best_index:
                found, index = _first(hits, best_index, method, headers)
                if found is not None:
                    best, best_index = found, index
        return best


def _first(hits: list[tuple[int, Route]], before: int, method: str, headers: RawHeaders
           ) -> tuple[Route | None, int]:
    """The first of ``hits`` (all covering the path) before index ``before`` whose conditions hold."""
    for index, route in hits:
        if index >= before:
            break
        if (route.methods is None and not route.headers) or route.accepts(method, headers):
            return route, index
    return None, before


def host_matches(pattern: bytes, host: bytes) -> bool:
    if pattern.startswith(b"*."):
        parent = host.partition(b".")[2]
        return bool(parent) and parent == pattern[2:]
    return pattern == host


def request_hostname(host: bytes) -> bytes:
    """A Host value lower-cased, without its port."""
    host = host.lower()
    if host.startswith(b"["):
        return host.partition(b"]")[0] + b"]"
    return host.partition(b":")[0]


class Router:
    """First matching route for (host, path, method, headers)."""

    __slots__ = ("_any_host", "_by_host", "_only_root", "_wildcards", "routes", "uses_host")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self.uses_host = any(r.host is not None for r in routes)
        exact = {r.host for r in routes if r.host is not None and not r.host.startswith(b"*.")}
        wild = {r.host for r in routes if r.host is not None and r.host.startswith(b"*.")}
        # Each host's table keeps the global order: the routes that can match that host, interleaved.
        self._by_host = {h: PrefixTable([r for r in routes if r.host is None or host_matches(r.host, h)])
                         for h in exact}
        self._wildcards = {w[2:]: PrefixTable([r for r in routes if r.host in (w, None)]) for w in wild}
        self._any_host = PrefixTable([r for r in routes if r.host is None])
        # The common single catch-all route: no scan at all.
        only = routes[0] if len(routes) == 1 else None
        self._only_root = only if (only is not None and only.path_prefix == b"/" and only.host is None
                                   and only.methods is None and not only.headers) else None

    def match(self, host: bytes, path: bytes, method: str, headers: RawHeaders) -> Route | None:
        """``path``: the normalised path (:func:`normalise_path`), without the query."""
        if self._only_root is not None:
            return self._only_root
        table = self._any_host
        if self.uses_host:
            name = request_hostname(host)
            table = self._by_host.get(name) or self._wildcards.get(name.partition(b".")[2]) or table
        return table.match(path, method, headers)

    def route(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)
