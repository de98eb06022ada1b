"""The keep-alive connections to each backend (:class:`BackendConnections`), and the table of them
(:class:`ConnectionTable`). "Pool" is reserved for a configured group of backends.

Theory of operation
-------------------
Modelled on httpcore's connection pool: every decision is a synchronous step over plain state that
returns what to do (which connection to lease, which to close); a thin async shell performs the I/O.

A :class:`BackendConnections` holds ``idle`` connections (a stack: the most recently used is reused
first, so surplus connections at the bottom age out) and counts the connections leased or being
opened (``in_use``).
``acquire()``:

1. pops idle connections from the top, discarding any that has expired (idle timeout, backend's
   ``Keep-Alive: timeout``, lifetime, request count) or gone stale (readable or closed while idle; the
   protocol marks it the moment it happens) -- those are closed with their reason counted. A request
   that must not be sent twice (``fresh_within``) takes an idle connection only if it was used within
   that many seconds (HAProxy's ``http-reuse safe`` in spirit): a connection idle for longer is the one
   a backend may be closing at this very moment;
2. else opens a new connection if ``max`` allows;
3. else waits in FIFO order, up to ``acquire_timeout``, for a released connection or a free slot;
   past that :class:`PoolTimeout` (the proxy answers 503 with ``Retry-After``).

``release(conn)`` returns a connection to the idle stack only when its response was read completely
and both sides agreed on keep-alive; any other connection (client gone, cancelled, timed out, framing
error) is aborted, and in every case the slot is freed and the first waiter woken. A reaper closes idle
connections before the backend would (``idle_timeout`` sits below the keep-alive we give our spawned
workers), and keeps ``min_idle`` connections open ahead of demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ..errors import PoolQueueFull, PoolTimeout, UpstreamConnectError, UpstreamConnectTimeout
from .tls import ClientTLS
from .upstream import ConnState, UpstreamConnection

log = logging.getLogger(__name__)

CLOSE_REASONS = ("idle_timeout", "stale", "max_requests", "lifetime", "error", "backend_close",
                 "out_of_rotation", "removed", "surplus")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-backend limits; ``None``/0 where the docstring says unlimited."""

    max: int = 0                          # connections in use + idle; 0 = unlimited
    max_idle: int = 32                    # idle connections kept beyond a burst (trimmed by the reaper)
    min_idle: int = 0
    idle_timeout_s: float | None = 15.0
    max_requests: int = 1000              # 0 = unlimited
    max_lifetime_s: float = 3600.0        # 0 = unlimited
    acquire_timeout_s: float = 5.0
    connect_timeout_s: float = 3.0
    max_waiting: int = 0                  # queue length at `max`; 0 = unlimited (time-bounded only)
    max_response_header: int = 65536      # a response head over this is a protocol error (502)


class ConnectionStats:
    """Counters for one backend's connections (fed to /stats and /metrics)."""

    __slots__ = ("acquires", "closed", "created", "replayed", "reused", "wait_max_s", "wait_total_s",
                 "waits")

    def __init__(self) -> None:
        self.created = 0
        self.reused = 0
        self.closed: Counter[str] = Counter()
        self.replayed = 0
        self.acquires = 0
        self.waits = 0
        self.wait_total_s = 0.0
        self.wait_max_s = 0.0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


# Idle connections beyond `max_idle` are closed once unused for this long (by the reaper).
SURPLUS_GRACE_S = 1.0

# A connection to close and the reason to count it under.
Closing = tuple[UpstreamConnection, str]


async def open_connection(host: str, port: int, timeout: float, max_head: int = 65536,
                          tls: ClientTLS | None = None) -> UpstreamConnection:
    """Open a TCP connection to a backend, with its TLS handshake if ``tls``, both within
    ``timeout``; library errors translated to ours."""
    loop = asyncio.get_running_loop()
    address = f"{host}:{port}"

    def factory() -> asyncio.Protocol:
        return cast(asyncio.Protocol, UpstreamConnection(address, max_head=max_head))
    try:
        async with asyncio.timeout(timeout):
            if tls is None:
                transport, protocol = await loop.create_connection(factory, host, port)
            else:
                transport, protocol = await loop.create_connection(
                    factory, host, port, ssl=tls.context, server_hostname=tls.name_for(host),
                    ssl_handshake_timeout=timeout)
    except TimeoutError as exc:
        raise UpstreamConnectTimeout(f"connect to {address} timed out after {timeout:g}s") from exc
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamConnectError(f"TLS handshake with {address} failed: certificate verify failed: "
                                   f"{exc.verify_message}") from exc
    except ssl.SSLError as exc:
        detail = exc.reason or str(exc)
        raise UpstreamConnectError(f"TLS handshake with {address} failed: {detail}") from exc
    except OSError as exc:
        raise UpstreamConnectError(f"connect to {address} failed: {exc.strerror or exc}") from exc
    conn = cast(UpstreamConnection, protocol)
    # uvloop may resolve create_connection() before it has called connection_made().
    conn.transport = transport
    return conn


class BackendConnections:
    """The keep-alive connections to one backend. See the module docstring."""

    def __init__(self, host: str, port: int, limits: ConnectionLimits, *,
                 connect: Callable[..., Any] = open_connection,
                 clock: Callable[[], float] = time.monotonic, tls: ClientTLS | None = None) -> None:
        self.host = host
        self.tls = tls
        self.port = port
        self.limits = limits
        self._connect = connect
        self._clock = clock
        self._idle: list[UpstreamConnection] = []
        self._in_use: set[UpstreamConnection] = set()
        self._opening = 0                 # connects in progress, counted against `max`
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._closed = False
        # False while the backend is out of rotation: released connections are closed, not pooled.
        self.accepting = True
        self.stats = ConnectionStats()

    # --- synchronous decisions -----------------------------------------------------------------------

    @property
    def total(self) -> int:
        return len(self._idle) + len(self._in_use) + self._opening

    def _expiry(self, conn: UpstreamConnection, now: float) -> str | None:
        limits = self.limits
        return conn.has_expired(now, limits.idle_timeout_s, limits.max_lifetime_s or None,
                                limits.max_requests or None)

    def _take_idle(self, now: float, fresh_within: float | None = None
                   ) -> tuple[UpstreamConnection | None, list[Closing]]:
        """Pop the most recently used healthy idle connection; also return the expired ones met.
        With ``fresh_within``, a connection idle for longer is left (or closed, when its slot is
        needed for a new connection)."""
        expired: list[Closing] = []
        while self._idle:
            if fresh_within is not None and now - self._idle[-1].idle_since > fresh_within:
                if not self._can_open():
                    expired.append((self._idle.pop(0), "surplus"))   # make room: the least recent
                    continue
                return None, expired
            conn = self._idle.pop()
            reason = self._expiry(conn, now)
            if reason is None:
                return conn, expired
            expired.append((conn, reason))
        return None, expired

    def _can_open(self) -> bool:
        return not self.limits.max or self.total < self.limits.max

    def _admit_release(self, conn: UpstreamConnection, now: float) -> str | None:
        """Why a released connection must be closed rather than kept idle, or None to keep it."""
        if not conn.is_reusable:
            return "error" if conn.state is not ConnState.CLOSED else (conn.close_reason or "backend_close")
        if self._closed or not self.accepting:
            return "out_of_rotation"
        return self._expiry(conn, now)

    def reap(self, now: float) -> list[Closing]:
        """Remove expired idle connections, and the least recently used ones beyond ``max_idle`` that
        have sat unused for ``SURPLUS_GRACE_S``; return them with their reason (the shell closes them).

        Trimming here rather than on release is the hysteresis that matters under load: a burst that
        releases many connections at once does not close them only to open new ones a moment later.
        """
        keep: list[UpstreamConnection] = []
        expired: list[Closing] = []
        for conn in self._idle:
            reason = self._expiry(conn, now)
            if reason is None:
                keep.append(conn)
            else:
                expired.append((conn, reason))
        surplus = len(keep) - self.limits.max_idle
        while surplus > 0 and now - keep[0].idle_since >= SURPLUS_GRACE_S:   # bottom = least recent
            expired.append((keep.pop(0), "surplus"))
            surplus -= 1
        self._idle = keep
        return expired

    def missing_idle(self) -> int:
        """How many connections to open so that ``min_idle`` are waiting (within ``max``)."""
        want = self.limits.min_idle - len(self._idle) - self._opening
        if self.limits.max:
            want = min(want, self.limits.max - self.total)
        return max(want, 0) if not self._closed else 0

    # --- the async shell -----------------------------------------------------------------------------

    def acquire_idle(self, fresh_within: float | None = None) -> UpstreamConnection | None:
        """Lease an idle connection if one is reusable now (the common case, without a coroutine);
        None means: call :meth:`acquire`."""
        if not self._idle or self._waiters:
            return None
        conn, expired = self._take_idle(self._clock(), fresh_within)
        if expired:
            self._close_all(expired)
        if conn is None:
            return None
        self.stats.acquires += 1
        return self._lease(conn, 0.0)

    async def acquire(self, fresh_within: float | None = None) -> UpstreamConnection:
        """Lease a connection: reused idle, new, or after waiting. The caller must ``release`` it.

        The leased connection carries ``queue_s`` (time spent waiting for a slot) and ``connect_s``
        (time to open it; 0 when reused) for the request's timings.
        """
        self.stats.acquires += 1
        conn, expired = self._take_idle(self._clock(), fresh_within)
        self._close_all(expired)
        if conn is not None:
            return self._lease(conn, 0.0)
        if not self._can_open() or self._waiters:
            if self.limits.max_waiting and self.waiting >= self.limits.max_waiting:
                raise PoolQueueFull(f"{self.waiting} requests already waiting for {self.host}:{self.port} "
                                    f"(max_waiting {self.limits.max_waiting})")
            started = self._clock()
            conn = await self._wait_for_slot()
            waited = self._clock() - started
            if conn is not None:
                if not conn.is_closed:
                    return self._lease(conn, waited)
                # Handed over, then closed by the backend before we ran: its slot is ours to open.
                self._in_use.discard(conn)
                self._close_one(conn, conn.close_reason or "backend_close")
                self._opening += 1
            conn = await self._open(reserved=True)
            conn.queue_s = waited
            return conn
        return await self._open()

    def _lease(self, conn: UpstreamConnection, waited: float) -> UpstreamConnection:
        conn.mark_active()
        self._in_use.add(conn)
        self.stats.reused += 1
        conn.queue_s = waited
        conn.connect_s = 0.0
        return conn

    async def _open(self, reserved: bool = False) -> UpstreamConnection:
        """Connect; ``reserved`` means ``_wake_one`` already counted this slot in ``_opening``."""
        if not reserved:
            self._opening += 1
        started = self._clock()
        try:
            limits = self.limits
            if self.tls is None:
                conn: UpstreamConnection = await self._connect(self.host, self.port, limits.connect_timeout_s,
                                                               limits.max_response_header)
            else:
                conn = await self._connect(self.host, self.port, limits.connect_timeout_s,
                                           limits.max_response_header, self.tls)
        except BaseException:
            self._opening -= 1
            self._wake_one()
            raise
        self._opening -= 1
        self.stats.created += 1
        conn.mark_active()
        self._in_use.add(conn)
        conn.queue_s = 0.0
        conn.connect_s = self._clock() - started
        return conn

    async def _wait_for_slot(self) -> UpstreamConnection | None:
        """Queue FIFO until a connection is handed over (returned) or a slot frees (None)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        self.stats.waits += 1
        started = self._clock()
        try:
            async with asyncio.timeout(self.limits.acquire_timeout_s):
                return await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return waiter.result()      # handed a connection or a slot as the deadline passed
            raise PoolTimeout(f"no connection to {self.host}:{self.port} within "
                              f"{self.limits.acquire_timeout_s:g}s ({self.total} open, max "
                              f"{self.limits.max})") from None
        except asyncio.CancelledError:
            # Handed a connection in the same turn we were cancelled: give it back, not leak it.
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is not None:
                    self._in_use.discard(handed)
                    self._release_idle(handed)
                else:
                    self._opening -= 1      # the slot reserved for us goes to the next waiter
                    self._wake_one()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            waited = self._clock() - started
            self.stats.wait_total_s += waited
            self.stats.wait_max_s = max(self.stats.wait_max_s, waited)

    def release(self, conn: UpstreamConnection) -> None:
        """Give a leased connection back. Dirty or expired ones are closed; the slot is freed."""
        self._in_use.discard(conn)
        reason = self._admit_release(conn, self._clock())
        if reason is not None:
            if reason == "error" and not conn.is_closed:
                conn.abort("error")
            self._close_one(conn, reason)
            self._wake_one()
            return
        conn.mark_idle()
        self._release_idle(conn)

    def _release_idle(self, conn: UpstreamConnection) -> None:
        """Hand an idle connection to the first live waiter, else push it on the idle stack."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                # Counted as in use while it travels to the waiter, so `max` stays honest.
                self._in_use.add(conn)
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _wake_one(self) -> None:
        """A slot freed: reserve it for the first waiter, which will open a new connection."""
        if not self._can_open():
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._opening += 1
                waiter.set_result(None)
                return

    def _close_one(self, conn: UpstreamConnection, reason: str) -> None:
        if not conn.is_closed:
            conn.close(reason)
        self.stats.closed[reason] += 1

    def _close_all(self, items: list[tuple[UpstreamConnection, str]]) -> None:
        for conn, reason in items:
            self._close_one(conn, reason)

    def run_reaper(self) -> None:
        """One reaper pass (the manager calls this periodically)."""
        self._close_all(self.reap(self._clock()))

    async def top_up(self) -> None:
        """Open connections until ``min_idle`` are waiting; connect errors are left to live traffic."""
        for _ in range(self.missing_idle()):
            try:
                conn = await self._open()
            except (UpstreamConnectError, UpstreamConnectTimeout) as exc:
                log.debug("%s:%s: min_idle connect failed: %s", self.host, self.port, exc)
                return
            conn.mark_idle()
            self._in_use.discard(conn)
            self._release_idle(conn)

    def set_limits(self, limits: ConnectionLimits) -> None:
        """Reload: new limits, for the next acquire and the next idle sweep."""
        self.limits = limits

    def set_tls(self, tls: ClientTLS | None) -> None:
        """Reload: new TLS settings for new connections; idle ones made with the old are closed."""
        if tls is not self.tls:
            self.tls = tls
            self.close_idle("removed")

    def count_replay(self) -> None:
        """The proxy sent a request again on a fresh connection after a reused one was found closed."""
        self.stats.replayed += 1

    def close_idle(self, reason: str = "out_of_rotation") -> int:
        """Close every idle connection (backend left rotation). Returns how many."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._close_one(conn, reason)
        return len(idle)

    def close(self) -> None:
        """Close idle connections now and in-use ones as they are released."""
        self._closed = True
        self.close_idle("removed")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolTimeout(f"connections to {self.host}:{self.port} closed"))

    # --- observation ---------------------------------------------------------------------------------

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        leased = s.created + s.reused
        return {
            "created": s.created,
            "reused": s.reused,
            "reuse_ratio": round(s.reused / leased, 4) if leased else 0.0,
            "closed": {reason: s.closed.get(reason, 0) for reason in CLOSE_REASONS},
            "replayed": s.replayed,
            "acquires": s.acquires,
            "waits": s.waits,
            "wait_total_s": round(s.wait_total_s, 6),
            "wait_max_s": round(s.wait_max_s, 6),
            "waiting": self.waiting,
            "in_use": self.in_use,
            "idle": self.idle,
            "opening": self._opening,
            "utilisation": round(self.in_use / self.limits.max, 4) if self.limits.max else None,
        }

    def connections(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [c.info(now) for c in [*self._in_use, *self._idle]]

    def __repr__(self) -> str:
        return (f"<BackendConnections {self.host}:{self.port} in_use={self.in_use} idle={self.idle} "
                f"opening={self._opening} waiting={self.waiting} max={self.limits.max or 'unlimited'} "
                f"created={self.stats.created} reused={self.stats.reused}>")


class ConnectionTable:
    """Every backend's :class:`BackendConnections`, plus the reaper task that expires idle connections.

    Keyed by backend id. The owner (the app) calls :meth:`start` and :meth:`aclose`.
    """

    def __init__(self, *, reap_interval_s: float = 1.0,
                 connect: Callable[..., Any] = open_connection,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._by_backend: dict[str, BackendConnections] = {}
        self._reap_interval_s = reap_interval_s
        self._connect = connect
        self._clock = clock
        self._reaper: asyncio.Task[None] | None = None
        self._top_ups: set[asyncio.Task[None]] = set()

    def add(self, backend_id: str, host: str, port: int, limits: ConnectionLimits,
            tls: ClientTLS | None = None) -> BackendConnections:
        conns = BackendConnections(host, port, limits, connect=self._connect, clock=self._clock, tls=tls)
        self._by_backend[backend_id] = conns
        return conns

    def get(self, backend_id: str) -> BackendConnections | None:
        return self._by_backend.get(backend_id)

    @property
    def by_id(self) -> dict[str, BackendConnections]:
        """The live mapping (read-only by convention), for the proxy's per-request lookup."""
        return self._by_backend

    def items(self) -> list[tuple[str, BackendConnections]]:
        return list(self._by_backend.items())

    def remove(self, backend_id: str) -> None:
        conns = self._by_backend.pop(backend_id, None)
        if conns is not None:
            conns.close()

    def on_readiness(self, backend_id: str, is_ready: bool) -> None:
        """Registry listener: a backend that leaves rotation has its idle connections closed;
        one that joins gets its ``min_idle`` connections opened ahead of demand."""
        conns = self._by_backend.get(backend_id)
        if conns is None:
            return
        conns.accepting = is_ready
        if not is_ready:
            closed = conns.close_idle("out_of_rotation")
            if closed:
                log.debug("backend %s left rotation: closed %d idle connections", backend_id, closed)
        elif conns.missing_idle():
            self._spawn_top_up(conns)

    def _spawn_top_up(self, conns: BackendConnections) -> None:
        task = asyncio.get_running_loop().create_task(conns.top_up())
        self._top_ups.add(task)
        task.add_done_callback(self._top_ups.discard)

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever(), name="connection-reaper")

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval_s)
            for conns in self._by_backend.values():
                conns.run_reaper()
                if conns.missing_idle() and not self._top_ups:
                    self._spawn_top_up(conns)

    async def aclose(self) -> None:
        """Stop the reaper and close every backend's connections."""
        tasks = [t for t in (self._reaper, *self._top_ups) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conns in self._by_backend.values():
            conns.close()

    def __repr__(self) -> str:
        return f"<ConnectionTable {len(self._by_backend)} backends>"
