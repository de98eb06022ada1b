"""Command line: ``balancer run|check|status|drain|disable|enable``. The only module that calls
``sys.exit``.

Exit statuses: 0 success, 1 runtime failure (including: the admin API unreachable, a ``drain --wait``
that did not finish), 2 configuration or usage error (like ``nginx -t``).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from collections.abc import Sequence

from . import ctl
from .config.load import DEFAULT_CONFIG_PATH, dump_effective, load_config, parse_duration
from .config.models import Config
from .errors import ConfigError
from .version import installed_version

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancer", description="HTTP reverse-proxy load balancer")
    parser.add_argument("--version", action="version", version=f"balancer {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{run,check,status,drain,disable,enable,reload,restart-workers}")
    run = sub.add_parser("run", help="run the balancer in the foreground")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, help="YAML configuration file")
    check = sub.add_parser("check", help="validate a configuration and print it with defaults filled in")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, help="YAML configuration file")
    check.add_argument("--show-secrets", action="store_true",
                       help="print the admin token, spawn.env values, password hashes (else redacted)")
    check.add_argument("-q", "--quiet", action="store_true", help="only validate; print nothing on success")
    status = sub.add_parser("status", help="print the per-backend table of a running balancer")
    _admin_arguments(status)
    status.add_argument("--json", action="store_true", help="print the raw /stats JSON instead")
    status.add_argument("--watch", action="store_true",
                        help="redraw every second (a load-test run); Ctrl-C to stop")
    for action, text in (("drain", "stop sending new requests to a backend; in-flight ones finish"),
                         ("disable", "take a backend out of rotation"),
                         ("enable", "put a drained or disabled backend back into rotation")):
        cmd = sub.add_parser(action, help=text)
        cmd.add_argument("backend", metavar="ID", help="backend id, POOL/NAME (e.g. web/1)")
        _admin_arguments(cmd)
        if action == "drain":
            cmd.add_argument("--wait", metavar="DURATION",
                             help="wait up to this long (e.g. 30s) until nothing is in flight")
    for action, text in (("reload", "re-read the configuration file of a running balancer and apply it"),
                         ("restart-workers", "replace every spawned worker, surge-then-drain")):
        cmd = sub.add_parser(action, help=text)
        _admin_arguments(cmd)
        cmd.add_argument("--wait", metavar="DURATION", default="60s",
                         help="wait up to this long for worker rollouts (default 60s; 0 = do not wait)")
    return parser


def _replica_parser() -> argparse.ArgumentParser:
    """``balancer _replica``: internal (a proxy process the main process starts), so not in the usage."""
    replica = argparse.ArgumentParser(prog="balancer _replica")
    replica.add_argument("-c", "--config", required=True)
    replica.add_argument("--fd", type=int, required=True)
    replica.add_argument("--ports", type=lambda text: tuple(int(p) for p in text.split(",")), required=True)
    replica.add_argument("--index", type=int, required=True)
    return replica


def _admin_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("-c", "--config", default=None,
                     help="take the admin address and token from this configuration file")
    cmd.add_argument("--admin", metavar="URL", default=None,
                     help=f"admin API base URL (default: BALANCER_ADMIN_URL, the config's, "
                          f"or {ctl.DEFAULT_ADMIN_URL})")
    cmd.add_argument("--token", default=None,
                     help="admin token (default: BALANCER_ADMIN_TOKEN or the config's)")


def _configure_logging(level: str) -> None:
    """Log lines are written by a thread (QueueHandler -> QueueListener): a slow or blocked stderr
    (a full pipe to a log shipper) never stalls the event loop; the loop only queues records."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    to_thread = logging.handlers.QueueHandler(records)
    to_thread.setFormatter(logging.Formatter("%(message)s"))   # the listener's handler formats the line
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[to_thread])
    listener.start()
    atexit.register(listener.stop)


def _tune_malloc() -> None:
    """glibc's default thresholds make a proxy moving large bodies mmap/munmap (and page-fault) every
    buffer; measured here, fixing them cuts CPU per proxied MiB by 10-30 %. Same values as
    MALLOC_MMAP_THRESHOLD_=4MiB MALLOC_TRIM_THRESHOLD_=128MiB MALLOC_TOP_PAD_=16MiB; an explicit
    environment setting wins."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return                                   # not glibc (musl): nothing to tune
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 4 << 20)
    libc.mallopt(m_trim_threshold, 128 << 20)
    libc.mallopt(m_top_pad, 16 << 20)


def _tune_gc() -> None:
    """The cyclic GC's default thresholds (700, 10, 10) make it walk every live request's objects
    many times a second under load; almost nothing on the request path is cyclic (refcounting frees
    it). Measured at 256 connections: ~80 -> ~72 us of CPU per request with these values. The app
    also freezes its start-up objects (gc.freeze) so full collections skip them.
    ``BALANCER_GC_THRESHOLD=700,10,10`` restores Python's defaults."""
    given = os.environ.get("BALANCER_GC_THRESHOLD", "")
    try:
        thresholds = tuple(int(x) for x in given.split(",")) if given else (100_000, 100, 1000)
    except ValueError:
        thresholds = (100_000, 100, 1000)
    gc.set_threshold(*thresholds)


def _prepare(config_path: str) -> Config | None:
    """Load the configuration and tune the process for serving; None (message printed) if invalid."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"balancer: {exc}", file=sys.stderr)
        return None
    _configure_logging(config.log.level)
    _tune_malloc()
    _tune_gc()
    return config


def _run(config_path: str) -> int:
    config = _prepare(config_path)
    if config is None:
        return EXIT_CONFIG
    import uvloop

    from .control.balancer import Balancer
    try:
        uvloop.run(Balancer(config).run())
    except OSError as exc:
        logging.getLogger("balancer").error("cannot start: %s", exc)
        return EXIT_FAILURE
    except SystemExit as exc:   # raised by the second-signal fast exit
        return int(exc.code or EXIT_FAILURE)
    return EXIT_OK


def _replica(args: argparse.Namespace) -> int:
    """A proxy process started by the main process (processes > 1); see balancer/control/replicas.py."""
    config = _prepare(args.config)
    if config is None:
        return EXIT_CONFIG
    import uvloop

    from .control.balancer import Balancer
    from .control.replicas import run_replica
    uvloop.run(run_replica(Balancer, config, args.fd, args.ports, args.index))
    return EXIT_OK


def _check(config_path: str, quiet: bool, show_secrets: bool = False) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"balancer: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not quiet:
        sys.stdout.write(dump_effective(config, show_secrets))
        print(f"balancer: configuration file {config_path} is valid", file=sys.stderr)
    return EXIT_OK


def _admin(args: argparse.Namespace) -> int:
    """status / drain / disable / enable against the admin API."""
    config: Config | None = None
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"balancer: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    url, token = ctl.admin_url(config, args.admin), ctl.admin_token(config, args.token)
    try:
        if args.command == "status":
            while True:
                _, stats = ctl.call(url, "/stats", token)
                text = json.dumps(stats, indent=2) + "\n" if args.json else ctl.render_status(stats, url)
                if not args.watch:
                    sys.stdout.write(text)
                    return EXIT_OK
                sys.stdout.write("\x1b[H\x1b[2J" + text)     # home, clear: one screen, redrawn
                sys.stdout.flush()
                try:
                    time.sleep(1.0)
                except KeyboardInterrupt:
                    return EXIT_OK
        if args.command in ("reload", "restart-workers"):
            return _control(url, token, args)
        path = ctl.backend_path(args.backend, args.command)
        timeout = ctl.TIMEOUT_S
        if getattr(args, "wait", None):
            try:
                wait_s = parse_duration(args.wait)
            except ConfigError as exc:
                print(f"balancer: --wait: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            path += f"?wait={wait_s:.3f}"     # seconds: parse_duration reads a bare number
            timeout += wait_s
        status, data = ctl.call(url, path, token, method="POST", timeout=timeout)
    except ctl.AdminError as exc:
        print(f"balancer: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    sys.stdout.write(ctl.render_action(args.command, data))
    return EXIT_OK if status == 200 else EXIT_FAILURE


def _control(url: str, token: str | None, args: argparse.Namespace) -> int:
    """reload / restart-workers: print what changed; exit 1 if refused or a rollout did not finish."""
    try:
        wait_s = parse_duration(args.wait)
    except ConfigError as exc:
        print(f"balancer: --wait: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    query = f"?wait={wait_s:.3f}" if wait_s else ""
    try:
        _, data = ctl.call(url, f"/{args.command}{query}", token, method="POST",
                           timeout=ctl.TIMEOUT_S + wait_s)
    except ctl.AdminError as exc:
        print(f"balancer: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for change in data.get("changes", []):
        print(change)
    if not data.get("changes"):
        print("no change")
    if wait_s and not data.get("rollouts_done", True):
        print(f"balancer: worker rollouts still running after {args.wait}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["_replica"]:
        sys.exit(_replica(_replica_parser().parse_args(given[1:])))
    args = _parser().parse_args(given)
    if args.command == "run":
        sys.exit(_run(args.config))
    if args.command == "check":
        sys.exit(_check(args.config, args.quiet, args.show_secrets))
    if args.command in ("status", "drain", "disable", "enable", "reload", "restart-workers"):
        sys.exit(_admin(args))
    sys.exit(EXIT_CONFIG)


if __name__ == "__main__":  # pragma: no cover
    main()
