"""The configuration's shape: frozen, slotted, keyword-only dataclasses with every default.

Defaults live here and only here; :mod:`balancer.config` reads YAML into these and writes them back.
Attribute names carry units (``interval_s``); ``None`` or ``0`` mean "unset/unlimited" where the field's
comment says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

# --- the schema as dataclasses ----------------------------------------------------------------------
# Keyword-only, so that nobody can swap two timeouts of the same type by position.


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateConfig:
    """A certificate file (the chain may follow the certificate) and its private key, as absolute
    paths (a relative path in the file is taken from the config file's folder). ``names`` are the
    certificate's DNS names (SAN, else the CN), read when the config was loaded, for SNI."""

    cert: str
    key: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTLSConfig:
    """TLS on a listener: ``certificates`` chosen by SNI, the first being the default."""

    certificates: tuple[CertificateConfig, ...]
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ("http/1.1",)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenConfig:
    """One address where the proxy accepts clients. ``port`` 0 asks the OS for any free port
    (tests). ``redirect_https``: every request is answered 308 to ``https://HOST:PORT/target``.
    ``name`` names it in the access log and ``/stats`` (default ``host:port``)."""

    host: str = "127.0.0.1"
    port: int = 8080
    name: str | None = None
    redirect_https: int | None = None
    tls: ServerTLSConfig | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamTLSConfig:
    """TLS to a pool's backends: ``verify`` against ``ca`` (a PEM file, absolute path) or the
    system store; SNI and the verified name are ``server_name``, else the backend's host."""

    enabled: bool = True
    verify: bool = True
    ca: str | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """The admin/stats listener. ``token``: bearer token required by the admin API; None = no auth."""

    host: str = "127.0.0.1"
    port: int = 8081
    token: str | None = None
    slowlog_threshold_s: float = 0.5     # requests slower than this enter GET /slowlog
    slowlog_size: int = 128              # the N slowest recent requests kept


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitorConfig:
    """The monitoring listener: /healthz, /readyz and, with ``metrics``, /metrics; no token."""

    host: str = "127.0.0.1"
    port: int = 8082
    metrics: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """``level`` is one of ``LOG_LEVELS``; ``access_log`` logs one line per proxied request, as
    ``access_log_format`` ("text": combined-log-like, or "json") to ``access_log_path`` (None = stdout).
    """

    level: str = "info"
    access_log: bool = False
    access_log_format: str = "text"
    access_log_path: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownConfig:
    """Seconds to let in-flight requests finish, then to let each worker exit after SIGTERM."""

    drain_timeout_s: float = 15.0
    worker_stop_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """Client-side limits. ``max_body``: largest request body in bytes, 0 = unlimited (413).
    ``max_request_line`` (414), ``max_header_size`` and ``max_headers`` (431) bound the request head;
    ``max_connections``: client connections at once, 0 = unlimited."""

    max_body: int = 0
    max_request_line: int = 8192
    max_header_size: int = 32768
    max_headers: int = 100
    max_connections: int = 0
    max_response_header: int = 65536     # a backend's response head over this: 502, connection closed


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTimeoutsConfig:
    """Client side (top-level ``timeouts``): a request head must arrive within ``client_header_s``
    (else 408; a new connection that sends nothing is closed after it too); an idle keep-alive
    connection is closed after ``client_idle_s``; a request body may pause at most ``client_body_s``
    between reads (else 408); a client that reads none of our response for ``client_send_s`` is cut;
    a tunnel (WebSocket) with no byte either way for ``tunnel_idle_s`` is closed."""

    client_header_s: float = 10.0
    client_idle_s: float = 75.0
    client_body_s: float = 60.0
    client_send_s: float = 60.0
    tunnel_idle_s: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PassiveConfig:
    """Passive health: ``consecutive_failures`` transport failures (connect errors, resets, empty
    replies, timeouts), or responses with a status in ``statuses``, eject a backend for
    ``ejection_time_s`` x times ejected (capped at ``max_ejection_time_s``) or until its active checks
    pass ``rise`` times; never more than ``max_ejected_percent`` of a pool at once."""

    enabled: bool = True
    consecutive_failures: int = 5
    ejection_time_s: float = 30.0
    max_ejection_time_s: float = 300.0
    max_ejected_percent: int = 50
    statuses: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SpawnConfig:
    """Worker processes the balancer starts and supervises (``count`` copies of ``command``).

    ``env`` is extra environment as ordered ``(name, value)`` pairs (a tuple so the config stays
    hashable); ``cwd`` None = the balancer's own directory. ``keepalive_timeout_s`` is the keep-alive the
    balancer asks its workers to use, so that its own idle timeout can stay below it.
    """

    command: tuple[str, ...] = ("python", "-m", "backends")
    count: int = 4
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    start_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """A fixed backend. ``address`` as written (``"[::1]:9001"``); ``host`` without brackets (``"::1"``)."""

    address: str
    host: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    """Active health checks: GET ``path`` every ``interval_s``; ``rise`` passes in a row readmit a
    backend, ``fall`` failures in a row eject it. A pass is a status within ``expect`` (lo, hi) inclusive.
    """

    path: str = "/health"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    rise: int = 2
    fall: int = 3
    expect: tuple[int, int] = (200, 399)
    enabled: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    """Per upstream request, seconds: TCP connect, wait for the response head, longest gap mid-body,
    longest wait for the backend to take more of the request (``send_s``)."""

    connect_s: float = 3.0
    response_s: float = 30.0
    read_s: float = 60.0
    send_s: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionsConfig:
    """The connections kept to each backend of the pool. For ``max``, ``max_requests``, ``max_lifetime_s``,
    0 = unlimited. ``idle_timeout_s`` None = derived by the app (below the spawned workers' keep-alive,
    else 15s).
    """

    max: int = 0
    max_idle: int = 32
    min_idle: int = 0
    idle_timeout_s: float | None = None
    max_requests: int = 1000
    max_lifetime_s: float = 3600.0
    acquire_timeout_s: float = 5.0
    max_waiting: int = 0                 # requests queued for a connection at `max`; 0 = unlimited


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveryConfig:
    """Backends found by DNS: the addresses of ``dns`` (A/AAAA, on ``port``), or its SRV records'
    targets and ports; re-resolved every ``interval_s`` (sooner with a shorter TTL)."""

    dns: str
    port: int = 0
    type: str = "a"
    interval_s: float = 10.0
    resolvers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HashConfig:
    """``balance: hash``: what a request's key is: ``client_ip``, ``uri``, ``header:NAME`` or
    ``cookie:NAME``."""

    key: str = "client_ip"


@dataclass(frozen=True, slots=True, kw_only=True)
class StickyConfig:
    """Sticky sessions: the first response sets ``cookie`` (HMAC-signed with ``secret``; None: one
    made per balancer instance), and later requests carrying it go back to that backend while it
    is up."""

    cookie: str = "lb"
    ttl_s: float = 3600.0
    secret: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """A named set of backends: spawned workers, fixed ``servers``, or both (never neither).

    ``health`` None = the section was absent; the app then checks spawned workers with the defaults.
    """

    name: str
    balance: str = "round_robin"
    spawn: SpawnConfig | None = None
    servers: tuple[ServerConfig, ...] = ()
    health: HealthConfig | None = None
    timeouts: TimeoutsConfig = TimeoutsConfig()
    connections: ConnectionsConfig = ConnectionsConfig()
    retries: int = 2
    passive: PassiveConfig = PassiveConfig()
    slow_start_s: float = 0.0            # readmitted backends ramp from 10% to full weight; 0 = off
    tls: UpstreamTLSConfig | None = None
    hash: HashConfig = HashConfig()
    sticky: StickyConfig | None = None
    discovery: DiscoveryConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderRules:
    """Header edits, applied in this order: ``remove``, then ``set`` (replaces), then ``add``."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RedirectConfig:
    """Answer with a redirect to ``to``; ``keep_path`` appends the path after the route's prefix and
    the query."""

    to: str
    status: int = 302
    keep_path: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RespondConfig:
    """Answer from balancer itself."""

    status: int = 200
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True, kw_only=True)
class BasicAuthConfig:
    """HTTP Basic authentication against bcrypt hashes: ``users`` as (name, hash) pairs."""

    realm: str = "restricted"
    users: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitConfig:
    """A token bucket per key: ``rate`` tokens a second, up to ``burst``. ``key``: ``client_ip`` or
    ``header:NAME`` (a request without the header is keyed by its client address). At most
    ``max_keys`` buckets, least recently used dropped first."""

    rate: float
    burst: int = 0                 # 0: the rate rounded up (one second's worth)
    key: str = "client_ip"
    max_keys: int = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultDelayConfig:
    percent: float = 0.0
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultAbortConfig:
    percent: float = 0.0
    status: int = 503


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultConfig:
    """Fault injection (Envoy's fault filter): delay ``delay.percent`` of requests by
    ``delay.duration_s``, answer ``abort.percent`` with ``abort.status``; with ``headers``, clients
    in ``trusted_proxies`` may ask for a fault with X-Balancer-Fault-Delay / X-Balancer-Fault-Abort."""

    delay: FaultDelayConfig | None = None
    abort: FaultAbortConfig | None = None
    headers: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """Requests that match (``host``, ``path_prefix`` on whole segments, ``methods``, ``headers``) go
    to ``pool``, or are answered here (``redirect``, ``respond``); first match wins."""

    name: str
    path_prefix: str = "/"
    host: str | None = None        # lower case, no port; "*.example.com" matches one more label
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()      # (lower-case name, exact value)
    pool: str | None = None
    strip_prefix: bool = False
    add_prefix: str | None = None
    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    basic_auth: BasicAuthConfig | None = None
    rate_limit: RateLimitConfig | None = None
    redirect: RedirectConfig | None = None
    respond: RespondConfig | None = None
    fault: FaultConfig | None = None


class PoolMap(Mapping[str, PoolConfig]):
    """The pools by name, in file order. Immutable, hashable and picklable (a ``MappingProxyType`` is
    none of the last two), so a ``Config`` can cross into a worker process.
    """

    __slots__ = ("_by_name", "_pools")

    def __init__(self, pools: Iterable[PoolConfig]) -> None:
        self._pools = tuple(pools)
        self._by_name = {pool.name: pool for pool in self._pools}

    def __getitem__(self, name: str) -> PoolConfig:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._pools)

    def __eq__(self, other: object) -> bool:
        # Order matters (it is file order, shown to operators), so not Mapping's order-blind equality.
        return isinstance(other, PoolMap) and self._pools == other._pools

    def __hash__(self) -> int:
        return hash(self._pools)

    def __reduce__(self) -> tuple[type[PoolMap], tuple[tuple[PoolConfig, ...]]]:
        return PoolMap, (self._pools,)

    def __repr__(self) -> str:
        return f"PoolMap({', '.join(self._by_name)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole file. ``admin`` None = no admin listener. ``source`` and ``text_hash`` (sha256 hex of the
    text) say where the config came from and are left out of ``==``: equal configs may come from
    different files.
    """

    source: str = field(default="<string>", compare=False)
    text_hash: str = field(default="", compare=False)
    listen: tuple[ListenConfig, ...] = (ListenConfig(),)
    admin: AdminConfig | None = None
    monitor: MonitorConfig | None = None
    processes: int = 1             # proxy processes on the data port (the YAML key `workers` is its old name)
    log: LogConfig = LogConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    limits: LimitsConfig = LimitsConfig()
    timeouts: ClientTimeoutsConfig = ClientTimeoutsConfig()
    trusted_proxies: tuple[str, ...] = ()
    pools: PoolMap
    routes: tuple[RouteConfig, ...]
