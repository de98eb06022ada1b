"""The worker's load-test knobs and httpbin paths.

The grammar and the random draws are tested on the pure functions (thousands of draws, seeded, with
generous bounds); the HTTP behaviour on the app served in-process on 127.0.0.1 port 0 (raw sockets
where the framing or the connection itself is the point); the command line through parse_args, and
once through a real `python -m backends` process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from backends.app import PATTERN, make_app
from backends.knobs import (
    KNOB_NAMES,
    MAX_DELAY_S,
    Fixed,
    KnobError,
    Knobs,
    Lognormal,
    StatusChoice,
    Uniform,
    decide,
    draw_delay,
    parse_delay,
    parse_duration,
    parse_header,
    parse_knobs,
    parse_size,
    parse_statuses,
)
from backends.service import KNOBS_REMEMBERED, Service
from backends.worker import parse_args

REPO = Path(__file__).resolve().parent.parent
DRAWS = 5000


def pattern(n: int) -> bytes:
    """The first `n` bytes the worker generates."""
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def chunked_body(body: bytes, chunk: int) -> bytes:
    """`body` in chunked framing, `chunk` bytes a chunk."""
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


# --- grammar ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("20ms", 0.02), ("1.5s", 1.5), ("0.02", 0.02), ("2", 2.0), (".5s", 0.5), ("60s", 60.0)]
)
def test_durations_take_ms_s_or_bare_seconds(text: str, seconds: float) -> None:
    """A duration is NUMBER with ms or s; a bare number is seconds (as httpbin and balancer's config)."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [("100", 100), ("64KiB", 65536), ("64k", 65536), ("1MB", 10**6), ("1mib", 2**20), ("1.5KiB", 1536),
     ("1GiB", 2**30), ("10 B", 10)],
)
def test_sizes_take_decimal_and_binary_units(text: str, size: int) -> None:
    """B, KB, MB, GB are powers of 1000; KiB, MiB, GiB and nginx's k, m, g are powers of 1024."""
    assert parse_size(text) == size


def test_delay_forms() -> None:
    """Fixed, uniform range and lognormal p50:p99 parse to their specs."""
    assert parse_delay("20ms") == Fixed(0.02)
    assert parse_delay("10ms-200ms") == Uniform(0.01, 0.2)
    assert parse_delay("lognormal:50ms:200ms") == Lognormal(0.05, 0.2)


def test_status_lists_and_weights() -> None:
    """A comma list of codes, each with an optional weight (httpbin's form); weights default to 1."""
    assert parse_statuses("503") == StatusChoice((503,), (1.0,))
    assert parse_statuses("200,503") == StatusChoice((200, 503), (1.0, 1.0))
    assert parse_statuses("200:0.9,503:0.1") == StatusChoice((200, 503), (0.9, 0.1))


def test_headers_split_at_the_first_colon() -> None:
    """Name:value, the value trimmed and free to contain commas and colons."""
    assert parse_header("Cache-Control: public, max-age=60") == ("Cache-Control", "public, max-age=60")
    assert parse_header("X-Time:12:30") == ("X-Time", "12:30")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("delay", "abc"), ("delay", "61s"), ("delay", "-5ms"), ("delay", "20ms-10ms"), ("delay", "lognormal:0:1s"),
        ("delay", "lognormal:200ms:50ms"), ("delay", "lognormal:50ms"), ("delay", "1e3"), ("drip", "x"),
        ("size", "2GiB"), ("size", "-1"), ("size", "1TB"), ("status", "99"), ("status", "600"),
        ("status", "200,abc"), ("status", "200:-1"), ("status", "200:0"), ("status", "²00"),
        ("error_rate", "1.5"), ("error_rate", "nan"), ("error_status", "abc"), ("reset_rate", "-0.1"),
        ("size", "9" * 400), ("status", "200:1e308,503:1e308"), ("chunked", "2"), ("close", "yes"), ("headers", "NoColon"), ("headers", "Bad Name:x"),
        ("headers", "Content-Length:5"), ("headers", "Transfer-Encoding:chunked"), ("headers", "X-A:a\rb"),
    ],
)
def test_bad_values_are_refused_with_the_knob_named(name: str, text: str) -> None:
    """Every value outside the grammar or its bounds is a KnobError that names the knob, on one line."""
    with pytest.raises(KnobError) as caught:
        parse_knobs([(name, text)])
    assert str(caught.value).startswith(f"{name}: ")
    assert "\n" not in str(caught.value)


def test_every_knob_has_a_parser() -> None:
    """The names the query and the command line accept are exactly the fields of Knobs."""
    assert {field.name for field in dataclasses.fields(Knobs)} == KNOB_NAMES


def test_query_knobs_override_defaults_and_other_names_are_ignored() -> None:
    """A knob in the query replaces the default; the last of a repeated knob wins, except headers,
    which all count and replace the default headers as a whole; non-knob names are ignored."""
    defaults = parse_knobs([("delay", "1s"), ("status", "503"), ("headers", "X-Default:1")])
    knobs = parse_knobs(
        [("status", "200"), ("page", "2"), ("status", "201"), ("headers", "A:1"), ("headers", "A:2")], defaults
    )
    assert knobs.delay == Fixed(1.0)
    assert knobs.status == StatusChoice((201,), (1.0,))
    assert knobs.headers == (("A", "1"), ("A", "2"))
    assert parse_knobs([("page", "2")], defaults) is defaults


def test_parsed_queries_are_remembered_and_bounded() -> None:
    """A query string is parsed once and remembered (load tests repeat a few), at most
    KNOBS_REMEMBERED of them; a bad one is refused every time."""
    service = Service(defaults=parse_knobs([("status", "503")]))
    knobs = service.knobs_for("delay=1s&page=2")
    assert service.knobs_for("delay=1s&page=2") is knobs
    assert (knobs.delay, knobs.status) == (Fixed(1.0), StatusChoice((503,), (1.0,)))
    assert service.knobs_for("delay=1s&page=2", with_defaults=False).status is None
    for _ in range(2):
        with pytest.raises(KnobError):
            service.knobs_for("delay=never")
    for page in range(KNOBS_REMEMBERED + 10):
        service.knobs_for(f"page={page}")
    assert len(service._parsed) <= KNOBS_REMEMBERED


# --- draws -----------------------------------------------------------------------------------------


def sample(spec: str, n: int = 20_000, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    parsed = parse_delay(spec)
    return [draw_delay(parsed, rng) for _ in range(n)]


def quantile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def test_fixed_delay_is_always_the_value() -> None:
    """delay=20ms draws 20 ms every time."""
    assert set(sample("20ms", 100)) == {0.02}


def test_uniform_delay_covers_its_range_evenly() -> None:
    """delay=10ms-200ms stays in the range, with mean and quartiles where a uniform puts them."""
    values = sample("10ms-200ms")
    assert 0.01 <= min(values) and max(values) <= 0.2
    assert statistics.fmean(values) == pytest.approx(0.105, rel=0.03)
    assert quantile(values, 0.25) == pytest.approx(0.0575, rel=0.05)
    assert quantile(values, 0.75) == pytest.approx(0.1525, rel=0.05)


def test_lognormal_delay_has_the_requested_median_and_p99() -> None:
    """delay=lognormal:50ms:200ms: half the draws under 50 ms, 1 % over 200 ms (generous bounds)."""
    values = sample("lognormal:50ms:200ms")
    assert quantile(values, 0.5) == pytest.approx(0.05, rel=0.05)
    assert quantile(values, 0.99) == pytest.approx(0.2, rel=0.15)
    assert Lognormal(0.05, 0.2).sigma == pytest.approx(0.5959, rel=1e-3)  # ln(4) / 2.3263


def test_lognormal_draws_are_cut_at_60_seconds() -> None:
    """A tail beyond the 60 s bound is cut to 60 s, never more."""
    values = sample("lognormal:30s:59s", 5000)
    assert max(values) == MAX_DELAY_S
    assert quantile(values, 0.5) == pytest.approx(30, rel=0.05)


def test_error_rate_answers_that_fraction_with_error_status() -> None:
    """error_rate=0.05&error_status=503: about 5 % of draws are a 503 error, the rest are not errors."""
    knobs = parse_knobs([("error_rate", "0.05"), ("error_status", "503")])
    rng = random.Random(3)
    errors = Counter(decide(knobs, rng).error_status for _ in range(DRAWS))
    assert set(errors) == {None, 503}
    assert 0.035 * DRAWS <= errors[503] <= 0.065 * DRAWS


def test_reset_rate_resets_that_fraction_and_never_also_errors() -> None:
    """reset_rate=0.1 beside error_rate=1: about 10 % resets, every other draw an error."""
    knobs = parse_knobs([("reset_rate", "0.1"), ("error_rate", "1")])
    rng = random.Random(4)
    plans = [decide(knobs, rng) for _ in range(DRAWS)]
    resets = sum(plan.is_reset for plan in plans)
    assert 0.08 * DRAWS <= resets <= 0.12 * DRAWS
    assert all((plan.error_status is None) == plan.is_reset for plan in plans)


@pytest.mark.parametrize(("spec", "share_503"), [("200,503", 0.5), ("200:0.9,503:0.1", 0.1), ("503", 1.0)])
def test_status_lists_pick_by_weight(spec: str, share_503: float) -> None:
    """status=200,503 picks each half the time; 200:0.9,503:0.1 picks 503 one time in ten."""
    knobs = parse_knobs([("status", spec)])
    rng = random.Random(5)
    picks = Counter(decide(knobs, rng).status for _ in range(DRAWS))
    assert set(picks) <= {200, 503}
    assert picks[503] / DRAWS == pytest.approx(share_503, abs=0.03)


# --- the app, in process ---------------------------------------------------------------------------


@dataclass
class Served:
    port: int
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, target: str, method: str = "GET", **kwargs: Any) -> tuple[int, CIMultiDict[str], bytes]:
        """(status, headers, body) of one request through the shared client session."""
        async with self.session.request(method, self.url + target, **kwargs) as response:
            return response.status, CIMultiDict(response.headers), await response.read()


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Factory: the worker app (id "k1") with a given Service, on 127.0.0.1 port 0, plus a client."""
    runners: list[web.AppRunner] = []
    session = aiohttp.ClientSession()

    async def start(service: Service | None = None) -> Served:
        runner = web.AppRunner(make_app("k1", 0, service), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return Served(int(runner.addresses[0][1]), session)

    yield start
    await session.close()
    for runner in runners:
        await runner.cleanup()


async def raw_exchange(port: int, request: bytes) -> tuple[bytes, list[tuple[float, int]]]:
    """Send `request` verbatim; read to EOF; return the bytes and (arrival time, length) of each read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        data, reads = bytearray(), []
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                data += chunk
                reads.append((time.monotonic(), len(chunk)))
        return bytes(data), reads
    finally:
        writer.close()


async def test_status_and_delay_apply_to_the_root(serve: Serve) -> None:
    """/?status=503&delay=100ms answers 503 with the worker's body, no sooner than 100 ms."""
    served = await serve()
    started = time.monotonic()
    status, headers, body = await served.get("/?status=503&delay=100ms")
    assert time.monotonic() - started >= 0.1
    assert (status, body, headers["X-Backend"]) == (503, b"worker k1 port 0\n", "k1")


async def test_delay_waits_through_the_injected_sleep(serve: Serve) -> None:
    """The drawn delay goes to the service's sleep: delay=1.5s asks for 1.5 s (here answered at once)."""
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    served = await serve(Service(sleep=fake_sleep))
    assert (await served.get("/echo?delay=1.5s"))[0] == 200
    assert slept == [1.5]


async def test_knobs_apply_to_existing_endpoints(serve: Serve) -> None:
    """/echo keeps its report under status and headers knobs; /status/200?status=418 takes the knob."""
    served = await serve()
    status, headers, body = await served.get("/echo/x?status=202&headers=X-Extra:yes")
    assert (status, headers["X-Extra"], json.loads(body)["raw_path"]) == (202, "yes", "/echo/x?status=202&headers=X-Extra:yes")
    assert (await served.get("/status/200?status=418"))[0] == 418
    status, _, body = await served.get("/echo?status=204")
    assert (status, body) == (204, b"")


async def test_error_rate_one_answers_the_error_instead_of_the_endpoint(serve: Serve) -> None:
    """error_rate=1 answers error_status (default 500) with a short body; the endpoint does not run."""
    served = await serve()
    assert (await served.get("/echo?error_rate=1"))[::2] == (500, b"error 500\n")
    assert (await served.get("/bytes/10?error_rate=1&error_status=503"))[::2] == (503, b"error 503\n")
    assert (await served.get("/?error_rate=0"))[0] == 200


@pytest.mark.parametrize("target", ["/", "/any/path"])
async def test_size_sends_that_many_pattern_bytes(serve: Serve, target: str) -> None:
    """size=64KiB on / or an unrouted path sends 65536 bytes of the pattern with Content-Length."""
    served = await serve()
    status, headers, body = await served.get(f"{target}?size=64KiB")
    assert (status, headers["Content-Length"], body) == (200, "65536", pattern(65536))
    status, headers, body = await served.get(f"{target}?size=64KiB", method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, "65536", b"")


async def test_chunked_uses_chunked_framing_on_http_1_1_only(serve: Serve) -> None:
    """chunked=1 sends Transfer-Encoding: chunked; an HTTP/1.0 request still gets Content-Length."""
    served = await serve()
    status, headers, body = await served.get("/?size=3000&chunked=1")
    assert (status, headers.get("Transfer-Encoding"), "Content-Length" in headers) == (200, "chunked", False)
    assert body == pattern(3000)
    assert (await served.get("/echo?chunked=1"))[1]["Transfer-Encoding"] == "chunked"
    data, _ = await raw_exchange(served.port, b"GET /?size=10&chunked=1 HTTP/1.0\r\nHost: t\r\n\r\n")
    assert b"\r\nContent-Length: 10\r\n" in data and data.endswith(b"\r\n\r\n" + pattern(10))


async def test_drip_spaces_the_body_chunks(serve: Serve) -> None:
    """size=4KiB&chunked=1&drip=60ms: four 1 KiB chunks, three pauses: ≥ 180 ms from first to last."""
    served = await serve()
    request = b"GET /?size=4KiB&chunked=1&drip=60ms HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    data, reads = await raw_exchange(served.port, request)
    assert data.partition(b"\r\n\r\n")[2] == chunked_body(pattern(4096), 1024)
    spread = reads[-1][0] - reads[0][0]
    assert 0.17 <= spread < 3.0
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(reads)]
    assert sum(gap >= 0.04 for gap in gaps) >= 3


async def test_close_closes_the_connection_after_the_response(serve: Serve) -> None:
    """close=1: `Connection: close`, the whole response, then the worker closes (EOF, not a reset)."""
    served = await serve()
    data, _ = await raw_exchange(served.port, b"GET /?close=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in data
    assert data.endswith(b"worker k1 port 0\n")


@pytest.mark.parametrize("target", ["/", "/echo", "/no/such/path"])
async def test_reset_rate_one_resets_without_a_byte(serve: Serve, target: str) -> None:
    """reset_rate=1: the connection is reset (RST, SO_LINGER 0) and not one response byte is sent."""
    served = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    received = bytearray()
    try:
        writer.write(f"GET {target}?reset_rate=1 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    received += chunk
    finally:
        writer.close()
    assert received == b""
    assert (await served.get("/"))[0] == 200  # the worker carries on


async def test_headers_are_added_or_replace_the_endpoints(serve: Serve) -> None:
    """Repeated headers= add fields (commas kept in values); a name the endpoint set is replaced."""
    served = await serve()
    async with served.session.get(
        served.url + "/",
        params=[("headers", "Cache-Control:public, max-age=60"), ("headers", "Set-Cookie:a=1"),
                ("headers", "Set-Cookie:b=2"), ("headers", "Content-Type:application/x-test")],
    ) as response:
        assert response.headers["Cache-Control"] == "public, max-age=60"
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert response.headers.getall("Content-Type") == ["application/x-test"]


@pytest.mark.parametrize(
    "query",
    ["delay=abc", "delay=61s", "size=2GiB", "status=99", "error_rate=2", "chunked=2", "close=maybe",
     "reset_rate=x", "headers=Content-Length:1", "drip=lognormal:1s", "error_status=700"],
)
async def test_bad_knob_values_are_a_400_with_one_line(serve: Serve, query: str) -> None:
    """A bad knob is a 400 whose body is one line naming it, never a 500; X-Backend is still set."""
    served = await serve()
    status, headers, body = await served.get(f"/echo?{query}")
    name = query.partition("=")[0]
    assert (status, headers["X-Backend"]) == (400, "k1")
    assert body.decode().startswith(f"{name}: ") and body.count(b"\n") == 1 and body.endswith(b"\n")


async def test_unrouted_paths_answer_only_when_asked(serve: Serve) -> None:
    """A plain worker keeps its 404 (and 405); a knob in the request or --catch-all make any path
    answer like /."""
    plain = await serve()
    assert (await plain.get("/api/users?page=2"))[0] == 404
    assert (await plain.get("/health", method="POST"))[0] == 405
    assert (await plain.get("/api/users?delay=0"))[::2] == (200, b"worker k1 port 0\n")
    assert (await plain.get("/api/users", method="POST", data=b"x" * 100))[0] == 404
    catch_all = await serve(Service(catch_all=True))
    assert (await catch_all.get("/api/users", method="DELETE"))[::2] == (200, b"worker k1 port 0\n")
    assert (await catch_all.get("/health", method="POST"))[0] == 405


async def test_defaults_apply_everywhere_but_health_and_the_query_overrides_them(serve: Serve) -> None:
    """Worker defaults status=503: / and unrouted paths answer 503, ?status=200 overrides, /health and
    /_control stay healthy."""
    served = await serve(Service(defaults=parse_knobs([("status", "503")])))
    assert (await served.get("/"))[0] == 503
    assert (await served.get("/some/path"))[0] == 503
    assert (await served.get("/?status=200"))[0] == 200
    assert (await served.get("/health"))[::2] == (200, b"ok")
    assert (await served.get("/_control/reset?status=503", method="PUT"))[0] == 200


# --- httpbin paths ---------------------------------------------------------------------------------


async def test_delay_path_waits_then_reports_the_request(serve: Serve) -> None:
    """/delay/0.1 answers after 100 ms with httpbin's report; /delay/61 is a 400."""
    served = await serve()
    started = time.monotonic()
    status, _, body = await served.get("/delay/0.1?x=1", method="POST", json={"a": [1]})
    assert time.monotonic() - started >= 0.1
    report = json.loads(body)
    assert status == 200
    assert (report["method"], report["args"], report["json"]) == ("POST", {"x": ["1"]}, {"a": [1]})
    assert report["url"] == f"{served.url}/delay/0.1?x=1"
    assert (await served.get("/delay/61"))[0] == 400
    assert (await served.get("/delay/200ms"))[0] == 200


async def test_status_path_takes_a_weighted_list(serve: Serve) -> None:
    """/status/200,503 answers both codes over many requests; /status/204 has no body; 1xx is a 400."""
    served = await serve(Service(rng=random.Random(1)))
    seen = Counter([(await served.get("/status/200,503"))[0] for _ in range(40)])
    assert set(seen) == {200, 503}
    assert (await served.get("/status/200:0,503:1"))[::2] == (503, b"status 503\n")
    assert (await served.get("/status/204"))[::2] == (204, b"")
    assert (await served.get("/status/100"))[0] == 400


@pytest.mark.parametrize(("n", "length"), [("1024", 1024), ("1KiB", 1024), ("1k", 1024), ("1KB", 1000)])
async def test_bytes_takes_a_number_or_units(serve: Serve, n: str, length: int) -> None:
    """/bytes/{n} takes httpbin's number or a size with units."""
    served = await serve()
    status, headers, body = await served.get(f"/bytes/{n}")
    assert (status, headers["Content-Length"], body) == (200, str(length), pattern(length))


async def test_bytes_bounds(serve: Serve) -> None:
    """/bytes above 1 GiB or not a size is a 400."""
    served = await serve()
    assert (await served.get("/bytes/2GiB"))[0] == 400
    assert (await served.get("/bytes/many"))[0] == 400


async def test_stream_bytes_sends_chunks_of_the_requested_size(serve: Serve) -> None:
    """/stream-bytes/5000?chunk_size=1000 is chunked, five 1000-byte chunks of the pattern."""
    served = await serve()
    data, _ = await raw_exchange(
        served.port, b"GET /stream-bytes/5000?chunk_size=1000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert body == chunked_body(pattern(5000), 1000)
    assert (await served.get("/stream-bytes/10?chunk_size=0"))[0] == 400


async def test_drip_path_spreads_numbytes_over_duration(serve: Serve) -> None:
    """/drip?duration=0.2&numbytes=5&code=201: 201, Content-Length 5, '*****' over ≥ 200 ms."""
    served = await serve()
    started = time.monotonic()
    status, headers, body = await served.get("/drip?duration=0.2&numbytes=5&code=201")
    assert time.monotonic() - started >= 0.2
    assert (status, headers["Content-Length"], body) == (201, "5", b"*****")
    assert (await served.get("/drip?numbytes=0"))[0] == 400


async def test_headers_ip_and_uuid(serve: Serve) -> None:
    """/headers, /ip and /uuid answer httpbin's JSON shapes."""
    served = await serve()
    _, _, body = await served.get("/headers", headers={"x-dup": "1"})
    assert json.loads(body)["headers"]["X-Dup"] == ["1"]
    _, _, body = await served.get("/ip", headers={"X-Forwarded-For": "10.1.2.3, 127.0.0.1"})
    assert json.loads(body) == {"origin": "10.1.2.3"}
    _, _, body = await served.get("/uuid")
    assert uuid.UUID(json.loads(body)["uuid"]).version == 4


async def test_anything_reports_method_args_headers_and_body(serve: Serve) -> None:
    """/anything/a/b reports a form, JSON, text or binary body the way go-httpbin does."""
    served = await serve()
    _, _, body = await served.get("/anything/a/b?q=1&q=2", method="PUT", data={"f": "v"})
    report = json.loads(body)
    assert (report["method"], report["args"], report["form"], report["data"]) == ("PUT", {"q": ["1", "2"]}, {"f": ["v"]}, "f=v")
    assert set(report) == {"args", "headers", "method", "origin", "url", "data", "files", "form", "json"}
    _, _, body = await served.get("/anything", method="POST", data=b"\x00\x01", headers={"Content-Type": "image/png"})
    assert json.loads(body)["data"] == "data:image/png;base64,AAE="
    status, _, _ = await served.get("/anything", method="POST", data=b"{", headers={"Content-Type": "application/json"})
    assert status == 400


async def test_cache_answers_304_to_matching_validators(serve: Serve) -> None:
    """/cache/60 sets Cache-Control, ETag and Last-Modified; a matching If-None-Match or a later
    If-Modified-Since gets 304, a stale one 200."""
    served = await serve()
    status, headers, _ = await served.get("/cache/60")
    assert (status, headers["Cache-Control"]) == (200, "public, max-age=60")
    etag, last_modified = headers["ETag"], headers["Last-Modified"]
    assert (await served.get("/cache/60", headers={"If-None-Match": f'"x", W/{etag}'}))[0] == 304
    assert (await served.get("/cache/60", headers={"If-None-Match": '"other"'}))[0] == 200
    assert (await served.get("/cache/60", headers={"If-Modified-Since": last_modified}))[0] == 304
    assert (await served.get("/cache/60", headers={"If-Modified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"}))[0] == 200
    assert (await served.get("/cache/x"))[0] == 400


async def test_etag_honours_if_none_match_and_if_match(serve: Serve) -> None:
    """/etag/abc: ETag "abc"; If-None-Match "abc" → 304; If-Match "xyz" → 412; If-Match "abc" → 200."""
    served = await serve()
    status, headers, body = await served.get("/etag/abc")
    assert (status, headers["ETag"], json.loads(body)["method"]) == (200, '"abc"', "GET")
    assert (await served.get("/etag/abc", headers={"If-None-Match": '"abc"'}))[0] == 304
    assert (await served.get("/etag/abc", headers={"If-Match": '"xyz"'}))[0] == 412
    assert (await served.get("/etag/abc", headers={"If-Match": '"abc"'}))[0] == 200
    assert (await served.get("/etag/abc", headers={"If-Match": 'W/"abc"'}))[0] == 412


# --- the command line ------------------------------------------------------------------------------


def test_knob_options_become_the_worker_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """--delay, --error-rate, repeated --headers and a bare --chunked set the defaults; so do BALANCER_*."""
    monkeypatch.setenv("BALANCER_RESET_RATE", "0.01")
    options = parse_args(
        ["--port", "8001", "--delay", "10ms-50ms", "--error-rate", "0.01", "--headers", "A:1", "--headers", "B:2",
         "--chunked", "--catch-all"]
    )
    knobs = options.knobs
    assert (knobs.delay, knobs.error_rate, knobs.reset_rate) == (Uniform(0.01, 0.05), 0.01, 0.01)
    assert (knobs.headers, knobs.chunked, options.catch_all) == ((("A", "1"), ("B", "2")), True, True)
    assert parse_args(["--port", "8001"]).knobs == parse_knobs([("reset_rate", "0.01")])


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--delay", "abc"], {}, "argument --delay: expected a duration"),
        (["--size", "2GiB"], {}, "argument --size: at most 1GiB"),
        ([], {"BALANCER_ERROR_RATE": "2"}, "argument --error-rate: expected a fraction"),
        ([], {"BALANCER_HEADERS": "ok:1\nbad"}, "BALANCER_HEADERS: headers: expected Name:value"),
    ],
)
def test_bad_knob_options_exit_2_naming_the_option(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str],
    message: str,
) -> None:
    """A bad knob option or environment value is argparse's exit 2 with the option named."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as caught:
        parse_args(["--port", "8001", *argv])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], int]]]:
    """Factory: `python -m backends` with options on a free port, answering; killed at teardown."""
    from tests.test_backends import kill_and_reap, spawn, start_on_free_port

    started: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> tuple[subprocess.Popen[bytes], int]:
        def launch(port: int, stderr_path: Path) -> subprocess.Popen[bytes]:
            started.append(spawn(["--port", str(port), *options], stderr_path))
            return started[-1]

        proc, port, _ = start_on_free_port(launch, tmp_path)
        return proc, port

    yield start
    for proc in started:
        kill_and_reap(proc)


def test_a_flaky_worker_from_the_command_line(worker_process: Callable[..., tuple[subprocess.Popen[bytes], int]]) -> None:
    """`python -m backends --error-rate 1 --error-status 503`: every request a 503, /health still 200."""
    from tests.test_backends import raw_request

    _, port = worker_process("--error-rate", "1", "--error-status", "503")
    head, body = raw_request(port, b"GET /anything HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and body == b"error 503\n"
    head, _ = raw_request(port, b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    head, _ = raw_request(port, b"GET /?error_rate=0 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
