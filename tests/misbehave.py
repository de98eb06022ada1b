"""A scriptable raw HTTP backend for edge-case tests: each accepted connection runs a script.

Unlike :class:`tests.rawbackend.RawBackend` (one reply per request), a script decides everything on
its connection: read a request (head only, or with its Content-Length/chunked body), write any bytes
at any time, stop reading, hold the connection, close it. Every connection records what it parsed and
whether it saw the peer close, so a test can assert what balancer did to the backend side.

    backend = await Backend(serve(lambda req: ok(req.target))).start()
    ...
    await backend.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable

HEAD_LIMIT = 1 << 20


class Request:
    """One request as the backend parsed it (its own framing: Content-Length or chunked, else none)."""

    __slots__ = ("body", "headers", "method", "raw", "target", "version")

    def __init__(self, raw_head: bytes) -> None:
        lines = raw_head[:-4].split(b"\r\n")
        self.method, self.target, self.version = [*lines[0].split(b" ", 2), b"", b""][:3]
        self.headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.append((name, value.strip()))
        self.body = b""
        self.raw = raw_head

    def header(self, name: bytes) -> bytes | None:
        """The first value of field ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)

    def count(self, name: bytes) -> int:
        name = name.lower()
        return sum(1 for n, _ in self.headers if n.lower() == name)

    def __repr__(self) -> str:
        return f"<Request {self.method!r} {self.target!r} body={len(self.body)}>"


class Conn:
    """One accepted connection, handed to the script."""

    def __init__(self, backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 index: int) -> None:
        self.backend = backend
        self.reader = reader
        self.writer = writer
        self.index = index
        self.requests: list[Request] = []      # complete requests parsed on this connection
        self.heads: list[Request] = []         # request heads parsed (body possibly not read)
        self.peer_closed = asyncio.Event()     # a read saw EOF or a reset from balancer
        self.bytes_read = 0

    async def read_head(self, timeout: float | None = None) -> Request | None:
        """The next request head (body not read); None when the peer closed first.
        Raises TimeoutError after ``timeout`` seconds without a complete head."""
        try:
            async with asyncio.timeout(timeout):
                head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.peer_closed.set()
            return None
        self.bytes_read += len(head)
        request = Request(head)
        self.heads.append(request)
        self.backend.heads.append(request)
        return request

    async def read_body(self, request: Request) -> bool:
        """Read ``request``'s body by its own framing; False when the peer closed before its end."""
        try:
            length = request.header(b"content-length")
            if length is not None:
                request.body = await self.reader.readexactly(int(length))
            elif (request.header(b"transfer-encoding") or b"").lower() == b"chunked":
                raw = b""
                while True:
                    line = await self.reader.readuntil(b"\r\n")
                    raw += line
                    size = int(line.split(b";")[0], 16)
                    raw += await self.reader.readexactly(size + 2)
                    if size == 0:
                        if not raw.endswith(b"\r\n\r\n"):      # trailer fields
                            raw += await self.reader.readuntil(b"\r\n\r\n")
                        break
                request.body = raw
        except (asyncio.IncompleteReadError, ConnectionError):
            self.peer_closed.set()
            return False
        self.bytes_read += len(request.body)
        request.raw += request.body
        self.requests.append(request)
        self.backend.requests.append(request)
        return True

    async def read_request(self, timeout: float | None = None) -> Request | None:
        """The next complete request (head and framed body); None when the peer closed first.
        ``timeout`` bounds the wait for the head (TimeoutError)."""
        request = await self.read_head(timeout)
        if request is None or not await self.read_body(request):
            return None
        return request

    async def until_eof(self) -> None:
        """Read and drop everything until balancer closes the connection (then ``peer_closed``)."""
        try:
            while data := await self.reader.read(1 << 16):
                self.bytes_read += len(data)
        except ConnectionError:
            pass
        self.peer_closed.set()

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a kernel does for a socket closed with unread data."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    def close_idle(self) -> None:
        """A keep-alive timer's close. Bytes that arrived but were never read (a request racing the
        timer) make it a reset, as on a real server, where the kernel resets a socket closed with
        unread data; otherwise an orderly close (FIN)."""
        self.backend.idle_closes += 1
        # StreamReader's buffer: what the transport read from the socket but the script did not.
        if getattr(self.reader, "_buffer", b""):
            self.reset()
        else:
            self.close()


Script = Callable[[Conn], Awaitable[None]]


class Backend:
    """A listening socket on 127.0.0.1 port 0 that runs ``script(conn)`` for every connection, then
    closes it. ``connections``, ``heads`` and ``requests`` record everything, in arrival order."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections: list[Conn] = []
        self.heads: list[Request] = []
        self.requests: list[Request] = []
        self.idle_closes = 0                  # connections closed by serve(idle_close=...)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> Backend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=HEAD_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def targets(self) -> list[bytes]:
        """The request targets of every parsed request head, in arrival order."""
        return [h.target for h in self.heads]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn(self, reader, writer, len(self.connections))
        self.connections.append(conn)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            conn.peer_closed.set()
        except asyncio.CancelledError:
            # aclose() ends scripts that wait forever. Python 3.11's start_server callback logs an
            # error for a cancelled handler task, so the task ends normally instead.
            if not self._closing:
                raise
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def aclose(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in self.connections:
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()


# --- building blocks for scripts ----------------------------------------------------------------------

def response(status: int = 200, body: bytes = b"", fields: bytes = b"", reason: bytes = b"OK") -> bytes:
    """A complete Content-Length-framed response."""
    return b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, reason, fields, len(body), body)


def ok_path(request: Request) -> bytes:
    """200 whose body names the request target the backend parsed."""
    return response(200, request.target)


def serve(respond: Callable[[Request], bytes | None] = ok_path, idle_close: float | None = None) -> Script:
    """Keep-alive loop: parse each request, write ``respond(request)``; None closes without answering.
    ``idle_close``: close a connection that has been idle that long (as servers' keep-alive timers do)."""

    async def script(conn: Conn) -> None:
        while True:
            try:
                request = await conn.read_request(timeout=idle_close)
            except TimeoutError:
                conn.close_idle()             # idle too long: the backend closes, as servers do
                return
            if request is None:
                return
            reply = respond(request)
            if reply is None:
                return
            conn.write(reply)
            await conn.drain()

    return script


async def silent(conn: Conn) -> None:
    """Parse requests, never answer; ``peer_closed`` is set when balancer closes the connection."""
    while await conn.read_request() is not None:
        pass
