#!/usr/bin/env python3
"""Which request parser is cheaper for the front door: httptools' or aiohttp's public one.

Parses the request wrk sends (and one with a browser's dozen header fields) N times with each, doing
what the front door needs of a parse: method, target, version, raw header pairs and keep-alive.
httptools calls back into Python per field; aiohttp's C parser returns a message object with a
case-insensitive multidict we would not use. Prints µs per request for each.

Usage: .venv/bin/python bench/parsers.py [-n 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httptools
from aiohttp.http import HttpRequestParser as AiohttpRequestParser

SMALL = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18090\r\n\r\n"
BROWSER = (b"GET /static/app.js?v=3 HTTP/1.1\r\nHost: shop.example.com\r\nUser-Agent: Mozilla/5.0 (X11; "
           b"Linux x86_64) Gecko/20100101 Firefox/128.0\r\nAccept: */*\r\nAccept-Language: en-GB,en;q=0.5"
           b"\r\nAccept-Encoding: gzip, deflate, br\r\nReferer: https://shop.example.com/\r\nConnection: "
           b"keep-alive\r\nCookie: session=abcdef0123456789; theme=dark\r\nSec-Fetch-Dest: script\r\n"
           b"Sec-Fetch-Mode: no-cors\r\nSec-Fetch-Site: same-origin\r\nPriority: u=2\r\n\r\n")


class Sink:
    """What the front door's callbacks do, minus the checks."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = 0

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.done += 1

    def on_message_complete(self) -> None:
        pass


def with_httptools(data: bytes, n: int) -> float:
    sink = Sink()
    parser = httptools.HttpRequestParser(sink)
    started = time.perf_counter()
    for _ in range(n):
        parser.feed_data(data)
        parser.get_method()
        parser.get_http_version()
        parser.should_keep_alive()
    elapsed = time.perf_counter() - started
    assert sink.done == n
    return elapsed / n * 1e6


class _Protocol:
    """The least aiohttp's parser needs of its protocol for bodiless requests."""

    _reading_paused = False
    transport = None


def with_aiohttp(data: bytes, n: int) -> float:
    loop = asyncio.new_event_loop()
    try:
        parser: Any = AiohttpRequestParser(_Protocol(), loop, 2 ** 16, max_line_size=8190,
                                           max_field_size=8190)
        started = time.perf_counter()
        for _ in range(n):
            messages, _, _ = parser.feed_data(data)
            message = messages[0][0]
            _ = (message.method, message.path, message.version, message.raw_headers, message.should_close)
        elapsed = time.perf_counter() - started
    finally:
        loop.close()
    return elapsed / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200_000)
    n = ap.parse_args().n
    for name, data in (("wrk's request (1 field)", SMALL), ("a browser's request (12 fields)", BROWSER)):
        ht = min(with_httptools(data, n) for _ in range(3))
        ah = min(with_aiohttp(data, n) for _ in range(3))
        print(f"{name:34} httptools {ht:5.2f} µs   aiohttp {ah:5.2f} µs")


if __name__ == "__main__":
    main()
