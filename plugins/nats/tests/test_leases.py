"""The NATS provider's lane leases against the real nats-server (msgbroker_nats/_leases.py): a
renewal writes one key per member however many lanes it holds, and a member whose incarnation
aged out holds nothing again, whether or not another member took its lanes meanwhile."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from msgbroker.spi import Lane
from msgbroker_nats import NatsTransport, _leases
from nats.aio.client import Client


async def _last_seq(raw: Client, stream: str) -> int:
    return int((await raw.jsm().stream_info(stream)).state.last_seq)


async def _aged_out(transport: NatsTransport, token: str) -> None:
    """Wait (bounded) past the lease time until the token's incarnation key is gone."""
    name = token.rpartition(":")[0]
    kv = await transport.pins()
    deadline = time.monotonic() + transport.lease_ttl() + 10
    await asyncio.sleep(transport.lease_ttl())
    while time.monotonic() < deadline:
        try:
            await kv.get(_leases.life_key(name))
        except Exception:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the key of {name} did not age out")


async def test_renewing_a_member_s_256_leases_writes_one_key(connect: Any, raw: Client, prefix: str,
                                                             topic: str) -> None:
    async with connect(partition_count=256) as broker:
        transport = broker.transport
        assert isinstance(transport, NatsTransport)
        lanes = [Lane(topic, "g", p) for p in range(256)]
        taken = await transport.acquire_leases(lanes, "m1", transport.lease_ttl())
        assert set(taken) == set(lanes)
        pins, attempts = await _last_seq(raw, f"KV_{prefix}_pins"), await _last_seq(raw, f"KV_{prefix}_attempts")
        for _ in range(3):
            assert await transport.renew_leases(taken, transport.lease_ttl()) == set(lanes)
        assert await _last_seq(raw, f"KV_{prefix}_pins") - pins == 3, "one write per renewal"
        assert await _last_seq(raw, f"KV_{prefix}_attempts") == attempts, "no lane key rewritten"
        assert all(transport.lease_is_fresh(token) for token in taken.values())


async def test_lane_keys_are_rewritten_once_in_a_while_so_the_attempts_bucket_keeps_them(
    connect: Any, raw: Client, prefix: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with connect() as broker:
        transport = broker.transport
        assert isinstance(transport, NatsTransport)
        lanes = [Lane(topic, "g", p) for p in range(4)]
        taken = await transport.acquire_leases(lanes, "m1", transport.lease_ttl())
        attempts = await _last_seq(raw, f"KV_{prefix}_attempts")
        monkeypatch.setattr(_leases, "LANE_REFRESH", 0.0)
        assert await transport.renew_leases(taken, transport.lease_ttl()) == set(lanes)
        assert await _last_seq(raw, f"KV_{prefix}_attempts") - attempts == 4
        # Revision-checked: a lane key another member wrote meanwhile is not ours any more.
        kv = await transport.failure_counts()
        await kv.put(_leases.lane_key(lanes[0]), b"someone-else.0")
        assert await transport.renew_leases(taken, transport.lease_ttl()) == set(lanes[1:])
        assert not await transport.holds_lease(topic, "g", 0, taken[lanes[0]])


async def test_settles_after_a_late_beat_renew_the_member_s_key_once_rather_than_read_each_lane(
    connect: Any, raw: Client, prefix: str, topic: str
) -> None:
    """A settle checks its lease when the member has not renewed it for half the lease time (a
    late beat). It renews it then: one write, shared by every settle waiting on it; before, each
    such settle read the lane's key and the member's."""
    async with connect() as broker:
        transport = broker.transport
        assert isinstance(transport, NatsTransport)
        lanes = [Lane(topic, "g", p) for p in range(4)]
        taken = await transport.acquire_leases(lanes, "m1", transport.lease_ttl())
        await asyncio.sleep(transport.lease_ttl() * 0.55)  # past half, well before the end
        pins = await _last_seq(raw, f"KV_{prefix}_pins")
        held = await asyncio.gather(*(transport.holds_lease(topic, "g", lane.partition, taken[lane]) for lane in lanes))
        assert held == [True] * 4
        assert await _last_seq(raw, f"KV_{prefix}_pins") - pins == 1, "one renewal for the four settles"
        assert all(transport.lease_is_fresh(token) for token in taken.values())


async def test_a_member_whose_incarnation_aged_out_holds_nothing_and_another_takes_its_lanes(
    connect: Any, topic: str
) -> None:
    async with connect() as first, connect() as second:
        a, b = first.transport, second.transport
        assert isinstance(a, NatsTransport) and isinstance(b, NatsTransport)
        lanes = [Lane(topic, "g", p) for p in range(4)]
        held = await a.acquire_leases(lanes, "m1", a.lease_ttl())
        assert set(held) == set(lanes)
        assert await b.acquire_leases(lanes, "m2", b.lease_ttl()) == {}, "held by a live member"
        assert await b.holds_lease(topic, "g", 0, next(iter(held.values()))) is False  # not b's token

        await _aged_out(a, held[lanes[0]])  # m1 paused past its lease time
        taken = await b.acquire_leases(lanes, "m2", b.lease_ttl())
        assert set(taken) == set(lanes), "the lanes of an incarnation that ended are free"
        # Made sure of by a write: its key is there again, marked ended, so no renewal can pass.
        ended = await (await b.pins()).get(_leases.life_key(held[lanes[0]].rpartition(":")[0]))
        assert ended.value == b"ended"
        assert not a.lease_is_fresh(held[lanes[0]])
        assert not await a.holds_lease(topic, "g", 0, held[lanes[0]])
        assert await a.renew_leases(held, a.lease_ttl()) == set(), "m1 woke up holding nothing"
        assert await b.renew_leases(taken, b.lease_ttl()) == set(lanes)
        assert await a.acquire_leases(lanes, "m1", a.lease_ttl()) == {}, "m2 lives: m1 cannot take them back"


async def test_a_member_that_woke_up_before_anyone_took_its_lanes_holds_nothing_until_it_takes_them_again(
    connect: Any, topic: str
) -> None:
    async with connect() as broker:
        transport = broker.transport
        assert isinstance(transport, NatsTransport)
        lanes = [Lane(topic, "g", p) for p in range(4)]
        held = await transport.acquire_leases(lanes, "m1", transport.lease_ttl())
        await _aged_out(transport, held[lanes[0]])
        assert not await transport.holds_lease(topic, "g", 1, held[lanes[1]])
        assert await transport.renew_leases(held, transport.lease_ttl()) == set()
        again = await transport.acquire_leases(lanes, "m1", transport.lease_ttl())
        assert set(again) == set(lanes)
        assert set(again.values()).isdisjoint(held.values()), "a new incarnation's tokens"
        assert await transport.holds_lease(topic, "g", 1, again[lanes[1]])
        await transport.release_lease(lanes[1], again[lanes[1]])
        assert not await transport.holds_lease(topic, "g", 1, again[lanes[1]])
        assert await transport.renew_leases(again, transport.lease_ttl()) == {lanes[0], lanes[2], lanes[3]}


async def test_a_lane_taken_again_while_its_release_is_on_its_way_stays_held_once(connect: Any, topic: str) -> None:
    """A member hands a lane over and wants it back before the release went out (the membership
    changed back): the new taking and the late release of the old one must not both succeed.
    With one token per lane and member, the release ended the new taking's key while the member
    went on renewing it, and another member took the lane meanwhile: two readers of one lane."""
    async with connect() as first, connect() as second:
        a, b = first.transport, second.transport
        assert isinstance(a, NatsTransport) and isinstance(b, NatsTransport)
        lane = Lane(topic, "g", 0)
        old = (await a.acquire_leases([lane], "m1", a.lease_ttl()))[lane]
        new = (await a.acquire_leases([lane], "m1", a.lease_ttl()))[lane]
        assert new != old, "one token per taking"
        await a.release_lease(lane, old)  # the release of the hand-over, late
        assert await a.holds_lease(topic, "g", 0, new)
        assert await a.renew_leases({lane: new}, a.lease_ttl()) == {lane}
        assert await b.acquire_leases([lane], "m2", b.lease_ttl()) == {}, "still held by m1"
        await a.release_lease(lane, new)
        assert set(await b.acquire_leases([lane], "m2", b.lease_ttl())) == {lane}


async def test_a_lease_taken_while_the_bucket_s_stream_does_not_answer_is_taken_once_it_does(
    connect: Any, raw: Client, prefix: str, topic: str
) -> None:
    """On a cluster electing a leader (after a rolling restart) the attempts bucket's stream
    answers "no responders" for a moment, and a subscribe then failed. Here the stream is gone
    for 0.3 s instead: the same answer, and nothing stored meanwhile."""
    async with connect() as broker:
        transport = broker.transport
        assert isinstance(transport, NatsTransport)
        await transport.failure_counts()
        stream = f"KV_{prefix}_attempts"
        config = (await raw.jsm().stream_info(stream)).config
        await raw.jsm().delete_stream(stream)

        async def back() -> None:
            await asyncio.sleep(0.3)
            await raw.jsm().add_stream(config)

        returning = asyncio.create_task(back())
        lane = Lane(topic, "g", 0)
        taken = await transport.acquire_leases([lane], "m1", transport.lease_ttl())
        await returning
        assert set(taken) == {lane}
        entry = await (await transport.failure_counts()).get(_leases.lane_key(lane))
        assert entry.value == taken[lane].rpartition(":")[0].encode()


async def test_a_member_that_left_is_forgotten(connect: Any, topic: str) -> None:
    """A subscription closed and opened again all day must not leave an entry each time."""
    async with connect() as broker:
        transport = broker.transport
        assert isinstance(transport, NatsTransport)

        async def handle(ctx: Any) -> None:
            return None

        for _ in range(3):
            subscription = await broker.subscribe(topic, "g", handle)
            assert subscription.partitions, "it took lanes (one incarnation kept meanwhile)"
            await subscription.close()
        leases = transport._leases
        assert (leases._lives, leases._by_name, leases._locks, leases._held) == ({}, {}, {}, {})


class _Requests:
    """Counts the requests a connection sends (each KV read and write is one)."""

    def __init__(self, transport: NatsTransport, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        nc = transport.nc
        send = nc.request

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await send(*args, **kwargs)

        monkeypatch.setattr(nc, "request", counted)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


async def test_taking_a_released_or_a_held_lane_reads_its_key_once(
    connect: Any, raw: Client, prefix: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane is mostly taken again (a restart, a rebalance) or asked for while another member
    holds it. nats-py's ``create`` over a released key (a delete marker) cost three requests, and
    three before a held key's holder was known, whose life was then asked about once per lane (three
    more); now one read, and one write where it is free, and each holder is asked about once."""
    async with connect(partition_count=8) as first, connect(partition_count=8) as second:
        a, b = first.transport, second.transport
        assert isinstance(a, NatsTransport) and isinstance(b, NatsTransport)
        lanes = [Lane(topic, "g", p) for p in range(8)]
        taken = await a.acquire_leases(lanes, "m1", a.lease_ttl())
        assert set(taken) == set(lanes)
        await b.acquire_leases([Lane(topic, "other", 0)], "m2", b.lease_ttl())  # m2's incarnation exists
        requests = _Requests(b, monkeypatch)
        writes = await _last_seq(raw, f"KV_{prefix}_attempts")
        assert await b.acquire_leases(lanes, "m2", b.lease_ttl()) == {}, "held by m1, which lives"
        assert requests.take() == 8 + 2, "one read a lane; m1's life asked once (a refused write, a read)"
        assert await _last_seq(raw, f"KV_{prefix}_attempts") == writes, "nothing written"
        for lane in lanes[:4]:
            await a.release_lease(lane, taken[lane])
        writes = await _last_seq(raw, f"KV_{prefix}_attempts")
        again = await b.acquire_leases(lanes, "m2", b.lease_ttl())
        assert set(again) == set(lanes[:4]), "the released ones"
        assert requests.take() == 8 + 4 + 2, "a read a lane, a write for each released one, m1 asked once"
        assert await _last_seq(raw, f"KV_{prefix}_attempts") - writes == 4
        for lane in lanes[:4]:
            assert await b.holds_lease(topic, "g", lane.partition, again[lane])
        for lane in lanes[4:]:
            assert await a.holds_lease(topic, "g", lane.partition, taken[lane])


async def test_the_first_subscriber_of_a_group_creates_its_lane_keys_with_one_request_each(
    connect: Any, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lanes whose consumer the member created itself have no lease key yet: created at
    once. A key there anyway (the consumer was deleted, the key was not) is read and taken as
    any other."""
    async with connect(partition_count=8) as broker, connect(partition_count=8) as other:
        transport, holder = broker.transport, other.transport
        assert isinstance(transport, NatsTransport) and isinstance(holder, NatsTransport)
        lanes = [Lane(topic, "g", p) for p in range(8)]
        # Partition 7's key is there already, held by another member.
        held = await holder.acquire_leases([lanes[7]], "m2", holder.lease_ttl())
        await transport.ensure_stream(transport.layout(topic), None)
        await transport.ensure_consumers(transport.layout(topic), "g", range(8))
        await transport.pins()
        await transport.failure_counts()
        requests = _Requests(transport, monkeypatch)
        taken = await transport.acquire_leases(lanes, "m1", transport.lease_ttl())
        assert set(taken) == set(lanes[:7])
        # One write per new key; for partition 7 the refused create, a read, and m2's life asked
        # (a refused write, a read). The member's incarnation: one write more.
        assert requests.take() == 7 + 2 + 2 + 1
        assert await holder.holds_lease(topic, "g", 7, held[lanes[7]])
