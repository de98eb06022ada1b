"""The data port's listening sockets, accepting every waiting connection at once.

libuv (under uvloop) accepts **one** connection per event-loop iteration (libuv PR #3696, 2022). On a
busy loop that is a queue: with 256 clients connecting at once to a balancer already serving, each
loop iteration (a few ms with hundreds of active connections) let one more in, and the last client's
first request waited 230 ms and more (measured; p99 100-400 ms on the first second of a c256 run,
with every request under 40 ms once it was read). asyncio's own loop, like nginx with
``multi_accept``, takes what is waiting.

So the listening socket is ours: watched with ``add_reader`` and drained up to ``ACCEPT_BATCH``
connections per readiness; each accepted socket becomes a transport through the loop's
``connect_accepted_socket``. Out of file descriptors (EMFILE/ENFILE), accepting pauses for
``RETRY_DELAY_S`` (as asyncio does) instead of spinning on a readable socket.

A TLS listener wraps each accepted socket in the loop's SSL transport, with a handshake deadline
(``timeouts.client_header``); the protocol sees the connection only once the handshake is done. A
handshake that fails (a plain-HTTP client on the TLS port, an old protocol version, no shared
cipher) closes the connection and is logged on one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable

from .throttledlog import ThrottledLog
from .tls import ServerTLS

log = logging.getLogger(__name__)

_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Listener:
    """Listening sockets for ``host:port``; ``close()`` stops accepting (open connections stay)."""

    ACCEPT_BATCH = 128
    RETRY_DELAY_S = 0.1

    def __init__(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol],
                 sockets: list[socket.socket], tls: ServerTLS | None = None, handshake_timeout: float = 10.0,
                 on_handshake_failure: Callable[[], None] | None = None) -> None:
        self._loop = loop
        self._factory = factory
        self.sockets = sockets
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self._on_handshake_failure = on_handshake_failure
        self._handshake_log = ThrottledLog(log, level=logging.INFO)
        self._closed = False
        self._attaching: set[asyncio.Task[None]] = set()
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    @classmethod
    async def open(cls, factory: Callable[[], asyncio.Protocol], host: str, port: int, *,
                   reuse_port: bool = False, backlog: int = 1024, tls: ServerTLS | None = None,
                   handshake_timeout: float = 10.0,
                   on_handshake_failure: Callable[[], None] | None = None) -> Listener:
        """Bind every address of ``host`` (as ``loop.create_server`` does) and start accepting."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port:                # every address on the same port (the first chosen, for 0)
                    address = (address[0], port, *address[2:])
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
                port = sock.getsockname()[1]
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return cls(loop, factory, sockets, tls, handshake_timeout, on_handshake_failure)

    def set_tls(self, tls: ServerTLS | None, handshake_timeout: float) -> None:
        """Reload: new certificates for connections accepted from now on."""
        self.tls = tls
        self.handshake_timeout = handshake_timeout

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(self.ACCEPT_BATCH):
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    log.warning("cannot accept connections (%s); pausing for %gs", exc, self.RETRY_DELAY_S)
                    self._loop.remove_reader(listening.fileno())
                    self._loop.call_later(self.RETRY_DELAY_S, self._resume, listening)
                return              # ECONNABORTED and the like: that client is gone, nothing to do
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The protocol is made now, in accept order: a factory that counts connections (the
            # front door's max_connections) sees every one of this batch.
            protocol = self._factory()
            task = self._loop.create_task(self._attach(conn, protocol))
            self._attaching.add(task)
            task.add_done_callback(self._attaching.discard)

    def _resume(self, listening: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    async def _attach(self, conn: socket.socket, protocol: asyncio.Protocol) -> None:
        tls = self.tls
        peer = "?"
        try:
            if tls is None:
                await self._loop.connect_accepted_socket(lambda: protocol, conn)
            else:
                with contextlib.suppress(OSError):
                    peer = conn.getpeername()[0]
                await self._loop.connect_accepted_socket(lambda: protocol, conn, ssl=tls.context,
                                                         ssl_handshake_timeout=self.handshake_timeout)
        except (OSError, asyncio.CancelledError) as exc:   # reset before we got to it, or closing
            if tls is not None and not isinstance(exc, asyncio.CancelledError):
                self._handshake_failed(peer, exc)
            else:
                log.debug("accepted connection lost before it was set up: %r", exc)
            conn.close()
            protocol.connection_lost(exc if isinstance(exc, OSError) else None)

    def _handshake_failed(self, peer: str, exc: BaseException) -> None:
        if self._on_handshake_failure is not None:
            self._on_handshake_failure()
        if isinstance(exc, ssl.SSLError):
            reason = exc.reason or exc.__class__.__name__
            if reason == "HTTP_REQUEST":
                reason = "plain HTTP on the TLS port"
        else:
            reason = str(exc) or exc.__class__.__name__
        self._handshake_log.log("handshake", "TLS handshake with %s failed: %s", peer, reason)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._attaching:    # accepted but not set up yet: closed, not left undrained
            task.cancel()
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])
