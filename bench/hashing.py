"""Consistent hashing (Maglev, balancer/lb/hashing.py): disruption, balance and the cost of a pick.

    .venv/bin/python bench/hashing.py          # 100,000 keys over 10 equal backends; costs best of 5

Keys are ``key-0`` .. ``key-99999``. "moved" compares where each key goes with all ten backends ready
and with one removed (a backend turning unhealthy); the bound is the one tests/test_hashing.py holds it
to (its own 1/10 of the keys must move, plus at most 2 % more). "moved back" is the share of the keys
that return to their first backend once it is ready again. For reference, ``hash % n`` is what naive
hashing would move. Pick costs are per call; "rebuild" is what the first pick after a snapshot change
pays when the membership was not seen recently (a kept table costs next to nothing).
"""

from __future__ import annotations

import sys
import timeit
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancer.lb.hashing import TABLE_SIZE, ConsistentHash, hash_key, maglev_table
from balancer.lb.registry import Backend

KEYS = [f"key-{i}".encode() for i in range(100_000)]
BACKENDS = 10
REMOVED = 3


def make_pool(n: int) -> tuple[Backend, ...]:
    return tuple(Backend(id=f"web/{i}", pool="web", host="127.0.0.1", port=10000 + i) for i in range(n))


def us_per_call(stmt: Callable[[], object], budget_s: float = 0.1) -> float:
    timer = timeit.Timer(stmt)
    number, _ = timer.autorange()
    number = max(int(number * budget_s / 0.2), 1)
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def rebuild_ms(n: int) -> float:
    """A table computed from scratch (best of 3): what a snapshot never seen before costs."""
    ids = [f"web/{i}" for i in range(n)]
    weights = [1] * n
    return min(timeit.repeat(lambda: maglev_table(ids, weights), repeat=3, number=1)) * 1e3


def assign(picker: ConsistentHash, ready: tuple[Backend, ...], version: int) -> list[Backend | None]:
    return [picker.pick(ready, version, key=k) for k in KEYS]


def disruption() -> None:
    pool = make_pool(BACKENDS)
    gone = pool[REMOVED]
    without = pool[:REMOVED] + pool[REMOVED + 1:]
    picker = ConsistentHash()
    before = assign(picker, pool, 1)
    during = assign(picker, without, 2)
    after = assign(picker, pool, 3)
    n = len(KEYS)
    moved = sum(a is not b for a, b in zip(before, during, strict=True))
    owned = sum(a is gone for a in before)
    bound = n * (1 / BACKENDS + 0.02)
    counts = Counter(b.id for b in before if b is not None)
    mean = n / BACKENDS
    back = sum(a is c for a, b, c in zip(before, during, after, strict=True) if a is not b)
    naive = sum(hash_key(k) % BACKENDS != hash_key(k) % (BACKENDS - 1) for k in KEYS)

    print(f"{n:,} keys over {BACKENDS} equal backends, Maglev M={TABLE_SIZE}")
    print(f"  keys per backend      max/mean {max(counts.values()) / mean:.3f}   "
          f"min/mean {min(counts.values()) / mean:.3f}   (bound 1.25)")
    print(f"  remove 1 of {BACKENDS}         moved {moved:,} = {moved / n:.2%}   "
          f"(its own {owned:,} = {owned / n:.2%}; others {moved - owned:,} = {(moved - owned) / n:.2%}; "
          f"bound {bound:,.0f} = {bound / n:.0%})")
    print(f"  it comes back         moved back {back:,} of {moved:,} = {back / max(moved, 1):.2%}; "
          f"tables built {picker.tables_built} for 3 snapshots")
    print(f"  naive hash % n        would move {naive:,} = {naive / n:.2%}")


def costs() -> None:
    pool = make_pool(BACKENDS)
    picker = ConsistentHash()
    picker.pick(pool, 1)
    key = b"user-12345-session"
    busy = make_pool(BACKENDS)
    for i, b in enumerate(busy):
        b.in_flight = 5 + i % 3
    busy_picker = ConsistentHash()
    busy_picker.pick(busy, 1)
    home = busy_picker.pick(busy, 1, key=key)
    print(f"costs per call (µs, best of 5), {BACKENDS} backends")
    print(f"  hash_key (CRC-32)                 {us_per_call(lambda: hash_key(key)):8.3f}")
    print(f"  pick, key, idle pool              {us_per_call(lambda: picker.pick(pool, 1, key=key)):8.3f}")
    print(f"  pick, no key                      {us_per_call(lambda: picker.pick(pool, 1)):8.3f}")
    print(f"  pick, key, busy pool (bound sum)  "
          f"{us_per_call(lambda: busy_picker.pick(busy, 1, key=key)):8.3f}")
    print(f"  pick, key, retry (exclude first)  "
          f"{us_per_call(lambda: busy_picker.pick(busy, 1, exclude=(home,), key=key)):8.3f}")
    for n in (10, 100, 1000):
        print(f"  rebuild, {n:>4} backends             {rebuild_ms(n):8.1f} ms")


def main() -> None:
    print(f"Python {sys.version.split()[0]}")
    disruption()
    costs()


if __name__ == "__main__":
    main()
