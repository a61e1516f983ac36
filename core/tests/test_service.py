"""msgbroker.Service and the two handler shapes (issue 19, deliverable 1): a context handler or a
plain ``async def h(message: Order)`` both work, through ``@service.subscriber`` and through
``Broker.subscribe``; anything else is refused when subscribing, naming the handler."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import msgbroker
import pytest
from msgbroker import ConfigurationError, Message, MessageContext
from msgbroker.testing import eventually, run_in_memory
from pydantic import BaseModel


class Order(Message):
    order_id: int
    customer: str = "c"

    @property
    def partition_key(self) -> str:
        return self.customer


class Refund(Message):
    order_id: int


def memory_url() -> str:
    return f"memory://service-{uuid.uuid4().hex[:10]}"


# -- Broker.subscribe: the row "a FastStream-style handler async def h(m: Order)" --------


async def test_a_plain_handler_gets_the_message_and_acks_by_returning() -> None:
    seen: list[tuple[int, str]] = []

    async def confirm(order: Order) -> None:
        seen.append((order.order_id, order.customer))  # Order's attributes, not MessageContext's

    async with msgbroker.connect(memory_url(), retry_delay=0) as broker:
        await broker.subscribe("orders", "workers", confirm)
        for i in range(5):
            await broker.publish("orders", Order(order_id=i))
        await eventually(lambda: len(seen) == 5, what="5 orders handled")
        assert seen == [(i, "c") for i in range(5)]
        await eventually(lambda: _zero(broker.pending_count("orders", "workers")), what="all acked")
        assert await broker.dead_letters("orders", "workers") == []


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0


async def test_a_plain_handler_that_raises_naks_until_the_dead_letter_with_its_error() -> None:
    calls: list[int] = []

    async def refuse(order: Order) -> None:
        calls.append(order.order_id)
        raise ValueError(f"order {order.order_id} refused")

    async with msgbroker.connect(memory_url(), retry_delay=0, max_retry_attempts=3) as broker:
        await broker.subscribe("orders", "workers", refuse)
        await broker.publish("orders", Order(order_id=7))
        await eventually(lambda: broker.dead_letters("orders", "workers"), what="the dead letter")
        (letter,) = await broker.dead_letters("orders", "workers")
        assert letter.error == "ValueError: order 7 refused"  # not AttributeError on a MessageContext
        assert letter.attempts == 3
        assert calls == [7, 7, 7]


async def test_a_context_handler_still_settles_itself() -> None:
    got: list[tuple[int, int]] = []

    async def handle(ctx: MessageContext[Order]) -> None:
        got.append((ctx.message.order_id, ctx.delivery_attempt))
        if ctx.delivery_attempt == 1:
            await ctx.delay(0)
        else:
            await ctx.ack()

    async with msgbroker.connect(memory_url(), retry_delay=0) as broker:
        await broker.subscribe("orders", "workers", handle)
        await broker.publish("orders", Order(order_id=1))
        await eventually(lambda: len(got) == 2, what="the delayed redelivery")
        assert got == [(1, 1), (1, 2)]


async def _ctx_unannotated(ctx):  # type: ignore[no-untyped-def]
    await ctx.ack()


async def test_unannotated_callables_bound_methods_and_lambdas_are_context_handlers() -> None:
    seen: list[str] = []

    class Handlers:
        async def on_order(self, ctx: MessageContext[Order]) -> None:
            seen.append(f"method {ctx.message.order_id}")

        async def __call__(self, order: Order) -> None:
            seen.append(f"callable {order.order_id}")

    async def tagged(ctx: MessageContext[Order], tag: str) -> None:
        seen.append(f"{tag} {ctx.message.order_id}")

    handlers = Handlers()
    async with msgbroker.connect(memory_url(), retry_delay=0) as broker:
        await broker.subscribe("orders", "a", handlers.on_order)
        await broker.subscribe("orders", "b", handlers)
        await broker.subscribe("orders", "c", functools.partial(tagged, tag="partial"))
        await broker.subscribe("orders", "d", lambda ctx: _ctx_unannotated(ctx))
        await broker.publish("orders", Order(order_id=3))
        await eventually(lambda: len(seen) == 3, what="three handlers")
        await eventually(lambda: _zero(broker.pending_count("orders", "d")), what="the lambda's ack")
    assert sorted(seen) == ["callable 3", "method 3", "partial 3"]


def sync_handler(order: Order) -> None:
    pass


async def no_argument() -> None:
    pass


async def two_arguments(order: Order, other: int) -> None:
    pass


async def takes_a_dict(payload: dict[str, Any]) -> None:
    pass


class PlainModel(BaseModel):
    x: int


async def takes_a_plain_model(model: PlainModel) -> None:
    pass


async def generator(ctx: MessageContext[Order]):  # type: ignore[no-untyped-def]
    yield


REFUSED = [
    (sync_handler, "test_service.sync_handler is not async"),
    (no_argument, "test_service.no_argument takes no argument"),
    (two_arguments, "test_service.two_arguments requires more than one argument (other"),
    (takes_a_dict, "test_service.takes_a_dict takes 'payload: dict"),
    (takes_a_plain_model, "subclass msgbroker.Message instead of BaseModel"),
    (generator, "test_service.generator is a generator"),
]


@pytest.mark.parametrize(("handler", "says"), REFUSED, ids=[h.__name__ for h, _ in REFUSED])
async def test_a_handler_of_neither_shape_is_refused_at_subscribe_naming_it(handler: Any, says: str) -> None:
    async with msgbroker.connect(memory_url()) as broker:
        with pytest.raises(TypeError, match="MessageContext") as refused:
            await broker.subscribe("orders", "workers", handler)
        assert says in str(refused.value)
        service = msgbroker.Service(memory_url())
        with pytest.raises(TypeError) as declared:
            service.subscriber("orders", "workers")(handler)
        assert says in str(declared.value)
        assert service.subscribers == []


async def test_an_annotation_that_cannot_be_evaluated_is_refused_unless_message_type_says() -> None:
    class LocalOrder(Message):  # local: "LocalOrder" cannot be evaluated from the module
        order_id: int

    async def local(order: LocalOrder) -> None:
        seen.append(order.order_id)

    seen: list[int] = []
    async with msgbroker.connect(memory_url(), retry_delay=0) as broker:
        with pytest.raises(TypeError, match=r"test_service\..*local: the annotation 'order: LocalOrder'"):
            await broker.subscribe("orders", "workers", local)
        await broker.subscribe("orders", "workers", local, message_type=LocalOrder)
        await broker.publish("orders", LocalOrder(order_id=4))
        await eventually(lambda: seen == [4], what="the local type decoded")


async def test_message_type_must_agree_with_a_plain_handlers_annotation() -> None:
    async def refund(r: Refund) -> None:
        pass

    async with msgbroker.connect(memory_url()) as broker:
        with pytest.raises(TypeError, match="takes Refund, but message_type=Order"):
            await broker.subscribe("orders", "workers", refund, message_type=Order)


# -- Service -------------------------------------------------------------------------------------


async def test_a_service_starts_its_subscribers_after_startup_and_drains_before_shutdown() -> None:
    service = msgbroker.Service(memory_url(), retry_delay=0)
    events: list[str] = []
    started = asyncio.Event()

    @service.on_startup
    async def open_db() -> None:
        events.append("startup")

    @service.on_shutdown
    async def close_db() -> None:
        events.append("shutdown")

    @service.subscriber("orders", "workers")
    async def slow(order: Order) -> None:
        events.append(f"handling {order.order_id}")
        started.set()
        await asyncio.sleep(0.3)
        events.append(f"handled {order.order_id}")

    async with service:
        assert service.running and len(service.subscriptions) == 1
        await service.publish("orders", Order(order_id=1))
        await asyncio.wait_for(started.wait(), 5)
    # stop() returned only after the in-flight handler finished and was acked
    assert events == ["startup", "handling 1", "handled 1", "shutdown"]
    assert not service.running
    with pytest.raises(msgbroker.BrokerClosedError, match="not running"):
        service.broker  # noqa: B018
    async with msgbroker.connect(service.target) as again:  # type: ignore[arg-type]
        assert await again.pending_count("orders", "workers") == 0


async def test_a_service_on_a_broker_it_did_not_open_leaves_it_open() -> None:
    service = msgbroker.Service()

    @service.subscriber("orders", "workers")
    async def confirm(order: Order) -> None:
        pass

    async with msgbroker.connect(memory_url()) as broker:
        await service.start(broker)
        assert [s.topic for s in service.subscriptions] == ["orders"]
        await service.stop()
        assert await broker.is_healthy()
        assert await broker.pending_count("orders", "workers") == 0


def test_a_service_without_a_broker_takes_the_environments_or_says_how_to_name_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("MSGBROKER_PROVIDER", "MSGBROKER_URL", "MSGBROKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match=r"names no broker: give Service.*set MSGBROKER_URL or MSGBROKER_CONF"):
        msgbroker.Service().connect()
    (tmp_path / "settings.json").write_text('{"provider": "memory", "partition_count": 5}')
    monkeypatch.setenv("MSGBROKER_CONFIG", str(tmp_path / "settings.json"))
    assert msgbroker.Service().connect().settings.partition_count == 5
    monkeypatch.setenv("MSGBROKER_URL", "memory://from-env")
    broker = msgbroker.Service(partition_count=3).connect()
    assert (broker.settings.memory.name, broker.settings.partition_count) == ("from-env", 3)


def test_two_subscribers_in_one_group_on_one_topic_are_refused() -> None:
    service = msgbroker.Service(memory_url())

    @service.subscriber("orders", "workers")
    async def first(order: Order) -> None:
        pass

    with pytest.raises(ConfigurationError, match="both subscribed to 'orders' as 'workers'"):

        @service.subscriber("orders", "workers")
        async def second(order: Order) -> None:
            pass


async def test_a_publisher_checks_the_type_it_declared() -> None:
    service = msgbroker.Service(memory_url())
    refunds = service.publisher("refunds", Refund)
    async with run_in_memory(service) as run:
        message_id = await refunds.publish(Refund(order_id=1))
        assert message_id
        with pytest.raises(TypeError, match="the publisher of 'refunds' takes Refund, got Order"):
            await refunds.publish(Order(order_id=1))  # type: ignore[arg-type]
        assert await run.broker.pending_count("refunds", "anyone") == 1


async def test_a_subscriber_that_fails_to_start_stops_the_others() -> None:
    service = msgbroker.Service(memory_url())
    stopped: list[str] = []

    @service.subscriber("orders", "workers")
    async def confirm(order: Order) -> None:
        pass

    @service.subscriber("orders", "pinned", partition=99)  # out of range of the default 16
    async def pinned(order: Order) -> None:
        pass

    @service.on_shutdown
    async def note() -> None:
        stopped.append("shutdown")

    with pytest.raises(ConfigurationError, match="partition 99 is out of range"):
        await service.start()
    assert not service.running and stopped == ["shutdown"]
