"""TLS: the HTTPS front door (SNI, certificate reload, handshake deadline, plain HTTP on the TLS
port), the HTTP→HTTPS redirect, TLS to backends (verification passing and failing, probes too),
and the certificate checks of `balancer check`. Real certificates from trustme, real clients:
Python's ssl, aiohttp's client and curl."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from backends.app import make_app
from balancer.config.load import load_config, parse_config
from balancer.errors import ConfigError
from tests.conftest import async_wait_until, raw_request

Factory = Callable[..., Awaitable[Any]]


class Certs:
    """A CA and certificate files in ``folder``: ``localhost`` (the default) and ``example``
    (``example.test`` and ``*.example.test``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_path = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.issue("localhost", "localhost", "127.0.0.1")
        self.issue("example", "example.test", "*.example.test")

    def issue(self, name: str, *identities: str, ca: trustme.CA | None = None, **kw: Any) -> trustme.LeafCert:
        cert = (ca or self.ca).issue_cert(*identities, **kw)
        cert.cert_chain_pems[0].write_to_path(str(self.folder / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(self.folder / f"{name}.key"))
        return cert

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def tls_listener(certs: Certs, extra: str = "") -> str:
    folder = certs.folder
    return (f"  - host: 127.0.0.1\n    port: 0\n    name: https\n{extra}    tls:\n      certificates:\n"
            f"        - {{cert: {folder}/localhost.pem, key: {folder}/localhost.key}}\n"
            f"        - {{cert: {folder}/example.pem, key: {folder}/example.key}}\n")


def config(certs: Certs, backend_port: int, listeners: str = "", top: str = "", pool: str = "") -> str:
    listeners = listeners or tls_listener(certs)
    return (f"listen:\n{listeners}{top}\npools:\n  web:\n    servers: [{{address: 127.0.0.1:{backend_port}}}]\n"
            f"{pool}")


async def peer_names(port: int, server_name: str, context: ssl.SSLContext) -> list[str]:
    """The DNS names of the certificate the server presents for ``server_name``."""
    context.check_hostname = False
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_name)
    try:
        cert = writer.get_extra_info("ssl_object").getpeercert()
        return sorted(value for kind, value in cert["subjectAltName"] if kind == "DNS")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_sni_chooses_the_certificate_and_the_default_is_the_first(
        certs: Certs, balancer_factory: Factory, backend_ports: Callable[[int], Awaitable[list[int]]]) -> None:
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(config(certs, port))
    context = certs.client_context()
    assert await peer_names(balancer.port, "example.test", context) == ["*.example.test", "example.test"]
    assert await peer_names(balancer.port, "shop.example.test", context) == ["*.example.test", "example.test"]
    # One wildcard label only, and an unknown name: the default certificate.
    assert await peer_names(balancer.port, "a.b.example.test", context) == ["localhost"]
    assert await peer_names(balancer.port, "unknown.test", context) == ["localhost"]


async def test_requests_over_tls_say_https_to_the_backend_and_in_the_log(
        certs: Certs, balancer_factory: Factory, backend_ports: Callable[[int], Awaitable[list[int]]]) -> None:
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(config(certs, port, top="admin: {host: 127.0.0.1, port: 0}\n"))
    records: list[Any] = []
    balancer.proxy.add_observer(records.append)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"https://localhost:{balancer.port}/echo", ssl=certs.client_context(),
                               headers={"X-Forwarded-Proto": "http"}) as response:
            assert response.status == 200
            echoed = json.loads(await response.read())
        async with session.get(f"http://127.0.0.1:{balancer.admin.bound_port}/stats") as response:
            stats = (await response.json())["listeners"]["https"]
    headers = {k.lower(): v for k, v in echoed["headers"]}
    assert headers["x-forwarded-proto"] == "https"          # the client's own value replaced
    assert records[-1].listener == "https"
    assert (stats["scheme"], stats["requests"], stats["connections"]) == ("https", 1, 1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_speaks_https_to_balancer(
        certs: Certs, balancer_factory: Factory, backend_ports: Callable[[int], Awaitable[list[int]]]) -> None:
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(config(certs, port))
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "5", "--cacert", str(certs.ca_path),
        "--resolve", f"shop.example.test:{balancer.port}:127.0.0.1", "-o", "/dev/null",
        "-w", "%{http_code} %{scheme}", f"https://shop.example.test:{balancer.port}/",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await process.communicate()
    assert out.decode() == "200 HTTPS", err.decode()


async def test_plain_http_on_the_tls_port_is_closed_with_one_log_line(
        certs: Certs, balancer_factory: Factory, backend_ports: Callable[[int], Awaitable[list[int]]],
        caplog: pytest.LogCaptureFixture) -> None:
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(config(certs, port))
    with caplog.at_level(logging.INFO, logger="balancer.dataplane.listener"):
        answer = await raw_request(balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await async_wait_until(lambda: balancer.listener_stats()["https"]["handshake_failures"] == 1,
                               message="the failed handshake counted")
    assert b"HTTP/1.1 200" not in answer
    lines = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(lines) == 1 and "plain HTTP on the TLS port" in lines[0].getMessage()
    assert lines[0].exc_info is None


async def test_a_silent_client_is_cut_at_the_handshake_deadline(
        certs: Certs, balancer_factory: Factory, backend_ports: Callable[[int], Awaitable[list[int]]]) -> None:
    (port,) = await backend_ports(1)
    balancer = await balancer_factory(config(certs, port, top="timeouts: {client_header: 300ms}\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    try:
        async with asyncio.timeout(5):
            assert await reader.read() == b""       # closed without a byte
    finally:
        writer.close()
    assert balancer.listener_stats()["https"]["handshake_failures"] == 1


async def test_the_plain_listener_redirects_to_https(
        certs: Certs, balancer_factory: Factory, backend_ports: Callable[[int], Awaitable[list[int]]]) -> None:
    (port,) = await backend_ports(1)
    listeners = "  - {host: 127.0.0.1, port: 0, name: http, redirect_https: 8443}\n" + tls_listener(certs)
    balancer = await balancer_factory(config(certs, port, listeners))
    plain, tls_port = balancer.ports
    assert tls_port != plain
    answer = await raw_request(plain, b"POST /a/b?q=1 HTTP/1.1\r\nHost: Shop.example.test:8080\r\n"
                                      b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
    assert b"\r\nLocation: https://Shop.example.test:8443/a/b?q=1\r\n" in answer
    # A Host that is not a name or an address is not put in a Location.
    hostile = await raw_request(plain, b"GET / HTTP/1.1\r\nHost: evil.test/x\r\nConnection: close\r\n\r\n")
    assert hostile.startswith(b"HTTP/1.1 400 ")
    assert balancer.listener_stats()["http"]["redirect_https"] == 8443


async def test_a_reload_swaps_certificates_under_load_with_no_failed_request(
        certs: Certs, balancer_factory: Factory, backend_ports: Callable[[int], Awaitable[list[int]]]) -> None:
    (port,) = await backend_ports(1)
    text = config(certs, port)
    balancer = await balancer_factory(text)
    context = certs.client_context()
    results: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        # Each round a new TLS connection (a handshake) and two requests on it.
        while not stop.is_set():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
                for _ in range(2):
                    async with session.get(f"https://localhost:{balancer.port}/") as response:
                        await response.read()
                        results.append(response.status)

    tasks = [asyncio.create_task(client()) for _ in range(4)]
    await async_wait_until(lambda: len(results) >= 20, message="load running")
    renewed = certs.issue("localhost", "localhost", "renewed.test")      # same files, new certificate
    changes = await balancer.reload(parse_config(text, source="<test>"))
    assert "listener https: certificates re-read" in changes
    seen = len(results)
    await async_wait_until(lambda: len(results) >= seen + 20, message="load after the reload")
    stop.set()
    await asyncio.gather(*tasks)
    assert set(results) == {200}
    assert "renewed.test" in await peer_names(balancer.port, "localhost", certs.client_context())
    assert renewed is not None


async def tls_backend(certs: Certs, ca: trustme.CA | None = None) -> tuple[web.AppRunner, int]:
    """A worker app serving HTTPS with a certificate for localhost from ``ca`` (default: ours)."""
    server_cert = (ca or certs.ca).issue_cert("localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    runner = web.AppRunner(make_app("tls1", 0), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    return runner, int(runner.addresses[0][1])


async def test_tls_to_backends_verified_reused_and_probed(
        certs: Certs, balancer_factory: Factory) -> None:
    runner, port = await tls_backend(certs)
    try:
        pool = (f"    tls: {{ca: {certs.ca_path}, server_name: localhost}}\n"
                f"    health: {{interval: 100ms, rise: 1}}\n")
        balancer = await balancer_factory(config(certs, port, "  - {host: 127.0.0.1, port: 0}\n", pool=pool))
        backend = balancer.registry.find(f"web/127.0.0.1:{port}")
        await async_wait_until(lambda: backend.healthy and balancer.health.is_checked(backend),
                               message="the HTTPS probe passing")
        for _ in range(3):
            answer = await raw_request(balancer.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        conns = balancer.connections.get(backend.id)
        assert (conns.stats.created, conns.stats.reused) == (1, 2)
    finally:
        await runner.cleanup()


async def test_tls_to_a_backend_with_the_wrong_ca_is_a_502_and_a_clear_log_line(
        certs: Certs, balancer_factory: Factory, caplog: pytest.LogCaptureFixture) -> None:
    runner, port = await tls_backend(certs, ca=trustme.CA())        # signed by a CA we do not trust
    try:
        pool = f"    tls: {{ca: {certs.ca_path}}}\n    retries: 0\n"
        balancer = await balancer_factory(config(certs, port, "  - {host: 127.0.0.1, port: 0}\n", pool=pool))
        with caplog.at_level(logging.WARNING, logger="balancer.dataplane.proxy"):
            answer = await raw_request(balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 502 ")
        assert any(f"TLS handshake with 127.0.0.1:{port} failed: certificate verify failed" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    finally:
        await runner.cleanup()


# --- balancer check ------------------------------------------------------------------------------


def write_config(folder: Path, cert: str, key: str) -> Path:
    path = folder / "tls.yaml"
    path.write_text("listen:\n  - host: 127.0.0.1\n    port: 8443\n    tls:\n      certificates:\n"
                    f"        - {{cert: {cert}, key: {key}}}\n"
                    "pools: {web: {servers: [{address: 127.0.0.1:9001}]}}\n")
    return path


def test_relative_certificate_paths_are_taken_from_the_config_file_folder(certs: Certs) -> None:
    config = load_config(write_config(certs.folder, "example.pem", "example.key"))
    (certificate,) = config.listen[0].tls.certificates
    assert certificate.cert == str(certs.folder / "example.pem")
    assert certificate.names == ("example.test", "*.example.test")


@pytest.mark.parametrize(("cert", "key", "problem"), [
    ("missing.pem", "localhost.key", "cannot read .*missing.pem: No such file"),
    ("localhost.pem", "example.key", "the key in .*example.key is not the key of the certificate in"),
    ("localhost.key", "localhost.key", ".*localhost.key holds no PEM certificate"),
    ("old.pem", "old.key", "the certificate in .*old.pem expired on"),
])
def test_check_refuses_certificates_that_would_fail(certs: Certs, cert: str, key: str, problem: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    certs.issue("old", "old.test", not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1))
    path = write_config(certs.folder, cert, key)
    with pytest.raises(ConfigError, match=rf"^{path}:6: listen\[0\].tls.certificates\[0\]: {problem}"):
        load_config(path)


def test_check_warns_of_a_certificate_that_expires_soon(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    now = datetime.datetime.now(datetime.UTC)
    certs.issue("soon", "soon.test", not_after=now + datetime.timedelta(days=3))
    path = write_config(certs.folder, "soon.pem", "soon.key")
    with caplog.at_level(logging.WARNING, logger="balancer.config.load"):
        load_config(path)
    assert f"{path}:6: listen[0].tls.certificates[0]: the certificate in" in caplog.text
    assert "soon.pem expires on" in caplog.text
