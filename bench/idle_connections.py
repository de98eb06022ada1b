#!/usr/bin/env python3
"""Memory per idle client connection: hold N keep-alive connections open, report balancer's RSS.

Starts balancer with one spawned worker, opens N client connections (default 10,000), sends one
request on each and reads its answer, then keeps them all open and idle, and prints balancer's RSS
before and with them open, and the difference per connection. 127.0.0.1 only; raises the open-files
limit for itself and balancer.
Usage: .venv/bin/python bench/idle_connections.py [--connections 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource

from common import balancer, free_port, rss_mib  # type: ignore[import-not-found,unused-ignore]

WAVE = 500          # connections opened at once: the accept backlog is finite


async def _one(port: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return writer


async def hold_and_measure(port: int, pid: int, n: int) -> tuple[float, int]:
    """Open ``n`` keep-alive connections, measure ``pid``'s RSS with them idle, close them."""
    writers: list[asyncio.StreamWriter] = []
    for start in range(0, n, WAVE):
        writers += await asyncio.gather(*(_one(port) for _ in range(min(WAVE, n - start))))
    await asyncio.sleep(1.0)            # a quiet second, so the figure is the idle state
    rss = rss_mib(pid)
    for writer in writers:
        writer.close()
    return rss, len(writers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10_000)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 2 * args.connections + 1000), hard), hard))
    port = free_port()
    config = (f"listen: {{host: 127.0.0.1, port: {port}}}\n"
              "pools: {web: {spawn: {command: [python, -m, backends], count: 1}}}\n")
    with balancer(config, port) as proc:
        before = rss_mib(proc.pid)
        after, held = asyncio.run(hold_and_measure(port, proc.pid, args.connections))
    print(f"idle keep-alive client connections  {held}")
    print(f"balancer RSS                         {before:.1f} MiB before, {after:.1f} MiB with them open")
    print(f"per connection                       {(after - before) * 1024 / max(held, 1):.1f} KiB")


if __name__ == "__main__":
    main()
