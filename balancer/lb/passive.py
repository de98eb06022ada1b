"""Passive health: eject a backend that keeps failing live requests, for a while.

Theory of operation
-------------------
The proxy reports every attempt's outcome (``Proxy.add_outcome_listener``): ``ok=False`` for a
transport failure (a connect error or timeout, a backend that closed before answering, a response
timeout, a body cut by the backend), else ``ok=True`` with the response's status. A failure is a
transport failure, or a status listed in ``passive.statuses`` (none by default: as nginx's
``max_fails``, statuses count only when configured, so a client cannot eject a backend by asking for a
URL that answers 503). :class:`PassiveTracker` (pure:
no clock of its own, no I/O) counts *consecutive* failures per backend, as Envoy's outlier detection
and nginx's ``max_fails`` do; one success resets the count.

At ``consecutive_failures`` the backend is ejected for ``ejection_time x n`` (n = how many times it has
been ejected recently, so a backend that keeps failing stays out longer), capped at
``max_ejection_time``. The multiplier decays by one for every ``ejection_time`` the backend then spends
without being ejected. An ejection is refused (and the failures keep counting, so the next one may
succeed once a peer returns) when:

* the pool has a single backend (passive health never empties a pool by itself),
* ``max_ejected_percent`` of the pool would be exceeded, or
* the backend is the last ready one in its pool (a failing backend beats a 503 for everyone).

:class:`PassiveHealth` is the async shell: it turns decisions into ``Registry.set_ejected`` calls, owns
one loop timer per ejection. With active checks, passive ejection decides when a backend leaves and
the checks decide when it returns (HAProxy's ``observe``): the backend must pass ``rise`` checks in a
row from its ejection on (:meth:`HealthChecker.start_probation`; probes run at the fast interval
meanwhile), and the moment it has, the ejection ends; the timer is only the longest it lasts (then
it is readmitted after ``rise`` passes counted afresh, :meth:`HealthChecker.require_rise`).
Without active checks the timer alone sends it back. A worker process that exits ends its ejection
at once: its replacement is a new process and passes the readiness gate like any other.

Transitions, per backend (``record`` / ``decide`` / ``end``)::

    counting --failures reach threshold, allowed--> ejected --timer--> counting (failures = 0)
    counting --failures reach threshold, refused--> counting (logged once, at the threshold)
    ejected  --outcome of a request still in flight--> ejected (ignored)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config.models import PassiveConfig
from .health import HealthChecker
from .registry import Backend, Registry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Record:
    failures: int = 0
    ejected: bool = False
    times_ejected: int = 0             # the duration multiplier, after decay
    returned_at: float | None = None   # when the last ejection ended


@dataclass(frozen=True, slots=True)
class Ejection:
    """Eject for ``duration_s``; ``count`` is the (decayed) number of times, this one included."""

    duration_s: float
    count: int
    reason: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """The threshold was reached but a limit forbids ejecting; ``reason`` says which."""

    reason: str


class PassiveTracker:
    """Consecutive-failure counting and ejection decisions for one pool. Pure: callers pass times."""

    __slots__ = ("_records", "ejected", "policy")

    def __init__(self, policy: PassiveConfig) -> None:
        self.policy = policy
        self._records: dict[Backend, _Record] = {}
        self.ejected = 0                 # backends of this pool ejected right now

    def record(self, backend: Backend, ok: bool) -> bool:
        """Count one outcome; True when the failures reached the threshold (call :meth:`decide`)."""
        rec = self._records.get(backend)
        if ok:
            if rec is not None:
                rec.failures = 0
            return False
        if rec is None:
            rec = self._records[backend] = _Record()
        if rec.ejected:
            return False                 # a request that was in flight when we ejected it
        rec.failures += 1
        return rec.failures >= self.policy.consecutive_failures

    def failures(self, backend: Backend) -> int:
        rec = self._records.get(backend)
        return rec.failures if rec is not None else 0

    def is_ejected(self, backend: Backend) -> bool:
        rec = self._records.get(backend)
        return rec is not None and rec.ejected

    def refusal(self, pool_size: int, ready_others: int) -> str | None:
        """Why one more ejection is not allowed now, or None if it is."""
        if pool_size <= 1:
            return "a pool with one backend is never emptied"
        percent = self.policy.max_ejected_percent
        if (self.ejected + 1) * 100 > percent * pool_size:
            return f"max_ejected_percent {percent} reached ({self.ejected} of {pool_size} ejected)"
        if ready_others == 0:
            return "it is the last ready backend in its pool"
        return None

    def decide(self, backend: Backend, now: float, *, pool_size: int,
               ready_others: int) -> Ejection | Refusal:
        """Eject ``backend`` (state updated) or say why not. ``ready_others``: ready peers."""
        why_not = self.refusal(pool_size, ready_others)
        if why_not is not None:
            return Refusal(why_not)
        policy = self.policy
        rec = self._records[backend]
        if rec.returned_at is not None:
            calm = int((now - rec.returned_at) / policy.ejection_time_s)
            rec.times_ejected = max(rec.times_ejected - calm, 0)
        rec.times_ejected += 1
        rec.ejected = True
        self.ejected += 1
        duration = min(policy.ejection_time_s * rec.times_ejected, policy.max_ejection_time_s)
        return Ejection(duration, rec.times_ejected, f"passive: {rec.failures} consecutive failures")

    def end(self, backend: Backend, now: float) -> bool:
        """The ejection is over (timer, or the process exited); False if it was not ejected."""
        rec = self._records.get(backend)
        if rec is None or not rec.ejected:
            return False
        rec.ejected = False
        rec.failures = 0
        rec.returned_at = now
        self.ejected -= 1
        return True

    def forget(self, backend: Backend) -> None:
        rec = self._records.pop(backend, None)
        if rec is not None and rec.ejected:
            self.ejected -= 1

    def reset(self, backend: Backend) -> None:
        """A new process: forget its failures (the multiplier stays, and decays)."""
        rec = self._records.get(backend)
        if rec is not None:
            rec.failures = 0

    def __repr__(self) -> str:
        p = self.policy
        return (f"<PassiveTracker consecutive_failures={p.consecutive_failures} "
                f"ejected={self.ejected} max={p.max_ejected_percent}%>")


class PassiveHealth:
    """The async shell: proxy outcomes in, registry ejections and their timers out.

    ``on_outcome`` is on the request path: a dictionary lookup and a counter unless a threshold is
    reached. Owner calls ``aclose`` (cancels the timers; ejected backends stay ejected).
    """

    def __init__(self, registry: Registry, health: HealthChecker | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.health = health
        self._clock = clock
        self._trackers: dict[str, PassiveTracker] = {}
        self._timers: dict[Backend, asyncio.TimerHandle] = {}
        if health is not None:
            health.add_recovery_listener(self._on_recovered)

    def add_pool(self, pool: str, policy: PassiveConfig) -> None:
        if policy.enabled:
            self._trackers[pool] = PassiveTracker(policy)

    def tracker(self, pool: str) -> PassiveTracker | None:
        return self._trackers.get(pool)

    def on_outcome(self, backend: Backend, ok: bool, status: int = 0) -> None:
        """Proxy listener: one attempt on ``backend`` worked or failed, and its status."""
        tracker = self._trackers.get(backend.pool)
        if tracker is not None and tracker.record(backend, ok and status not in tracker.policy.statuses):
            self._threshold(tracker, backend)

    def _threshold(self, tracker: PassiveTracker, backend: Backend) -> None:
        if not backend.is_ready:
            return          # already out (down, draining, disabled): nothing to eject from
        backend_set = self.registry.pool(backend.pool)
        decision = tracker.decide(backend, self._clock(), pool_size=len(backend_set),
                                  ready_others=len(backend_set.ready) - 1)
        if isinstance(decision, Refusal):
            if tracker.failures(backend) == tracker.policy.consecutive_failures:
                log.warning("backend %s: %d consecutive failures, not ejected: %s", backend.id,
                            tracker.failures(backend), decision.reason)
            return
        log.warning("backend %s ejected for %gs (%s; ejection #%d)", backend.id, decision.duration_s,
                    decision.reason, decision.count)
        self.registry.set_ejected(backend, True, decision.reason)
        if self.health is not None:
            # `rise` passing checks in a row from now end the ejection (_on_recovered).
            self.health.start_probation(backend)
        self._timers[backend] = asyncio.get_running_loop().call_later(
            decision.duration_s, self._on_timer, backend, decision.duration_s)

    def _on_recovered(self, backend: Backend) -> None:
        """Active checks passed ``rise`` times in a row: an ejection ends now."""
        tracker = self._trackers.get(backend.pool)
        if tracker is None or not tracker.end(backend, self._clock()):
            return
        timer = self._timers.pop(backend, None)
        if timer is not None:
            timer.cancel()
        log.info("backend %s: health checks pass again: ejection over, back in rotation", backend.id)
        self.registry.set_ejected(backend, False, "")

    def _on_timer(self, backend: Backend, duration_s: float) -> None:
        self._timers.pop(backend, None)
        tracker = self._trackers[backend.pool]
        if not tracker.end(backend, self._clock()):
            return
        if self.health is not None and self.health.is_checked(backend):
            # The checks have been counting since the ejection (unhealthy until `rise` passes):
            # the backend stays out until they are done.
            rise = self.health.policy(backend).rise
            why = f"passive: ejection over, waiting for {rise} passing checks"
            log.info("backend %s: ejection of %gs over; readmitted after %d passing checks",
                     backend.id, duration_s, rise)
            self.health.require_rise(backend, why)
            self.registry.set_ejected(backend, False, why)
        else:
            log.info("backend %s: ejection of %gs over; back in rotation", backend.id, duration_s)
            self.registry.set_ejected(backend, False, "")

    def on_alive_changed(self, backend: Backend) -> None:
        """Supervisor news. A process that exited takes its ejection and failure count with it."""
        tracker = self._trackers.get(backend.pool)
        if tracker is None or backend.alive:
            return
        tracker.reset(backend)
        if tracker.end(backend, self._clock()):
            timer = self._timers.pop(backend, None)
            if timer is not None:
                timer.cancel()
            log.info("backend %s: ejection ended early: its process exited", backend.id)
            self.registry.set_ejected(backend, False, backend.reason)

    def forget(self, backend: Backend) -> None:
        """A backend left for good: its failure count, ejection and timer go with it."""
        timer = self._timers.pop(backend, None)
        if timer is not None:
            timer.cancel()
        tracker = self._trackers.get(backend.pool)
        if tracker is not None:
            tracker.forget(backend)

    async def aclose(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def __repr__(self) -> str:
        pools = ", ".join(f"{name}: {t.ejected} ejected" for name, t in self._trackers.items())
        return f"<PassiveHealth {pools}>"
