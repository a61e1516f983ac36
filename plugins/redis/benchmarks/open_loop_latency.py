"""End-to-end latency at a fixed offered rate, counted two ways: from the intended send time
(what the benchmark's open-loop cell counts) and from the start of the ``publish()`` call.

    MSGBROKER_REDIS__URL=redis://127.0.0.1:6379 .venv/bin/python plugins/redis/benchmarks/open_loop_latency.py \\
        [--partitions 64] [--messages 2000] [--rate 1000]

One process publishes open loop (``publish_batch`` of the messages due, then ``asyncio.sleep``
until the next is due) and one ordered subscriber of another connection records each message's
latency. It also prints how late the publisher started its calls: asyncio wakes a sleeping
task when the epoll wait ends (whole milliseconds, rounded up) or another event comes, so the
quieter the rest of the process, the later an open-loop publisher starts, and that lateness is
in the first figure but not in the second. Uses its own key prefix and deletes its keys.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import msgbroker
import redis.asyncio as aioredis
from msgbroker import Message, MessageContext


class Tick(Message):
    key: str
    seq: int
    due: int

    @property
    def partition_key(self) -> str:
        return self.key


def _percentiles(values: list[int]) -> str:
    values = sorted(values)
    pick = [values[min(len(values) - 1, int(len(values) * q))] / 1e3 for q in (0.5, 0.9, 0.99)]
    return "p50 {:.0f} / p90 {:.0f} / p99 {:.0f} us".format(*pick)


async def run(url: str, partitions: int, messages: int, rate: float) -> None:
    prefix = f"bench-openloop-{uuid.uuid4().hex[:8]}"
    topic = "ticks"
    from_due: list[int] = []
    from_call: list[int] = []
    late: list[int] = []
    started: dict[int, int] = {}
    done = asyncio.Event()

    def connect() -> msgbroker.Broker:
        return msgbroker.connect(url, partition_count=partitions, redis={"key_prefix": prefix})

    async def handle(ctx: MessageContext[Tick]) -> None:
        now = time.perf_counter_ns()
        seq = ctx.message.seq
        if seq >= 0:
            from_due.append(now - ctx.message.due)
            from_call.append(now - started[seq])
            if len(from_due) == messages:
                done.set()

    try:
        async with connect() as publisher, connect() as member:
            subscription = await member.subscribe(topic, "g", handle, ordered=True, message_type=Tick)
            while len(subscription.partitions) < partitions:  # noqa: ASYNC110 - no event says it
                await asyncio.sleep(0.05)
            for i in range(200):  # warm-up: every code path once, not measured
                await publisher.publish(topic, Tick(key=str(i), seq=-1, due=0))
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.3)
            interval = 1e9 / rate
            start = time.perf_counter_ns()
            published = 0
            while published < messages:
                now = time.perf_counter_ns()
                due = min(messages, int((now - start) / interval) + 1)
                if due > published:
                    batch = [Tick(key=str(s), seq=s, due=int(start + s * interval)) for s in range(published, due)]
                    call = time.perf_counter_ns()
                    late.append(call - batch[0].due)
                    for tick in batch:
                        started[tick.seq] = call
                    await publisher.publish_batch(topic, batch)
                    published = due
                else:
                    await asyncio.sleep((start + published * interval - now) / 1e9)
            await asyncio.wait_for(done.wait(), 30)
            await subscription.close()
    finally:
        raw = aioredis.Redis.from_url(url)
        try:
            async for key in raw.scan_iter(match=f"{prefix}:*", count=1000):
                await raw.delete(key)
        finally:
            await raw.aclose()
    print(f"{partitions} partitions, {messages} messages at {rate:,.0f} msg/s")
    print(f"  from the intended send time: {_percentiles(from_due)}")
    print(f"  from the publish() call:     {_percentiles(from_call)}")
    print(f"  publisher started late by:   {_percentiles(late)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0)
    args = parser.parse_args()
    url = os.environ.get("MSGBROKER_REDIS__URL", "redis://127.0.0.1:6379")
    asyncio.run(run(url, args.partitions, args.messages, args.rate))


if __name__ == "__main__":
    main()
