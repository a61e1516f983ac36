"""Which member reads which lane: balanced rendezvous assignment over the live members, and
the lease coordinator that keeps a member's exclusive leases (``Transport.ASSIGNMENT ==
"leases"``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ._partitioner import murmur2
from ._provider import Lane, Transport

if TYPE_CHECKING:
    from ._settings import BrokerSettings

__all__ = ["LaneOwner", "LeaseCoordinator", "announce", "assign_partitions"]

log = logging.getLogger("msgbroker")


def assign_partitions(partition_count: int, members: Sequence[str]) -> dict[int, str]:
    """Balanced rendezvous hashing: each partition goes to its highest-ranked member that has
    fewer than ``ceil(partitions / members)`` partitions. Every member computes the same map,
    loads differ by at most one, and a member joining or leaving moves few partitions."""
    ordered = sorted(set(members))
    if not ordered:
        return {}
    cap = -(-partition_count // len(ordered))
    load = dict.fromkeys(ordered, 0)
    owners: dict[int, str] = {}
    for partition in range(partition_count):
        ranked = sorted(ordered, key=lambda m: (murmur2(f"{m}/{partition}".encode()), m), reverse=True)
        owner = next(m for m in ranked if load[m] < cap)
        load[owner] += 1
        owners[partition] = owner
    return owners


class LaneOwner(Protocol):
    """The subscription side the coordinator drives: who it is, and the lane calls."""

    transport: Transport
    settings: BrokerSettings
    topic: str
    group: str
    member_id: str
    only_partition: int | None

    @property
    def closing(self) -> bool: ...

    async def assigned(self, partitions: Sequence[int], leases: dict[int, str] | None = None) -> None: ...

    async def revoked(self, partitions: Sequence[int]) -> None: ...

    async def lost(self, partitions: Sequence[int]) -> None: ...


RELEASES_AT_ONCE = 16
"""Lease releases a member's hand-overs send at the same time (the rest wait their turn)."""
SETTLING_BEATS = 10
"""Beats per heartbeat interval while the membership is settling (see LeaseCoordinator.run)."""
SETTLING_FOR = 2
"""Heartbeat intervals a member beats fast after it joined or saw the membership change."""


async def announce(runner: LaneOwner) -> float:
    """A subscribing member's first heartbeat; returns when it was done (``time.monotonic``).
    The engine sends it while the provider's consumer starts: how long that start takes varies
    between members (streams and consumers checked, with several processes on few cores from a
    few to a hundred milliseconds), and a member announced only after it missed the join window
    of the members that started faster — the first one then saw itself alone and took every lane."""
    transport = runner.transport
    await transport.heartbeat(runner.topic, runner.group, runner.member_id, transport.lease_ttl())
    return time.monotonic()


class LeaseCoordinator:
    """Membership heartbeats, rendezvous assignment and exclusive leases over the provider's
    primitives (``Transport.ASSIGNMENT == "leases"``)."""

    def __init__(self, runner: LaneOwner) -> None:
        self.runner = runner
        self._desired: tuple[tuple[str, ...], set[int]] | None = None
        """The last membership and this member's partitions under it (the map is computed
        again only when the membership changes: at 1,024 partitions it is 1,024 hashes per
        member at every heartbeat)."""
        self.transport = runner.transport
        self.ttl = self.transport.lease_ttl()
        self.interval = max(0.05, min(1.0, self.ttl / 4))
        self.settling_interval = max(0.05, self.interval / SETTLING_BEATS)
        self._settling_until = time.monotonic() + SETTLING_FOR * self.interval
        """Until then (and while a lane it should read is still held by another member) the member
        beats every ``settling_interval``: members that start together see each other, and a lane
        handed over is taken, within a fraction of the interval instead of a whole one."""
        self._wanting = False
        self._renewed_at = 0.0
        self._renewing = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None
        """Renews while lanes start (see ``_renew_until``); kept here so the task is not collected."""
        self.held: dict[int, str] = {}
        self._draining: dict[int, asyncio.Task[None]] = {}
        self._releasing = asyncio.Semaphore(RELEASES_AT_ONCE)
        """A member handing over 128 lanes at once (a newcomer on 256 partitions) released them in
        128 concurrent calls: past a client's connection pool (redis-py: 100) each failed, and the
        newcomer waited for the leases to expire."""

    @property
    def draining(self) -> list[asyncio.Task[None]]:
        """Hand-overs in progress (a crash cancels them: they must not release a lease)."""
        return list(self._draining.values())

    def _lane(self, partition: int) -> Lane:
        return Lane(self.runner.topic, self.runner.group, partition)

    async def run(self) -> None:
        # Checks _closing too: a provider call that swallows the cancellation must not keep
        # close() waiting for this loop forever.
        while not self.runner.closing:
            settling = self._wanting or time.monotonic() < self._settling_until
            await asyncio.sleep(self.settling_interval if settling else self.interval)
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("msgbroker: membership of %s/%s failed: %s", self.runner.topic, self.runner.group, exc)

    async def join(self, announced_at: float | None = None) -> None:
        """The first beat of a member that subscribes: announce itself (unless :func:`announce`
        did, at ``announced_at``), wait the rest of the transport's ``JOIN_WINDOW``, then compute
        the assignment and take its lanes. Workers started together (a deployment, a worker pool)
        then see each other before any takes a lane: without the wait the first one took every
        lane, read ahead on all of them and handed most of them over a moment later (an in-flight
        message finished, read-ahead handed back, a lease released and taken) — four workers
        draining a backlog were slower than one."""
        if self.runner.only_partition is None:
            if announced_at is None:
                announced_at = await announce(self.runner)
            rest = self.transport.JOIN_WINDOW - (time.monotonic() - announced_at)
            if rest > 0:
                await asyncio.sleep(rest)
        await self.beat()

    async def beat(self) -> None:
        runner = self.runner
        count = runner.settings.partition_count
        if runner.only_partition is not None:
            desired = {runner.only_partition}
        else:
            members = await self.transport.heartbeat(runner.topic, runner.group, runner.member_id, self.ttl)
            if runner.member_id not in members:
                members = [*members, runner.member_id]
            membership = tuple(sorted(set(members)))
            if self._desired is None or self._desired[0] != membership:
                if self._desired is not None:
                    self._settling_until = time.monotonic() + SETTLING_FOR * self.interval
                owners = assign_partitions(count, membership)
                self._desired = membership, {p for p, owner in owners.items() if owner == runner.member_id}
            desired = set(self._desired[1])
        now = time.monotonic()
        if self.held and now - self._renewed_at >= self.interval * 0.9:
            # Renewed once an interval, however fast the member beats while settling.
            self._renewed_at = now
            async with self._renewing:
                kept = await self.transport.renew_leases({self._lane(p): t for p, t in self.held.items()}, self.ttl)
            lost = [p for p in self.held if self._lane(p) not in kept]
            for partition in lost:
                log.warning("msgbroker: lease of %s[%d] for %s was lost", runner.topic, partition, runner.group)
                self.held.pop(partition, None)
                task = self._draining.pop(partition, None)
                if task:
                    task.cancel()
            if lost:
                await runner.lost(lost)
        for partition in list(self.held):
            if partition not in desired and partition not in self._draining:
                log.debug("msgbroker: %s hands %s[%d] for %s over", runner.member_id, runner.topic, partition,
                          runner.group)
                self._draining[partition] = asyncio.create_task(self._hand_over(partition))
        wanted = sorted(desired - set(self.held))
        self._wanting = False
        if wanted:
            lanes = {self._lane(p): p for p in wanted}
            tokens = await self.transport.acquire_leases(list(lanes), runner.member_id, self.ttl)
            taken = {lanes[lane]: token for lane, token in tokens.items() if lane in lanes}
            # Still held by another member (handing it over, or dead: then it is free only once
            # its lease ends, and the fast beats stop after the settling time).
            self._wanting = len(taken) < len(wanted) and time.monotonic() < self._settling_until + self.ttl
            if taken:
                log.debug("msgbroker: %s took %d of the %d lanes of %s/%s it wants (%d members)", runner.member_id,
                          len(taken), len(wanted), runner.topic, runner.group,
                          len(self._desired[0]) if self._desired else 1)
                self.held.update(taken)
                opened = asyncio.Event()
                self._renewer = asyncio.create_task(self._renew_until(opened))
                try:
                    await runner.assigned(sorted(taken), taken)
                finally:
                    opened.set()  # the renewer ends by itself (one in progress completes)

    async def _renew_until(self, opened: asyncio.Event) -> None:
        """While the engine starts the lanes just taken (until ``opened``), renew the held leases
        every interval. A member that took a thousand lanes took longer to start them than a
        lease lasts (NATS, 1,024 partitions: 2.7 s, the default lease 2.5 s): with no renewal
        meanwhile it lost every lease at its next beat, and each lane then waited for what it had
        read to come back (~25 s). A lease found lost here is left to the next beat: a lost lease
        stays lost, and that beat hands it on as usual. Renewals never overlap (``_renewing``):
        two revision-checked renewals of one lease at once would fail one of them."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.wait(), self.interval)
            if opened.is_set() or self.runner.closing:
                return
            async with self._renewing:
                self._renewed_at = time.monotonic()
                try:
                    await self.transport.renew_leases({self._lane(p): t for p, t in self.held.items()}, self.ttl)
                except Exception as exc:  # the beat after the opening renews (and reports) again
                    log.debug("msgbroker: renewing leases of %s/%s while its lanes open failed: %s",
                              self.runner.topic, self.runner.group, exc)

    async def _hand_over(self, partition: int) -> None:
        """Rebalance: finish the in-flight message, then release the lane."""
        try:
            await self.runner.revoked([partition])
            token = self.held.pop(partition, None)
            if token is not None:
                async with self._releasing:
                    await self.transport.release_lease(self._lane(partition), token)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the lease then ends by itself, a claim timeout later
            log.warning("msgbroker: releasing %s[%d] for %s failed (%s); it is free once its lease runs out",
                        self.runner.topic, partition, self.runner.group, exc)
        finally:
            self._draining.pop(partition, None)

    async def finish_hand_overs(self) -> None:
        """Wait for the hand-overs in progress (each closes its lane, then releases it)."""
        while self._draining:
            await asyncio.gather(*self._draining.values(), return_exceptions=True)

    async def release_all(self) -> None:
        for partition, token in list(self.held.items()):
            with contextlib.suppress(Exception):
                await self.transport.release_lease(self._lane(partition), token)
        self.held.clear()
