"""msgbroker: one asyncio API for partitioned, in-order, at-least-once messaging over
Redis Streams, NATS JetStream, RabbitMQ, Apache Kafka and an in-memory broker."""

from __future__ import annotations

from ._broker import Broker, Consumer, Producer, Subscription, connect
from ._errors import (
    AlreadySettledError,
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
    ProviderNotFoundError,
    PublishFailedError,
    PublishIndeterminateError,
    SerializationError,
    TransientError,
    is_transient,
    redact,
)
from ._hookspecs import HandleEvent, PublishEvent, hookimpl
from ._message import DeadLetter, Message, MessageContext
from ._partitioner import murmur2, partition_for
from ._provider import Capabilities, Delivery, Lane, LaneConsumer, OutgoingRecord, Transport
from ._registry import registry
from ._settings import (
    BrokerSettings,
    KafkaSettings,
    MemorySettings,
    NatsSettings,
    RabbitMQSettings,
    RedisSettings,
)
from ._tls import tls_client_context, tls_verification_error

__version__ = "0.1.0"

__all__ = [
    "AlreadySettledError",
    "Broker",
    "BrokerClosedError",
    "BrokerConnectionError",
    "BrokerSettings",
    "BrokerTimeoutError",
    "BrokerUnavailableError",
    "Capabilities",
    "CapabilityNotSupported",
    "ConfigurationError",
    "Consumer",
    "DeadLetter",
    "Delivery",
    "HandleEvent",
    "InvalidNameError",
    "KafkaSettings",
    "Lane",
    "LaneConsumer",
    "MemorySettings",
    "Message",
    "MessageContext",
    "MessageTooLargeError",
    "MsgBrokerError",
    "NatsSettings",
    "OutgoingRecord",
    "PermanentError",
    "Producer",
    "ProviderNotFoundError",
    "PublishEvent",
    "PublishFailedError",
    "PublishIndeterminateError",
    "RabbitMQSettings",
    "RedisSettings",
    "SerializationError",
    "Subscription",
    "TransientError",
    "Transport",
    "__version__",
    "connect",
    "hookimpl",
    "is_transient",
    "murmur2",
    "partition_for",
    "redact",
    "registry",
    "tls_client_context",
    "tls_verification_error",
]
