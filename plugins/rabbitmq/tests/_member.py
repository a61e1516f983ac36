"""A group member in its own process, for the multi-process tests.

``python _member.py URL PREFIX TOPIC GROUP PARTITIONS [HANDLE_SECONDS]`` subscribes and prints one
JSON line per event on stdout: ``{"event": "ready"}``, ``{"event": "partitions", "partitions": [...]}``
whenever its share changes, and ``{"event": "handled", ...}`` per handled message. It runs until
stdin closes (a clean close) or it is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import msgbroker
from msgbroker import Message, MessageContext


class Numbered(Message):
    """A message with a key (its partition key) and a sequence number per key."""

    key: str
    seq: int

    @property
    def partition_key(self) -> str:
        return self.key


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def main() -> None:
    url, prefix, topic, group, partitions = sys.argv[1:6]
    handle_seconds = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    claim = os.environ.get("MEMBER_CLAIM_TIMEOUT", "2")  # "default": the provider's default
    settings: dict[str, object] = {"exchange_prefix": prefix, "queue_expires": 300}
    if claim != "default":
        settings["claim_timeout"] = float(claim)
    broker = msgbroker.connect(url, partition_count=int(partitions), retry_delay=0, rabbitmq=settings)
    await broker.open()

    async def handle(ctx: MessageContext[Numbered]) -> None:
        emit(event="started", key=ctx.message.key, seq=ctx.message.seq, pid=os.getpid())
        if handle_seconds:
            await asyncio.sleep(handle_seconds)
        emit(event="handled", key=ctx.message.key, seq=ctx.message.seq, attempt=ctx.delivery_attempt,
             partition=ctx.partition, pid=os.getpid(), at=time.time())

    subscription = await broker.subscribe(topic, group, handle)
    emit(event="ready", pid=os.getpid())
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    shown: list[int] | None = None
    while not stdin_closed.done():
        if subscription.partitions != shown:
            shown = subscription.partitions
            emit(event="partitions", partitions=shown, pid=os.getpid())
        await asyncio.sleep(0.05)
    await broker.close()
    emit(event="closed", pid=os.getpid())


if __name__ == "__main__":
    asyncio.run(main())
