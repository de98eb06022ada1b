"""The configuration file: YAML in, frozen typed dataclasses out, every problem reported before start-up.

Theory of operation
-------------------
The text is *composed* (``yaml.compose``), not loaded: composing keeps every key and value as a node with
its line, and keeps duplicate keys that ``yaml.safe_load`` would silently collapse. A ``Reader``
(:mod:`balancer.yamlread`) then walks the node tree against schema tables (YAML key -> dataclass
attribute, converter), so that

- every mapping is checked for duplicate and unknown keys before any of its values is converted;
- every scalar goes through ``${VAR}`` substitution on its own node, after parsing, so an environment
  value can never inject YAML structure; a plain (unquoted) scalar is re-typed after substitution
  (``port: ${PORT}`` with ``PORT=9000`` is the integer 9000), a quoted one stays a string;
- every failure is one ``ConfigError`` with file, line and dotted path (``pools.web.servers[0].address``).

A key set to ``null`` (or left empty) means the same as leaving it out: the dataclass default applies.
Defaults therefore live in one place, the dataclasses in :mod:`balancer.models`, and ``dump_effective``
writes them back out with the same schema tables, which is what keeps ``parse_config(dump_effective(c))
== c`` true.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import math
import os
import re
import shlex
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import yaml

from ..errors import ConfigError
from .certificates import check_ca_file, expires_soon, inspect_certificate
from .cpus import available_cpus
from .models import (
    AdminConfig,
    BasicAuthConfig,
    CertificateConfig,
    ClientTimeoutsConfig,
    Config,
    ConnectionsConfig,
    DiscoveryConfig,
    FaultAbortConfig,
    FaultConfig,
    FaultDelayConfig,
    HashConfig,
    HeaderRules,
    HealthConfig,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    MonitorConfig,
    PassiveConfig,
    PoolConfig,
    PoolMap,
    RateLimitConfig,
    RedirectConfig,
    RespondConfig,
    RouteConfig,
    ServerConfig,
    ServerTLSConfig,
    ShutdownConfig,
    SpawnConfig,
    StickyConfig,
    TimeoutsConfig,
    UpstreamTLSConfig,
)
from .yamlread import NULL_TAG, Converter, Loader, Reader, Schema, T, join_path, show

__all__ = [
    "BALANCE_POLICIES", "DEFAULT_CONFIG_PATH", "LOG_LEVELS", "AdminConfig", "Config", "ConnectionsConfig",
    "HealthConfig", "LimitsConfig", "ListenConfig", "LogConfig", "PoolConfig", "PoolMap", "RouteConfig",
    "ServerConfig", "ShutdownConfig", "SpawnConfig", "TimeoutsConfig", "dump_effective", "format_duration",
    "load_config", "parse_config", "parse_duration", "split_address",
]

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "config/balancer.yaml"
# Top-level keys that were renamed: old -> new. The old key reads as the new one, with a warning.
RENAMED = {"workers": "processes"}
BALANCE_POLICIES = ("round_robin", "least_loaded", "p2c", "hash")
LOG_LEVELS = ("debug", "info", "warning", "error")


# --- public entry points -------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at ``path``; every problem is a ``ConfigError`` naming the file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError("no such file", file=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a UTF-8 text file ({exc.reason} at byte {exc.start})", file=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=source) from None
    return parse_config(text, source, environ)


def parse_config(text: str, source: str = "<string>", environ: Mapping[str, str] | None = None) -> Config:
    """Validate ``text``; ``source`` names it in messages. ``environ`` defaults to ``os.environ``."""
    loader, root = _compose(text, source)
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == NULL_TAG):
        raise ConfigError("the file is empty; a config needs at least a `pools` section", file=source, line=1)
    reader = Reader(source, os.environ if environ is None else environ, loader)
    if not isinstance(root, yaml.MappingNode):
        shown = show(reader.value(root, ""))
        raise reader.error(f"expected a mapping at the top level, got {shown}", root, "")
    _renamed_keys(reader, root)
    fields = reader.fields(root, "", _CONFIG, required=("pools",))
    _refuse_shared_addresses(reader, root, fields)
    monitor = fields.get("monitor")
    if monitor is not None and monitor.metrics and fields.get("admin") is None:
        node = next(v for k, v in root.value if k.value == "monitor")
        raise reader.error("metrics: true needs an admin section (its statistics back /metrics)", node,
                           "monitor.metrics")
    if "routes" not in fields:
        fields["routes"] = (RouteConfig(name="default", pool=next(iter(fields["pools"]))),)
    return Config(source=source, text_hash=hashlib.sha256(text.encode()).hexdigest(), **fields)


# A sign is accepted only so that "-1s" gets the precise message ("expected ... >= 0").
_DURATION = re.compile(r"(?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>ms|s|m|h)?",
                       re.IGNORECASE | re.ASCII)
# Go's form (Traefik, Caddy): several number+unit parts, largest first: 1h30m, 1m30s, 250us, 1.5s.
_GO_DURATION = re.compile(r"(?:(?:\d+\.?\d*|\.\d+)(?:h|m(?!s)|s|ms|us|µs|ns))+", re.IGNORECASE)
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(h|ms|m|s|us|µs|ns)", re.IGNORECASE)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _compose(text: str, source: str) -> tuple[Loader, yaml.Node | None]:
    """The node tree of ``text`` (None when it holds no document), YAML syntax errors translated."""
    try:
        loader = Loader(text)  # already scans for characters YAML forbids (a ReaderError)
        try:
            return loader, loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = "; ".join(part for part in (exc.context, exc.problem) if part)
        line_text = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        if "${" in line_text and "{" in line_text.replace("${", ""):
            # `{port: ${PORT}}`: in flow style YAML reads `{` as a nested mapping.
            problem += ("; inside {...} or [...] YAML reads ${VAR}'s '{' as a nested mapping: write that "
                        "section in block style, one key a line (port: ${PORT})")
        raise ConfigError(f"invalid YAML: {problem}", file=source,
                          line=mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"invalid YAML: {str(exc).splitlines()[0]}", file=source, line=line) from None


def parse_duration(value: object) -> float:
    """Seconds from ``500ms``, ``2s``, ``1.5s``, ``1m``, ``1h``, or a bare number of seconds (``2``,
    ``1.5``, ``"2"``). Negative, infinite or NaN values and booleans raise ``ConfigError``.
    """
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif match is not None:
            # Divide for ms rather than multiply by 0.001, so "100ms" is exactly the float 0.1.
            seconds, unit = float(match["number"]), (match["unit"] or "").lower()
            seconds = seconds / 1000 if unit == "ms" else seconds * _UNIT_SECONDS[unit]
        elif isinstance(value, str) and _GO_DURATION.fullmatch(value.strip()):
            seconds = sum(float(number) * _GO_UNIT_SECONDS[unit.lower()]
                          for number, unit in _GO_PART.findall(value.strip()))
        else:
            raise ConfigError(f"expected a duration like '2s', '500ms' or '1m30s', got {show(value)}")
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"expected a finite duration >= 0, got {show(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest unit-bearing spelling that ``parse_duration`` reads back as exactly ``seconds``."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    millis = round(seconds * 1000)
    if seconds < 1 and millis / 1000 == seconds:
        return f"{millis}ms"
    return f"{float(seconds)!r}s"


REDACTED = "<redacted>"
# Where secrets live: a dumped config shows them only when asked (CI logs keep what they print).
_SECRET_ATTRS = frozenset({"token", "secret", "env", "users"})


def dump_effective(config: Config, show_secrets: bool = False) -> str:
    """The config as YAML with every default filled in (what ``balancer check`` prints); secrets
    (admin token, spawn environment values, basic-auth hashes, sticky secrets) redacted unless
    ``show_secrets``."""
    header = f"# effective configuration of {config.source}, every default filled in\n"
    data = _dump(config) if show_secrets else _redact(_dump(config))
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return header + body


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        if key in _SECRET_ATTRS and key in ("env", "users"):
            return {name: REDACTED for name in value}
        return {k: (REDACTED if k in ("token", "secret") and v is not None else _redact(v, k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(item, key) for item in value]
    return value


# --- converters: (reader, node, path) -> value ------------------------------------------------------------
# Scalar checks take the substituted value and raise an unlocated ConfigError; `_scalar` adds the location.


def _scalar(check: Callable[[Any], T]) -> Callable[[Reader, yaml.Node, str], T]:
    def convert(reader: Reader, node: yaml.Node, path: str) -> T:
        try:
            return check(reader.value(node, path))
        except ConfigError as exc:
            if exc.file is not None:
                raise
            raise reader.error(exc.reason, node, path) from None
    return convert


def _section(cls: Callable[..., T], schema: Schema,
             required: tuple[str, ...] = ()) -> Callable[[Reader, yaml.Node, str], T]:
    def convert(reader: Reader, node: yaml.Node, path: str) -> T:
        return cls(**reader.fields(node, path, schema, required))
    return convert


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # `rise: true` is not 1


def _integer(low: int, high: int | None = None) -> Converter:
    def check(value: object) -> int:
        if _is_int(value) and low <= value and (high is None or value <= high):
            return value
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"expected an integer {bound}, got {show(value)}")
    return _scalar(check)


def _duration(*, positive: bool = False, maximum: float | None = None) -> Converter:
    def check(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds == 0:
            raise ConfigError(f"expected a duration > 0, got {show(value)}")
        if maximum is not None and seconds > maximum:
            raise ConfigError(f"expected at most {format_duration(maximum)}, got {show(value)}")
        return seconds
    return _scalar(check)


def _string_value(value: object) -> str:
    if isinstance(value, str) and value:
        return value
    hint = " (quote it to make it a string)" if isinstance(value, (int, float)) else ""
    raise ConfigError(f"expected a non-empty string, got {show(value)}{hint}")


def _boolean_value(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"expected true or false, got {show(value)}")


def _choice(*options: str) -> Converter:
    def check(value: object) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise ConfigError(f"expected one of {', '.join(options)}, got {show(value)}")
    return _scalar(check)


def _url_path_value(value: object) -> str:
    if isinstance(value, str) and value.startswith("/"):
        return value
    raise ConfigError(f"expected a path starting with '/', got {show(value)}")


def _refuse_shared_addresses(reader: Reader, root: yaml.MappingNode, fields: dict[str, Any]) -> None:
    """The data listeners, the admin and the monitor each need an address of their own (port 0
    excepted), and a host that is an IP address or resolves."""
    taken: dict[tuple[str, int], str] = {}
    places = [(f"listen[{i}]", c) for i, c in enumerate(fields.get("listen", ()))]
    places += [(name, fields[name]) for name in ("admin", "monitor") if fields.get(name) is not None]
    nodes = {k.value: v for k, v in root.value if isinstance(k, yaml.ScalarNode)}
    for where, place in places:
        node = nodes.get(where.partition("[")[0], root)
        if not _host_usable(place.host):
            raise reader.error(f"host {place.host!r} is neither an IP address nor a name that resolves",
                               node, f"{where}.host")
        if place.port:
            other = taken.setdefault((place.host, place.port), where)
            if other != where:
                raise reader.error(f"{place.host}:{place.port} is also {other}'s address", node, where)


def _host_usable(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host) or re.fullmatch(r"[\d.]+", host):
        return False
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return True
    except OSError:
        return False


def _renamed_keys(reader: Reader, root: yaml.MappingNode) -> None:
    """Old names still read, with a warning naming the new one; both at once is an error."""
    keys = {key.value: key for key, _ in root.value if isinstance(key, yaml.ScalarNode)}
    for old, new in RENAMED.items():
        if old in keys and new in keys:
            raise reader.error(f"{old!r} is the old name of {new!r}: give {new!r} only", keys[old], old)
        if old in keys:
            log.warning("%s:%d: %s: renamed to %r (the old name still works)", reader.source,
                        keys[old].start_mark.line + 1, old, new)
            keys[old].value = new       # this parse's own node: read on as the new key


def _processes_value(value: object) -> int:
    if value == "auto":
        return available_cpus()
    if _is_int(value) and value >= 1:
        return value
    raise ConfigError(f"expected an integer >= 1 or 'auto', got {show(value)}")


# One size grammar everywhere: bytes, KB/MB/GB (powers of 1000), KiB/MiB/GiB and nginx's k/m/g
# (powers of 1024), in any case: 512, 32k, 32KiB, 10MB, 1G, 1GiB.
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmg]i?b|[kmg]|b)?", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "k": 2**10, "m": 2**20, "g": 2**30}


def _size_value(value: object) -> int:
    if _is_int(value) and value >= 0:
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"expected a size like 1048576, '32k', '10MiB' or '1G', got {show(value)}")
    unit = match["unit"].lower() if match["unit"] else None
    return int(float(match["number"]) * _SIZE_UNITS[unit])


def _size(low: int, high: int) -> Converter:
    def check(value: object) -> int:
        size = _size_value(value)
        if not low <= size <= high:
            raise ConfigError(f"expected a size in {low}..{high} bytes, got {show(value)}")
        return size
    return _scalar(check)


_STATUS_RANGE = re.compile(r"(\d{3})(?:\s*-\s*(\d{3}))?", re.ASCII)


def _status_range_value(value: object) -> tuple[int, int]:
    match = _STATUS_RANGE.fullmatch(value.strip()) if isinstance(value, str) else None
    if _is_int(value):
        low = high = value
    elif match is not None:
        low, high = int(match[1]), int(match[2] or match[1])
    else:
        low, high = 0, -1
    if not 100 <= low <= high <= 599:
        raise ConfigError(f"expected a status or range like 200 or '200-399' within 100..599, "
                          f"got {show(value)}")
    return low, high


def _cidr_value(value: object) -> str:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_network(value.strip(), strict=False))
    raise ConfigError(f"expected an IP network like '10.0.0.0/8' or '::1', got {show(value)}")


_ADDRESS = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]\s/]+)):(?P<port>\d{1,5})", re.ASCII)


def split_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host without brackets, port 1..65535)."""
    match = _ADDRESS.fullmatch(text.strip())
    if match is None or not 1 <= int(match["port"]) <= 65535:
        hint = " (IPv6 needs brackets: '[::1]:9001')" if text.count(":") > 1 and "[" not in text else ""
        raise ConfigError(f"expected 'host:port' with a port in 1..65535, got {text!r}{hint}")
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError:
            raise ConfigError(f"not an IPv6 address in brackets: {text!r}") from None
    return match["v6"] or match["host"], int(match["port"])


def _address_value(value: object) -> str:
    text = _string_value(value).strip()
    split_address(text)
    return text


_STRING = _scalar(_string_value)
_ADDRESS_TEXT = _scalar(_address_value)


def _hostname(reader: Reader, node: yaml.Node, path: str) -> str:
    return _STRING(reader, node, path).lower()  # Host headers compare case-insensitively


def _cidrs(reader: Reader, node: yaml.Node, path: str) -> tuple[str, ...]:
    # Stored normalised (`10.0.0.1` -> `10.0.0.1/32`), so consumers can compare strings.
    return tuple(_scalar(_cidr_value)(reader, item, where) for item, where in reader.items(node, path))


def _command(reader: Reader, node: yaml.Node, path: str) -> tuple[str, ...]:
    if isinstance(node, yaml.SequenceNode):
        argv = tuple(reader.text(item, where) for item, where in reader.items(node, path))
    else:
        line = reader.value(node, path)
        if not isinstance(line, str):
            message = f"expected a list of arguments or a command line, got {show(line)}"
            raise reader.error(message, node, path)
        try:
            argv = tuple(shlex.split(line))
        except ValueError as exc:  # unbalanced quotes
            raise reader.error(f"cannot split command line: {exc}", node, path) from None
    if not argv or not argv[0]:
        raise reader.error("expected a non-empty command", node, path)
    return argv


def _env(reader: Reader, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name, (key_node, value_node) in reader.mapping(node, path, None).items():
        where = join_path(path, name)
        if not name or "=" in name or "\0" in name:
            raise reader.error("not a valid environment variable name", key_node, where)
        pairs.append((name, reader.text(value_node, where)))
    return tuple(pairs)


def _server(reader: Reader, node: yaml.Node, path: str) -> ServerConfig:
    if isinstance(node, yaml.MappingNode):
        fields = reader.fields(node, path, _SERVER, required=("address",))
    else:  # the short form: a bare "host:port" list item
        fields = {"address": _ADDRESS_TEXT(reader, node, path)}
    host, port = split_address(fields["address"])
    return ServerConfig(host=host, port=port, **fields)


def _servers(reader: Reader, node: yaml.Node, path: str) -> tuple[ServerConfig, ...]:
    servers: dict[tuple[str, int], ServerConfig] = {}
    for item, where in reader.items(node, path):
        server = _server(reader, item, where)
        if (server.host, server.port) in servers:  # use `weight` to favour a server, not repetition
            raise reader.error(f"duplicate server {server.address!r}", item, where)
        servers[server.host, server.port] = server
    return tuple(servers.values())


def _connections(reader: Reader, node: yaml.Node, path: str) -> ConnectionsConfig:
    limits = ConnectionsConfig(**reader.fields(node, path, _CONNECTIONS))
    if limits.min_idle > limits.max_idle:
        message = f"min_idle ({limits.min_idle}) must not exceed max_idle ({limits.max_idle})"
    elif limits.max and limits.min_idle > limits.max:
        message = f"min_idle ({limits.min_idle}) must not exceed max ({limits.max})"
    else:
        return limits
    # min_idle must have been given explicitly: its default, 0, cannot break either rule.
    min_idle_node = next(value for key, value in node.value if key.value == "min_idle")
    raise reader.error(message, min_idle_node, join_path(path, "min_idle"))


_POOL_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _pools(reader: Reader, node: yaml.Node, path: str) -> PoolMap:
    pairs = reader.mapping(node, path, None)
    if not pairs:
        raise reader.error("at least one pool is required", node, path)
    pools = PoolMap(_pool(reader, name, key_node, value_node, join_path(path, name))
                    for name, (key_node, value_node) in pairs.items())
    reader.pool_names = tuple(pools)
    return pools


def _pool(reader: Reader, name: str, key_node: yaml.Node, node: yaml.Node, path: str) -> PoolConfig:
    if not _POOL_NAME.fullmatch(name):
        raise reader.error("a pool name may only use letters, digits, '_', '.' and '-'", key_node, path)
    fields = {} if reader.is_null(node, path) else reader.fields(node, path, _POOL)
    pool = PoolConfig(name=name, **fields)
    if pool.spawn is None and not pool.servers and pool.discovery is None:
        raise reader.error("empty pool: give `spawn`, `discovery` or at least one entry in `servers`",
                           key_node, path)
    return pool


def _listen(reader: Reader, node: yaml.Node, path: str) -> tuple[ListenConfig, ...]:
    """One listener (a mapping) or several (a list of them)."""
    if not isinstance(node, yaml.SequenceNode):
        return (ListenConfig(**reader.fields(node, path, _LISTEN)),)
    items = reader.items(node, path)
    if not items:
        raise reader.error("no listeners: give at least one", node, path)
    listeners: list[ListenConfig] = []
    for item, where in items:
        listener = ListenConfig(**reader.fields(item, where, _LISTEN))
        for other in listeners:
            if listener.port and (listener.host, listener.port) == (other.host, other.port):
                raise reader.error(f"{listener.host}:{listener.port} is listed twice", item, where)
            if listener.label == other.label:
                raise reader.error(f"two listeners named {listener.label!r}", item, where)
        if listener.tls is not None and listener.redirect_https is not None:
            raise reader.error("a TLS listener cannot redirect to HTTPS: it is HTTPS", item, where)
        listeners.append(listener)
    return tuple(listeners)


def _base_dir(reader: Reader) -> str:
    """Relative paths in a config file are taken from the file's folder."""
    return os.path.dirname(os.path.abspath(reader.source)) if os.path.isfile(reader.source) else os.getcwd()


def _file_path(reader: Reader, node: yaml.Node, path: str) -> str:
    return os.path.join(_base_dir(reader), _STRING(reader, node, path))


def _certificates(reader: Reader, node: yaml.Node, path: str) -> tuple[CertificateConfig, ...]:
    items = reader.items(node, path)
    if not items:
        raise reader.error("no certificates: give at least one {cert: FILE, key: FILE}", node, path)
    certificates = []
    for item, where in items:
        fields = reader.fields(item, where, _CERTIFICATE, required=("cert", "key"))
        try:
            info = inspect_certificate(fields["cert"], fields["key"])
        except ConfigError as exc:
            raise reader.error(exc.reason, item, where) from None
        if expires_soon(info):
            log.warning("%s:%d: %s: the certificate in %s expires on %s UTC", reader.source,
                        item.start_mark.line + 1, where, fields["cert"], f"{info.not_after:%Y-%m-%d %H:%M}")
        certificates.append(CertificateConfig(names=info.names, **fields))
    return tuple(certificates)


def _tls_version_value(value: object) -> str:
    text = f"{value:.1f}" if isinstance(value, float) else value   # `1.2` unquoted reads as a number
    if text in ("1.2", "1.3"):
        return str(text)
    raise ConfigError(f"expected \"1.2\" or \"1.3\", got {show(value)}")


def _strings(reader: Reader, node: yaml.Node, path: str) -> tuple[str, ...]:
    return tuple(_STRING(reader, item, where) for item, where in reader.items(node, path))


def _ca_file(reader: Reader, node: yaml.Node, path: str) -> str:
    ca = _file_path(reader, node, path)
    try:
        check_ca_file(ca)
    except ConfigError as exc:
        raise reader.error(exc.reason, node, path) from None
    return ca


def _any_text_value(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"expected a string, got {show(value)}")


def _statuses(reader: Reader, node: yaml.Node, path: str) -> tuple[int, ...]:
    return tuple(_integer(100, 599)(reader, item, where) for item, where in reader.items(node, path))


def _resolvers(reader: Reader, node: yaml.Node, path: str) -> tuple[str, ...]:
    found = []
    for item, where in reader.items(node, path):
        text = _STRING(reader, item, where)
        host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
        try:
            ipaddress.ip_address(host.strip("[]"))
            if port and not 1 <= int(port) <= 65535:
                raise ValueError(port)
        except ValueError:
            raise reader.error(f"expected an IP address with an optional port, got {text!r}", item, where) \
                from None
        found.append(text)
    return tuple(found)


def _discovery(reader: Reader, node: yaml.Node, path: str) -> DiscoveryConfig:
    discovery = DiscoveryConfig(**reader.fields(node, path, _DISCOVERY, required=("dns",)))
    if discovery.type == "a" and not discovery.port:
        raise reader.error("type a needs a port (SRV records carry their own)", node, path)
    return discovery


def _percent_value(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100:
        return float(value)
    raise ConfigError(f"expected a percentage from 0 to 100, got {show(value)}")


def _route_pool(reader: Reader, node: yaml.Node, path: str) -> str:
    name = _STRING(reader, node, path)
    if name not in reader.pool_names:
        raise reader.error(f"no pool named {name!r} (pools: {', '.join(reader.pool_names)})", node, path)
    return name


def _routes(reader: Reader, node: yaml.Node, path: str) -> tuple[RouteConfig, ...]:
    items = reader.items(node, path)
    if not items:  # almost certainly a mistake: nothing at all would be routed
        raise reader.error("no routes: add one, or remove `routes` to send everything to the first pool",
                           node, path)
    routes: dict[str, RouteConfig] = {}
    for index, (item, where) in enumerate(items):
        route = RouteConfig(**{"name": f"route{index}", **reader.fields(item, where, _ROUTE)})
        actions = [a for a in ("pool", "redirect", "respond") if getattr(route, a) is not None]
        if len(actions) != 1:
            what = "none" if not actions else " and ".join(actions)
            raise reader.error(f"a route needs exactly one of pool, redirect, respond (got {what})",
                               item, where)
        if route.name in routes:
            raise reader.error(f"duplicate route name {route.name!r}", item, where)
        for earlier in routes.values():
            if shadows(earlier, route):
                log.warning("%s:%d: %s: route %r can never match: route %r before it takes all its requests",
                            reader.source, item.start_mark.line + 1, where, route.name, earlier.name)
                break
        routes[route.name] = route
    return tuple(routes.values())


def shadows(earlier: RouteConfig, later: RouteConfig) -> bool:
    """Every request ``later`` matches, ``earlier`` matches first."""
    if earlier.host is not None and earlier.host != later.host and not (
            later.host is not None and earlier.host.startswith("*.") and not later.host.startswith("*.")
            and later.host.partition(".")[2] == earlier.host[2:]):
        return False
    prefix = earlier.path_prefix
    if not (later.path_prefix == prefix or later.path_prefix.startswith(prefix.rstrip("/") + "/")):
        return False
    if earlier.methods and not (later.methods and set(later.methods) <= set(earlier.methods)):
        return False
    return set(earlier.headers) <= set(later.headers)


def _route_host_value(value: object) -> str:
    """Exact, or one leading ``*.``; compared without case; a port is ignored (dropped here)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a host name like 'example.com' or '*.example.com', got {show(value)}")
    host = value.strip().lower()
    if host.startswith("[") and "]" in host:
        host = host[:host.index("]") + 1]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    name = host[2:] if host.startswith("*.") else host
    if not _HOST_LABELS.fullmatch(name) and not (name.startswith("[") and name.endswith("]")):
        raise ConfigError(f"expected a host name like 'example.com' or '*.example.com', got {show(value)}")
    return host


_HOST_LABELS = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Fields a header rule may not touch: the framing and the connection are balancer's to write.
_FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
                             "te", "trailer", "proxy-connection"})


def _header_name(reader: Reader, node: yaml.Node, path: str) -> str:
    name = _STRING(reader, node, path)
    if not _TOKEN.fullmatch(name):
        raise reader.error(f"not a valid header name: {name!r}", node, path)
    if name.lower() in _FRAMING_FIELDS:
        raise reader.error(f"{name} is balancer's to write (message framing), not a rule's", node, path)
    return name


def _header_value(reader: Reader, node: yaml.Node, path: str) -> str:
    value = reader.text(node, path)
    if any(c in value for c in "\r\n\0"):
        raise reader.error("a header value may not hold CR, LF or NUL", node, path)
    return value


def _header_pairs(reader: Reader, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name, (key, value) in reader.mapping(node, path, None).items():
        where = join_path(path, name)
        pairs.append((_header_name(reader, key, where), _header_value(reader, value, where)))
    return tuple(pairs)


def _match_headers(reader: Reader, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...]:
    return tuple((name.lower(), value) for name, value in _header_pairs(reader, node, path))


def _header_names(reader: Reader, node: yaml.Node, path: str) -> tuple[str, ...]:
    return tuple(_header_name(reader, item, where) for item, where in reader.items(node, path))


def _methods(reader: Reader, node: yaml.Node, path: str) -> tuple[str, ...]:
    methods = []
    for item, where in reader.items(node, path):
        method = _STRING(reader, item, where)
        if not _TOKEN.fullmatch(method) or method != method.upper():
            raise reader.error(f"expected a method in capitals like GET, got {method!r}", item, where)
        methods.append(method)
    return tuple(methods)


def _redirect_status_value(value: object) -> int:
    if value in (301, 302, 303, 307, 308):
        return cast_int(value)
    raise ConfigError(f"expected 301, 302, 303, 307 or 308, got {show(value)}")


def cast_int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _location_value(value: object) -> str:
    if isinstance(value, str) and value and not any(c in value for c in "\r\n\0 "):
        return value
    raise ConfigError(f"expected a URL or path without spaces, got {show(value)}")


def _users(reader: Reader, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...]:
    users = []
    for name, (_, value) in reader.mapping(node, path, None).items():
        where = join_path(path, name)
        hashed = _STRING(reader, value, where)
        if ":" in name or not name:
            raise reader.error("a user name may not hold ':'", value, where)
        if not _BCRYPT.fullmatch(hashed):
            raise reader.error("expected a bcrypt hash ($2b$12$... 60 characters; make one with "
                               "`python -c 'import bcrypt; print(bcrypt.hashpw(b\"PASSWORD\", "
                               "bcrypt.gensalt()).decode())'`)", value, where)
        users.append((name, hashed))
    if not users:
        raise reader.error("no users", node, path)
    return tuple(users)


_BCRYPT = re.compile(r"\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}")
_RATE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*/\s*(?P<unit>s|m|h|second|minute|hour)", re.ASCII)


def _rate_value(value: object) -> float:
    if isinstance(value, str) and (match := _RATE.fullmatch(value.strip())):
        per = {"s": 1, "second": 1, "m": 60, "minute": 60, "h": 3600, "hour": 3600}[match["unit"]]
        rate = float(match["n"]) / per
        if rate > 0:
            return rate
    raise ConfigError(f"expected a rate like '100/s', '30/m' or '1000/h', got {show(value)}")


def _limit_key_value(value: object) -> str:
    if value == "client_ip":
        return value
    if isinstance(value, str) and value.startswith("header:") and _TOKEN.fullmatch(value[7:]):
        return "header:" + value[7:].lower()
    raise ConfigError(f"expected client_ip or header:NAME, got {show(value)}")


def _hash_key_value(value: object) -> str:
    if value in ("client_ip", "uri"):
        return str(value)
    if isinstance(value, str) and value.startswith(("header:", "cookie:")) and _TOKEN.fullmatch(value[7:]):
        kind, _, name = value.partition(":")
        return f"{kind}:{name.lower() if kind == 'header' else name}"
    raise ConfigError(f"expected client_ip, uri, header:NAME or cookie:NAME, got {show(value)}")


# --- the schema tables: YAML key -> (dataclass attribute, converter) ------------------------------------
# These YAML names are a public interface. Dict order is conversion order (hence `pools` before
# `routes`) and the key order of `dump_effective`.

_HOST_PORT: Schema = {"host": ("host", _STRING), "port": ("port", _integer(0, 65535))}
_CERTIFICATE: Schema = {"cert": ("cert", _file_path), "key": ("key", _file_path)}
_SERVER_TLS: Schema = {"certificates": ("certificates", _certificates),
                       "min_version": ("min_version", _scalar(_tls_version_value)),
                       "alpn": ("alpn", _strings)}
_LISTEN: Schema = {**_HOST_PORT, "name": ("name", _STRING),
                   "redirect_https": ("redirect_https", _integer(1, 65535)),
                   "tls": ("tls", _section(ServerTLSConfig, _SERVER_TLS, required=("certificates",)))}
_UPSTREAM_TLS: Schema = {"enabled": ("enabled", _scalar(_boolean_value)),
                         "verify": ("verify", _scalar(_boolean_value)),
                         "ca": ("ca", _ca_file), "server_name": ("server_name", _hostname)}
_MONITOR: Schema = {**_HOST_PORT, "metrics": ("metrics", _scalar(_boolean_value))}
_ADMIN: Schema = {**_HOST_PORT, "token": ("token", _STRING),  # same checks, AdminConfig's defaults
                  "slowlog_threshold": ("slowlog_threshold_s", _duration()),
                  "slowlog_size": ("slowlog_size", _integer(1, 100000))}
_LOG: Schema = {"level": ("level", _choice(*LOG_LEVELS)),
                "access_log": ("access_log", _scalar(_boolean_value)),
                "access_log_format": ("access_log_format", _choice("text", "json")),
                "access_log_path": ("access_log_path", _STRING)}
_SHUTDOWN: Schema = {"drain_timeout": ("drain_timeout_s", _duration()),
                     "worker_stop_timeout": ("worker_stop_timeout_s", _duration())}
_LIMITS: Schema = {"max_body": ("max_body", _scalar(_size_value)),
                   "max_request_line": ("max_request_line", _size(256, 1 << 20)),
                   "max_header_size": ("max_header_size", _size(1024, 1 << 24)),
                   "max_headers": ("max_headers", _integer(1, 10000)),
                   "max_connections": ("max_connections", _integer(0)),
                   "max_response_header": ("max_response_header", _scalar(_size_value))}
_CLIENT_TIMEOUTS: Schema = {"client_header": ("client_header_s", _duration(positive=True)),
                            "client_idle": ("client_idle_s", _duration(positive=True)),
                            "client_body": ("client_body_s", _duration(positive=True)),
                            "client_send": ("client_send_s", _duration(positive=True)),
                            "tunnel_idle": ("tunnel_idle_s", _duration(positive=True))}
_PASSIVE: Schema = {
    "enabled": ("enabled", _scalar(_boolean_value)),
    "consecutive_failures": ("consecutive_failures", _integer(1)),
    "ejection_time": ("ejection_time_s", _duration(positive=True)),
    "max_ejection_time": ("max_ejection_time_s", _duration(positive=True)),
    "max_ejected_percent": ("max_ejected_percent", _integer(0, 100)),
    "statuses": ("statuses", _statuses),
}
_SPAWN: Schema = {
    "command": ("command", _command), "count": ("count", _integer(1, 256)), "env": ("env", _env),
    "cwd": ("cwd", _STRING), "start_timeout": ("start_timeout_s", _duration(positive=True)),
    "keepalive_timeout": ("keepalive_timeout_s", _duration(positive=True)),
}
_SERVER: Schema = {"address": ("address", _ADDRESS_TEXT), "weight": ("weight", _integer(0, 1000))}
_HEALTH: Schema = {
    "path": ("path", _scalar(_url_path_value)), "interval": ("interval_s", _duration(positive=True)),
    "timeout": ("timeout_s", _duration(positive=True)), "rise": ("rise", _integer(1)),
    "fall": ("fall", _integer(1)), "expect": ("expect", _scalar(_status_range_value)),
    "enabled": ("enabled", _scalar(_boolean_value)),
}
_TIMEOUTS: Schema = {"connect": ("connect_s", _duration(positive=True)),
                     "response": ("response_s", _duration(positive=True)),
                     "read": ("read_s", _duration(positive=True)),
                     "send": ("send_s", _duration(positive=True))}
_CONNECTIONS: Schema = {
    "max": ("max", _integer(0)), "max_idle": ("max_idle", _integer(0)), "min_idle": ("min_idle", _integer(0)),
    "idle_timeout": ("idle_timeout_s", _duration(positive=True)),
    "max_requests": ("max_requests", _integer(0)), "max_lifetime": ("max_lifetime_s", _duration()),
    "acquire_timeout": ("acquire_timeout_s", _duration(positive=True)),
    "max_waiting": ("max_waiting", _integer(0)),
}
_HASH: Schema = {"key": ("key", _scalar(_hash_key_value))}
_DISCOVERY: Schema = {"dns": ("dns", _hostname), "port": ("port", _integer(1, 65535)),
                      "type": ("type", _choice("a", "srv")),
                      "interval": ("interval_s", _duration(positive=True)),
                      "resolvers": ("resolvers", _resolvers)}
_STICKY: Schema = {"cookie": ("cookie", _STRING), "ttl": ("ttl_s", _duration(positive=True)),
                   "secret": ("secret", _STRING)}
_POOL: Schema = {
    "balance": ("balance", _choice(*BALANCE_POLICIES)), "spawn": ("spawn", _section(SpawnConfig, _SPAWN)),
    "servers": ("servers", _servers), "health": ("health", _section(HealthConfig, _HEALTH)),
    "timeouts": ("timeouts", _section(TimeoutsConfig, _TIMEOUTS)),
    "connections": ("connections", _connections), "retries": ("retries", _integer(0, 10)),
    "passive": ("passive", _section(PassiveConfig, _PASSIVE)), "slow_start": ("slow_start_s", _duration()),
    "tls": ("tls", _section(UpstreamTLSConfig, _UPSTREAM_TLS)),
    "hash": ("hash", _section(HashConfig, _HASH)), "sticky": ("sticky", _section(StickyConfig, _STICKY)),
    "discovery": ("discovery", _discovery),
}
_HEADER_RULES: Schema = {"set": ("set", _header_pairs), "add": ("add", _header_pairs),
                         "remove": ("remove", _header_names)}
_REDIRECT: Schema = {"to": ("to", _scalar(_location_value)),
                     "status": ("status", _scalar(_redirect_status_value)),
                     "keep_path": ("keep_path", _scalar(_boolean_value))}
_RESPOND: Schema = {"status": ("status", _integer(200, 599)), "body": ("body", _scalar(_any_text_value)),
                    "content_type": ("content_type", _STRING)}
_FAULT_DELAY: Schema = {"percent": ("percent", _scalar(_percent_value)),
                        "duration": ("duration_s", _duration(maximum=60.0))}
_FAULT_ABORT: Schema = {"percent": ("percent", _scalar(_percent_value)),
                        "status": ("status", _integer(200, 599))}
_FAULT: Schema = {"delay": ("delay", _section(FaultDelayConfig, _FAULT_DELAY,
                                              required=("percent", "duration"))),
                  "abort": ("abort", _section(FaultAbortConfig, _FAULT_ABORT, required=("percent",))),
                  "headers": ("headers", _scalar(_boolean_value))}
_BASIC_AUTH: Schema = {"realm": ("realm", _STRING), "users": ("users", _users)}
_RATE_LIMIT: Schema = {"rate": ("rate", _scalar(_rate_value)), "burst": ("burst", _integer(0)),
                       "key": ("key", _scalar(_limit_key_value)), "max_keys": ("max_keys", _integer(1))}
_ROUTE: Schema = {"name": ("name", _STRING), "host": ("host", _scalar(_route_host_value)),
                  "path_prefix": ("path_prefix", _scalar(_url_path_value)), "methods": ("methods", _methods),
                  "headers": ("headers", _match_headers), "pool": ("pool", _route_pool),
                  "strip_prefix": ("strip_prefix", _scalar(_boolean_value)),
                  "add_prefix": ("add_prefix", _scalar(_url_path_value)),
                  "request_headers": ("request_headers", _section(HeaderRules, _HEADER_RULES)),
                  "response_headers": ("response_headers", _section(HeaderRules, _HEADER_RULES)),
                  "allow": ("allow", _cidrs), "deny": ("deny", _cidrs),
                  "basic_auth": ("basic_auth", _section(BasicAuthConfig, _BASIC_AUTH, required=("users",))),
                  "rate_limit": ("rate_limit", _section(RateLimitConfig, _RATE_LIMIT, required=("rate",))),
                  "redirect": ("redirect", _section(RedirectConfig, _REDIRECT, required=("to",))),
                  "respond": ("respond", _section(RespondConfig, _RESPOND)),
                  "fault": ("fault", _section(FaultConfig, _FAULT))}
_CONFIG: Schema = {
    "listen": ("listen", _listen), "monitor": ("monitor", _section(MonitorConfig, _MONITOR)),
    "admin": ("admin", _section(AdminConfig, _ADMIN)),
    "processes": ("processes", _scalar(_processes_value)), "log": ("log", _section(LogConfig, _LOG)),
    "shutdown": ("shutdown", _section(ShutdownConfig, _SHUTDOWN)),
    "limits": ("limits", _section(LimitsConfig, _LIMITS)),
    "timeouts": ("timeouts", _section(ClientTimeoutsConfig, _CLIENT_TIMEOUTS)),
    "trusted_proxies": ("trusted_proxies", _cidrs),
    "pools": ("pools", _pools), "routes": ("routes", _routes),
}
_SCHEMAS: dict[type, Schema] = {
    Config: _CONFIG, ListenConfig: _LISTEN, MonitorConfig: _MONITOR, ServerTLSConfig: _SERVER_TLS,
    CertificateConfig: _CERTIFICATE,
    UpstreamTLSConfig: _UPSTREAM_TLS, AdminConfig: _ADMIN, LogConfig: _LOG, ShutdownConfig: _SHUTDOWN,
    LimitsConfig: _LIMITS, PoolConfig: _POOL, SpawnConfig: _SPAWN, ServerConfig: _SERVER,
    HealthConfig: _HEALTH, TimeoutsConfig: _TIMEOUTS, ConnectionsConfig: _CONNECTIONS, RouteConfig: _ROUTE,
    ClientTimeoutsConfig: _CLIENT_TIMEOUTS, PassiveConfig: _PASSIVE, HeaderRules: _HEADER_RULES,
    RedirectConfig: _REDIRECT, RespondConfig: _RESPOND, BasicAuthConfig: _BASIC_AUTH,
    FaultConfig: _FAULT, FaultDelayConfig: _FAULT_DELAY, FaultAbortConfig: _FAULT_ABORT,
    RateLimitConfig: _RATE_LIMIT, HashConfig: _HASH, StickyConfig: _STICKY, DiscoveryConfig: _DISCOVERY,
}


def config_keys() -> list[str]:
    """Every key a config file may hold, as dotted paths in the README's notation: ``NAME`` for a
    pool's name, ``[]`` for a list item (``pools.NAME.servers[].weight``). Driven by the same schema
    tables as parsing, so the README's reference can be checked against it."""
    nested = {"listen[]": _LISTEN, "listen[].tls": _SERVER_TLS, "listen[].tls.certificates[]": _CERTIFICATE,
              "monitor": _MONITOR, "pools.NAME.tls": _UPSTREAM_TLS, "pools.NAME.hash": _HASH,
              "pools.NAME.sticky": _STICKY, "pools.NAME.discovery": _DISCOVERY,
              "routes[].request_headers": _HEADER_RULES, "routes[].response_headers": _HEADER_RULES,
              "routes[].redirect": _REDIRECT, "routes[].respond": _RESPOND,
              "routes[].fault": _FAULT, "routes[].fault.delay": _FAULT_DELAY,
              "routes[].fault.abort": _FAULT_ABORT, "routes[].basic_auth": _BASIC_AUTH,
              "routes[].rate_limit": _RATE_LIMIT, "admin": _ADMIN,
              "log": _LOG, "shutdown": _SHUTDOWN,
              "limits": _LIMITS,
              "timeouts": _CLIENT_TIMEOUTS, "pools.NAME": _POOL, "routes[]": _ROUTE,
              "pools.NAME.spawn": _SPAWN, "pools.NAME.servers[]": _SERVER, "pools.NAME.health": _HEALTH,
              "pools.NAME.timeouts": _TIMEOUTS, "pools.NAME.connections": _CONNECTIONS,
              "pools.NAME.passive": _PASSIVE}
    keys = [key for key in _CONFIG if key not in ("pools", "routes") and key not in nested
            and f"{key}[]" not in nested]
    for prefix, schema in nested.items():
        keys += [f"{prefix}.{key}" for key in schema
                 if f"{prefix}.{key}" not in nested and f"{prefix}.{key}[]" not in nested]
    return keys


# --- dumping ---------------------------------------------------------------------------------------------


def _dump(value: Any, attr: str = "") -> Any:
    """The YAML-ready form of a config value, driven by the same schema tables as parsing."""
    schema = _SCHEMAS.get(type(value))
    if schema is not None:  # a ServerConfig dumps only address and weight: host/port derive from them
        return {key: _dump(getattr(value, name), name) for key, (name, _) in schema.items()}
    if isinstance(value, PoolMap):
        return {name: _dump(pool) for name, pool in value.items()}
    if attr == "expect":
        return f"{value[0]}-{value[1]}"
    if attr in ("env", "headers", "set", "add", "users"):
        return {name: _dump(text) for name, text in value}
    if isinstance(value, tuple):
        return [_dump(item) for item in value]
    if isinstance(value, float):  # every float in the schema is a duration in seconds
        return format_duration(value)
    if isinstance(value, str):
        return value.replace("$", "$$")  # so that reading it back does not substitute anything
    return value
