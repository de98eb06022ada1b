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
