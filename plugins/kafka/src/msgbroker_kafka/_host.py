"""What a lane consumer needs from its transport, and what the transport asks of a consumer.

The consumer (``_consumer``) is made by the transport (``_transport``) and calls back into it;
both sides are described here as protocols, so the consumer module never imports the
transport module (no import circle inside the distribution).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]
    from msgbroker.spi import AccessDeniedError, BrokerSettings, DeadLetter, MsgBrokerError

__all__ = ["ConsumerHost", "Flushable"]


class Flushable(Protocol):
    """A running consumer as the transport sees it (``pending_count`` flushes its acks)."""

    topic: str
    group: str

    async def flush(self) -> None: ...


class ConsumerHost(Protocol):
    """The transport as its consumers see it."""

    settings: BrokerSettings
    consumers: set[Flushable]
    """The running consumers of this transport (a consumer adds itself at start)."""

    user: str | None
    """The SASL user (None without SASL)."""

    def client_options(self) -> dict[str, Any]: ...

    async def login_refused(self) -> AccessDeniedError | None:
        """Whether the brokers refuse this connection's login now (checked with one connection)."""
        ...

    def kafka_name(self, name: str) -> str:
        """The Kafka name of a msgbroker topic or group (``kafka.name_prefix``)."""
        ...

    def error(self, exc: BaseException, doing: str, *, publishing: bool = False) -> MsgBrokerError:
        """The msgbroker error for an aiokafka error, naming the connection's user in a refusal."""
        ...

    async def ensure_topic(self, topic: str, partitions: int | None = None) -> int: ...

    async def committed_offsets(
        self, group: str, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, Any]: ...

    async def offsets_client(self) -> Any:
        """A group-less ``AIOKafkaConsumer`` for log start and end offsets."""
        ...

    @property
    def producer(self) -> Any:
        """The idempotent ``acks=all`` producer of the connection."""
        ...

    async def write_dead_letter(self, letter: DeadLetter, key: str, message_id: str) -> None: ...
