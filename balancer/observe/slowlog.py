"""The slow-request log behind ``GET /slowlog`` (Redis ``SLOWLOG``'s idea, for HTTP requests).

The observer keeps the last ``size`` requests that took at least ``threshold_s`` (from the start of the
request to its last byte). On the hot path that is one comparison, plus an append for a slow request;
the entry is formatted only when someone reads the log.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ..dataplane.record import RequestRecord
from .units import iso_utc, ms

MAX_TARGET = 1024     # characters of the request target shown


class SlowLog:
    def __init__(self, threshold_s: float, size: int) -> None:
        self.threshold_s = threshold_s
        self.size = size
        self._entries: deque[tuple[int, RequestRecord]] = deque(maxlen=size)
        self._next_id = 0
        self.seen = 0          # slow requests since the last reset, including those pushed out
        self.total = 0         # slow requests since start (never reset; a Prometheus counter)

    def observe(self, record: RequestRecord) -> None:
        if record.total_s >= self.threshold_s:
            self._next_id += 1
            self.seen += 1
            self.total += 1
            self._entries.append((self._next_id, record))

    def configure(self, threshold_s: float, size: int) -> None:
        """Reload: a new threshold and size (the slowest kept so far stay, up to ``size``)."""
        self.threshold_s = threshold_s
        if size != self.size:
            self.size = size
            self._entries = deque(self._entries, maxlen=size)

    def __len__(self) -> int:
        return len(self._entries)

    def reset(self) -> None:
        self._entries.clear()
        self.seen = 0

    def entries(self, order: str = "slowest", limit: int | None = None) -> list[dict[str, Any]]:
        """Kept entries, slowest first (``order="slowest"``) or newest first (``"recent"``)."""
        items = list(self._entries)
        if order == "slowest":
            items.sort(key=lambda item: item[1].total_s, reverse=True)
        else:
            items.reverse()
        if limit is not None:
            items = items[:max(limit, 0)]
        return [entry(entry_id, record) for entry_id, record in items]

    def view(self, order: str = "slowest", limit: int | None = None) -> dict[str, Any]:
        return {"threshold_ms": round(self.threshold_s * 1000, 3), "size": self.size, "seen": self.seen,
                "entries": self.entries(order, limit)}

    def __repr__(self) -> str:
        return f"<SlowLog threshold={self.threshold_s * 1000:g}ms {len(self._entries)}/{self.size}>"


def entry(entry_id: int, r: RequestRecord) -> dict[str, Any]:
    """One slow request for JSON. ``upstream_ms``: from request sent to response head."""
    upstream_s = max(r.ttfb_s - r.queue_s - r.connect_s, 0.0) if r.ttfb_s else 0.0
    return {
        "id": entry_id,
        "time": iso_utc(r.wall),
        "duration_ms": ms(r.total_s),
        "method": r.method,
        "path": r.target[:MAX_TARGET].decode("utf-8", "backslashreplace"),
        "route": r.route, "pool": r.pool, "backend": r.backend,
        "status": r.status, "upstream_status": r.upstream_status,
        "attempts": r.attempts, "error": r.error,
        "queue_ms": ms(r.queue_s), "connect_ms": ms(r.connect_s), "upstream_ms": ms(upstream_s),
        "ttfb_ms": ms(r.ttfb_s), "transfer_ms": ms(r.total_s - r.ttfb_s) if r.ttfb_s else 0.0,
        "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
        "request_id": r.request_id.decode("latin-1"), "client": r.client,
    }


