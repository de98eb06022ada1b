"""Operator experience: durations in Go's form, extension keys, secrets kept out of `check`'s output,
addresses that cannot work refused, `--version`, Bearer tokens read as RFC 9110 says, process metrics."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from balancer.config.load import dump_effective, parse_config, parse_duration
from balancer.errors import ConfigError
from tests.conftest import raw_request

POOL = "pools: {web: {servers: [127.0.0.1:9001]}}\n"


@pytest.mark.parametrize(("text", "seconds"), [("1m30s", 90.0), ("250us", 0.00025), ("1h30m", 5400.0),
                                                ("1.5s", 1.5), ("500ms", 0.5), ("2", 2.0)])
def test_durations_in_go_form(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_a_bad_duration_says_what_is_expected() -> None:
    with pytest.raises(ConfigError, match="like '2s', '500ms' or '1m30s'"):
        parse_duration("1m30")


def test_extension_keys_hold_anchors_and_are_ignored() -> None:
    config = parse_config("x-health: &checks {interval: 1s, rise: 1}\n"
                          "pools:\n  web:\n    x-note: anything\n    servers: [127.0.0.1:9001]\n"
                          "    health: *checks\n", "x.yaml")
    assert config.pools["web"].health is not None and config.pools["web"].health.rise == 1


def test_check_keeps_secrets_out_unless_asked() -> None:
    hashed = "$2b$04$" + "a" * 53
    config = parse_config("admin: {token: s3cret}\npools:\n  web:\n"
                          "    spawn: {command: [python, -m, backends], env: {DB_PASSWORD: hunter2}}\n"
                          f"routes:\n  - {{pool: web, basic_auth: {{users: {{alice: '{hashed}'}}}}}}\n", "x.yaml")
    shown = dump_effective(config)
    assert "s3cret" not in shown and "hunter2" not in shown and hashed not in shown
    assert "token: <redacted>" in shown and "DB_PASSWORD: <redacted>" in shown
    revealed = dump_effective(config, show_secrets=True)
    assert "s3cret" in revealed and "hunter2" in revealed
    assert hashed.replace("$", "$$") in revealed            # "$" doubled: reading it back substitutes nothing


@pytest.mark.parametrize(("text", "problem"), [
    ("listen: {host: 127.0.0.1, port: 8081}\nadmin: {host: 127.0.0.1, port: 8081}\n",
     r"x.yaml:2: admin: 127.0.0.1:8081 is also listen\[0\]'s address"),
    ("listen: {host: 999.1.1.1, port: 8080}\n", r"listen\[0\].host: host '999.1.1.1' is neither an IP"),
])
def test_addresses_that_cannot_work_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(text + POOL, "x.yaml")


def test_version_and_a_usage_without_internals() -> None:
    version = subprocess.run([sys.executable, "-m", "balancer", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("balancer ")
    usage = subprocess.run([sys.executable, "-m", "balancer", "--help"], capture_output=True, text=True)
    assert "_replica" not in usage.stdout and "restart-workers" in usage.stdout


async def test_bearer_is_case_insensitive_and_a_bad_header_is_a_401(balancer_factory: Any) -> None:
    balancer = await balancer_factory("listen: {host: 127.0.0.1, port: 0}\n"
                                      "admin: {host: 127.0.0.1, port: 0, token: t0k}\n" + POOL)
    port = balancer.admin.bound_port

    async def stats(authorization: bytes) -> bytes:
        return await raw_request(port, b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + authorization
                                 + b"\r\nConnection: close\r\n\r\n")
    assert (await stats(b"bearer t0k")).startswith(b"HTTP/1.1 200 ")
    assert (await stats(b"Bearer t0k")).startswith(b"HTTP/1.1 200 ")
    assert (await stats(b"Bearer \xff\xfe")).startswith(b"HTTP/1.1 401 ")
    assert (await stats(b"Basic dDBr")).startswith(b"HTTP/1.1 401 ")


async def test_metrics_name_the_version_and_the_process(balancer_factory: Any) -> None:
    balancer = await balancer_factory("listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n"
                                      + POOL)
    answer = await raw_request(balancer.admin.bound_port,
                               b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert b'balancer_info{config_sha256="' in answer and b'version="' in answer
    assert b"process_resident_memory_bytes" in answer and b"process_open_fds" in answer


def test_one_size_grammar_everywhere() -> None:
    config = parse_config("limits: {max_header_size: 32k, max_body: 1G, max_request_line: 8KiB, "
                          "max_response_header: 64KB}\n" + POOL, "x.yaml")
    limits = config.limits
    assert (limits.max_header_size, limits.max_body, limits.max_request_line, limits.max_response_header) == \
        (32 * 1024, 1 << 30, 8192, 64_000)
    with pytest.raises(ConfigError, match=r"limits.max_header_size: expected a size in 1024..16777216 bytes"):
        parse_config("limits: {max_header_size: 1G}\n" + POOL, "x.yaml")


async def test_a_web_page_cannot_drive_or_read_the_admin_api(balancer_factory: Any, backend_ports: Any) -> None:
    """Without a token: the cross-origin form POST of the report (Origin: http://evil.example, a
    form content type) is refused, and so is a POST without the admin header; DNS rebinding (a
    Host that is not loopback's) cannot read /stats. An operator's client still works."""
    (port,) = await backend_ports(1)
    balancer = await balancer_factory("listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n"
                                      f"pools: {{web: {{servers: [127.0.0.1:{port}]}}}}\n")
    admin = balancer.admin.bound_port
    drain = f"POST /backends/web/127.0.0.1:{port}/drain HTTP/1.1\r\n".encode()

    async def ask(head: bytes) -> bytes:
        return await raw_request(admin, head + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    attack = await ask(drain + b"Host: 127.0.0.1\r\nOrigin: http://evil.example\r\n"
                               b"Content-Type: application/x-www-form-urlencoded\r\n")
    assert attack.startswith(b"HTTP/1.1 403 ")
    assert (await ask(drain + b"Host: 127.0.0.1\r\n")).startswith(b"HTTP/1.1 403 ")
    rebound = await ask(b"GET /stats HTTP/1.1\r\nHost: evil.example:8081\r\n")
    assert rebound.startswith(b"HTTP/1.1 403 ")
    assert balancer.registry.find(f"web/127.0.0.1:{port}").admin.value == "enabled"
    assert (await ask(drain + b"Host: localhost\r\nX-Balancer-Admin: 1\r\n")).startswith(b"HTTP/1.1 200 ")
    assert balancer.registry.find(f"web/127.0.0.1:{port}").admin.value == "draining"


async def test_reload_applies_admin_and_log_settings(balancer_factory: Any, tmp_path: Any) -> None:
    """The report: a changed admin token was ignored by reload ("no change") and the old one kept
    working. Now the token, the admin address, the log level and the access log all follow a reload."""
    import asyncio
    import logging

    from tests.conftest import async_wait_until, free_port
    base = "listen: {host: 127.0.0.1, port: 0}\n" + POOL
    level = logging.getLogger().level
    balancer = await balancer_factory(base + "admin: {host: 127.0.0.1, port: 0, token: old}\n")
    first = balancer.admin.bound_port

    async def stats(port: int, token: str) -> bytes:
        return await raw_request(port, f"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}"
                                       "\r\nConnection: close\r\n\r\n".encode())
    moved = free_port()
    access = tmp_path / "access.log"
    changes = await balancer.reload(parse_config(
        base + f"admin: {{host: 127.0.0.1, port: {moved}, token: new}}\n"
        f"log: {{level: warning, access_log: true, access_log_path: {access}}}\n", "<test>"))
    assert "admin token changed" in changes and f"admin moved to 127.0.0.1:{moved}" in changes
    assert "log level info -> warning" in changes
    assert (await stats(moved, "new")).startswith(b"HTTP/1.1 200 ")
    assert (await stats(moved, "old")).startswith(b"HTTP/1.1 401 ")
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", first)           # the old socket is closed
    try:
        assert logging.getLogger().level == logging.WARNING
    finally:
        logging.getLogger().setLevel(level)
    await raw_request(balancer.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await async_wait_until(lambda: access.exists() and b"GET /x" in access.read_bytes(), timeout=5,
                           message="the access log, switched on by a reload")


def test_a_variable_in_flow_style_gets_a_message_that_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml:1: invalid YAML: .*write that section in block style"):
        parse_config("listen: {host: 127.0.0.1, port: ${PORT}}\n" + POOL, "x.yaml", {"PORT": "80"})
    config = parse_config("listen:\n  host: 127.0.0.1\n  port: ${PORT}\n" + POOL, "x.yaml", {"PORT": "80"})
    assert config.listen[0].port == 80
