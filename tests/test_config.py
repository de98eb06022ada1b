"""balancer.config: YAML -> frozen dataclasses, located errors, ${VAR} substitution, the effective dump."""

from __future__ import annotations

import logging
import os
import pickle
import textwrap
from pathlib import Path

import pytest
import yaml

from balancer.config.load import (
    DEFAULT_CONFIG_PATH,
    AdminConfig,
    Config,
    ConnectionsConfig,
    HealthConfig,
    ListenConfig,
    RouteConfig,
    ServerConfig,
    SpawnConfig,
    TimeoutsConfig,
    dump_effective,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
)
from balancer.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
MINIMAL = "pools: {web: {servers: [{address: 127.0.0.1:9001}]}}\n"


def parse(text: str, environ: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "x.yaml", environ or {})


def error_of(text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, environ)
    return str(caught.value)


# --- valid files ---------------------------------------------------------------------------------------


def test_minimal_file_gets_every_default() -> None:
    """A pool with one server is a whole config; everything else takes its documented default."""
    config = parse(MINIMAL)
    assert config.listen == (ListenConfig(host="127.0.0.1", port=8080),)
    assert config.admin is None
    assert config.processes == 1
    assert (config.log.level, config.log.access_log) == ("info", False)
    assert (config.shutdown.drain_timeout_s, config.shutdown.worker_stop_timeout_s) == (15.0, 10.0)
    assert config.limits.max_body == 0
    assert config.trusted_proxies == ()
    web = config.pools["web"]
    assert web.servers == (ServerConfig(address="127.0.0.1:9001", host="127.0.0.1", port=9001, weight=1),)
    assert (web.balance, web.spawn, web.health, web.retries) == ("round_robin", None, None, 2)
    assert web.timeouts == TimeoutsConfig(connect_s=3.0, response_s=30.0, read_s=60.0)
    assert web.connections == ConnectionsConfig(max=0, max_idle=32, min_idle=0, idle_timeout_s=None,
                                                max_requests=1000, max_lifetime_s=3600.0,
                                                acquire_timeout_s=5.0)
    assert config.routes == (RouteConfig(name="default", path_prefix="/", host=None, pool="web"),)


FULL = """\
listen: {host: 0.0.0.0, port: 0}
admin: {host: 127.0.0.2, port: 9991, token: s3cret}
workers: 3
log: {level: DEBUG, access_log: true}
shutdown: {drain_timeout: 500ms, worker_stop_timeout: 1m}
limits: {max_body: 10MiB}
trusted_proxies: [10.0.0.0/8, "::1"]
pools:
  web:
    balance: least_loaded
    spawn:
      command: "python -m backends --flag 'a b'"
      count: 2
      env: {MODE: fast, RATIO: 1.0, DEBUG: yes}
      cwd: /srv
      start_timeout: 5s
      keepalive_timeout: 30s
    servers:
      - {address: 10.0.0.5:80, weight: 5}
      - "[::1]:9001"
    health: {path: /ready, interval: 1.5s, timeout: 250ms, rise: 1, fall: 5, expect: 200, enabled: false}
    timeouts: {connect: 1s, response: 2s, read: 3s}
    connections: {max: 10, max_idle: 4, min_idle: 2, idle_timeout: 9s, max_requests: 0,
                  max_lifetime: 0, acquire_timeout: 1s}
    retries: 0
  api.v2:
    servers: [127.0.0.1:9100]
routes:
  - {name: api, path_prefix: /api/, host: API.example.com, pool: api.v2}
  - {pool: web}
"""


def test_full_example_sets_every_field() -> None:
    """Every key of the schema lands in its dataclass field, converted (units, lists, case)."""
    config = parse(FULL)
    assert config.listen == (ListenConfig(host="0.0.0.0", port=0),)
    assert config.admin == AdminConfig(host="127.0.0.2", port=9991, token="s3cret")
    assert config.processes == 3
    assert (config.log.level, config.log.access_log) == ("debug", True)
    assert (config.shutdown.drain_timeout_s, config.shutdown.worker_stop_timeout_s) == (0.5, 60.0)
    assert config.limits.max_body == 10 * 2**20
    assert config.trusted_proxies == ("10.0.0.0/8", "::1/128")
    assert list(config.pools) == ["web", "api.v2"]
    web = config.pools["web"]
    assert web.balance == "least_loaded"
    assert web.spawn == SpawnConfig(command=("python", "-m", "backends", "--flag", "a b"), count=2,
                                    env=(("MODE", "fast"), ("RATIO", "1.0"), ("DEBUG", "yes")),
                                    cwd="/srv", start_timeout_s=5.0, keepalive_timeout_s=30.0)
    assert web.servers == (ServerConfig(address="10.0.0.5:80", host="10.0.0.5", port=80, weight=5),
                           ServerConfig(address="[::1]:9001", host="::1", port=9001, weight=1))
    assert web.health == HealthConfig(path="/ready", interval_s=1.5, timeout_s=0.25, rise=1, fall=5,
                                      expect=(200, 200), enabled=False)
    assert web.timeouts == TimeoutsConfig(connect_s=1.0, response_s=2.0, read_s=3.0)
    assert web.connections == ConnectionsConfig(max=10, max_idle=4, min_idle=2, idle_timeout_s=9.0,
                                                max_requests=0, max_lifetime_s=0.0, acquire_timeout_s=1.0)
    assert web.retries == 0
    assert config.routes == (
        RouteConfig(name="api", path_prefix="/api/", host="api.example.com", pool="api.v2"),
        RouteConfig(name="route1", path_prefix="/", host=None, pool="web"),
    )


def test_null_means_default() -> None:
    """A key set to null or left empty behaves as if it were absent."""
    config = parse("""\
        listen:
        admin: {port: ~}
        pools: {web: {servers: [a:1], health: {rise: null}}}
        """)
    assert config.listen == (ListenConfig(),)
    assert config.admin == AdminConfig()
    health = config.pools["web"].health
    assert health is not None
    assert health.rise == 2


def test_default_config_file_is_the_documented_setup() -> None:
    """config/balancer.yaml: 8080 + admin 8081, four spawned `python -m backends`, checks, one route."""
    config = load_config(REPO / DEFAULT_CONFIG_PATH, environ={})
    assert (config.listen[0].port, config.admin) == (8080, AdminConfig(host="127.0.0.1", port=8081))
    web = config.pools["web"]
    assert web.spawn is not None
    assert web.spawn.command == ("python", "-m", "backends")
    assert web.spawn.count == 4
    assert web.health == HealthConfig(path="/health", interval_s=2.0, timeout_s=1.0, rise=2, fall=3)
    assert (web.timeouts.connect_s, web.timeouts.response_s) == (3.0, 30.0)
    assert config.routes == (RouteConfig(name="route0", path_prefix="/", pool="web"),)


def test_processes_auto_is_the_cpu_count() -> None:
    """`processes: auto` becomes os.cpu_count()."""
    assert parse("processes: auto\n" + MINIMAL).processes == (os.cpu_count() or 1)


def test_the_old_key_workers_reads_as_processes_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """`workers:` was the proxy processes' key; "workers" now means spawned backends only."""
    with caplog.at_level(logging.WARNING, logger="balancer.config.load"):
        config = parse_config("\n" + "workers: 2\n" + MINIMAL, "x.yaml")
    assert config.processes == 2
    assert "x.yaml:2: workers: renamed to 'processes'" in caplog.text
    assert "workers" not in yaml.safe_load(dump_effective(config))
    with pytest.raises(ConfigError, match=r"x.yaml:2: workers: .workers. is the old name of .processes."):
        parse_config("processes: 2\nworkers: 2\n" + MINIMAL, "x.yaml")


def test_config_is_hashable_and_picklable() -> None:
    """A Config can be hashed and sent to another process; equality ignores where it came from."""
    config = parse(FULL)
    assert pickle.loads(pickle.dumps(config)) == config
    assert hash(config) == hash(parse_config(FULL, "elsewhere.yaml", {}))
    assert len(config.text_hash) == 64


# --- one located error per problem ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("pools:\n  web:\n    servers: [a:1]\n    health:\n      rise: two\n",
                 "x.yaml:5: pools.web.health.rise: expected an integer >= 1, got 'two'", id="wrong-type"),
    pytest.param("listen: {port: 70000}\n" + MINIMAL,
                 "x.yaml:1: listen.port: expected an integer in 0..65535, got 70000", id="out-of-range"),
    pytest.param("pools: {web: {servers: [a:1], health: {rise: true}}}",
                 "x.yaml:1: pools.web.health.rise: expected an integer >= 1, got true", id="bool-as-int"),
    pytest.param("pools: {web: {servers: [a:1], retries: '2'}}",
                 "x.yaml:1: pools.web.retries: expected an integer in 0..10, got '2'", id="string-as-int"),
    pytest.param("pools:\n  web:\n    helth: {}\n",
                 "x.yaml:3: pools.web.helth: unknown key (did you mean 'health'?)", id="unknown-key-close"),
    pytest.param("listen: {zzz: 1}\n" + MINIMAL,
                 "x.yaml:1: listen.zzz: unknown key (allowed: host, port, name, redirect_https, tls)", id="unknown-key-far"),
    pytest.param("pools:\n  web:\n    servers: [a:1]\nroutes:\n  - path_prefix: /\n    pool: api\n",
                 "x.yaml:6: routes[0].pool: no pool named 'api' (pools: web)", id="missing-pool"),
    pytest.param("pools:\n  web: {balance: p2c}\n",
                 "x.yaml:2: pools.web: empty pool: give `spawn`, `discovery` or at least one entry in `servers`",
                 id="empty-pool"),
    pytest.param("pools:\n  web:\n    retries: 1\n    servers: [a:1]\n    retries: 2\n",
                 "x.yaml:5: pools.web.retries: duplicate key (first given on line 3)", id="duplicate-key"),
    pytest.param("pools: {web: {servers: [a:1], timeouts: {connect: 3 sec}}}",
                 "x.yaml:1: pools.web.timeouts.connect: expected a duration like '2s', '500ms' or '1m30s', "
                 "got '3 sec'", id="bad-duration"),
    pytest.param("pools: {web: {servers: [a:1], timeouts: {connect: 0s}}}",
                 "x.yaml:1: pools.web.timeouts.connect: expected a duration > 0, got '0s'",
                 id="zero-duration"),
    pytest.param("pools:\n  web:\n    servers:\n      - a:1\n      - {address: 'localhost'}\n",
                 "x.yaml:5: pools.web.servers[1].address: expected 'host:port' with a port in 1..65535, "
                 "got 'localhost'", id="bad-address"),
    pytest.param("pools: {web: {servers: ['::1:80']}}",
                 "x.yaml:1: pools.web.servers[0]: expected 'host:port' with a port in 1..65535, "
                 "got '::1:80' (IPv6 needs brackets: '[::1]:9001')", id="bare-ipv6"),
    pytest.param("trusted_proxies:\n  - 10.0.0.0/8\n  - 10.0.0.0/33\n" + MINIMAL,
                 "x.yaml:3: trusted_proxies[1]: expected an IP network like '10.0.0.0/8' or '::1', "
                 "got '10.0.0.0/33'", id="bad-cidr"),
    pytest.param("pools: {web: {servers: [a:1], connections: {max_idle: 2,\n  min_idle: 5}}}",
                 "x.yaml:2: pools.web.connections.min_idle: min_idle (5) must not exceed max_idle (2)",
                 id="min-idle-over-max-idle"),
    pytest.param("pools: {web: {servers: [a:1], connections: {max: 1, min_idle: 2}}}",
                 "x.yaml:1: pools.web.connections.min_idle: min_idle (2) must not exceed max (1)",
                 id="min-idle-over-max"),
    pytest.param("pools:\n  web:\n    servers: [a:1\n  api: {}\n",
                 "x.yaml:4: invalid YAML: while parsing a flow sequence; expected ',' or ']', but got ':'",
                 id="yaml-syntax"),
    pytest.param("# nothing but a comment\n",
                 "x.yaml:1: the file is empty; a config needs at least a `pools` section", id="empty-file"),
    pytest.param("- web\n", "x.yaml:1: expected a mapping at the top level, got a list", id="top-level-list"),
    pytest.param("workers: 2\n", "x.yaml:1: missing required key 'pools'", id="no-pools"),
    pytest.param("pools: {}\n", "x.yaml:1: pools: at least one pool is required", id="zero-pools"),
    pytest.param("pools: {web/1: {servers: [a:1]}}",
                 "x.yaml:1: pools.web/1: a pool name may only use letters, digits, '_', '.' and '-'",
                 id="bad-pool-name"),
    pytest.param("pools: {web: {servers: [a:1], health: {path: health}}}",
                 "x.yaml:1: pools.web.health.path: expected a path starting with '/', got 'health'",
                 id="relative-health-path"),
    pytest.param("pools: {web: {servers: [a:1], health: {expect: 200-700}}}",
                 "x.yaml:1: pools.web.health.expect: expected a status or range like 200 or '200-399' "
                 "within 100..599, got '200-700'", id="bad-expect"),
    pytest.param("pools: {web: {servers: [a:1], balance: random}}",
                 "x.yaml:1: pools.web.balance: expected one of round_robin, least_loaded, p2c, hash, got 'random'",
                 id="bad-choice"),
    pytest.param("pools: {web: {servers: a:1}}",
                 "x.yaml:1: pools.web.servers: expected a list, got 'a:1'", id="not-a-list"),
    pytest.param("admin: {token: 1234}\n" + MINIMAL,
                 "x.yaml:1: admin.token: expected a non-empty string, got 1234 "
                 "(quote it to make it a string)",
                 id="number-as-string"),
    pytest.param(MINIMAL + "routes: []\n",
                 "x.yaml:2: routes: no routes: add one, or remove `routes` to send everything to the "
                 "first pool", id="empty-routes"),
    pytest.param(MINIMAL + "routes:\n  - {name: a, pool: web}\n  - {name: a, pool: web}\n",
                 "x.yaml:4: routes[1]: duplicate route name 'a'", id="duplicate-route"),
    pytest.param(MINIMAL + "routes:\n  - {path_prefix: /}\n",
                 "x.yaml:3: routes[0]: a route needs exactly one of pool, redirect, respond (got none)", id="route-without-pool"),
    pytest.param("pools: {web: {spawn: {command: []}}}",
                 "x.yaml:1: pools.web.spawn.command: expected a non-empty command", id="empty-command"),
    pytest.param("pools: {web: {servers: [a:1, a:1]}}",
                 "x.yaml:1: pools.web.servers[1]: duplicate server 'a:1'", id="duplicate-server"),
    pytest.param("base: &b {rise: 1}\n", "x.yaml:1: base: unknown key (allowed: listen, monitor, admin, processes, "
                 "log, shutdown, limits, timeouts, trusted_proxies, pools, routes)", id="unknown-top-level"),
])
def test_error_names_file_line_and_path(text: str, message: str) -> None:
    """Each kind of mistake is one ConfigError reading `FILE:LINE: dotted.path: what is wrong`."""
    assert error_of(text) == message


def test_error_carries_structured_location() -> None:
    """ConfigError exposes file, line and path separately for tools."""
    with pytest.raises(ConfigError) as caught:
        parse("pools:\n  web:\n    servers: [a:1]\n    retries: 11\n")
    assert (caught.value.file, caught.value.line, caught.value.path) == ("x.yaml", 4, "pools.web.retries")


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    """A path that does not exist is a ConfigError naming it."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_config(missing)


def test_load_config_names_the_file_in_yaml_errors(tmp_path: Path) -> None:
    """Errors from a loaded file carry its path as given, and the config records it as `source`."""
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    assert load_config(good, environ={}).source == str(good)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  web: {servers: [a:1]}\n  web: {servers: [b:2]}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad, environ={})
    assert str(caught.value) == f"{bad}:3: pools.web: duplicate key (first given on line 2)"


def test_load_config_rejects_binary_files(tmp_path: Path) -> None:
    """A file that is not UTF-8 text is a ConfigError, not a UnicodeDecodeError."""
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00pools")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(binary)


# --- durations and sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    ("500ms", 0.5), ("100ms", 0.1), ("2s", 2.0), ("1.5s", 1.5), ("1m", 60.0), ("1h", 3600.0),
    (1.5, 1.5), (2, 2.0), ("2", 2.0), ("0", 0.0), (" 3s ", 3.0),
])
def test_parse_duration_accepts_units_and_bare_seconds(value: object, seconds: float) -> None:
    """ms/s/m/h suffixes, bare numbers and numeric strings are seconds."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["-1s", -1, "abc", "", "2 days", True, None, float("inf"), [1]])
def test_parse_duration_rejects_bad_values(value: object) -> None:
    """Negative, non-finite, unit-less words, booleans and non-scalars are errors."""
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.1, 0.25, 1.0, 1.5, 59.0, 60.0, 90.0, 3600.0, 7200.5, 1e-7])
def test_format_duration_reads_back_exactly(seconds: float) -> None:
    """format_duration's spelling parses back to the same float."""
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(("value", "size"), [
    ("0", 0), (1024, 1024), ("512KiB", 512 * 1024), ("10MiB", 10 * 2**20), ("1GB", 10**9), ("7B", 7),
])
def test_max_body_accepts_bytes_and_sizes(value: object, size: int) -> None:
    """limits.max_body takes bytes or a size with a B/KB/MB/GB/KiB/MiB/GiB suffix."""
    assert parse(f"limits: {{max_body: {value}}}\n" + MINIMAL).limits.max_body == size


# --- ${VAR} substitution -------------------------------------------------------------------------------

ENV_DOC = """\
listen:
  host: ${HOST:-127.0.0.1}
  port: ${PORT}
admin:
  token: "${TOKEN}"
pools:
  web:
    servers: [a:1]
"""


def test_env_substitution_types_plain_scalars() -> None:
    """A plain `${PORT}` becomes the integer it spells; a default applies when the variable is unset."""
    config = parse(ENV_DOC, {"PORT": "9000", "TOKEN": "t"})
    assert config.listen == (ListenConfig(host="127.0.0.1", port=9000),)


def test_env_substitution_keeps_quoted_scalars_strings() -> None:
    """A quoted `"${TOKEN}"` stays a string even when the value looks like a number."""
    config = parse(ENV_DOC, {"PORT": "1", "TOKEN": "12345", "HOST": "0.0.0.0"})
    assert config.admin is not None
    assert config.admin.token == "12345"
    assert config.listen[0].host == "0.0.0.0"


def test_env_substitution_unset_variable_is_located() -> None:
    """An unset variable without a default is an error at the key that uses it."""
    message = error_of(ENV_DOC, {"TOKEN": "t"})
    assert message == "x.yaml:3: listen.port: environment variable 'PORT' is not set"


def test_env_substitution_empty_variable_takes_the_default() -> None:
    """Like the shell's `:-`, a set-but-empty variable also takes the default."""
    assert parse(ENV_DOC, {"HOST": "", "PORT": "1", "TOKEN": "t"}).listen[0].host == "127.0.0.1"


def test_env_substitution_dollar_dollar_is_literal() -> None:
    """`$$` is one `$`, and `$${X}` is the literal text `${X}`; a lone `$` is left alone."""
    config = parse("admin:\n  token: a$$b$${X}c$d\n" + MINIMAL)
    assert config.admin is not None
    assert config.admin.token == "a$b${X}c$d"


def test_env_substitution_cannot_inject_yaml() -> None:
    """A value full of YAML syntax is substituted as text, after parsing."""
    config = parse("admin:\n  token: ${T}\n" + MINIMAL, {"T": "x\nlisten: {port: 1}"})
    assert config.admin is not None
    assert config.admin.token == "x\nlisten: {port: 1}"
    assert config.listen[0].port == 8080


def test_env_substitution_reaches_spawn_env_and_command() -> None:
    """Command arguments and worker environment values are substituted and kept as text."""
    config = parse("""\
        pools:
          web:
            spawn:
              command: [python, -m, backends, --id, "${ID}"]
              env:
                DB: ${DB:-sqlite://}
                N: ${N}
        """, {"ID": "w", "N": "7"})
    spawn = config.pools["web"].spawn
    assert spawn is not None
    assert spawn.command == ("python", "-m", "backends", "--id", "w")
    assert spawn.env == (("DB", "sqlite://"), ("N", "7"))


def test_env_substitution_rejects_malformed_references() -> None:
    """`${` without a closing brace, or with a bad name, is an error rather than literal text."""
    assert error_of("admin:\n  token: a${B\n" + MINIMAL) == (
        "x.yaml:2: admin.token: unterminated '${' (write '$$' for a literal '$')")
    assert "bad variable reference '${1X}'" in error_of("admin:\n  token: ${1X}\n" + MINIMAL)


# --- the effective dump --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["balancer.yaml", "minimal.yaml"])
def test_dump_effective_round_trips_shipped_files(name: str) -> None:
    """parse(dump_effective(c)) == c for the shipped configs."""
    config = load_config(REPO / "config" / name, environ={})
    assert parse_config(dump_effective(config), environ={}) == config


def test_dump_effective_round_trips_every_field() -> None:
    """The full example, `$` in strings included, survives a dump and a re-parse unchanged."""
    config = parse(FULL.replace("s3cret", "'s$$3$${X}cret'"))
    assert config.admin is not None
    assert config.admin.token == "s$3${X}cret"
    assert parse_config(dump_effective(config, show_secrets=True), environ={}) == config


def test_dump_effective_uses_yaml_names_and_units() -> None:
    """The dump shows YAML key names (not `_s` attributes) and durations with units."""
    text = dump_effective(parse(MINIMAL))
    assert "      connect: 3s\n" in text
    assert "      max_lifetime: 1h\n" in text
    assert "_s:" not in text
    assert "  pool: web\n" in text
