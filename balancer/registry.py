"""Which backends exist and whether each may take new requests.

Theory of operation
-------------------
A backend may take a new request when four independent facts agree (pingora's ``ready = healthy and
enabled``, widened by the two things a supervisor and an operator add):

    ready = alive and healthy and admin_state is ENABLED and weight > 0

* ``alive``   -- owned by the supervisor: the worker process is running and accepts connections
                 (always true for an external ``host:port`` server);
* ``healthy`` -- owned by health checking: active probes and passive failure counting;
* ``admin``   -- owned by the operator: ENABLED, DRAINING (no new requests, in-flight ones finish) or
                 DISABLED;
* ``weight``  -- from the configuration (0 = no new traffic).

Each owner flips its own flag through a method here; nobody else writes them. After every change the
pool's *ready snapshot* (an immutable tuple) is rebuilt, and listeners are told which backends left or
joined. The proxy reads ``BackendSet.ready`` once per request and hands it to a selector, so a request
never sees a list that changes under it. This module does no I/O and has no clock of its own.
"""

from __future__ import annotations

import enum
import logging
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
    in_flight: int = 0
    # Why the backend is not ready, for logs and stats ("process exited", "health: 503", ...).
    reason: str = ""
    address: str = field(init=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"{host}:{self.port}"

    @property
    def is_ready(self) -> bool:
        return self.alive and self.healthy and self.admin is AdminState.ENABLED and self.weight > 0

    @property
    def state(self) -> str:
        """One word for operators: up, down, draining or disabled."""
        if self.admin is AdminState.DISABLED:
            return "disabled"
        if self.admin is AdminState.DRAINING:
            return "draining"
        return "up" if self.alive and self.healthy else "down"

    def __repr__(self) -> str:
        return (f"<Backend {self.id} {self.address} {self.state} weight={self.weight} "
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
            b.reason = reason
        self.pool(backend.pool).update(backend, change)

    def set_admin(self, backend: Backend, admin: AdminState) -> None:
        """Operator: enable, drain or disable."""
        def change(b: Backend) -> None:
            b.admin = admin
        if backend.admin is not admin:
            log.info("backend %s: %s -> %s", backend.id, backend.admin.value, admin.value)
        self.pool(backend.pool).update(backend, change)

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.pools.values())
        return f"<Registry {inner}>"
