"""Pickers: choose one backend from a pool's ready snapshot.

Pure and synchronous: a picker sees the immutable ``ready`` tuple of a :class:`BackendSet` and its
``version``; it keeps only its own rotation state, rebuilt when the version changes. No clock, no I/O.

* ``round_robin`` -- nginx's smooth weighted round-robin: weights interleave (5,1,1 gives
  a a b a c a a, never a a a a a b c). The schedule for one full cycle is computed once per snapshot, so
  a pick is O(1) whatever the pool size; equal weights reduce to plain rotation.
* ``least_loaded`` -- fewest requests in flight per unit of weight; ties are broken by rotating the
  starting point, so an idle pool does not pile every request onto its first backend.
* ``p2c`` -- power of two random choices on in-flight/weight (HAProxy's ``random(2)``, Envoy's
  least-request): O(1), nearly as good as a full scan on large pools.

``exclude`` lets the proxy retry on a *different* backend; it is small (the backends already tried).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence
from functools import reduce
from typing import Protocol

from .registry import Backend

# Longest precomputed round-robin cycle; beyond it (huge co-prime weights) we run nginx's O(n) loop.
MAX_SCHEDULE = 16384


class Selector(Protocol):
    def pick(self, ready: Sequence[Backend], version: int,
             exclude: Collection[Backend] = ()) -> Backend | None: ...


def smooth_weighted_order(weights: Sequence[int], count: int) -> list[int]:
    """Indices chosen by nginx's smooth weighted round-robin for ``count`` picks."""
    current = [0] * len(weights)
    total = sum(weights)
    order: list[int] = []
    for _ in range(count):
        best = -1
        for i, w in enumerate(weights):
            current[i] += w
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        order.append(best)
    return order


class RoundRobin:
    """Smooth weighted round-robin over the ready snapshot."""

    __slots__ = ("_current", "_cursor", "_schedule", "_version")

    def __init__(self) -> None:
        self._version = -1
        self._schedule: list[Backend] = []
        self._cursor = 0
        self._current: list[int] = []   # only for the O(n) fallback

    def _rebuild(self, ready: Sequence[Backend], version: int) -> None:
        self._version = version
        weights = [b.weight for b in ready]
        if not weights:
            self._schedule = []
            return
        divisor = reduce(math.gcd, weights)
        cycle = sum(weights) // divisor
        if cycle <= MAX_SCHEDULE:
            order = smooth_weighted_order([w // divisor for w in weights], cycle)
            self._schedule = [ready[i] for i in order]
        else:
            self._schedule = []
            self._current = [0] * len(weights)
        # Keep the cursor where it was (modulo the new length) so a snapshot change does not
        # send the next request back to the first backend every time.
        self._cursor %= max(len(self._schedule), 1)

    def _next(self, ready: Sequence[Backend]) -> Backend:
        schedule = self._schedule
        if schedule:
            cursor = self._cursor
            self._cursor = (cursor + 1) % len(schedule)
            return schedule[cursor]
        current = self._current
        total = 0
        best = 0
        for i, backend in enumerate(ready):
            current[i] += backend.weight
            total += backend.weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return ready[best]

    def pick(self, ready: Sequence[Backend], version: int,
             exclude: Collection[Backend] = ()) -> Backend | None:
        if not ready:
            return None
        if version != self._version:
            self._rebuild(ready, version)
        for _ in range(len(self._schedule) or len(ready)):
            backend = self._next(ready)
            if backend not in exclude:
                return backend
        return None


def _load(backend: Backend) -> float:
    return backend.in_flight / backend.weight


class LeastLoaded:
    """Fewest in-flight requests per unit of weight; rotating tie-break."""

    __slots__ = ("_start",)

    def __init__(self) -> None:
        self._start = 0

    def pick(self, ready: Sequence[Backend], version: int,
             exclude: Collection[Backend] = ()) -> Backend | None:
        n = len(ready)
        if not n:
            return None
        start = self._start = (self._start + 1) % n
        best: Backend | None = None
        best_load = math.inf
        for i in range(n):
            backend = ready[(start + i) % n]
            load = backend.in_flight / backend.weight
            if load < best_load and backend not in exclude:
                best, best_load = backend, load
        return best


class PowerOfTwoChoices:
    """Two random candidates, the less loaded wins; falls back to a scan when exclusions bite."""

    __slots__ = ("_random",)

    def __init__(self, rng: Callable[[], float] = random.random) -> None:
        self._random = rng

    def pick(self, ready: Sequence[Backend], version: int,
             exclude: Collection[Backend] = ()) -> Backend | None:
        n = len(ready)
        if n == 0:
            return None
        if n == 1:
            only = ready[0]
            return None if only in exclude else only
        a = ready[int(self._random() * n)]
        b = ready[int(self._random() * n)]
        if a in exclude or b in exclude or a is b:
            candidates = [x for x in ready if x not in exclude]
            if not candidates:
                return None
            if len(candidates) == 1:
                return candidates[0]
            a = candidates[int(self._random() * len(candidates))]
            b = candidates[int(self._random() * len(candidates))]
        return a if _load(a) <= _load(b) else b


SELECTORS: dict[str, Callable[[], Selector]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "p2c": PowerOfTwoChoices,
}


def make_selector(balance: str) -> Selector:
    return SELECTORS[balance]()
