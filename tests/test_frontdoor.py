"""The front door's connection protocol driven directly, with a transport that records what it is
told: the orderings a socket test cannot force (what arrives before the handler runs)."""

from __future__ import annotations

import asyncio
from typing import Any

from balancer.config.models import ClientTimeoutsConfig, LimitsConfig
from balancer.dataplane.frontdoor import BODY_HIGH_WATER, ClientConnection, Exchange, FrontDoor
from tests.test_upstream import ReadingTransport


class RecordingTransport(ReadingTransport):
    """Records reading paused or not (ReadingTransport), and what is written and whether closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default


def door(handler: Any) -> tuple[FrontDoor, ClientConnection, RecordingTransport]:
    front = FrontDoor(handler, LimitsConfig(), ClientTimeoutsConfig())
    conn: Any = front()
    transport = RecordingTransport()
    conn.connection_made(transport)
    return front, conn, transport


async def until(predicate: Any) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_an_unread_complete_body_does_not_leave_reading_paused() -> None:
    """A body that went over the buffer's high-water mark and completed before the handler ran, then
    answered without being read: the keep-alive connection reads again (it stalled until client_idle)."""
    async def not_found(exchange: Exchange) -> None:
        exchange.send_error(404, "no_route")

    _, conn, transport = door(not_found)
    body = b"p" * (BODY_HIGH_WATER + 50_000)
    conn.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:200_000])
    conn.data_received(body[200_000:])          # complete, and over the mark: reading paused
    assert not transport.reading
    await until(lambda: b"404" in transport.written)
    assert transport.reading and not transport.closed


async def test_no_next_response_while_the_client_reads_nothing() -> None:
    """Pipelined requests answered whole: while the client's transport is over its high-water mark,
    the next request is not served (the write buffer holds one response, not all of them)."""
    served: list[bytes] = []

    async def answer(exchange: Exchange) -> None:
        served.append(exchange.target)
        exchange.send_whole(200, b"OK", b"", b"x" * 1000)
        if len(served) == 1:
            exchange.conn.pause_writing()       # what the transport says once its buffer is full

    _, conn, _transport = door(answer)
    conn.data_received(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    await until(lambda: served == [b"/1"])
    for _ in range(10):
        await asyncio.sleep(0.005)
    assert served == [b"/1"]
    conn.resume_writing()
    await until(lambda: served == [b"/1", b"/2"])
