"""A bounded load generator for fault and reload tests: concurrent keep-alive GET loops."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp


class Load:
    """N concurrent GET loops against ``url`` until ``stop()``; bounded by ``max_requests`` each.

    Records every request's (start, latency, outcome) so a test can ask for the p99 of a window.
    """

    def __init__(self, url: str, concurrency: int = 4, max_requests: int = 100_000,
                 timeout_s: float = 30.0) -> None:
        self.url = url
        self.ok = 0
        self.failures: Counter[str] = Counter()
        self.backends: Counter[str] = Counter()
        self.samples: list[tuple[float, float, bool]] = []
        self._max = max_requests
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(concurrency)]

    @property
    def sent(self) -> int:
        return len(self.samples)

    async def _loop(self) -> None:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            for _ in range(self._max):
                if self._stop.is_set():
                    return
                started = time.monotonic()
                ok = False
                try:
                    async with session.get(self.url) as resp:
                        await resp.read()
                        if resp.status == 200:
                            ok = True
                            self.ok += 1
                            self.backends[resp.headers.get("X-Backend", "?")] += 1
                        else:
                            self.failures[f"status {resp.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.failures[type(exc).__name__] += 1
                    if self._stop.is_set():
                        return
                self.samples.append((started, time.monotonic() - started, ok))

    def p99_ms(self, since: float = 0.0, until: float = float("inf")) -> float:
        window = sorted(lat for start, lat, _ in self.samples if since <= start <= until)
        if not window:
            return 0.0
        return 1000 * window[min(len(window) - 1, int(len(window) * 0.99))]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
