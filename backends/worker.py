"""Command line and lifecycle of one worker process: parse options, serve, stop cleanly.

Lifecycle: startup (signal handlers, bind) → wait for a stop request (SIGTERM, SIGINT or parent death)
→ graceful shutdown with a deadline → exit status 0. A port that cannot be bound is exit status 1,
bad options exit status 2 (argparse); none of these print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import uvloop
from aiohttp import web

from backends.app import make_app
from backends.parent import watch_parent

logger = logging.getLogger("backends")

GRACE_S = 2.0
"""How long in-flight requests may run on after a stop request before they are cancelled."""

# aiohttp's per-connection shutdown waits `shutdown_timeout` for the handler, then only fails the body
# reader (which a handler not reading its body ignores) and waits `shutdown_timeout` again before it
# cancels the task: twice the value overall.
_AIOHTTP_SHUTDOWN_TIMEOUT_S = GRACE_S / 2

FORCED_EXIT_STATUS = 130  # 128 + SIGINT, the shell's convention for "interrupted"


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    host: str
    port: int
    worker_id: str
    keepalive_timeout_s: float


def parse_args(argv: Sequence[str] | None = None) -> WorkerOptions:
    """Parse the command line; each option falls back to its BALANCER_* environment variable."""
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m backends", description="balancer's test worker")
    # argparse applies `type` to string defaults too, so a bad environment value is reported like a
    # bad option, naming the option.
    parser.add_argument(
        "--port",
        type=_port,
        default=env.get("BALANCER_PORT"),
        required="BALANCER_PORT" not in env,
        help="TCP port (env BALANCER_PORT)",
    )
    parser.add_argument(
        "--host",
        default=env.get("BALANCER_HOST", "127.0.0.1"),
        help="address to bind (env BALANCER_HOST; default 127.0.0.1)",
    )
    parser.add_argument(
        "--id",
        dest="worker_id",
        default=env.get("BALANCER_WORKER_ID"),
        help="name in responses and X-Backend (env BALANCER_WORKER_ID; default w<port>)",
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=_seconds,
        default=env.get("BALANCER_KEEPALIVE_TIMEOUT", "75"),
        help="idle keep-alive timeout in seconds (env BALANCER_KEEPALIVE_TIMEOUT; default 75)",
    )
    args = parser.parse_args(argv)
    return WorkerOptions(
        host=args.host,
        port=args.port,
        worker_id=args.worker_id or f"w{args.port}",
        keepalive_timeout_s=args.keepalive_timeout,
    )


def main(argv: Sequence[str] | None = None, *, parent_pid: int | None = None) -> int:
    """Run a worker until it is asked to stop; returns the process exit status.

    `parent_pid` is the spawner to watch for (see backends.parent); None disables the watch.
    """
    options = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="backends: %(message)s")
    return uvloop.run(serve(options, parent_pid))


async def serve(options: WorkerOptions, parent_pid: int | None) -> int:
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    runner = web.AppRunner(
        make_app(options.worker_id, options.port),
        access_log=None,
        keepalive_timeout=options.keepalive_timeout_s,
        shutdown_timeout=_AIOHTTP_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        # The supervisor reads stderr and the status; a traceback would only bury the errno.
        logger.error("cannot listen on %s:%d: %s", options.host, options.port, exc.strerror or exc)
        await runner.cleanup()
        return 1
    logger.info("worker %s listening on %s:%d", options.worker_id, options.host, options.port)

    watcher = None
    if parent_pid is not None:
        watcher = asyncio.create_task(watch_parent(parent_pid, stop.set), name="watch-parent")
    try:
        await stop.wait()
    finally:
        await _shutdown(runner, watcher)
    return 0


async def _shutdown(runner: web.AppRunner, watcher: asyncio.Task[None] | None) -> None:
    # 1. Stop watching the parent: we are going anyway.
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    # 2. runner.cleanup() closes the listener, closes idle keep-alive connections, runs on_shutdown
    #    (WebSockets get a close frame), lets in-flight requests run for GRACE_S, then cancels them.
    #    The outer deadline only guards against a handler that ignores cancellation.
    try:
        async with asyncio.timeout(GRACE_S + 1):
            await runner.cleanup()
    except TimeoutError:
        pending = len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])
        logger.warning("shutdown deadline passed with %d tasks still pending; exiting anyway", pending)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        # Handlers only set the event; serve() does the work. Only a repeated SIGINT escalates: that is
        # a person pressing Ctrl-C twice. A repeated SIGTERM is routine (the balancer's stop and our
        # PDEATHSIG can both arrive; Ctrl-C reaches us directly through the process group and then as
        # the balancer's SIGTERM) and must not turn a clean stop into a forced one.
        if stop.is_set() and signum is signal.SIGINT:
            logger.warning("second SIGINT: exiting without waiting for in-flight requests")
            os._exit(FORCED_EXIT_STATUS)
        if not stop.is_set():
            logger.info("%s: stopping", signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {port}")
    return port


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not seconds >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a non-negative number of seconds, got {text}")
    return seconds
