"""Pickers: choose one backend from a pool's ready snapshot.

Pure and synchronous: a picker sees the immutable ``ready`` tuple of a :class:`BackendSet` and its
``version``; it keeps only its own rotation state, rebuilt when the version changes. No clock, no I/O.
Every picker weighs backends by ``effective_weight`` (the configured weight, or less during slow start).

* ``round_robin`` -- nginx's smooth weighted round-robin: weights interleave (5,1,1 gives
  a a b a c a a, never a a a a a b c). The schedule for one full cycle is computed once per snapshot, so
  a pick is O(1) whatever the pool size; equal weights reduce to plain rotation. nginx's loop costs
  O(backends x cycle) to precompute, so big pools with uneven weights get an earliest-deadline-first
  schedule instead (Envoy's weighted round-robin: also interleaved, O(cycle log n) to build).
* ``least_loaded`` -- fewest requests in flight per unit of weight, counting the request being placed
  (``(in_flight + 1) / weight``, so weights matter even in an idle pool); ties are broken by rotating
  the starting point, so an idle pool does not pile every request onto its first backend. O(n).
* ``p2c`` -- power of two random choices on the same load (HAProxy's ``random(2)``, Envoy's
  least-request): O(1), nearly as good as a full scan on large pools.

``exclude`` lets the proxy retry on a *different* backend; it is small (the backends already tried).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Collection, Sequence
from functools import reduce
from typing import Protocol

from .registry import Backend

# Longest precomputed round-robin cycle; beyond it (huge co-prime weights) each pick pops a heap.
MAX_SCHEDULE = 16384
# nginx's exact order is precomputed only while backends x cycle stays under this (~10 ms of Python).
EXACT_BUDGET = 100_000
# Effective weights are compared in tenths: slow start ramps in steps of 10 %.
WEIGHT_SCALE = 10


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


def deadline_order(weights: Sequence[int], count: int) -> list[int]:
    """Indices in earliest-deadline-first order for ``count`` picks: backend i is due every 1/w_i,
    starting half a period in (so equal weights interleave rather than burst). O(count log n)."""
    heap = [(0.5 / w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    order: list[int] = []
    for _ in range(count):
        due, i = heap[0]
        heapq.heapreplace(heap, (due + 1.0 / weights[i], i))
        order.append(i)
    return order


def scaled_weights(ready: Sequence[Backend]) -> list[int]:
    """Integer weights in tenths of a unit, divided by their gcd (so 3,1,2 stays 3,1,2)."""
    weights = [max(round(b.effective_weight * WEIGHT_SCALE), 1) for b in ready]
    divisor = reduce(math.gcd, weights)
    return [w // divisor for w in weights]


class RoundRobin:
    """Smooth weighted round-robin over the ready snapshot."""

    __slots__ = ("_cursor", "_heap", "_schedule", "_version", "_weights")

    def __init__(self) -> None:
        self._version = -1
        self._schedule: list[Backend] = []
        self._cursor = 0
        # Only when the cycle is too long to precompute: a live earliest-deadline-first heap.
        self._heap: list[tuple[float, int]] = []
        self._weights: list[int] = []

    def _rebuild(self, ready: Sequence[Backend], version: int) -> None:
        self._version = version
        self._heap = []
        if not ready:
            self._schedule = []
            return
        weights = scaled_weights(ready)
        cycle = sum(weights)
        if cycle == len(weights):                       # equal weights: plain rotation
            self._schedule = list(ready)
        elif cycle * len(weights) <= EXACT_BUDGET:
            self._schedule = [ready[i] for i in smooth_weighted_order(weights, cycle)]
        elif cycle <= MAX_SCHEDULE:
            self._schedule = [ready[i] for i in deadline_order(weights, cycle)]
        else:
            self._schedule = []
            self._weights = weights
            self._heap = [(0.5 / w, i) for i, w in enumerate(weights)]
            heapq.heapify(self._heap)
        # Keep the cursor where it was (modulo the new length) so a snapshot change does not
        # send the next request back to the first backend every time.
        self._cursor %= max(len(self._schedule), 1)

    def _next(self, ready: Sequence[Backend]) -> Backend:
        schedule = self._schedule
        if schedule:
            cursor = self._cursor
            self._cursor = (cursor + 1) % len(schedule)
            return schedule[cursor]
        due, i = self._heap[0]
        heapq.heapreplace(self._heap, (due + 1.0 / self._weights[i], i))
        return ready[i]

    def pick(self, ready: Sequence[Backend], version: int,
             exclude: Collection[Backend] = ()) -> Backend | None:
        if not ready:
            return None
        if version != self._version:
            self._rebuild(ready, version)
        if not exclude:
            return self._next(ready)
        # Bounded: a full cycle visits every backend at least once.
        for _ in range(len(self._schedule) or sum(self._weights)):
            backend = self._next(ready)
            if backend not in exclude:
                return backend
        return None


def _load(backend: Backend) -> float:
    """In flight per unit of weight, counting the request being placed."""
    return (backend.in_flight + 1) / backend.effective_weight


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
        # Two slices instead of (start + i) % n per step: the scan is the whole cost of a pick.
        for part in (ready[start:], ready[:start]):
            for backend in part:
                load = (backend.in_flight + 1) / backend.effective_weight
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
