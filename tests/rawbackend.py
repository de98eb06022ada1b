"""A byte-level HTTP backend for tests: records exactly what it received, answers what it is told."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawBackend:
    """Reads one request head (and a Content-Length body) per exchange; replies with ``respond(data)``.

    ``received`` holds the raw bytes of every request, in order. ``respond`` returns the bytes to send
    (``None`` = close without answering).
    """

    def __init__(self, respond: Callable[[bytes], bytes | None] = lambda _: OK) -> None:
        self.respond = respond
        self.received: list[bytes] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RawBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                data = head
                lower = head.lower()
                if b"\r\ncontent-length:" in lower:
                    length = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
                    data += await reader.readexactly(length)
                elif b"\r\ntransfer-encoding: chunked" in lower:
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        data += line
                        size = int(line.split(b";")[0], 16)
                        if size == 0:
                            while True:
                                trailer = await reader.readuntil(b"\r\n")
                                data += trailer
                                if trailer == b"\r\n":
                                    break
                            break
                        data += await reader.readexactly(size + 2)
                self.received.append(data)
                reply = self.respond(data)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
