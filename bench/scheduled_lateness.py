"""Scheduled messages: how late after its time each one reaches its handler (issue #24,
deliverable 3; docs/scheduling.md).

One connection subscribes to a fresh topic of 4 partitions, then schedules ``--messages``
messages, one every 50 ms, each ``delay`` 1.0-2.9 s ahead (its due time in the message); the
handler records ``time.time() - due``. Reported: how many were handled, the least, median and
largest lateness, and how many came early (none may). Bounded: it waits at most 20 s after the
last schedule.

    set -a; . .brokers/env; set +a
    .venv/bin/python bench/scheduled_lateness.py --url "$MSGBROKER_REDIS__URL" --messages 40

A loaded machine shows in the figures; the declared precisions (``capabilities.schedule_precision``)
are bounds, these are one run's measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid

import msgbroker
from msgbroker import Message, MessageContext


class Due(Message):
    """A scheduled test message: its key and the time it is due (epoch seconds)."""

    k: str
    due: float

    @property
    def partition_key(self) -> str:
        return self.k


async def measure(url: str, count: int) -> list[float]:
    """Schedule ``count`` messages on a fresh topic; their lateness in seconds, as handled."""
    late: list[float] = []
    all_handled = asyncio.Event()
    topic = f"sched-lateness-{uuid.uuid4().hex[:6]}"
    async with msgbroker.connect(url, partition_count=4) as broker:
        async def handle(ctx: MessageContext[Due]) -> None:
            late.append(time.time() - ctx.message.due)
            if len(late) >= count:
                all_handled.set()

        await broker.subscribe(topic, "lateness", handle, message_type=Due)
        for i in range(count):
            delay = 1.0 + (i % 20) / 10
            due = time.time() + delay
            await broker.publish(topic, Due(k=f"k{i}", due=due), delay=delay)
            await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_handled.wait(), 20)
    return late


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the broker (a provider that declares scheduling)")
    parser.add_argument("--messages", type=int, default=40)
    args = parser.parse_args()
    late = sorted(asyncio.run(measure(args.url, args.messages)))
    if not late:
        raise SystemExit(f"none of {args.messages} scheduled messages was handled within 20 s of the last")
    early = sum(1 for x in late if x < 0)
    print(f"{len(late)}/{args.messages} handled; late min {late[0] * 1000:.0f} ms, median "
          f"{statistics.median(late) * 1000:.0f} ms, max {late[-1] * 1000:.0f} ms; early {early}")


if __name__ == "__main__":
    main()
