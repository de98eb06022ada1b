"""Pickers over a ready snapshot: smooth weighted round-robin, least-loaded, power of two choices."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from balancer.lb.registry import AdminState, Backend, BackendSet, Registry
from balancer.lb.selection import LeastLoaded, PowerOfTwoChoices, RoundRobin, smooth_weighted_order


def backends(*weights: int) -> list[Backend]:
    return [Backend(id=f"p/{i}", pool="p", host="127.0.0.1", port=9000 + i, weight=w)
            for i, w in enumerate(weights)]


def test_smooth_weighted_round_robin_interleaves_like_nginx() -> None:
    """Weights 5,1,1 give nginx's sequence a a b a c a a, never a burst of five."""
    assert smooth_weighted_order([5, 1, 1], 7) == [0, 0, 1, 0, 2, 0, 0]


def test_round_robin_equal_weights_rotates() -> None:
    """Equal weights: plain rotation."""
    pool = backends(1, 1, 1)
    rr = RoundRobin()
    assert [rr.pick(pool, 1).id for _ in range(6)] == ["p/0", "p/1", "p/2"] * 2  # type: ignore[union-attr]


def test_round_robin_honours_weights_over_a_cycle() -> None:
    """Over many picks each backend's share equals its weight's share."""
    pool = backends(3, 1, 2)
    rr = RoundRobin()
    counts = Counter(rr.pick(pool, 1).id for _ in range(600))  # type: ignore[union-attr]
    assert counts == {"p/0": 300, "p/1": 100, "p/2": 200}


def test_round_robin_skips_excluded_backends() -> None:
    """A retry never lands on a backend already tried."""
    pool = backends(1, 1, 1)
    rr = RoundRobin()
    picks = [rr.pick(pool, 1, exclude=[pool[1]]) for _ in range(10)]
    assert pool[1] not in picks and None not in picks
    assert rr.pick(pool, 1, exclude=pool) is None
    assert rr.pick([], 2) is None


def test_least_loaded_prefers_fewest_in_flight_per_weight() -> None:
    """The backend with the lowest in-flight/weight wins."""
    pool = backends(1, 1, 4)
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 2, 1, 3
    assert LeastLoaded().pick(pool, 1) is pool[2]        # 3/4 < 1/1


def test_least_loaded_breaks_ties_by_rotation() -> None:
    """An idle pool does not pile every request onto its first backend."""
    pool = backends(1, 1, 1, 1)
    ll = LeastLoaded()
    assert len({ll.pick(pool, 1).id for _ in range(4)}) == 4  # type: ignore[union-attr]


def test_p2c_picks_the_less_loaded_of_two() -> None:
    """With two candidates, the one with fewer requests in flight is chosen."""
    pool = backends(1, 1)
    pool[0].in_flight = 10
    values = iter([0.1, 0.9] * 10)
    p2c = PowerOfTwoChoices(rng=lambda: next(values))
    assert p2c.pick(pool, 1) is pool[1]
    assert PowerOfTwoChoices().pick(pool, 1, exclude=[pool[1]]) is pool[0]


def test_registry_snapshot_excludes_unready_and_notifies_flips() -> None:
    """Dead, unhealthy, draining, disabled or zero-weight backends leave the ready snapshot."""
    registry = Registry()
    pool: BackendSet = registry.pool("p")
    flips: list[tuple[str, bool]] = []
    pool.subscribe(lambda b, ready: flips.append((b.id, ready)))
    a, b, c = backends(1, 1, 0)
    for x in (a, b, c):
        pool.add(x)
    assert pool.ready == (a, b)
    snapshot = pool.ready
    registry.set_alive(a, False, "killed by SIGKILL")
    assert list(pool.ready) == [b] and snapshot == (a, b)     # the old snapshot is untouched
    registry.set_admin(b, AdminState.DRAINING)
    assert list(pool.ready) == [] and b.state == "draining"
    registry.set_admin(b, AdminState.ENABLED)
    registry.set_healthy(b, False, "health: status 503")
    assert a.state == "down" and "SIGKILL" in a.reason
    assert flips == [("p/0", True), ("p/1", True), ("p/0", False), ("p/1", False), ("p/1", True),
                     ("p/1", False)]


def test_states_cover_ejected_and_admin_wins() -> None:
    """state is up, down, ejected, draining or disabled; admin states win over health."""
    registry = Registry()
    pool = registry.pool("p")
    a, b = backends(1, 1)
    pool.add(a)
    pool.add(b)
    registry.set_ejected(a, True, "passive: 5 consecutive failures")
    assert a.state == "ejected" and not a.is_ready and pool.ready == (b,)
    assert "passive" in a.reason and "ejected" in repr(a)
    registry.set_healthy(a, True)               # passing probes do not hide the ejection
    assert a.reason == "passive: 5 consecutive failures"
    registry.set_healthy(a, False, "health: status 503")
    assert a.state == "down"
    registry.disable(a)
    assert a.state == "disabled"
    registry.set_healthy(a, True)
    registry.set_ejected(a, False)
    registry.enable(a)
    assert a.state == "up" and list(pool.ready) == [a, b]


def test_drain_disable_enable_are_registry_methods() -> None:
    """drain and disable take a backend out of the snapshot (listeners told once); enable returns it."""
    registry = Registry()
    pool = registry.pool("p")
    flips: list[tuple[str, bool]] = []
    a, b = backends(1, 1)
    pool.add(a)
    pool.add(b)
    pool.subscribe(lambda x, ready: flips.append((x.id, ready)))
    registry.drain(a)
    registry.disable(a)            # draining -> disabled: still out, no second flip
    assert a.state == "disabled" and pool.ready == (b,)
    registry.enable(a)
    assert a.admin is AdminState.ENABLED and list(pool.ready) == [a, b]
    assert flips == [("p/0", False), ("p/0", True)]


async def test_wait_drained_reports_what_is_left() -> None:
    """wait_drained returns 0 once in-flight reaches zero, else the count left at the deadline."""
    import asyncio

    from balancer.lb.registry import wait_drained
    (a,) = backends(1)
    a.in_flight = 2
    assert await wait_drained(a, 0.05, poll_s=0.01) == 2

    async def finish() -> None:
        while a.in_flight:
            await asyncio.sleep(0.01)
            a.in_flight -= 1
    task = asyncio.create_task(finish())
    assert await wait_drained(a, 5.0, poll_s=0.005) == 0
    await task
    assert await wait_drained(a, 0.0) == 0


def test_effective_weight_steers_every_picker() -> None:
    """A backend ramping at 10 % (slow start) gets a tenth of the share in every policy."""
    registry = Registry()
    pool = registry.pool("p")
    a, b = backends(1, 1)
    pool.add(a)
    pool.add(b)
    version = pool.version
    registry.reweigh(b, 0.1)
    assert pool.version == version + 1 and b.is_ready
    rr = RoundRobin()
    counts = Counter(rr.pick(pool.ready, pool.version).id for _ in range(110))  # type: ignore[union-attr]
    assert counts == {"p/0": 100, "p/1": 10}
    # Least-loaded counts the request being placed: 1/1 beats 1/0.1 even when both are idle, and
    # the ramping backend wins only when the other is ten times busier.
    ll = LeastLoaded()
    assert all(ll.pick(pool.ready, pool.version) is a for _ in range(4))
    a.in_flight = 10
    assert ll.pick(pool.ready, pool.version) is b
    values = iter([0.1, 0.9] * 10)
    assert PowerOfTwoChoices(rng=lambda: next(values)).pick(pool.ready, pool.version) is b
    a.in_flight = 0
    registry.reweigh(b, 1.0)
    assert pool.version == version + 2


def _nginx(weights: list[int], count: int) -> list[int]:
    """nginx's O(n)-a-step loop, as written in ngx_http_upstream_get_peer."""
    current = [0] * len(weights)
    order = []
    for _ in range(count):
        best = -1
        for i, w in enumerate(weights):
            current[i] += w
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= sum(weights)
        order.append(best)
    return order


def test_grouped_smooth_weighted_order_is_exactly_nginx() -> None:
    """The O(distinct weights) computation reproduces nginx's sequence, across cycles too."""
    import random
    rng = random.Random(5)
    for _ in range(200):
        weights = [rng.choice([1, 2, 3, 5, 10]) for _ in range(rng.randint(1, 12))]
        count = 2 * sum(weights) + 3
        assert smooth_weighted_order(weights, count) == _nginx(weights, count), weights


def test_round_robin_large_uneven_pool_stays_proportional_and_interleaved() -> None:
    """1000 backends, one of weight 10: exact shares, and the heavy one's picks are spread out."""
    pool = backends(*([1] * 999 + [10]))
    rr = RoundRobin()
    picks = [rr.pick(pool, 1) for _ in range(1009)]
    counts = Counter(p.id for p in picks)  # type: ignore[union-attr]
    assert counts["p/999"] == 10 and max(counts.values()) == 10 and len(counts) == 1000
    heavy = [i for i, p in enumerate(picks) if p is pool[999]]
    assert min(b - a for a, b in pairwise(heavy)) > 50


def test_round_robin_huge_cycle_is_walked_live() -> None:
    """Co-prime weights whose cycle is too long to precompute still honour the weights."""
    pool = backends(997, 991, 983, *([1] * 20000))
    rr = RoundRobin()
    counts = Counter(rr.pick(pool, 1).id for _ in range(22971))  # type: ignore[union-attr]
    assert counts["p/0"] == 997 and counts["p/1"] == 991 and counts["p/2"] == 983
    assert rr.pick(pool, 1, exclude=[pool[0]]) is not pool[0]
