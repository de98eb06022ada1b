"""`python -m backends --port N [--host H] [--id NAME] [--keepalive-timeout S] [KNOBS]`: run one worker.

The order below is the point of this file: parent-death detection is armed before anything slow is
imported, because every millisecond before the prctl call is a window in which balancer could die
unnoticed (see backends.parent).
"""

import signal
import sys
from types import FrameType

from backends.parent import arm_parent_death_signal, expected_parent_pid, is_orphaned


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    # Until the event loop installs the real handlers, a stop request during start-up is still a
    # normal stop: exit 0, not the default "killed by SIGTERM" nor a KeyboardInterrupt traceback.
    raise SystemExit(0)


signal.signal(signal.SIGTERM, _exit_quietly)
signal.signal(signal.SIGINT, _exit_quietly)

_parent_pid = expected_parent_pid()
arm_parent_death_signal(signal.SIGTERM)
if is_orphaned(_parent_pid):
    # The parent died before the kernel was told to notify us: nobody will ever stop us.
    print(f"backends: parent {_parent_pid} died during start-up; exiting", file=sys.stderr)
    raise SystemExit(0)

from backends.worker import main  # noqa: E402  (deliberately after arming, see the docstring)

raise SystemExit(main(parent_pid=_parent_pid))
