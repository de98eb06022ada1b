#!/usr/bin/env python3
"""Overload: many concurrent client connections against four spawned workers (issue: reliability).

Starts balancer (this checkout's .venv) with four spawned workers, drives it with
``wrk -t1 -cN -dD`` (default 2000 connections for 10 s), samples balancer's RSS every 100 ms, and
prints requests, statuses (2xx vs other), socket errors, latency and peak RSS. Optional
``--max-connections`` sets limits.max_connections so the refusal path (clean 503) is exercised.

Usage: .venv/bin/python bench/overload.py [--connections 2000] [--duration 10] [--max-connections 0]
127.0.0.1 only; raises the open-files limit for itself and its children if it can.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import urllib.request

from common import RssSampler, balancer, free_port  # type: ignore[import-not-found,unused-ignore]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--max-connections", type=int, default=0)
    ap.add_argument("--path", default="/")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 65536), hard), hard))
    port = free_port()
    config = (f"listen: {{host: 127.0.0.1, port: {port}}}\n"
              f"limits: {{max_connections: {args.max_connections}}}\n"
              "pools:\n  web:\n    spawn: {command: [python, -m, backends], count: 4}\n")
    with balancer(config, port) as proc, RssSampler(proc.pid, 0.1) as rss:
        out = subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s",
                              "--timeout", "10s", "--latency", f"http://127.0.0.1:{port}{args.path}"],
                             capture_output=True, text=True, check=True).stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            still_serving = resp.status == 200
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: (.*)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s, limits.max_connections={args.max_connections}")
    print(f"requests        {requests}  ({requests / args.duration:.0f}/s)")
    print(f"non-2xx         {non2xx.group(1) if non2xx else 0}")
    print(f"socket errors   {sockets.group(1) if sockets else 'none'}")
    print(f"latency p99     {p99.group(1) if p99 else '?'}")
    print(f"RSS             idle {rss.idle:.1f} MiB, peak {rss.peak:.1f} MiB")
    print(f"serving after   {'yes' if still_serving else 'NO'}")


if __name__ == "__main__":
    main()
