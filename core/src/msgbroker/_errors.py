"""The one exception tree of msgbroker.

Every provider maps its client library's native errors into this tree at the edge
(``raise ... from exc``), so callers and the resilience module classify errors once.
"""

from __future__ import annotations

import asyncio
import re

__all__ = [
    "AccessDeniedError",
    "AlreadySettledError",
    "BrokerClosedError",
    "BrokerConnectionError",
    "BrokerTimeoutError",
    "BrokerUnavailableError",
    "CapabilityNotSupported",
    "ConfigurationError",
    "InvalidNameError",
    "MessageTooLargeError",
    "MsgBrokerError",
    "PermanentError",
    "ProviderNotFoundError",
    "PublishFailedError",
    "PublishIndeterminateError",
    "RequestFailedError",
    "RequestTimeoutError",
    "SerializationError",
    "TransientError",
    "is_transient",
    "redact",
]


class MsgBrokerError(Exception):
    """Base class of every error msgbroker raises."""


class ConfigurationError(MsgBrokerError, ValueError):
    """A setting or connection URL is wrong; the message names the key and the value."""


class AccessDeniedError(ConfigurationError):
    """The broker refused this member's credentials or a permission it needs (a wrong or revoked
    password, an ACL that says no): retrying cannot help, an operator must act. A subscription
    whose reads end in it stops (``Subscription.failure``)."""


class ProviderNotFoundError(ConfigurationError):
    """No provider serves the asked-for scheme or name; the message says what to install."""


class InvalidNameError(MsgBrokerError, ValueError):
    """A topic, group or header name is not allowed; the message names the value."""


class MessageTooLargeError(MsgBrokerError, ValueError):
    """An encoded message is larger than the provider accepts."""


class SerializationError(MsgBrokerError, ValueError):
    """A payload could not be encoded, or bytes on the wire could not be decoded."""


class AlreadySettledError(MsgBrokerError, RuntimeError):
    """A message context was acked, naked, delayed or dead-lettered twice."""


class CapabilityNotSupported(MsgBrokerError, NotImplementedError):
    """The provider declares that it lacks the capability this call needs."""


class BrokerClosedError(MsgBrokerError, RuntimeError):
    """The broker, producer or subscription was used after close()."""


class PermanentError(MsgBrokerError):
    """A failure that retrying cannot fix: the message goes to the dead letters."""


class TransientError(MsgBrokerError):
    """A failure that may go away when retried (the resilience module retries these)."""


class BrokerConnectionError(TransientError, ConnectionError):
    """The connection to the broker server failed or was lost."""


class BrokerTimeoutError(TransientError, TimeoutError):
    """The broker server did not answer in time."""


class BrokerUnavailableError(TransientError):
    """The broker server answered that it cannot serve the request now."""


class PublishFailedError(MsgBrokerError):
    """The publish definitely did not happen: the message will never be delivered."""


class PublishIndeterminateError(TransientError):
    """The publish may or may not have happened (timeout or connection lost mid-way)."""


class RequestTimeoutError(MsgBrokerError, TimeoutError):
    """``Broker.request`` had no reply within its timeout; the message names the topic, the
    request's message id and the timeout. The request itself may still be handled later."""


class RequestFailedError(MsgBrokerError):
    """The request was not answered: its handler failed it for good (it is in the dead letters),
    or answered with no reply where one was expected; the message says why."""


_TRANSIENT_NAME_PARTS = ("Transient", "Connection", "Network", "Unavailable")


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: the classification of docs/resilience.md, in one place.

    Transient: ``TimeoutError``, ``ConnectionError``, :class:`TransientError`, and any exception
    whose type name (or a base's) contains ``Transient``, ``Connection``, ``Network`` or
    ``Unavailable``. Never transient: cancellation, :class:`PermanentError`, and the resilience
    module's open-circuit error.
    """
    if isinstance(exc, (asyncio.CancelledError, PermanentError)):
        return False
    if type(exc).__name__ == "BrokenCircuitError":
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, TransientError)):
        return True
    return any(part in cls.__name__ for cls in type(exc).__mro__ for part in _TRANSIENT_NAME_PARTS)


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]+)@")
_SECRET_PAIRS = re.compile(r"(?i)(?P<name>password|passwd|secret|token)(?P<sep>\s*[=:]\s*)(?P<value>[^,;\s&]+)")


def redact(text: str) -> str:
    """``text`` with the passwords of URLs (``scheme://user:***@host``) and of ``password=...``
    pairs replaced by ``***``: for every error message and log line that may carry a setting."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_PAIRS.sub(lambda m: f"{m['name']}{m['sep']}***", text)
