"""A tunnel: after a 101 (WebSocket and other upgrades), bytes both ways until either side closes.

The tunnel owns both transports from the switch on; the two protocols only forward their events to
it. Buffers are bounded by the transports' own flow control: when one side's write buffer is over its
high-water mark, reading from the other side pauses until it drains, so a client flooding a tunnel
towards a slow backend holds at most two transport buffers. A tunnel with no byte either way for
``timeouts.tunnel_idle`` (HAProxy ``timeout tunnel``) is closed, both sides.
"""

from __future__ import annotations

import asyncio

from .deadlines import Deadlines

# After a close, buffered bytes get this long to reach a peer before the transports are aborted.
FLUSH_S = 5.0


class Tunnel:
    """Relay between a client transport and a backend transport. See the module docstring."""

    __slots__ = ("_backend", "_client", "_done", "_idle_s", "_loop", "_wheel", "bytes_down", "bytes_up",
                 "closed", "deadline", "deadline_slot")

    def __init__(self, client: asyncio.Transport, backend: asyncio.Transport, idle_s: float,
                 wheel: Deadlines, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._backend = backend
        self._idle_s = idle_s
        self._wheel = wheel
        self._loop = loop
        self._done: asyncio.Future[None] = loop.create_future()
        self.bytes_up = 0           # client -> backend
        self.bytes_down = 0         # backend -> client
        self.closed = False
        self.deadline = 0.0
        self.deadline_slot = 0
        wheel.arm(self, loop.time() + idle_s)

    # --- from the client's protocol ------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self.closed:
            return
        self.bytes_up += len(data)
        self._backend.write(data)
        self.deadline = self._loop.time() + self._idle_s     # later: the wheel re-files it lazily

    def client_pause_writing(self) -> None:
        if not self._backend.is_closing():
            self._backend.pause_reading()

    def client_resume_writing(self) -> None:
        if not self._backend.is_closing():
            self._backend.resume_reading()

    def client_closed(self) -> None:
        self.close()

    # --- from the backend's protocol -----------------------------------------------------------------

    def backend_data(self, data: bytes) -> None:
        if self.closed:
            return
        self.bytes_down += len(data)
        self._client.write(data)
        self.deadline = self._loop.time() + self._idle_s

    def backend_pause_writing(self) -> None:
        if not self._client.is_closing():
            self._client.pause_reading()

    def backend_resume_writing(self) -> None:
        if not self._client.is_closing():
            self._client.resume_reading()

    def backend_closed(self) -> None:
        self.close()

    # --- lifetime ------------------------------------------------------------------------------------

    def deadline_passed(self, now: float) -> None:
        self.close()

    def close(self) -> None:
        """Close both sides; idempotent. What was written is flushed first, for at most
        :data:`FLUSH_S`: a peer that reads nothing more does not hold the transports open."""
        if self.closed:
            return
        self.closed = True
        self._wheel.disarm(self)
        self._client.close()
        self._backend.close()
        self._loop.call_later(FLUSH_S, self._abort)
        if not self._done.done():
            self._done.set_result(None)

    def _abort(self) -> None:
        self._client.abort()
        self._backend.abort()

    async def wait(self) -> None:
        """Until the tunnel is closed."""
        await self._done

    def __repr__(self) -> str:
        return f"<Tunnel up={self.bytes_up} down={self.bytes_down}{' closed' if self.closed else ''}>"
