"""The public broker: connect(), publishing, subscribing, and the management calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Generator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Self, TypeVar, overload
from urllib.parse import urlsplit

from ._codec import REPLAY_GROUP_HEADER, check_headers, encode, validate_name
from ._engine import SubscriptionRunner
from ._errors import AccessDeniedError, BrokerClosedError, BrokerConnectionError, ConfigurationError, redact
from ._handlers import shape_of
from ._hookspecs import PublishEvent, has_implementations
from ._message import DeadLetter, Handler, Message
from ._provider import Capabilities, OutgoingRecord, Transport
from ._registry import registry
from ._requests import Requests, await_reply
from ._settings import BrokerSettings
from .wire import REPLY_TO_HEADER, user_headers

__all__ = ["Broker", "Consumer", "Producer", "Subscription", "connect", "due_time"]

log = logging.getLogger("msgbroker")

R = TypeVar("R", bound=Message)


def due_time(deliver_at: datetime | None, delay: float | timedelta | None) -> float | None:
    """When a publish with ``deliver_at`` or ``delay`` is due (epoch seconds), or None for an
    ordinary publish. ``deliver_at`` is a timezone-aware datetime; ``delay`` seconds (a number
    or a timedelta), not negative. Both at once, a naive datetime, a negative or non-finite
    delay raise :class:`ConfigurationError` naming the values (docs/semantics.md, rule 14)."""
    if deliver_at is not None and delay is not None:
        raise ConfigurationError(f"publish takes deliver_at or delay, not both: deliver_at={deliver_at!r}, "
                                 f"delay={delay!r}")
    if deliver_at is not None:
        if not isinstance(deliver_at, datetime):
            raise ConfigurationError(f"deliver_at must be a timezone-aware datetime, got {deliver_at!r}")
        if deliver_at.tzinfo is None or deliver_at.utcoffset() is None:
            raise ConfigurationError(f"deliver_at={deliver_at!r} has no timezone: give an aware datetime "
                                     "(datetime.now(UTC) + timedelta(...))")
        return deliver_at.timestamp()
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ConfigurationError(f"delay={delay!r} must be a finite number of seconds (or a timedelta), "
                                     "not negative")
        return time.time() + float(seconds)
    return None


class Subscription:
    """A running subscription of this member; :meth:`close` stops it gracefully."""

    def __init__(self, runner: SubscriptionRunner, owner: Consumer) -> None:
        self._runner = runner
        self._owner = owner
        self.closed = False

    @property
    def topic(self) -> str:
        return self._runner.topic

    @property
    def group(self) -> str:
        return self._runner.group

    @property
    def member_id(self) -> str:
        """This member's id within the group."""
        return self._runner.member_id

    @property
    def partitions(self) -> list[int]:
        """The partitions this member reads right now."""
        return self._runner.partitions

    @property
    def failure(self) -> AccessDeniedError | None:
        """Why the subscription stopped by itself, or None while it runs (or was closed): the
        broker refused this member's credentials or a permission it needs while reading. It
        stops like a crash — nothing more is settled or released, so its unsettled messages are
        delivered again (to another member once its partitions' leases run out, or after a
        restart) — and the error is logged."""
        return self._runner.failure

    async def close(self) -> None:
        """Stop taking messages, let in-flight handlers finish (bounded by ``shutdown_timeout``),
        settle what was handled and hand the partitions over."""
        if self.closed:
            return
        self.closed = True
        self._owner.forget(self)
        await self._runner.close()

    async def abort(self) -> None:
        """Simulate a crash (for tests): stop at once, settle and release nothing."""
        self.closed = True
        self._owner.forget(self)
        await self._runner.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Producer:
    """The publishing side of a broker."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.observed = False
        """A plugin observes publishes (``msgbroker_publish``): looked up when the broker opens."""

    def _record(self, topic: str, message: Message, headers: Mapping[str, str] | None) -> OutgoingRecord:
        """Encode for a topic whose name was validated already."""
        settings = self._broker.settings
        limit = min(settings.max_message_bytes, self._broker.capabilities.max_message_bytes)
        return encode(topic, message, settings.partition_count, limit, headers)

    def _dedup_window(self) -> float | None:
        settings = self._broker.settings
        if not settings.enable_deduplication:
            return None
        self._broker.capabilities.require("deduplication")
        return settings.deduplication_window.total_seconds()

    async def publish(
        self,
        topic: str,
        message: Message,
        *,
        headers: Mapping[str, str] | None = None,
        deliver_at: datetime | None = None,
        delay: float | timedelta | None = None,
    ) -> str:
        """Publish one message; returns its message id once the broker confirmed it. With
        ``deliver_at`` or ``delay`` the message is scheduled (docs/semantics.md, rule 14)."""
        due = due_time(deliver_at, delay)
        if due is not None:
            return await self.schedule(topic, message, due, headers)
        record = self._record(validate_name("topic", topic), message, headers)
        if self.observed:
            await self.send(topic, [record], self._dedup_window())
        else:
            await self._broker.live_transport().publish([record], self._dedup_window())
        return record.message_id

    async def schedule(
        self, topic: str, message: Message, due: float, headers: Mapping[str, str] | None = None
    ) -> str:
        """Publish ``message`` to be appended to its partition at ``due`` (epoch seconds); a time
        already past publishes it at once. Needs the ``scheduling`` capability either way."""
        self._broker.capabilities.require("scheduling")
        record = self._record(validate_name("topic", topic), message, headers)
        if due <= time.time():
            await self.send(topic, [record], self._dedup_window())
            return record.message_id
        transport = self._broker.live_transport()
        if not self.observed:
            await transport.schedule(record, due)
            return record.message_id
        event = PublishEvent(self._broker.provider, topic, [record], False)
        with contextlib.ExitStack() as observers:
            for observer in registry.plugins.hook.msgbroker_publish(event=event):
                observers.enter_context(observer)
            await transport.schedule(record, due)
        return record.message_id

    async def publish_batch(
        self, topic: str, messages: Sequence[Message], *, headers: Mapping[str, str] | None = None
    ) -> list[str]:
        """Publish many messages in one round trip where the broker allows; returns their ids."""
        validate_name("topic", topic)
        settings = self._broker.settings
        limit = min(settings.max_message_bytes, self._broker.capabilities.max_message_bytes)
        count = settings.partition_count
        checked = check_headers(headers) if headers else None
        records = [encode(topic, m, count, limit, checked_headers=checked) for m in messages]
        if records:
            if self.observed:
                await self.send(topic, records, self._dedup_window())
            else:
                await self._broker.live_transport().publish(records, self._dedup_window())
        return [r.message_id for r in records]

    async def send(
        self, topic: str, records: list[OutgoingRecord], dedup_window: float | None, *, replay: bool = False
    ) -> None:
        """Publish records already encoded, inside the context managers of the
        ``msgbroker_publish`` hook implementations (when there are any)."""
        transport = self._broker.live_transport()
        if not self.observed:
            await transport.publish(records, dedup_window)
            return
        event = PublishEvent(self._broker.provider, topic, records, replay)
        with contextlib.ExitStack() as observers:
            for observer in registry.plugins.hook.msgbroker_publish(event=event):
                observers.enter_context(observer)
            await transport.publish(records, dedup_window)


class Consumer:
    """The subscribing side of a broker."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._subscriptions: set[Subscription] = set()

    async def subscribe(
        self,
        topic: str,
        group: str,
        handler: Handler,
        *,
        message_type: type[Message] | None = None,
        ordered: bool = True,
        max_concurrency: int | None = None,
    ) -> Subscription:
        """Join ``group`` on ``topic``: this member gets its share of the partitions."""
        return await self._start(topic, group, handler, message_type, ordered, max_concurrency, None)

    async def subscribe_to_partition(
        self,
        topic: str,
        group: str,
        partition: int,
        handler: Handler,
        *,
        message_type: type[Message] | None = None,
        ordered: bool = True,
        max_concurrency: int | None = None,
    ) -> Subscription:
        """Take ``partition`` of ``topic`` exclusively within ``group``."""
        count = self._broker.settings.partition_count
        if not isinstance(partition, int) or not 0 <= partition < count:
            raise ConfigurationError(f"partition {partition!r} is out of range 0..{count - 1}")
        self._broker.capabilities.require("partition_exclusive")
        return await self._start(topic, group, handler, message_type, ordered, max_concurrency, partition)

    async def _start(
        self,
        topic: str,
        group: str,
        handler: Handler,
        message_type: type[Message] | None,
        ordered: bool,
        max_concurrency: int | None,
        partition: int | None,
    ) -> Subscription:
        validate_name("topic", topic)
        validate_name("group", group)
        shape = shape_of(handler, message_type)  # a TypeError naming a handler of neither shape
        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be at least 1, got {max_concurrency!r}")
        runner = SubscriptionRunner(
            self._broker.live_transport(),
            self._broker.settings,
            topic,
            group,
            shape.handler,
            shape.message_type,
            ordered=ordered,
            max_concurrency=max_concurrency,
            partition=partition,
        )
        await runner.start()
        subscription = Subscription(runner, self)
        self._subscriptions.add(subscription)
        return subscription

    def forget(self, subscription: Subscription) -> None:
        """``subscription`` closed or aborted: it is no longer this consumer's."""
        self._subscriptions.discard(subscription)

    async def close(self) -> None:
        """Close every subscription gracefully."""
        await asyncio.gather(*(s.close() for s in list(self._subscriptions)))

    async def abort(self) -> None:
        """Stop every subscription as a crash would (nothing settled, released or flushed)."""
        await asyncio.gather(*(s.abort() for s in list(self._subscriptions)))


class Broker:
    """One connection to one broker, with its producer and consumer sides.

    Use ``async with msgbroker.connect(url) as broker`` or ``broker = await msgbroker.connect(url)``.
    """

    def __init__(self, settings: BrokerSettings, transport_class: type[Transport]) -> None:
        self.settings = settings
        self.capabilities: Capabilities = transport_class.CAPABILITIES
        self.transport = transport_class(settings)
        self.producer = Producer(self)
        self.consumer = Consumer(self)
        self._state = "new"
        self._requests: Requests | None = None

    @property
    def provider(self) -> str:
        return self.transport.NAME

    def live_transport(self) -> Transport:
        """The provider's transport, or :class:`BrokerClosedError` when the broker is not open."""
        if self._state != "open":
            raise BrokerClosedError(f"the {self.provider} broker is {self._state}, not open")
        return self.transport

    async def open(self) -> Self:
        if self._state == "open":
            return self
        try:
            await self.transport.connect()
        except Exception as exc:
            text = str(exc)
            safe = redact(text)
            if safe != text:  # never let a password out in an error (or a log of one)
                raise BrokerConnectionError(f"cannot connect to the {self.provider} broker: {safe}") from None
            if isinstance(exc, ConnectionError) and not isinstance(exc, BrokerConnectionError):
                raise BrokerConnectionError(f"cannot connect to the {self.provider} broker: {exc}") from exc
            raise
        self._state = "open"
        self.capabilities = self.transport.capabilities  # narrowed by what the server lacks
        # Looked up once: with no plugin observing publishes, publish skips the hook.
        self.producer.observed = has_implementations("msgbroker_publish", registry.plugins)
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self.open().__await__()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every subscription gracefully, then the connection."""
        if self._state != "open":
            return
        self._state = "closing"
        try:
            await self.consumer.close()
        finally:
            if self._requests is not None:
                self._requests.fail_all(BrokerClosedError(f"the {self.provider} broker closed before the reply came"))
            await self.transport.close()
            self._state = "closed"

    async def abort(self) -> None:
        """Simulate a crash of this process (for tests): subscriptions stop without settling,
        releasing or flushing anything, and the connection is dropped."""
        if self._state != "open":
            return
        self._state = "closed"
        await self.consumer.abort()
        with contextlib.suppress(Exception):
            await self.transport.abort()

    # -- the API (README.md, docs/semantics.md) ---------------------------------------------------

    async def publish(
        self,
        topic: str,
        message: Message,
        *,
        headers: Mapping[str, str] | None = None,
        deliver_at: datetime | None = None,
        delay: float | timedelta | None = None,
    ) -> str:
        """Publish one message; returns its message id once the broker confirmed it.

        ``deliver_at`` (a timezone-aware datetime) or ``delay`` (seconds or a timedelta; not
        both) schedules it: the broker keeps it and appends it to its partition — same message
        id and key — when it is due, never before, within the provider's declared
        ``capabilities.schedule_precision`` after; it blocks nothing meanwhile and survives
        restarts. A time already past publishes at once. :meth:`cancel_scheduled` withdraws
        it. Raises :class:`CapabilityNotSupported` (with the reason) on a provider that cannot
        schedule. docs/semantics.md, rule 14."""
        return await self.producer.publish(topic, message, headers=headers, deliver_at=deliver_at, delay=delay)

    async def cancel_scheduled(self, topic: str, message_id: str) -> bool:
        """Withdraw a message scheduled on ``topic``: True when it was waiting and now never will
        be delivered; False when nothing of that id waits there (never scheduled, cancelled
        already, or due and appended already — it is then an ordinary message of its partition)."""
        transport = self.live_transport()
        self.capabilities.require("scheduling")
        validate_name("topic", topic)
        if not isinstance(message_id, str) or not message_id:
            raise ConfigurationError(f"cancel_scheduled takes a message id as text, got {message_id!r}")
        return await transport.cancel_scheduled(topic, message_id)

    async def publish_batch(
        self, topic: str, messages: Sequence[Message], *, headers: Mapping[str, str] | None = None
    ) -> list[str]:
        """Publish many messages; returns their ids once the broker confirmed them all."""
        return await self.producer.publish_batch(topic, messages, headers=headers)

    @overload
    async def request(
        self, topic: str, message: Message, *, reply_type: type[R], timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> R | None: ...

    @overload
    async def request(
        self, topic: str, message: Message, *, reply_type: None = None, timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> Any: ...

    async def request(
        self,
        topic: str,
        message: Message,
        *,
        reply_type: type[Message] | None = None,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Publish ``message`` as a request and wait for the message its handler returns.

        The request is an ordinary message of its partition (in order with the others, retried,
        dead-lettered); the handler's returned message comes back decoded as ``reply_type`` (the
        JSON as Python data without one; ``None`` when the handler returned none). Raises
        :class:`RequestTimeoutError` (naming the topic) when no reply comes within ``timeout``
        seconds, :class:`RequestFailedError` when the request was dead-lettered (with its error),
        :class:`CapabilityNotSupported` when the provider has no reply channel.
        docs/semantics.md, "Request and reply"."""
        if not timeout > 0:
            raise ConfigurationError(f"request timeout={timeout!r} must be a positive number of seconds")
        transport = self.live_transport()
        self.capabilities.require("request_reply")
        validate_name("topic", topic)
        if self._requests is None:
            self._requests = Requests(transport)
        requests = self._requests
        address = await requests.address()
        record = self.producer._record(topic, message, headers)
        record.headers[REPLY_TO_HEADER] = address
        future = requests.expect(record.message_id)
        try:
            await self.producer.send(topic, [record], self.producer._dedup_window())
            return await await_reply(future, topic, record.message_id, timeout, reply_type)
        finally:
            requests.forget(record.message_id)

    async def subscribe(
        self,
        topic: str,
        group: str,
        handler: Handler,
        *,
        message_type: type[Message] | None = None,
        ordered: bool = True,
        max_concurrency: int | None = None,
    ) -> Subscription:
        """Join ``group`` on ``topic`` with ``handler``; see :meth:`Consumer.subscribe`."""
        return await self.consumer.subscribe(
            topic, group, handler, message_type=message_type, ordered=ordered, max_concurrency=max_concurrency
        )

    async def subscribe_to_partition(
        self,
        topic: str,
        group: str,
        partition: int,
        handler: Handler,
        *,
        message_type: type[Message] | None = None,
        ordered: bool = True,
        max_concurrency: int | None = None,
    ) -> Subscription:
        """Take one partition exclusively; see :meth:`Consumer.subscribe_to_partition`."""
        return await self.consumer.subscribe_to_partition(
            topic, group, partition, handler, message_type=message_type, ordered=ordered,
            max_concurrency=max_concurrency,
        )

    async def is_healthy(self) -> bool:
        """True only when the server answers and the connection works; never raises."""
        if self._state != "open":
            return False
        try:
            return bool(await asyncio.wait_for(self.transport.ping(), 5.0))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller is being cancelled
            return False
        except Exception:
            return False

    async def pending_count(self, topic: str, group: str) -> int:
        """Messages of ``topic`` that ``group`` has not settled (ready, in flight, waiting)."""
        return await self.live_transport().pending_count(validate_name("topic", topic), validate_name("group", group))

    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        """The dead letters of ``group`` on ``topic``, oldest first."""
        return await self.live_transport().dead_letters(validate_name("topic", topic), validate_name("group", group))

    async def replay_dead_letters(self, topic: str, group: str, ids: Sequence[str] | None = None) -> int:
        """Publish dead letters back to ``topic`` (for ``group`` only) and remove them; returns how many."""
        transport = self.live_transport()
        letters = await self.dead_letters(topic, group)
        if ids is not None:
            wanted = {str(i) for i in ids}
            letters = [letter for letter in letters if letter.message_id in wanted]
        if not letters:
            return 0
        records = []
        for letter in letters:
            headers = user_headers(letter.headers)
            headers[REPLAY_GROUP_HEADER] = group
            records.append(OutgoingRecord(topic, letter.partition, letter.partition_key, letter.message_id,
                                          headers, letter.payload))
        await self.producer.send(topic, records, None, replay=True)
        # Exactly the letters listed: one stored since for the same message (replayed, handled
        # and dead-lettered again already) stays.
        await transport.remove_listed_dead_letters(topic, group, letters)
        return len(letters)


def connect(url_or_settings: str | BrokerSettings | None = None, /, **overrides: Any) -> Broker:
    """A broker for a URL (the scheme picks the provider) or for settings.

    Await it or use it with ``async with``; ``overrides`` are settings fields
    (``partition_count=16``, ``redis={"claim_timeout": 2}``).
    """
    if isinstance(url_or_settings, BrokerSettings):
        if "provider" not in overrides:
            url_or_settings.check_provider_chosen()  # a file of Redis/NATS sections is not memory://
        base = url_or_settings.model_dump(exclude_unset=False)
        merged = _merge(base, overrides)
        settings = BrokerSettings(**merged)
        transport_class = registry.by_name(settings.provider)
    elif isinstance(url_or_settings, str) or url_or_settings is None:
        url = url_or_settings
        if url is None:
            settings = BrokerSettings(**overrides)
            transport_class = registry.by_name(settings.provider)
        else:
            scheme = urlsplit(url).scheme if "://" in url else ""
            if not scheme:
                raise ConfigurationError(f"connection URL {url!r} has no scheme (like redis:// or memory://)")
            transport_class = registry.by_scheme(scheme)
            from_url = {"provider": transport_class.NAME, **transport_class.settings_from_url(url)}
            settings = BrokerSettings(**_merge(from_url, overrides))
    else:
        raise TypeError(f"connect() takes a URL or BrokerSettings, got {url_or_settings!r}")
    return Broker(settings, transport_class)


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = _merge(current, value)
        else:
            out[key] = value
    return out
