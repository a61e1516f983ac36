"""The Redis provider against the real server: what the conformance suite cannot see from
outside (keys, trimming, fencing, a killed member process, a restarted server, the seed's
settings)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgbroker
import pytest
import redis.asyncio as aioredis
from msgbroker import BrokerSettings, ConfigurationError, DeadLetter, Lane, Message, MessageContext, partition_for
from msgbroker_redis import RedisSettings, RedisTransport, TopicKeys
from redis.crc import key_slot

REPO = Path(__file__).resolve().parents[3]
SEED_APPSETTINGS = REPO.parent / "shared" / "seed" / "appsettings.json"
MEMBER = Path(__file__).with_name("_member.py")


class Item(Message):
    key: str
    n: int

    @property
    def partition_key(self) -> str:
        return self.key


async def wait_until(check: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0, what: str = "") -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(0.02)


def first_seen_in_order(events: list[tuple[str, int]]) -> dict[str, list[int]]:
    """Per key, the numbers in the order they were first handled (redeliveries dropped)."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, list[int]] = {}
    for key, n in events:
        if (key, n) not in seen:
            seen.add((key, n))
            out.setdefault(key, []).append(n)
    return out


# -- keys ----------------------------------------------------------------------------------------


async def test_every_key_lives_under_the_key_prefix(connect: Any, raw: aioredis.Redis, prefix: str, topic: str) -> None:
    handled: set[int] = set()

    async def handle(ctx: MessageContext[Item]) -> None:
        if ctx.message.n == 3:
            await ctx.nak(requeue=False)
            return
        if ctx.message.n == 4 and ctx.delivery_attempt == 1:
            await ctx.delay(0.05)
            return
        handled.add(ctx.message.n)

    async with connect(enable_deduplication=True) as broker:
        await broker.publish_batch(topic, [Item(key=f"k{i}", n=i) for i in range(20)])
        await broker.subscribe(topic, "workers", handle)
        await wait_until(lambda: len(handled) == 19, what="19 messages handled")
        await wait_until(lambda: _has_dead_letter(broker, topic), what="the dead letter")
        keys = sorted([key.decode() async for key in raw.scan_iter(match=f"*{topic}*", count=1000)])
    assert all(key.startswith(f"{prefix}:{{{topic}}}") for key in keys), keys
    kinds = {key.split("}", 1)[1].lstrip(":").split(":", 1)[0] for key in keys}
    assert {"0", "meta", "dedup", "members", "lease", "dead", ".dlq"} <= kinds, kinds
    # One hash tag, so one Redis Cluster slot: the topic's lanes, its group's state and its
    # <topic>.dlq lanes, which the dead-letter script writes together with the original's ack.
    assert len({key_slot(key.encode()) for key in keys}) == 1, keys


async def _has_dead_letter(broker: msgbroker.Broker, topic: str) -> bool:
    return len(await broker.dead_letters(topic, "workers")) == 1


async def test_an_error_text_with_a_lone_surrogate_is_dead_lettered_as_is(connect: Any, topic: str) -> None:
    async def fail(ctx: MessageContext[Item]) -> None:
        raise RuntimeError("bad byte \udcff from a decoder")

    async with connect(max_retry_attempts=1) as broker:
        await broker.publish(topic, Item(key="k", n=1))
        await broker.subscribe(topic, "workers", fail)
        await wait_until(lambda: _has_dead_letter(broker, topic), what="the dead letter")
        [letter] = await broker.dead_letters(topic, "workers")
    assert letter.error == "RuntimeError: bad byte \udcff from a decoder"


# -- trimming ------------------------------------------------------------------------------------


async def test_trimming_never_deletes_what_a_group_has_not_settled(
    connect: Any, raw: aioredis.Redis, prefix: str, topic: str
) -> None:
    stream = TopicKeys(prefix, topic).stream(0)
    gate = asyncio.Event()
    busy: list[int] = []
    late: list[int] = []

    async def hold_the_first(ctx: MessageContext[Item]) -> None:
        busy.append(ctx.message.n)
        if ctx.message.n == 0:
            await gate.wait()

    async def collect(ctx: MessageContext[Item]) -> None:
        late.append(ctx.message.n)

    async with connect(partition_count=1, redis={"max_stream_length": 10}) as broker:
        # "late" exists (subscribed once and left) but has not handled anything.
        await (await broker.subscribe(topic, "late", collect)).close()
        await broker.subscribe(topic, "busy", hold_the_first)
        await broker.publish_batch(topic, [Item(key="k", n=i) for i in range(50)])
        await wait_until(lambda: busy == [0], what="the first message in flight")
        for i in range(50, 60):
            await broker.publish(topic, Item(key="k", n=i))
        assert await raw.xlen(stream) == 60, "an unsettled entry was trimmed"

        gate.set()
        await wait_until(lambda: len(busy) == 60, what="busy to handle all 60")
        assert busy == list(range(60))
        await broker.publish(topic, Item(key="k", n=60))
        assert await raw.xlen(stream) == 61, "entries the late group still needs were trimmed"

        await broker.subscribe(topic, "late", collect)
        await wait_until(lambda: len(late) == 61, what="late to handle all 61")
        assert late == list(range(61))
        for group in ("busy", "late"):
            await wait_until(lambda g=group: _settled(broker, topic, g), what=f"{group} to settle everything")
        await broker.publish(topic, Item(key="k", n=61))
        assert await raw.xlen(stream) == 10, "settled history beyond max_stream_length was kept"


async def _dropped(drop: Callable[[], Awaitable[int]]) -> bool:
    return await drop() > 0


async def _settled(broker: msgbroker.Broker, topic: str, group: str) -> bool:
    return await broker.pending_count(topic, group) == 0


# -- fencing -------------------------------------------------------------------------------------


async def test_a_paused_member_cannot_settle_what_the_new_owner_holds(connect: Any, topic: str) -> None:
    async with connect(partition_count=1) as broker:
        transport = broker.transport
        assert isinstance(transport, RedisTransport)
        lane = Lane(topic, "g", 0)
        await broker.publish(topic, Item(key="a", n=1))
        wake = asyncio.Event()

        zombie = transport.consumer(topic, "g", "member-a")
        await zombie.start(None, None)  # type: ignore[arg-type]
        token_a = await transport.acquire_lease(lane, "member-a", 0.3)
        assert token_a is not None
        await zombie.open_lane(0, token_a)
        [held] = await zombie.poll([0], 10, 0.5, wake)
        assert held.attempt == 1

        # member-a stalls past its lease; member-b takes the lane and resumes its history.
        owner = transport.consumer(topic, "g", "member-b")
        await owner.start(None, None)  # type: ignore[arg-type]
        tokens: list[str | None] = []

        async def taken() -> bool:
            tokens.append(await transport.acquire_lease(lane, "member-b", 30))
            return tokens[-1] is not None

        await wait_until(taken, what="member-b to take the expired lease")
        await owner.open_lane(0, tokens[-1])
        [again] = await owner.poll([0], 10, 0.5, wake)
        assert (again.message_id, again.attempt) == (held.message_id, 2)

        # The zombie wakes up: its ack, retry and dead letter change nothing.
        await zombie.ack(held)
        await zombie.flush_acks()  # type: ignore[attr-defined]
        await zombie.retry(held, 9, None)
        await zombie.dead_letter(held, DeadLetter(held.message_id, topic, "g", 0, "late", 1, {}, held.body))
        assert await broker.pending_count(topic, "g") == 1
        assert await broker.dead_letters(topic, "g") == []
        # ...nor can it read the lane any more.
        await broker.publish(topic, Item(key="a", n=2))
        assert await zombie.poll([0], 10, 0.2, wake) == []
        second = await owner.poll([0], 10, 0.5, wake)
        assert [d.attempt for d in second] == [1]

        await owner.ack(again)
        await owner.ack(second[0])
        await owner.stop(flush=True)
        assert await broker.pending_count(topic, "g") == 0
        await zombie.stop(flush=False)


async def test_a_wait_whose_reply_is_lost_leaves_its_lanes_to_be_read_from_their_cursors(
    connect: Any, topic: str
) -> None:
    """A member's wait on idle lanes sends no cursors (an idle lane has no history after its
    cursor) and reads only new entries. When its reply is lost after the server ran the read,
    the entries it took sit in the lane's pending list: the next poll must read those lanes
    from their cursors, or they would wait for the idle recheck (10 s) or the next owner."""
    async with connect(partition_count=4) as broker:
        transport = broker.transport
        assert isinstance(transport, RedisTransport)
        wake = asyncio.Event()
        consumer = transport.consumer(topic, "g", "member-a")
        await consumer.start(None, None)  # type: ignore[arg-type]
        lanes = [0, 1, 2, 3]
        for partition in lanes:
            token = await transport.acquire_lease(Lane(topic, "g", partition), "member-a", 30)
            await consumer.open_lane(partition, token)
        assert await consumer.poll(lanes, 10, 0.1, wake) == []  # every lane read once: all idle now
        assert consumer._idle == set(lanes)  # type: ignore[attr-defined]

        reader = consumer._reader  # type: ignore[attr-defined]
        real = reader.block_and_run
        ran: list[Any] = []

        async def lost(*args: Any, **kwargs: Any) -> Any:
            ran.append(await real(*args, **kwargs))  # the server reads the lane...
            raise msgbroker.BrokerConnectionError("the reply was lost")  # ...its reply never comes

        await broker.publish(topic, Item(key="a", n=1))
        reader.block_and_run = lost
        with pytest.raises(msgbroker.BrokerConnectionError):
            await consumer.poll(lanes, 10, 0.5, wake)
        assert ran and b"a" in ran[0][1], "the lost wait did not read the entry"
        reader.block_and_run = real

        got = await consumer.poll(lanes, 10, 0.5, wake)
        assert [(d.key, d.partition) for d in got] == [("a", partition_for("a", 4))]
        await consumer.ack(got[0])
        await consumer.stop(flush=True)
        assert await broker.pending_count(topic, "g") == 0


async def test_read_ahead_handed_over_unhandled_keeps_its_first_attempt(connect: Any, topic: str) -> None:
    gate = asyncio.Event()
    first: list[int] = []
    second: list[tuple[int, int]] = []

    async def slow(ctx: MessageContext[Item]) -> None:
        first.append(ctx.message.n)
        await gate.wait()

    async def collect(ctx: MessageContext[Item]) -> None:
        second.append((ctx.message.n, ctx.delivery_attempt))

    async with connect(partition_count=1) as broker:
        await broker.publish_batch(topic, [Item(key="k", n=n) for n in range(10)])
        leaving = await broker.subscribe(topic, "workers", slow)
        await wait_until(lambda: first == [0], what="the first message in flight")
        # Close while 0 is in flight: it finishes (the gate opens once close waits for it), and
        # 1..9, read ahead with it but never handled, go back to the group.
        asyncio.get_running_loop().call_later(0.5, gate.set)
        await leaving.close()
        assert first == [0]
        await broker.subscribe(topic, "workers", collect)
        await wait_until(lambda: len(second) == 9, what="the rest handled")
    assert second == [(n, 1) for n in range(1, 10)]


async def test_peek_and_pending_by_partition_show_without_delivering(connect: Any, topic: str) -> None:
    async with connect(partition_count=4) as broker:
        ids = await broker.publish_batch(topic, [Item(key=f"k{n}", n=n) for n in range(12)])
        per_partition = await broker.transport.pending_by_partition(topic, "workers")
        assert sum(per_partition.values()) == 12
        peeked = await broker.transport.peek(topic, "workers", 50)
        assert sorted(d.message_id for d in peeked) == sorted(ids)
        assert {d.attempt for d in peeked} == {0}
        assert await broker.pending_count(topic, "workers") == 12


# -- a member process killed ---------------------------------------------------------------------


@pytest.mark.parametrize("claim_timeout", [2.0, None], ids=["claim-2s", "default-settings"])
async def test_a_killed_member_process_hands_its_lanes_and_in_flight_message_over(
    connect: Any, raw: aioredis.Redis, redis_url: str, prefix: str, topic: str, claim_timeout: float | None
) -> None:
    """Also with the provider's default settings (issue: a dead member stalled its partitions
    for the seed's 5 minutes): the lanes and the held message move within claim_timeout (8 s)."""
    keys = [f"key-{i}" for i in range(8)]
    count = 40
    await_all = {(k, n) for k in keys for n in range(count)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if claim_timeout is None:
        env["MEMBER_DEFAULT_CLAIM_TIMEOUT"] = "1"
    ttl = claim_timeout or RedisSettings().claim_timeout.total_seconds()
    assert ttl <= 10, f"the default claim_timeout is {ttl}s: a dead member stalls its partitions that long"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(MEMBER), redis_url, prefix, topic, "workers", "4", "7", env=env
    )
    try:
        async with connect(partition_count=4, redis={"claim_timeout": ttl}) as broker:
            await broker.publish_batch(topic, [Item(key=k, n=n) for n in range(count) for k in keys])
            # The worker owns every lane; it holds one message of each lane in flight at n=7.
            await wait_until(lambda: _count(raw, f"{prefix}:holding", 1), timeout=30, what="the member to hold")
            process.send_signal(signal.SIGKILL)
            await process.wait()
            killed_at = time.monotonic()
            by_worker = [_parse(e) for e in await raw.lrange(f"{prefix}:record", 0, -1)]
            holding = [e.decode().split(":")[1] for e in await raw.lrange(f"{prefix}:holding", 0, -1)]

            events: list[tuple[str, int, int]] = []

            async def handle(ctx: MessageContext[Item]) -> None:
                events.append((ctx.message.key, ctx.message.n, ctx.delivery_attempt))

            await broker.subscribe(topic, "workers", handle)
            held_keys = [e.decode().split(":")[1] for e in await raw.lrange(f"{prefix}:holding", 0, -1)]
            await wait_until(lambda: any((k, 7) in {(e[0], e[1]) for e in events} for k in held_keys),
                             timeout=ttl + 30, what="the held message handed over")
            took = time.monotonic() - killed_at
            handled = lambda: {(k, n) for k, n, _ in by_worker + events}  # noqa: E731
            await wait_until(lambda: handled() >= await_all, timeout=30, what="every message handled")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert by_worker, "the member process handled nothing before it was killed"
    survivor = first_seen_in_order([(k, n) for k, n, _ in events])
    for key, numbers in survivor.items():
        assert numbers == sorted(numbers), f"{key} out of order after failover: {numbers}"
    # The message the dead member held comes first on its lane (after, at most, messages it had
    # handled whose acks were still buffered when it died), with the crash counted.
    done_by_worker = {(k, n) for k, n, _ in by_worker}
    for key in holding:
        lane = partition_for(key, 4)
        on_lane = [(k, n, a) for k, n, a in events if partition_for(k, 4) == lane]
        position = next(i for i, (k, n, _) in enumerate(on_lane) if (k, n) == (key, 7))
        before = [(k, n) for k, n, _ in on_lane[:position]]
        assert set(before) <= done_by_worker, f"lane {lane} handed {before} before the held ({key}, 7)"
        assert on_lane[position][2] >= 2, f"the held message lost its delivery count: {on_lane[position]}"
    # The lease of the dead member runs out after claim_timeout: the held message cannot move
    # before (fencing), and must not wait for much longer (a renewal period and a poll).
    print(f"failover (claim_timeout {ttl:g}s): the held message was handled again {took:.1f}s after the kill")
    assert took >= ttl * 0.5, f"the held message moved {took:.1f}s after the kill, before its lease ({ttl}s) ran out"


async def _count(raw: aioredis.Redis, key: str, at_least: int) -> bool:
    return int(await raw.llen(key)) >= at_least


def _parse(entry: bytes) -> tuple[str, int, int]:
    key, n, attempt, _ = entry.decode().rsplit(":", 3)
    return key, int(n), int(attempt)


def _parse_timed(entry: bytes) -> tuple[float, str, int]:
    key, n, _, at = entry.decode().rsplit(":", 3)
    return float(at), key, int(n)


async def test_a_member_paused_past_its_lease_loses_its_lanes_and_rejoins(
    connect: Any, raw: aioredis.Redis, redis_url: str, prefix: str, topic: str
) -> None:
    keys = [f"key-{i}" for i in range(8)]
    count = 20
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(MEMBER), redis_url, prefix, topic, "workers", "4", "7", "5", env=env
    )
    events: list[tuple[float, str, int, int]] = []

    async def handle(ctx: MessageContext[Item]) -> None:
        events.append((time.time(), ctx.message.key, ctx.message.n, ctx.delivery_attempt))

    def handled(worker: list[tuple[float, str, int]]) -> set[tuple[str, int]]:
        return {(k, n) for _, k, n in worker} | {(k, n) for _, k, n, _ in events}

    try:
        async with connect(partition_count=4) as broker:
            await broker.publish_batch(topic, [Item(key=k, n=n) for n in range(count) for k in keys])
            await wait_until(lambda: _count(raw, f"{prefix}:holding", 1), timeout=30, what="the member to hold")
            process.send_signal(signal.SIGSTOP)  # longer than its 2 s lease
            holding = [e.decode().split(":")[1] for e in await raw.lrange(f"{prefix}:holding", 0, -1)]
            await broker.subscribe(topic, "workers", handle)
            first_batch = {(k, n) for k in keys for n in range(count)}
            worker = [_parse_timed(e) for e in await raw.lrange(f"{prefix}:record", 0, -1)]
            await wait_until(lambda: handled(worker) >= first_batch, timeout=30, what="the first batch")
            redelivered = {(k, n) for _, k, n, a in events if a >= 2}
            assert {(k, 7) for k in holding} <= redelivered, f"held {holding}, redelivered {redelivered}"

            process.send_signal(signal.SIGCONT)  # it wakes up holding lanes it no longer owns
            await broker.publish_batch(topic, [Item(key=k, n=n) for n in range(count, 2 * count) for k in keys])
            everything = {(k, n) for k in keys for n in range(2 * count)}

            async def all_handled() -> bool:
                worker[:] = [_parse_timed(e) for e in await raw.lrange(f"{prefix}:record", 0, -1)]
                return handled(worker) >= everything

            await wait_until(all_handled, timeout=30, what="both batches handled")
            await wait_until(lambda: _settled(broker, topic, "workers"), what="everything settled")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            await process.wait()
    timeline = sorted([(at, k, n) for at, k, n in worker] + [(at, k, n) for at, k, n, _ in events])
    for key, numbers in first_seen_in_order([(k, n) for _, k, n in timeline]).items():
        assert numbers == sorted(numbers), f"{key} out of order: {numbers}"


# -- the server restarted -------------------------------------------------------------------------


async def test_a_server_restart_mid_stream_loses_nothing(connect: Any, topic: str) -> None:
    keys = [f"key-{i}" for i in range(6)]
    total = 300
    confirmed: set[tuple[str, int]] = set()
    events: list[tuple[str, int]] = []

    async def handle(ctx: MessageContext[Item]) -> None:
        events.append((ctx.message.key, ctx.message.n))
        await asyncio.sleep(0.002)

    async def publish_all(broker: msgbroker.Broker) -> None:
        for start in range(0, total, 10):
            batch = [Item(key=keys[n % len(keys)], n=n) for n in range(start, start + 10)]
            while True:
                try:
                    await broker.publish_batch(topic, batch)
                    break
                except msgbroker.TransientError:
                    await asyncio.sleep(0.1)  # not confirmed: publish the same messages again
            confirmed.update((m.key, m.n) for m in batch)
            await asyncio.sleep(0.01)

    async with connect(redis={"claim_timeout": 10}) as broker:
        await broker.subscribe(topic, "workers", handle)
        publisher = asyncio.create_task(publish_all(broker))
        await wait_until(lambda: len(events) >= 60, what="the stream to be under way")
        restart = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "brokers"), "restart", "redis",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await restart.communicate()
        assert restart.returncode == 0, output.decode()[-2000:]
        await asyncio.wait_for(publisher, 60)
        await wait_until(lambda: {e for e in events} >= confirmed, timeout=60, what="every confirmed message")
        assert len(confirmed) == total
        await wait_until(lambda: _settled(broker, topic, "workers"), what="everything settled")
    for key, numbers in first_seen_in_order(events).items():
        assert numbers == sorted(numbers), f"{key} out of order across the restart: {numbers}"


async def test_dropped_connections_mid_stream_lose_nothing(
    connect: Any, raw: aioredis.Redis, prefix: str, topic: str
) -> None:
    keys = [f"key-{i}" for i in range(6)]
    total = 300
    events: list[tuple[str, int]] = []

    async def handle(ctx: MessageContext[Item]) -> None:
        events.append((ctx.message.key, ctx.message.n))
        await asyncio.sleep(0.001)

    async def drop_connections() -> int:
        killed = 0
        for client in await raw.client_list():
            if client.get("name") == f"msgbroker:{prefix}":
                killed += int(await raw.execute_command("CLIENT", "KILL", "ID", client["id"]))
        return killed

    async with connect() as broker:
        await broker.subscribe(topic, "workers", handle)
        await broker.publish_batch(topic, [Item(key=keys[n % len(keys)], n=n) for n in range(total)])
        for at in (50, 150, 250):
            await wait_until(lambda at=at: len(events) >= at, what=f"{at} handled")
            # (Reconnecting connections show no name until their CLIENT SETNAME: try again.)
            await wait_until(lambda: _dropped(drop_connections), what="this broker's connections to drop")
        await wait_until(lambda: {n for _, n in events} == set(range(total)), what="every message")
        await wait_until(lambda: _settled(broker, topic, "workers"), what="everything settled")
        assert await broker.is_healthy()
    for key, numbers in first_seen_in_order(events).items():
        assert numbers == sorted(numbers), f"{key} out of order across dropped connections: {numbers}"


# -- recovery from a flushed server ---------------------------------------------------------------


async def test_streams_and_groups_deleted_under_a_running_member_are_recreated(
    connect: Any, raw: aioredis.Redis, prefix: str, topic: str
) -> None:
    handled: list[int] = []

    async def handle(ctx: MessageContext[Item]) -> None:
        handled.append(ctx.message.n)

    async with connect() as broker:
        await broker.subscribe(topic, "workers", handle)
        await broker.publish_batch(topic, [Item(key=f"k{n}", n=n) for n in range(10)])
        await wait_until(lambda: len(handled) == 10, what="the first ten")
        await wait_until(lambda: _settled(broker, topic, "workers"), what="the first ten settled")
        # What FLUSHALL does to this test's keys, without touching anyone else's.
        doomed = [key async for key in raw.scan_iter(match=f"{prefix}:*", count=1000)]
        await raw.delete(*doomed)
        await broker.publish_batch(topic, [Item(key=f"k{n}", n=n) for n in range(10, 20)])
        await wait_until(lambda: set(range(10, 20)) <= set(handled), what="messages after the flush")
        assert await raw.exists(TopicKeys(prefix, topic).meta), "the topic's partition count was not recorded again"


# -- settings --------------------------------------------------------------------------------------


async def test_the_seed_appsettings_redis_section_drives_the_provider(
    redis_url: str, raw: aioredis.Redis, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert SEED_APPSETTINGS.is_file(), f"the seed's settings are not at {SEED_APPSETTINGS}"
    settings = BrokerSettings.from_file(SEED_APPSETTINGS, provider="redis", redis={"url": redis_url})
    assert settings.redis.key_prefix == "msgbroker"
    assert settings.redis.max_stream_length == 100_000
    assert settings.redis.claim_timeout.total_seconds() == 300
    got: list[int] = []

    async def handle(ctx: MessageContext[Item]) -> None:
        got.append(ctx.message.n)

    try:
        async with msgbroker.connect(settings) as broker:
            assert isinstance(broker.transport, RedisTransport)
            assert broker.transport.lease_ttl() == 300
            # The seed's 5 minutes stall a dead member's partitions that long: said once, at open.
            warned = [r.getMessage() for r in caplog.records if "claim_timeout is 0:05:00" in r.getMessage()]
            assert len(warned) == 1 and "default is 8s" in warned[0], caplog.text
            assert broker.transport.max_stream_length == 100_000
            await broker.publish(topic, Item(key="k", n=1))
            await broker.subscribe(topic, "workers", handle)
            await wait_until(lambda: got == [1], what="the message")
            assert await raw.exists(f"msgbroker:{{{topic}}}:meta")
            assert await raw.hget(f"msgbroker:{{{topic}}}:meta", "partitions") == b"64"
    finally:
        async for key in raw.scan_iter(match=f"msgbroker:{{{topic}}}*", count=1000):
            await raw.delete(key)


async def test_a_stackexchange_connection_string_is_accepted(redis_url: str, prefix: str) -> None:
    host_port = redis_url.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    settings = BrokerSettings(provider="redis", redis={"url": f"{host_port},abortConnect=false", "key_prefix": prefix})
    async with msgbroker.connect(settings) as broker:
        assert await broker.is_healthy()


async def test_an_existing_topic_with_another_partition_count_is_refused(connect: Any, topic: str) -> None:
    async with connect(partition_count=4) as broker:
        await broker.publish(topic, Item(key="k", n=1))
    async with connect(partition_count=8) as other:
        with pytest.raises(ConfigurationError, match="4 partitions"):
            await other.subscribe(topic, "workers", lambda ctx: asyncio.sleep(0))
        with pytest.raises(ConfigurationError, match="partition_count=8"):
            await other.publish(topic, Item(key="k", n=2))


async def test_pending_counts_every_entry_before_the_group_exists(connect: Any, topic: str) -> None:
    async with connect() as broker:
        await broker.publish_batch(topic, [Item(key=f"k{n}", n=n) for n in range(25)])
        assert await broker.pending_count(topic, "nobody-yet") == 25


async def test_hundreds_of_concurrent_publishes_wait_for_a_connection_instead_of_failing(
    connect: Any, topic: str
) -> None:
    """An API server publishes from every request at once: 300 concurrent ``publish()`` calls are
    more than the pool's ``redis.max_connections`` (100 by default), and each waits for a free
    connection (redis-py's default pool refused 200 of them with "Too many connections")."""
    async with connect() as broker:
        await broker.publish(topic, Item(key="k", n=-1))
        results = await asyncio.gather(*(broker.publish(topic, Item(key=f"k{n}", n=n)) for n in range(300)),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed == [], f"{len(failed)} of 300 concurrent publishes failed, e.g. {failed[0]!r}"
        assert await broker.pending_count(topic, "nobody-yet") == 301


async def test_an_unreachable_server_is_a_connection_error_naming_it() -> None:
    broker = msgbroker.connect("redis://127.0.0.1:1/0")
    with pytest.raises(msgbroker.BrokerConnectionError, match=r"127\.0\.0\.1:1"):
        await broker.open()
    assert not await broker.is_healthy()


def test_the_url_picks_the_redis_provider() -> None:
    for url in ("redis://127.0.0.1:6379", "rediss://127.0.0.1:6380"):
        broker = msgbroker.connect(url, redis={"key_prefix": f"x-{uuid.uuid4().hex[:6]}"})
        assert broker.provider == "redis"
        assert broker.settings.redis.url == url


@pytest.mark.parametrize("bad", ["x{y}", "a b", "p\n", "", "k" * 65])
def test_a_key_prefix_that_could_inject_into_a_key_is_refused_naming_it(bad: str) -> None:
    # a brace would move the Cluster hash tag off the topic; whitespace and newlines do not
    # belong in a key or a connection name
    with pytest.raises(ConfigurationError, match=re.escape(f"redis.key_prefix={bad!r}")):
        msgbroker.connect("redis://127.0.0.1:6379", redis={"key_prefix": bad})


# -- Redis Cluster and WAIT settings, against the single server -----------------------------------


async def test_several_urls_of_a_server_that_is_not_a_cluster_node_are_refused(redis_url: str, prefix: str) -> None:
    broker = msgbroker.connect(f"{redis_url},{redis_url}", redis={"key_prefix": prefix})
    with pytest.raises(ConfigurationError, match="not a cluster node"):
        await broker.open()


async def test_cluster_true_against_a_single_server_is_refused_naming_the_setting(redis_url: str,
                                                                                   prefix: str) -> None:
    broker = msgbroker.connect(redis_url, redis={"key_prefix": prefix, "cluster": True})
    with pytest.raises(ConfigurationError, match=r"redis\.cluster is true"):
        await broker.open()


async def test_a_single_server_is_found_not_to_be_a_cluster(connect: Any) -> None:
    async with connect() as broker:
        assert isinstance(broker.transport, RedisTransport)
        assert broker.transport.cluster is False


async def test_a_publish_no_replica_confirms_is_indeterminate_but_written(connect: Any, topic: str) -> None:
    """The test server has no replica: WAIT 1 runs out, on the publish's own connection, and the
    publish says so; the message is on the primary all the same (what a failover could lose)."""
    got: list[int] = []

    async def handle(ctx: MessageContext[Item]) -> None:
        got.append(ctx.message.n)

    async with connect(redis={"wait_replicas": 1, "wait_timeout": 0.2}) as broker:
        for batch in ([Item(key="k", n=1)], [Item(key=f"k{i}", n=i) for i in range(2, 1200)]):  # 1 call, 2 calls
            with pytest.raises(msgbroker.PublishIndeterminateError, match=r"0 of 1 replica\(s\)"):
                await broker.publish_batch(topic, batch)
        await broker.subscribe(topic, "workers", handle)  # group creation and acks wait too, and go on
        await wait_until(lambda: len(got) == 1199, what="every message handled")
        await wait_until(lambda: _pending_is(broker, topic, 0), what="every ack written")
    assert sorted(got) == list(range(1, 1200))


async def _pending_is(broker: msgbroker.Broker, topic: str, count: int) -> bool:
    return await broker.pending_count(topic, "workers") == count
