"""``GET /metrics``: the Prometheus exposition, built by prometheus-client at scrape time.

Nothing here runs per request. The request counters and histograms are the cumulative cells that
:class:`.stats.Traffic` already keeps (updating prometheus-client's own ``Counter`` and
``Histogram`` objects as well would cost about 2 µs per request, most of a small request's budget);
gauges are read from the registry, the backend connections and the supervisor when Prometheus
scrapes.

Each :class:`~balancer.control.balancer.Balancer` has its own ``CollectorRegistry``, never the
process-wide default, so several balancers can live in one process (tests do). Label values are
configured names (pools, routes, backend ids, worker ids) and fixed vocabularies (status classes,
error kinds, connection states, close reasons), so cardinality is bounded by the configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..version import installed_version
from .stats import CODE_CLASSES, CONNECT_BUCKETS, DURATION_BUCKETS, Cell, Traffic

if TYPE_CHECKING:
    from ..dataplane.connections import ConnectionTable
    from ..lb.registry import Backend, Registry
    from ..lb.supervisor import Supervisor

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BACKEND_STATES = ("up", "down", "ejected", "draining", "disabled", "quarantined")
CONNECTION_STATES = ("in_use", "idle", "opening")


VERSION = installed_version()


class BalancerCollector(Collector):
    """Reads everything at ``collect()`` time; holds no metric state of its own."""

    def __init__(self, traffic: Traffic, registry: Registry, connections: ConnectionTable,
                 supervisor: Supervisor, state_of: Callable[[Backend], str], started_at: float,
                 config_sha256: str, extra: Callable[[], Iterator[Metric]] | None = None) -> None:
        self.traffic = traffic
        self.registry = registry
        self.connections = connections
        self.supervisor = supervisor
        self.state_of = state_of            # backend -> one of BACKEND_STATES
        self.started_at = started_at
        self.config_sha256 = config_sha256
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._backends()
        yield from self._connections()
        yield from self._workers()
        info = GaugeMetricFamily("balancer_info", "Version and configuration in use (value is always 1)",
                                 labels=["version", "config_sha256"])
        info.add_metric([VERSION, self.config_sha256], 1)
        yield info
        yield GaugeMetricFamily("balancer_start_time_seconds", "Unix time balancer started",
                                value=self.started_at)
        if self.extra is not None:
            yield from self.extra()

    def _requests(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("balancer_requests", "Requests answered, by status class",
                                       labels=["pool", "backend", "route", "code_class"])
        errors = CounterMetricFamily("balancer_request_errors", "Requests that ended in an error, by kind",
                                     labels=["pool", "backend", "kind"])
        route_errors = CounterMetricFamily("balancer_route_errors", "Requests that ended in an error",
                                           labels=["route", "kind"])
        faults = CounterMetricFamily("balancer_injected_faults", "Faults a route's `fault` injected",
                                     labels=["route", "kind"])
        retries = CounterMetricFamily("balancer_retries", "Attempts beyond the first (retries and replays)",
                                      labels=["pool", "backend"])
        received = CounterMetricFamily("balancer_received_bytes", "Request body bytes from clients",
                                       labels=["pool", "backend"])
        sent = CounterMetricFamily("balancer_sent_bytes", "Response body bytes to clients",
                                   labels=["pool", "backend"])
        duration = HistogramMetricFamily(
            "balancer_request_duration_seconds", "From request start to the last response byte",
            labels=["pool", "route"])
        connect = HistogramMetricFamily(
            "balancer_upstream_connect_duration_seconds", "Opening a new upstream connection",
            labels=["pool", "backend"])
        by_backend: dict[tuple[str, str], list[Cell]] = {}
        by_route: dict[tuple[str, str], list[Cell]] = {}
        for (pool, backend, route), cell in list(self.traffic.cells.items()):
            by_backend.setdefault((pool, backend), []).append(cell)
            by_route.setdefault((pool, route), []).append(cell)
            for name, n in zip(CODE_CLASSES, cell.classes, strict=True):
                if n:
                    requests.add_metric([pool, backend, route, name], n)
        for (pool, backend), cells in by_backend.items():
            kinds: dict[str, int] = {}
            for cell in cells:
                for kind, n in cell.errors.items():
                    kinds[kind] = kinds.get(kind, 0) + n
            for kind, n in kinds.items():
                errors.add_metric([pool, backend, kind], n)
            retries.add_metric([pool, backend], sum(c.retries for c in cells))
            received.add_metric([pool, backend], sum(c.bytes_in for c in cells))
            sent.add_metric([pool, backend], sum(c.bytes_out for c in cells))
            if backend:
                counts, total = _merge(cells, "connect")
                connect.add_metric([pool, backend], _buckets(CONNECT_BUCKETS, counts), total)
        route_kinds: dict[tuple[str, str], int] = {}
        injected: dict[tuple[str, str], int] = {}
        for (pool, route), cells in by_route.items():
            counts, total = _merge(cells, "duration")
            duration.add_metric([pool, route], _buckets(DURATION_BUCKETS, counts), total)
            for cell in cells:
                for kind, n in cell.errors.items():
                    route_kinds[route, kind] = route_kinds.get((route, kind), 0) + n
                for kind, n in cell.faults.items():
                    injected[route, kind] = injected.get((route, kind), 0) + n
        for (route, kind), n in route_kinds.items():
            route_errors.add_metric([route, kind], n)
        for (route, kind), n in injected.items():
            faults.add_metric([route, kind], n)
        yield from (requests, errors, route_errors, faults, retries, received, sent, duration, connect)

    def _backends(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("balancer_backend_up", "1 if the backend may take new requests",
                               labels=["pool", "backend"])
        state = GaugeMetricFamily("balancer_backend_state", "1 for the backend's current state",
                                  labels=["pool", "backend", "state"])
        in_flight = GaugeMetricFamily("balancer_backend_in_flight", "Requests in progress on the backend",
                                      labels=["pool", "backend"])
        weight = GaugeMetricFamily("balancer_backend_weight", "Configured weight",
                                   labels=["pool", "backend"])
        effective = GaugeMetricFamily("balancer_backend_effective_weight",
                                      "Weight the pickers use (below the configured one during slow start)",
                                      labels=["pool", "backend"])
        ejections = CounterMetricFamily("balancer_backend_ejections",
                                        "Times the backend left rotation without an operator asking",
                                        labels=["pool", "backend"])
        failed = CounterMetricFamily("balancer_backend_failed_attempts",
                                     "Attempts that failed on the backend, retried elsewhere or not",
                                     labels=["pool", "backend"])
        for backend in self.registry.backends():
            labels = [backend.pool, backend.id]
            up.add_metric(labels, 1 if backend.is_ready else 0)
            current = self.state_of(backend)
            for name in BACKEND_STATES:
                state.add_metric([*labels, name], 1 if name == current else 0)
            in_flight.add_metric(labels, backend.in_flight)
            weight.add_metric(labels, backend.weight)
            effective.add_metric(labels, backend.effective_weight)
            ejections.add_metric(labels, self.traffic.states.ejections.get(backend.id, 0))
            failed.add_metric(labels, self.traffic.failed_attempts.get(backend.id, 0))
        yield from (up, state, in_flight, weight, effective, ejections, failed)

    def _connections(self) -> Iterator[Metric]:
        conns = GaugeMetricFamily("balancer_backend_connections", "Upstream connections by state",
                                  labels=["pool", "backend", "state"])
        waiting = GaugeMetricFamily("balancer_backend_connection_waiters",
                                    "Requests waiting for a connection slot", labels=["pool", "backend"])
        created = CounterMetricFamily("balancer_backend_connections_created", "Upstream connections opened",
                                      labels=["pool", "backend"])
        reused = CounterMetricFamily("balancer_backend_connections_reused",
                                     "Requests sent on a kept-alive connection", labels=["pool", "backend"])
        closed = CounterMetricFamily("balancer_backend_connections_closed", "Upstream connections closed",
                                     labels=["pool", "backend", "reason"])
        pools = {b.id: b.pool for b in self.registry.backends()}
        for backend_id, backend_conns in self.connections.items():
            name = pools.get(backend_id, backend_id.partition("/")[0])
            labels = [name, backend_id]
            snap = backend_conns.snapshot()
            for s in CONNECTION_STATES:
                conns.add_metric([*labels, s], snap[s])
            waiting.add_metric(labels, snap["waiting"])
            created.add_metric(labels, snap["created"])
            reused.add_metric(labels, snap["reused"])
            for reason, n in snap["closed"].items():
                closed.add_metric([*labels, reason], n)
        yield from (conns, waiting, created, reused, closed)

    def _workers(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily("balancer_worker_restarts", "Worker process restarts",
                                       labels=["pool", "worker"])
        running = GaugeMetricFamily("balancer_worker_running", "1 if the worker process is running",
                                    labels=["pool", "worker"])
        quarantined = GaugeMetricFamily("balancer_worker_quarantined",
                                        "1 if the worker crashed too often and is not restarted",
                                        labels=["pool", "worker"])
        for worker in self.supervisor.workers:
            labels = [worker.spec.pool, worker.id]
            restarts.add_metric(labels, worker.restarts)
            running.add_metric(labels, 1 if worker.pid is not None else 0)
            quarantined.add_metric(labels, 1 if worker.state.value == "quarantined" else 0)
        yield from (restarts, running, quarantined)


def _merge(cells: Sequence[Cell], which: str) -> tuple[list[int], float]:
    counts: list[int] | None = None
    total = 0.0
    for cell in cells:
        own = cell.duration if which == "duration" else cell.connect
        total += cell.duration_sum if which == "duration" else cell.connect_sum
        counts = own[:] if counts is None else [a + b for a, b in zip(counts, own, strict=True)]
    assert counts is not None
    return counts, total


def _buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts -> Prometheus's cumulative ``le`` buckets, ending with +Inf."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        running += n
        out.append((_go_float(bound), running))
    return out


def _go_float(bound: float) -> str:
    """The ``le`` label as Prometheus writes it (``+Inf``, ``0.005``, ``1.0``)."""
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


def new_registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own with ``collector`` and the process's own metrics (``process_*``: CPU,
    memory, open files, start time; prometheus-client's collector)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
