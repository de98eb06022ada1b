#!/usr/bin/env python3
"""Large bodies through balancer with flat memory (issue: HTTP correctness).

Starts balancer (this checkout's .venv) with one spawned worker, then downloads N bytes from the
worker's /bytes/N and uploads N bytes to /echo through the proxy, streaming on both ends, while it
samples balancer's RSS. Prints throughput, integrity (length, SHA-256 from the worker) and peak RSS.

Usage: .venv/bin/python bench/big_transfer.py [--size 1GiB]     (sizes: 1GiB, 256MiB, 1000000)
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
from common import RssSampler, balancer, free_port  # type: ignore[import-not-found,unused-ignore]

UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    lower = text.lower()
    for unit, factor in UNITS.items():
        if lower.endswith(unit):
            return int(float(lower[: -len(unit)]) * factor)
    return int(text)


async def transfer(port: int, size: int) -> dict[str, float | str | bool]:
    url = f"http://127.0.0.1:{port}"
    result: dict[str, float | str | bool] = {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        started = time.monotonic()
        received = 0
        async with session.get(f"{url}/bytes/{size}") as resp:
            async for chunk in resp.content.iter_chunked(1 << 20):
                received += len(chunk)
        result["download_s"] = time.monotonic() - started
        result["download_ok"] = received == size

        chunk = bytes(range(256)) * 4096                    # 1 MiB
        digest = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            while sent < size:
                piece = chunk[: size - sent]
                digest.update(piece)
                sent += len(piece)
                yield piece

        started = time.monotonic()
        async with session.post(f"{url}/echo", data=body()) as resp:
            echo = await resp.json()
        result["upload_s"] = time.monotonic() - started
        result["upload_ok"] = echo["body_length"] == size and echo["body_sha256"] == digest.hexdigest()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    args = ap.parse_args()
    size = parse_size(args.size)
    port = free_port()
    config = (f"listen: {{host: 127.0.0.1, port: {port}}}\n"
              "pools:\n  web:\n    spawn: {command: [python, -m, backends], count: 1}\n")
    with balancer(config, port) as proc, RssSampler(proc.pid) as rss:
        result = asyncio.run(transfer(port, size))
    mib = size / (1 << 20)
    print(f"size            {args.size} ({size} bytes)")
    print(f"download        {'intact' if result['download_ok'] else 'WRONG LENGTH'}, "
          f"{mib / float(result['download_s']):.0f} MiB/s")
    print(f"upload          {'intact (sha256)' if result['upload_ok'] else 'CORRUPT'}, "
          f"{mib / float(result['upload_s']):.0f} MiB/s")
    print(f"balancer RSS    idle {rss.idle:.1f} MiB, peak {rss.peak:.1f} MiB")


if __name__ == "__main__":
    main()
