"""Which backends exist and whether each may take new requests.

Theory of operation
-------------------
A backend may take a new request when five independent facts agree (pingora's ``ready = healthy and
enabled``, widened by what a supervisor, live traffic and an operator add):

    ready = alive and healthy and not ejected and admin_state is ENABLED and weight > 0

* ``alive``   -- owned by the supervisor: the worker process is running and accepts connections
                 (always true for an external ``host:port`` server);
* ``healthy`` -- owned by active health checks (:mod:`.health`);
* ``ejected`` -- owned by passive health (:mod:`.passive`): too many failures in live traffic;
                 a flag of its own so that passing probes cannot readmit the backend early;
* ``admin``   -- owned by the operator: ENABLED, DRAINING (no new requests, in-flight ones finish) or
                 DISABLED;
* ``weight``  -- from the configuration (0 = no new traffic).

Each owner flips its own flag through a method here; nobody else writes them. After every change the
pool's *ready snapshot* (an immutable tuple) is rebuilt, and listeners are told which backends left or
joined. The proxy reads ``BackendSet.ready`` once per request and hands it to a selector, so a request
never sees a list that changes under it.

``effective_weight`` is what pickers use: the configured weight, or a fraction of it while a readmitted
backend ramps up (``slow_start``). Changing it bumps the snapshot's ``version`` (so pickers rebuild) but
is not a readiness flip.

This module does no I/O. Its one coroutine, :func:`wait_drained`, polls an in-flight counter against a
deadline (the clock is injectable).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class AdminState(enum.Enum):
    ENABLED = "enabled"
    DRAINING = "draining"
    DISABLED = "disabled"


@dataclass(eq=False, slots=True)
class Backend:
    """One upstream server. Identity is the object; ``id`` is its stable public name (``web/1``)."""

    id: str
    pool: str
    host: str
    port: int
    weight: int = 1
    spawned: bool = False
    alive: bool = True
    healthy: bool = True
    admin: AdminState = AdminState.ENABLED
    ejected: bool = False
    in_flight: int = 0
    remote_in_flight: int = 0       # in other proxy processes (processes > 1), as they last reported
    # Why the backend is not ready, for logs and stats ("process exited", "health: 503", ...).
    reason: str = ""
    # The weight pickers use: ``weight``, or less while ramping up after readmission (slow start).
    effective_weight: float = field(init=False)

    def __post_init__(self) -> None:
        self.effective_weight = float(self.weight)

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``), derived so that it can never disagree with them."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_ready(self) -> bool:
        return (self.alive and self.healthy and not self.ejected and self.admin is AdminState.ENABLED
                and self.weight > 0)

    @property
    def state(self) -> str:
        """One word for operators: up, down, ejected, draining or disabled (first match wins).

        ``down`` = the process is not running or active checks fail; ``ejected`` = passive health took
        it out for failing live requests. The admin states win: a disabled backend is "disabled"
        whatever its health.
        """
        if self.admin is AdminState.DISABLED:
            return "disabled"
        if self.admin is AdminState.DRAINING:
            return "draining"
        if not (self.alive and self.healthy):
            return "down"
        return "ejected" if self.ejected else "up"

    def __repr__(self) -> str:
        ramp = (f" effective={self.effective_weight:g}" if self.effective_weight != self.weight
                else "")
        return (f"<Backend {self.id} {self.address} {self.state} weight={self.weight}{ramp} "
                f"in_flight={self.in_flight}{' (' + self.reason + ')' if self.reason else ''}>")


# A listener is told (backend, is_ready) every time a backend's readiness flips.
ReadinessListener = Callable[[Backend, bool], None]


class BackendSet:
    """The backends of one configured pool and its current ready snapshot."""

    __slots__ = ("_backends", "_listeners", "name", "ready", "version")

    def __init__(self, name: str) -> None:
        self.name = name
        self._backends: dict[str, Backend] = {}
        self._listeners: list[ReadinessListener] = []
        self.ready: tuple[Backend, ...] = ()
        # Bumped on every rebuild; selectors cache per-snapshot state keyed on it.
        self.version = 0

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._backends.values())

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, backend_id: str) -> Backend | None:
        return self._backends.get(backend_id)

    def add(self, backend: Backend) -> None:
        if backend.id in self._backends:
            raise ValueError(f"backend {backend.id!r} already in pool {self.name!r}")
        self._backends[backend.id] = backend
        self._rebuild()
        if backend.is_ready:
            self._notify(backend, True)

    def remove(self, backend_id: str) -> Backend:
        backend = self._backends.pop(backend_id)
        was_ready = backend in self.ready
        self._rebuild()
        if was_ready:
            self._notify(backend, False)
        return backend

    def subscribe(self, listener: ReadinessListener) -> None:
        self._listeners.append(listener)

    def update(self, backend: Backend, change: Callable[[Backend], None]) -> None:
        """Apply ``change`` to ``backend``; rebuild and notify when its readiness flipped."""
        was_ready = backend.is_ready
        change(backend)
        if backend.is_ready != was_ready:
            self._rebuild()
            self._notify(backend, backend.is_ready)

    def reweigh(self, backend: Backend, effective_weight: float) -> None:
        """Set the weight pickers see; a ready backend's change bumps ``version`` (not a flip)."""
        if backend.effective_weight == effective_weight:
            return
        backend.effective_weight = effective_weight
        if backend.is_ready:
            self._rebuild()

    def touch(self) -> None:
        """Rebuild the snapshot (pickers see a new version) without a readiness change."""
        self._rebuild()

    def _rebuild(self) -> None:
        self.ready = tuple(b for b in self._backends.values() if b.is_ready)
        self.version += 1

    def _notify(self, backend: Backend, is_ready: bool) -> None:
        for listener in self._listeners:
            listener(backend, is_ready)

    def __repr__(self) -> str:
        return f"<BackendSet {self.name} ready={len(self.ready)}/{len(self._backends)}>"


class Registry:
    """All pools' backend sets; the single writer of backend flags."""

    def __init__(self) -> None:
        self.pools: dict[str, BackendSet] = {}
        # Told (backend) whenever the supervisor flips `alive`; health checks reset on it.
        self.alive_listeners: list[Callable[[Backend], None]] = []

    def pool(self, name: str) -> BackendSet:
        backend_set = self.pools.get(name)
        if backend_set is None:
            backend_set = self.pools[name] = BackendSet(name)
        return backend_set

    def backends(self) -> Iterator[Backend]:
        for backend_set in self.pools.values():
            yield from backend_set

    def find(self, backend_id: str) -> Backend | None:
        for backend in self.backends():
            if backend.id == backend_id:
                return backend
        return None

    # --- the owners' switches ----------------------------------------------------------------------

    def set_alive(self, backend: Backend, alive: bool, reason: str = "") -> None:
        """Supervisor: the process is running and accepting (or it exited)."""
        def change(b: Backend) -> None:
            b.alive = alive
            if reason or alive:
                b.reason = reason
        changed = backend.alive != alive
        self.pool(backend.pool).update(backend, change)
        if changed:
            for listener in self.alive_listeners:
                listener(backend)

    def set_healthy(self, backend: Backend, healthy: bool, reason: str = "") -> None:
        """Health checks: consecutive-threshold result flipped."""
        def change(b: Backend) -> None:
            b.healthy = healthy
            # Passing checks do not clear the reason of a passive ejection still running.
            if not (healthy and b.ejected):
                b.reason = reason
        self.pool(backend.pool).update(backend, change)

    def set_ejected(self, backend: Backend, ejected: bool, reason: str = "") -> None:
        """Passive health: eject (with the reason) or end an ejection."""
        def change(b: Backend) -> None:
            b.ejected = ejected
            if ejected or b.reason.startswith("passive"):
                b.reason = reason
        self.pool(backend.pool).update(backend, change)

    def reweigh(self, backend: Backend, effective_weight: float) -> None:
        """Slow start: the weight pickers use, between 10 % and 100 % of ``backend.weight``."""
        self.pool(backend.pool).reweigh(backend, effective_weight)

    def set_weight(self, backend: Backend, weight: int) -> None:
        """Configuration (reload): a new weight; 0 takes the backend out of rotation."""
        backend_set = self.pool(backend.pool)

        def change(b: Backend) -> None:
            b.weight = weight
        backend_set.update(backend, change)
        backend_set.reweigh(backend, float(weight))
        backend_set.touch()

    def set_admin(self, backend: Backend, admin: AdminState) -> None:
        """Operator: enable, drain or disable."""
        def change(b: Backend) -> None:
            b.admin = admin
        if backend.admin is not admin:
            log.info("backend %s: %s -> %s (%d in flight)", backend.id, backend.admin.value, admin.value,
                     backend.in_flight)
        self.pool(backend.pool).update(backend, change)

    def drain(self, backend: Backend) -> None:
        """No new requests; those in flight finish. Idle pooled connections are closed by the
        upstream pools' readiness listener. Wait for the rest with :func:`wait_drained`."""
        self.set_admin(backend, AdminState.DRAINING)

    def disable(self, backend: Backend) -> None:
        """Out of rotation for good (until enabled); requests in flight are not cut."""
        self.set_admin(backend, AdminState.DISABLED)

    def enable(self, backend: Backend) -> None:
        """Back to normal: ready again as soon as it is alive, healthy and not ejected."""
        self.set_admin(backend, AdminState.ENABLED)

    def remove_pool(self, name: str) -> None:
        """Forget a pool that left the configuration (its backends are drained and detached)."""
        self.pools.pop(name, None)

    def set_remote_in_flight(self, backend: Backend, count: int) -> None:
        """Proxy processes (``processes`` > 1): what the others last reported in flight."""
        backend.remote_in_flight = count

    def move(self, backend: Backend, host: str, port: int) -> None:
        """A proxy process learns that a spawned worker came back on another port."""
        backend.host, backend.port = host, port

    def copy_state(self, backend: Backend, *, weight: int, effective_weight: float, alive: bool,
                   healthy: bool, ejected: bool, admin: AdminState, reason: str) -> None:
        """A proxy process takes the main process's view of ``backend``, all flags at once."""
        backend_set = self.pool(backend.pool)

        def change(b: Backend) -> None:
            b.weight, b.alive, b.healthy, b.ejected = weight, alive, healthy, ejected
            b.admin, b.reason = admin, reason
        backend_set.update(backend, change)
        backend_set.reweigh(backend, effective_weight)
        backend_set.touch()

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.pools.values())
        return f"<Registry {inner}>"


async def wait_drained(backend: Backend, timeout_s: float, poll_s: float = 0.05, *,
                       clock: Callable[[], float] = time.monotonic) -> int:
    """Wait until ``backend`` has no request in flight, at most ``timeout_s`` seconds.

    Returns the number still in flight when it returned: 0 = drained, N = the deadline passed and N
    requests would be cut by stopping the backend now (they are not cut here). Polls every ``poll_s``
    (the proxy counts in-flight requests with a plain integer, so there is nothing to await). Call
    :meth:`Registry.drain` first, or new requests keep arriving.
    """
    deadline = clock() + timeout_s
    while backend.in_flight + backend.remote_in_flight > 0:
        left = deadline - clock()
        if left <= 0:
            left_over = backend.in_flight + backend.remote_in_flight
            log.warning("backend %s: drain deadline of %gs passed with %d requests in flight",
                        backend.id, timeout_s, left_over)
            return left_over
        await asyncio.sleep(min(poll_s, left))
    return 0
