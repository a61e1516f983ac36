"""The provider interface: everything a provider (and the conformance suite) needs from core.

A provider imports from here and from the public ``msgbroker`` namespace only; nothing named
``msgbroker._*`` is part of the interface, and the repository's tests fail when a distribution
other than core imports it. The contract each method keeps is written in
docs/writing-a-provider.md and the semantics in docs/semantics.md.
"""

from __future__ import annotations

from ._engine import assign_partitions
from ._errors import (
    BrokerClosedError,
    BrokerConnectionError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    CapabilityNotSupported,
    ConfigurationError,
    InvalidNameError,
    MessageTooLargeError,
    MsgBrokerError,
    PermanentError,
    PublishFailedError,
    PublishIndeterminateError,
    SerializationError,
    TransientError,
    redact,
)
from ._hookspecs import hookimpl
from ._message import DeadLetter
from ._provider import (
    AssignmentListener,
    Capabilities,
    Delivery,
    Lane,
    LaneConsumer,
    OutgoingRecord,
    Transport,
    failures_since,
)
from ._settings import BrokerSettings, Duration, ProviderSettings
from ._tls import tls_client_context, tls_verification_error

__all__ = [
    "AssignmentListener",
    "BrokerClosedError",
    "BrokerConnectionError",
    "BrokerSettings",
    "BrokerTimeoutError",
    "BrokerUnavailableError",
    "Capabilities",
    "CapabilityNotSupported",
    "ConfigurationError",
    "DeadLetter",
    "Delivery",
    "Duration",
    "InvalidNameError",
    "Lane",
    "LaneConsumer",
    "MessageTooLargeError",
    "MsgBrokerError",
    "OutgoingRecord",
    "PermanentError",
    "ProviderSettings",
    "PublishFailedError",
    "PublishIndeterminateError",
    "SerializationError",
    "TransientError",
    "Transport",
    "assign_partitions",
    "failures_since",
    "hookimpl",
    "redact",
    "tls_client_context",
    "tls_verification_error",
]
