"""How observations are shown: durations in milliseconds, wall times in ISO 8601 UTC."""

from __future__ import annotations

import time


def ms(seconds: float) -> float:
    """Seconds as milliseconds, to the microsecond."""
    return round(seconds * 1000, 3)


def iso_utc(wall: float) -> str:
    """A ``time.time()`` value as ``2026-12-06T07:01:02.345Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"
