"""One upstream connection's parser paths, fed byte by byte: heads split anywhere, large bodies taken
past the parser, HEAD responses, chunked bodies and trailers, bytes beyond a response."""

from __future__ import annotations

import asyncio
import time

import pytest

from balancer.dataplane.deadlines import Deadlines, deadlines
from balancer.dataplane.upstream import HIGH_WATER, PASSTHROUGH_MIN, UpstreamConnection
from balancer.errors import UpstreamReadTimeout, UpstreamResponseTimeout


def connection(expect_no_body: bool = False) -> UpstreamConnection:
    """A connection with a request sent (to a transport that writes nowhere), awaiting its response."""
    conn = UpstreamConnection("127.0.0.1:9")
    conn.transport = ReadingTransport()
    conn.mark_active()
    conn.begin(b"GET / HTTP/1.1\r\n\r\n", expect_no_body, [])
    return conn


class ReadingTransport(asyncio.Transport):
    """Records whether reading is paused; writes go nowhere."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass


def feed(conn: UpstreamConnection, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        conn.data_received(data[i:i + step])


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000, 1 << 20])
async def test_large_body_split_anywhere_arrives_whole(step: int) -> None:
    """A >= 64 KiB Content-Length body (taken past llhttp) is exact however the bytes are cut."""
    body = bytes(range(256)) * (PASSTHROUGH_MIN // 256 + 3)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-A: b\r\n\r\n" % len(body) + body
    conn = connection()
    feed(conn, response, step)
    head = await conn.read_head(1.0)
    assert head.status == 200 and head.content_length == len(body) and (b"X-A", b"b") in head.headers
    got = b""
    while chunk := await conn.read_body(1.0):
        got += chunk
    assert got == body and conn.is_reusable


@pytest.mark.parametrize("step", [1, 5, 1000])
async def test_head_response_ends_at_its_head(step: int) -> None:
    """A HEAD response's Content-Length does not make us wait for a body; the connection is reusable."""
    conn = connection(expect_no_body=True)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", step)
    head = await conn.read_head(1.0)
    assert head.content_length == 5000 and conn.response_complete and conn.is_reusable


async def test_bytes_after_a_head_response_forbid_reuse() -> None:
    """Anything after a HEAD response's head means a confused backend: never reused."""
    conn = connection(expect_no_body=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    await conn.read_head(1.0)
    assert conn.response_complete and not conn.is_reusable


async def test_more_body_than_announced_forbids_reuse() -> None:
    """A large body followed by extra bytes is cut at Content-Length and the connection not reused."""
    body = b"x" * PASSTHROUGH_MIN
    conn = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body + b"junk")
    await conn.read_head(1.0)
    assert conn.take_body() == body and not conn.is_reusable


@pytest.mark.parametrize("step", [1, 4, 1000])
async def test_chunked_body_and_trailers(step: int) -> None:
    """A chunked body is de-chunked; trailer fields are kept apart from the head's fields."""
    conn = connection()
    feed(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n"
               b"X-Sum: 9\r\n\r\n", step)
    head = await conn.read_head(1.0)
    got = b""
    while chunk := await conn.read_body(1.0):
        got += chunk
    assert head.chunked and got == b"abcde" and conn.trailers == [(b"X-Sum", b"9")]
    assert all(name != b"X-Sum" for name, _ in head.headers) and conn.is_reusable


async def test_interim_then_large_final_response() -> None:
    """A 103 before a large final response: the final head and body come through intact."""
    body = b"y" * (PASSTHROUGH_MIN + 10)
    conn = connection()
    feed(conn, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
         % len(body) + body, 1000)
    head = await conn.read_head(1.0)
    got = b""
    while chunk := await conn.read_body(1.0):
        got += chunk
    assert head.status == 200 and got == body


async def test_connection_reused_after_head_and_large_bodies() -> None:
    """After a stopped parser (HEAD, large body) the next response on the connection parses normally."""
    conn = connection(expect_no_body=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    await conn.read_head(1.0)
    big = b"z" * PASSTHROUGH_MIN
    for response, expect_no_body, body in (
            (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big, False, big),
            (b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", False, b"ok")):
        conn.mark_idle()
        conn.mark_active()
        conn.begin(b"GET / HTTP/1.1\r\n\r\n", expect_no_body, [])
        conn.data_received(response)
        await conn.read_head(1.0)
        assert conn.take_body() == body and conn.is_reusable


async def test_read_timeouts_fire_from_the_shared_deadline_sweep() -> None:
    """No head within the response timeout: UpstreamResponseTimeout, about on time (one tick late at
    most); a gap in the body longer than the read timeout: UpstreamReadTimeout; a connection that
    answers in time is not touched by the sweep."""
    slow = connection()
    quick = connection()
    started = time.monotonic()
    waiting = asyncio.ensure_future(quick.read_head(5.0))
    with pytest.raises(UpstreamResponseTimeout):
        await slow.read_head(0.2)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 0.2 + Deadlines.TICK_S + 0.5
    assert not waiting.done()
    feed(quick, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", 1000)
    assert (await waiting).status == 200
    assert await quick.read_body(1.0) == b"hello"
    with pytest.raises(UpstreamReadTimeout):
        await quick.read_body(0.1)
    assert not any(deadlines(asyncio.get_running_loop())._slots.values())   # nothing left waiting


async def test_long_waits_sit_in_their_own_slot_until_due() -> None:
    """A thousand waits of 60 s and one of 0.1 s: the short one fires, the others stay untouched."""
    wheel = deadlines(asyncio.get_running_loop())
    long_waits = [asyncio.ensure_future(connection().read_head(60.0)) for _ in range(1000)]
    with pytest.raises(UpstreamResponseTimeout):
        await connection().read_head(0.1)
    assert not any(w.done() for w in long_waits)
    assert sum(len(s) for s in wheel._slots.values()) == 1000
    for w in long_waits:
        w.cancel()
    await asyncio.gather(*long_waits, return_exceptions=True)
    # An ended wait is not taken out of the wheel (lazy): it lapses unheard when its slot is due.
    assert len(wheel._due) == len(set(wheel._due))  # one heap entry per slot, however many waits


async def test_a_whole_body_over_the_high_water_mark_resumes_reading_when_taken() -> None:
    """A body over HIGH_WATER that arrives complete pauses reading from the backend; taking it whole
    (the proxy's way for a complete response) resumes it. Left paused, the pooled connection never
    saw its next response: the next request on it got a 504."""
    conn = connection()
    transport = ReadingTransport()
    conn.transport = transport
    body = b"x" * (HIGH_WATER + 1000)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                       % (len(body), body))
    await conn.read_head(1.0)
    assert conn.response_complete and conn.is_reusable and not transport.reading
    assert conn.take_body() == body and transport.reading
    conn.mark_idle()
    conn.mark_active()
    conn.begin(b"GET / HTTP/1.1\r\n\r\n", False, [])
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert (await conn.read_head(1.0)).status == 200 and conn.take_body() == b"ok" and transport.reading
