"""Every wait of the data plane has a deadline; this is the one clock that enforces them all.

Theory of operation
-------------------
A timing wheel of ``TICK_S`` slots per event loop. A member (a client connection, a request body, an
upstream connection, a tunnel) has a ``deadline`` (loop time) and the ``deadline_slot`` it sits in;
when its slot is due the wheel calls ``deadline_passed(now)``. Each tick takes only the slots that are
due (a heap of slot numbers), so ten thousand idle connections cost nothing until they are due.

Moving a deadline **later** costs one attribute write: the member stays in its earlier slot and, when
that slot is due, the wheel sees the later deadline and files the member again. Only moving it
**earlier** (a keep-alive connection whose next request has started: idle 75 s -> head 10 s) moves it
between slots. A wait that ends is not taken out either (lazy): the member's ``deadline_passed`` finds
nothing waiting and does nothing. So the usual request, whose every deadline is later than the one
before, costs the wheel no set operation at all (they were 5 % of the interpreted build's samples,
py-spy, 2026-12-06); ``disarm`` is for a member that goes away (a closed connection). Measured when
the upstream side first used a wheel (2026-11, ``bench/run.sh``): uvloop's ``call_later`` plus
``cancel`` cost about 1.8 µs per wait, a set insertion and removal 40 ns.

A deadline fires up to one tick late.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import weakref
from typing import ClassVar, Protocol

log = logging.getLogger(__name__)


class Timed(Protocol):
    """What the wheel needs of a member."""

    deadline: float          # loop time; the member's own business what it means
    deadline_slot: int       # 0 = not in the wheel; owned by the wheel

    def deadline_passed(self, now: float) -> None: ...


class Deadlines:
    """The timing wheel of one event loop. See the module docstring."""

    TICK_S: ClassVar[float] = 0.05

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, set[Timed]] = {}
        self._due: list[int] = []       # heap of slot numbers, each once (``_queued``)
        self._queued: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, member: Timed, when: float) -> None:
        """``member.deadline_passed`` runs once loop time passes ``when`` (unless re-armed or disarmed)."""
        member.deadline = when
        slot = int(when / self.TICK_S) + 1
        current = member.deadline_slot
        if current:
            if slot >= current:
                return                  # later: found again when its current slot is due
            self._remove(member, current)
        self._add(member, slot)

    def disarm(self, member: Timed) -> None:
        current = member.deadline_slot
        if current:
            self._remove(member, current)
            member.deadline_slot = 0

    def _add(self, member: Timed, slot: int) -> None:
        waiting = self._slots.get(slot)
        if waiting is None:
            waiting = self._slots[slot] = set()
            if slot not in self._queued:
                self._queued.add(slot)
                heapq.heappush(self._due, slot)
        waiting.add(member)
        member.deadline_slot = slot
        if self._timer is None:
            self._timer = self._loop.call_later(self.TICK_S, self._tick)

    def _remove(self, member: Timed, slot: int) -> None:
        # An emptied slot's set is dropped at once (a set never shrinks: a slot that held a few
        # hundred connections for a moment kept their table for the whole 75 s horizon, measured
        # 2026-12-06 as RSS growing 2 MB every 5 s at 256 connections until it plateaued). Its
        # number stays on the heap, once, until due: re-creating the slot pushes nothing.
        waiting = self._slots.get(slot)
        if waiting is not None:
            waiting.discard(member)
            if not waiting:
                del self._slots[slot]

    def _tick(self) -> None:
        now = self._loop.time()
        now_slot = int(now / self.TICK_S)
        due = self._due
        self._timer = None
        try:
            while due and due[0] <= now_slot:
                slot = heapq.heappop(due)
                self._queued.discard(slot)
                for member in self._slots.pop(slot, ()):
                    member.deadline_slot = 0
                    if member.deadline > now:
                        self._add(member, int(member.deadline / self.TICK_S) + 1)
                        continue
                    try:
                        member.deadline_passed(now)
                    except Exception:       # one member's bug must not stop every other deadline
                        log.exception("deadline of %r failed", member)
        finally:
            if self._slots and self._timer is None:
                self._timer = self._loop.call_later(self.TICK_S, self._tick)


_WHEELS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = weakref.WeakKeyDictionary()


def deadlines(loop: asyncio.AbstractEventLoop) -> Deadlines:
    """The :class:`Deadlines` of ``loop``."""
    found = _WHEELS.get(loop)
    if found is None:
        found = _WHEELS[loop] = Deadlines(loop)
    return found
