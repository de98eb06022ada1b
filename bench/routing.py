#!/usr/bin/env python3
"""Route lookup cost as the table grows: Router.match at 1, 10, 100 and 1000 routes.

Routes are `/svcN/` prefixes in order plus a final catch-all `/`; the request matches the last
service route (the worst case for an ordered scan) or falls through to the catch-all.
Usage: .venv/bin/python bench/routing.py
"""

from __future__ import annotations

import timeit
from functools import partial

from balancer.dataplane.routing import Route, Router


def table(n: int) -> list[Route]:
    routes = [Route(f"svc{i}", "p", f"/svc{i}/".encode()) for i in range(n - 1)]
    return [*routes, Route("root", "p", b"/")]


def main() -> None:
    print("routes | last service route ns | catch-all ns")
    for n in (1, 10, 100, 1000):
        router = Router(table(n))
        hit = f"/svc{max(n - 2, 0)}/users/42?x=1".encode()
        miss = b"/nothing/here"
        reps = 200_000
        match_hit = partial(router.match, b"h", hit, "GET", [])
        match_miss = partial(router.match, b"h", miss, "GET", [])
        t_hit = min(timeit.repeat(match_hit, number=reps, repeat=5)) / reps
        t_miss = min(timeit.repeat(match_miss, number=reps, repeat=5)) / reps
        print(f"{n:6} | {t_hit * 1e9:20.0f} | {t_miss * 1e9:12.0f}")


if __name__ == "__main__":
    main()
