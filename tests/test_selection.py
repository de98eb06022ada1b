"""Pickers over a ready snapshot: smooth weighted round-robin, least-loaded, power of two choices."""

from __future__ import annotations

from collections import Counter

from balancer.registry import AdminState, Backend, BackendSet, Registry
from balancer.selection import LeastLoaded, PowerOfTwoChoices, RoundRobin, smooth_weighted_order


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
    for _ in range(10):
        assert rr.pick(pool, 1, exclude=[pool[1]]) is not pool[1]
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
    assert pool.ready == (b,) and snapshot == (a, b)     # the old snapshot is untouched
    registry.set_admin(b, AdminState.DRAINING)
    assert pool.ready == () and b.state == "draining"
    registry.set_admin(b, AdminState.ENABLED)
    registry.set_healthy(b, False, "health: status 503")
    assert a.state == "down" and "SIGKILL" in a.reason
    assert flips == [("p/0", True), ("p/1", True), ("p/0", False), ("p/1", False), ("p/1", True),
                     ("p/1", False)]
