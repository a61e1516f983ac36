"""A group member in its own process, for the failover test (run, not collected by pytest).

Usage: ``python member_process.py BOOTSTRAP TOPIC GROUP PARTITIONS``. Prints ``READY <partitions>``
once it holds its share, ``HANDLED <seq> <attempt>`` per message, and ``BLOCKED <seq>`` when a
message with ``block`` set arrives, which it then holds forever (until it is killed).
"""

from __future__ import annotations

import asyncio
import sys

import msgbroker
from msgbroker import Message, MessageContext


class Step(Message):
    """A message of the failover test."""

    key: str
    seq: int
    block: bool = False

    @property
    def partition_key(self) -> str:
        return self.key


async def main(servers: str, topic: str, group: str, partitions: int) -> None:
    # The provider's default session_timeout and heartbeat: the failover test measures the default.
    broker = msgbroker.connect(f"kafka://{servers}", partition_count=partitions, shutdown_timeout=30)
    await broker.open()

    async def handle(ctx: MessageContext[Step]) -> None:
        if ctx.message.block:
            print(f"BLOCKED {ctx.message.seq}", flush=True)
            await asyncio.Event().wait()
        print(f"HANDLED {ctx.message.seq} {ctx.delivery_attempt}", flush=True)

    subscription = await broker.subscribe(topic, group, handle)
    while not subscription.partitions:  # noqa: ASYNC110 - the join completes once the others rejoined
        await asyncio.sleep(0.05)
    print("READY " + " ".join(map(str, subscription.partitions)), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
