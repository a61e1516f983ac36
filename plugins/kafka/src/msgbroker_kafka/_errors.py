"""aiokafka's errors mapped into msgbroker's exception tree, at the edge, in one place."""

from __future__ import annotations

import asyncio

from aiokafka import errors as kafka_errors  # type: ignore[import-untyped]
from msgbroker.spi import (
    BrokerConnectionError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    ConfigurationError,
    MessageTooLargeError,
    MsgBrokerError,
    PermanentError,
    PublishFailedError,
    PublishIndeterminateError,
)

__all__ = ["map_error"]

_TOO_LARGE = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError)
_AUTH = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.UnsupportedSaslMechanismError,
)


def map_error(exc: BaseException, doing: str, *, publishing: bool = False) -> MsgBrokerError:
    """The msgbroker error for ``exc`` raised by aiokafka while ``doing`` something.

    When publishing, a timeout or a lost connection leaves the outcome unknown
    (:class:`PublishIndeterminateError`); a refusal is definite (:class:`PublishFailedError`).
    """
    text = f"kafka: {doing} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, MsgBrokerError):
        return exc
    if isinstance(exc, _TOO_LARGE):
        return MessageTooLargeError(text)
    if isinstance(exc, _AUTH):
        return ConfigurationError(text)
    if isinstance(exc, (kafka_errors.KafkaTimeoutError, kafka_errors.RequestTimedOutError, asyncio.TimeoutError)):
        return PublishIndeterminateError(text) if publishing else BrokerTimeoutError(text)
    if isinstance(exc, (kafka_errors.KafkaConnectionError, kafka_errors.NodeNotReadyError, ConnectionError, OSError)):
        return PublishIndeterminateError(text) if publishing else BrokerConnectionError(text)
    if isinstance(exc, kafka_errors.KafkaError):
        if getattr(exc, "retriable", False):
            return PublishIndeterminateError(text) if publishing else BrokerUnavailableError(text)
        return PublishFailedError(text) if publishing else PermanentError(text)
    return PublishFailedError(text) if publishing else MsgBrokerError(text)
