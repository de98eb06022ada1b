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
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def stats(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5) as resp:
        return json.load(resp)


def pool_totals(data: dict) -> tuple[int, int]:
    created = reused = 0
    for pool in data["pools"].values():
        for backend in pool["backends"]:
            created += backend["pool"]["created"]
            reused += backend["pool"]["reused"]
    return created, reused


def wait_ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("balancer did not answer in time")


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
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "balancer.yaml"
        path.write_text(config)
        log = open(Path(tmp) / "balancer.log", "wb")
        proc = subprocess.Popen([str(ROOT / ".venv/bin/balancer"), "run", "-c", str(path)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(port, time.monotonic() + 30)
            subprocess.run(["wrk", "-t1", f"-c{args.connections}", "-d2s", f"http://127.0.0.1:{port}/"],
                           capture_output=True, check=True)            # warm-up
            created0, reused0 = pool_totals(stats(admin))
            cpu0 = cpu_seconds(proc.pid)
            out = subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s",
                                  f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                                 check=True).stdout
            cpu1 = cpu_seconds(proc.pid)
            created1, reused1 = pool_totals(stats(admin))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            log.close()
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
