"""Parent-death detection: a worker must not outlive the balancer that spawned it.

Theory of operation. If balancer is SIGKILLed (or crashes) it cannot stop its workers, and orphaned
workers would keep their ports forever. Two mechanisms, because neither suffices alone:

1. Linux `prctl(PR_SET_PDEATHSIG, SIGTERM)`: the kernel sends us SIGTERM when the parent dies, which
   takes the normal graceful-stop path. It is armed only from the moment of the call, so a parent that
   died between our fork and the call is missed ("the classic race"); hence the `getppid()` check
   right after arming. Caveat: the signal fires when the *thread* that forked us exits, so a spawner
   must fork from a long-lived thread (asyncio's subprocess support does, from the loop thread).
2. Everywhere: a task polling `getppid()` (`watch_parent`). Orphans are re-parented (to init or a
   subreaper), so a changed parent pid means ours is gone.

Which pid counts as "our parent" is read as early as possible: BALANCER_PARENT_PID if the spawner set
it (this closes the race completely: a spawner that died even before our interpreter started is then
detected), else `getppid()` at import of this module, before aiohttp's slow imports widen the window.

This module imports only the standard library so `__main__` can arm it before anything else.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_INTERVAL_S = 0.5


def expected_parent_pid() -> int:
    """The pid of the process that spawned us: BALANCER_PARENT_PID if set and valid, else getppid()."""
    try:
        return int(os.environ["BALANCER_PARENT_PID"])
    except (KeyError, ValueError):
        return os.getppid()


def arm_parent_death_signal(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` when our parent dies. Returns False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # prctl is variadic and reads its arguments as unsigned long: pass them at that width.
        result = libc.prctl(
            ctypes.c_int(PR_SET_PDEATHSIG),
            ctypes.c_ulong(sig),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    except (OSError, AttributeError) as exc:  # no libc / no prctl symbol: the polling fallback remains
        logger.warning("prctl unavailable (%s); relying on polling for parent death", exc)
        return False
    if result != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def is_orphaned(parent_pid: int, getppid: Callable[[], int] = os.getppid) -> bool:
    return getppid() != parent_pid


async def watch_parent(
    parent_pid: int,
    on_orphaned: Callable[[], None],
    *,
    interval_s: float = POLL_INTERVAL_S,
    getppid: Callable[[], int] = os.getppid,
) -> None:
    """Call `on_orphaned` once, as soon as a poll finds our parent is no longer `parent_pid`."""
    # Polling is the point: no event or file descriptor reports a change of parent portably.
    while not is_orphaned(parent_pid, getppid):  # noqa: ASYNC110
        await asyncio.sleep(interval_s)
    logger.info("parent %d is gone; stopping", parent_pid)
    on_orphaned()
