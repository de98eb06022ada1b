"""DNS discovery against a real DNS server on loopback (dnslib): records added, removed, changed,
SRV, NXDOMAIN; a new address is checked before it takes traffic, a vanished one is drained."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from balancer.config.load import parse_config
from balancer.errors import ConfigError
from tests.conftest import async_wait_until, free_port, raw_request


class Zone(BaseResolver):  # type: ignore[misc]
    """Records the test changes while the server runs: name -> list of (type, value)."""

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, Any]]] = {}
        self.lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        with self.lock:
            records = self.records.get(name)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for kind, value in records:
            if kind == "A" and request.q.qtype == QTYPE.A:
                reply.add_answer(RR(name, QTYPE.A, rdata=A(value), ttl=1))
            elif kind == "AAAA" and request.q.qtype == QTYPE.AAAA:
                reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(value), ttl=1))
            elif kind == "SRV" and request.q.qtype == QTYPE.SRV:
                reply.add_answer(RR(name, QTYPE.SRV, rdata=SRV(0, 1, value[1], value[0]), ttl=1))
        return reply

    def set(self, name: str, records: list[tuple[str, Any]] | None) -> None:
        with self.lock:
            if records is None:
                self.records.pop(name, None)
            else:
                self.records[name] = records


@pytest.fixture
def dns() -> Iterator[tuple[Zone, int]]:
    zone = Zone()
    server = DNSServer(zone, port=0, address="127.0.0.1", logger=DNSLogger("-request,-reply,-truncated,-error"))
    server.start_thread()
    try:
        yield zone, server.server.server_address[1]
    finally:
        server.stop()
        server.server.server_close()


def config(dns_port: int, discovery: str) -> str:
    return ("listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n"
            "pools:\n  api:\n"
            f"    discovery: {{{discovery}, interval: 200ms, resolvers: ['127.0.0.1:{dns_port}']}}\n"
            "    health: {interval: 100ms, rise: 1}\n")


async def backend_ids(balancer: Any) -> set[str]:
    return {b.id for b in balancer.registry.pool("api")}


async def test_records_added_removed_and_changed(dns: tuple[Zone, int], balancer_factory: Any,
                                                 backend_ports: Any) -> None:
    zone, dns_port = dns
    first, second = await backend_ports(2)
    # The worker apps listen on 127.0.0.1 only: A records give one backend (their port is the
    # config's), SRV records two (their ports are the records').
    zone.set("api.test", [("A", "127.0.0.1")])
    balancer = await balancer_factory(config(dns_port, f"dns: api.test, port: {first}"))
    one = f"api/127.0.0.1:{first}"
    assert await backend_ids(balancer) == {one}
    await async_wait_until(lambda: balancer.registry.find(one).is_ready, message="checked, then ready")
    answer = await raw_request(balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    # SRV: the records give targets and ports (the target's A records give the addresses).
    zone.set("_api._tcp.test", [("SRV", ("w.test", first)), ("SRV", ("w.test", second))])
    zone.set("w.test", [("A", "127.0.0.1")])
    changes = await balancer.reload(parse_config(config(dns_port, "dns: _api._tcp.test, type: srv"),
                                                 source="<test>"))
    assert "pool api: discovery changed" in changes
    two = f"api/127.0.0.1:{second}"
    added = time.monotonic()
    await async_wait_until(lambda: {b.id for b in balancer.registry.pool("api")} == {one, two},
                           message="the SRV records' two backends")
    await async_wait_until(lambda: balancer.registry.find(two).is_ready, message="checked, then ready")
    in_rotation_after = time.monotonic() - added
    # A record removed: drained and gone; the other stays.
    zone.set("_api._tcp.test", [("SRV", ("w.test", second))])
    started = time.monotonic()
    await async_wait_until(lambda: {b.id for b in balancer.registry.pool("api")} == {two}, timeout=5,
                           message="the vanished address drained and removed")
    removed_after = time.monotonic() - started
    # NXDOMAIN: the last good set is kept, and /stats says why.
    zone.set("_api._tcp.test", None)
    await async_wait_until(lambda: balancer.discovery_state("api")["last_error"] != "", timeout=5,
                           message="the failure seen")
    assert {b.id for b in balancer.registry.pool("api")} == {two}
    assert "not found" in str(balancer.discovery_state("api")["last_error"]).lower()
    print(f"\nrecord added -> backend in rotation in {in_rotation_after * 1000:.0f} ms; "
          f"address removed -> backend drained and gone in {removed_after * 1000:.0f} ms")


async def test_a_new_address_is_checked_before_it_takes_traffic(dns: tuple[Zone, int],
                                                                balancer_factory: Any) -> None:
    zone, dns_port = dns
    zone.set("api.test", [("A", "127.0.0.1")])
    dead = free_port()                              # nothing listens: its checks never pass
    balancer = await balancer_factory(config(dns_port, f"dns: api.test, port: {dead}"))
    backend = balancer.registry.find(f"api/127.0.0.1:{dead}")
    assert backend is not None and not backend.healthy
    answer = await raw_request(balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 ")       # never sent to an unchecked address


def test_discovery_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"pools.api.discovery: type a needs a port"):
        parse_config("pools: {api: {discovery: {dns: api.test}}}\n", "x.yaml")
    with pytest.raises(ConfigError, match=r"resolvers\[0\]: expected an IP address"):
        parse_config("pools: {api: {discovery: {dns: a.test, port: 80, resolvers: [dns.test]}}}\n", "x.yaml")
