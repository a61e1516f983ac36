"""A group member in a process of its own, for the failover test (killed with SIGKILL there).

    python _member.py URL PREFIX TOPIC GROUP PARTITIONS HOLD_AT RECORD_FILE

It handles ``Item`` messages, appending ``"<key>:<n>:<attempt>"`` lines to RECORD_FILE after
each one, and, on the message whose ``n`` is HOLD_AT, appends ``"holding:<key>:<n>"`` and never
returns (its lane stays in flight while the process lives: +WPI keeps it from being redelivered).
"""

from __future__ import annotations

import asyncio
import os
import sys

import msgbroker
from msgbroker import Message, MessageContext


class Item(Message):
    key: str
    n: int

    @property
    def partition_key(self) -> str:
        return self.key


def record(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(line + "\n")


async def main(url: str, prefix: str, topic: str, group: str, partitions: int, hold_at: int, path: str) -> None:
    async def handle(ctx: MessageContext[Item]) -> None:
        item = ctx.message
        if item.n == hold_at:
            record(path, f"holding:{item.key}:{item.n}")
            await asyncio.Event().wait()  # in flight until the process is killed
        record(path, f"{item.key}:{item.n}:{ctx.delivery_attempt}")

    settings: dict[str, object] = {"stream_prefix": prefix}
    if os.environ.get("MEMBER_ACK_WAIT", "2") != "default":  # "default": the provider's default
        settings["ack_wait"] = float(os.environ.get("MEMBER_ACK_WAIT", "2"))
    broker = msgbroker.connect(url, partition_count=partitions, retry_delay=0, nats=settings)
    async with broker:
        await broker.subscribe(topic, group, handle)
        record(path, "ready")
        await asyncio.Event().wait()


if __name__ == "__main__":
    url, prefix, topic, group, partitions, hold_at, path = sys.argv[1:8]
    asyncio.run(main(url, prefix, topic, group, int(partitions), int(hold_at), path))
