"""The timing wheel every data-plane wait is armed on."""

from __future__ import annotations

import asyncio

import pytest

from balancer.dataplane.deadlines import Deadlines


class Member:
    def __init__(self, fail: bool = False) -> None:
        self.deadline = 0.0
        self.deadline_slot = 0
        self.fired = 0
        self.fail = fail

    def deadline_passed(self, now: float) -> None:
        self.fired += 1
        if self.fail:
            raise RuntimeError("a bug in one member")


async def test_one_failing_member_stops_no_other_deadline(caplog: pytest.LogCaptureFixture) -> None:
    """A member whose deadline_passed raises is logged; the others in its slot still fire, and the
    wheel keeps ticking for later deadlines."""
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop)
    now = loop.time()
    bad, good, later = Member(fail=True), Member(), Member()
    wheel.arm(bad, now + 0.01)
    wheel.arm(good, now + 0.01)
    wheel.arm(later, now + 0.3)
    for _ in range(100):
        if later.fired:
            break
        await asyncio.sleep(0.01)
    assert (bad.fired, good.fired, later.fired) == (1, 1, 1)
    assert "deadline of" in caplog.text


async def test_a_later_deadline_is_found_again_not_fired_early() -> None:
    """Moving a deadline later is an attribute write: the member fires at the new time, once."""
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop)
    member = Member()
    started = loop.time()
    wheel.arm(member, started + 0.05)
    member.deadline = started + 0.3              # later, without telling the wheel
    for _ in range(100):
        if member.fired:
            break
        await asyncio.sleep(0.01)
    assert member.fired == 1 and loop.time() - started >= 0.3


async def test_disarmed_slots_hold_no_memory() -> None:
    """Waits armed and disarmed in many slots leave no emptied sets behind (a set never shrinks: kept
    for the whole idle horizon they grew RSS by 2 MB every 5 s under load), and each slot is on the
    heap once however often it is re-created."""
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop)
    now = loop.time()
    members = [Member() for _ in range(300)]
    for _ in range(3):
        for i, member in enumerate(members):
            wheel.arm(member, now + 60 + (i % 30) * Deadlines.TICK_S)
        for member in members:
            wheel.disarm(member)
    assert wheel._slots == {}
    assert len(wheel._due) == len(set(wheel._due)) == 30
