"""Routes: matching (host, whole-segment prefixes, normalised paths, methods, headers), rewrites,
header rules, redirects and answers, access control, basic auth, rate limits, and hashed and
sticky balancing; each through real requests (raw sockets), against in-process worker apps."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import bcrypt
import pytest

from balancer.config.load import parse_config
from balancer.dataplane.guards import RateLimiter, Refused
from balancer.dataplane.routing import PathEscapesRoot, normalise_path
from balancer.errors import ConfigError
from tests.conftest import raw_request

Factory = Callable[..., Awaitable[Any]]
Ports = Callable[[int], Awaitable[list[int]]]


def config(routes: str, *pools: tuple[str, list[int]], top: str = "", pool_extra: str = "") -> str:
    text = f"listen: {{host: 127.0.0.1, port: 0}}\n{top}pools:\n"
    for name, ports in pools:
        servers = ", ".join(f"{{address: 127.0.0.1:{p}}}" for p in ports)
        text += f"  {name}:\n    servers: [{servers}]\n{pool_extra}"
    return text + "routes:\n" + routes


async def get(port: int, target: str, host: str = "x", extra: str = "", method: str = "GET") -> bytes:
    return await raw_request(port, f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}"
                                   "Connection: close\r\n\r\n".encode())


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def echo(answer: bytes) -> dict[str, Any]:
    assert status(answer) == 200, answer[:300]
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def header(answer: bytes, name: str) -> str | None:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.decode().lower() == name.lower():
            return value.strip().decode()
    return None


def worker(answer: bytes) -> str:
    return echo(answer)["worker"]


# --- matching ----------------------------------------------------------------------------------------


def test_paths_are_normalised_for_matching() -> None:
    assert normalise_path(b"/evil/../echo") == b"/echo"
    assert normalise_path(b"/a/./b/") == b"/a/b/"
    assert normalise_path(b"/%61pi/x%2Fy") == b"/api/x%2Fy"      # unreserved decoded, "/" escape kept
    assert normalise_path(b"/a/b/..") == b"/a/"
    with pytest.raises(PathEscapesRoot):
        normalise_path(b"/a/../../etc")


async def test_hosts_prefixes_and_normalised_paths(balancer_factory: Factory, backend_ports: Ports) -> None:
    api, web, shop = await backend_ports(3)        # workers b1, b2, b3
    routes = ('  - {name: wild, host: "*.example.com", path_prefix: /api, pool: api, strip_prefix: true}\n'
              '  - {name: shop, host: "Shop.Example.com:8080", pool: shop}\n'
              '  - {name: evil, path_prefix: /evil, pool: api, strip_prefix: true}\n'
              '  - {name: web, path_prefix: /, pool: web}\n')
    balancer = await balancer_factory(config(routes, ("api", [api]), ("web", [web]), ("shop", [shop])))
    port = balancer.port
    assert worker(await get(port, "/api/echo", "a.example.com")) == "b1"
    assert worker(await get(port, "/api/echo", "A.EXAMPLE.COM:9000")) == "b1"    # no case, no port
    assert status(await get(port, "/apix/echo", "a.example.com")) == 404         # whole segments: to web
    assert status(await get(port, "/api/echo", "a.b.example.com")) == 404        # one label only: to web
    assert worker(await get(port, "/echo", "a.b.example.com")) == "b2"
    assert worker(await get(port, "/echo", "shop.example.com:1234")) == "b3"
    # Matched as a backend would see it (not by the /evil route), forwarded byte for byte.
    assert header(await get(port, "/evil/../echo"), "X-Backend") == "b2"
    normalised = echo(await get(port, "/echo/./../echo"))
    assert (normalised["worker"], normalised["raw_path"]) == ("b2", "/echo/./../echo")
    assert worker(await get(port, "/%65vil/../evil/echo")) == "b1"
    assert status(await get(port, "/../echo")) == 400


async def test_methods_and_headers(balancer_factory: Factory, backend_ports: Ports) -> None:
    a, b = await backend_ports(2)
    routes = ('  - {name: canary, headers: {X-Canary: "1"}, pool: b}\n'
              '  - {name: writes, methods: [POST, PUT], pool: b}\n'
              '  - {name: rest, pool: a}\n')
    balancer = await balancer_factory(config(routes, ("a", [a]), ("b", [b])))
    assert worker(await get(balancer.port, "/echo")) == "b1"
    assert worker(await get(balancer.port, "/echo", extra="x-canary: 1\r\n")) == "b2"
    assert worker(await get(balancer.port, "/echo", extra="X-Canary: 2\r\n")) == "b1"
    assert worker(await get(balancer.port, "/echo", method="PUT", extra="Content-Length: 0\r\n")) == "b2"


async def test_strip_and_add_prefix(balancer_factory: Factory, backend_ports: Ports) -> None:
    (a,) = await backend_ports(1)
    routes = ('  - {name: api, path_prefix: /api, strip_prefix: true, pool: a}\n'
              '  - {name: v, path_prefix: /v, strip_prefix: true, add_prefix: /echo, pool: a}\n')
    balancer = await balancer_factory(config(routes, ("a", [a])))
    assert echo(await get(balancer.port, "/api/echo/x?q=1"))["raw_path"] == "/echo/x?q=1"
    assert echo(await get(balancer.port, "/v/two?q=%20"))["raw_path"] == "/echo/two?q=%20"
    assert echo(await get(balancer.port, "/v"))["raw_path"] == "/echo/"


async def test_header_rules(balancer_factory: Factory, backend_ports: Ports) -> None:
    (a,) = await backend_ports(1)
    routes = ('  - name: api\n    pool: a\n'
              '    request_headers: {set: {X-Env: prod}, add: {Via-Route: api}, remove: [X-Debug]}\n'
              '    response_headers: {set: {Strict-Transport-Security: "max-age=31536000"}, remove: [Server]}\n')
    balancer = await balancer_factory(config(routes, ("a", [a])))
    answer = await get(balancer.port, "/echo", extra="X-Env: dev\r\nX-Debug: 1\r\n")
    seen = [(n.lower(), v) for n, v in echo(answer)["headers"]]
    assert ("x-env", "prod") in seen and ("x-env", "dev") not in seen
    assert ("via-route", "api") in seen
    assert not any(n == "x-debug" for n, _ in seen)
    assert header(answer, "Strict-Transport-Security") == "max-age=31536000"
    assert header(answer, "Server") is None


async def test_redirect_and_respond(balancer_factory: Factory, backend_ports: Ports) -> None:
    (a,) = await backend_ports(1)
    routes = ('  - {path_prefix: /old, redirect: {to: "https://new.example.com/", status: 301, keep_path: true}}\n'
              '  - {path_prefix: /gone, redirect: {to: "https://elsewhere.example.com/"}}\n'
              '  - {path_prefix: /maintenance, respond: {status: 503, body: "back soon\\n"}}\n'
              '  - {path_prefix: /, pool: a}\n')
    balancer = await balancer_factory(config(routes, ("a", [a])))
    moved = await get(balancer.port, "/old/a/b?q=1")
    assert status(moved) == 301 and header(moved, "Location") == "https://new.example.com/a/b?q=1"
    gone = await get(balancer.port, "/gone/x")
    assert status(gone) == 302 and header(gone, "Location") == "https://elsewhere.example.com/"
    down = await get(balancer.port, "/maintenance")
    assert status(down) == 503 and down.endswith(b"\r\n\r\nback soon\n")
    assert header(down, "Content-Type") == "text/plain; charset=utf-8"


# --- access control, auth, rate limits ----------------------------------------------------------------


async def test_allow_and_deny_use_the_client_address(balancer_factory: Factory, backend_ports: Ports) -> None:
    (a,) = await backend_ports(1)
    routes = ('  - {name: inside, path_prefix: /in, allow: [10.0.0.0/8], pool: a}\n'
              '  - {name: banned, path_prefix: /out, deny: [10.1.0.0/16], allow: [10.0.0.0/8], pool: a}\n'
              '  - {name: local, path_prefix: /, allow: [127.0.0.1/32], pool: a}\n')
    balancer = await balancer_factory(config(routes, ("a", [a]), top="trusted_proxies: [127.0.0.1/32]\n"))
    port = balancer.port
    assert status(await get(port, "/echo")) == 200
    assert status(await get(port, "/in/x")) == 403                       # 127.0.0.1, not 10/8
    # From a trusted proxy, the client is the last X-Forwarded-For entry that is not one.
    assert status(await get(port, "/in/x", extra="X-Forwarded-For: 10.2.3.4, 127.0.0.1\r\n")) == 404
    refused = await get(port, "/out/x", extra="X-Forwarded-For: 10.1.2.3\r\n")
    assert status(refused) == 403 and header(refused, "X-Balancer-Error") == "forbidden"


async def test_basic_auth(balancer_factory: Factory, backend_ports: Ports) -> None:
    (a,) = await backend_ports(1)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    routes = f'  - {{pool: a, basic_auth: {{realm: api, users: {{alice: "{hashed}"}}}}}}\n'
    balancer = await balancer_factory(config(routes, ("a", [a])))
    port = balancer.port
    missing = await get(port, "/echo")
    assert status(missing) == 401
    assert header(missing, "WWW-Authenticate") == 'Basic realm="api", charset="UTF-8"'
    import base64
    good = base64.b64encode(b"alice:s3cret").decode()
    bad = base64.b64encode(b"alice:guess").decode()
    assert status(await get(port, "/echo", extra=f"Authorization: Basic {bad}\r\n")) == 401
    assert status(await get(port, "/echo", extra="Authorization: Basic !!!\r\n")) == 401
    for _ in range(2):                                           # the second from the cache
        assert status(await get(port, "/echo", extra=f"Authorization: Basic {good}\r\n")) == 200


async def test_rate_limit_answers_429_and_counts_it_per_route(
        balancer_factory: Factory, backend_ports: Ports) -> None:
    (a,) = await backend_ports(1)
    routes = ('  - {name: limited, path_prefix: /, pool: a,\n'
              '     rate_limit: {rate: 1/m, burst: 2, key: "header:X-Api-Key"}}\n')
    balancer = await balancer_factory(config(routes, ("a", [a]), top="admin: {host: 127.0.0.1, port: 0}\n"))
    port = balancer.port
    key = "X-Api-Key: k1\r\n"
    assert [status(await get(port, "/echo", extra=key)) for _ in range(2)] == [200, 200]
    limited = await get(port, "/echo", extra=key)
    assert status(limited) == 429
    assert header(limited, "X-Balancer-Error") == "rate_limited"
    assert header(limited, "Retry-After") == "60"
    assert status(await get(port, "/echo", extra="X-Api-Key: k2\r\n")) == 200     # its own bucket
    stats = json.loads((await get(balancer.admin.bound_port, "/stats", "127.0.0.1")).split(b"\r\n\r\n", 1)[1])
    assert stats["routes"]["limited"]["errors"] == {"rate_limited": 1}
    metrics = (await get(balancer.admin.bound_port, "/metrics", "127.0.0.1")).decode()
    assert 'balancer_route_errors_total{kind="rate_limited",route="limited"} 1.0' in metrics


def test_rate_limiter_buckets_refill_and_stay_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=1, key="client_ip", max_keys=100, clock=lambda: now[0])
    limiter.take(b"a")
    with pytest.raises(Refused) as refused:
        limiter.take(b"a")
    assert refused.value.fields == b"Retry-After: 1\r\n"
    now[0] = 0.5                                          # one token back at 2 a second
    limiter.take(b"a")
    for n in range(1000):
        limiter.take(b"key%d" % n)
    assert len(limiter) == 100                            # the least recently used were dropped


# --- hashed and sticky balancing ------------------------------------------------------------------------


async def test_hash_balancing_keeps_a_key_on_one_backend(balancer_factory: Factory, backend_ports: Ports) -> None:
    ports = await backend_ports(3)
    balancer = await balancer_factory(config("  - {path_prefix: /, pool: web}\n", ("web", ports),
                                             pool_extra="    balance: hash\n    hash: {key: \"header:X-User\"}\n"))
    chosen = {}
    for user in range(12):
        seen = {worker(await get(balancer.port, "/echo", extra=f"X-User: u{user}\r\n")) for _ in range(3)}
        assert len(seen) == 1                              # the same backend every time
        chosen[user] = seen.pop()
    assert len(set(chosen.values())) >= 2                  # and keys spread over the pool


async def test_sticky_cookie_sends_a_client_back(balancer_factory: Factory, backend_ports: Ports) -> None:
    ports = await backend_ports(3)
    balancer = await balancer_factory(config("  - {path_prefix: /, pool: web}\n", ("web", ports),
                                             pool_extra="    sticky: {cookie: lb, ttl: 1h}\n"))
    first = await get(balancer.port, "/echo")
    cookie = header(first, "Set-Cookie")
    assert cookie is not None and cookie.startswith("lb=") and "Max-Age=3600" in cookie
    value = cookie.split(";")[0]
    backends = Counter([worker(await get(balancer.port, "/echo", extra=f"Cookie: a=1; {value}\r\n"))
                        for _ in range(6)])
    assert backends == Counter({worker(first): 6})         # round robin would have spread them
    again = await get(balancer.port, "/echo", extra=f"Cookie: {value}\r\n")
    assert header(again, "Set-Cookie") is None             # valid and honoured: not set again
    tampered = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
    assert header(await get(balancer.port, "/echo", extra=f"Cookie: {tampered}\r\n"), "Set-Cookie") is not None


# --- balancer check ------------------------------------------------------------------------------------


def test_check_warns_of_a_shadowed_route(caplog: pytest.LogCaptureFixture) -> None:
    text = ("pools: {web: {servers: [127.0.0.1:9001]}}\nroutes:\n"
            "  - {name: all, path_prefix: /, pool: web}\n  - {name: api, path_prefix: /api, pool: web}\n")
    with caplog.at_level(logging.WARNING, logger="balancer.config.load"):
        parse_config(text, "x.yaml")
    assert "x.yaml:4: routes[1]: route 'api' can never match: route 'all' before it takes all its requests" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="balancer.config.load"):
        parse_config(text.replace("path_prefix: /, ", "path_prefix: /, methods: [GET], "), "x.yaml")
    assert "can never match" not in caplog.text


@pytest.mark.parametrize(("route", "problem"), [
    ("{pool: web, allow: [10.0.0.300/8]}", r"x.yaml:3: routes\[0\].allow\[0\]: expected an IP network"),
    ("{pool: web, basic_auth: {users: {alice: plain}}}", r"x.yaml:3: routes\[0\].basic_auth.users.alice: "
                                                         r"expected a bcrypt hash"),
    ("{pool: web, rate_limit: {rate: lots}}", r"x.yaml:3: routes\[0\].rate_limit.rate: expected a rate"),
    ("{pool: web, request_headers: {set: {Content-Length: '1'}}}", r"Content-Length is balancer's to write"),
    ("{pool: web, redirect: {to: /x}}", r"exactly one of pool, redirect, respond \(got pool and redirect\)"),
    ("{pool: web, host: 'a b'}", r"routes\[0\].host: expected a host name"),
])
def test_check_refuses_bad_route_values(route: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(f"pools: {{web: {{servers: [127.0.0.1:9001]}}}}\nroutes:\n  - {route}\n", "x.yaml")


def test_the_hashing_key_of_each_kind() -> None:
    from balancer.dataplane.affinity import request_key
    headers = [(b"X-User", b"u1"), (b"Cookie", b"a=1; session=s9")]
    assert request_key("client_ip", "10.0.0.1", b"/x?y", headers) == b"10.0.0.1"
    assert request_key("uri", "10.0.0.1", b"/x?y", headers) == b"/x?y"
    assert request_key("header:x-user", "10.0.0.1", b"/", headers) == b"u1"
    assert request_key("cookie:session", "10.0.0.1", b"/", headers) == b"s9"
    assert request_key("cookie:other", "10.0.0.1", b"/", headers) == b"10.0.0.1"     # absent: the client


def test_a_configured_sticky_secret_is_shared_and_a_foreign_one_refused() -> None:
    from balancer.dataplane.affinity import StickyCookie
    ours, replica, theirs = (StickyCookie("lb", 60, secret) for secret in (b"k1", b"k1", b"k2"))
    line = ours.set_cookie("web/127.0.0.1:9001").decode()
    cookie = [(b"Cookie", line.split(": ", 1)[1].split(";")[0].encode())]
    assert replica.backend_id(cookie) == "web/127.0.0.1:9001"
    assert theirs.backend_id(cookie) is None


# --- fault injection ------------------------------------------------------------------------------------


async def test_injected_faults_are_answered_and_counted_apart(
        balancer_factory: Factory, backend_ports: Ports) -> None:
    import time
    (a,) = await backend_ports(1)
    routes = ('  - {name: slow, path_prefix: /slow, pool: a, fault: {delay: {percent: 100, duration: 150ms}}}\n'
              '  - {name: broken, path_prefix: /broken, pool: a, fault: {abort: {percent: 100, status: 503}}}\n'
              '  - {name: asked, path_prefix: /, pool: a, fault: {headers: true}}\n')
    balancer = await balancer_factory(config(routes, ("a", [a]), top="admin: {host: 127.0.0.1, port: 0}\n"
                                                                     "trusted_proxies: [127.0.0.1/32]\n"))
    started = time.monotonic()
    assert status(await get(balancer.port, "/slow/x")) == 404            # delayed, then proxied
    assert time.monotonic() - started >= 0.15
    broken = await get(balancer.port, "/broken")
    assert status(broken) == 503 and header(broken, "X-Balancer-Error") == "fault_abort"
    asked = await get(balancer.port, "/echo", extra="X-Balancer-Fault-Abort: 418\r\n")
    assert status(asked) == 418
    assert status(await get(balancer.port, "/echo")) == 200
    stats = json.loads((await get(balancer.admin.bound_port, "/stats", "127.0.0.1")).split(b"\r\n\r\n", 1)[1])
    assert stats["routes"]["slow"]["faults"] == {"delay": 1}
    assert stats["routes"]["broken"]["faults"] == {"abort": 1}
    assert stats["routes"]["asked"]["faults"] == {"abort": 1}
    metrics = (await get(balancer.admin.bound_port, "/metrics", "127.0.0.1")).decode()
    assert 'balancer_injected_faults_total{kind="abort",route="broken"} 1.0' in metrics


def test_fault_percentages_and_who_may_ask() -> None:
    import random

    from balancer.config.models import FaultAbortConfig, FaultConfig, FaultDelayConfig
    from balancer.dataplane.faults import Faults
    faults = Faults(FaultConfig(delay=FaultDelayConfig(percent=10, duration_s=0.2),
                                abort=FaultAbortConfig(percent=1, status=503), headers=True),
                    rng=random.Random(7).random)
    draws = [faults.pick([], trusted=False) for _ in range(20_000)]
    delayed = sum(1 for d, _ in draws if d == 0.2)
    aborted = sum(1 for _, a in draws if a == 503)
    assert 1_700 < delayed < 2_300 and 120 < aborted < 290
    asking = [(b"X-Balancer-Fault-Delay", b"250ms")]
    assert Faults(FaultConfig(headers=True)).pick(asking, trusted=True) == (0.25, 0)
    assert Faults(FaultConfig(headers=True)).pick(asking, trusted=False) == (0.0, 0)
    assert Faults(FaultConfig(headers=False)).pick(asking, trusted=True) == (0.0, 0)
    assert Faults(FaultConfig(headers=True)).pick([(b"x-balancer-fault-delay", b"9h")], trusted=True) == (0.0, 0)
