"""Consistent hashing (Maglev) with bounded loads: spread, disruption, stability, exclusion, weights."""

from __future__ import annotations

import math
import zlib
from collections import Counter

import pytest

from balancer.lb.hashing import TABLE_SIZE, ConsistentHash, hash_key, maglev_table
from balancer.lb.registry import Backend, Registry

KEYS = [f"key-{i}".encode() for i in range(100_000)]


def backends(*weights: int) -> tuple[Backend, ...]:
    return tuple(Backend(id=f"p/{i}", pool="p", host="127.0.0.1", port=9000 + i, weight=w)
                 for i, w in enumerate(weights))


def assign(picker: ConsistentHash, ready: tuple[Backend, ...], version: int,
           keys: list[bytes] = KEYS) -> list[Backend]:
    picks = [picker.pick(ready, version, key=k) for k in keys]
    assert None not in picks
    return picks  # type: ignore[return-value]


@pytest.fixture(scope="module")
def ten() -> tuple[Backend, ...]:
    return backends(*[1] * 10)


@pytest.fixture(scope="module")
def before(ten: tuple[Backend, ...]) -> list[Backend]:
    """Where the 100,000 keys go with all ten backends ready."""
    return assign(ConsistentHash(), ten, 1)


def test_hash_key_is_stable_crc32_not_the_salted_hash() -> None:
    """hash_key is the same in every process and run: plain CRC-32, golden values pinned."""
    assert hash_key(b"") == 0
    assert hash_key(b"user-42") == zlib.crc32(b"user-42") == 0x7D06B873
    assert 0 <= hash_key(b"\xff" * 100) < 2**32


def test_the_table_is_pinned_so_processes_and_releases_agree() -> None:
    """The table depends only on ids, weights and size (golden slots): a change would remap every key
    across a rolling upgrade, and proxy processes must agree."""
    table = maglev_table(["a", "b", "c"], [1, 1, 1], 13)
    assert table == [1, 0, 2, 1, 1, 2, 0, 1, 0, 0, 2, 2, 0]
    assert sorted(Counter(table).values()) == [4, 4, 5]
    with pytest.raises(ValueError, match="prime"):
        maglev_table(["a"], [1], 12)
    with pytest.raises(ValueError, match="prime"):
        ConsistentHash(table_size=65536)


def test_keys_spread_evenly_over_ten_backends(ten: tuple[Backend, ...], before: list[Backend]) -> None:
    """100,000 keys over 10 equal backends: every backend within 1.25x the mean (Maglev gives ~1.02x)."""
    counts = Counter(b.id for b in before)
    assert len(counts) == 10
    assert max(counts.values()) <= 1.25 * 10_000
    assert max(counts.values()) <= 1.05 * 10_000 and min(counts.values()) >= 0.95 * 10_000


def test_removing_one_of_ten_moves_its_keys_and_few_others(ten: tuple[Backend, ...],
                                                            before: list[Backend]) -> None:
    """Removing a backend moves every key it had, and at most 1/10 + 2 % of all keys in total."""
    gone = ten[3]
    nine = ten[:3] + ten[4:]
    after = assign(ConsistentHash(), nine, 2)
    moved = sum(a is not b for a, b in zip(before, after, strict=True))
    assert gone not in after
    assert moved <= len(KEYS) * (1 / 10 + 0.02)
    stayed = sum(a is b for a, b in zip(before, after, strict=True) if a is not gone)
    assert stayed >= 0.98 * sum(a is not gone for a in before)


def test_unhealthy_backend_moves_only_its_keys_and_gets_them_back(ten: tuple[Backend, ...],
                                                                  before: list[Backend]) -> None:
    """A backend leaving the ready snapshot (unhealthy) moves only its own keys beyond a sliver; when it
    returns, every key maps exactly as before, from the kept table (no rebuild)."""
    registry = Registry()
    pool = registry.pool("p")
    for b in ten:
        pool.add(b)
    picker = ConsistentHash()
    assert assign(picker, pool.ready, pool.version) == before
    sick = ten[7]
    registry.set_healthy(sick, False, "health: status 503")
    during = assign(picker, pool.ready, pool.version)
    assert sick not in during
    others_moved = sum(a is not b for a, b in zip(before, during, strict=True) if a is not sick)
    assert others_moved <= 0.02 * len(KEYS)
    registry.set_healthy(sick, True)
    assert assign(picker, pool.ready, pool.version) == before
    assert picker.tables_built == 2


def test_table_is_built_once_per_version() -> None:
    """Picks at one version reuse the table; a new version with the same membership reuses the kept
    one; a stale version's snapshot is not even looked at (the version is the contract)."""
    pool = backends(1, 1, 1, 1)
    picker = ConsistentHash(table_size=1009)
    first = [picker.pick(pool, 1, key=k) for k in KEYS[:500]]
    assert picker.tables_built == 1
    assert [picker.pick(pool, 2, key=k) for k in KEYS[:500]] == first
    assert picker.tables_built == 1
    assert picker.pick(pool[:1], 2, key=b"x") in pool        # same version: the cached table answers
    assert picker.pick(pool[:1], 3, key=b"x") is pool[0]
    assert picker.tables_built == 2
    assert "tables_built=2" in repr(picker) and "M=1009" in repr(picker)


def test_exclude_takes_the_keys_next_preference() -> None:
    """A retry skips the backends already tried, taking the key's next choice, deterministically."""
    pool = backends(1, 1, 1, 1, 1)
    picker = ConsistentHash(table_size=1009)
    for key in KEYS[:200]:
        first = picker.pick(pool, 1, key=key)
        assert first is not None
        second = picker.pick(pool, 1, exclude=[first], key=key)
        assert second is not None and second is not first
        assert picker.pick(pool, 1, exclude=[first], key=key) is second
        third = picker.pick(pool, 1, exclude={first, second}, key=key)
        assert third not in (first, second, None)
    assert picker.pick(pool, 1, exclude=pool, key=b"k") is None
    assert picker.pick((), 2, key=b"k") is None


def test_second_choices_spread_over_the_others() -> None:
    """When a backend is excluded its keys' next choices spread over all the others, not one."""
    pool = backends(*[1] * 10)
    picker = ConsistentHash()
    seconds = Counter(picker.pick(pool, 1, exclude=[pool[0]], key=k).id  # type: ignore[union-attr]
                      for k in KEYS[:20_000] if picker.pick(pool, 1, key=k) is pool[0])
    assert len(seconds) == 9 and max(seconds.values()) <= 1.5 * sum(seconds.values()) / 9


def cap(total: int, n: int, bound: float = 1.25) -> int:
    """The bound on one of ``n`` equal backends' load, counting the request being placed."""
    return math.ceil(bound * (total + 1) / n)


def test_hot_key_is_bounded_to_its_share_of_live_load() -> None:
    """One key sending 1,000 concurrent requests fills its backend to 1.25x the mean, then the next in
    its preference order: no backend ever exceeds the bound at placement."""
    pool = backends(*[1] * 10)
    picker = ConsistentHash()
    home = picker.pick(pool, 1, key=b"hot")
    total = 0
    for _ in range(1000):
        chosen = picker.pick(pool, 1, key=b"hot")
        assert chosen is not None
        assert chosen.in_flight + 1 <= cap(total, 10)
        chosen.in_flight += 1
        total += 1
    loads = [b.in_flight for b in pool]
    assert max(loads) <= 125 and home is not None and home.in_flight >= 100
    # Filled to the bound one after another: 1000 / 125 = 8 backends at least take a share.
    assert sum(loads) == 1000 and sum(1 for load in loads if load) >= 8


def test_live_load_bound_counts_other_processes_and_walks_deterministically() -> None:
    """remote_in_flight counts toward the bound; the spill-over target is the same for two pickers."""
    pool = backends(*[1] * 4)
    a, b = ConsistentHash(table_size=1009), ConsistentHash(table_size=1009)
    home = a.pick(pool, 1, key=b"k")
    assert home is not None
    for other in pool:
        other.in_flight = 2
    home.remote_in_flight = 1               # total 9: cap ceil(1.25 * 10 / 4) = 4; home would be 4
    assert a.pick(pool, 1, key=b"k") is home
    home.remote_in_flight = 2               # total 10: cap ceil(1.25 * 11 / 4) = 4; home would be 5
    spill = a.pick(pool, 1, key=b"k")
    assert spill is not home and spill is b.pick(pool, 1, key=b"k")
    assert ConsistentHash(table_size=1009, load_bound=None).pick(pool, 1, key=b"k") is home


def test_mixed_keys_keep_live_load_within_bound() -> None:
    """Skewed traffic (half of it one key) over 10 backends stays within 1.25x the mean in flight."""
    pool = backends(*[1] * 10)
    picker = ConsistentHash()
    total = 0
    for i in range(2000):
        key = b"hot" if i % 2 else KEYS[i]
        chosen = picker.pick(pool, 1, key=key)
        assert chosen is not None and chosen.in_flight + 1 <= cap(total, 10)
        chosen.in_flight += 1
        total += 1
    assert max(b.in_flight for b in pool) <= 1.25 * 200


def test_weight_two_gets_twice_the_keys() -> None:
    """A backend of weight 2 gets about twice the keys of a weight-1 backend (within 10 %)."""
    pool = backends(2, 1, 1, 1, 1)
    counts = Counter(b.id for b in assign(ConsistentHash(), pool, 1, KEYS[:60_000]))
    light = sum(counts[f"p/{i}"] for i in range(1, 5)) / 4
    assert 1.8 <= counts["p/0"] / light <= 2.2
    assert sorted(Counter(maglev_table(["a", "b"], [2, 1], 1009)).values()) == [336, 673]


def test_slow_start_weight_changes_the_share() -> None:
    """effective_weight (slow start) steers the table like the other pickers: 10 % gets ~1/11."""
    pool = backends(1, 1)
    pool[1].effective_weight = 0.1
    counts = Counter(b.id for b in assign(ConsistentHash(), pool, 1, KEYS[:22_000]))
    assert 1_700 <= counts["p/1"] <= 2_300


def test_two_pickers_and_snapshot_order_agree() -> None:
    """Two instances (as in two proxy processes) map every key alike, whatever the snapshot order."""
    pool = backends(1, 3, 1, 2, 1, 1)
    shuffled = pool[3:] + pool[:3]
    ours = assign(ConsistentHash(), pool, 1, KEYS[:5_000])
    theirs = assign(ConsistentHash(), shuffled, 7, KEYS[:5_000])
    assert ours == theirs


def test_without_a_key_picks_spread_by_weight() -> None:
    """No key: a deterministic walk of the table; short runs spread, a full table is exact by weight."""
    pool = backends(*[1] * 10)
    picker = ConsistentHash()
    short = Counter(picker.pick(pool, 1).id for _ in range(1000))  # type: ignore[union-attr]
    assert len(short) == 10 and max(short.values()) <= 140 and min(short.values()) >= 60
    fresh, other = ConsistentHash(), ConsistentHash()
    assert [fresh.pick(pool, 1) for _ in range(100)] == [other.pick(pool, 5) for _ in range(100)]
    weighted = backends(2, 1, 1)
    small = ConsistentHash(table_size=1009)
    full = Counter(small.pick(weighted, 1).id for _ in range(1009))  # type: ignore[union-attr]
    assert full == Counter(f"p/{i}" for i in maglev_table(["p/0", "p/1", "p/2"], [2, 1, 1], 1009))
    assert abs(full["p/0"] - 1009 / 2) <= 1
    assert small.pick(weighted, 1, exclude=[weighted[0], weighted[1]]) is weighted[2]


def test_defaults() -> None:
    """The default table is Maglev's 65537 slots; load_bound below 1 is refused."""
    assert TABLE_SIZE == 65537
    assert "M=65537" in repr(ConsistentHash()) and "bound=1.25" in repr(ConsistentHash())
    with pytest.raises(ValueError, match="load_bound"):
        ConsistentHash(load_bound=0.9)
