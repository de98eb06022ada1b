"""The version balancer runs as: the installed distribution's (pyproject.toml's)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version() -> str:
    """The installed distribution's version, or "unknown" for a source tree that was never installed."""
    try:
        return version("balancer")
    except PackageNotFoundError:
        return "unknown"
