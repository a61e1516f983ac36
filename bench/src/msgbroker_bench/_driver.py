"""The one interface every variant (ours, raw client, FastStream, native tool) implements."""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

from ._model import Sink

__all__ = ["Consumers", "Driver", "Unsupported", "stop_tasks"]


class Unsupported(Exception):
    """This variant cannot do this work (the reason goes into the table)."""


class Consumers:
    """Running consumers of one variant; :meth:`close` stops them."""

    def __init__(self, close: Callable[[], Awaitable[None]]) -> None:
        self._close = close

    async def close(self) -> None:
        await self._close()


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel worker tasks and wait for them (their errors are not ours to raise at shutdown)."""
    for task in tasks:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.gather(*tasks, return_exceptions=True)


class Driver(ABC):
    """One system on one broker: ``kind`` is ``ours``, ``raw``, ``faststream`` or ``native``."""

    kind: str = "raw"
    label: str = ""
    """What it is, with the library or tool name (shown in the table)."""
    config: str = ""
    """Its batching/ack configuration, in words (shown in the doc)."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect (outside every timed section)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect."""

    async def prepare(self, topic: str, partitions: int) -> None:  # noqa: B027 - optional hook
        """Create what ``topic`` needs (stream, queue, Kafka topic) before anything is timed."""

    async def drop(self, topic: str) -> None:  # noqa: B027 - optional hook
        """Delete what :meth:`prepare` and the run created, where the system allows."""

    @abstractmethod
    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        """Publish ``seqs`` one await (one confirmation) per message."""

    @abstractmethod
    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        """Publish ``seqs`` as one batch, confirmed as a whole, stamped ``stamp`` (perf_counter_ns)."""

    async def publish_many(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        """Publish ``seqs`` as fast as this system sensibly can (the end-to-end cells' publisher):
        :meth:`publish_batch` unless the system has no batch API."""
        await self.publish_batch(topic, seqs, run, data, stamp)

    async def start_consumers(
        self, topic: str, group: str, workers: int, partitions: int, sink: Sink, ordered: bool
    ) -> Consumers:
        """Start ``workers`` members of ``group`` that report to ``sink`` and ack each message."""
        raise Unsupported("no consumer")
