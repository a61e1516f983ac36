"""One lane's state inside a subscription, and the waits the lanes share."""

from __future__ import annotations

import asyncio
from collections import deque

from ._provider import Delivery

__all__ = ["LaneState", "failures_of", "wait_event"]


class LaneState:
    __slots__ = ("buffer", "data", "drained", "failures", "handed", "held_until", "in_flight", "lease", "partition",
                 "queued", "stopped", "stopping", "task", "waiting")

    def __init__(self, partition: int, lease: str | None) -> None:
        self.partition = partition
        self.lease = lease
        self.buffer: deque[Delivery] = deque()
        self.data = asyncio.Event()
        # Failed attempts of the deliveries that were retried here (an entry only once one is).
        self.failures: dict[Delivery, int] = {}
        # Ordered: the head of the buffer when its current attempt was handed to the handler
        # (None again once a retry announced the next attempt and until that is handed).
        self.handed: Delivery | None = None
        # Unordered: deliveries retried here whose next attempt was not handed yet.
        self.waiting: set[Delivery] = set()
        self.held_until = 0.0
        self.in_flight = 0
        self.queued = False  # unordered: in the runner's queue of lanes with work
        self.drained: asyncio.Future[None] | None = None  # unordered: resolved at in_flight 0
        self.stopping = False
        self.stopped: asyncio.Future[None] | None = None  # set once a stop began; resolved when it ended
        self.task: asyncio.Task[None] | None = None


def failures_of(lane: LaneState, delivery: Delivery) -> int:
    """How many of the delivery's earlier attempts failed: counted here once it was retried
    here, else what the provider knows, else (unknown past) every earlier delivery, crashes
    included."""
    failures = lane.failures.get(delivery)
    if failures is None:
        known = delivery.failures
        failures = max(0, delivery.attempt - 1) if known is None else known
    return failures


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` passed; True when it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it returns normally when the waiting task is
    cancelled in the loop iteration in which the event is set, swallowing the cancellation (a
    lane then went on waiting out a delay and ``abort()`` hung). ``asyncio.timeout`` keeps an
    outside cancellation apart from its own."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
