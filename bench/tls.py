"""TLS beside nginx: keep-alive requests/s over TLS and new TLS connections (handshakes)/s.

    .venv/bin/python bench/tls.py [--duration 5] [--repeats 2]

One nginx static backend; in front of it, with the same certificate (RSA 2048, made here with
trustme), one process each: nginx (TLS, upstream keep-alive), balancer interpreted (.venv) and
balancer compiled (.venv-native, if built). wrk, one thread:

* keep-alive: 64 connections, small responses: requests/s and proxy CPU µs per request;
* handshakes: 16 connections, each request on a new connection (`Connection: close`): TLS
  handshakes/s and proxy CPU µs per handshake.

Runs are interleaved and the median of the repeats is printed, with each balancer's ratio to nginx.
127.0.0.1 only; everything started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_seconds, free_port, process

NGINX_BACKEND = """daemon off; master_process off; worker_processes 1;
pid {run}/be.pid; error_log {run}/be.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {run}/t1; proxy_temp_path {run}/t2; fastcgi_temp_path {run}/t3;
  uwsgi_temp_path {run}/t4; scgi_temp_path {run}/t5; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain; return 200 "hello\\n"; }} }} }}
"""
NGINX_TLS = """daemon off; master_process off; worker_processes 1;
pid {run}/px.pid; error_log {run}/px.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {run}/u1; proxy_temp_path {run}/u2; fastcgi_temp_path {run}/u3;
  uwsgi_temp_path {run}/u4; scgi_temp_path {run}/u5; keepalive_requests 1000000;
  upstream be {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_tickets off;
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
"""
BALANCER = """listen:
  - host: 127.0.0.1
    port: {port}
    tls: {{certificates: [{{cert: {cert}, key: {key}}}]}}
pools: {{bench: {{servers: [{{address: 127.0.0.1:{backend}}}]}}}}
"""



def wrk(port: int, pid: int, connections: int, duration: float, close: bool) -> tuple[float, float]:
    """(requests/s, proxy CPU µs per request)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", f"https://127.0.0.1:{port}/"]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    before = cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    used = cpu_seconds(pid) - before
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return done / duration, used / max(done, 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("nginx"):
        raise SystemExit("needs wrk and nginx")
    targets = {"balancer": ROOT / ".venv/bin/balancer", "balancer-c": ROOT / ".venv-native/bin/balancer"}
    targets = {name: path for name, path in targets.items() if path.exists()}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        os.chmod(run, 0o755)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert, key = run / "cert.pem", run / "key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        backend = free_port()
        (run / "be.conf").write_text(NGINX_BACKEND.format(run=run, port=backend))
        ports = {"nginx": free_port(), **{name: free_port() for name in targets}}
        (run / "px.conf").write_text(NGINX_TLS.format(run=run, port=ports["nginx"], backend=backend,
                                                      cert=cert, key=key))
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(process(["nginx", "-p", str(run), "-c", str(run / "be.conf")], backend))
            procs = {"nginx": stack.enter_context(
                process(["nginx", "-p", str(run), "-c", str(run / "px.conf")], ports["nginx"]))}
            for name, path in targets.items():
                config = run / f"{name}.yaml"
                config.write_text(BALANCER.format(port=ports[name], cert=cert, key=key, backend=backend))
                procs[name] = stack.enter_context(process([str(path), "run", "-c", str(config)], ports[name]))
            for _ in range(args.repeats):
                for workload, conns, close in (("keep-alive c64", 64, False), ("handshakes c16", 16, True)):
                    for name, proc in procs.items():
                        results.setdefault((workload, name), []).append(
                            wrk(ports[name], proc.pid, conns, args.duration, close))
    print("| workload | target | per second | CPU µs each | ratio to nginx |")
    print("|---|---|---|---|---|")
    for (workload, name), runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        base = statistics.median(r for r, _ in results[workload, "nginx"])
        print(f"| {workload} | {name} | {rate:,.0f} | {cpu:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
