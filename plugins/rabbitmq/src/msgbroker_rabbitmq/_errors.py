"""Mapping aio-pika's and aiormq's exceptions into msgbroker's one exception tree, at the edge."""

from __future__ import annotations

import asyncio

from aiormq import exceptions as amqp
from msgbroker.spi import (
    BrokerConnectionError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    ConfigurationError,
    MsgBrokerError,
    PermanentError,
)
from yarl import URL

__all__ = ["cancelled", "redacted", "translate"]


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


def translate(exc: BaseException, doing: str) -> MsgBrokerError:
    """The msgbroker error for an AMQP (or socket) error raised while ``doing`` something."""
    if isinstance(exc, MsgBrokerError):
        return exc
    text = f"rabbitmq: {doing} failed: {exc!r}"
    if isinstance(exc, amqp.AuthenticationError):
        return ConfigurationError(f"rabbitmq: {doing} failed: the server refused the credentials: {exc}")
    if isinstance(exc, amqp.ChannelAccessRefused):
        return ConfigurationError(f"rabbitmq: {doing} failed: access refused (check the user's permissions): {exc}")
    if isinstance(exc, amqp.ChannelPreconditionFailed):
        hint = ""
        if "'x-quorum-initial-group-size'" in str(exc):
            hint = " (rabbitmq.quorum_initial_group_size applies only to queues declared after it was set)"
        return ConfigurationError(f"rabbitmq: {doing} failed: the server has it with other settings: {exc}{hint}")
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
