"""What the outbox costs beside publishing directly: writes, relay throughput and latency.

    set -a; . .brokers/env; set +a
    .venv/bin/python plugins/outbox/benchmarks/relay_throughput.py \
        [--messages 5000] [--database postgres|sqlite] [--batch-size 500]

On the Redis of ``scripts/brokers up redis`` (``MSGBROKER_REDIS__URL``) and the PostgreSQL of
``scripts/brokers up postgres`` (``MSGBROKER_TEST_POSTGRES_URL``) or a SQLite file in /tmp's
place (``tempfile``), each figure in messages a second (~70 B messages, 100 keys):

* direct publish: ``broker.publish`` one at a time, and ``publish_batch`` of 100;
* outbox write: ``outbox.publish`` in a transaction of its own per message (the usual case: one
  business write and its message), and ``publish_batch`` of 100 in one transaction;
* relay: a backlog of ``--messages`` committed messages moved to the broker by one relay and by
  two relays (two Relay objects with their own connection pools, in this process), until nothing
  is unsent;
* latency: commit to handler, 300 messages committed one at a time, 10 ms apart, one relay
  (``poll_interval`` 0.1 s, the default) — median and p99.

Tables of a prefix of the run's own, dropped afterwards. Ratios from one run are what to compare:
the machine's other load moves absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import msgbroker
from msgbroker import Message, MessageContext
from msgbroker.testing import eventually
from msgbroker_outbox import Outbox, Relay, async_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


class Seat(Message):
    key: str
    seq: int
    sent_at: float = 0.0

    @property
    def partition_key(self) -> str:
        return self.key


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}"


async def wait_unsent_zero(outbox: Outbox, engine: AsyncEngine) -> None:
    async def nothing_unsent() -> bool:
        return await outbox.unsent(engine) == 0

    await eventually(nothing_unsent, timeout=600, what="the backlog relayed", interval=0.01)


async def run(args: argparse.Namespace) -> None:
    redis_url = os.environ["MSGBROKER_REDIS__URL"]
    if args.database == "postgres":
        db_url = os.environ["MSGBROKER_TEST_POSTGRES_URL"]
    else:
        db_url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'outbox.db'}"
    n = args.messages
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    engines = [create_async_engine(async_url(db_url)) for _ in range(2)]
    outbox = Outbox(prefix=prefix, buckets=64)
    await outbox.create_tables(engines[0])
    rows: list[tuple[str, str]] = []
    topic = f"bench-outbox-{uuid.uuid4().hex[:8]}"
    try:
        async with msgbroker.connect(redis_url, partition_count=64) as broker:
            seats = [Seat(key=f"k{i % 100}", seq=i) for i in range(n)]
            t = time.perf_counter()
            for s in seats[: n // 2]:
                await broker.publish(topic, s)
            rows.append(("direct publish, one at a time", rate(n // 2, time.perf_counter() - t)))
            t = time.perf_counter()
            for i in range(0, n, 100):
                await broker.publish_batch(topic, seats[i:i + 100])
            rows.append(("direct publish_batch of 100", rate(n, time.perf_counter() - t)))

            engine = engines[0]
            t = time.perf_counter()
            for s in seats[: n // 2]:
                async with engine.begin() as conn:
                    await outbox.publish(conn, topic, s)
            rows.append(("outbox write, one message per transaction", rate(n // 2, time.perf_counter() - t)))
            t = time.perf_counter()
            for i in range(0, n, 100):
                async with engine.begin() as conn:
                    await outbox.publish_batch(conn, topic, seats[i:i + 100])
            rows.append(("outbox write, publish_batch of 100 per transaction", rate(n, time.perf_counter() - t)))
            backlog = n // 2 + n

            for relays in (1, 2):
                if relays == 2:
                    for i in range(0, n, 100):
                        async with engine.begin() as conn:
                            await outbox.publish_batch(conn, topic, seats[i:i + 100])
                    backlog = n
                t = time.perf_counter()
                workers = [await Relay(outbox, engines[i], broker, batch_size=args.batch_size).start()
                           for i in range(relays)]
                await wait_unsent_zero(outbox, engine)
                took = time.perf_counter() - t
                for w in workers:
                    await w.stop()
                rows.append((f"relay, {relays} relay(s), backlog of {backlog:,} (batch_size {args.batch_size})",
                             rate(backlog, took)))

            latencies: list[float] = []
            done = asyncio.Event()

            async def handle(ctx: MessageContext[Seat]) -> None:
                latencies.append(time.time() - ctx.message.sent_at)
                if len(latencies) == 300:
                    done.set()

            latency_topic = f"{topic}-latency"
            await broker.subscribe(latency_topic, "g", handle)
            async with Relay(outbox, engines[1], broker):
                for i in range(300):
                    async with engine.begin() as conn:
                        await outbox.publish(conn, latency_topic, Seat(key=f"k{i % 100}", seq=i, sent_at=time.time()))
                    await asyncio.sleep(0.01)
                await asyncio.wait_for(done.wait(), 60)
            ms = sorted(x * 1000 for x in latencies)
            rows.append(("latency commit -> handler, p50 / p99 (ms)",
                         f"{statistics.median(ms):.1f} / {ms[int(len(ms) * 0.99) - 1]:.1f}"))
    finally:
        async with engines[0].begin() as conn:
            await conn.run_sync(outbox.metadata.drop_all)
        for e in engines:
            await e.dispose()
    print(f"outbox on {args.database}, Redis broker, {n:,} messages")
    print("| what | msg/s |")
    print("|---|---:|")
    for what, value in rows:
        print(f"| {what} | {value} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--batch-size", type=int, default=500, help="the relays' batch_size (default 500)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
