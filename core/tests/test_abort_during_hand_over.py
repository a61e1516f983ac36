"""A member that dies (abort) while handing a lane over must not leave the hand-over running:
it would wake after the connection closed and fail unobserved ("Task exception was never
retrieved"), or release a lease the crash should have left held. Found by the conformance
suite's state machine.

A member that closes while handing a lane over must release that lane's lease only after the
lane is closed (its provider handed back what it held): released earlier, the next owner takes
the lane while the closing member still holds messages of it, and reads later ones first. Found
by the NATS conformance run (``test_close_under_load_loses_nothing``: a key handled out of order
across the close)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgbroker
from msgbroker import Lane, Message, MessageContext, partition_for


class Job(Message):
    key: str

    @property
    def partition_key(self) -> str:
        return self.key


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_abort_cancels_a_hand_over_waiting_for_its_handler() -> None:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    settings: dict[str, Any] = {"partition_count": 4, "memory": {"claim_timeout": 0.4}, "shutdown_timeout": 30}
    first = await msgbroker.connect("memory://abort-during-hand-over", **settings)
    stuck = asyncio.Event()

    async def hang(ctx: MessageContext[Job]) -> None:
        await stuck.wait()  # never set: every lane of the first member stays busy

    subscription = await first.subscribe("jobs", "workers", hang)
    keys = [next(f"k{i}" for i in range(1000) if partition_for(f"k{i}", 4) == p) for p in range(4)]
    await first.publish_batch("jobs", [Job(key=k) for k in keys])
    coordinator = subscription._runner._coordinator
    assert coordinator is not None
    joined = []
    for _ in range(3):  # until a joiner's share makes the first member hand a busy lane over
        joined.append(await msgbroker.connect("memory://abort-during-hand-over", **settings))
        await joined[-1].subscribe("jobs", "workers", hang)
        try:
            await _until(lambda: bool(coordinator._draining), timeout=2)
            break
        except AssertionError:
            continue
    draining = dict(coordinator._draining)
    assert draining, "no hand-over started"
    member = subscription.member_id
    server = joined[0].transport.server  # the shared in-memory broker
    await first.abort()
    await asyncio.sleep(0.05)
    assert all(task.done() for task in draining.values()), "abort left a hand-over running"
    for partition in draining:
        lease = server.leases.get(Lane("jobs", "workers", partition))
        assert lease is not None and lease.member == member, (
            f"the crashed member released partition {partition}: a crash releases nothing"
        )
    for broker in joined:
        await broker.abort()
    await asyncio.sleep(0)
    assert not [e for e in errors if "never retrieved" in str(e.get("message", ""))], errors


async def test_close_releases_a_lane_in_hand_over_only_once_it_is_closed() -> None:
    url = "memory://close-during-hand-over"
    settings: dict[str, Any] = {"partition_count": 4, "memory": {"claim_timeout": 0.4}, "shutdown_timeout": 30}
    first = await msgbroker.connect(url, **settings)
    go = asyncio.Event()

    async def wait_for_go(ctx: MessageContext[Job]) -> None:
        await go.wait()

    subscription = await first.subscribe("jobs", "workers", wait_for_go)
    keys = [next(f"k{i}" for i in range(1000) if partition_for(f"k{i}", 4) == p) for p in range(4)]
    await first.publish_batch("jobs", [Job(key=k) for k in keys])
    runner = subscription._runner
    coordinator = runner._coordinator
    assert coordinator is not None
    server = first.transport.server  # the shared in-memory broker
    member = subscription.member_id

    # The order of events on the first member: a lane closed (the provider's close_lane
    # returned) and a lease released, per partition.
    events: list[tuple[str, int]] = []
    consumer, transport = runner.consumer, runner.transport
    close_lane, release_lease = consumer.close_lane, transport.release_lease

    closing_lanes: set[int] = set()
    handing_over: set[int] = set()

    async def slow_close_lane(partition: int) -> None:
        if partition in closing_lanes:
            return  # as a provider may: that lane is being closed already
        closing_lanes.add(partition)
        # A provider handing back what it held takes round trips: longer for a busier lane.
        await asyncio.sleep(0.5 if partition in handing_over else 0.0)
        await close_lane(partition)
        events.append(("closed", partition))

    async def recording_release(lane: Lane, token: str) -> None:
        events.append(("released", lane.partition))
        await release_lease(lane, token)

    consumer.close_lane = slow_close_lane  # type: ignore[method-assign]
    transport.release_lease = recording_release  # type: ignore[method-assign]

    joined = []
    for _ in range(3):  # until a joiner's share makes the first member hand a busy lane over
        joined.append(await msgbroker.connect(url, **settings))
        await joined[-1].subscribe("jobs", "workers", wait_for_go)
        try:
            await _until(lambda: bool(coordinator._draining), timeout=2)
            break
        except AssertionError:
            continue
    handing_over.update(coordinator._draining)
    assert handing_over, "no hand-over started"
    closing = asyncio.create_task(first.close())
    await asyncio.sleep(0.05)
    for partition in handing_over:  # still in its handler: nothing released yet
        lease = server.leases.get(Lane("jobs", "workers", partition))
        assert lease is not None and lease.member == member
    go.set()
    await closing
    for partition in handing_over:
        assert ("closed", partition) in events, f"partition {partition} was never closed: {events}"
        assert ("released", partition) in events, f"partition {partition} was never released: {events}"
        assert events.index(("closed", partition)) < events.index(("released", partition)), (
            f"partition {partition}'s lease was released before the lane was closed: {events}"
        )
    for broker in joined:
        await broker.close()


def slow_down(transport: Any, method: str, delay: float) -> None:
    """Each consumer ``transport`` makes from now on waits ``delay`` seconds before ``method``."""
    make_consumer = transport.consumer

    def consumer(topic: str, group: str, member_id: str) -> Any:
        made = make_consumer(topic, group, member_id)
        real = getattr(made, method)

        async def slowed(*args: Any) -> Any:
            await asyncio.sleep(delay)
            return await real(*args)

        setattr(made, method, slowed)
        return made

    transport.consumer = consumer


async def test_members_subscribing_together_see_each_other_however_long_their_consumers_take_to_start() -> None:
    """A member announces itself while its provider's consumer starts (streams and consumers
    checked: from a few to a hundred milliseconds, varying between worker processes on few
    cores). It announced only after that start, so a member whose start was quick saw itself
    alone at the end of its join window, took every lane and handed half of them over a moment
    later (on NATS 2.9 a hand-over holds the lane's read-ahead back for two seconds)."""
    url = "memory://join-while-starting"
    settings: dict[str, Any] = {"partition_count": 16}
    quick = await msgbroker.connect(url, **settings)
    slow = await msgbroker.connect(url, **settings)
    asked: list[int] = []
    acquire = quick.transport.acquire_leases

    async def recorded(lanes: Any, member_id: str, ttl: float) -> dict[Lane, str]:
        asked.append(len(lanes))
        return await acquire(lanes, member_id, ttl)

    quick.transport.acquire_leases = recorded  # type: ignore[method-assign]
    slow_down(slow.transport, "start", 0.2)

    async def handle(ctx: MessageContext[Job]) -> None:
        await ctx.ack()

    try:
        first, second = await asyncio.gather(quick.subscribe("jobs", "workers", handle),
                                             slow.subscribe("jobs", "workers", handle))
        assert asked and max(asked) <= 8, f"the quick member asked for {asked} lanes: it did not see the other"
        assert len(first.partitions) == len(second.partitions) == 8
    finally:
        await quick.close()
        await slow.close()


async def test_a_member_renews_its_leases_while_its_lanes_start_however_long_that_takes() -> None:
    """The lanes a member takes are started before its next beat. With a thousand lanes that
    start took longer than a lease lasts (NATS, 1,024 partitions: 2.7 s, the default lease
    2.5 s), no renewal went out meanwhile, and the member lost every lease it had just taken.
    Here each of 16 lanes takes 0.1 s to start (1.6 s in all) under a 0.8-s lease, renewed every
    0.2 s: every held lease must be renewed within its lease time all along."""
    ttl = 0.8
    broker = await msgbroker.connect("memory://renew-while-starting", partition_count=16,
                                     memory={"claim_timeout": ttl})
    transport = broker.transport
    taken_at: dict[int, float] = {}
    renewed_at: dict[int, list[float]] = {}
    acquire, renew = transport.acquire_leases, transport.renew_leases

    async def acquired(lanes: Any, member_id: str, ttl: float) -> dict[Lane, str]:
        tokens = await acquire(lanes, member_id, ttl)
        taken_at.update((lane.partition, asyncio.get_running_loop().time()) for lane in tokens)
        return tokens

    async def renewed(leases: Any, ttl: float) -> set[Lane]:
        kept = await renew(leases, ttl)
        for lane in kept:
            renewed_at.setdefault(lane.partition, []).append(asyncio.get_running_loop().time())
        return kept

    transport.acquire_leases = acquired  # type: ignore[method-assign]
    transport.renew_leases = renewed  # type: ignore[method-assign]
    slow_down(transport, "open_lane", 0.1)

    async def handle(ctx: MessageContext[Job]) -> None:
        await ctx.ack()

    try:
        sub = await broker.subscribe("jobs", "workers", handle)
        await asyncio.sleep(ttl)
        assert len(taken_at) == 16 and sorted(sub.partitions) == list(range(16))
        end = asyncio.get_running_loop().time()
        for partition, start in taken_at.items():
            times = [start, *renewed_at.get(partition, []), end]
            gap = max(b - a for a, b in itertools.pairwise(times))
            assert gap < ttl, f"lease of partition {partition} went {gap:.2f}s without a renewal (lease {ttl}s)"
    finally:
        await broker.close()
