"""pick() cost per policy at 4, 100 and 1000 backends, and the cost of rebuilding after a change.

    .venv/bin/python bench/selection.py            # prints a table (ns per call, best of 5 runs)

The pool is a ready snapshot of backends with random in-flight counts (0-9), so least-loaded and p2c
compare real loads; ``version`` stays fixed, so round-robin's schedule is built once and each pick is
what a request pays. "rebuild" is what the first pick after a snapshot change pays (a backend
joined or left, or a slow-start step): equal weights, and weights 1-5.
"""

from __future__ import annotations

import random
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancer.lb.registry import Backend
from balancer.lb.selection import SELECTORS, RoundRobin

SIZES = (4, 100, 1000)


def make_pool(n: int, weights: Callable[[int], int] = lambda i: 1) -> tuple[Backend, ...]:
    rng = random.Random(n)
    pool = []
    for i in range(n):
        b = Backend(id=f"web/{i}", pool="web", host="127.0.0.1", port=10000 + i, weight=weights(i))
        b.in_flight = rng.randrange(10)
        pool.append(b)
    return tuple(pool)


def ns_per_call(stmt: Callable[[], object], budget_s: float = 0.1) -> float:
    timer = timeit.Timer(stmt)
    number, _ = timer.autorange()
    number = max(int(number * budget_s / 0.2), 1)
    return min(timer.repeat(repeat=5, number=number)) / number * 1e9


def pick_cost(policy: str, n: int) -> float:
    pool = make_pool(n)
    selector = SELECTORS[policy]()
    selector.pick(pool, 1)
    return ns_per_call(lambda: selector.pick(pool, 1))


def rebuild_cost(n: int, weighted: bool) -> float:
    pool = make_pool(n, (lambda i: 1 + i % 5) if weighted else (lambda i: 1))
    rr = RoundRobin()
    version = iter(range(1, 10**9))
    return ns_per_call(lambda: rr.pick(pool, next(version)))


def main() -> None:
    print(f"Python {sys.version.split()[0]}; ns per call, best of 5")
    print(f"{'policy':<34}" + "".join(f"{n:>12}" for n in SIZES))
    for policy in SELECTORS:
        print(f"{policy + ' pick':<34}" + "".join(f"{pick_cost(policy, n):>12,.0f}" for n in SIZES))
    for weighted in (False, True):
        label = f"round_robin rebuild ({'weights 1-5' if weighted else 'equal'})"
        print(f"{label:<34}" + "".join(f"{rebuild_cost(n, weighted):>12,.0f}" for n in SIZES))


if __name__ == "__main__":
    main()
