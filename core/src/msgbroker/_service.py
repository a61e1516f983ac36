"""A service: subscribers declared with a decorator, publishers, startup and shutdown hooks, and
one broker — started and drained together (``msgbroker run``, a test, an ASGI app's lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, Self, TypeVar

from ._asyncapi import document
from ._broker import Broker, Subscription, connect
from ._codec import validate_name
from ._errors import BrokerClosedError, ConfigurationError
from ._handlers import HandlerShape, describe_handler, shape_of
from ._message import GenericMessage, Message
from ._settings import BrokerSettings

__all__ = ["Publisher", "Service", "Subscriber"]

log = logging.getLogger("msgbroker")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
M = TypeVar("M", bound=Message)
Hook = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Subscriber:
    """One ``@service.subscriber(...)`` declaration."""

    topic: str
    group: str
    handler: Callable[..., Awaitable[Any]]
    """The function as declared (a context or a plain handler)."""
    shape: HandlerShape
    ordered: bool = True
    max_concurrency: int | None = None
    partition: int | None = None
    """Take this one partition exclusively (``subscribe_to_partition``) instead of a share."""
    description: str | None = None

    @property
    def name(self) -> str:
        """The handler's ``module.qualname``."""
        return describe_handler(self.handler)

    @property
    def message_type(self) -> type[Message]:
        return self.shape.message_type


@dataclass(frozen=True, slots=True)
class Publisher(Generic[M]):
    """A topic the service publishes ``message_type`` to (``service.publisher(...)``): publishing
    through it checks the type, and the AsyncAPI document lists it."""

    service: Service = field(repr=False)
    topic: str
    message_type: type[M]
    description: str | None = None

    async def publish(
        self,
        message: M,
        *,
        headers: Mapping[str, str] | None = None,
        deliver_at: datetime | None = None,
        delay: float | timedelta | None = None,
    ) -> str:
        """Publish on the running service's broker; returns the message id once confirmed
        (``deliver_at`` or ``delay`` schedules it: ``Broker.publish``)."""
        self._check(message)
        return await self.service.broker.publish(self.topic, message, headers=headers, deliver_at=deliver_at,
                                                 delay=delay)

    async def publish_batch(self, messages: Sequence[M], *, headers: Mapping[str, str] | None = None) -> list[str]:
        """Publish many in one round trip where the broker allows; returns their ids."""
        for message in messages:
            self._check(message)
        return await self.service.broker.publish_batch(self.topic, messages, headers=headers)

    def _check(self, message: object) -> None:
        if not isinstance(message, self.message_type):
            raise TypeError(f"the publisher of {self.topic!r} takes {self.message_type.__name__}, "
                            f"got {type(message).__name__}")


class Service:
    """Subscribers, publishers and hooks around one broker.

    ``broker`` is a URL or :class:`BrokerSettings` (with ``overrides`` as for
    :func:`msgbroker.connect`); ``msgbroker run --url/--config`` and tests replace it. Without one,
    the ``MSGBROKER_*`` environment must name the provider (``MSGBROKER_PROVIDER``).

    ``title``, ``version`` and ``description`` go into the AsyncAPI document.
    """

    def __init__(
        self,
        broker: str | BrokerSettings | None = None,
        /,
        *,
        title: str = "msgbroker service",
        version: str = "0.1.0",
        description: str | None = None,
        **overrides: Any,
    ) -> None:
        if broker is not None and not isinstance(broker, str | BrokerSettings):
            raise TypeError(f"Service() takes a URL or BrokerSettings, got {broker!r}")
        self.target = broker
        self.overrides = overrides
        self.title = title
        self.version = version
        self.description = description
        self.subscribers: list[Subscriber] = []
        self.publishers: list[Publisher[Any]] = []
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._broker: Broker | None = None
        self._owns_broker = False
        self._subscriptions: list[Subscription] = []
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Service({self.title!r}, {len(self.subscribers)} subscriber(s), running={self.running})"

    # -- declaring ---------------------------------------------------------------------------

    def subscriber(
        self,
        topic: str,
        group: str,
        *,
        message_type: type[Message] | None = None,
        ordered: bool = True,
        max_concurrency: int | None = None,
        partition: int | None = None,
        description: str | None = None,
    ) -> Callable[[F], F]:
        """Declare ``handler`` a member of ``group`` on ``topic`` (the decorator returns it unchanged).

        The handler is either ``async def h(ctx: MessageContext[Order])`` (settles with
        ``ctx.ack()``/``nak()``/``delay()``; returning acks, raising naks) or
        ``async def h(message: Order)`` (returning acks, raising naks). Anything else is a
        ``TypeError`` naming the handler, here and not at the first message.
        """
        validate_name("topic", topic)
        validate_name("group", group)
        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be at least 1, got {max_concurrency!r}")

        def declare(handler: F) -> F:
            shape = shape_of(handler, message_type)
            for other in self.subscribers:
                if (other.topic, other.group, other.partition) == (topic, group, partition):
                    raise ConfigurationError(
                        f"{describe_handler(handler)} and {other.name} are both subscribed to {topic!r} as "
                        f"{group!r}: one member would take the other's messages; give them different groups")
            self.subscribers.append(Subscriber(topic, group, handler, shape, ordered, max_concurrency, partition,
                                               description or _first_line(handler.__doc__)))
            return handler

        return declare

    def publisher(self, topic: str, message_type: type[M], *, description: str | None = None) -> Publisher[M]:
        """Declare that the service publishes ``message_type`` to ``topic``; publish through the result."""
        validate_name("topic", topic)
        if not (isinstance(message_type, type) and issubclass(message_type, Message)):
            raise TypeError(f"message_type must be a msgbroker.Message subclass, got {message_type!r}")
        publisher = Publisher(self, topic, message_type, description)
        self.publishers.append(publisher)
        return publisher

    def on_startup(self, hook: Hook) -> Hook:
        """Run ``await hook()`` after the broker opened, before the subscribers start (decorator)."""
        self._startup.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        """Run ``await hook()`` after the subscribers drained, before the broker closes (decorator)."""
        self._shutdown.append(hook)
        return hook

    # -- running -----------------------------------------------------------------------------

    def connect(self) -> Broker:
        """An unopened broker for the service's own settings; without any, the environment's as
        the ``msgbroker`` command reads it: ``MSGBROKER_URL``, else ``MSGBROKER_CONFIG`` (a settings
        file), else ``MSGBROKER_PROVIDER`` and the other ``MSGBROKER_*`` settings."""
        target: str | BrokerSettings | None = self.target
        if target is None:
            if os.environ.get("MSGBROKER_URL"):
                target = os.environ["MSGBROKER_URL"]
            elif os.environ.get("MSGBROKER_CONFIG"):
                target = BrokerSettings.from_file(os.environ["MSGBROKER_CONFIG"])
            elif not self.overrides.get("provider") and "MSGBROKER_PROVIDER" not in os.environ:
                raise ConfigurationError(
                    "the service names no broker: give Service(url_or_settings), set MSGBROKER_URL or "
                    "MSGBROKER_CONFIG, or run it with --url / --config (msgbroker run)")
        return connect(target, **self.overrides)

    @property
    def running(self) -> bool:
        return self._broker is not None

    @property
    def broker(self) -> Broker:
        """The broker of the running service (publish, pending counts, dead letters)."""
        if self._broker is None:
            raise BrokerClosedError(f"the service {self.title!r} is not running: start it first")
        return self._broker

    @property
    def subscriptions(self) -> list[Subscription]:
        """The running subscriptions, one per subscriber."""
        return list(self._subscriptions)

    async def start(self, broker: Broker | None = None) -> Broker:
        """Open the broker (``broker``, or one made by :meth:`connect`), run the startup hooks,
        start every subscriber. A broker that was open already is left open by :meth:`stop`."""
        async with self._lock:
            if self._broker is not None:
                raise RuntimeError(f"the service {self.title!r} is running already")
            chosen = broker if broker is not None else self.connect()
            owned = not _is_open(chosen)
            await chosen.open()
            self._broker, self._owns_broker = chosen, owned
            try:
                for hook in self._startup:
                    await hook()
                for sub in self.subscribers:
                    self._subscriptions.append(await _subscribe(chosen, sub))
            except BaseException:
                await self._stop()
                raise
            return chosen

    async def stop(self) -> None:
        """Stop taking messages, let in-flight handlers finish and settle (each within the
        broker's ``shutdown_timeout``), leave the groups, run the shutdown hooks, and close the
        broker when the service opened it."""
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        broker = self._broker
        if broker is None:
            return
        subscriptions, self._subscriptions = self._subscriptions, []
        try:
            results = await asyncio.gather(*(s.close() for s in subscriptions), return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    log.warning("msgbroker: closing a subscription of %s failed: %r", self.title, result)
            for hook in reversed(self._shutdown):
                try:
                    await hook()
                except Exception as exc:
                    log.warning("msgbroker: a shutdown hook of %s failed: %r", self.title, exc)
        finally:
            self._broker = None
            if self._owns_broker:
                await broker.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """For Starlette and FastAPI: ``FastAPI(lifespan=service.lifespan)`` starts the service
        with the application and drains it when the application shuts down. Inside a lifespan of
        your own: ``async with service.lifespan(app): yield``."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def publish(
        self,
        topic: str,
        message: Message,
        *,
        headers: Mapping[str, str] | None = None,
        deliver_at: datetime | None = None,
        delay: float | timedelta | None = None,
    ) -> str:
        """Publish on the running service's broker; returns the message id once confirmed
        (``deliver_at`` or ``delay`` schedules it: ``Broker.publish``, docs/semantics.md rule 14)."""
        return await self.broker.publish(topic, message, headers=headers, deliver_at=deliver_at, delay=delay)

    async def cancel_scheduled(self, topic: str, message_id: str) -> bool:
        """``Broker.cancel_scheduled`` on the running service's broker."""
        return await self.broker.cancel_scheduled(topic, message_id)

    async def request(
        self,
        topic: str,
        message: Message,
        *,
        reply_type: type[Message] | None = None,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """``Broker.request`` on the running service's broker: publish ``message`` and wait for
        the message its handler returns (docs/semantics.md, rule 13), e.g. from a FastAPI route."""
        return await self.broker.request(topic, message, reply_type=reply_type, timeout=timeout, headers=headers)

    # -- describing --------------------------------------------------------------------------

    def asyncapi(self, broker: Broker | None = None) -> dict[str, Any]:
        """The service as an AsyncAPI 3.0 document (a JSON-ready dict): its topics (channels),
        groups (receive operations), publishers (send operations) and message schemas. ``broker``
        (opened or not) adds it as the server."""
        return document(self, broker)


def _is_open(broker: Broker) -> bool:
    try:
        broker.live_transport()
    except BrokerClosedError:
        return False
    return True


async def _subscribe(broker: Broker, sub: Subscriber) -> Subscription:
    # the type the declaration resolved (a class local to a function cannot be resolved again)
    explicit = None if sub.shape.message_type is GenericMessage else sub.shape.message_type
    if sub.partition is not None:
        return await broker.subscribe_to_partition(sub.topic, sub.group, sub.partition, sub.handler,
                                                   message_type=explicit, ordered=sub.ordered,
                                                   max_concurrency=sub.max_concurrency)
    return await broker.subscribe(sub.topic, sub.group, sub.handler, message_type=explicit, ordered=sub.ordered,
                                  max_concurrency=sub.max_concurrency)


def _first_line(doc: str | None) -> str | None:
    if not doc:
        return None
    lines = [line.strip() for line in doc.strip().splitlines()]
    return lines[0] if lines else None
