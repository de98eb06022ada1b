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
    listener = await Listener.open(counting, "127.0.0.1", 0)
    calls: list[int] = []
    accept = listener._accept

    def counted(sock: socket.socket) -> None:
        before = len(listener._attaching) + len(counting.made)
        accept(sock)
        calls.append(len(listener._attaching) + len(counting.made) - before)

    listener._accept = counted  # type: ignore[method-assign,assignment]
    listener._loop.remove_reader(listener.sockets[0].fileno())
    listener._loop.add_reader(listener.sockets[0].fileno(), listener._accept, listener.sockets[0])
    # The kernel completes these handshakes without us: all 50 wait in the accept queue.
    clients = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(50)]
    try:
        await async_wait_until(lambda: len(counting.made) == 50, timeout=5, message="all connected")
        assert [n for n in calls if n] == [50]      # one readiness, every waiting connection
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
