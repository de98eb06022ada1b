"""Active health checks: a pure threshold tracker and the probe tasks that feed it.

Theory of operation
-------------------
:class:`HealthTracker` counts consecutive results (pingora's and HAProxy's model): a healthy backend
is ejected after ``fall`` failures in a row, an ejected one readmitted after ``rise`` passes in a row.
``record()`` returns the flip, if any, and the checker reports exactly that to the registry, so each
transition is logged once, with its reason.

A backend that has *never* passed (a spawned worker that just started, or whose process was replaced)
starts unhealthy and needs a single pass: it takes traffic only once its process is up **and** its
first check succeeded. After a failure it needs the full ``rise``.

Probes run on their own connections (an aiohttp session with ``force_close``), never through the
data-plane pool, with jitter so backends are not probed in lockstep. While a backend is starting or
down, it is probed more often (``fast_interval``), so it comes back quickly.

When a passive ejection ends (:mod:`.passive`), :meth:`HealthChecker.require_rise` marks the
backend unhealthy and not fresh, so it returns only after ``rise`` passing checks.

:class:`SlowStart` ramps a readmitted backend's ``effective_weight`` from 10 % to 100 % of its weight
over ``slow_start`` seconds, in ten steps (:func:`ramp_level` is the pure part). Each step bumps the pool
snapshot's version, so pickers rebuild; a pool without slow start has no listener and no task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from ..config.models import HealthConfig
from .registry import Backend, BackendSet, Registry

log = logging.getLogger(__name__)


# Each wait between probes is longer by up to this share, so backends are not probed in lockstep.
JITTER = 0.1


def fast_interval_s(policy: HealthConfig) -> float:
    """The probe interval while a backend is starting or coming back (see the module docstring)."""
    return min(policy.interval_s / 4, 0.5)


class HealthTracker:
    """Consecutive-threshold health state. Pure: no clock, no I/O.

    ``fresh`` means "never checked since (re)start": one pass admits it. Any failure ends freshness,
    and from then on it takes ``rise`` passes in a row to come up.
    """

    __slots__ = ("epoch", "fails", "fall", "fresh", "healthy", "passes", "probation", "rise")

    def __init__(self, rise: int, fall: int, healthy: bool = False) -> None:
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.fresh = not healthy
        self.passes = 0
        self.fails = 0
        self.probation = False          # counting passes toward the end of a passive ejection
        # Bumped by every reset: a probe that started before it must not count after it.
        self.epoch = 0

    def reset(self) -> None:
        """A new process behind the same slot: unhealthy until its first pass."""
        self.healthy = False
        self.fresh = True
        self.probation = False
        self.passes = self.fails = 0
        self.epoch += 1

    def start_probation(self) -> None:
        """Count ``rise`` passes in a row from now without changing health (a passive ejection
        began): :meth:`record` says when they are done."""
        self.probation = True
        self.passes = 0
        self.epoch += 1

    def end_probation(self) -> bool:
        """True once, when ``rise`` passes in a row have been counted since :meth:`start_probation`
        and the backend is healthy."""
        if self.probation and self.healthy and self.passes >= self.rise:
            self.probation = False
            return True
        return False

    def require_rise(self) -> None:
        """Unhealthy until ``rise`` passes in a row, counted from now (a passive ejection ended)."""
        self.probation = False
        self.healthy = self.fresh = False
        self.passes = self.fails = 0
        self.epoch += 1

    def record(self, ok: bool) -> bool | None:
        """Count one result; return the new health when it flipped, else None."""
        if ok:
            self.fails = 0
            self.passes += 1
            if not self.healthy and self.passes >= (1 if self.fresh else self.rise):
                self.healthy = True
                self.fresh = False
                return True
        else:
            self.passes = 0
            self.fails += 1
            self.fresh = False
            if self.healthy and self.fails >= self.fall:
                self.healthy = False
                return False
        return None

    @property
    def is_settled(self) -> bool:
        """Steadily up: probe at the normal interval (otherwise at the fast one)."""
        return self.healthy and self.fails == 0 and not self.probation

    def __repr__(self) -> str:
        return (f"<HealthTracker {'healthy' if self.healthy else 'unhealthy'} passes={self.passes} "
                f"fails={self.fails} rise={self.rise} fall={self.fall}{' fresh' if self.fresh else ''}>")


Probe = Callable[[Backend, HealthConfig], "asyncio.Future[tuple[bool, str]] | object"]


class HealthChecker:
    """One probe task per checked backend; results go to the registry."""

    def __init__(self, registry: Registry, *, rand: Callable[[], float] = random.random) -> None:
        self.registry = registry
        self._rand = rand
        self._checks: dict[str, tuple[Backend, HealthConfig, HealthTracker, asyncio.Event]] = {}
        self._tls: dict[str, tuple[ssl.SSLContext, str]] = {}    # backend id -> (context, server name)
        self._recovery_listeners: list[Callable[[Backend], None]] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def add(self, backend: Backend, policy: HealthConfig, *, start_healthy: bool = False,
            tls: ssl.SSLContext | None = None, server_name: str | None = None) -> None:
        """Check ``backend`` from now on. Spawned workers start unhealthy (gated on their first
        pass); external servers start healthy, as in HAProxy, and are ejected after ``fall``.
        With ``tls``, probes speak HTTPS, sending and verifying ``server_name`` (else the host)."""
        self.set_tls(backend, tls, server_name)
        tracker = HealthTracker(policy.rise, policy.fall, healthy=start_healthy)
        if not start_healthy:
            self.registry.set_healthy(backend, False, "not yet checked")
        self._checks[backend.id] = (backend, policy, tracker, asyncio.Event())
        if self._session is not None:
            self._start_task(backend.id)

    def add_recovery_listener(self, listener: Callable[[Backend], None]) -> None:
        """``listener`` is told each time a backend's checks pass ``rise`` times and it is healthy."""
        self._recovery_listeners.append(listener)

    def set_tls(self, backend: Backend, tls: ssl.SSLContext | None, server_name: str | None) -> None:
        """Reload: the backend's probes speak HTTPS with ``tls`` from the next one on (None: HTTP)."""
        if tls is not None:
            self._tls[backend.id] = (tls, server_name or backend.host)
        else:
            self._tls.pop(backend.id, None)

    async def remove(self, backend_id: str) -> None:
        """Stop checking a backend (it left the configuration)."""
        task = self.forget(backend_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def forget(self, backend_id: str) -> asyncio.Task[None] | None:
        """Stop checking a backend at once; returns its cancelled probe task (to await, or not)."""
        self._checks.pop(backend_id, None)
        self._tls.pop(backend_id, None)
        task = self._tasks.pop(backend_id, None)
        if task is not None:
            task.cancel()
        return task

    def set_policy(self, backend: Backend, policy: HealthConfig) -> None:
        """New check settings (reload); the backend keeps its current health and counters."""
        entry = self._checks.get(backend.id)
        if entry is None:
            return
        _, _, tracker, wake = entry
        tracker.rise, tracker.fall = policy.rise, policy.fall
        self._checks[backend.id] = (backend, policy, tracker, wake)
        wake.set()

    def tracker(self, backend_id: str) -> HealthTracker | None:
        entry = self._checks.get(backend_id)
        return entry[2] if entry else None

    def is_checked(self, backend: Backend) -> bool:
        return backend.id in self._checks

    def policy(self, backend: Backend) -> HealthConfig:
        return self._checks[backend.id][1]

    def start_probation(self, backend: Backend) -> bool:
        """A passive ejection began: count ``rise`` passes in a row from now, probing at the fast
        interval, and tell the recovery listeners when they are done. False when ``backend`` has no
        active checks."""
        entry = self._checks.get(backend.id)
        if entry is None:
            return False
        _, _, tracker, wake = entry
        tracker.start_probation()
        wake.set()
        return True

    def require_rise(self, backend: Backend, reason: str) -> bool:
        """Unhealthy until ``rise`` checks in a row pass (a passive ejection ended); probe now.

        False when ``backend`` has no active checks (the caller readmits it some other way).
        """
        entry = self._checks.get(backend.id)
        if entry is None:
            return False
        _, _, tracker, wake = entry
        tracker.require_rise()
        self.registry.set_healthy(backend, False, reason)
        wake.set()
        return True

    def on_alive_changed(self, backend: Backend) -> None:
        """Supervisor news: a process exited or a new one accepts; reset and probe at once."""
        entry = self._checks.get(backend.id)
        if entry is None:
            return
        _, _, tracker, wake = entry
        if not backend.alive:
            tracker.reset()
            if backend.healthy:
                self.registry.set_healthy(backend, False, backend.reason or "process exited")
        wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
        for backend_id in self._checks:
            self._start_task(backend_id)

    def _start_task(self, backend_id: str) -> None:
        self._tasks[backend_id] = asyncio.get_running_loop().create_task(
            self._run(backend_id), name=f"health {backend_id}")

    async def _run(self, backend_id: str) -> None:
        backend, policy, tracker, wake = self._checks[backend_id]
        while True:
            policy = self._checks[backend_id][1]     # may change on reload
            if not backend.alive:
                wake.clear()
                await wake.wait()
                continue
            epoch = tracker.epoch
            ok, reason = await self.probe(backend, policy)
            if backend.alive and tracker.epoch == epoch:
                flip = tracker.record(ok)
                if flip is not None:
                    self._report(backend, flip, reason)
                elif tracker.end_probation():
                    for listener in self._recovery_listeners:
                        listener(backend)
            interval = policy.interval_s if tracker.is_settled else fast_interval_s(policy)
            if tracker.fresh:
                interval = min(interval, 0.1)  # a starting worker: admit it as soon as it answers
            wake.clear()
            try:
                async with asyncio.timeout(interval * (1.0 + JITTER * self._rand())):
                    await wake.wait()
            except TimeoutError:
                pass

    def _report(self, backend: Backend, healthy: bool, reason: str) -> None:
        if healthy:
            log.info("backend %s is up: health check passed (%s)", backend.id, reason)
            self.registry.set_healthy(backend, True, "")
            for listener in self._recovery_listeners:
                listener(backend)
        else:
            log.warning("backend %s is down: health check failed (%s)", backend.id, reason)
            self.registry.set_healthy(backend, False, f"health: {reason}")

    async def probe(self, backend: Backend, policy: HealthConfig) -> tuple[bool, str]:
        """One check: (passed, reason). Reason is the status, 'timeout' or the connect error."""
        assert self._session is not None
        tls = self._tls.get(backend.id)
        url = f"{'https' if tls else 'http'}://{backend.address}{policy.path}"
        extra: dict[str, Any] = {} if tls is None else {"ssl": tls[0], "server_hostname": tls[1]}
        try:
            async with asyncio.timeout(policy.timeout_s):
                async with self._session.get(url, allow_redirects=False, **extra) as response:
                    await response.read()
                    status = response.status
        except TimeoutError:
            return False, f"timeout after {policy.timeout_s:g}s"
        except aiohttp.ClientConnectorCertificateError as exc:
            return False, f"TLS ({exc.certificate_error.__class__.__name__}: {exc.certificate_error})"
        except aiohttp.ClientConnectorError as exc:
            return False, f"refused ({exc.os_error.strerror or exc.os_error})"
        except aiohttp.ClientError as exc:
            return False, f"error ({exc.__class__.__name__})"
        lo, hi = policy.expect
        return lo <= status <= hi, f"status {status}"

    async def aclose(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- slow start ------------------------------------------------------------------------------------

RAMP_STEPS = 10          # 10 %, 20 %, ... 100 %


def ramp_level(elapsed_s: float, slow_start_s: float) -> int:
    """Tenths of full weight ``elapsed_s`` after readmission: 1 at once, 10 from ``slow_start_s`` on."""
    if elapsed_s >= slow_start_s:
        return RAMP_STEPS
    return 1 + min(int(elapsed_s / slow_start_s * (RAMP_STEPS - 1)), RAMP_STEPS - 2)


def next_step_in(elapsed_s: float, slow_start_s: float) -> float:
    """Seconds from ``elapsed_s`` until :func:`ramp_level` next changes."""
    step = slow_start_s / (RAMP_STEPS - 1)
    return max((math.floor(elapsed_s / step) + 1) * step - elapsed_s, 0.0)


class SlowStart:
    """Ramps readmitted backends' effective weight; one task for all pools, idle when none ramps.

    A backend that joins a pool with no other ready backend is not ramped (it takes everything anyway,
    and holding back the only server helps nobody).
    """

    def __init__(self, registry: Registry, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self._clock = clock
        self._durations: dict[str, float] = {}          # pool name -> slow_start_s
        self._ramping: dict[Backend, float] = {}        # backend -> readmitted at (clock)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add_pool(self, backend_set: BackendSet, slow_start_s: float) -> None:
        if slow_start_s <= 0:
            return
        self._durations[backend_set.name] = slow_start_s
        backend_set.subscribe(self.on_readiness)

    @property
    def is_active(self) -> bool:
        """Some pool has slow start configured."""
        return bool(self._durations)

    def on_readiness(self, backend: Backend, is_ready: bool) -> None:
        if not is_ready:
            self._ramping.pop(backend, None)
            self.registry.reweigh(backend, float(backend.weight))
            return
        if self._task is None:
            return          # not started: backends coming up together at start-up are not ramped
        others = [b for b in self.registry.pool(backend.pool).ready if b is not backend]
        if not others:
            return
        log.info("backend %s: slow start, weight 10%% -> 100%% over %gs", backend.id,
                 self._durations[backend.pool])
        self._ramping[backend] = self._clock()
        self.registry.reweigh(backend, backend.weight / RAMP_STEPS)
        self._wake.set()

    def tick(self) -> float | None:
        """Apply every ramp's current level; seconds until the next step, None when nothing ramps."""
        now = self._clock()
        wait: float | None = None
        for backend, since in list(self._ramping.items()):
            duration = self._durations[backend.pool]
            elapsed = now - since
            level = ramp_level(elapsed, duration)
            self.registry.reweigh(backend, backend.weight * level / RAMP_STEPS)
            if level == RAMP_STEPS:
                del self._ramping[backend]
                log.info("backend %s: slow start done, full weight %d", backend.id, backend.weight)
                continue
            step = next_step_in(elapsed, duration)
            wait = step if wait is None else min(wait, step)
        return wait

    def start(self) -> None:
        if self.is_active and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="slow-start")

    async def _run(self) -> None:
        while True:
            wait = self.tick()
            self._wake.clear()
            if wait is None:
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait + 0.001):
                    await self._wake.wait()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def __repr__(self) -> str:
        return f"<SlowStart pools={sorted(self._durations)} ramping={[b.id for b in self._ramping]}>"
