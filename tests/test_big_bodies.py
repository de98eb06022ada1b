"""Large bodies stream through a real balancer process without growing its memory."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import wait_until

SIZE = 64 << 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_64_mib_each_way_with_flat_rss(balancer_process: Any) -> None:
    """64 MiB down and up arrive intact while balancer's RSS stays under 100 MiB."""
    proc = balancer_process("listen: {host: 127.0.0.1, port: 0}\n"
                            "pools: {web: {spawn: {command: [python, -m, backends], count: 1}}}\n")

    def port() -> int | None:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", proc.log())
        return int(found.group(1)) if found else None

    url = f"http://127.0.0.1:{wait_until(port, timeout=20, message='listening')}"
    peak = 0.0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(proc.proc.pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            received = 0
            async with session.get(f"{url}/bytes/{SIZE}") as resp:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    received += len(chunk)
            assert received == SIZE
            piece = bytes(range(256)) * 4096
            digest = hashlib.sha256(piece * 64).hexdigest()

            async def body() -> AsyncIterator[bytes]:
                for _ in range(64):
                    yield piece

            async with session.post(f"{url}/echo", data=body()) as resp:
                echo = await resp.json()
            assert echo["body_length"] == SIZE and echo["body_sha256"] == digest
    finally:
        sampler.cancel()
    assert 0 < peak < 100, f"peak RSS {peak:.1f} MiB"


async def test_slow_reader_is_not_buffered(balancer_process: Any) -> None:
    """A client that stops reading a 256 MiB response does not make balancer hold it: the backend is
    paused (backpressure end to end) and balancer's RSS stays under 100 MiB."""
    proc = balancer_process("listen: {host: 127.0.0.1, port: 0}\n"
                            "pools: {web: {spawn: {command: [python, -m, backends], count: 1}}}\n")

    def port() -> int | None:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", proc.log())
        return int(found.group(1)) if found else None

    data_port = wait_until(port, timeout=20, message="listening")
    reader, writer = await asyncio.open_connection("127.0.0.1", data_port, limit=1 << 16)
    writer.write(b"GET /bytes/268435456 HTTP/1.1\r\nHost: h\r\n\r\n")
    await reader.readexactly(1 << 20)
    peak = 0.0
    deadline = asyncio.get_running_loop().time() + 1.5
    while asyncio.get_running_loop().time() < deadline:     # not reading: that is the test
        peak = max(peak, rss_mib(proc.proc.pid))
        await asyncio.sleep(0.05)
    got = 1 << 20
    async with asyncio.timeout(60):
        while got < 268435456:
            chunk = await reader.read(1 << 20)
            assert chunk
            got += len(chunk)
    writer.close()
    assert peak < 100, f"peak RSS {peak:.1f} MiB while the client was not reading"
