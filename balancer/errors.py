"""Every exception balancer raises, in one flat module (httpcore's ``_exceptions`` layout).

Library errors are translated where they happen (``raise UpstreamConnectError(...) from exc``) so that
the proxy maps a small, closed set of types to statuses in one table
(``balancer.dataplane.proxy.FAILURES``).
"""

from __future__ import annotations


class BalancerError(Exception):
    """Base class of everything below."""


# --- configuration -----------------------------------------------------------------------------------


class ConfigError(BalancerError):
    """A configuration file that cannot be used.

    ``str(err)`` is the message for the operator: ``FILE:LINE: dotted.path: what is wrong``.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 path: str | None = None) -> None:
        self.file = file
        self.line = line
        self.path = path
        self.reason = message
        prefix = ""
        if file is not None:
            prefix = f"{file}:{line}: " if line is not None else f"{file}: "
        where = f"{path}: " if path else ""
        super().__init__(f"{prefix}{where}{message}")


# --- the client side --------------------------------------------------------------------------------


class BodyTooLarge(BalancerError):
    """The client's request body passed ``limits.max_body`` (413)."""


class ClientError(BalancerError):
    """The client side of a request failed; no backend is to blame."""


class ClientGone(ClientError):
    """The client closed or reset its connection."""


class ClientBodyInvalid(ClientError):
    """The request body broke its framing (a bad chunk, say: 400) or a limit (431); the connection
    closes."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ClientBodyTimeout(ClientError):
    """The request body paused longer than ``timeouts.client_body`` between reads (408)."""


class ClientSendTimeout(ClientError):
    """The client read none of our response for ``timeouts.client_send``: it is cut."""


# --- the upstream side (pool and connections) -------------------------------------------------------


class UpstreamError(BalancerError):
    """Anything that went wrong talking to a backend."""


class NoBackendAvailable(UpstreamError):
    """The route's pool has no backend that may take traffic (503)."""


class PoolTimeout(UpstreamError):
    """Waited ``connections.acquire_timeout`` for a free connection slot (503 + Retry-After)."""


class PoolQueueFull(PoolTimeout):
    """``connections.max_waiting`` requests already queue for the backend: refused at once (503)."""


class UpstreamConnectError(UpstreamError):
    """TCP connect refused, reset or unreachable (502)."""


class UpstreamConnectTimeout(UpstreamError):
    """TCP connect did not finish within ``timeouts.connect`` (504)."""


class UpstreamResponseTimeout(UpstreamError):
    """No response head within ``timeouts.response`` (504)."""


class UpstreamReadTimeout(UpstreamError):
    """An idle gap mid-body longer than ``timeouts.read``; the status has already gone to the client."""


class UpstreamSendTimeout(UpstreamError):
    """The backend took none of the request for ``timeouts.send`` (504; the connection is closed)."""


class UpstreamProtocolError(UpstreamError):
    """The backend sent something that is not valid HTTP/1.1, or bad framing (502)."""


class UpstreamClosed(UpstreamError):
    """The backend closed or reset the connection.

    ``before_response`` is true when not one byte of the response had arrived. ``sent`` is false when
    the connection was found closed before any byte of the request was written: the request never
    left balancer, and may go to another backend whatever its method.
    """

    def __init__(self, message: str, *, before_response: bool, sent: bool = True) -> None:
        super().__init__(message)
        self.before_response = before_response
        self.sent = sent


# --- processes ---------------------------------------------------------------------------------------


class WorkerStartError(BalancerError):
    """A spawned worker exited or never accepted connections during start-up."""
