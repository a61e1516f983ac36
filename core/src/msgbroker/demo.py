"""The seat-lock demo: API servers publish seat-lock requests, a pool of workers in one
consumer group handles them, each session+area strictly in order, nothing lost.

Run: ``python -m msgbroker.demo [URL] [--messages N] [--workers W]`` (in-memory by default).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import msgbroker
from msgbroker import Message, MessageContext

__all__ = ["SeatLockMessage", "main", "run_demo"]


class SeatLockMessage(Message):
    """A request to lock seats of one area of one session (the seed's example)."""

    session_id: uuid.UUID
    area_id: uuid.UUID
    seat_ids: list[str] = []  # noqa: RUF012 - a pydantic field default, copied per instance
    sequence: int = 0
    """Position of this request among those of its session+area (to verify order)."""

    @property
    def partition_key(self) -> str:
        return f"{self.session_id}:{self.area_id}"


@dataclass
class DemoResult:
    published: int = 0
    handled: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    lost: int = 0
    partitions_used: int = 0
    partitions_keyed: int = 0
    """How many partitions the demo's keys hash to (all of them get used)."""
    seconds: float = 0.0
    workers_stopped: int = 0
    per_worker: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.handled / self.seconds if self.seconds else 0.0


class _Ledger:
    """What was handled, to check per-key order and count duplicates (idempotent handling)."""

    def __init__(self) -> None:
        self.done: set[uuid.UUID] = set()
        self.next_sequence: dict[str, int] = defaultdict(int)
        self.partitions: set[int] = set()
        self.duplicates = 0
        self.out_of_order = 0

    def record(self, ctx: MessageContext[SeatLockMessage]) -> bool:
        message = ctx.message
        if message.message_id in self.done:
            self.duplicates += 1  # at-least-once: an idempotent handler skips it
            return False
        key = message.partition_key
        if message.sequence != self.next_sequence[key]:
            self.out_of_order += 1
        self.next_sequence[key] = message.sequence + 1
        self.done.add(message.message_id)
        self.partitions.add(ctx.partition)
        return True


async def run_demo(
    url: str = "memory://demo",
    *,
    messages: int = 20_000,
    workers: int = 4,
    sessions: int = 50,
    areas: int = 8,
    partition_count: int = 64,
    stop_one_worker: bool = True,
    timeout: float = 300.0,
    progress: bool | None = None,
) -> DemoResult:
    """Publish ``messages`` seat-lock requests and handle them with ``workers`` members of one group."""
    run = uuid.uuid4().hex[:8]
    topic, group = f"seat-lock-requests-{run}", "seat-lock-workers"
    if url.startswith("memory://") and url.rstrip("/") == "memory:":
        url = f"memory://demo-{run}"
    keys = [(uuid.uuid4(), uuid.uuid4()) for _ in range(sessions)]
    areas_of = [[uuid.uuid4() for _ in range(areas)] for _ in range(sessions)]
    if progress is None:
        progress = sys.stderr.isatty()
    ledger = _Ledger()
    counts = [0] * workers
    result = DemoResult()

    def handler_for(index: int):  # type: ignore[no-untyped-def]
        async def handle(ctx: MessageContext[SeatLockMessage]) -> None:
            if ledger.record(ctx):
                counts[index] += 1
            await ctx.ack()

        return handle

    connections = [msgbroker.connect(url, partition_count=partition_count) for _ in range(workers + 1)]
    producer, *pool = connections
    await asyncio.gather(*(c.open() for c in connections))
    try:
        subscriptions = [await w.subscribe(topic, group, handler_for(i)) for i, w in enumerate(pool)]
        started = time.perf_counter()
        sequence: dict[tuple[int, int], int] = defaultdict(int)
        batch: list[SeatLockMessage] = []
        stopped = False
        for n in range(messages):
            s, a = n % sessions, (n // sessions) % areas
            seq = sequence[(s, a)]
            sequence[(s, a)] += 1
            batch.append(SeatLockMessage(session_id=keys[s][0], area_id=areas_of[s][a],
                                         seat_ids=[f"R{n % 30}-{n % 20}"], sequence=seq))
            if len(batch) == 500 or n == messages - 1:
                await producer.publish_batch(topic, batch)
                await asyncio.sleep(0)  # API servers and workers run side by side
                result.published += len(batch)
                batch = []
                if stop_one_worker and not stopped and workers > 1 and result.published >= messages // 2:
                    await subscriptions[0].close()  # a worker leaves mid-stream: its partitions move
                    stopped = True
                    result.workers_stopped = 1
                if progress:
                    print(f"\rpublished {result.published}/{messages}, handled {len(ledger.done)}", end="",
                          file=sys.stderr)
        deadline = time.monotonic() + timeout
        while len(ledger.done) < messages and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if progress:
                print(f"\rpublished {result.published}/{messages}, handled {len(ledger.done)}", end="", file=sys.stderr)
        result.seconds = time.perf_counter() - started
        if progress:
            print(file=sys.stderr)
        result.handled = len(ledger.done)
        result.lost = messages - len(ledger.done)
        result.duplicates = ledger.duplicates
        result.out_of_order = ledger.out_of_order
        result.partitions_used = len(ledger.partitions)
        result.partitions_keyed = len({
            msgbroker.partition_for(f"{keys[s][0]}:{areas_of[s][a]}", partition_count)
            for s in range(sessions) for a in range(areas)
        })
        result.per_worker = counts
    finally:
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msgbroker demo", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("url", nargs="?", default="memory://", help="broker URL (default: the in-memory broker)")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--areas", type=int, default=8)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this many seconds")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run_demo(args.url, messages=args.messages, workers=args.workers, sessions=args.sessions, areas=args.areas,
                 partition_count=args.partitions, timeout=args.timeout)
    )
    print(f"provider url        {args.url}")
    print(f"messages published  {result.published}")
    print(f"messages handled    {result.handled} in {result.seconds:.2f}s ({result.rate:,.0f} msg/s)")
    print(f"workers             {args.workers} (one left mid-stream: {result.workers_stopped == 1}); "
          f"handled per worker {result.per_worker}")
    print(f"partitions used     {result.partitions_used} of {args.partitions} "
          f"(the keys hash to {result.partitions_keyed})")
    print(f"keys (session+area) {args.sessions * args.areas}, per-key order verified")
    print(f"duplicates handled  {result.duplicates} (skipped by the idempotent handler)")
    print(f"out of order        {result.out_of_order}")
    print(f"lost                {result.lost}")
    return 0 if result.lost == 0 and result.out_of_order == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
