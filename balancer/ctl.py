"""``balancer status|drain|disable|enable``: a small client of a running balancer's admin API.

Standard library only (``urllib``), so it works from any shell on the host. Errors are raised as
:class:`AdminError` with a one-line message; :mod:`balancer.cli` turns them into exit statuses.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from .config.models import Config

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
TIMEOUT_S = 10.0


class AdminError(Exception):
    """The admin API could not be reached or refused the request."""


def admin_url(config: Config | None, given: str | None) -> str:
    """``--admin``, else ``BALANCER_ADMIN_URL``, else the config's admin listener, else the default."""
    if given:
        return given.rstrip("/")
    if os.environ.get("BALANCER_ADMIN_URL"):
        return os.environ["BALANCER_ADMIN_URL"].rstrip("/")
    if config is not None and config.admin is not None:
        host = config.admin.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{config.admin.port}"
    return DEFAULT_ADMIN_URL


def admin_token(config: Config | None, given: str | None) -> str | None:
    """``--token`` if given, else ``BALANCER_ADMIN_TOKEN``, else the config's ``admin.token``."""
    if given:
        return given
    if os.environ.get("BALANCER_ADMIN_TOKEN"):
        return os.environ["BALANCER_ADMIN_TOKEN"]
    return config.admin.token if config is not None and config.admin is not None else None


def call(url: str, path: str, token: str | None, method: str = "GET",
         timeout: float = TIMEOUT_S) -> tuple[int, Any]:
    """(status, decoded JSON) of one admin request. 2xx only; anything else raises AdminError."""
    request = urllib.request.Request(url + path, method=method, data=b"" if method == "POST" else None)
    request.add_header("X-Balancer-Admin", "1")       # the admin API's CSRF guard (see control/admin.py)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        hint = " (pass --token or set BALANCER_ADMIN_TOKEN)" if exc.code == 401 else ""
        raise AdminError(f"{method} {url}{path}: HTTP {exc.code} {detail}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the admin API at {url}: {reason}") from None
    except ValueError as exc:
        raise AdminError(f"{url}{path}: not JSON: {exc}") from None


def backend_path(backend_id: str, action: str) -> str:
    pool, slash, name = backend_id.partition("/")
    if not slash or not pool or not name:
        raise AdminError(f"backend id must look like POOL/NAME (e.g. web/1), got {backend_id!r}")
    return f"/backends/{urllib.parse.quote(pool, safe='')}/{urllib.parse.quote(name, safe='')}/{action}"


# --- status table --------------------------------------------------------------------------------

COLUMNS = ("BACKEND", "ADDRESS", "STATE", "SINCE", "WEIGHT", "IN-FLIGHT", "REQUESTS", "RPS", "P50", "P99",
           "ERRORS", "CONNS", "PID", "RESTARTS")


def render_status(stats: dict[str, Any], url: str) -> str:
    """The per-backend table ``balancer status`` prints (10 s window for rates and latencies)."""
    lines = [f"balancer at {url}: up {duration(stats['uptime_s'])}, {stats['requests']} requests since "
             f"{stats['stats_since']}, config {stats['config']['file']} "
             f"({stats['config']['sha256'][:12] or '-'})"]
    for name, pool in stats["pools"].items():
        lat = pool["latency"]["10s"]
        lines += ["", f"pool {name}: {pool['ready']}/{pool['size']} ready, {lat['rps']:g} rps, "
                      f"p99 {ms(lat['p99_ms'])}, errors {percent(lat['error_rate'])}, "
                      f"retries {pool['retries']}"]
        rows = [list(COLUMNS)] + [_row(b) for b in pool["backends"]]
        lines += table(rows)
    return "\n".join(lines) + "\n"


def _row(b: dict[str, Any]) -> list[str]:
    lat = b["latency"]["10s"]
    conns = b.get("pool") or {}
    worker = b.get("worker") or {}
    state = b["state"] + (f" ({b['reason']})" if b.get("reason") and b["state"] != "up" else "")
    return [b["id"], b["address"], state, duration(b["since_s"]), str(b["weight"]), str(b["in_flight"]),
            str(b["requests"]), f"{lat['rps']:g}", ms(lat["p50_ms"]), ms(lat["p99_ms"]),
            percent(lat["error_rate"]),
            f"{conns.get('in_use', 0)}/{conns.get('idle', 0)}" if conns else "-",
            str(worker.get("pid") or "-") if worker else "-",
            str(worker.get("restarts", "-")) if worker else "-"]


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}ms" if value < 10 else f"{value:.1f}ms" if value < 1000 else f"{value / 1000:.2f}s"


def percent(rate: float) -> str:
    return f"{rate * 100:.2f}%"


def render_action(action: str, data: dict[str, Any]) -> str:
    """One line for drain/disable/enable, plus what a ``--wait`` drain left behind."""
    line = f"{data['id']}: {action} -> {data['state']} (in flight {data['in_flight']})"
    drain = data.get("drain")
    if drain is None:
        return line + "\n"
    if drain["drained"]:
        return line + f"\ndrained after {drain['waited_s']:g}s\n"
    busy = drain.get("busy_connections", [])
    return (line + f"\nNOT drained after {drain['waited_s']:g}s: {drain['in_flight']} requests still in "
            f"flight on {len(busy)} connections (they would be cut if the backend stopped now)\n")
