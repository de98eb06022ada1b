"""/metrics through prometheus-client's own parser, and the statistics behind it (stats.Traffic)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from balancer.dataplane.record import RequestRecord
from balancer.observe.stats import DURATION_BUCKETS, Traffic, bucket_upper_s, latency_bucket, percentile
from tests.observe_helpers import AdminClient, config, get


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric samples by sample name (``x_total``, ``y_bucket`` ...) as (labels, value)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in found[name] if all(lab.get(k) == x for k, x in labels.items()))


async def test_metrics_match_the_traffic_sent(backend_ports: Any, balancer_factory: Any) -> None:
    """Counters and histograms parse with prometheus-client and agree with the requests sent."""
    ports = await backend_ports(2)
    extra = """
routes:
  - {path_prefix: /slow, pool: web, name: slow}
  - {path_prefix: /, pool: web, name: main}
"""
    balancer = await balancer_factory(config(ports, extra=extra))
    url = f"http://127.0.0.1:{balancer.port}"
    async with aiohttp.ClientSession() as session:
        await get(session, url + "/bytes/10", 30)
        await get(session, url + "/status/500", 3)
        await get(session, url + "/slow?ms=30", 4)
        response = await session.get(f"http://127.0.0.1:{balancer.admin.bound_port}/metrics")
        async with response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            found = samples(await response.text())
    assert total(found, "balancer_requests_total") == 37
    assert total(found, "balancer_requests_total", code_class="2xx") == 34
    assert total(found, "balancer_requests_total", code_class="5xx") == 3
    assert total(found, "balancer_requests_total", route="slow") == 4
    for port in ports:      # round robin: 18 or 19 each
        assert total(found, "balancer_requests_total", backend=f"web/127.0.0.1:{port}") in (18, 19)
    # Histograms: cumulative buckets, +Inf == _count == requests of the route, sum plausible.
    for route, n in (("main", 33), ("slow", 4)):
        buckets = [(lab["le"], v) for lab, v in found["balancer_request_duration_seconds_bucket"]
                   if lab["route"] == route]
        assert [le for le, _ in buckets] == [*(repr(b) for b in DURATION_BUCKETS), "+Inf"]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == n
        assert total(found, "balancer_request_duration_seconds_count", route=route) == n
    slow_sum = total(found, "balancer_request_duration_seconds_sum", route="slow")
    assert 0.12 <= slow_sum < 2.0
    slow_buckets = dict((lab["le"], v) for lab, v in found["balancer_request_duration_seconds_bucket"]
                        if lab["route"] == "slow")
    assert slow_buckets["0.025"] == 0 and slow_buckets["0.1"] == 4
    # One new connection per backend, each timed once.
    assert total(found, "balancer_upstream_connect_duration_seconds_count") == 2
    assert total(found, "balancer_backend_connections_created_total") == 2
    assert total(found, "balancer_backend_connections_reused_total") == 35
    # Gauges read at scrape time.
    assert total(found, "balancer_backend_up") == 2
    assert total(found, "balancer_backend_in_flight") == 0
    assert total(found, "balancer_backend_connections", state="idle") == 2
    assert total(found, "balancer_backend_state", state="up") == 2
    assert total(found, "balancer_retries_total") == 0
    assert total(found, "balancer_sent_bytes_total") >= 300
    assert found["balancer_info"][0][0]["config_sha256"] == balancer.config.text_hash


async def test_each_balancer_has_its_own_registry(backend_ports: Any, balancer_factory: Any) -> None:
    """Two balancers in one process export their own counts, and nothing lands in the global registry."""
    ports = await backend_ports(2)
    one = await balancer_factory(config(ports[:1]))
    two = await balancer_factory(config(ports[1:]))
    async with aiohttp.ClientSession() as session:
        await get(session, f"http://127.0.0.1:{one.port}/", 5)
        await get(session, f"http://127.0.0.1:{two.port}/", 2)
        found_one = samples(await AdminClient(session, one).text("/metrics"))
        found_two = samples(await AdminClient(session, two).text("/metrics"))
    assert total(found_one, "balancer_requests_total") == 5
    assert total(found_two, "balancer_requests_total") == 2
    assert REGISTRY.get_sample_value("balancer_requests_total") is None


async def test_retries_and_errors_exported(backend_ports: Any, balancer_factory: Any) -> None:
    """A refused backend's failed attempts and the resulting retries show in /metrics."""
    from tests.conftest import free_port
    ports = await backend_ports(1)
    dead = free_port()
    balancer = await balancer_factory(config([dead, ports[0]]))
    async with aiohttp.ClientSession() as session:
        assert await get(session, f"http://127.0.0.1:{balancer.port}/", 4) == [200] * 4
        found = samples(await AdminClient(session, balancer).text("/metrics"))
    retries = total(found, "balancer_retries_total")
    assert retries >= 1
    assert total(found, "balancer_backend_failed_attempts_total", backend=f"web/127.0.0.1:{dead}") == retries
    assert total(found, "balancer_request_errors_total") == 0     # every request was answered


# --- the statistics themselves, on a fake clock --------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(start: float, total_s: float, status: int = 200, backend: str = "web/1", error: str = "",
           attempts: int = 1, connect_s: float = 0.0) -> RequestRecord:
    r = RequestRecord(start, 0.0, "GET", b"/", "127.0.0.1")
    r.pool, r.backend, r.route = "web", backend, "main"
    r.status, r.error, r.attempts, r.connect_s, r.total_s = status, error, attempts, connect_s, total_s
    return r


def test_latency_buckets_within_five_percent() -> None:
    """A value's bucket upper bound is never below it and at most 4.5 % above (1 µs to 1 h)."""
    for seconds in (2e-6, 3.3e-5, 0.000999, 0.001, 0.0123, 0.5, 1.0, 7.77, 3599.0):
        upper = bucket_upper_s(latency_bucket(seconds))
        assert seconds <= upper <= seconds * 1.045, seconds


def test_percentiles_from_a_known_distribution() -> None:
    """1..1000 ms, one request each: p50/p90/p99/p99.9/max within the bucket resolution."""
    clock = Clock()
    traffic = Traffic(clock=clock, wall=clock)
    for ms in range(1, 1001):
        traffic.observe(record(clock.now - ms / 1000, ms / 1000))
    window = traffic.windows[("web", "web/1")]
    lat = traffic.latency([window])["10s"]
    assert lat["count"] == 1000
    for key, expected in (("p50_ms", 500), ("p90_ms", 900), ("p99_ms", 990), ("p999_ms", 999)):
        assert expected <= lat[key] <= expected * 1.045, (key, lat[key])
    assert lat["max_ms"] == 1000.0
    assert lat["mean_ms"] == pytest.approx(500.5)
    assert percentile({}, 0, 0.5) == 0.0


def test_windows_age_out() -> None:
    """A request 30 s old is in the 1 min and 5 min windows but not 10 s; after 5 min it is gone."""
    clock = Clock()
    traffic = Traffic(clock=clock, wall=clock)
    traffic.observe(record(clock.now, 0.010))
    clock.now += 30
    traffic.observe(record(clock.now, 0.002, status=502))
    window = [traffic.windows[("web", "web/1")]]
    lat = traffic.latency(window)
    assert (lat["10s"]["count"], lat["1m"]["count"], lat["5m"]["count"]) == (1, 2, 2)
    assert lat["10s"]["max_ms"] == 2.0 and lat["1m"]["max_ms"] == 10.0
    assert lat["10s"]["error_rate"] == 1.0 and lat["1m"]["error_rate"] == 0.5
    clock.now += 301
    assert traffic.latency(window)["5m"]["count"] == 0


def test_reset_keeps_cumulative_cells() -> None:
    """reset() zeroes the /stats view but not the cells that back Prometheus counters."""
    clock = Clock()
    traffic = Traffic(clock=clock, wall=clock)
    for _ in range(3):
        traffic.observe(record(clock.now, 0.001, attempts=2, connect_s=0.0004))
    traffic.observe(record(clock.now, 0.001, status=504, error="response_timeout"))
    everything = traffic.counters(traffic.keys())
    assert everything["requests"] == 4 and everything["retries"] == 3
    assert everything["errors"] == {"response_timeout": 1}
    traffic.reset()
    after = traffic.counters(traffic.keys())
    assert (after["requests"], after["retries"], after["errors"]) == (0, 0, {})
    traffic.observe(record(clock.now, 0.001))
    assert traffic.counters(traffic.keys("web", "web/1"))["requests"] == 1
    assert traffic.counters(traffic.keys("web"))["requests"] == 1
    cell = traffic.cells[("web", "web/1", "main")]
    assert cell.requests == 5 and sum(cell.connect) == 3


def test_failures_exclude_client_errors_and_gone_clients() -> None:
    """5xx and mid-body cuts count as failures; 4xx and a client that went away do not."""
    clock = Clock()
    traffic = Traffic(clock=clock, wall=clock)
    for status, error in ((200, ""), (404, ""), (200, "client_gone"), (503, "no_backend"),
                          (200, "read_timeout")):
        traffic.observe(record(clock.now, 0.001, status=status, error=error))
    lat = traffic.latency([traffic.windows[("web", "web/1")]])["10s"]
    assert (lat["count"], lat["failed"]) == (5, 2)
