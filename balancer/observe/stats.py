"""Traffic statistics: what ``/stats``, ``/metrics`` and the dashboard show about finished requests.

Theory of operation
-------------------
One observer, :meth:`Traffic.observe`, runs on the hot path once per finished request and does O(1)
work on plain ints (no locks, no formatting, no allocation except a dict entry when a latency lands in
a bucket not seen yet this second). Everything else -- sums, percentiles, rates -- is computed when
someone reads, which is at most a few times a second.

Two structures are fed:

* a :class:`Cell` per ``(pool, backend, route)``: cumulative counters (status classes, errors by
  kind, retries, bytes) and fixed-bucket histograms of request and connect duration. They only ever
  grow, so ``/metrics`` exposes them as Prometheus counters and histograms. Label cardinality is
  bounded by the configuration: routes are configured names, never paths; ``backend`` is ``""`` when
  no backend was chosen (no route, no ready backend).
* a :class:`Window` per ``(pool, backend)``: a ring of per-second slots (count, failures, sum, max,
  and a sparse log-linear histogram with 16 buckets per doubling, i.e. within 4.5 % of the true
  value), from which the last 10 s / 1 min / 5 min percentiles are merged at read time.

``POST /stats/reset`` must not make Prometheus counters go backwards, so :meth:`Traffic.reset` does
not clear cells: it keeps a copy as the *baseline* that the ``/stats`` views subtract. Windows are
simply emptied.

A request counts as *failed* (error rate) when balancer or the backend answered 5xx, or when the
response was cut after its head had gone (a read timeout mid-body); a client that goes away is not a
failure of ours, and 4xx are the client's.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ..dataplane.record import RequestRecord
from ..lb.registry import Backend
from .units import ms

# Prometheus histogram bounds (seconds); the last bucket is +Inf.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Index = status // 100; 0 holds "no status" (the handler died before choosing one).
CODE_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")

# Rolling windows, as (name, seconds); the ring keeps the longest.
WINDOWS = (("10s", 10), ("1m", 60), ("5m", 300))
RING_SECONDS = 300
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))

# Log-linear latency buckets: bucket i holds [2**(i/SUB), 2**((i+1)/SUB)) microseconds.
SUB = 16
_log2 = math.log2


def latency_bucket(seconds: float) -> int:
    us = seconds * 1e6
    return int(_log2(us) * SUB) if us > 1.0 else 0


def bucket_upper_s(index: int) -> float:
    return float(2.0 ** ((index + 1) / SUB) / 1e6)


class Cell:
    """Cumulative counters of one ``(pool, backend, route)``. Never reset (they back Prometheus)."""

    __slots__ = ("bytes_in", "bytes_out", "classes", "connect", "connect_sum", "duration", "duration_sum",
                 "errors", "faults", "retries", "window")

    def __init__(self, window: Window) -> None:
        self.window = window                 # the (pool, backend) window this cell also feeds
        self.classes = [0] * len(CODE_CLASSES)
        self.errors: dict[str, int] = {}
        self.faults: dict[str, int] = {}     # injected by the route's `fault`: delay, abort
        self.retries = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.duration = [0] * (len(DURATION_BUCKETS) + 1)    # per bucket, not cumulative
        self.duration_sum = 0.0
        self.connect = [0] * (len(CONNECT_BUCKETS) + 1)
        self.connect_sum = 0.0

    @property
    def requests(self) -> int:
        return sum(self.classes)

    def absorb(self, other: Cell) -> None:
        """Add ``other``'s counts to these (a retired backend's, kept in its pool's totals)."""
        self.classes = [a + b for a, b in zip(self.classes, other.classes, strict=True)]
        for kind, n in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n
        for kind, n in other.faults.items():
            self.faults[kind] = self.faults.get(kind, 0) + n
        self.retries += other.retries
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.duration = [a + b for a, b in zip(self.duration, other.duration, strict=True)]
        self.duration_sum += other.duration_sum
        self.connect = [a + b for a, b in zip(self.connect, other.connect, strict=True)]
        self.connect_sum += other.connect_sum

    def copy(self) -> Cell:
        other = Cell(self.window)
        other.classes = self.classes[:]
        other.errors = dict(self.errors)
        other.faults = dict(self.faults)
        other.retries, other.bytes_in, other.bytes_out = self.retries, self.bytes_in, self.bytes_out
        return other


class Second:
    """One second of one window."""

    __slots__ = ("count", "failed", "hist", "max", "sec", "sum")

    def __init__(self, sec: int) -> None:
        self.sec = sec
        self.count = 0
        self.failed = 0
        self.sum = 0.0
        self.max = 0.0
        self.hist: dict[int, int] = {}


class Window:
    """The last ``RING_SECONDS`` seconds of one ``(pool, backend)``, one :class:`Second` each.

    Seconds are ``int(time.monotonic())`` at the end of a request; seconds without traffic have no slot.
    """

    __slots__ = ("_current", "slots")

    def __init__(self) -> None:
        self._current = Second(-1)
        self.slots: deque[Second] = deque(maxlen=RING_SECONDS + 1)

    def add(self, sec: int, seconds: float, failed: bool) -> None:
        slot = self._current
        if sec > slot.sec:
            slot = self._current = Second(sec)
            self.slots.append(slot)
        slot.count += 1
        slot.sum += seconds
        if seconds > slot.max:
            slot.max = seconds
        if failed:
            slot.failed += 1
        hist = slot.hist
        i = latency_bucket(seconds)
        hist[i] = hist.get(i, 0) + 1

    def clear(self) -> None:
        self._current = Second(-1)
        self.slots.clear()


class StateClock:
    """When each backend entered its current state, and how often it left rotation unplanned."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._seen: dict[str, tuple[str, float]] = {}
        self.ejections: dict[str, int] = {}
        self._ejections_base: dict[str, int] = {}

    def note(self, backend_id: str, state: str) -> float:
        """Record ``state`` as current; return the wall time it began (now, if it just changed)."""
        seen = self._seen.get(backend_id)
        if seen is None or seen[0] != state:
            seen = self._seen[backend_id] = (state, self._wall())
        return seen[1]

    def eject(self, backend_id: str) -> None:
        self.ejections[backend_id] = self.ejections.get(backend_id, 0) + 1

    def ejections_since_reset(self, backend_id: str) -> int:
        return self.ejections.get(backend_id, 0) - self._ejections_base.get(backend_id, 0)

    def reset(self) -> None:
        self._ejections_base = dict(self.ejections)

    def forget(self, backend_id: str) -> None:
        self._seen.pop(backend_id, None)
        self.ejections.pop(backend_id, None)
        self._ejections_base.pop(backend_id, None)


# The backend label under which a pool keeps the counts of its retired backends: the pool's totals
# stay monotonic while a retired backend's own series go away.
RETIRED = "(retired)"


class Traffic:
    """Per-request counters and windows; the observer and the read-side views."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self.cells: dict[tuple[str, str, str], Cell] = {}
        self.windows: dict[tuple[str, str], Window] = {}
        # (pool, backend) -> its cells' keys, so one backend's view does not scan every cell.
        self._keys: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        self._baseline: dict[tuple[str, str, str], Cell] = {}
        self.reset_at = wall()
        self._reset_mono = clock()
        self.states = StateClock(wall)
        # Attempts that failed on a backend (connect error, timeout, 5xx...), retried or not: a request
        # record names only the backend that ended it, so this is where a retried failure shows.
        self.failed_attempts: dict[str, int] = {}
        self._failed_attempts_base: dict[str, int] = {}

    # --- the hot path ----------------------------------------------------------------------------------

    def observe(self, r: RequestRecord) -> None:
        """Proxy observer: fold one finished request into its cell and window."""
        cell = self.cells.get((r.pool, r.backend, r.route))
        if cell is None:
            cell = self._new_cell(r.pool, r.backend, r.route)
        status = r.status
        cell.classes[status // 100 if 100 <= status < 600 else 0] += 1
        seconds = r.total_s
        cell.duration[bisect_left(DURATION_BUCKETS, seconds)] += 1
        cell.duration_sum += seconds
        if r.connect_s:
            cell.connect[bisect_left(CONNECT_BUCKETS, r.connect_s)] += 1
            cell.connect_sum += r.connect_s
        if r.attempts > 1:
            cell.retries += r.attempts - 1
        cell.bytes_in += r.bytes_in
        cell.bytes_out += r.bytes_out
        failed = status >= 500
        if r.fault:
            cell.faults[r.fault] = cell.faults.get(r.fault, 0) + 1
        error = r.error
        if error:
            cell.errors[error] = cell.errors.get(error, 0) + 1
            if status < 400 and error != "client_gone":
                failed = True
        cell.window.add(int(r.start + seconds), seconds, failed)

    def on_outcome(self, backend: Backend, ok: bool, status: int = 0) -> None:
        """Proxy outcome listener: called after every attempt that reached a verdict. A failed
        attempt is a transport failure or a 502-504 from the backend."""
        if not ok or 502 <= status <= 504:
            self.failed_attempts[backend.id] = self.failed_attempts.get(backend.id, 0) + 1

    def forget_backend(self, pool: str, backend_id: str) -> None:
        """A backend left for good (a retired worker, a removed server): its cells, window and
        counters go; its counts are kept under ``(pool, RETIRED, route)``."""
        for key in self._keys.pop((pool, backend_id), []):
            cell = self.cells.pop(key)
            retired = (pool, RETIRED, key[2])
            into = self.cells.get(retired)
            if into is None:
                into = self._new_cell(*retired)
            into.absorb(cell)
            base = self._baseline.pop(key, None)
            if base is not None:
                kept = self._baseline.get(retired)
                if kept is None:
                    self._baseline[retired] = base
                else:
                    kept.absorb(base)
        self.windows.pop((pool, backend_id), None)
        self.failed_attempts.pop(backend_id, None)
        self._failed_attempts_base.pop(backend_id, None)
        self.states.forget(backend_id)

    def _new_cell(self, pool: str, backend: str, route: str) -> Cell:
        window = self.windows.get((pool, backend))
        if window is None:
            window = self.windows[(pool, backend)] = Window()
        cell = self.cells[(pool, backend, route)] = Cell(window)
        self._keys.setdefault((pool, backend), []).append((pool, backend, route))
        return cell

    # --- reading -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Start the ``/stats`` counters and windows afresh; the cumulative cells are kept."""
        self._baseline = {key: cell.copy() for key, cell in self.cells.items()}
        for window in self.windows.values():
            window.clear()
        self.states.reset()
        self._failed_attempts_base = dict(self.failed_attempts)
        self.reset_at = self._wall()
        self._reset_mono = self._clock()

    def keys(self, pool: str | None = None, backend: str | None = None) -> list[tuple[str, str, str]]:
        """Cell keys of one backend, one pool, or (both None) all."""
        if backend is not None:
            return list(self._keys.get((pool or "", backend), ()))
        return [k for k in self.cells if pool is None or k[0] == pool]

    def counters(self, keys: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
        """Counters since the last reset, summed over the cells ``keys`` name."""
        classes = [0] * len(CODE_CLASSES)
        errors: dict[str, int] = {}
        faults: dict[str, int] = {}
        retries = bytes_in = bytes_out = 0
        for key in keys:
            cell = self.cells[key]
            base = self._baseline.get(key)
            for i, n in enumerate(cell.classes):
                classes[i] += n - (base.classes[i] if base else 0)
            for kind, n in cell.errors.items():
                n -= base.errors.get(kind, 0) if base else 0
                if n:
                    errors[kind] = errors.get(kind, 0) + n
            for kind, n in cell.faults.items():
                n -= base.faults.get(kind, 0) if base else 0
                if n:
                    faults[kind] = faults.get(kind, 0) + n
            retries += cell.retries - (base.retries if base else 0)
            bytes_in += cell.bytes_in - (base.bytes_in if base else 0)
            bytes_out += cell.bytes_out - (base.bytes_out if base else 0)
        status = {name: n for name, n in zip(CODE_CLASSES, classes, strict=True) if n or name != "none"}
        return {"requests": sum(classes), "status": status,
                "errors": errors, "faults": faults, "retries": retries, "bytes_in": bytes_in,
                "bytes_out": bytes_out}

    def failed_attempts_since_reset(self, backend_id: str) -> int:
        return self.failed_attempts.get(backend_id, 0) - self._failed_attempts_base.get(backend_id, 0)

    def latency(self, windows: Iterable[Window]) -> dict[str, dict[str, Any]]:
        """Per rolling window: count, rps, failures, error rate, mean, percentiles and max (ms)."""
        now = self._clock()
        now_sec = int(now)
        groups: list[list[Second]] = [[] for _ in WINDOWS]
        for window in windows:
            for slot in window.slots:
                age = now_sec - slot.sec
                for i, (_, span) in enumerate(WINDOWS):
                    if age < span:
                        groups[i].append(slot)
                        break
        hist: dict[int, int] = {}
        count = failed = 0
        total = peak = 0.0
        out: dict[str, dict[str, Any]] = {}
        since_reset = now - self._reset_mono
        for (name, span), group in zip(WINDOWS, groups, strict=True):
            for slot in group:
                count += slot.count
                failed += slot.failed
                total += slot.sum
                peak = max(peak, slot.max)
                for i, n in slot.hist.items():
                    hist[i] = hist.get(i, 0) + n
            # The window covers whole past seconds plus the part of the current one elapsed so far.
            covered = max(min(span - 1 + (now - now_sec), since_reset), 1e-3)
            out[name] = summarize(hist, count, failed, total, peak, covered)
        return out

    def series(self, windows: Iterable[Window], since_sec: int, until_sec: int) -> dict[str, list[Any]]:
        """Per complete second in ``(since_sec, until_sec]`` (monotonic seconds): requests, failures, p99."""
        seconds = list(range(since_sec + 1, until_sec + 1))
        merged: dict[int, Second] = {}
        for window in windows:
            for slot in window.slots:
                if since_sec < slot.sec <= until_sec:
                    acc = merged.get(slot.sec)
                    if acc is None:
                        acc = merged[slot.sec] = Second(slot.sec)
                    acc.count += slot.count
                    acc.failed += slot.failed
                    for i, n in slot.hist.items():
                        acc.hist[i] = acc.hist.get(i, 0) + n
        requests, failures, p99 = [], [], []
        for sec in seconds:
            acc = merged.get(sec)
            requests.append(acc.count if acc else 0)
            failures.append(acc.failed if acc else 0)
            p99.append(ms(percentile(acc.hist, acc.count, 0.99)) if acc else None)
        return {"requests": requests, "failed": failures, "p99_ms": p99}

    def started_sec(self) -> int:
        """The monotonic second the stats began (at start-up or the last reset)."""
        return int(self._reset_mono)

    def now_sec(self) -> int:
        return int(self._clock())

    def wall_of(self, sec: int) -> int:
        """The wall-clock second (Unix time) of a monotonic second."""
        return sec + round(self._wall() - self._clock())

    def mono_of(self, wall_sec: int) -> int:
        return wall_sec - round(self._wall() - self._clock())


def percentile(hist: dict[int, int], count: int, q: float) -> float:
    """Upper bound (seconds) of the bucket holding the ``q`` quantile; 0.0 for no data."""
    if not count:
        return 0.0
    rank = max(math.ceil(q * count), 1)
    seen = 0
    for i in sorted(hist):
        seen += hist[i]
        if seen >= rank:
            return bucket_upper_s(i)
    return bucket_upper_s(max(hist))


def summarize(hist: dict[int, int], count: int, failed: int, total_s: float, max_s: float,
              covered_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"count": count, "rps": round(count / covered_s, 3), "failed": failed,
                           "error_rate": round(failed / count, 4) if count else 0.0,
                           "mean_ms": ms(total_s / count) if count else None}
    for name, q in PERCENTILES:
        # A bucket's upper bound can exceed the largest value seen; never report more than that.
        out[f"{name}_ms"] = ms(min(percentile(hist, count, q), max_s)) if count else None
    out["max_ms"] = ms(max_s) if count else None
    return out

