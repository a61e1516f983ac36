"""The outbox, the relays and the inbox on the real PostgreSQL and on SQLite, with the in-memory
broker (one process): rollback and commit, per-key order with several relays, a dead relay's
buckets taken over, the inbox under redelivery, the relay inside a Service."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import msgbroker
import pytest
from msgbroker import ConfigurationError, InvalidNameError, MessageContext
from msgbroker_outbox import Inbox, Outbox, Relay, async_url, run_relay_in
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from tests.faults.model import FaultMessage, check


async def eventually(condition: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.02)


def effects_table(prefix: str) -> Table:
    """The business rows of the tests: one per handled (or written) message."""
    return Table(f"{prefix}_effects", MetaData(), Column("id", Integer, primary_key=True, autoincrement=True),
                 Column("key", String(50), nullable=False), Column("seq", Integer, nullable=False),
                 Column("message_id", String(64), nullable=False))


async def with_effects(engine: AsyncEngine, prefix: str) -> Table:
    table = effects_table(prefix)
    async with engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    return table


async def drop(engine: AsyncEngine, table: Table) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(table.metadata.drop_all)


def memory_url() -> str:
    return f"memory://outbox-{uuid.uuid4().hex[:8]}"


class Collector:
    """An ordered subscriber recording each handling as the fault suite's checker reads it."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    async def __call__(self, ctx: MessageContext[FaultMessage]) -> None:
        m = ctx.message
        self.records.append({"id": str(m.message_id), "key": m.key, "seq": m.seq, "attempt": ctx.delivery_attempt})

    def ids(self) -> set[str]:
        return {str(r["id"]) for r in self.records}


async def test_a_rolled_back_transaction_publishes_nothing_and_a_committed_one_once(
        engine: AsyncEngine, outbox: Outbox, prefix: str) -> None:
    effects = await with_effects(engine, prefix)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        rolled_back = FaultMessage(key="k", seq=0)
        with pytest.raises(RuntimeError, match="the hold failed"):
            async with sessions.begin() as session:
                await session.execute(effects.insert().values(key="k", seq=0, message_id=str(rolled_back.message_id)))
                await outbox.publish(session, "holds", rolled_back)
                raise RuntimeError("the hold failed")
        committed = FaultMessage(key="k", seq=1)
        async with engine.begin() as conn:  # an AsyncConnection works alike
            await conn.execute(effects.insert().values(key="k", seq=1, message_id=str(committed.message_id)))
            assert await outbox.publish(conn, "holds", committed, headers={"origin": "test"}) == str(
                committed.message_id)
        assert await outbox.unsent(engine) == 1
        seen: list[MessageContext[FaultMessage]] = []

        async def handle(ctx: MessageContext[FaultMessage]) -> None:
            seen.append(ctx)

        async with msgbroker.connect(memory_url(), partition_count=4) as broker:
            await broker.subscribe("holds", "g", handle)
            async with Relay(outbox, engine, broker, lease_ttl=2) as relay:
                await eventually(lambda: relay.moved == 1 and len(seen) == 1, "the committed message relayed")
                assert await outbox.unsent(engine) == 0
            assert await broker.pending_count("holds", "g") == 0
        assert [c.message.message_id for c in seen] == [committed.message_id]
        assert seen[0].headers.get("origin") == "test"
        async with engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(outbox.messages)) == 1  # kept, marked sent
            assert await conn.scalar(select(func.count()).select_from(outbox.messages)
                                     .where(outbox.messages.c.sent_at.is_(None))) == 0
    finally:
        await drop(engine, effects)


async def test_three_relays_keep_each_keys_order_while_one_dies_and_one_leaves(
        engine: AsyncEngine, outbox: Outbox, db_url: str) -> None:
    """Four writers commit 600 messages of 24 keys (each key's messages one after another, in
    transactions of 1 to 5) while three relays with their own connection pools move them; the
    first relay is aborted (a crash: its leases run out) and the second stopped mid-stream, and a
    fourth joins. Lost 0 and per-key order violations 0 by the fault suite's checker."""
    keys = [f"key-{i}" for i in range(24)]
    per_key = 25
    sent: list[FaultMessage] = []
    collector = Collector()
    engines = [create_async_engine(async_url(db_url)) for _ in range(4)]

    async def writer(mine: list[str]) -> None:
        rng = random.Random(mine[0])
        seq = dict.fromkeys(mine, 0)
        while any(s < per_key for s in seq.values()):
            key = rng.choice([k for k in mine if seq[k] < per_key])
            batch = [FaultMessage(key=key, seq=seq[key] + i) for i in range(min(rng.randint(1, 5), per_key - seq[key]))]
            async with engine.begin() as conn:
                await outbox.publish_batch(conn, "orders", batch)
            seq[key] += len(batch)
            sent.extend(batch)
            await asyncio.sleep(0)

    try:
        async with msgbroker.connect(memory_url(), partition_count=8) as broker:
            await broker.subscribe("orders", "g", collector)
            relays = [await Relay(outbox, engines[i], broker, relay_id=f"relay-{i}", lease_ttl=1.5,
                                  batch_size=20).start() for i in range(3)]
            writers = [asyncio.create_task(writer(keys[i::4])) for i in range(4)]
            await eventually(lambda: len(collector.records) >= 150, "a quarter handled")
            await relays[0].abort()  # a crash: its buckets wait for their leases to run out
            await eventually(lambda: len(collector.records) >= 300, "half handled")
            await relays[1].stop()   # a clean leave: its buckets are free at once
            relays.append(await Relay(outbox, engines[3], broker, relay_id="relay-3", lease_ttl=1.5,
                                      batch_size=20).start())
            await asyncio.gather(*writers)
            await eventually(lambda: {str(m.message_id) for m in sent} <= collector.ids(), "every message handled")

            async def shared_by_the_two_left() -> bool:  # in the database: who holds a live lease
                async with engine.connect() as conn:
                    owners = list((await conn.execute(select(outbox.leases.c.owner))).scalars())
                return set(owners) == {"relay-2", "relay-3"}

            await eventually(shared_by_the_two_left, "the two relays left share the buckets")
            for r in relays[2:]:
                await r.stop()
    finally:
        for e in engines:
            await e.dispose()
    verdict = check(sent, collector.records)
    assert not verdict.lost and not verdict.order_violations and not verdict.unexpected, verdict.summary()
    assert await outbox.unsent(engine) == 0


async def test_a_dead_relays_buckets_are_taken_over_after_its_lease(engine: AsyncEngine, outbox: Outbox) -> None:
    collector = Collector()
    async with msgbroker.connect(memory_url(), partition_count=4) as broker:
        await broker.subscribe("orders", "g", collector)
        first = await Relay(outbox, engine, broker, relay_id="first", lease_ttl=1.0).start()
        await eventually(lambda: len(first.held) == outbox.buckets, "the only relay holds every bucket")
        await first.abort()
        second = await Relay(outbox, engine, broker, relay_id="second", lease_ttl=1.0).start()
        messages = [FaultMessage(key=f"k{i % 5}", seq=i // 5) for i in range(50)]
        async with engine.begin() as conn:
            await outbox.publish_batch(conn, "orders", messages)
        await eventually(lambda: len(collector.records) == 50, "relayed by the second relay", timeout=15)

        async def all_taken_over() -> bool:
            async with engine.connect() as conn:
                return set((await conn.execute(select(outbox.leases.c.owner))).scalars()) == {"second"}

        await eventually(all_taken_over, "every bucket taken over by the second relay", timeout=15)
        await second.stop()
    async with engine.connect() as conn:
        owners = set((await conn.execute(select(outbox.leases.c.owner))).scalars())
    assert owners == {None}  # a stopped relay hands its buckets back
    verdict = check(messages, collector.records)
    assert not verdict.lost and not verdict.order_violations, verdict.summary()


async def test_the_inbox_applies_each_message_once_under_redelivery(
        engine: AsyncEngine, inbox: Inbox, prefix: str) -> None:
    """The handler writes its effect and the message id in one transaction, then fails once
    after the commit (as if the process died before the ack): the broker delivers it again and
    the inbox makes the second delivery change nothing."""
    effects = await with_effects(engine, prefix)
    sessions = async_sessionmaker(engine, class_=AsyncSession)
    attempts: list[int] = []

    async def handle(ctx: MessageContext[FaultMessage]) -> None:
        m = ctx.message
        async with sessions.begin() as session:
            if await inbox.claim(session, "effects", m):
                await session.execute(effects.insert().values(key=m.key, seq=m.seq, message_id=str(m.message_id)))
        attempts.append(ctx.delivery_attempt)
        if ctx.delivery_attempt == 1:
            raise RuntimeError("died after the commit, before the ack")

    messages = [FaultMessage(key=f"k{i % 3}", seq=i) for i in range(12)]
    try:
        async with msgbroker.connect(memory_url(), partition_count=4, retry_delay=0) as broker:
            await broker.subscribe("effects", "g", handle)
            await broker.publish_batch("effects", messages)
            await eventually(lambda: attempts.count(2) == 12, "each message delivered twice")
        # Two deliveries of one message at once: the second waits for the first and does nothing.
        twice = FaultMessage(key="k", seq=99)

        async def once() -> bool:
            async with sessions.begin() as session:
                first = await inbox.claim(session, "effects", twice)
                if first:
                    await session.execute(effects.insert().values(key="k", seq=99, message_id=str(twice.message_id)))
                    await asyncio.sleep(0.05)
                return first

        if engine.dialect.name == "postgresql":
            results = await asyncio.gather(once(), once())
        else:  # SQLite allows one writer at a time: the second claims after the first committed
            results = [await once(), await once()]
        assert sorted(results) == [False, True]
        async with engine.begin() as conn:
            assert await inbox.claim(conn, "other-consumer", twice)  # per consumer
        async with engine.connect() as conn:
            rows = (await conn.execute(select(effects.c.message_id, func.count()).group_by(effects.c.message_id))).all()
        assert len(rows) == 13 and {count for _, count in rows} == {1}
    finally:
        await drop(engine, effects)


async def test_the_relay_runs_inside_a_service(engine: AsyncEngine, outbox: Outbox) -> None:
    service = msgbroker.Service(title="outbox-test", version="1")
    got: list[FaultMessage] = []

    @service.subscriber("holds", "g")
    async def handle(message: FaultMessage) -> None:
        got.append(message)

    run_relay_in(service, outbox, engine, lease_ttl=2)
    async with msgbroker.connect(memory_url(), partition_count=4) as broker:
        await service.start(broker)
        try:
            async with engine.begin() as conn:
                await outbox.publish(conn, "holds", FaultMessage(key="a", seq=0))
            await eventually(lambda: len(got) == 1, "relayed inside the service and handled")
        finally:
            await service.stop()
    async with engine.connect() as conn:
        assert set((await conn.execute(select(outbox.leases.c.owner))).scalars()) == {None}


async def test_on_postgresql_a_commit_wakes_the_relay_at_once(postgres_url: str, prefix: str) -> None:
    """The outbox table's trigger notifies at commit and the relay LISTENs, so a commit ends its
    wait (``Relay.notified`` counts them) — also after the LISTEN connection was lost (PostgreSQL
    ends it here; the relay makes it again at its next heartbeat)."""
    engine = create_async_engine(async_url(postgres_url))
    outbox = Outbox(prefix=prefix, buckets=4)
    await outbox.create_tables(engine)
    collector = Collector()
    try:
        async with msgbroker.connect(memory_url(), partition_count=4) as broker:
            await broker.subscribe("holds", "g", collector)
            async with Relay(outbox, engine, broker, lease_ttl=1.5, poll_interval=30) as relay:
                await eventually(lambda: relay._listening is not None, "the relay listens")
                for seq in range(3):
                    before = relay.notified
                    async with engine.begin() as conn:
                        await outbox.publish(conn, "holds", FaultMessage(key="a", seq=seq))
                    await eventually(lambda b=before: relay.notified > b, "the commit notified", timeout=5)
                    await eventually(lambda s=seq: len(collector.records) == s + 1, "relayed", timeout=5)
                    if seq == 1:  # the server ends the LISTEN connection
                        lost = relay._listening
                        async with engine.connect() as conn:
                            await conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"))
                        await eventually(lambda lost=lost: relay._listening not in (None, lost), "listening again")
    finally:
        await outbox.drop_tables(engine)
        await engine.dispose()


async def test_bad_input_is_refused_naming_it(engine: AsyncEngine, outbox: Outbox) -> None:
    async with engine.begin() as conn:
        with pytest.raises(InvalidNameError, match="'bad topic'"):
            await outbox.publish(conn, "bad topic", FaultMessage(key="a", seq=0))
        with pytest.raises(InvalidNameError, match="invalid header 'x'"):
            await outbox.publish(conn, "t", FaultMessage(key="a", seq=0), headers={"x": 1})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match="'Bad-Prefix'"):
        Outbox(prefix="Bad-Prefix")
    with pytest.raises(ConfigurationError, match=r"buckets .* got 0"):
        Outbox(buckets=0)
    with pytest.raises(ConfigurationError, match="no scheme"):
        async_url("outbox.db")
    async with msgbroker.connect(memory_url()) as broker:
        other = Outbox(prefix=outbox.prefix, buckets=64)  # the writers made 16
        with pytest.raises(ConfigurationError, match=r"has 16 bucket\(s\), the relay was given buckets=64"):
            await Relay(other, engine, broker).start()
