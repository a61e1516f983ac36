"""``scripts/brokers restart kafka`` in the middle of a stream: publishing resumes once the
server is back, the subscription recovers by itself, and every confirmed message is handled,
each key in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgbroker
from msgbroker import Message, MessageContext

REPO = Path(__file__).resolve().parents[3]


class Tick(Message):
    """One message of a stream: ``seq`` orders the messages of one ``key``."""

    key: str
    seq: int

    @property
    def partition_key(self) -> str:
        return self.key


async def _restart_kafka() -> None:
    process = await asyncio.create_subprocess_exec(
        str(REPO / "scripts" / "brokers"), "restart", "kafka",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, f"scripts/brokers restart kafka failed: {output.decode(errors='replace')[-2000:]}"


async def test_a_broker_restart_mid_stream_loses_nothing(
    connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    count, topic, group = 4, names("restart"), names("g")
    producer = await connect(partition_count=count)
    consumer = await connect(partition_count=count)
    handled: list[tuple[str, int]] = []

    async def handle(ctx: MessageContext[Tick]) -> None:
        handled.append((ctx.message.key, ctx.message.seq))

    await consumer.subscribe(topic, group, handle)
    keys = [f"stream-{i}" for i in range(8)]
    confirmed: list[Tick] = []
    restarted = asyncio.Event()

    async def stream() -> None:
        seq = 0
        while not (restarted.is_set() and len(confirmed) >= 400):
            batch = [Tick(key=k, seq=seq) for k in keys]
            while True:  # a batch is retried until confirmed, before the next one (keeps key order)
                try:
                    await producer.publish_batch(topic, batch)
                    break
                except msgbroker.TransientError:
                    await asyncio.sleep(0.2)
            confirmed.extend(batch)
            seq += 1
            await asyncio.sleep(0.01)

    streaming = asyncio.create_task(stream())
    deadline = time.monotonic() + 30
    while len(handled) < 100:
        if time.monotonic() > deadline:
            raise AssertionError("the stream did not start within 30 s")
        await asyncio.sleep(0.02)
    await _restart_kafka()
    restarted.set()
    await asyncio.wait_for(streaming, 120)
    wanted = {(m.key, m.seq) for m in confirmed}
    deadline = time.monotonic() + 90
    while not wanted <= set(handled):
        if time.monotonic() > deadline:
            raise AssertionError(f"lost after the restart: {sorted(wanted - set(handled))[:10]}")
        await asyncio.sleep(0.05)
    assert await consumer.is_healthy() and await producer.is_healthy()
    for key in keys:
        firsts: list[int] = []
        for k, seq in handled:
            if k == key and seq not in firsts:
                firsts.append(seq)
        assert firsts == sorted(firsts), f"{key} handled out of order across the restart"
