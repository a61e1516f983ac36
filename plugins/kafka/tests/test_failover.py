"""Failover after ``kill -9`` of a member process: its partitions move to the live member after
the session timeout, the message it held comes back first (as attempt 2), nothing is lost. Both
members run with the provider's default session_timeout and heartbeat_interval (issue: a dead
member's partitions must move within 10 s by default); the time is printed (pytest -s)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgbroker
from msgbroker import MessageContext
from msgbroker_kafka import KafkaSettings

HERE = Path(__file__).resolve().parent


async def _line(process: asyncio.subprocess.Process, prefix: str, timeout: float = 60) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            raw = await process.stdout.readline()
            if not raw:
                raise AssertionError(f"the member process exited before printing {prefix!r}")
            line = raw.decode().strip()
            if line.startswith(prefix):
                return line


async def test_a_killed_member_process_fails_over_with_nothing_lost(
    bootstrap_servers: str, connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    sys.path.insert(0, str(HERE))
    try:
        from member_process import Step
    finally:
        sys.path.remove(str(HERE))
    count, topic, group = 2, names("failover"), names("g")
    defaults = KafkaSettings()
    survivor = await connect(partition_count=count, kafka={
        "session_timeout": defaults.session_timeout, "heartbeat_interval": defaults.heartbeat_interval})
    seen: list[tuple[int, int]] = []
    all_seen = asyncio.Event()
    came_back: list[float] = []

    async def handle(ctx: MessageContext[Step]) -> None:
        if not seen:
            came_back.append(time.monotonic())
        seen.append((ctx.message.seq, ctx.delivery_attempt))
        if len({seq for seq, _ in seen}) >= 5:
            all_seen.set()

    subscription = await survivor.subscribe(topic, group, handle, message_type=Step)
    member = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "member_process.py"), bootstrap_servers, topic, group, str(count),
        stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )
    try:
        ready = await _line(member, "READY")
        theirs = [int(p) for p in ready.split()[1:]]
        deadline = time.monotonic() + 30
        while not (theirs and sorted(subscription.partitions + theirs) == list(range(count))):
            if time.monotonic() > deadline:
                raise AssertionError(f"no split within 30 s: here {subscription.partitions}, there {theirs}")
            await asyncio.sleep(0.05)
        key = next(k for k in (f"key-{i}" for i in range(1000)) if msgbroker.partition_for(k, count) == theirs[0])
        await survivor.publish(topic, Step(key=key, seq=0))
        assert await _line(member, "HANDLED 0") == "HANDLED 0 1"
        # its ack is committed within commit_interval (acks are buffered: one not committed yet
        # when the member dies comes back, at least once)
        deadline = time.monotonic() + 30
        while await survivor.pending_count(topic, group):
            if time.monotonic() > deadline:
                raise AssertionError("the ack of the first message was not committed within 30 s")
            await asyncio.sleep(0.05)
        # the lane is idle when the blocker arrives: its delivery is recorded before its handler runs
        steps = [Step(key=key, seq=1, block=True), *(Step(key=key, seq=s) for s in range(2, 6))]
        await survivor.publish_batch(topic, steps)
        assert await _line(member, "BLOCKED") == "BLOCKED 1"
        member.send_signal(signal.SIGKILL)  # no leave, no commit: Kafka notices after the session timeout
        await member.wait()
        killed_at = time.monotonic()
        await asyncio.wait_for(all_seen.wait(), 60)
        print(f"failover (session_timeout {defaults.session_timeout.total_seconds():g}s): the held message was "
              f"handled again {came_back[0] - killed_at:.1f}s after the kill")
    finally:
        with contextlib.suppress(ProcessLookupError):
            member.kill()
        await member.wait()
    assert [seq for seq, _ in seen][:5] == [1, 2, 3, 4, 5], f"order lost on failover: {seen}"
    assert seen[0] == (1, 2), f"the message the dead member held came back as {seen[0]}, expected attempt 2"
    assert 0 not in {seq for seq, _ in seen}, "a message the dead member had finished came back"
