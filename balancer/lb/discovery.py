"""DNS service discovery: a pool's backends are the addresses a name resolves to.

``pools.NAME.discovery: {dns: NAME, port: 8080, type: a, interval: 10s, resolvers: [...]}`` -- a
Kubernetes headless Service's name has one A (or AAAA) record per ready pod; with ``type: srv`` the
SRV records give the targets and ports, and each target's addresses are looked up in turn.

One task per pool, on aiodns (c-ares: asynchronous, never blocking the loop). It re-resolves every
``interval``, sooner when the records' TTL is shorter (but not more often than once a second), and
hands the owner the new set of ``(address, port)`` when it changed; the owner adds new backends
(health-checked before they take traffic) and drains vanished ones, as a reload does. A failed or
empty answer keeps the last good set: DNS trouble never empties a pool. Errors are logged once per
change of error, not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import aiodns

from ..config.models import DiscoveryConfig

log = logging.getLogger(__name__)

MIN_WAIT_S = 1.0
QUERY_TIMEOUT_S = 5.0

Addresses = frozenset[tuple[str, int]]


class DnsDiscovery:
    """Keeps one pool's addresses in line with DNS; the owner calls :meth:`start` and :meth:`aclose`."""

    def __init__(self, pool: str, config: DiscoveryConfig, on_change: Callable[[Addresses], None], *,
                 resolver: Any = None, wall: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.config = config
        self._on_change = on_change
        self._resolver = resolver         # made in start(), inside the running loop
        self._wall = wall
        self.addresses: Addresses = frozenset()
        self.last_answer_at: float | None = None
        self.last_error = ""
        self.resolutions = 0
        self.first = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._resolver is None:
            self._resolver = aiodns.DNSResolver(nameservers=list(self.config.resolvers) or None)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"discovery {self.pool}")

    async def _run(self) -> None:
        while True:
            wait = self.config.interval_s
            try:
                async with asyncio.timeout(QUERY_TIMEOUT_S):
                    found, ttl = await self.resolve()
            except (aiodns.error.DNSError, TimeoutError, OSError) as exc:
                self._failed(exc.args[1] if isinstance(exc, aiodns.error.DNSError) and len(exc.args) > 1
                             else str(exc) or exc.__class__.__name__)
            else:
                if not found:
                    self._failed("empty answer")
                else:
                    self._answered(found)
                    if ttl is not None:
                        wait = min(wait, max(float(ttl), MIN_WAIT_S))
            self.first.set()
            await asyncio.sleep(wait)

    async def resolve(self) -> tuple[Addresses, int | None]:
        """The addresses the name resolves to now, and the smallest TTL seen."""
        config = self.config
        ttls: list[int] = []
        if config.type == "srv":
            targets: list[tuple[str, int]] = []
            answer = await self._resolver.query_dns(config.dns, "SRV")
            for record in answer.answer:
                data: Any = record.data
                ttls.append(record.ttl)
                targets.append((data.target, data.port))
            found: set[tuple[str, int]] = set()
            for target, port in targets:
                for address, ttl in await self._addresses(target):
                    ttls.append(ttl)
                    found.add((address, port))
        else:
            found = set()
            for address, ttl in await self._addresses(config.dns):
                ttls.append(ttl)
                found.add((address, config.port))
        return frozenset(found), min(ttls) if ttls else None

    async def _addresses(self, name: str) -> list[tuple[str, int]]:
        """A and AAAA records of ``name``; an IP address is itself."""
        with contextlib.suppress(OSError):
            socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
            return [(name, 0)]
        found: list[tuple[str, int]] = []
        error: aiodns.error.DNSError | None = None
        for kind in ("A", "AAAA"):
            try:
                answer = await self._resolver.query_dns(name, kind)
            except aiodns.error.DNSError as exc:
                error = error or exc
                continue
            found += [(_address(record.data), record.ttl) for record in answer.answer]
        if not found and error is not None:
            raise error
        return found

    def _answered(self, found: Addresses) -> None:
        self.resolutions += 1
        self.last_answer_at = self._wall()
        if self.last_error:
            log.info("discovery of %s (%s): answering again", self.pool, self.config.dns)
            self.last_error = ""
        if found != self.addresses:
            added, gone = found - self.addresses, self.addresses - found
            log.info("discovery of %s (%s): %d addresses (+%d, -%d)", self.pool, self.config.dns,
                     len(found), len(added), len(gone))
            self.addresses = found
            self._on_change(found)

    def _failed(self, why: str) -> None:
        if why != self.last_error:
            log.warning("discovery of %s (%s) failed: %s; keeping the last %d addresses", self.pool,
                        self.config.dns, why, len(self.addresses))
            self.last_error = why

    def snapshot(self) -> dict[str, object]:
        return {"dns": self.config.dns, "type": self.config.type,
                "addresses": sorted(f"{host}:{port}" for host, port in self.addresses),
                "last_answer_at": self.last_answer_at, "last_error": self.last_error,
                "resolutions": self.resolutions}

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._resolver is not None and hasattr(self._resolver, "close"):
            await self._resolver.close()


def _address(data: Any) -> str:
    """An A or AAAA record's address (the c-ares stubs type record data as a union of every kind)."""
    return str(data.addr)
