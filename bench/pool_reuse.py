#!/usr/bin/env python3
"""Upstream connection reuse under steady load (issue: upstream pool).

Starts balancer (from this checkout's .venv) with four spawned workers and the admin API on loopback,
drives it with ``wrk -t1 -cC`` for D seconds, and prints from the admin /stats and /proc:

* the share of requests served on reused upstream connections (target >= 99.9 %),
* new upstream connections per second,
* balancer's own CPU time per request (its process only, not the workers).

Usage: .venv/bin/python bench/pool_reuse.py [--duration 10] [--connections 64] [--workers 4]
Needs wrk (Debian package ``wrk``). 127.0.0.1 only; everything started is stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from typing import Any

from common import balancer, cpu_seconds, free_port  # type: ignore[import-not-found,unused-ignore]


def stats(admin: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5) as resp:
        data: dict[str, Any] = json.load(resp)
        return data


def pool_totals(data: dict[str, Any]) -> tuple[int, int]:
    created = reused = 0
    for pool in data["pools"].values():
        for backend in pool["backends"]:
            created += backend["pool"]["created"]
            reused += backend["pool"]["reused"]
    return created, reused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    port, admin = free_port(), free_port()
    config = (f"listen: {{host: 127.0.0.1, port: {port}}}\nadmin: {{host: 127.0.0.1, port: {admin}}}\n"
              f"pools:\n  web:\n    spawn: {{command: [python, -m, backends], count: {args.workers}}}\n")
    with balancer(config, port) as proc:
        subprocess.run(["wrk", "-t1", f"-c{args.connections}", "-d2s", f"http://127.0.0.1:{port}/"],
                       capture_output=True, check=True)            # warm-up
        created0, reused0 = pool_totals(stats(admin))
        cpu0 = cpu_seconds(proc.pid)
        out = subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s",
                              f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
        cpu1 = cpu_seconds(proc.pid)
        created1, reused1 = pool_totals(stats(admin))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.findall(r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)", out)
    created, reused = created1 - created0, reused1 - reused0
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s against {args.workers} spawned workers")
    print(f"requests            {requests}  ({rps:.0f}/s)  errors: {', '.join(errors) or 'none'}")
    print(f"upstream leases     {created + reused}  (new {created}, reused {reused})")
    print(f"reuse ratio         {100 * reused / max(created + reused, 1):.3f} %")
    print(f"new connections/s   {created / args.duration:.2f}")
    print(f"balancer CPU        {1e6 * (cpu1 - cpu0) / max(requests, 1):.1f} us/request")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
