"""What nats-server spends per message drained, by how many consumers share the stream.

A backlog (``--messages`` of ~100 B over 1,000 keys, spread over ``--partitions`` subjects of
one stream) drained four ways, interleaved, each on a new stream:

* **msgbroker**: one ordered subscriber of a topic of ``--partitions`` partitions (its default
  settings: a durable pull consumer per partition, each filtered to its partition's subject);
* **raw, one consumer**: nats-py, one durable pull consumer of the whole stream,
  ``fetch(500)`` and an ack per message (the drain cell's raw loop);
* **raw, N filtered consumers**: nats-py, a durable pull consumer per subject (as msgbroker's
  lanes), each read with ``fetch(64)`` and an ack per message, all at once; for N =
  ``--partitions`` and N = 8.

For each: messages a second, this process's CPU and the server's (``--broker`` names the
``scripts/brokers`` server whose pid file is read, or ``--broker-pid``) in µs a message. The
server's share grows with the number of filtered consumers, not with msgbroker's client: see
docs/benchmarks.md, *What limits each number*.

    bench/.venv/bin/python bench/nats_server_cost.py --url "$MSGBROKER_NATS__URL" --broker nats
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgbroker
import nats
from msgbroker import MessageContext

from msgbroker_bench import BrokerCpu, Seat, broker_pid


def _body(seq: int) -> bytes:
    return json.dumps({"key": f"k{seq % 1000}", "seq": seq, "data": "x" * 60}).encode()


async def ours(url: str, partitions: int, messages: int) -> Callable[[], Awaitable[None]]:
    """Publish the backlog; return the drain (timed by the caller)."""
    broker = msgbroker.connect(url, partition_count=partitions)
    await broker.open()
    topic = f"cost-{uuid.uuid4().hex[:8]}"
    for start in range(0, messages, 500):
        await broker.publish_batch(topic, [Seat(key=f"k{j % 1000}", seq=j, data="x" * 60)
                                           for j in range(start, min(start + 500, messages))])

    async def drain() -> None:
        got = 0
        done = asyncio.Event()

        async def handle(ctx: MessageContext[Seat]) -> None:
            nonlocal got
            got += 1
            if got == messages:
                done.set()

        subscription = await broker.subscribe(topic, "g", handle, message_type=Seat)
        try:
            await asyncio.wait_for(done.wait(), 300)
        finally:
            await subscription.close()
            await broker.live_transport().jsm.delete_stream(broker.live_transport().layout(topic).stream)  # type: ignore[attr-defined]
            await broker.close()

    return drain


async def raw(url: str, subjects: int, consumers: int, messages: int) -> Callable[[], Awaitable[None]]:
    """Publish the backlog over ``subjects`` subjects of a new stream; return the drain by
    ``consumers`` durable pull consumers (1: the whole stream; else one per subject)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"COST{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=name, subjects=[f"{name}.>"])
    for start in range(0, messages, 500):
        await asyncio.gather(*(js.publish(f"{name}.{j % subjects}", _body(j))
                               for j in range(start, min(start + 500, messages))))

    async def read(subject: str, durable: str, count: int, batch: int) -> None:
        sub = await js.pull_subscribe(subject, durable=durable)
        got = 0
        while got < count:
            for msg in await sub.fetch(batch, timeout=10):
                json.loads(msg.data)
                await msg.ack()
                got += 1

    async def drain() -> None:
        try:
            if consumers == 1:
                await read(f"{name}.>", "all", messages, 500)
            else:
                per = [len(range(s, messages, subjects)) for s in range(subjects)]
                await asyncio.gather(*(read(f"{name}.{s}", f"d{s}", per[s], 64) for s in range(subjects)))
        finally:
            await js.delete_stream(name)
            await nc.close()

    return drain


async def measure(prepare: Awaitable[Callable[[], Awaitable[None]]], server: BrokerCpu,
                  messages: int) -> tuple[float, float, float | None]:
    drain = await prepare
    server_before, cpu_before, wall_before = server.seconds(), time.process_time(), time.perf_counter()
    await drain()
    wall, cpu, server_after = time.perf_counter() - wall_before, time.process_time() - cpu_before, server.seconds()
    server_us = None
    if server_before is not None and server_after is not None:
        server_us = 1e6 * (server_after - server_before) / messages
    return messages / wall, 1e6 * cpu / messages, server_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--broker", help="the scripts/brokers server name, to read its pid")
    parser.add_argument("--broker-pid", type=int)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    server = BrokerCpu(args.broker_pid or (broker_pid(root, args.broker) if args.broker else None))
    n, p = args.messages, args.partitions
    variants: dict[str, Callable[[], Awaitable[Callable[[], Awaitable[None]]]]] = {
        f"msgbroker, {p} partitions": lambda: ours(args.url, p, n),
        "raw, one consumer": lambda: raw(args.url, p, 1, n),
        f"raw, {p} filtered consumers": lambda: raw(args.url, p, p, n),
        "raw, 8 filtered consumers": lambda: raw(args.url, 8, 8, n),
    }
    results: dict[str, list[tuple[float, float, float | None]]] = {name: [] for name in variants}
    for run in range(1, args.runs + 1):
        for name, prepare in variants.items():
            result = asyncio.run(measure(prepare(), server, n))
            results[name].append(result)
            server_text = "?" if result[2] is None else f"{result[2]:.1f}"
            print(f"run {run} {name}: {result[0]:,.0f} msg/s, client {result[1]:.1f} µs/msg, "
                  f"server {server_text} µs/msg", flush=True)
    print()
    print("| drain | msg/s | client CPU µs/msg | server CPU µs/msg |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        servers = [r[2] for r in rows if r[2] is not None]
        server_text = f"{statistics.median(servers):.1f}" if servers else "—"
        print(f"| {name} | {statistics.median(r[0] for r in rows):,.0f} | "
              f"{statistics.median(r[1] for r in rows):.1f} | {server_text} |")


if __name__ == "__main__":
    main()
