"""A worker process for the dashboard's browser tests (test_dashboard_browser.py): one member of
GROUP on TOPIC; it rejects a message whose ``poison`` is true while the CURE file is missing
(to the dead letters), handles the others, and appends each handled message id to HANDLED.

    python dashboard_worker.py URL TOPIC GROUP HANDLED CURE PARTITIONS CLAIM_TIMEOUT
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import msgbroker
from msgbroker import Message, MessageContext


class Job(Message):
    key: str = ""
    poison: bool = False

    @property
    def partition_key(self) -> str:
        return self.key or str(self.message_id)


def cured(path: str) -> bool:
    return os.path.exists(path)


def record(path: str, message_id: str) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(message_id + "\n")


async def main(url: str, topic: str, group: str, handled: str, cure: str, partitions: int, claim: float) -> None:
    broker = msgbroker.connect(url, partition_count=partitions, redis={"claim_timeout": claim})
    await broker.open()

    async def handle(ctx: MessageContext[Job]) -> None:
        if ctx.message.poison and not cured(cure):
            await ctx.nak(requeue=False, error="poisoned: the test has not written the cure file yet")
            return
        record(handled, ctx.message_id)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    subscription = await broker.subscribe(topic, group, handle, message_type=Job)
    print(f"member {subscription.member_id}", flush=True)
    await stop.wait()
    await broker.close()


if __name__ == "__main__":
    url, topic, group, handled, cure, partitions, claim = sys.argv[1:8]
    asyncio.run(main(url, topic, group, handled, cure, int(partitions), float(claim)))
