"""httpbin-compatible endpoints, with go-httpbin's JSON shapes (a list of values per header and per
query argument; pretty-printed), so clients and scripts written against httpbin work unchanged.

`/delay/{duration}`, `/drip`, `/stream-bytes/{n}`, `/headers`, `/anything[/{path}]`, `/ip`, `/uuid`,
`/cache/{seconds}`, `/etag/{etag}`. `/status/{codes}` and `/bytes/{n}` are the worker's own
(`backends.app`), extended to httpbin's forms. The load-test knobs apply to all of these; `/drip`'s
`delay` parameter is the `delay` knob (initial delay, seconds when bare), as in httpbin.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import re
import urllib.parse
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from backends.knobs import KnobError, parse_code, parse_duration, parse_size
from backends.service import MAX_DRIP_PAUSES, SERVICE, apply_plan, current_plan, send_pattern

MAX_DRIP_BYTES = 10 * 2**20
"""httpbin's cap on `/drip?numbytes=`."""
MAX_STREAM_CHUNK = 64 * 1024
DEFAULT_STREAM_CHUNK = 10 * 1024
"""`/stream-bytes` chunk size when `chunk_size` is not given (go-httpbin's)."""
MAX_CACHE_SECONDS = 2**31 - 1

CACHE_LAST_MODIFIED = datetime(2025, 1, 1, tzinfo=UTC)
"""`/cache/{n}`'s Last-Modified: fixed, so every worker and every restart revalidates the same way."""
_ETAG_CHARS = re.compile(r"[\x21\x23-\x7e]+", re.ASCII)
_ENTITY_TAG = re.compile(r'(W/)?"([^"]*)"')


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_route("*", "/delay/{duration}", handle_delay)
    router.add_get("/drip", handle_drip)
    router.add_get("/stream-bytes/{n}", handle_stream_bytes)
    router.add_get("/headers", handle_headers)
    router.add_route("*", "/anything", handle_anything)
    router.add_route("*", "/anything/{path:.*}", handle_anything)
    router.add_get("/ip", handle_ip)
    router.add_get("/uuid", handle_uuid)
    router.add_get("/cache/{seconds}", handle_cache)
    router.add_get("/etag/{etag}", handle_etag)


def bad_request(exc: KnobError | str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f"{exc}\n")


# --- request reports --------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """Go's canonical header key, as go-httpbin reports names: `x-dup` → `X-Dup`."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def request_headers(request: web.BaseRequest) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        headers.setdefault(canonical_name(name), []).append(value)
    return headers


def request_args(request: web.BaseRequest) -> dict[str, list[str]]:
    args: dict[str, list[str]] = {}
    for name, value in request.query.items():
        args.setdefault(name, []).append(value)
    return args


def origin(request: web.BaseRequest) -> str:
    """The client's address: X-Forwarded-For's first entry when present (as go-httpbin), else the peer."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    return forwarded.split(",", 1)[0].strip() or request.remote or ""


def request_url(request: web.BaseRequest) -> str:
    scheme = request.headers.get("X-Forwarded-Proto") or request.scheme
    return f"{scheme}://{request.host}{request.raw_path}"


def no_body_report(request: web.BaseRequest) -> dict[str, Any]:
    return {
        "args": request_args(request),
        "headers": request_headers(request),
        "method": request.method,
        "origin": origin(request),
        "url": request_url(request),
    }


async def body_report(request: web.BaseRequest) -> dict[str, Any]:
    """go-httpbin's report of a request that may carry a body (at most aiohttp's client_max_size, 1 MiB:
    above, 413). `data` is the body as text, or a base64 data URL for types other than text, forms and
    JSON; `form` is filled for urlencoded forms, `json` for JSON; multipart is not parsed."""
    report = {**no_body_report(request), "data": "", "files": {}, "form": {}, "json": None}
    body = await request.read()
    if not body:
        return report
    content_type = request.content_type
    text = body.decode("utf-8", errors="replace")
    report["data"] = text
    if content_type == "application/x-www-form-urlencoded":
        form: dict[str, list[str]] = {}
        for name, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
            form.setdefault(name, []).append(value)
        report["form"] = form
    elif content_type == "application/json":
        try:
            report["json"] = json.loads(body)
        except ValueError as exc:
            raise bad_request(f"error parsing request body: {exc}") from None
    elif content_type not in ("text/plain", "text/html"):
        encoded = base64.urlsafe_b64encode(body).decode("ascii")
        report["data"] = f"data:{content_type or 'application/octet-stream'};base64,{encoded}"
    return report


def json_response(data: Any, status: int = 200) -> web.Response:
    text = json.dumps(data, indent=2) + "\n"  # pretty, as go-httpbin
    return web.Response(status=status, text=text, content_type="application/json")


# --- endpoints --------------------------------------------------------------------------------------


async def handle_headers(request: web.Request) -> web.Response:
    return json_response({"headers": request_headers(request)})


async def handle_anything(request: web.Request) -> web.Response:
    if request.method == "HEAD":
        return json_response(no_body_report(request))
    return json_response(await body_report(request))


async def handle_ip(request: web.Request) -> web.Response:
    return json_response({"origin": origin(request)})


async def handle_uuid(request: web.Request) -> web.Response:
    return json_response({"uuid": str(uuid.uuid4())})


async def handle_delay(request: web.Request) -> web.Response:
    """Wait `{duration}` (seconds, or with ms/s; at most 60 s), then report the request."""
    try:
        seconds = parse_duration(request.match_info["duration"], "delay")
    except KnobError as exc:
        raise bad_request(exc) from None
    await request.app[SERVICE].sleep(seconds)
    return json_response(await body_report(request))


async def handle_stream_bytes(request: web.Request) -> web.StreamResponse:
    """`n` bytes of the pattern, chunked, `chunk_size` (default 10 KiB, at most 64 KiB) per chunk."""
    try:
        n = parse_size(request.match_info["n"], "n")
        chunk_size = parse_size(request.query.get("chunk_size", str(DEFAULT_STREAM_CHUNK)), "chunk_size")
    except KnobError as exc:
        raise bad_request(exc) from None
    if not 1 <= chunk_size <= MAX_STREAM_CHUNK:
        raise bad_request(f"chunk_size: expected 1 to {MAX_STREAM_CHUNK}, got {chunk_size}")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    return await send_pattern(request, response, n, chunk_size=chunk_size)


async def handle_drip(request: web.Request) -> web.StreamResponse:
    """httpbin's slow body: `numbytes` asterisks (default 10) spread over `duration` (default 2 s),
    with status `code` (default 200), after the `delay` knob. Written in at most MAX_DRIP_PAUSES + 1
    pieces, evenly paced, the first at once; framed by Content-Length (not chunked, as httpbin)."""
    query = request.query
    try:
        duration = parse_duration(query.get("duration", "2"), "duration")
        numbytes = parse_size(query.get("numbytes", "10"), "numbytes")
        code = parse_code(query.get("code", "200"), "code")
    except KnobError as exc:
        raise bad_request(exc) from None
    if not 1 <= numbytes <= MAX_DRIP_BYTES:
        raise bad_request(f"numbytes: expected 1 to {MAX_DRIP_BYTES}, got {numbytes}")
    response = web.StreamResponse(status=code, headers={"Content-Type": "text/plain; charset=utf-8"})
    if (plan := current_plan()) is not None:
        apply_plan(request, response, plan)
    if not response.chunked:
        response.content_length = numbytes
    await response.prepare(request)
    if request.method != "HEAD" and response.status not in (204, 304):
        service = request.app[SERVICE]
        pieces = min(numbytes, MAX_DRIP_PAUSES + 1)
        pause_s = duration / (pieces - 1) if pieces > 1 else 0.0
        for index in range(pieces):
            if index and pause_s:
                await service.sleep(pause_s)
            # Piece i ends at byte numbytes * (i + 1) // pieces: sizes differ by at most one.
            start, end = numbytes * index // pieces, numbytes * (index + 1) // pieces
            await response.write(b"*" * (end - start))
    await response.write_eof()
    return response


async def handle_cache(request: web.Request) -> web.Response:
    """Cache-Control: public, max-age=N with a fixed ETag and Last-Modified; 304 when the request's
    If-None-Match (or, without it, If-Modified-Since) matches them."""
    seconds_text = request.match_info["seconds"]
    if not seconds_text.isascii() or not seconds_text.isdigit() or int(seconds_text) > MAX_CACHE_SECONDS:
        raise bad_request(f"cache: expected a number of seconds 0-{MAX_CACHE_SECONDS}, got {seconds_text!r}")
    seconds = int(seconds_text)
    etag = '"' + hashlib.sha256(f"/cache/{seconds}".encode()).hexdigest()[:16] + '"'
    headers = {
        "Cache-Control": f"public, max-age={seconds}",
        "ETag": etag,
        "Last-Modified": email.utils.format_datetime(CACHE_LAST_MODIFIED, usegmt=True),
    }
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        is_fresh = matches(if_none_match, etag, weak=True)
    else:
        is_fresh = is_not_modified_since(request.headers.get("If-Modified-Since"), CACHE_LAST_MODIFIED)
    if is_fresh:
        return web.Response(status=304, headers=headers)
    response = json_response(no_body_report(request))
    response.headers.update(headers)
    return response


async def handle_etag(request: web.Request) -> web.Response:
    """ETag: "{etag}"; 412 when If-Match does not match it, else 304 when If-None-Match does."""
    tag = request.match_info["etag"]
    if _ETAG_CHARS.fullmatch(tag) is None:
        raise bad_request(f"etag: expected visible ASCII characters other than '\"', got {tag!r}")
    etag = f'"{tag}"'
    if_match = request.headers.get("If-Match")
    if if_match is not None and not matches(if_match, etag, weak=False):
        return web.Response(status=412, text="precondition failed\n", headers={"ETag": etag})
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and matches(if_none_match, etag, weak=True):
        return web.Response(status=304, headers={"ETag": etag})
    response = json_response(no_body_report(request))
    response.headers["ETag"] = etag
    return response


def matches(header: str, etag: str, *, weak: bool) -> bool:
    """Does an If-Match / If-None-Match list name `etag` (a strong tag, quoted)? `*` names any.
    Weak comparison (If-None-Match) ignores W/; strong comparison (If-Match) never matches a weak tag."""
    if header.strip() == "*":
        return True
    for weak_prefix, opaque in _ENTITY_TAG.findall(header):
        if f'"{opaque}"' == etag and (weak or not weak_prefix):
            return True
    return False


def is_not_modified_since(header: str | None, last_modified: datetime) -> bool:
    if header is None:
        return False
    try:
        since = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):  # an unparsable date is ignored (RFC 9110 13.1.3)
        return False
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return last_modified <= since
