"""A member that dies (abort) while handing a lane over must not leave the hand-over running:
it would wake after the connection closed and fail unobserved ("Task exception was never
retrieved"), or release a lease the crash should have left held. Found by the conformance
suite's state machine."""

from __future__ import annotations

import asyncio
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
