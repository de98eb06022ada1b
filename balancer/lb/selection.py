"""Pickers: choose one backend from a pool's ready snapshot.

Pure and synchronous: a picker sees the immutable ``ready`` tuple of a :class:`BackendSet` and its
``version``; it keeps only its own rotation state, rebuilt when the version changes. No clock, no I/O.
Every picker weighs backends by ``effective_weight`` (the configured weight, or less during slow start).

* ``round_robin`` -- nginx's smooth weighted round-robin: weights interleave (5,1,1 gives
  a a b a c a a, never a a a a a b c). The schedule for one full cycle is computed once per snapshot, so
  a pick is O(1) whatever the pool size; equal weights reduce to plain rotation. nginx's own loop is
  O(backends) a step; :class:`SmoothWeighted` gives the same sequence in O(distinct weights) a step,
  so building a schedule stays cheap for 1000 backends, and a cycle too long to store is walked live.
* ``least_loaded`` -- fewest requests in flight per unit of weight, counting the request being placed
  (``(in_flight + 1) / weight``, so weights matter even in an idle pool); ties are broken by rotating
  the starting point, so an idle pool does not pile every request onto its first backend. O(n).
* ``p2c`` -- power of two random choices on the same load (HAProxy's ``random(2)``, Envoy's
  least-request): O(1), nearly as good as a full scan on large pools.

``exclude`` lets the proxy retry on a *different* backend; it is small (the backends already tried).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence
from functools import reduce
from typing import Protocol

from .hashing import ConsistentHash
from .registry import Backend

# Longest precomputed round-robin cycle; beyond it (huge co-prime weights) each pick runs one step.
MAX_SCHEDULE = 16384
# Effective weights are compared in tenths: slow start ramps in steps of 10 %.
WEIGHT_SCALE = 10


class Selector(Protocol):
    def pick(self, ready: Sequence[Backend], version: int,
             exclude: Collection[Backend] = ()) -> Backend | None: ...


class _Group:
    """Backends of equal weight, picked in index order, round after round."""

    __slots__ = ("cursor", "members", "rounds", "weight")

    def __init__(self, weight: int, members: list[int]) -> None:
        self.weight = weight
        self.members = members
        self.cursor = 0          # the member whose turn it is
        self.rounds = 0          # completed rounds: picks of the member at the cursor


class SmoothWeighted:
    """nginx's smooth weighted round-robin, computed per group of equal weights: O(groups) a step.

    nginx adds every weight to its backend's ``current`` and picks the largest (lowest index on ties),
    then subtracts the total: O(n) a step. After ``k`` steps, ``current_i = k * w_i - total * picks_i``;
    within a group of equal weights the member picked least (then the lowest index) leads, so members
    of a group are picked in index order, round after round, and comparing one candidate per group
    gives nginx's exact sequence (tests check it against nginx's loop). After ``total`` steps every
    backend has had ``w_i`` picks and the state is back at the start.
    """

    __slots__ = ("_groups", "_step", "_total")

    def __init__(self, weights: Sequence[int]) -> None:
        by_weight: dict[int, list[int]] = {}
        for i, w in enumerate(weights):
            by_weight.setdefault(w, []).append(i)
        self._groups = [_Group(w, members) for w, members in by_weight.items()]
        self._total = sum(weights)
        self._step = 0

    @property
    def cycle(self) -> int:
        """Steps after which the sequence repeats (the sum of the weights)."""
        return self._total

    def next(self) -> int:
        """The index of the next backend in nginx's sequence."""
        step = self._step = self._step + 1
        total = self._total
        best = self._groups[0]
        best_value = best_index = -1
        for group in self._groups:
            value = step * group.weight - total * group.rounds
            index = group.members[group.cursor]
            if value > best_value or (value == best_value and index < best_index):
                best, best_value, best_index = group, value, index
        best.cursor += 1
        if best.cursor == len(best.members):
            best.cursor = 0
            best.rounds += 1
        if step == total:
            self._step = 0
            for group in self._groups:
                group.cursor = group.rounds = 0
        return best_index


def smooth_weighted_order(weights: Sequence[int], count: int) -> list[int]:
    """Indices chosen by nginx's smooth weighted round-robin for ``count`` picks."""
    smooth = SmoothWeighted(weights)
    return [smooth.next() for _ in range(count)]


def scaled_weights(ready: Sequence[Backend]) -> list[int]:
    """Integer weights in tenths of a unit, divided by their gcd (so 3,1,2 stays 3,1,2)."""
    weights = [max(round(b.effective_weight * WEIGHT_SCALE), 1) for b in ready]
    divisor = reduce(math.gcd, weights)
    return [w // divisor for w in weights]


class RoundRobin:
    """Smooth weighted round-robin over the ready snapshot."""

    __slots__ = ("_cursor", "_live", "_schedule", "_version")

    def __init__(self) -> None:
        self._version = -1
        self._schedule: list[Backend] = []
        self._cursor = 0
        # Only when the cycle is too long to precompute: nginx's sequence step by step.
        self._live: SmoothWeighted | None = None

    def _rebuild(self, ready: Sequence[Backend], version: int) -> None:
        self._version = version
        self._live = None
        if not ready:
            self._schedule = []
            return
        weights = scaled_weights(ready)
        cycle = sum(weights)
        if cycle == len(weights):                       # equal weights: plain rotation
            self._schedule = list(ready)
        elif cycle <= MAX_SCHEDULE:
            self._schedule = [ready[i] for i in smooth_weighted_order(weights, cycle)]
        else:
            self._schedule = []
            self._live = SmoothWeighted(weights)
        # Keep the cursor where it was (modulo the new length) so a snapshot change does not
        # send the next request back to the first backend every time.
        self._cursor %= max(len(self._schedule), 1)

    def _next(self, ready: Sequence[Backend]) -> Backend:
        schedule = self._schedule
        if schedule:
            cursor = self._cursor
            self._cursor = (cursor + 1) % len(schedule)
            return schedule[cursor]
        assert self._live is not None
        return ready[self._live.next()]

    def pick(self, ready: Sequence[Backend], version: int,
             exclude: Collection[Backend] = ()) -> Backend | None:
        if not ready:
            return None
        if version != self._version:
            self._rebuild(ready, version)
        if not exclude:
            return self._next(ready)
        # Bounded: one cycle visits every backend.
        steps = self._live.cycle if self._live is not None else len(self._schedule)
        for _ in range(steps):
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
    "hash": ConsistentHash,        # picks by key (balancer.lb.hashing); without one it spreads
}


def make_selector(balance: str) -> Selector:
    return SELECTORS[balance]()
