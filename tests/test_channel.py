"""The main process's channel to its proxy replicas: length-prefixed frames with a limit, and a
replica's backlog bounded when the channel is backed up."""

from __future__ import annotations

import asyncio

import pytest

from balancer.control.replicas import FRAME, MAX_FRAME, ChannelError, frame, read_frame


async def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_frames_round_trip_and_end_cleanly() -> None:
    reader = await feed(frame({"t": "state", "seq": 1}) + frame({"ack": 1}))
    assert await read_frame(reader) == {"t": "state", "seq": 1}
    assert await read_frame(reader) == {"ack": 1}
    assert await read_frame(reader) is None


async def test_a_frame_over_the_limit_or_cut_short_is_an_error_not_a_silent_stop() -> None:
    with pytest.raises(ChannelError, match="over"):
        await read_frame(await feed(FRAME.pack(MAX_FRAME + 1) + b"{}"))
    with pytest.raises(ChannelError, match="inside a frame"):
        await read_frame(await feed(FRAME.pack(10) + b"{}"))
    with pytest.raises(ChannelError, match="frame header"):
        await read_frame(await feed(b"\x00\x00"))
    # A line of 200 KiB (a batch the old 64 KiB line limit refused) is one frame like any other.
    big = {"records": [["x" * 100] for _ in range(2000)]}
    assert await read_frame(await feed(frame(big))) == big
