"""Is the worker app fast enough to be a load-test target? One worker beside one nginx static server.

    .venv/bin/python bench/backend_speed.py [--duration 5] [--repeats 2] [--connections 64] [--path /]

Starts `python -m backends --port P` from this checkout (uvloop, as balancer spawns it) and one nginx
(`daemon off; master_process off;`, one worker process, `return 200 "hello\\n"`), then runs
`wrk -t1 -cN -dDs` against each one's PATH, interleaved, REPEATS times. Prints the median requests/s,
the server's CPU µs per request and p99 latency for each, and the worker's ratio to nginx.

Both servers are single processes and wrk has one thread, so on a 2-core machine each run is one core
of server against one core of client: a server at 100 % of its core is the limit, and nginx's figure
is roughly wrk's own ceiling. 127.0.0.1 only; everything started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, free_port, process

NGINX = """daemon off; master_process off; worker_processes 1;
pid {run}/nginx.pid; error_log {run}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {run}/t1; proxy_temp_path {run}/t2; fastcgi_temp_path {run}/t3;
  uwsgi_temp_path {run}/t4; scgi_temp_path {run}/t5; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain; return 200 "hello\\n"; }} }} }}
"""



_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, pid: int, connections: int, duration: float) -> tuple[float, float, float]:
    """(requests/s, server CPU µs per request, p99 ms) of one wrk run against `url`."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url]
    before = cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    used = cpu_seconds(pid) - before
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"warning: errors against {url}:\n{out}", file=sys.stderr)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99_ms = float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan")
    return done / duration, used / max(done, 1) * 1e6, p99_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per target (default 2)")
    ap.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    ap.add_argument("--path", default="/", help="request target on both servers (default /)")
    ap.add_argument("worker_args", nargs="*", help="extra options for the worker, after --")
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("nginx"):
        raise SystemExit("needs wrk and nginx on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        ports = {"nginx": free_port(), "worker": free_port()}
        (run / "nginx.conf").write_text(NGINX.format(run=run, port=ports["nginx"]))
        argvs = {
            "nginx": ["nginx", "-p", str(run), "-c", str(run / "nginx.conf")],
            "worker": [sys.executable, "-m", "backends", "--port", str(ports["worker"]), *args.worker_args],
        }
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in argvs}
        with contextlib.ExitStack() as stack:
            procs = {name: stack.enter_context(process(argv, ports[name])) for name, argv in argvs.items()}
            for _ in range(args.repeats):
                for name, proc in procs.items():
                    url = f"http://127.0.0.1:{ports[name]}{args.path}"
                    results[name].append(wrk(url, proc.pid, args.connections, args.duration))
    print(f"wrk -t1 -c{args.connections} -d{args.duration:g}s {args.path}, median of {args.repeats}"
          f" interleaved runs ({os.cpu_count()} CPUs)")
    print("| server | requests/s | CPU µs/req | p99 ms | ÷ nginx |")
    print("|---|---|---|---|---|")
    base = statistics.median(r for r, _, _ in results["nginx"])
    for name, runs in results.items():
        rate = statistics.median(r for r, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        p99 = statistics.median(p for _, _, p in runs)
        print(f"| {name} | {rate:,.0f} | {cpu:.1f} | {p99:.2f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
