"""The outbox suite: the correctness cases of the outbox, the relays and the inbox, against a
database of yours, with the in-memory broker (no broker server). Subclass :class:`OutboxSuite`
in a test module of yours (its name starting with ``Test``) and give it the database::

    from msgbroker_outbox.testing import OutboxSuite

    class TestMyDatabaseOutbox(OutboxSuite):
        database_url = "mysql+asyncmy://app:secret@127.0.0.1/outbox_test"

Each case makes tables of a prefix of its own and drops them afterwards. Needs pytest
(``pip install 'msgbroker-outbox[testing]'``); the cases are plain functions (each runs its own
event loop), so no asyncio plugin is needed. docs/outbox.md, "Another database", says what each
case checks.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgbroker
import pytest
from msgbroker import ConfigurationError, InvalidNameError, Message, MessageContext
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from ._adapter import DatabaseAdapter
from ._outbox import Inbox, Outbox, async_url
from ._relay import Relay, run_relay_in

__all__ = [
    "Handlings",
    "OrderVerdict",
    "OutboxCase",
    "OutboxSuite",
    "SuiteMessage",
    "check_order",
    "eventually",
    "memory_url",
]


class SuiteMessage(Message):
    """The message the suite writes: the ``seq``-th message of partition key ``key``."""

    key: str
    seq: int

    @property
    def partition_key(self) -> str:
        return self.key


@dataclass
class OrderVerdict:
    """What :func:`check_order` found."""

    published: int
    handled: int
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicates: int = 0
    order_violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing unexpected, every key's first handlings in order (duplicates are legal)."""
        return not self.lost and not self.unexpected and not self.order_violations

    def summary(self) -> str:
        return (f"published={self.published} handled={self.handled} lost={len(self.lost)} "
                f"duplicates={self.duplicates} unexpected={len(self.unexpected)} "
                f"order_violations={len(self.order_violations)} {self.order_violations[:3]}")


def check_order(published: list[SuiteMessage], records: list[dict[str, Any]]) -> OrderVerdict:
    """Every message committed was handled, and the first handlings of each key's messages came in
    the order they were committed (``published``, in commit order). A redelivery (the same id
    again) is a duplicate — at least once allows it — never an order violation."""
    sent = {str(m.message_id): m for m in published}
    counts = Counter(str(r["id"]) for r in records)
    verdict = OrderVerdict(published=len(sent), handled=len(counts), lost=sorted(set(sent) - set(counts)),
                           unexpected=sorted(set(counts) - set(sent)),
                           duplicates=sum(c - 1 for c in counts.values()))
    order: dict[str, list[int]] = defaultdict(list)
    for message in published:
        order[message.key].append(message.seq)
    position: dict[str, int] = defaultdict(int)
    first: set[str] = set()
    for record in records:
        rid = str(record["id"])
        if rid in first or rid not in sent:
            continue
        first.add(rid)
        key, seq = str(record["key"]), int(record["seq"])
        wanted = order[key][position[key]] if position[key] < len(order[key]) else None
        if seq != wanted:
            verdict.order_violations.append(f"key {key}: first handling of seq {seq}, expected {wanted}")
        position[key] += 1
    return verdict


class Handlings:
    """A subscriber recording each handling (id, key, seq, delivery attempt) in order."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def __call__(self, ctx: MessageContext[SuiteMessage]) -> None:
        m = ctx.message
        self.records.append({"id": str(m.message_id), "key": m.key, "seq": m.seq, "attempt": ctx.delivery_attempt})

    def ids(self) -> set[str]:
        return {str(r["id"]) for r in self.records}


@dataclass
class _Claim:
    buckets: frozenset[int]
    start: float  # monotonic: the lease transaction committed
    end: float    # monotonic: the next successful one began, the relay left, or the lease ran out


class _WatchedRelay(Relay):
    """A relay that records, after each lease transaction, which buckets it may publish and when."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claims: list[_Claim] = []

    async def _heartbeat(self) -> None:
        started = time.monotonic()
        await super()._heartbeat()  # a failed one changes nothing: the relay goes on with what it had
        if self.claims:
            self.claims[-1].end = min(self.claims[-1].end, started)
        self.claims.append(_Claim(frozenset(self.held), time.monotonic(), self._valid_until))

    async def beat(self) -> None:
        """A lease transaction now, beside the relay's own heartbeats."""
        await self._heartbeat()

    async def _release(self, buckets: Any, *, leave: bool = False) -> None:
        if leave and self.claims:
            self.claims[-1].end = min(self.claims[-1].end, time.monotonic())
        await super()._release(buckets, leave=leave)


def _double_owners(relays: list[_WatchedRelay]) -> list[str]:
    """Buckets two relays could publish at the same moment, each as a sentence."""
    by_bucket: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for relay in relays:
        for claim in relay.claims:
            for bucket in claim.buckets:
                by_bucket[bucket].append((claim.start, claim.end, relay.relay_id))
    found: list[str] = []
    for bucket, spans in sorted(by_bucket.items()):
        for i, (start_a, end_a, a) in enumerate(spans):
            for start_b, end_b, b in spans[i + 1:]:
                if a != b and start_a < end_b and start_b < end_a:
                    found.append(f"bucket {bucket} held by {a} and {b} at once for "
                                 f"{min(end_a, end_b) - max(start_a, start_b):.3f} s")
    return found


async def eventually(condition: Callable[[], Awaitable[bool] | bool], what: str, timeout: float) -> None:
    """Wait until ``condition()`` (sync or async) is true; an ``AssertionError`` naming ``what`` after ``timeout`` s."""
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


@dataclass
class OutboxCase:
    """What a case works with: the suite's engine, the outbox and inbox of the case's own prefix."""

    suite: OutboxSuite
    engine: AsyncEngine
    adapter: DatabaseAdapter
    prefix: str
    outbox: Outbox
    inbox: Inbox
    _engines: list[AsyncEngine] = field(default_factory=list)
    _tables: list[Table] = field(default_factory=list)

    def new_engine(self) -> AsyncEngine:
        """Another engine (its own connection pool) on the database, disposed after the case."""
        made = self.suite.make_engine()
        self._engines.append(made)
        return made

    async def effects_table(self) -> Table:
        """The business rows of a case: one per handled (or written) message, dropped after the case."""
        table = Table(f"{self.prefix}_effects", MetaData(),
                      Column("id", Integer, primary_key=True, autoincrement=True),
                      Column("key", String(50), nullable=False), Column("seq", Integer, nullable=False),
                      Column("message_id", String(64), nullable=False))
        async with self.engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
        self._tables.append(table)
        return table

    async def eventually(self, condition: Callable[[], Awaitable[bool] | bool], what: str,
                         timeout: float | None = None) -> None:
        await eventually(condition, what, timeout or self.suite.timeout)

    async def owners(self) -> set[str | None]:
        """The owners of the buckets' leases, in the database."""
        async with self.engine.connect() as conn:
            return set((await conn.execute(select(self.outbox.leases.c.owner))).scalars())


def memory_url() -> str:
    """An in-memory broker of its own (no server)."""
    return f"memory://outbox-suite-{uuid.uuid4().hex[:8]}"


CaseBody = Callable[["OutboxSuite", OutboxCase], Awaitable[None]]


def _case(body: CaseBody) -> Callable[[OutboxSuite], None]:
    # Not functools.wraps: pytest would read the body's signature and look for a fixture `c`.
    def run(self: OutboxSuite) -> None:
        asyncio.run(self.run_case(body))

    run.__name__, run.__qualname__, run.__doc__ = body.__name__, body.__qualname__, body.__doc__
    return run


class OutboxSuite:
    """The outbox's correctness cases against one database. Set :attr:`database_url` (or override
    :meth:`make_engine`); :attr:`adapter` when it is not the one registered for the dialect."""

    database_url: ClassVar[str] = ""
    """The database: ``postgresql://…``, ``sqlite:///PATH`` or an SQLAlchemy URL with an asyncio driver."""

    adapter: ClassVar[DatabaseAdapter | None] = None
    """The adapter to check; None: the one registered for the engine's dialect."""

    buckets: ClassVar[int] = 16
    """The outbox's buckets in the cases."""

    clock_tolerance: ClassVar[float] = 30.0
    """How far (seconds) the database's clock may be from this machine's."""

    timeout: ClassVar[float] = 30.0
    """The bound (seconds) of each wait of a case (raise it for a slow database)."""

    def make_engine(self) -> AsyncEngine:
        """An engine on the database under test (a case makes several: one pool per relay)."""
        if not self.database_url:
            raise ConfigurationError(f"{type(self).__name__}: set database_url or override make_engine()")
        return create_async_engine(async_url(self.database_url))

    async def run_case(self, body: CaseBody) -> None:
        """Run one case with tables of its own prefix, dropped afterwards."""
        prefix = f"s{uuid.uuid4().hex[:10]}"
        engine = self.make_engine()
        outbox = Outbox(prefix=prefix, buckets=self.buckets, adapter=self.adapter)
        inbox = Inbox(prefix=prefix, adapter=self.adapter)
        c = OutboxCase(self, engine, outbox.adapter_for(engine), prefix, outbox, inbox)
        try:
            await outbox.create_tables(engine)
            await inbox.create_tables(engine)
            await body(self, c)
        finally:
            try:
                await outbox.drop_tables(engine)
                async with engine.begin() as conn:
                    await conn.run_sync(inbox.metadata.drop_all)
                    for table in c._tables:
                        await conn.run_sync(table.metadata.drop_all)
            finally:
                for made in [*c._engines, engine]:
                    await made.dispose()

    # -- the cases

    @_case
    async def test_a_rolled_back_transaction_publishes_nothing_and_a_committed_one_once(
            self, c: OutboxCase) -> None:
        """A message written in a transaction that rolls back is never published; one written in a
        transaction that commits (through an ``AsyncSession`` or an ``AsyncConnection``) is
        published once, with its headers, and marked sent."""
        effects = await c.effects_table()
        sessions = async_sessionmaker(c.engine, expire_on_commit=False)
        rolled_back = SuiteMessage(key="k", seq=0)
        with pytest.raises(RuntimeError, match="the hold failed"):
            async with sessions.begin() as session:
                await session.execute(effects.insert().values(key="k", seq=0, message_id=str(rolled_back.message_id)))
                await c.outbox.publish(session, "holds", rolled_back)
                raise RuntimeError("the hold failed")
        committed = SuiteMessage(key="k", seq=1)
        async with c.engine.begin() as conn:
            await conn.execute(effects.insert().values(key="k", seq=1, message_id=str(committed.message_id)))
            assert await c.outbox.publish(conn, "holds", committed, headers={"origin": "suite"}) == str(
                committed.message_id), "publish must return the message id"
        assert await c.outbox.unsent(c.engine) == 1, "one committed message waits, the rolled-back one is not there"
        seen: list[MessageContext[SuiteMessage]] = []

        async def handle(ctx: MessageContext[SuiteMessage]) -> None:
            seen.append(ctx)

        async with msgbroker.connect(memory_url(), partition_count=4) as broker:
            await broker.subscribe("holds", "g", handle)
            async with Relay(c.outbox, c.engine, broker, lease_ttl=2) as relay:
                await c.eventually(lambda: relay.moved == 1 and len(seen) == 1, "the committed message relayed")
                assert await c.outbox.unsent(c.engine) == 0, "the relayed message is still unsent"
            await asyncio.sleep(0.2)  # a second publish would show here
        assert [ctx.message.message_id for ctx in seen] == [committed.message_id], (
            f"expected the committed message once, handled {[str(ctx.message.message_id) for ctx in seen]}")
        assert seen[0].headers.get("origin") == "suite", "the message's headers were lost"
        async with c.engine.connect() as conn:
            rows = await conn.scalar(select(func.count()).select_from(c.outbox.messages))
            unsent = await conn.scalar(select(func.count()).select_from(c.outbox.messages)
                                       .where(c.outbox.messages.c.sent_at.is_(None)))
        assert (rows, unsent) == (1, 0), (
            f"expected the one row kept and marked sent, got {rows} row(s), {unsent} unsent")

    @_case
    async def test_relays_keep_each_keys_order_while_one_dies_and_one_leaves(self, c: OutboxCase) -> None:
        """Four writers commit 600 messages of 24 keys (each key's one after another, 1 to 5 per
        transaction) while three relays with their own connection pools move them; the first
        relay is aborted (a crash: its leases run out), the second stopped, a fourth joins.
        Nothing lost, each key's first handlings in commit order, and the two relays left share
        the buckets."""
        keys = [f"key-{i}" for i in range(24)]
        per_key = 25
        sent: list[SuiteMessage] = []
        handled = Handlings()
        engines = [c.new_engine() for _ in range(4)]

        async def writer(mine: list[str]) -> None:
            rng = random.Random(mine[0])
            seq = dict.fromkeys(mine, 0)
            while any(s < per_key for s in seq.values()):
                key = rng.choice([k for k in mine if seq[k] < per_key])
                batch = [SuiteMessage(key=key, seq=seq[key] + i)
                         for i in range(min(rng.randint(1, 5), per_key - seq[key]))]
                async with c.engine.begin() as conn:
                    await c.outbox.publish_batch(conn, "orders", batch)
                seq[key] += len(batch)
                sent.extend(batch)
                await asyncio.sleep(0)

        async with msgbroker.connect(memory_url(), partition_count=8) as broker:
            await broker.subscribe("orders", "g", handled)
            relays = [await Relay(c.outbox, engines[i], broker, relay_id=f"relay-{i}", lease_ttl=1.5,
                                  batch_size=20).start() for i in range(3)]
            writers = [asyncio.create_task(writer(keys[i::4])) for i in range(4)]
            try:
                await c.eventually(lambda: len(handled.records) >= 150, "a quarter handled")
                await relays[0].abort()  # a crash: its buckets wait for their leases to run out
                await c.eventually(lambda: len(handled.records) >= 300, "half handled")
                await relays[1].stop()   # a clean leave: its buckets are free at once
                relays.append(await Relay(c.outbox, engines[3], broker, relay_id="relay-3", lease_ttl=1.5,
                                          batch_size=20).start())
                await asyncio.gather(*writers)
                await c.eventually(lambda: {str(m.message_id) for m in sent} <= handled.ids(),
                                   "every committed message handled")
                await c.eventually(lambda: _is(c.owners(), {"relay-2", "relay-3"}),
                                   "the two relays left share the buckets")
            finally:
                for task in writers:
                    task.cancel()
                for r in relays[2:]:
                    await r.stop()
        verdict = check_order(sent, handled.records)
        assert verdict.ok, verdict.summary()
        assert await c.outbox.unsent(c.engine) == 0, "messages left unsent"

    @_case
    async def test_a_dead_relays_buckets_are_taken_over_after_its_lease(self, c: OutboxCase) -> None:
        """A relay holding every bucket dies (its leases are left to run out); another relay takes
        every bucket over and moves the messages in order; stopped, it hands them all back."""
        handled = Handlings()
        async with msgbroker.connect(memory_url(), partition_count=4) as broker:
            await broker.subscribe("orders", "g", handled)
            first = await Relay(c.outbox, c.engine, broker, relay_id="first", lease_ttl=1.0).start()
            await c.eventually(lambda: len(first.held) == c.outbox.buckets, "the only relay holds every bucket")
            await first.abort()
            second = await Relay(c.outbox, c.engine, broker, relay_id="second", lease_ttl=1.0).start()
            messages = [SuiteMessage(key=f"k{i % 5}", seq=i // 5) for i in range(50)]
            async with c.engine.begin() as conn:
                await c.outbox.publish_batch(conn, "orders", messages)
            await c.eventually(lambda: len(handled.records) >= 50, "relayed by the second relay")
            await c.eventually(lambda: _is(c.owners(), {"second"}), "every bucket taken over by the second relay")
            await second.stop()
        owners = await c.owners()
        assert owners == {None}, f"a stopped relay hands its buckets back; the leases name {owners}"
        verdict = check_order(messages, handled.records)
        assert verdict.ok, verdict.summary()

    @_case
    async def test_the_inbox_applies_each_message_once_under_redelivery(self, c: OutboxCase) -> None:
        """The handler claims the message in the inbox and writes its effect in one transaction,
        then fails after the commit (as if it died before the ack): the redelivery changes
        nothing. Two claims of one message at once (one after the other on a single-writer
        database): one True, one False. Claims are per consumer."""
        effects = await c.effects_table()
        sessions = async_sessionmaker(c.engine, class_=AsyncSession)
        attempts: list[int] = []

        async def handle(ctx: MessageContext[SuiteMessage]) -> None:
            m = ctx.message
            async with sessions.begin() as session:
                if await c.inbox.claim(session, "effects", m):
                    await session.execute(effects.insert().values(key=m.key, seq=m.seq, message_id=str(m.message_id)))
            attempts.append(ctx.delivery_attempt)
            if ctx.delivery_attempt == 1:
                raise RuntimeError("died after the commit, before the ack")

        messages = [SuiteMessage(key=f"k{i % 3}", seq=i) for i in range(12)]
        async with msgbroker.connect(memory_url(), partition_count=4, retry_delay=0) as broker:
            await broker.subscribe("effects", "g", handle)
            await broker.publish_batch("effects", messages)
            await c.eventually(lambda: attempts.count(2) == 12, "each message delivered twice")
        twice = SuiteMessage(key="k", seq=99)

        async def once() -> bool:
            async with sessions.begin() as session:
                first = await c.inbox.claim(session, "effects", twice)
                if first:
                    await session.execute(effects.insert().values(key="k", seq=99, message_id=str(twice.message_id)))
                    await asyncio.sleep(0.05)
                return first

        if c.adapter.concurrent_writers:
            results = list(await asyncio.gather(once(), once()))
        else:
            results = [await once(), await once()]
        assert sorted(results) == [False, True], f"two claims of one message gave {results}, expected one True"
        async with c.engine.begin() as conn:
            assert await c.inbox.claim(conn, "other-consumer", twice), "a claim is per consumer"
        async with c.engine.connect() as conn:
            rows = (await conn.execute(select(effects.c.message_id, func.count())
                                       .group_by(effects.c.message_id))).all()
        applied = Counter({str(mid): int(n) for mid, n in rows})
        twice_applied = {mid: n for mid, n in applied.items() if n > 1}
        assert len(applied) == 13 and not twice_applied, (
            f"expected 13 messages applied once each, got {len(applied)} applied, twice or more: {twice_applied}")

    @_case
    async def test_the_relay_runs_inside_a_service(self, c: OutboxCase) -> None:
        """``run_relay_in``: the relay starts with the service, relays a committed message to its
        subscriber, and hands its buckets back when the service stops."""
        service = msgbroker.Service(title="outbox-suite", version="1")
        got: list[SuiteMessage] = []

        @service.subscriber("holds", "g")
        async def handle(message: SuiteMessage) -> None:
            got.append(message)

        run_relay_in(service, c.outbox, c.engine, lease_ttl=2)
        async with msgbroker.connect(memory_url(), partition_count=4) as broker:
            await service.start(broker)
            try:
                async with c.engine.begin() as conn:
                    await c.outbox.publish(conn, "holds", SuiteMessage(key="a", seq=0))
                await c.eventually(lambda: len(got) == 1, "relayed inside the service and handled")
            finally:
                await service.stop()
        owners = await c.owners()
        assert owners == {None}, f"the service stopped, the leases still name {owners}"

    @_case
    async def test_bad_input_is_refused_naming_it(self, c: OutboxCase) -> None:
        """A bad topic, header, prefix, bucket count or URL is refused naming it; a relay given
        other ``buckets`` than the outbox's tables is refused naming both."""
        async with c.engine.begin() as conn:
            with pytest.raises(InvalidNameError, match="'bad topic'"):
                await c.outbox.publish(conn, "bad topic", SuiteMessage(key="a", seq=0))
            with pytest.raises(InvalidNameError, match="invalid header 'x'"):
                await c.outbox.publish(conn, "t", SuiteMessage(key="a", seq=0), headers={"x": 1})  # type: ignore[dict-item]
        with pytest.raises(ConfigurationError, match="'Bad-Prefix'"):
            Outbox(prefix="Bad-Prefix")
        with pytest.raises(ConfigurationError, match=r"buckets .* got 0"):
            Outbox(buckets=0)
        with pytest.raises(ConfigurationError, match="no scheme"):
            async_url("outbox.db")
        assert await c.outbox.unsent(c.engine) == 0, "a refused message was written"
        async with msgbroker.connect(memory_url()) as broker:
            other = Outbox(prefix=c.prefix, buckets=c.outbox.buckets * 4, adapter=self.adapter)
            with pytest.raises(ConfigurationError, match=rf"has {c.outbox.buckets} bucket\(s\), "
                                                         rf"the relay was given buckets={other.buckets}"):
                await Relay(other, c.engine, broker).start()

    @_case
    async def test_the_database_clock_is_close_to_this_machines_and_runs_in_seconds(self, c: OutboxCase) -> None:
        """The adapter's clock (leases are compared on it): epoch seconds within ``clock_tolerance``
        of this machine's clock, read anew by each statement, advancing as fast as this machine's."""
        clock = select(c.adapter.clock())
        async with c.engine.connect() as conn:
            local_before = time.time()
            first = float(await conn.scalar(clock) or 0.0)
            local_after, started = time.time(), time.monotonic()
            await asyncio.sleep(0.5)
            second = float(await conn.scalar(clock) or 0.0)
            elapsed = time.monotonic() - started
        skew = first - (local_before + local_after) / 2
        assert abs(skew) <= self.clock_tolerance, (
            f"the database clock reads {first:.3f}, this machine {local_before:.3f}: {skew:+.1f} s apart "
            f"(clock_tolerance {self.clock_tolerance} s); is it epoch seconds, in UTC?")
        advanced = second - first
        assert 0.5 * elapsed <= advanced <= elapsed + 1.0, (
            f"the database clock advanced {advanced:.3f} s while {elapsed:.3f} s passed here "
            "(it must be read anew by each statement, in seconds)")

    @_case
    async def test_two_relays_never_own_one_bucket(self, c: OutboxCase) -> None:
        """The adapter's lease serialisation: five relays with their own connection pools start
        at once, then for four seconds one leaves and a new one joins every 0.3 s (each join and
        leave moves buckets), and after each such change every live relay runs a lease
        transaction at the same moment (as their heartbeats can meet); after every lease
        transaction each relay records the buckets it may publish until its next one. No bucket
        may be held by two relays at the same moment, and every bucket is held in the end."""
        relays: list[_WatchedRelay] = []
        rng = random.Random(c.prefix)
        joined = 0

        async def join() -> _WatchedRelay:
            nonlocal joined
            joined += 1
            relay = _WatchedRelay(c.outbox, c.new_engine(), broker, relay_id=f"relay-{joined}", lease_ttl=1.0,
                                  listen=False)
            relays.append(relay)
            return await relay.start()

        async with msgbroker.connect(memory_url(), partition_count=4) as broker:
            live = list(await asyncio.gather(*(join() for _ in range(5))))
            try:
                deadline = time.monotonic() + 4.0
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.3)
                    leaving = live.pop(rng.randrange(len(live)))
                    live.append(await join())
                    await leaving.stop()
                    # the buckets just freed or due to move, taken by transactions that meet:
                    # only the adapter's lease lock keeps two of them from taking one bucket
                    await asyncio.gather(*(relay.beat() for relay in live), return_exceptions=True)
                await c.eventually(lambda: sum(len(r.held) for r in live) == c.outbox.buckets,
                                   "the live relays hold every bucket")
            finally:
                for relay in live:
                    await relay.stop()
        doubles = _double_owners(relays)
        assert not doubles, f"{len(doubles)} time(s) two relays held one bucket: {doubles[:5]}"


async def _is(value: Awaitable[set[str | None]], wanted: set[str | None]) -> bool:
    return await value == wanted
