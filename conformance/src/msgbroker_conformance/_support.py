"""What every case uses: the test message, a recorder of deliveries, bounded waits and the
per-test scenario (namespace, unique names, brokers that are cleaned up)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgbroker
from msgbroker import Broker, Message, MessageContext, partition_for
from pydantic import Field

if TYPE_CHECKING:
    from ._harness import ConformanceHarness

__all__ = [
    "ConformanceFailure",
    "ConformanceMessage",
    "Recorder",
    "Scenario",
    "Seen",
    "eventually",
    "keys_in_partition",
]

DEFAULT_SETTINGS: dict[str, Any] = {
    "partition_count": 4,
    "retry_delay": 0,
    "max_retry_attempts": 3,
    "shutdown_timeout": 5,
}
"""What the suite connects with unless a case says otherwise (small, fast, bounded)."""


class ConformanceFailure(AssertionError):
    """A provider broke the contract (or a bounded wait ran out)."""


class ConformanceMessage(Message):
    """The message every case publishes: a key (its partition key), a sequence number per key
    and some text to carry payload bytes."""

    key: str
    seq: int = 0
    text: str = ""
    tags: list[str] = Field(default_factory=list)

    @property
    def partition_key(self) -> str:
        return self.key


Condition = Callable[[], object | Awaitable[object]]


async def eventually(
    condition: Condition, timeout: float, what: str | Callable[[], str], interval: float = 0.01
) -> None:
    """Wait until ``condition()`` (sync or async) is truthy; fail after ``timeout`` seconds
    with ``what`` (or what it returns, computed at the failure) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            raise ConformanceFailure(f"not within {timeout:.1f}s: {detail}")
        await asyncio.sleep(interval)


def keys_in_partition(partition: int, partition_count: int, n: int, prefix: str = "k") -> list[str]:
    """``n`` partition keys that the partitioner of docs/semantics.md puts in ``partition``."""
    keys: list[str] = []
    i = 0
    while len(keys) < n:
        key = f"{prefix}-{i}"
        if partition_for(key, partition_count) == partition:
            keys.append(key)
        i += 1
    return keys


@dataclass(slots=True, eq=False)
class Seen:
    """One handler invocation, as the handler saw it."""

    member: str
    message_id: str
    key: str
    seq: int
    partition: int
    attempt: int
    headers: dict[str, str]
    at: float
    """``time.time()`` when the handler was entered."""
    message: ConformanceMessage
    outcome: str | None = None
    """How the handler settled (``ack``/``retry``/``dead``); None while running or if it died."""


Decide = Callable[[MessageContext[ConformanceMessage], Seen], Awaitable[None]]


@dataclass(eq=False)
class Recorder:
    """Records every delivery of a (topic, group) across members and checks, as it goes, that
    no two handler invocations of one partition overlap (docs/semantics.md: order, groups)."""

    seen: list[Seen] = field(default_factory=list)
    overlaps: list[tuple[Seen, Seen]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _active: dict[int, Seen] = field(default_factory=dict)

    def handler(
        self, member: str = "a", decide: Decide | None = None
    ) -> Callable[[MessageContext[ConformanceMessage]], Awaitable[None]]:
        """A handler for ``member``: records, runs ``decide`` (which may settle, raise or
        block), and acks when ``decide`` left the message unsettled."""

        async def handle(ctx: MessageContext[ConformanceMessage]) -> None:
            message = ctx.message
            seen = Seen(member, ctx.message_id, message.key, message.seq, ctx.partition, ctx.delivery_attempt,
                        dict(ctx.headers), time.time(), message)
            other = self._active.get(ctx.partition)
            if other is not None:
                self.overlaps.append((other, seen))
            self._active[ctx.partition] = seen
            self.seen.append(seen)
            try:
                if decide is not None:
                    await decide(ctx, seen)
                if ctx.settled is None:
                    await ctx.ack()
                seen.outcome = ctx.settled
            except msgbroker.AlreadySettledError as exc:
                self.errors.append(exc)
                raise
            except Exception:
                seen.outcome = "raised"
                raise
            finally:
                if self._active.get(ctx.partition) is seen:
                    del self._active[ctx.partition]

        return handle

    # -- views ----------------------------------------------------------------------------------

    def acked(self) -> list[Seen]:
        return [s for s in self.seen if s.outcome == "ack"]

    def acked_ids(self) -> set[str]:
        return {s.message_id for s in self.acked()}

    def of(self, message_id: str) -> list[Seen]:
        return [s for s in self.seen if s.message_id == message_id]

    def by_member(self, member: str) -> list[Seen]:
        return [s for s in self.seen if s.member == member]

    def trace(self, key: str | None = None) -> list[tuple[int, int]]:
        """(seq, attempt) of every invocation (of ``key``), in invocation order."""
        return [(s.seq, s.attempt) for s in self.seen if key is None or s.key == key]

    def assert_no_overlap(self) -> None:
        if self.overlaps:
            first, second = self.overlaps[0]
            raise ConformanceFailure(
                f"two handler invocations of partition {first.partition} overlapped: message "
                f"{first.key}#{first.seq} on member {first.member} and {second.key}#{second.seq} on member "
                f"{second.member} ({len(self.overlaps)} overlap(s) in all)"
            )


class Scenario:
    """One case's world: a fresh namespace, unique topic and group names, brokers connected
    through the harness (closed at the end) and bounded waits scaled by the harness."""

    def __init__(self, harness: ConformanceHarness, seed: int) -> None:
        self.harness = harness
        self.seed = seed
        self.rng = random.Random(seed)
        self.namespace = uuid.uuid4().hex[:10]
        self.multiplier = float(harness.timeout_multiplier)
        self.brokers: list[Broker] = []
        self.capabilities = harness.capabilities()

    def topic(self, stem: str = "t") -> str:
        return f"{stem}-{uuid.uuid4().hex[:8]}"

    def group(self, stem: str = "g") -> str:
        return f"{stem}-{uuid.uuid4().hex[:8]}"

    async def connect(self, **settings: Any) -> Broker:
        """An open broker in this namespace: the suite's defaults, the harness's overrides,
        then ``settings``."""
        from ._harness import merge_settings

        broker = self.harness.connect(self.namespace, **merge_settings(DEFAULT_SETTINGS, settings))
        await broker.open()
        self.brokers.append(broker)
        return broker

    def timeout(self, seconds: float) -> float:
        return seconds * self.multiplier

    async def eventually(self, condition: Condition, what: str | Callable[[], str], timeout: float = 10.0) -> None:
        """:func:`eventually` with ``timeout`` scaled by the harness's ``timeout_multiplier``."""
        await eventually(condition, self.timeout(timeout), what)

    def claim_timeout(self) -> float:
        """The claim timeout the provider declares for this case's connections
        (``Transport.lease_ttl()``: how long a silent member keeps its lanes)."""
        declared = [float(b.transport.lease_ttl()) for b in self.brokers]
        return max(declared) if declared else 30.0

    def failover_timeout(self) -> float:
        """How long a silent or departed member's lanes may take to move: two declared claim
        timeouts (one to expire, one for the survivor's next look) and 5 s for the hand-over
        itself. Unscaled: :meth:`eventually` multiplies it by the harness's multiplier."""
        return 2 * self.claim_timeout() + 5.0

    async def close(self) -> None:
        """Close every broker this case opened (a wedged one is aborted)."""
        for broker in reversed(self.brokers):
            try:
                await asyncio.wait_for(broker.close(), self.timeout(20))
            except Exception:
                with contextlib.suppress(Exception):
                    await broker.abort()
        self.brokers.clear()
