"""Command line and lifecycle of one worker process: parse options, serve, stop cleanly.

The load-test knobs (backends.knobs) are options too, with dashes (`--delay 10ms-50ms --error-rate
0.01`): defaults for every request, which a query parameter overrides for its request.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import uvloop
from aiohttp import web

from backends.app import make_app
from backends.knobs import NO_KNOBS, KnobError, Knobs, parse_flag, parse_knob, parse_knobs
from backends.parent import watch_parent
from backends.service import Service

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
    knobs: Knobs = NO_KNOBS
    catch_all: bool = False


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
    _add_knob_options(parser)
    args = parser.parse_args(argv)
    pairs = [(name, text) for name in _KNOB_HELP if (text := getattr(args, name)) is not None]
    headers = args.headers if args.headers is not None else env.get("BALANCER_HEADERS", "").splitlines()
    try:
        knobs = parse_knobs([*pairs, *(("headers", header) for header in headers)])
    except KnobError as exc:  # only BALANCER_HEADERS can be bad here: options were checked one by one
        parser.error(f"BALANCER_HEADERS: {exc}")
    if knobs == NO_KNOBS:  # e.g. `--chunked 0`: still a plain worker, with its fast path and its 404s
        knobs = NO_KNOBS
    return WorkerOptions(
        host=args.host,
        port=args.port,
        worker_id=args.worker_id or f"w{args.port}",
        keepalive_timeout_s=args.keepalive_timeout,
        knobs=knobs,
        catch_all=parse_flag(args.catch_all),
    )


_KNOB_HELP = {
    "delay": "response delay: 20ms, 1.5s, 0.02 (seconds), 10ms-200ms (uniform), lognormal:P50:P99",
    "status": "status to answer: 503, or a pick like 200,503 or 200:0.9,503:0.1",
    "error_rate": "fraction of requests answered with --error-status instead (0-1)",
    "error_status": "status of those errors (default 500)",
    "size": "body size of / and unrouted paths: 1024, 64KiB, 1MB (at most 1GiB)",
    "chunked": "send bodies chunked (1 or 0; alone: 1)",
    "drip": "pause between body chunks, in --delay's forms",
    "close": "close the connection after each response (1 or 0; alone: 1)",
    "reset_rate": "fraction of requests answered by a TCP reset and no response (0-1)",
}


def _add_knob_options(parser: argparse.ArgumentParser) -> None:
    """The knobs as options; each falls back to BALANCER_<NAME> and is checked as it is parsed."""
    env = os.environ
    group = parser.add_argument_group("load-test knobs: defaults that a query parameter overrides")
    for name, text in _KNOB_HELP.items():
        option, variable = f"--{name.replace('_', '-')}", f"BALANCER_{name.upper()}"
        is_flag = name in ("chunked", "close")
        group.add_argument(
            option,
            dest=name,
            type=_knob_text(name),
            nargs="?" if is_flag else None,
            const="1" if is_flag else None,
            default=env.get(variable),
            help=f"{text} (env {variable})",
        )
    group.add_argument(
        "--headers",
        action="append",
        type=_knob_text("headers"),
        help="extra response header Name:value; repeat for several (env BALANCER_HEADERS: one a line)",
    )
    group.add_argument(
        "--catch-all",
        type=_knob_text("catch_all", parse_flag),
        nargs="?",
        const="1",
        default=env.get("BALANCER_CATCH_ALL", "0"),
        help="answer any unrouted path as / does instead of 404 (1 or 0; alone: 1); any knob default "
        "implies it (env BALANCER_CATCH_ALL)",
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
    service = Service(defaults=options.knobs, catch_all=options.catch_all)
    runner = web.AppRunner(
        make_app(options.worker_id, options.port, service),
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


def _knob_text(name: str, parse: Callable[[str, str], object] | None = None) -> Callable[[str], str]:
    """An argparse `type` that checks a knob's text and keeps it; a bad one is reported as a bad option."""

    def check(text: str) -> str:
        try:
            if parse is None:
                parse_knob(name, text)
            else:
                parse(text, name)
        except KnobError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name}: ")) from None
        return text

    return check
