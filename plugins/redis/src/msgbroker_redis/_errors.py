"""Mapping redis-py's exceptions into msgbroker's one exception tree, at the edge."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from msgbroker.spi import (
    AccessDeniedError,
    BrokerConnectionError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    MsgBrokerError,
    PermanentError,
)
from redis import exceptions as rex

__all__ = ["REDIS_ERRORS", "redacted", "translate", "user_of"]

# Error replies that say "not now" rather than "never": retrying may help.
# MOVED and ASK reach the provider only from its own per-node connections (the cluster client
# follows them itself): the slot moved, the command did not run there.
_UNAVAILABLE = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "OOM",
                "MOVED", "ASK")
REDIS_ERRORS = (rex.RedisError, rex.RedisClusterException, OSError, TimeoutError)
"""What a redis-py call raises when the server or the network fails (the cluster client's own
errors are not RedisErrors)."""


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def user_of(url: str) -> str:
    """The ACL user a URL logs in as (``default`` when it names none)."""
    return urlsplit(url).username or "default"


def translate(exc: BaseException, doing: str, user: str | None = None) -> MsgBrokerError:
    """The msgbroker error for a redis-py (or socket) error raised while ``doing`` something
    (as ``user``, named when the server denies a permission)."""
    if isinstance(exc, MsgBrokerError):
        return exc
    text = f"redis: {doing} failed: {exc}"
    if isinstance(exc, rex.NoPermissionError):
        # An ACL says no (redis-py drops the NOPERM code): retrying cannot help, the operator must act.
        who = f"user {user!r}" if user else "the connection's user"
        return AccessDeniedError(
            f"redis: {doing} failed: {who} has no permission for it (NOPERM: {exc}); "
            "grant the ACL rule docs/security.md lists"
        )
    if isinstance(exc, (rex.AuthenticationError, rex.AuthorizationError)):
        return AccessDeniedError(f"redis: {doing} failed: the server refused the credentials: {exc}")
    if isinstance(exc, rex.BusyLoadingError):
        return BrokerUnavailableError(text)
    if isinstance(exc, (rex.TimeoutError, TimeoutError)):
        return BrokerTimeoutError(text)
    if isinstance(exc, (rex.ConnectionError, ConnectionError, OSError)):
        return BrokerConnectionError(text)
    if isinstance(exc, (rex.ClusterError, rex.AskError, rex.TryAgainError, rex.ReadOnlyError, rex.OutOfMemoryError)):
        return BrokerUnavailableError(text)  # redis-py drops the code (CLUSTERDOWN, MOVED...) from the text
    if isinstance(exc, rex.ResponseError):
        code = str(exc).split(" ", 1)[0].upper()
        if code in _UNAVAILABLE:
            return BrokerUnavailableError(text)
        return PermanentError(text)
    return BrokerUnavailableError(text)
