"""The data port's listeners as configured (``listen:``, one or several): opened at start-up,
changed in place on reload, closed on shutdown.

Each listener has an :class:`~balancer.dataplane.frontdoor.Entrance` (its name, whether it is TLS,
whether it redirects to HTTPS, its counts) that its connections carry, and, for TLS, a
:class:`~balancer.dataplane.tls.ServerTLS`. A reload:

* keeps the socket of a listener whose ``host:port`` stays, and gives it the new settings: new
  certificates (always re-read from their files: a renewed certificate under the same path is
  the common case), new redirect; connections already open keep what they have;
* opens the sockets of new addresses before closing those of addresses that went, so there is
  never a moment with nothing listening.

A certificate that cannot be loaded refuses the whole reload before anything changed (the
configuration was checked when it was read; this catches a file changed since).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ..config.models import ClientTimeoutsConfig, ListenConfig
from ..dataplane.frontdoor import Entrance, FrontDoor
from ..dataplane.listener import Listener
from ..dataplane.tls import ServerTLS
from ..errors import ConfigError

log = logging.getLogger(__name__)


class Listeners:
    """The listeners of one proxy process. ``reuse_port``: several processes bind the same ports."""

    def __init__(self, front_door: FrontDoor, reuse_port: bool) -> None:
        self._front_door = front_door
        self._reuse_port = reuse_port
        self._open: dict[tuple[str, int], tuple[ListenConfig, Listener, Entrance]] = {}
        self._order: list[tuple[str, int]] = []

    async def open(self, configs: tuple[ListenConfig, ...], timeouts: ClientTimeoutsConfig,
                   ports: tuple[int, ...] | None = None) -> None:
        """Start-up: bind every listener (``ports`` overrides the configured ports, in order: a
        proxy replica binds what the main process bound)."""
        tls = load_tls(configs)
        for index, config in enumerate(configs):
            port = config.port if ports is None else ports[index]
            await self._bind(config, port, tls[index], timeouts)

    async def apply(self, configs: tuple[ListenConfig, ...], timeouts: ClientTimeoutsConfig,
                    tls: list[ServerTLS | None]) -> list[str]:
        """Reload: what the new ``listen`` says (``tls`` from :func:`load_tls`, loaded before the
        reload changed anything), with the changes made as a list of lines."""
        changes: list[str] = []
        wanted: list[tuple[str, int]] = []
        for index, config in enumerate(configs):
            key = self._find(config, wanted)
            kept = self._open.get(key) if key is not None else None
            if key is None or kept is None:
                key = await self._bind(config, config.port, tls[index], timeouts)
                changes.append(f"listening on {config.label}")
            else:
                old, listener, entrance = kept
                entrance.configure(config.tls is not None, config.redirect_https)
                listener.set_tls(tls[index], timeouts.client_header_s)
                self._open[key] = (config, listener, entrance)
                if (replace(config, tls=None) != replace(old, tls=None)
                        or (config.tls is None) != (old.tls is None)):
                    changes.append(f"listener {config.label} changed")
                elif config.tls is not None:
                    changes.append(f"listener {config.label}: certificates re-read")
            wanted.append(key)
        for key in [k for k in self._order if k not in wanted]:
            config, listener, _ = self._open.pop(key)
            listener.close()
            changes.append(f"stopped listening on {config.label}")
        self._order = wanted
        return changes

    def _find(self, config: ListenConfig, taken: list[tuple[str, int]]) -> tuple[str, int] | None:
        """The open listener ``config`` keeps: the same address; for port 0 (any free port), the
        open one on the same host with the same name that was also asked for port 0."""
        if config.port:
            return (config.host, config.port)
        for key in self._order:
            old = self._open[key][0]
            if key not in taken and old.port == 0 and (old.host, old.label) == (config.host, config.label):
                return key
        return None

    async def _bind(self, config: ListenConfig, port: int, tls: ServerTLS | None,
                    timeouts: ClientTimeoutsConfig) -> tuple[str, int]:
        entrance = Entrance(config.label, config.tls is not None, config.redirect_https)
        listener = await Listener.open(lambda: self._front_door.connect(entrance), config.host, port,
                                       reuse_port=self._reuse_port, tls=tls,
                                       handshake_timeout=timeouts.client_header_s,
                                       on_handshake_failure=entrance.count_handshake_failure)
        key = (config.host, config.port or listener.port)
        self._open[key] = (config, listener, entrance)
        self._order.append(key)
        log.info("listening on %s://%s:%d%s", "https" if tls else "http", config.host, listener.port,
                 f" (redirecting to HTTPS port {config.redirect_https})" if config.redirect_https else "")
        return key

    @property
    def ports(self) -> tuple[int, ...]:
        """The ports bound, in the configuration's order."""
        return tuple(self._open[key][1].port for key in self._order)

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {entrance.name: {"address": f"{config.host}:{listener.port}", **entrance.snapshot()}
                for config, listener, entrance in (self._open[key] for key in self._order)}

    def close(self) -> None:
        """Stop accepting; open connections stay (the front door drains them)."""
        for _, listener, _ in self._open.values():
            listener.close()


def load_tls(configs: tuple[ListenConfig, ...]) -> list[ServerTLS | None]:
    """Every TLS listener's certificates, loaded from their files now; ConfigError if one fails."""
    loaded: list[ServerTLS | None] = []
    for index, config in enumerate(configs):
        try:
            loaded.append(ServerTLS(config.tls) if config.tls is not None else None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load its certificates: {exc}", path=f"listen[{index}].tls") from None
    return loaded
