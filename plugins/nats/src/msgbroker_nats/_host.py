"""What a lane consumer needs from its transport, as a protocol.

The consumer (``_consumer``) is made by the transport (``_transport``) and calls back into it;
describing that side here lets the consumer module never import the transport module (no
import circle inside the distribution).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from msgbroker.spi import LaneConsumer, OutgoingRecord
    from nats.aio.client import Client
    from nats.js import JetStreamManager
    from nats.js.kv import KeyValue

    from ._layout import TopicLayout

__all__ = ["ConsumerHost"]


class ConsumerHost(Protocol):
    """The transport as its consumers see it."""

    partition_count: int
    ack_wait: float
    """Seconds (``nats.ack_wait``)."""
    in_flight: int
    """Messages of a lane one member asks for at most (``nats.max_ack_pending``)."""

    @property
    def nc(self) -> Client: ...

    @property
    def jsm(self) -> JetStreamManager: ...

    def layout(self, topic: str) -> TopicLayout: ...

    async def ensure_stream(self, layout: TopicLayout, dedup_window: float | None) -> None: ...

    async def ensure_consumer(self, layout: TopicLayout, group: str, partition: int) -> int: ...

    async def ensure_consumers(self, layout: TopicLayout, group: str, partitions: Sequence[int]) -> dict[int, int]: ...

    async def check_consumers(
        self, layout: TopicLayout, group: str, partitions: Sequence[int]
    ) -> tuple[dict[int, int], list[int]]: ...

    async def ack_floor(self, layout: TopicLayout, group: str, partition: int) -> int: ...

    async def pins(self) -> KeyValue: ...

    async def failure_counts(self) -> KeyValue: ...

    async def holds_lease(self, topic: str, group: str, partition: int, token: str) -> bool: ...

    def lease_is_fresh(self, token: str) -> bool: ...

    def asks_consumers_freely(self) -> bool: ...

    async def publish_records(
        self, records: Sequence[OutgoingRecord], dedup_ids: Sequence[str] | None, dedup_window: float | None = None
    ) -> None: ...

    def forget(self, consumer: LaneConsumer) -> None:
        """``consumer`` stopped: it is no longer told about reconnects."""
        ...
