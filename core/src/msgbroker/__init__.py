"""msgbroker: one asyncio API for partitioned, in-order, at-least-once messaging over
Redis Streams, NATS JetStream, RabbitMQ, Apache Kafka and an in-memory broker."""

from __future__ import annotations

from ._broker import Broker, Consumer, Producer, Subscription, connect
from ._errors import (
    AccessDeniedError,
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
    RequestFailedError,
    RequestTimeoutError,
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
from ._service import Publisher, Service, Subscriber
from ._settings import BrokerSettings, MemorySettings, ProviderSettings
from ._tls import tls_client_context, tls_verification_error

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
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
    "Lane",
    "LaneConsumer",
    "MemorySettings",
    "Message",
    "MessageContext",
    "MessageTooLargeError",
    "MsgBrokerError",
    "OutgoingRecord",
    "PermanentError",
    "Producer",
    "ProviderNotFoundError",
    "ProviderSettings",
    "PublishEvent",
    "PublishFailedError",
    "PublishIndeterminateError",
    "Publisher",
    "RequestFailedError",
    "RequestTimeoutError",
    "SerializationError",
    "Service",
    "Subscriber",
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


_MOVED = {"RedisSettings": "redis", "NatsSettings": "nats", "RabbitMQSettings": "rabbitmq", "KafkaSettings": "kafka"}


def __getattr__(name: str) -> object:
    """Each provider declares its settings section itself (``msgbroker_redis.RedisSettings``);
    the old names here find it in the installed provider."""
    provider = _MOVED.get(name)
    if provider is None:
        raise AttributeError(f"module 'msgbroker' has no attribute {name!r}")
    model = registry.section_model(provider)
    if model is None:
        raise ProviderNotFoundError(f"{name} belongs to the {provider!r} provider, which is not installed: "
                                    f"pip install 'msgbroker[{provider}]'")
    return model
