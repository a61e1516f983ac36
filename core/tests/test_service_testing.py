"""Testing support for users' own services (issue 19, deliverable 2, the row "unit-testing my own
handlers"): ``msgbroker.testing.run_in_memory`` and the ``msgbroker_run`` pytest fixture run a
service on its own in-memory broker, wait until everything settled, and say what was acked,
naked, delayed and dead-lettered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import msgbroker
import pytest
from msgbroker import Message, MessageContext
from msgbroker.testing import ServiceRun, run_in_memory


class Payment(Message):
    payment_id: int
    account: str
    amount: int

    @property
    def partition_key(self) -> str:
        return self.account


def payments_service() -> tuple[msgbroker.Service, list[int]]:
    """A service with each kind of outcome: amounts < 0 are refused (dead letter), 0 fails once
    (nak, then ack), 1 is delayed once, the rest are acked; receipts are published."""
    service = msgbroker.Service("redis://127.0.0.1:1", title="payments", max_retry_attempts=2, partition_count=8)
    receipts = service.publisher("receipts", Payment)
    handled: list[int] = []

    @service.subscriber("payments", "ledger")
    async def book(ctx: MessageContext[Payment]) -> None:
        payment = ctx.message
        handled.append(payment.payment_id)
        if payment.amount < 0:
            await ctx.nak(requeue=False, error="negative amount")
        elif payment.amount == 0 and ctx.delivery_attempt == 1:
            raise RuntimeError("ledger busy")
        elif payment.amount == 1 and ctx.delivery_attempt == 1:
            await ctx.delay(0.05)
        else:
            await receipts.publish(payment)

    @service.subscriber("receipts", "mailer")
    async def mail(receipt: Payment) -> None:
        pass

    return service, handled


async def test_run_in_memory_records_every_outcome_and_waits_until_settled() -> None:
    service, handled = payments_service()
    # the service names a Redis server that does not exist: the run never touches it
    async with run_in_memory(service, retry_delay=0) as run:
        assert run.broker.provider == "memory"
        assert run.broker.settings.partition_count == 8  # the service's own settings are kept
        await run.publish("payments", Payment(payment_id=1, account="a", amount=10))
        await run.publish("payments", Payment(payment_id=2, account="a", amount=-5))
        await run.publish("payments", Payment(payment_id=3, account="b", amount=0))
        await run.publish("payments", Payment(payment_id=4, account="c", amount=1))
        await run.settled()
        assert sorted(m.payment_id for m in run.messages("ack", topic="payments")) == [1, 3, 4]
        assert sorted(m.payment_id for m in run.messages("ack", topic="receipts")) == [1, 3, 4]
        (nak,) = run.naked
        assert nak.message.payment_id == 3 and isinstance(nak.error, RuntimeError)
        (delayed,) = run.delayed
        assert delayed.message.payment_id == 4 and delayed.delivery_attempt == 1
        (dead,) = run.dead_lettered
        assert dead.message.payment_id == 2 and dead.group == "ledger"
        (letter,) = await run.dead_letters("payments", "ledger")
        assert letter.error == "negative amount"
        assert await run.pending() == {("payments", "ledger"): 0, ("receipts", "mailer"): 0}
    assert sorted(handled) == [1, 2, 3, 3, 4, 4]
    assert not service.running


async def test_settled_says_what_is_left_when_it_times_out() -> None:
    service = msgbroker.Service(title="stuck")
    release = asyncio.Event()

    @service.subscriber("jobs", "workers")
    async def wait(ctx: MessageContext[Payment]) -> None:
        await release.wait()

    async with run_in_memory(service) as run:
        await run.publish("jobs", Payment(payment_id=1, account="a", amount=1))
        with pytest.raises(AssertionError, match=r"not settled after 0.3s: pending \{'jobs/workers': 1\}, "
                                                 r"1 handler\(s\) running"):
            await run.settled(timeout=0.3)
        release.set()
        await run.settled()
        assert len(run.acked) == 1


async def test_two_runs_at_once_see_only_their_own_settles() -> None:
    first, _ = payments_service()
    second, _ = payments_service()
    async with run_in_memory(first, retry_delay=0) as one, run_in_memory(second, retry_delay=0) as two:
        await one.publish("payments", Payment(payment_id=1, account="a", amount=10))
        await one.settled()
        await two.settled()
        assert len(one.acked) == 2  # the ledger's and the mailer's
        assert two.settles == []


async def test_the_msgbroker_run_fixture(msgbroker_run: Callable[..., Awaitable[ServiceRun]]) -> None:
    service, handled = payments_service()
    run = await msgbroker_run(service, retry_delay=0)
    await run.publish_batch("payments", [Payment(payment_id=i, account="x", amount=5) for i in range(10)])
    await run.settled()
    assert handled == list(range(10))  # one account: one partition, in order
    assert service.running  # stopped when the test ends


def test_the_fixture_is_a_pytest_plugin_of_the_distribution() -> None:
    import importlib.metadata

    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert plugins.get("msgbroker") == "msgbroker.pytest_plugin"


pytest_plugins = ["pytester"]


def test_a_users_test_file_uses_the_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user=f"""
        import msgbroker
        from msgbroker import Message

        class Order(Message):
            order_id: int

        service = msgbroker.Service(title="user-{uuid.uuid4().hex[:6]}")
        seen = []

        @service.subscriber("orders", "workers")
        async def handle(order: Order) -> None:
            if order.order_id < 0:
                raise ValueError("negative")
            seen.append(order.order_id)

        async def test_orders(msgbroker_run):
            run = await msgbroker_run(service, retry_delay=0, max_retry_attempts=1)
            await run.publish("orders", Order(order_id=1))
            await run.publish("orders", Order(order_id=-1))
            await run.settled()
            assert seen == [1]
            assert [s.message.order_id for s in run.dead_lettered] == [-1]
        """
    )
    result = pytester.runpytest("-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function", "-q")
    result.assert_outcomes(passed=1)
