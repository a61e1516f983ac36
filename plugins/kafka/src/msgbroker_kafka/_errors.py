"""aiokafka's errors mapped into msgbroker's exception tree, at the edge, in one place."""

from __future__ import annotations

import asyncio

from aiokafka import errors as kafka_errors  # type: ignore[import-untyped]
from msgbroker.spi import (
    AccessDeniedError,
    BrokerConnectionError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    MessageTooLargeError,
    MsgBrokerError,
    PermanentError,
    PublishFailedError,
    PublishIndeterminateError,
)

__all__ = ["GRANT", "access_denied", "map_error", "refused_credentials"]

_TOO_LARGE = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError)
_REFUSED = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.TransactionalIdAuthorizationFailed,
)
"""The broker's ACLs said no (the connection's user is known)."""
_CREDENTIALS = (
    kafka_errors.AuthenticationFailedError,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.IllegalSaslStateError,
)
"""The broker refused the login."""
GRANT = "grant the ACLs docs/security.md lists"


def _who(user: str | None) -> str:
    return f"user {user!r}" if user else "the connection's user (ANONYMOUS without SASL)"


def _said(exc: BaseException) -> str:
    """``Type: text`` of an aiokafka error, the type named once (its text may start with it)."""
    text = str(exc).strip()
    kind = type(exc).__name__
    return text if kind in text.split(":")[0] else f"{kind}: {text}".rstrip(": ")


def access_denied(
    exc: BaseException, doing: str, user: str | None, mechanism: str | None = None
) -> AccessDeniedError | None:
    """The AccessDeniedError for a refused login or ACL, else None."""
    if isinstance(exc, _REFUSED):
        return AccessDeniedError(
            f"kafka: {doing} failed: {_who(user)} has no permission for it ({_said(exc)}); {GRANT}"
        )
    if isinstance(exc, _CREDENTIALS):
        return refused_credentials(exc, doing, user, mechanism)
    return None


def refused_credentials(
    exc: BaseException, doing: str, user: str | None, mechanism: str | None = None
) -> AccessDeniedError:
    """A refused login: the broker does not say whether the user or the password is wrong."""
    how = f"SASL {mechanism}: " if mechanism else ""
    return AccessDeniedError(
        f"kafka: {doing} failed: the server refused the credentials of {_who(user)} "
        f"({how}a wrong password, an unknown user or a mechanism the listener does not offer): {_said(exc)}"
    )


def map_error(exc: BaseException, doing: str, *, publishing: bool = False, user: str | None = None) -> MsgBrokerError:
    """The msgbroker error for ``exc`` raised by aiokafka while ``doing`` something (``user``: the
    SASL user, named when the broker refuses it).

    When publishing, a timeout or a lost connection leaves the outcome unknown
    (:class:`PublishIndeterminateError`); a refusal is definite (:class:`PublishFailedError`).
    """
    text = f"kafka: {doing} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, MsgBrokerError):
        return exc
    if isinstance(exc, _TOO_LARGE):
        return MessageTooLargeError(text)
    denied = access_denied(exc, doing, user)
    if denied is not None:
        return denied
    if isinstance(exc, (kafka_errors.KafkaTimeoutError, kafka_errors.RequestTimedOutError, asyncio.TimeoutError)):
        return PublishIndeterminateError(text) if publishing else BrokerTimeoutError(text)
    if isinstance(exc, (kafka_errors.KafkaConnectionError, kafka_errors.NodeNotReadyError, ConnectionError, OSError)):
        return PublishIndeterminateError(text) if publishing else BrokerConnectionError(text)
    if isinstance(exc, kafka_errors.KafkaError):
        if getattr(exc, "retriable", False):
            return PublishIndeterminateError(text) if publishing else BrokerUnavailableError(text)
        return PublishFailedError(text) if publishing else PermanentError(text)
    return PublishFailedError(text) if publishing else MsgBrokerError(text)
