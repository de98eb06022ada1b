"""Routing: first match wins, by host then path prefix (whole segments), the same for small and
large tables."""

from __future__ import annotations

import random

from balancer.dataplane.routing import SCAN_LIMIT, Route, Router


def reference(routes: list[Route], host: bytes, target: bytes) -> Route | None:
    """The definition: the first route in order whose host (if any) and prefix match."""
    bare = host.lower().rsplit(b":", 1)[0]
    for route in routes:
        prefix = route.path_prefix.rstrip(b"/")
        on_segments = not prefix or target == prefix or target.startswith(prefix + b"/")
        if (route.host is None or route.host == bare) and on_segments:
            return route
    return None


def test_first_match_wins_with_hosts() -> None:
    """Order decides between overlapping prefixes; host routes apply to their host only."""
    routes = [Route("api-h", "p1", b"/api", b"a.example"), Route("api", "p2", b"/api"),
              Route("all", "p3", b"/")]
    router = Router(routes)
    assert router.match(b"a.example:8080", b"/api/x", "GET", []).name == "api-h"    # type: ignore[union-attr]
    assert router.match(b"b.example", b"/api/x", "GET", []).name == "api"           # type: ignore[union-attr]
    assert router.match(b"b.example", b"/other", "GET", []).name == "all"           # type: ignore[union-attr]


def test_large_tables_agree_with_the_definition() -> None:
    """Past the scan limit the prefix dictionary gives exactly the first match, on random tables."""
    rng = random.Random(5)
    words = [b"/a", b"/ab", b"/abc", b"/api", b"/api/v1", b"/api/v2", b"/b", b"/static/", b"/"]
    for _ in range(200):
        routes = [Route(f"r{i}", "p", rng.choice(words) + (str(rng.randrange(5)).encode()
                                                          if rng.random() < 0.5 else b""))
                  for i in range(rng.randrange(SCAN_LIMIT + 1, 40))]
        router = Router(routes)
        for target in (b"/", b"/a1", b"/abc2/x", b"/api/v1/users", b"/static/x.css", b"/zzz", b"/b3",
                       b"/api", b"/abc", b"/apix"):
            assert router.match(b"h", target, "GET", []) is reference(routes, b"h", target), target
