"""A log that says each kind of thing at most once a second, with how many were left out.

For what a flood can cause at thousands a second: a dead pool answering 503s, clients failing their
TLS handshakes. The log must not turn into the bottleneck, or into the attacker's disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledLog:
    """At most one line per second per kind, at ``level``, with how many were left out."""

    __slots__ = ("_clock", "_last", "_level", "_logger", "_suppressed")

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic,
                 level: int = logging.WARNING) -> None:
        self._logger = logger
        self._level = level
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._clock = clock

    def log(self, kind: str, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._last.get(kind, -1e9) < 1.0:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        left_out = self._suppressed.pop(kind, 0)
        if left_out:
            msg += f" (and {left_out} more like it in the last second)"
        self._logger.log(self._level, msg, *args)
