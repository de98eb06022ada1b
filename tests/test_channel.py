"""The main process's channel to its proxy replicas: length-prefixed frames with a limit, and a
replica's backlog bounded when the channel is backed up."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any

import pytest

from balancer.control.replicas import FRAME, MAX_FRAME, ChannelError, frame, read_frame


async def feed_reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_frames_round_trip_and_end_cleanly() -> None:
    reader = await feed_reader(frame({"t": "state", "seq": 1}) + frame({"ack": 1}))
    assert await read_frame(reader) == {"t": "state", "seq": 1}
    assert await read_frame(reader) == {"ack": 1}
    assert await read_frame(reader) is None


async def test_a_frame_over_the_limit_or_cut_short_is_an_error_not_a_silent_stop() -> None:
    with pytest.raises(ChannelError, match="over"):
        await read_frame(await feed_reader(FRAME.pack(MAX_FRAME + 1) + b"{}"))
    with pytest.raises(ChannelError, match="inside a frame"):
        await read_frame(await feed_reader(FRAME.pack(10) + b"{}"))
    with pytest.raises(ChannelError, match="frame header"):
        await read_frame(await feed_reader(b"\x00\x00"))
    # A line of 200 KiB (a batch the old 64 KiB line limit refused) is one frame like any other.
    big = {"records": [["x" * 100] for _ in range(2000)]}
    assert await read_frame(await feed_reader(frame(big))) == big


async def test_a_failed_feed_is_logged_and_its_replica_killed_to_be_restarted(
        balancer_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    from balancer.control.replicas import ProxyProcesses, Replica
    balancer = await balancer_factory("listen: {host: 127.0.0.1, port: 0}\n"
                                      "pools: {web: {servers: [127.0.0.1:9]}}\n")
    processes = ProxyProcesses(balancer, 2, "<test>")
    replica = Replica(1)
    # A stand-in replica: a process that runs until it is killed (it waits on a stdin nobody writes).
    replica.process = await asyncio.create_subprocess_exec(sys.executable, "-c", "import sys; sys.stdin.read()",
                                                           stdin=asyncio.subprocess.PIPE)
    try:
        with caplog.at_level(logging.ERROR, logger="balancer.control.replicas"):
            feed = processes.watch_feed(replica, await feed_reader(frame({"in_flight": {}})
                                                                    + FRAME.pack(MAX_FRAME + 1)))
            await asyncio.gather(feed, return_exceptions=True)
            async with asyncio.timeout(5):
                code = await replica.process.wait()
        assert code == -9                                   # killed: its runner starts a new one
        assert "proxy process 1: its channel failed (ChannelError" in caplog.text
    finally:
        if replica.process.returncode is None:
            replica.process.kill()
            await replica.process.wait()


async def test_a_backed_up_replica_keeps_a_bounded_backlog_and_loses_no_count(balancer_factory: Any) -> None:
    """25,000 records before the first report: 20,000 are kept whole, the rest folded into counts."""
    from balancer.control.replicas import MAX_PENDING_RECORDS, ReplicaLink
    from balancer.dataplane.record import RequestRecord
    balancer = await balancer_factory("listen: {host: 127.0.0.1, port: 0}\n"
                                      "pools: {web: {servers: [127.0.0.1:9]}}\n")
    ours, theirs = socket.socketpair()
    link = ReplicaLink(balancer, theirs.detach(), lambda timeout: None, lambda: None)
    await link.start()
    try:
        for n in range(25_000):
            record = RequestRecord(1.0, 2.0, "GET", b"/", "127.0.0.1")
            record.pool, record.route, record.status, record.total_s = "web", "r", 200 + n % 2, 0.001
            for observer in balancer.proxy.observers:
                observer(record)
        reader, writer = await asyncio.open_connection(sock=ours)
        async with asyncio.timeout(5):
            message = await read_frame(reader)
            while message is not None and "records" not in message:
                message = await read_frame(reader)
        assert message is not None
        folded = sum(count for _, count in message.get("folded", ()))
        assert len(message["records"]) == MAX_PENDING_RECORDS
        assert len(message["records"]) + folded == 25_000
        assert len(message["folded"]) == 2                  # one per kind of request (status 200, 201)
        writer.close()
    finally:
        await link.aclose()
