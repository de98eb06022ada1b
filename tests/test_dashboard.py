"""The dashboard page: self-contained, served without a token, and alive in headless Chromium.

The Chromium tests need Debian's ``chromium`` package (``apt-get install chromium``) and are skipped
without it. Set ``DASHBOARD_SCREENSHOT=/some/file.png`` to keep the screenshot for a human look.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import os
import re
import shutil
import signal
import struct
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from balancer.lb.registry import AdminState
from tests.observe_helpers import config, get

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
_runs = itertools.count()
GREEN, AMBER = (0x3F, 0xB9, 0x50), (0xD2, 0x99, 0x22)        # the 'up' and 'draining' badges


async def test_page_is_self_contained_and_open(backend_ports: Any, balancer_factory: Any) -> None:
    """GET / is served without the token and loads nothing from elsewhere (no CDN, works offline)."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(config(ports, admin="{host: 127.0.0.1, port: 0, token: t}"))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{balancer.admin.bound_port}/") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            page = await resp.text()
    assert "<script>" in page and "<style>" in page
    assert not re.search(r"""<script[^>]+src=|<link\b|@import|url\(|src=["']http""", page)


async def chromium(tmp_path: Path, *args: str, timeout: float = 60) -> bytes:
    """Run headless Chromium once; kill its whole process group if it overruns."""
    assert CHROMIUM is not None
    profile = tmp_path / f"profile{next(_runs)}"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", "--window-size=1400,900", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        # Its helpers (zygote, renderer) share its process group; none may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    return out


def rows(dom: str) -> dict[str, dict[str, str]]:
    """Backend rows of the rendered page: id -> {state, requests}."""
    found = {}
    for m in re.finditer(r'<tr data-backend="([^"]+)"[^>]*>(.*?)</tr>', dom, re.S):
        state = re.search(r'<span class="badge s-(\w+)">', m[2])
        requests = re.search(r'<td class="requests">(\d+)</td>', m[2])
        found[html.unescape(m[1])] = {"state": state[1] if state else "",
                                      "requests": requests[1] if requests else ""}
    return found


def png_colours(data: bytes) -> set[tuple[int, int, int]]:
    """The RGB colours of an 8-bit RGB/RGBA PNG (enough of a decoder for Chromium's screenshots)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * channels
    prev, colours = bytearray(stride), set[tuple[int, int, int]]()
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        colours.update((line[x], line[x + 1], line[x + 2]) for x in range(0, stride, channels))
        prev = line
    return colours


@needs_chromium
async def test_dashboard_shows_every_backend_and_updates(backend_ports: Any, balancer_factory: Any,
                                                          tmp_path: Path) -> None:
    """In headless Chromium the page lists every backend with its state, and counts traffic sent later."""
    ports = await backend_ports(3)
    balancer = await balancer_factory(config(ports, admin="{host: 127.0.0.1, port: 0, token: t0k}"))
    drained = f"web/127.0.0.1:{ports[2]}"
    balancer.registry.set_admin(balancer.registry.find(drained), AdminState.DRAINING)
    page = f"http://127.0.0.1:{balancer.admin.bound_port}/#token=t0k"

    before = rows((await chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", page)).decode())
    assert set(before) == {f"web/127.0.0.1:{p}" for p in ports}
    assert [before[f"web/127.0.0.1:{p}"]["state"] for p in ports] == ["up", "up", "draining"]
    assert {r["requests"] for r in before.values()} == {"0"}

    async with aiohttp.ClientSession() as session:
        assert await get(session, f"http://127.0.0.1:{balancer.port}/slow?ms=20", 10) == [200] * 10
    after = rows((await chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", page)).decode())
    assert [after[f"web/127.0.0.1:{p}"]["requests"] for p in ports] == ["5", "5", "0"]

    shot = tmp_path / "dashboard.png"
    await chromium(tmp_path, "--virtual-time-budget=3000", f"--screenshot={shot}", page)
    if os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, os.environ["DASHBOARD_SCREENSHOT"])
    colours = png_colours(shot.read_bytes())
    assert GREEN in colours and AMBER in colours, "no state badges in the screenshot"
    assert len(colours) > 50, "the screenshot looks blank"


@needs_chromium
async def test_dashboard_says_when_the_token_is_missing(backend_ports: Any, balancer_factory: Any,
                                                        tmp_path: Path) -> None:
    """Without the token in the fragment the page explains how to pass it instead of staying blank."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(config(ports, admin="{host: 127.0.0.1, port: 0, token: t0k}"))
    dom = (await chromium(tmp_path, "--virtual-time-budget=2000", "--dump-dom",
                          f"http://127.0.0.1:{balancer.admin.bound_port}/")).decode()
    assert "unauthorized: open this page as /#token=" in dom
    assert rows(dom) == {}
