"""Mapping aio-pika's and aiormq's exceptions into msgbroker's one exception tree, at the edge."""

from __future__ import annotations

import asyncio
import re

from aiormq import exceptions as amqp
from msgbroker.spi import (
    AccessDeniedError,
    BrokerConnectionError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    ConfigurationError,
    MsgBrokerError,
    PermanentError,
)
from yarl import URL

__all__ = ["cancelled", "redacted", "translate", "user_of", "vhost_of"]

_REFUSED_USER = re.compile(r"refused for user '([^']*)'")
"""How RabbitMQ names the user in a refusal (``... in vhost 'v' refused for user 'u'``)."""


def cancelled() -> bool:
    """Whether the running task is being cancelled. aiormq also raises CancelledError out of a
    call on a connection it found dead (it cancels its reader), which is a lost connection,
    not a cancellation of the caller."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        parsed = URL(url)
    except ValueError:
        return "<unparsable url>"
    return str(parsed.with_password("***")) if parsed.password else url


def user_of(url: str) -> str:
    """The user a URL logs in as (``guest``, aiormq's default, when it names none)."""
    try:
        return URL(url).user or "guest"
    except ValueError:
        return "guest"


def vhost_of(url: str) -> str:
    """The virtual host a URL opens (its path; ``/`` when it names none)."""
    try:
        return URL(url).path[1:] or "/"
    except ValueError:
        return "/"


def _reply(exc: BaseException) -> str:
    """The server's reply text of an AMQP error (``ACCESS_REFUSED - ...``)."""
    texts = [str(a) for a in exc.args if isinstance(a, str) and a]
    return texts[-1] if texts else repr(exc)


def _access_denied(exc: BaseException, doing: str, user: str | None, vhost: str | None) -> AccessDeniedError | None:
    """The AccessDeniedError for a refused login, virtual host or permission, else None."""
    reply = _reply(exc)
    found = _REFUSED_USER.search(reply)
    name = found[1] if found else user
    who = f"user {name!r}" if name else "the connection's user"
    if isinstance(exc, amqp.InvalidFrameError) and "Connection.OpenOk" in reply and "Connection.Close" in reply:
        # The server answered connection.open with connection.close (530 NOT_ALLOWED); aiormq
        # raises before reading the reason out of the frame.
        where = f"virtual host {vhost!r}" if vhost else "the virtual host"
        return AccessDeniedError(
            f"rabbitmq: {doing} failed: the server closed the connection instead of opening {where} for "
            f"{who}: the user has no permissions on it, or it does not exist (aiormq does not pass the "
            "server's reason on; the server's log names it); grant the permissions docs/security.md lists"
        )
    if isinstance(exc, amqp.ProbableAuthenticationError):
        # 403 at the login (RabbitMQ does not say whether the user or the password is wrong).
        return AccessDeniedError(
            f"rabbitmq: {doing} failed: the server refused the credentials of {who} "
            f"(a wrong password or an unknown user): {reply}"
        )
    if isinstance(exc, amqp.ConnectionClosed) and "NOT_ALLOWED" in reply and "access to vhost" in reply:
        return AccessDeniedError(
            f"rabbitmq: {doing} failed: {who} has no permissions on the virtual host ({reply}); "
            "grant the permissions docs/security.md lists"
        )
    if isinstance(exc, amqp.ChannelAccessRefused):
        return AccessDeniedError(
            f"rabbitmq: {doing} failed: {who} has no permission for it ({reply}); "
            "grant the permissions docs/security.md lists"
        )
    return None


def translate(exc: BaseException, doing: str, user: str | None = None, vhost: str | None = None) -> MsgBrokerError:
    """The msgbroker error for an AMQP (or socket) error raised while ``doing`` something (as
    ``user`` on ``vhost``, when known: a channel's refusal names its user itself)."""
    if isinstance(exc, MsgBrokerError):
        return exc
    denied = _access_denied(exc, doing, user, vhost)
    if denied is not None:
        return denied
    text = f"rabbitmq: {doing} failed: {exc!r}"
    if isinstance(exc, amqp.AuthenticationError):
        return ConfigurationError(f"rabbitmq: {doing} failed: no authentication mechanism in common: {exc}")
    if isinstance(exc, amqp.ChannelPreconditionFailed):
        hint = ""
        if "'x-quorum-initial-group-size'" in str(exc):
            hint = " (rabbitmq.quorum_initial_group_size applies only to queues declared after it was set)"
        return ConfigurationError(f"rabbitmq: {doing} failed: the server has it with other settings: {exc}{hint}")
    if isinstance(exc, amqp.ConnectionClosed) and "NOT_ALLOWED" in _reply(exc):
        # e.g. "vhost 'x' not found": a setting to fix, not a passing failure
        return ConfigurationError(f"rabbitmq: {doing} failed: the server does not allow it: {_reply(exc)}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return BrokerTimeoutError(text)
    if isinstance(exc, (amqp.AMQPConnectionError, amqp.ChannelInvalidStateError, ConnectionError, OSError)):
        return BrokerConnectionError(text)
    if isinstance(exc, amqp.ChannelNotFoundEntity):
        return PermanentError(text)
    if isinstance(exc, (amqp.ChannelLockedResource, amqp.ChannelClosed)):
        return BrokerUnavailableError(text)
    if isinstance(exc, RuntimeError) and "closed" in str(exc).lower():
        return BrokerConnectionError(text)  # aio-pika's "connection was not opened / is closed"
    return BrokerUnavailableError(text)
