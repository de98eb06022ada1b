"""Fault injection on a route (Envoy's fault filter): delay some requests, abort others.

``fault: {delay: {percent: 10, duration: 200ms}, abort: {percent: 1, status: 503}, headers: false}``.
With ``headers: true``, a client in ``trusted_proxies`` may ask for a fault on one request:
``X-Balancer-Fault-Delay: 250ms`` (at most 60 s) and ``X-Balancer-Fault-Abort: 503``. Injected faults
are counted apart (``/stats`` and ``/metrics``, kind ``delay`` or ``abort``), so a load test's results
can be read against them. A route without ``fault`` pays nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..config.models import FaultConfig
from .headers import RawHeaders

MAX_DELAY_S = 60.0
_DELAY_FIELD = b"x-balancer-fault-delay"
_ABORT_FIELD = b"x-balancer-fault-abort"


class Faults:
    """One route's faults: :meth:`pick` says what to do to one request."""

    __slots__ = ("_abort", "_abort_status", "_delay", "_delay_s", "_headers", "_random")

    def __init__(self, config: FaultConfig, rng: Callable[[], float] = random.random) -> None:
        self._delay = config.delay.percent / 100 if config.delay else 0.0
        self._delay_s = config.delay.duration_s if config.delay else 0.0
        self._abort = config.abort.percent / 100 if config.abort else 0.0
        self._abort_status = config.abort.status if config.abort else 503
        self._headers = config.headers
        self._random = rng

    def pick(self, headers: RawHeaders, trusted: bool) -> tuple[float, int]:
        """(seconds to delay, status to abort with or 0) for one request."""
        delay = self._delay_s if self._delay and self._random() < self._delay else 0.0
        abort = self._abort_status if self._abort and self._random() < self._abort else 0
        if self._headers and trusted:
            for name, value in headers:
                lowered = name.lower()
                if lowered == _DELAY_FIELD:
                    delay = _seconds(value)
                elif lowered == _ABORT_FIELD and value.isdigit() and 200 <= int(value) <= 599:
                    abort = int(value)
        return delay, abort


def _seconds(value: bytes) -> float:
    """``250ms``, ``1.5s`` or a bare number of milliseconds; 0 for anything else; at most 60 s."""
    text = value.strip().lower()
    try:
        if text.endswith(b"ms"):
            seconds = float(text[:-2]) / 1000
        elif text.endswith(b"s"):
            seconds = float(text[:-1])
        else:
            seconds = float(text) / 1000
    except ValueError:
        return 0.0
    return min(max(seconds, 0.0), MAX_DELAY_S) if seconds == seconds else 0.0
