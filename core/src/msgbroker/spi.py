"""The provider interface: everything a provider (and the conformance suite) needs from core.

A provider imports from here and from the public ``msgbroker`` namespace only; nothing named
``msgbroker._*`` is part of the interface, and the repository's tests fail when a distribution
other than core imports it. The contract each method keeps is written in
docs/writing-a-provider.md and the semantics in docs/semantics.md; the wire format (the names and
functions of :mod:`msgbroker.wire`, also exported here) in docs/wire-format.md.
"""

from __future__ import annotations

from ._engine import assign_partitions
from ._errors import (
    AccessDeniedError,
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
from .wire import (
    CONTENT_TYPE,
    DEAD_LETTER_AT,
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_ERROR,
    DEAD_LETTER_GROUP,
    DEAD_LETTER_HEADERS,
    DEAD_LETTER_PARTITION,
    DEAD_LETTER_PREFIX,
    DEAD_LETTER_TOPIC_SUFFIX,
    DEAD_LETTERS_REMOVED_HEADER,
    KEY_HEADER,
    MESSAGE_ID_HEADER,
    NATS_ENVELOPE_HEADER,
    REPLAY_GROUP_HEADER,
    RESERVED_PREFIX,
    dead_letter_from_record,
    dead_letter_group,
    dead_letter_headers,
    dead_letter_record,
    dead_letter_topic,
    format_time,
    is_reserved,
    parse_time,
    user_headers,
)

__all__ = [
    "CONTENT_TYPE",
    "DEAD_LETTERS_REMOVED_HEADER",
    "DEAD_LETTER_AT",
    "DEAD_LETTER_ATTEMPTS",
    "DEAD_LETTER_ERROR",
    "DEAD_LETTER_GROUP",
    "DEAD_LETTER_HEADERS",
    "DEAD_LETTER_PARTITION",
    "DEAD_LETTER_PREFIX",
    "DEAD_LETTER_TOPIC_SUFFIX",
    "KEY_HEADER",
    "MESSAGE_ID_HEADER",
    "NATS_ENVELOPE_HEADER",
    "REPLAY_GROUP_HEADER",
    "RESERVED_PREFIX",
    "AccessDeniedError",
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
    "dead_letter_from_record",
    "dead_letter_group",
    "dead_letter_headers",
    "dead_letter_record",
    "dead_letter_topic",
    "failures_since",
    "format_time",
    "hookimpl",
    "is_reserved",
    "parse_time",
    "redact",
    "tls_client_context",
    "tls_verification_error",
    "user_headers",
]
