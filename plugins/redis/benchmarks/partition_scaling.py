"""What a Redis subscriber costs as the partition count grows: drain, latency and idle cost.

    set -a; . .brokers/env; set +a
    .venv/bin/python plugins/redis/benchmarks/partition_scaling.py [--messages 20000] [--rounds 2] 64 256 1024

Per partition count, interleaved over the rounds (A B C A B C): a backlog of ``--messages``
messages (~60 B, 1,000 keys) published with ``publish_batch`` of 500, then drained by one
ordered subscriber with one worker — wall time and the client's CPU per message (the process's
CPU time while draining / messages); the CPU the idle subscriber takes over 3 s afterwards; and
the end-to-end latency (publish → handler) of 1,000 messages published one at a time, 5 ms
apart. Every run uses its own key prefix and deletes its keys afterwards. Report ratios
measured in one run: the machine's other load moves absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import msgbroker
import redis.asyncio as aioredis
from msgbroker import Message, MessageContext


class Seat(Message):
    key: str
    sent: float = 0.0

    @property
    def partition_key(self) -> str:
        return self.key


async def _cleanup(url: str, prefix: str) -> None:
    raw = aioredis.Redis.from_url(url)
    try:
        async for key in raw.scan_iter(match=f"{prefix}:*", count=1000):
            await raw.delete(key)
    finally:
        await raw.aclose()


async def drain(url: str, partitions: int, messages: int) -> tuple[float, float, float]:
    """(seconds, client CPU µs per message, idle CPU % of a core)."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        async with msgbroker.connect(url, partition_count=partitions, redis={"key_prefix": prefix}) as broker:
            keys = [f"k{i}" for i in range(1000)]
            for start in range(0, messages, 500):
                batch = [Seat(key=keys[i % 1000]) for i in range(start, min(start + 500, messages))]
                await broker.publish_batch("t", batch)
            done, count = asyncio.Event(), 0

            async def handle(ctx: MessageContext[Seat]) -> None:
                nonlocal count
                count += 1
                if count == messages:
                    done.set()

            cpu, wall = time.process_time(), time.perf_counter()
            await broker.subscribe("t", "g", handle)
            await asyncio.wait_for(done.wait(), 300)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            idle = time.process_time()
            await asyncio.sleep(3)
            idle = (time.process_time() - idle) / 3 * 100
    finally:
        await _cleanup(url, prefix)
    return wall, cpu / messages * 1e6, idle


async def latency(url: str, partitions: int, messages: int = 1000) -> tuple[float, float, float]:
    """(p50, p99, max) in ms."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    took: list[float] = []
    try:
        async with msgbroker.connect(url, partition_count=partitions, redis={"key_prefix": prefix}) as broker:
            done = asyncio.Event()

            async def handle(ctx: MessageContext[Seat]) -> None:
                took.append(time.perf_counter() - ctx.message.sent)
                if len(took) == messages:
                    done.set()

            await broker.subscribe("t", "g", handle)
            await asyncio.sleep(1)
            for i in range(messages):
                await broker.publish("t", Seat(key=f"k{i % 1000}", sent=time.perf_counter()))
                await asyncio.sleep(0.005)
            await asyncio.wait_for(done.wait(), 60)
    finally:
        await _cleanup(url, prefix)
    took.sort()
    return took[len(took) // 2] * 1e3, took[int(len(took) * 0.99)] * 1e3, took[-1] * 1e3


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("partitions", type=int, nargs="*", default=[64, 256, 1024])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    url = os.environ.get("MSGBROKER_REDIS__URL", "redis://localhost:6379")
    results: dict[int, list[tuple[float, ...]]] = {p: [] for p in args.partitions}
    for round_ in range(args.rounds):
        for partitions in args.partitions:
            wall, cpu, idle = await drain(url, partitions, args.messages)
            p50, p99, worst = await latency(url, partitions)
            results[partitions].append((wall, cpu, idle, p50, p99, worst))
            print(f"round {round_ + 1}, {partitions} partitions: drain {wall:.2f}s, {cpu:.1f} µs CPU/msg, "
                  f"idle {idle:.2f}% of a core; latency p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.1f} ms",
                  flush=True)
    base = statistics.median(r[1] for r in results[args.partitions[0]])
    print(f"\n| partitions | drain s | CPU µs/msg | vs {args.partitions[0]} | idle % core | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for partitions, rows in results.items():
        med = [statistics.median(r[i] for r in rows) for i in range(6)]
        print(f"| {partitions} | {med[0]:.2f} | {med[1]:.1f} | {med[1] / base:.2f} | {med[2]:.2f} | {med[3]:.2f} | "
              f"{med[4]:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
