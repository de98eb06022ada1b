"""Consistent hashing (``balance: hash``): the same key goes to the same backend while it is ready.

Theory of operation
-------------------
Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI
2016). A lookup table of a prime size ``M`` (65537 by default) maps ``hash_key(key) % M`` to a backend.
Each backend has its own permutation of the slots, ``(offset + j * skip) % M``, with ``offset`` and
``skip`` from two independent hashes of its id (``skip`` in ``1..M-1``: ``M`` prime makes every
permutation visit every slot). Backends take turns claiming the next free slot of their permutation
until the table is full; a backend of weight ``w`` takes a turn in ``w / max_weight`` of the rounds,
so its share of the slots, and of the keys, is ``w / sum(w)`` to within one slot.

* Balance: every backend owns ``M / n`` slots to within one (scaled by weight), so keys spread as
  evenly as the keys' hashes do; ``M >= 100 n`` keeps the table's share exact to 1 %.
* Disruption: a backend leaving frees its slots, which the others claim; because each keeps walking
  its own permutation, only a few of the others' slots change hands too (a removal out of ten moves
  its 10 % of the keys plus well under 1 % more at ``M`` = 65537).
* Stability: the table is a function of the ready backends' ids and weights only (sorted by id, so the
  snapshot's order does not matter) and of stable hashes, never Python's salted ``hash()``: every proxy
  process, and the same process after a backend comes back, computes the same table.

A pick is O(1): one CRC-32 of the key and one table index. The table is rebuilt only when the
snapshot's ``version`` changes, which costs O(M log M) in pure Python (tens of ms at 65537 slots), so
the last few tables are kept by (id, weight) signature: a backend that flaps, or a proxy that sees the
same membership again, reuses its table instead of rebuilding.

Bounded load (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018): a key's
first choice is taken only while ``load + 1 <= ceil(bound * (total + 1) * w / W)``, where ``load`` is the
backend's requests in flight here and in the other proxy processes, ``total`` the same summed over the
ready snapshot (``+ 1``: the request being placed) and ``w / W`` its share of the weight. Otherwise the
pick walks the key's *preference order*: the distinct backends met walking the table forward from the
key's slot (deterministic per key, and as spread as the table), then any not met, by rotation. A hot key
fills its first backend up to the bound, then spills to its second, and so on; with equal weights some
backend always fits (the least loaded one does). Excluded backends (those a retry already tried) are
skipped in the same walk. Checking the bound sums the in-flight counts, O(n), but only when the first
choice is busy: an idle first choice is taken at once.

Without a key the picker walks the table slot by slot: deterministic, and over ``M`` picks each backend
gets exactly its slots' share (its weight's share) of the requests.

Pure and synchronous like :mod:`.selection`: no clock, no I/O.
"""

from __future__ import annotations

import math
import zlib
from array import array
from collections.abc import Collection, Sequence
from functools import reduce
from hashlib import blake2b

from .registry import Backend

# The Maglev paper's small table size: prime, and >= 100 backends' worth of slots up to 655 backends.
TABLE_SIZE = 65537
# A backend takes its first-choice keys while its load is at most 125 % of the (weighted) mean.
LOAD_BOUND = 1.25
# Tables kept by (id, weight) signature, most recent last: flaps and repeated memberships are free.
TABLES_KEPT = 4
# Effective weights in tenths of a unit, as in selection.py: slow start ramps in steps of 10 %.
WEIGHT_SCALE = 10
# The load bound in thousandths: the cap is computed in integers, with no float rounding at the ceil.
_PER_MILLE = 1000
# How far a walk follows the table (per backend) before the unmet backends are taken by rotation.
_WALK_SLOTS_PER_BACKEND = 16


def hash_key(data: bytes) -> int:
    """A key's hash: CRC-32, an unsigned 32-bit int, the same in every process, run and platform.

    CRC-32 is what nginx's ``hash ... consistent`` uses; it is zlib's C loop (~80 ns for a short key,
    against ~500 ns for ``blake2b(digest_size=8)``, whose object and digest bytes cost more than the
    hashing). It is not keyed: anyone can craft keys that share a slot, which the load bound absorbs.
    """
    return zlib.crc32(data)


def _permutation(backend_id: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's slot permutation: two independent 64-bit halves of BLAKE2b."""
    digest = blake2b(backend_id.encode(), digest_size=16, person=b"balancer-maglev").digest()
    offset = int.from_bytes(digest[:8], "little") % size
    skip = int.from_bytes(digest[8:], "little") % (size - 1) + 1
    return offset, skip


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def maglev_table(ids: Sequence[str], weights: Sequence[int], size: int = TABLE_SIZE) -> list[int]:
    """Slot -> index into ``ids`` (Maglev's population step with weighted turns).

    ``size`` must be prime; ``weights`` are positive integers, one per id. In each round a backend
    gains its weight in credit and takes a slot per ``max(weights)`` of credit, so the heaviest takes
    one every round (Envoy's weighted Maglev does the same). A backend whose share is below one slot
    may get none. The result depends on the order of ``ids``: callers sort them.
    """
    n = len(ids)
    if n == 0:
        return []
    if not is_prime(size):
        raise ValueError(f"Maglev table size must be prime, got {size}")
    if len(weights) != n or min(weights) < 1:
        raise ValueError(f"one positive weight per backend expected, got {list(weights)}")
    positions: list[int] = []
    skips: list[int] = []
    for backend_id in ids:
        offset, skip = _permutation(backend_id, size)
        positions.append(offset)
        skips.append(skip)
    top = max(weights)
    credit = [0] * n
    table = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            gained = credit[i] + weights[i]
            if gained < top:
                credit[i] = gained
                continue
            credit[i] = gained - top
            # Walk this backend's permutation to its next free slot; it ends because the table is
            # not full and the permutation visits every slot.
            pos = positions[i]
            skip = skips[i]
            while table[pos] >= 0:
                pos += skip
                if pos >= size:
                    pos -= size
            table[pos] = i
            pos += skip
            positions[i] = pos - size if pos >= size else pos
            filled += 1
            if filled == size:
                return table


def _backend_id(backend: Backend) -> str:
    return backend.id


def _scaled_weights(members: Sequence[Backend]) -> list[int]:
    """Integer weights in tenths of a unit divided by their gcd (``selection.scaled_weights``'s rule;
    not imported, so that selection can register this picker without an import cycle)."""
    weights = [max(round(b.effective_weight * WEIGHT_SCALE), 1) for b in members]
    divisor = reduce(math.gcd, weights)
    return [w // divisor for w in weights]


class ConsistentHash:
    """Maglev consistent hashing over the ready snapshot, with a bound on each backend's live load.

    ``load_bound`` is the multiple of the weighted mean in-flight load a key's first choice may reach
    before the pick moves on (>= 1; ``None`` turns the bound off: pure affinity). ``table_size`` is the
    prime Maglev ``M``; keep it >= 100 times the pool size for an even spread.
    """

    __slots__ = ("_bound", "_cursor", "_members", "_size", "_table", "_tables", "_version",
                 "_weight_total", "_weights", "tables_built")

    def __init__(self, table_size: int = TABLE_SIZE, load_bound: float | None = LOAD_BOUND) -> None:
        if not is_prime(table_size):
            raise ValueError(f"Maglev table size must be prime, got {table_size}")
        if load_bound is not None and load_bound < 1:
            raise ValueError(f"load_bound must be >= 1 (a multiple of the mean load), got {load_bound}")
        self._size = table_size
        self._bound = 0 if load_bound is None else round(load_bound * _PER_MILLE)   # 0 = unbounded
        self._version = -1
        self._members: list[Backend] = []       # the snapshot sorted by id; the table indexes it
        self._weights: list[int] = []           # scaled weights, parallel to _members
        self._weight_total = 0
        self._table: array[int] = array("H")
        self._tables: dict[tuple[tuple[str, int], ...], array[int]] = {}
        self._cursor = 0                        # the next slot for a pick without a key
        self.tables_built = 0                   # tables computed (cache misses), for tests and stats

    def pick(self, ready: Sequence[Backend], version: int, exclude: Collection[Backend] = (),
             key: bytes | None = None) -> Backend | None:
        """The key's backend: its first choice unless excluded or over the load bound, else the next in
        the key's preference order; ``None`` when every ready backend is excluded. Without a key, the
        next slot of the table (a weighted, deterministic spread)."""
        if not ready:
            return None
        if version != self._version:
            self._rebuild(ready, version)
        size = self._size
        if key is None:
            slot = self._cursor
            self._cursor = slot + 1 if slot + 1 < size else 0
        else:
            slot = hash_key(key) % size
        index = self._table[slot]
        backend = self._members[index]
        if backend not in exclude:
            load = backend.in_flight + backend.remote_in_flight
            if load == 0 or not self._bound or self._fits(index, load, self._total_load()):
                return backend
        return self._walk(slot, exclude)

    def _rebuild(self, ready: Sequence[Backend], version: int) -> None:
        members = sorted(ready, key=_backend_id)
        weights = _scaled_weights(members)
        signature = tuple(zip([b.id for b in members], weights, strict=True))
        table = self._tables.pop(signature, None)
        if table is None:
            slots = maglev_table([b.id for b in members], weights, self._size)
            table = array("H" if len(members) <= 0xFFFF else "I", slots)
            self.tables_built += 1
        self._tables[signature] = table                  # most recently used last
        while len(self._tables) > TABLES_KEPT:
            del self._tables[next(iter(self._tables))]
        self._members, self._weights, self._weight_total = members, weights, sum(weights)
        self._table = table
        self._version = version

    def _total_load(self) -> int:
        total = 0
        for backend in self._members:
            total += backend.in_flight + backend.remote_in_flight
        return total

    def _fits(self, index: int, load: int, total: int) -> bool:
        """``load + 1 <= ceil(bound * (total + 1) * w / W)``, in integers (``L <= ceil(x)`` is
        ``L - 1 < x``)."""
        return load * _PER_MILLE * self._weight_total < self._bound * (total + 1) * self._weights[index]

    def _walk(self, slot: int, exclude: Collection[Backend]) -> Backend | None:
        """The first backend in the key's preference order that is not excluded and fits the bound;
        if none fits, the least loaded (per weight) that is not excluded."""
        members, table, size = self._members, self._table, self._size
        n = len(members)
        total = self._total_load() if self._bound else 0
        seen = bytearray(n)
        met = 0
        fallback = -1
        # The table walk first (the key's own order), then, for backends it did not meet, a rotation
        # from the key's first choice: every ready backend is considered once.
        walk = min(size, _WALK_SLOTS_PER_BACKEND * n)
        first = table[slot]
        pos = slot
        for step in range(walk + n):
            if step < walk:
                index = table[pos]
                pos = pos + 1 if pos + 1 < size else 0
            else:
                index = (first + step - walk) % n
            if seen[index]:
                continue
            seen[index] = 1
            backend = members[index]
            if backend not in exclude:
                load = backend.in_flight + backend.remote_in_flight
                if not self._bound or self._fits(index, load, total):
                    return backend
                if fallback < 0 or self._is_lighter(index, fallback):
                    fallback = index
            met += 1
            if met == n:
                break
        return members[fallback] if fallback >= 0 else None

    def _is_lighter(self, a: int, b: int) -> bool:
        """Whether backend ``a`` has fewer requests per unit of weight than ``b``, counting the new one."""
        members, weights = self._members, self._weights
        load_a = members[a].in_flight + members[a].remote_in_flight + 1
        load_b = members[b].in_flight + members[b].remote_in_flight + 1
        return load_a * weights[b] < load_b * weights[a]

    def __repr__(self) -> str:
        bound = f"{self._bound / _PER_MILLE:g}" if self._bound else "off"
        return (f"<ConsistentHash maglev M={self._size} backends={len(self._members)} "
                f"version={self._version} bound={bound} tables_built={self.tables_built} "
                f"kept={len(self._tables)}>")
