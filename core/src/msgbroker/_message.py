"""Messages, the per-delivery context handed to handlers, and dead letters."""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ._errors import AlreadySettledError

__all__ = ["DeadLetter", "Message", "MessageContext", "Outcome", "Settler"]


class Settler(Protocol):
    """What carries out a handler's settle calls for one delivery (the engine supplies it)."""

    def ack(self) -> Awaitable[None]: ...

    async def retry(self, delay: float | None, error: BaseException | str | None) -> None: ...

    async def dead_letter(self, error: BaseException | str) -> None: ...


try:
    from opentelemetry import context as _otel_context
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is optional
    _trace = None  # type: ignore[assignment]
    _otel_context = None  # type: ignore[assignment]


_UUID = uuid.UUID
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
_V4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_V4_SET = (0x8000 << 48) | (4 << 76)
_urandom = os.urandom
_new = object.__new__


_POOL_BYTES = 16 * 256
_pool: list[uuid.UUID] = []
_words = struct.Struct(f">{_POOL_BYTES // 8}Q").unpack  # 64-bit halves, high first
# UUID's slots, written through their descriptors (UUID.__setattr__ refuses; object.__setattr__
# looks the name up each time)
_set_int: Callable[[uuid.UUID, int], None] = _UUID.__dict__["int"].__set__
_set_safe: Callable[[uuid.UUID, uuid.SafeUUID], None] = _UUID.__dict__["is_safe"].__set__


def _refill() -> None:
    halves = iter(_words(_urandom(_POOL_BYTES)))
    made: list[uuid.UUID] = []
    append = made.append
    for high, low in zip(halves, halves, strict=True):
        value = _new(_UUID)
        _set_int(value, (high << 64 | low) & _V4_CLEAR | _V4_SET)
        _set_safe(value, _SAFE_UNKNOWN)
        append(value)
    _pool.extend(made)


def _uuid4() -> uuid.UUID:
    """``uuid.uuid4()`` (16 bytes of ``os.urandom`` each, the same variant and version bits)
    without ``UUID.__init__``'s argument parsing, made 256 at a time from one ``os.urandom``
    call: one is made per message. A forked child drops the parent's unused ones."""
    try:
        return _pool.pop()
    except IndexError:
        _refill()
        return _pool.pop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.clear)


_last_traceparent: list[Any] = [None, None]  # (the OpenTelemetry context, its traceparent)


def _current_correlation_id() -> str | None:
    """The current W3C trace context (traceparent), when opentelemetry is installed and a span is active.

    One message is built per publish: the answer is kept for as long as the current context is
    the same object (contexts are immutable; attaching a span makes a new one)."""
    if _otel_context is None:
        return None
    context = _otel_context.get_current()
    last = _last_traceparent
    if context is last[0]:
        return last[1]  # type: ignore[no-any-return]
    span_context = _trace.get_current_span(context).get_span_context()
    value = None
    if span_context.is_valid:
        value = f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
    last[0], last[1] = context, value
    return value


class Message(BaseModel):
    """Base class of every message: a pydantic model with an id, a correlation id and a time.

    Override :attr:`partition_key` so that messages that must be handled in order share a key.
    """

    model_config = ConfigDict(extra="ignore", frozen=False)

    message_id: uuid.UUID = Field(default_factory=_uuid4)
    correlation_id: str | None = Field(default_factory=_current_correlation_id)
    created_at: datetime = Field(default_factory=partial(datetime.now, UTC))  # no lambda frame per message

    @property
    def partition_key(self) -> str:
        """Messages with the same key go to the same partition and are handled in order."""
        return str(self.message_id)


class GenericMessage(Message):
    """What a handler without a declared message type receives: every field is kept."""

    model_config = ConfigDict(extra="allow")


class Outcome:
    """How a delivery was settled (the engine's vocabulary)."""

    ACK: ClassVar[str] = "ack"
    RETRY: ClassVar[str] = "retry"
    DEAD: ClassVar[str] = "dead"


M = TypeVar("M", bound=Message)


class MessageContext(Generic[M]):
    """One delivery of one message to a handler, and the means to settle it.

    Settle exactly once: :meth:`ack`, :meth:`nak` or :meth:`delay`. A handler that returns
    without settling acks; one that raises naks with requeue.
    """

    __slots__ = (
        "_settler",
        "delivery_attempt",
        "group",
        "headers",
        "message",
        "message_id",
        "partition",
        "settled",
        "topic",
    )

    def __init__(
        self,
        *,
        message: M,
        topic: str,
        group: str,
        partition: int,
        message_id: str,
        delivery_attempt: int,
        headers: Mapping[str, str],
        settler: Settler,
    ) -> None:
        self.message = message
        self.topic = topic
        self.group = group
        self.partition = partition
        self.message_id = message_id
        self.delivery_attempt = delivery_attempt
        self.headers = headers
        self.settled: str | None = None
        self._settler = settler

    def _claim(self, outcome: str) -> None:
        if self.settled is not None:
            raise AlreadySettledError(
                f"message {self.message_id} on {self.topic!r} was already settled ({self.settled})"
            )
        self.settled = outcome

    async def ack(self) -> None:
        """The message was handled: it is not delivered to this group again."""
        if self.settled is not None:
            self._claim(Outcome.ACK)  # raises
        self.settled = Outcome.ACK
        await self._settler.ack()

    async def nak(self, requeue: bool = True, *, error: BaseException | str | None = None) -> None:
        """Handling failed. ``requeue=True`` retries (holding the partition when ordered);
        ``requeue=False`` gives up and sends the message to the dead letters with ``error``."""
        if requeue:
            self._claim(Outcome.RETRY)
            await self._settler.retry(None, error)
        else:
            self._claim(Outcome.DEAD)
            await self._settler.dead_letter(error if error is not None else "nak(requeue=False)")

    async def delay(self, delay: float | timedelta) -> None:
        """Redeliver no earlier than ``delay`` from now (holding the partition when ordered)."""
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if seconds < 0:
            raise ValueError(f"delay must not be negative, got {delay!r}")
        self._claim(Outcome.RETRY)
        await self._settler.retry(seconds, None)

    def __repr__(self) -> str:
        return (
            f"MessageContext(topic={self.topic!r}, partition={self.partition}, "
            f"message_id={self.message_id!r}, delivery_attempt={self.delivery_attempt})"
        )


Handler = Callable[[MessageContext[Any]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that was given up on, with why and after how many attempts."""

    message_id: str
    topic: str
    group: str
    partition: int
    error: str
    attempts: int
    headers: Mapping[str, str]
    payload: bytes
    partition_key: str = ""
    dead_lettered_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def message(self, message_type: type[M]) -> M:
        """The original payload parsed as ``message_type``."""
        return message_type.model_validate_json(self.payload)
