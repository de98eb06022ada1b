"""balancer.dataplane.listener: every waiting connection accepted per readiness, resource errors pause."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any, ClassVar

import pytest

from balancer.dataplane.listener import Listener
from tests.conftest import async_wait_until


class Counting(asyncio.Protocol):
    made: ClassVar[list[Counting]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        Counting.made.append(self)


@pytest.fixture
def counting() -> Any:
    Counting.made = []
    yield Counting
    for proto in Counting.made:
        proto.transport.close()


async def test_a_burst_of_connections_is_accepted_in_one_go(counting: Any) -> None:
    """50 connections waiting in the accept queue are all taken in one event-loop turn (the factory is
    called 50 times before a callback scheduled at the first call can run)."""
    loop = asyncio.get_running_loop()
    turn = [0]
    turns: list[int] = []

    def factory() -> asyncio.Protocol:
        if not turns or turns[-1] != turn[0]:   # the first call of this turn
            loop.call_soon(lambda: turn.__setitem__(0, turn[0] + 1))
        turns.append(turn[0])
        return counting()

    listener = await Listener.open(factory, "127.0.0.1", 0)
    # The kernel completes these handshakes without us: all 50 wait in the accept queue.
    clients = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(50)]
    try:
        await async_wait_until(lambda: len(counting.made) == 50, timeout=5, message="all connected")
        assert len(turns) == 50 and set(turns) == {0}     # one readiness, every waiting connection
    finally:
        listener.close()
        for c in clients:
            c.close()


async def test_out_of_descriptors_pauses_then_resumes(counting: Any, monkeypatch: Any) -> None:
    listener = await Listener.open(counting, "127.0.0.1", 0)
    monkeypatch.setattr(Listener, "RETRY_DELAY_S", 0.05)
    real = socket.socket.accept
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def accept(self: socket.socket) -> Any:
        if failures:
            raise failures.pop()
        return real(self)

    monkeypatch.setattr(socket.socket, "accept", accept)
    client = socket.create_connection(("127.0.0.1", listener.port))
    try:
        await async_wait_until(lambda: len(counting.made) == 1, timeout=5, message="accepted after pause")
        assert not failures
    finally:
        listener.close()
        client.close()


async def test_close_stops_accepting_but_keeps_open_connections(counting: Any) -> None:
    listener = await Listener.open(counting, "127.0.0.1", 0)
    port = listener.port
    client = socket.create_connection(("127.0.0.1", port))
    await async_wait_until(lambda: len(counting.made) == 1, timeout=5, message="accepted")
    listener.close()
    listener.close()                                 # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    assert not counting.made[0].transport.is_closing()
    client.close()


async def test_every_address_listens_on_the_same_chosen_port(counting: Any) -> None:
    """Port 0 on a name with several addresses (localhost: 127.0.0.1 and maybe ::1): one port for all."""
    listener = await Listener.open(counting, "localhost", 0)
    try:
        assert len({s.getsockname()[1] for s in listener.sockets}) == 1
    finally:
        listener.close()
