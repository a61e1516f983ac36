"""``Transport.describe`` on the real Kafka: the group coordinator's members and assignment
(DescribeGroups) as the dashboard shows them (docs/dashboard.md) — two members sharing the
partitions, then one left holding all after the other closes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from msgbroker import Message, MessageContext


class Job(Message):
    pass


async def _until(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"waited {timeout:g}s for {what}; last {last!r}")


async def test_describe_shows_the_groups_members_and_their_partitions(
    connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    topic, group = names("describe"), names("group")
    first, second = await connect(partition_count=4), await connect(partition_count=4)

    async def handle(ctx: MessageContext[Job]) -> None:
        return None

    subs = [await b.subscribe(topic, group, handle, message_type=Job) for b in (first, second)]

    async def shared() -> Any:
        view = await first.transport.describe(topic, group)
        held = sorted(p for m in view.members or () for p in m.partitions)
        return view if len(view.members or ()) == 2 and held == [0, 1, 2, 3] and all(
            m.partitions for m in view.members or ()) else None

    view = await _until(shared, "two members sharing the 4 partitions")
    assert view.owners_known and {p.owner for p in view.partitions} == {m.member_id for m in view.members}
    await subs[1].close()

    async def alone() -> Any:
        view = await first.transport.describe(topic, group)
        return view if [m.partitions for m in view.members or ()] == [(0, 1, 2, 3)] else None

    await _until(alone, "the member left holding every partition")
