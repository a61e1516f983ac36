"""A group member in a process of its own, for the failover test (killed with SIGKILL there).

    python _member.py URL PREFIX TOPIC GROUP PARTITIONS HOLD_AT [HOLD_SECONDS]

It handles ``Item`` messages, appending ``"<key>:<n>:<attempt>:<time>"`` to the Redis list
``<PREFIX>:record`` after each one, and, on the first delivery of a message whose ``n`` is
HOLD_AT, pushes ``"holding:<key>:<n>"`` to ``<PREFIX>:holding`` and holds it HOLD_SECONDS
(forever by default) before finishing it. Its ``claim_timeout`` is 2 s, or the provider's
default when the environment variable ``MEMBER_DEFAULT_CLAIM_TIMEOUT`` is set.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import msgbroker
import redis.asyncio as aioredis
from msgbroker import Message, MessageContext


class Item(Message):
    key: str
    n: int

    @property
    def partition_key(self) -> str:
        return self.key


async def main(url: str, prefix: str, topic: str, group: str, partitions: int, hold_at: int,
               hold_seconds: float | None) -> None:
    raw = aioredis.Redis.from_url(url)

    async def handle(ctx: MessageContext[Item]) -> None:
        item = ctx.message
        if item.n == hold_at and ctx.delivery_attempt == 1:
            await raw.rpush(f"{prefix}:holding", f"holding:{item.key}:{item.n}")
            if hold_seconds is None:
                await asyncio.Event().wait()  # in flight until the process is killed
            await asyncio.sleep(hold_seconds)
        await raw.rpush(f"{prefix}:record", f"{item.key}:{item.n}:{ctx.delivery_attempt}:{time.time()!r}")

    redis: dict[str, object] = {"key_prefix": prefix}
    if not os.environ.get("MEMBER_DEFAULT_CLAIM_TIMEOUT"):
        redis["claim_timeout"] = 2
    broker = msgbroker.connect(url, partition_count=partitions, retry_delay=0, redis=redis)
    async with broker:
        await broker.subscribe(topic, group, handle)
        await asyncio.Event().wait()


if __name__ == "__main__":
    url, prefix, topic, group, partitions, hold_at = sys.argv[1:7]
    hold = float(sys.argv[7]) if len(sys.argv) > 7 else None
    asyncio.run(main(url, prefix, topic, group, int(partitions), int(hold_at), hold))
