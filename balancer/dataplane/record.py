"""One finished request, as the proxy saw it: what metrics, the access log and the slow log consume.

A plain slotted object filled in along the request path (times are ``time.monotonic()`` seconds,
``wall`` is ``time.time()`` at the start); observers get it once, after the response is done, and must
not keep a reference they mutate.
"""

from __future__ import annotations

from collections.abc import Sequence


class RequestRecord:
    __slots__ = ("attempts", "backend", "bytes_in", "bytes_out", "client", "connect_s", "error", "fault",
                 "headers", "listener", "method", "pool", "queue_s", "request_id", "route", "start", "status",
                 "target", "total_s", "ttfb_s", "upstream_status", "version", "wall")

    def __init__(self, start: float, wall: float, method: str, target: bytes, client: str) -> None:
        self.start = start
        self.wall = wall
        self.method = method
        self.target = target
        self.client = client
        # The client's raw header fields and HTTP version, by reference (no copy, no parsing here):
        # the access log's writer thread picks Referer and User-Agent out of them.
        self.headers: Sequence[tuple[bytes, bytes]] = ()
        self.version = "1.1"
        self.listener = ""           # the name of the listener it came through
        self.route = ""
        self.pool = ""
        self.backend = ""            # id of the backend that answered (or was tried last)
        self.status = 0              # status sent to the client
        self.upstream_status = 0     # status the backend sent (0 if none)
        self.attempts = 0            # backends tried, replays included
        self.error = ""              # failure kind from proxy.FAILURES, "" when none
        self.fault = ""              # a fault the route injected: "delay", "abort" or ""
        self.request_id = b""
        self.bytes_in = 0            # request body bytes received from the client
        self.bytes_out = 0           # response body bytes sent to the client
        self.queue_s = 0.0           # waiting for a pooled connection slot
        self.connect_s = 0.0         # opening a new upstream connection (0 when reused)
        self.ttfb_s = 0.0            # from start to the upstream response head
        self.total_s = 0.0           # from start to the last byte written

    def __repr__(self) -> str:
        error = f" {self.error}" if self.error else ""
        return (f"<RequestRecord {self.method} {self.target!r} -> {self.status} via {self.backend or '-'} "
                f"in {self.total_s * 1000:.1f}ms attempts={self.attempts}{error}>")
