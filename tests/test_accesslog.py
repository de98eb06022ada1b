"""The access log: its two formats, the writer thread, and the end-to-end path to a file."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import aiohttp

from balancer.dataplane.record import RequestRecord
from balancer.observe.accesslog import AccessLog, format_json, format_text
from tests.conftest import async_wait_until, raw_request
from tests.observe_helpers import config, get

TEXT_LINE = re.compile(
    r'^(?P<client>\S+) - - \[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3} \+0000)\] '
    r'"(?P<method>\S+) (?P<target>[^"]*) HTTP/(?P<version>\d\.\d)" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)" rid=(?P<rid>\S+) '
    r"route=(?P<route>\S+) pool=(?P<pool>\S+) backend=(?P<backend>\S+) upstream_status=(?P<us>\S+) "
    r"attempts=(?P<attempts>\d+) queue_ms=[\d.]+ connect_ms=[\d.]+ ttfb_ms=[\d.]+ "
    r'total_ms=(?P<total>[\d.]+) error=(?P<error>\S+) listener=(?P<listener>\S+) host="(?P<host>[^"]*)"$')


def sample_record() -> RequestRecord:
    r = RequestRecord(100.0, 1700000000.25, "GET", b'/a?q="x"\\', "10.0.0.7")
    r.route, r.pool, r.backend = "main", "web", "web/2"
    r.status, r.upstream_status, r.attempts, r.request_id = 502, 0, 3, b"abc-00000001"
    r.bytes_in, r.bytes_out, r.error = 5, 17, "connect_error"
    r.queue_s, r.connect_s, r.ttfb_s, r.total_s = 0.0001, 0.002, 0.0, 0.0125
    return r


def test_text_format_is_one_parsable_line() -> None:
    """Text lines are combined-log-like, quotes in the target escaped, every field present."""
    line = format_text(sample_record())
    m = TEXT_LINE.match(line)
    assert m is not None, line
    assert m["time"] == "14/Nov/2023:22:13:20.250 +0000"
    assert m["target"] == "/a?q=\\x22x\\x22\\x5c"
    assert (m["status"], m["bytes"], m["rid"], m["backend"]) == ("502", "17", "abc-00000001", "web/2")
    assert (m["us"], m["attempts"], m["total"], m["error"]) == ("-", "3", "12.500", "connect_error")


def test_json_format_has_every_field() -> None:
    """JSON lines carry the same fields with an ISO 8601 UTC time."""
    data = json.loads(format_json(sample_record()))
    assert data["time"] == "2023-11-14T22:13:20.250Z"
    assert data["target"] == '/a?q="x"\\'
    assert (data["status"], data["attempts"], data["request_id"]) == (502, 3, "abc-00000001")
    assert (data["connect_ms"], data["total_ms"], data["error"]) == (2.0, 12.5, "connect_error")


async def test_writer_thread_flushes_and_closes() -> None:
    """Observed records reach the stream from the writer thread; aclose writes what is pending."""
    out = io.StringIO()
    access_log = AccessLog("json", stream=out, flush_interval_s=0.01)
    access_log.start()
    access_log.observe(sample_record())
    await async_wait_until(lambda: out.getvalue().count("\n") == 1, timeout=5, message="first line")
    access_log.observe(sample_record())
    await access_log.aclose()
    assert [json.loads(x)["backend"] for x in out.getvalue().splitlines()] == ["web/2", "web/2"]
    assert access_log.written == 2


def test_a_full_buffer_drops_instead_of_growing() -> None:
    """Beyond max_pending, records are counted as dropped, never queued without bound."""
    access_log = AccessLog(max_pending=2)
    for _ in range(5):
        access_log.observe(sample_record())
    assert access_log.dropped == 3


async def test_off_by_default_costs_no_observer(backend_ports: Any, balancer_factory: Any) -> None:
    """Without log.access_log the proxy has no access-log observer at all."""
    ports = await backend_ports(1)
    balancer = await balancer_factory(config(ports))
    assert balancer.access_log is None
    assert not any(getattr(o, "__self__", None).__class__ is AccessLog for o in balancer.proxy.observers)


async def test_json_lines_to_a_file(backend_ports: Any, balancer_factory: Any, tmp_path: Path) -> None:
    """With access_log on, each request writes one JSON line matching its response."""
    ports = await backend_ports(2)
    path = tmp_path / "access.log"
    extra = f"log: {{access_log: true, access_log_format: json, access_log_path: '{path}'}}\n"
    balancer = await balancer_factory(config(ports, extra=extra))
    ids = []
    async with aiohttp.ClientSession() as session:
        for target in ("/", "/status/503", "/bytes/123", "/echo?x=1"):
            async with session.get(f"http://127.0.0.1:{balancer.port}{target}") as resp:
                await resp.read()
                ids.append((target, resp.status, resp.headers["X-Request-ID"]))
    lines = await async_wait_until(lambda: path.exists() and len(path.read_text().splitlines()) == 4
                                   and path.read_text().splitlines(), timeout=5, message="4 lines")
    for (target, status, rid), line in zip(ids, lines, strict=True):
        data = json.loads(line)
        assert (data["target"], data["status"], data["request_id"]) == (target, status, rid)
        assert data["backend"] in {f"web/127.0.0.1:{p}" for p in ports}
        assert data["upstream_status"] == status and data["attempts"] == 1
        assert data["total_ms"] >= data["ttfb_ms"] > 0
    assert json.loads(lines[2])["bytes_out"] == 123


async def test_text_lines_to_a_file(backend_ports: Any, balancer_factory: Any, tmp_path: Path) -> None:
    """The text format, end to end, including requests balancer itself answered (no route; an HTTP
    version it does not serve, logged as the version the client sent)."""
    ports = await backend_ports(1)
    path = tmp_path / "access.log"
    extra = f"""log: {{access_log: true, access_log_path: '{path}'}}
routes:
  - {{path_prefix: /app/, pool: web, name: app}}
"""
    balancer = await balancer_factory(config(ports, extra=extra))
    async with aiohttp.ClientSession() as session:
        assert await get(session, f"http://127.0.0.1:{balancer.port}/app/x") == [404]   # backend's 404
        assert await get(session, f"http://127.0.0.1:{balancer.port}/other") == [404]   # no route
    answer = await raw_request(balancer.port, b"GET /app/x HTTP/2.0\r\nHost: h\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 505 ")
    lines = await async_wait_until(lambda: path.exists() and len(path.read_text().splitlines()) == 3
                                   and path.read_text().splitlines(), timeout=5, message="3 lines")
    first, second, third = (TEXT_LINE.match(line) for line in lines)
    assert first is not None and second is not None and third is not None, lines
    assert (third["version"], third["status"]) == ("2.0", "505"), lines[2]
    assert first["version"] == "1.1" and "aiohttp" in first["agent"] and first["referer"] == "-"
    assert (first["route"], first["backend"], first["us"]) == ("app", f"web/127.0.0.1:{ports[0]}", "404")
    assert (second["route"], second["backend"], second["error"]) == ("-", "-", "no_route")


def test_both_formats_name_the_host_and_the_listener() -> None:
    record = sample_record()
    record.headers = [(b"Host", b"shop.example.com"), (b"Accept", b"*/*")]
    record.listener = "https"
    m = TEXT_LINE.match(format_text(record))
    assert m is not None and (m["host"], m["listener"], m["route"]) == ("shop.example.com", "https", "main")
    data = json.loads(format_json(record))
    assert (data["host"], data["listener"], data["route"]) == ("shop.example.com", "https", "main")
