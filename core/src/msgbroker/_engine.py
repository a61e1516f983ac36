"""The consumption engine, written once: a subscription's lanes (reading, ordered lanes, the
unordered worker pool), bounded concurrency, graceful shutdown and crash simulation.
Assignment is in ``_assignment``, handling and settling one delivery in ``_settling``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._assignment import LeaseCoordinator, announce, assign_partitions
from ._errors import AccessDeniedError, redact
from ._hookspecs import has_implementations
from ._lanes import LaneState, wait_event
from ._message import Handler, Message, Outcome
from ._provider import Delivery, LaneConsumer, Transport
from ._registry import registry
from ._settling import Settling
from ._tasks import cancel_and_wait

if TYPE_CHECKING:
    from ._settings import BrokerSettings

__all__ = ["SubscriptionRunner", "assign_partitions"]

log = logging.getLogger("msgbroker")

_CLOSE_POLL_BOUND = 2.0
"""Seconds a closing subscription waits, past the poll timeout, for a poll in flight to return."""




class SubscriptionRunner:
    """One subscription of one member: reads its lanes and runs the handler."""

    def __init__(
        self,
        transport: Transport,
        settings: BrokerSettings,
        topic: str,
        group: str,
        handler: Handler,
        message_type: type[Message],
        *,
        ordered: bool,
        max_concurrency: int | None,
        partition: int | None,
    ) -> None:
        self.transport = transport
        self.settings = settings
        self.topic = topic
        self.group = group
        self.handler = handler
        self.message_type = message_type
        self.ordered = ordered
        self.only_partition = partition
        self.member_id = f"{uuid.uuid4().hex[:12]}"
        self.consumer: LaneConsumer = transport.consumer(topic, group, self.member_id)
        limit = max_concurrency or settings.max_concurrency or (None if ordered else 100)
        # Ordered: lanes take turns at the semaphore. Unordered: at most ``limit`` worker
        # coroutines (started as work arrives) take deliveries from the lanes with work.
        self._semaphore = asyncio.Semaphore(limit) if limit and ordered else None
        self._limit = limit or 0
        self._ready: deque[LaneState] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._workers = 0
        self._handling: dict[asyncio.Task[None], LaneState | None] = {}
        self._lanes: dict[int, LaneState] = {}
        # The lanes that want more deliveries (open, not stopping, buffer under the low-water mark,
        # not held back), kept as lanes change rather than found by walking every lane at each
        # read-loop iteration: a member's reading costs with the lanes that have work, not with
        # the lanes it holds. ``_wanted`` is the tuple the polls get, rebuilt (in C) only after a
        # change.
        self._wanting: dict[int, None] = {}
        self._wanted: tuple[int, ...] = ()
        self._wanting_changed = False
        self._wake = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._polling = False
        """The reader is inside ``consumer.poll`` (the broker may have counted what it returns) or
        hands what it returned to the lanes, or back."""
        self._poll_asked: tuple[int, ...] = ()
        """The lanes the poll in flight (or the last one) asked for."""
        self._poll_end: asyncio.Future[None] | None = None
        """Set once the poll in flight was answered and what it brought was taken or handed back
        (created by a lane stop that waits for it)."""
        self._coordinator: LeaseCoordinator | None = None
        self._spawned: set[asyncio.Task[None]] = set()
        self._grace = settings.shutdown_timeout.total_seconds()
        self._poll_timeout = min(settings.poll_timeout.total_seconds(), transport.MAX_POLL_BLOCK)
        self._batch = settings.batch_size
        self._low_water = max(1, settings.batch_size // 2)
        self.failure: AccessDeniedError | None = None
        """Why the subscription stopped by itself (a refused credential or permission), or None."""
        self._stopper: asyncio.Task[None] | None = None
        self._held: dict[int, float] = {}
        """Lanes held back until a time (a broker-side retry's delay): partition -> held_until."""
        # Looked up once: with no plugin observing handling, the hot path skips the hook.
        self._observed = has_implementations("msgbroker_handle", registry.plugins)
        self.settling = Settling(transport, self.consumer, settings, topic, group, self.member_id, handler,
                                 message_type, self._semaphore, self._observed)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """True once :meth:`close` or :meth:`abort` began (the provider interface's
        ``AssignmentListener.closing``)."""
        return self._closing

    @property
    def partitions(self) -> list[int]:
        """The partitions this member currently reads."""
        return sorted(p for p, lane in self._lanes.items() if not lane.stopping)

    async def start(self) -> None:
        mode = self.transport.ASSIGNMENT
        announcing: asyncio.Future[float] | None = None
        if mode == "leases" and self.only_partition is None:
            announcing = asyncio.ensure_future(announce(self))  # see announce
        started = False
        try:
            await self.consumer.start(self, self.only_partition)
            started = True
            announced_at = await announcing if announcing is not None else None
        except BaseException:
            if announcing is not None:
                await cancel_and_wait([announcing])
                with contextlib.suppress(Exception):
                    await self.transport.leave(self.topic, self.group, self.member_id)
            if started:
                with contextlib.suppress(Exception):
                    await self.consumer.stop(flush=True)
            raise
        # The reader runs while the first lanes open: each is read as soon as it is open (the
        # path of every later rebalance), not once the member's last lane is (64 lanes opened
        # 16 at a time kept the first message waiting ~0.1 s).
        self._reader = asyncio.create_task(self._read_loop(), name=f"msgbroker-reader-{self.topic}")
        self._tasks.append(self._reader)
        try:
            if mode == "shared":
                count = self.settings.partition_count
                await self.assigned([self.only_partition] if self.only_partition is not None else list(range(count)))
            elif mode == "leases":
                # made after the consumer started: a provider may learn its lease time there
                self._coordinator = coordinator = LeaseCoordinator(self)
                await coordinator.join(announced_at)
                self._tasks.append(asyncio.create_task(coordinator.run(), name=f"msgbroker-leases-{self.topic}"))
        except asyncio.CancelledError:
            await self.abort()
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()  # what it took is handed back, its leases released
            raise

    async def close(self) -> None:
        """Stop taking messages, let in-flight handlers finish (bounded), settle, release."""
        if self._closing:
            return
        self._closing = True
        for lane in self._lanes.values():
            lane.stopping = True  # no lane starts another handling; one in a handler finishes (revoked below)
            self._unwant(lane.partition)
            lane.data.set()
        self._wake.set()
        reader = self._reader
        for task in self._tasks:
            if task is not reader:
                task.cancel()
        if reader is not None and self._polling:
            # A poll in flight may have been counted by the broker already (a read script ran,
            # a start marker was written) with its answer still on the way: cut off, those
            # deliveries would count one attempt more at the next owner. Woken, it returns soon
            # (bounded) and the read loop hands back what it got.
            await asyncio.wait({reader}, timeout=self._poll_timeout + _CLOSE_POLL_BOUND)
        await cancel_and_wait(self._tasks)
        if self._coordinator is not None:
            # A hand-over in progress closes its lane and then releases its lease: let it, or
            # release_all below would free the lane while the provider still hands it back.
            await self._coordinator.finish_hand_overs()
        await self.revoked(list(self._lanes))
        await cancel_and_wait(list(self._spawned))  # unordered workers: idle now (their lanes are stopped)
        if self._coordinator is not None:
            await self._coordinator.release_all()
            with contextlib.suppress(Exception):
                await self.transport.leave(self.topic, self.group, self.member_id)
        await self.consumer.stop(flush=True)

    async def abort(self) -> None:
        """A crash, for tests: stop everything at once, settle and release nothing."""
        self._closing = True
        for lane in self._lanes.values():
            lane.stopping = True  # a lane that outlived its cancellation still stops at its next check
            self._unwant(lane.partition)
        tasks = [*self._tasks, *self._spawned, *(lane.task for lane in self._lanes.values() if lane.task)]
        if self._coordinator is not None:  # a hand-over in progress must not release its lease
            tasks += self._coordinator.draining
        await cancel_and_wait(tasks)
        self._lanes.clear()
        with contextlib.suppress(Exception):
            await self.consumer.stop(flush=False)

    # -- assignment (AssignmentListener) ----------------------------------------------------

    async def assigned(self, partitions: Sequence[int], leases: dict[int, str] | None = None) -> None:
        at_once = max(1, self.consumer.OPENS_AT_ONCE)
        if at_once == 1 or len(partitions) < 2:
            for partition in partitions:
                await self._open_lane(partition, leases)
        else:
            # Each lane starts as soon as it is open; a failure of one does not stop the others
            # (the first is raised once all are done, as the one-by-one path would raise it).
            gate = asyncio.Semaphore(at_once)

            async def open_one(partition: int) -> None:
                async with gate:
                    await self._open_lane(partition, leases)

            results = await asyncio.gather(*(open_one(p) for p in partitions), return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                self._wake.set()
                raise failure
        self._wake.set()

    async def _open_lane(self, partition: int, leases: dict[int, str] | None) -> None:
        if partition in self._lanes or self._closing:
            return
        lease = leases.get(partition) if leases else None
        await self.consumer.open_lane(partition, lease)
        lane = LaneState(partition, lease)
        self._lanes[partition] = lane
        self._want(lane)
        if self.ordered:
            lane.task = asyncio.create_task(self._run_ordered_lane(lane),
                                            name=f"msgbroker-lane-{self.topic}-{partition}")

    async def revoked(self, partitions: Sequence[int]) -> None:
        lanes = [self._lanes[p] for p in partitions if p in self._lanes]
        await asyncio.gather(*(self._stop_lane(lane) for lane in lanes))

    async def lost(self, partitions: Sequence[int]) -> None:
        """The lease is gone (another member holds it): stop at once; settles are fenced anyway."""
        for partition in partitions:
            lane = self._lanes.pop(partition, None)
            if lane is None:
                continue
            lane.stopping = True
            self._unwant(partition)
            if lane.task:
                await cancel_and_wait([lane.task])
            with contextlib.suppress(Exception):
                await self.consumer.close_lane(partition)

    async def _stop_lane(self, lane: LaneState) -> None:
        if lane.stopped is not None:
            # Stopping already (a hand-over, then close): wait for that stop to end, so the
            # lease is released only after the lane was closed.
            await asyncio.shield(lane.stopped)
            return
        lane.stopped = asyncio.get_running_loop().create_future()
        try:
            await self._stop_lane_once(lane)
        finally:
            lane.stopped.set_result(None)

    async def _stop_lane_once(self, lane: LaneState) -> None:
        lane.stopping = True
        self._unwant(lane.partition)
        lane.data.set()
        if lane.task is not None:
            done, _ = await asyncio.wait({lane.task}, timeout=self._grace)
            if not done:
                log.warning("msgbroker: handler on %s[%d] outlived the grace period; it is cancelled and "
                            "its message will be redelivered", self.topic, lane.partition)
                await cancel_and_wait([lane.task])
        if lane.in_flight:  # unordered: wait for this lane's handlers, then cut them off
            drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lane.drained = drained
            finished, _ = await asyncio.wait({drained}, timeout=self._grace)
            if not finished:
                late = [task for task, handled in self._handling.items() if handled is lane]
                await cancel_and_wait(late)
        if self._polling and self._coordinator is not None and lane.partition in self._poll_asked:
            # A poll in flight asked for this lane: the broker may have counted deliveries of it
            # whose answer is still on the way. Released first, the lane's lease was gone when
            # they came and they could not be taken back (fenced): the next owner was handed
            # attempt 2 of messages no handler saw. Woken, the poll returns soon (bounded); the
            # read loop hands back what it brought while this member still holds the lane.
            await self._poll_answered()
        self._lanes.pop(lane.partition, None)
        # The broker counted these deliveries (a read, or a retry that announced the next attempt)
        # but no handler saw that attempt: handed back, the next owner's attempt counts handlings.
        unhandled = [d for d in lane.buffer if d is not lane.handed]
        unhandled += lane.waiting
        with contextlib.suppress(Exception):
            if unhandled:
                await self.consumer.unread(unhandled)
            await self.consumer.close_lane(lane.partition)

    async def _poll_answered(self) -> None:
        """Wait (bounded) until the poll in flight was answered and its deliveries handled."""
        reader = self._reader
        if reader is None or reader.done():
            return
        if self._poll_end is None:
            self._poll_end = asyncio.get_running_loop().create_future()
        end = self._poll_end
        self._wake.set()
        await asyncio.wait({end, reader}, timeout=self._poll_timeout + _CLOSE_POLL_BOUND,
                           return_when=asyncio.FIRST_COMPLETED)

    def _poll_handled(self) -> None:
        self._polling = False
        end, self._poll_end = self._poll_end, None
        if end is not None and not end.done():
            end.set_result(None)

    # -- reading ----------------------------------------------------------------------------

    def _want(self, lane: LaneState) -> None:
        """The lane's buffer is under the low-water mark: it wants deliveries (unless it is
        stopping or held back). Wakes the read loop when that is new: a poll in progress already
        reads the lanes that wanted deliveries when it began."""
        wanting = self._wanting
        if lane.partition not in wanting and not lane.stopping and lane.held_until <= time.monotonic() \
                and self._lanes.get(lane.partition) is lane:
            wanting[lane.partition] = None
            self._wanting_changed = True
            self._wake.set()

    def _unwant(self, partition: int) -> None:
        if self._wanting.pop(partition, 0) is None:
            self._wanting_changed = True

    async def _read_loop(self) -> None:
        failures = 0
        low_water = self._low_water
        while not self._closing:
            # Lanes held back after a broker-side retry: the poll must not outlast the first of them.
            held = self._held
            next_held = None
            if held:
                now = time.monotonic()
                for partition, until in list(held.items()):
                    lane_ = self._lanes.get(partition)
                    if until <= now or lane_ is None or lane_.held_until != until:
                        del held[partition]
                        if lane_ is not None and lane_.held_until <= now:
                            self._want(lane_)  # its hold is over: it wants deliveries again
                next_held = min(held.values()) - now if held else None
            if self._wanting_changed:
                self._wanting_changed = False
                self._wanted = tuple(self._wanting)
            idle = self._wanted
            if not idle:
                self._wake.clear()
                await wait_event(self._wake, max(0.0, next_held) if next_held is not None else None)
                continue
            self._wake.clear()
            timeout = self._poll_timeout if next_held is None else max(0.0, min(self._poll_timeout, next_held))
            self._polling = True
            self._poll_asked = idle
            try:
                deliveries = await self.consumer.poll(idle, self._batch, timeout, self._wake)
                failures = 0
            except asyncio.CancelledError:
                raise
            except AccessDeniedError as exc:
                # A refused credential or permission does not pass by retrying: stop, like a
                # crash (nothing settled or released: the unsettled messages stay for a later
                # delivery, the leases run out), and say why on the subscription. (Other
                # configuration errors a poll meets can be passing, e.g. on a cluster node
                # going down: those are retried.)
                self._stop_on(exc)
                return
            except Exception as exc:
                self._poll_handled()
                if self._closing:
                    return
                failures += 1
                pause = min(2.0, 0.05 * 2**failures)
                log.warning("msgbroker: polling %s for %s failed (%s); again in %.2fs", self.topic, self.group,
                            redact(str(exc)), pause)
                await asyncio.sleep(pause)
                continue
            lanes = self._lanes
            dropped: list[Delivery] = []
            if self._closing:
                dropped = deliveries  # the subscription is closing: no lane takes more
            elif self.ordered:
                last = None
                for delivery in deliveries:
                    lane = lanes.get(delivery.partition)
                    if lane is None or lane.stopping:
                        dropped.append(delivery)  # still unsettled at the broker: the lane's next owner gets it
                        continue
                    lane.buffer.append(delivery)
                    if lane is not last:  # a lane's deliveries come together: wake it once
                        if last is not None and len(last.buffer) >= low_water:
                            self._unwant(last.partition)
                        last = lane
                        lane.data.set()
                if last is not None and len(last.buffer) >= low_water:
                    self._unwant(last.partition)
            elif deliveries:
                ready = self._ready
                for delivery in deliveries:
                    lane = lanes.get(delivery.partition)
                    if lane is None or lane.stopping:
                        dropped.append(delivery)
                        continue
                    lane.buffer.append(delivery)
                    if not lane.queued:
                        lane.queued = True
                        ready.append(lane)
                    if len(lane.buffer) >= low_water:
                        self._unwant(lane.partition)
                self._dispatch(len(deliveries))
            if dropped:
                # Read while their lane was being handed back (a poll in flight when the stop
                # began): the broker counted a delivery no handler will see. Taken back, the next
                # owner's delivery_attempt counts handlings (docs/semantics.md, rule 3).
                with contextlib.suppress(Exception):
                    await self.consumer.unread(dropped)
            self._poll_handled()

    def _stop_on(self, exc: AccessDeniedError) -> None:
        log.error("msgbroker: the subscription of %s to %s stopped: %s (its unsettled messages stay for a "
                  "later delivery)", self.group, self.topic, redact(str(exc)))
        self.failure = exc
        self._stopper = asyncio.create_task(self.abort(), name=f"msgbroker-stop-{self.topic}")

    # -- handling ---------------------------------------------------------------------------

    async def _wait_not_before(self, lane: LaneState, delivery: Delivery) -> bool:
        """Sleep until the delivery may be handled; False when the lane is stopping."""
        if delivery.not_before is None:
            return not lane.stopping
        wait = delivery.not_before - time.time()
        if wait > 0:
            lane.data.clear()
            await wait_event(lane.data, wait)
            if delivery.not_before - time.time() > 0.001:
                return False if lane.stopping else await self._wait_not_before(lane, delivery)
        return not lane.stopping

    async def _run_ordered_lane(self, lane: LaneState) -> None:
        buffer = lane.buffer
        semaphore = self._semaphore
        local = self.transport.REDELIVERY == "local"
        low_water = self._low_water
        observed = self._observed
        wanting, partition = self._wanting, lane.partition
        while not lane.stopping:
            if not buffer:
                lane.data.clear()
                self._want(lane)
                await lane.data.wait()
                continue
            delivery = buffer[0]
            # (stopping is False here: no await since the loop's check unless there is a delay)
            if delivery.not_before is not None and not await self._wait_not_before(lane, delivery):
                break
            if semaphore is not None:
                async with semaphore:
                    if lane.stopping:
                        break  # shutdown began while this lane waited its turn: the message stays unread
                    lane.handed = delivery
                    result = await self.settling.handle_observed(lane, delivery, limited=False)
            else:
                lane.handed = delivery
                if observed:
                    result = await self.settling.handle_observed(lane, delivery)
                else:
                    result = await self.settling.handle(lane, delivery, False, None)
            if result == Outcome.RETRY:
                if local:
                    continue  # the head stays: it is handed again before anything after it
                buffer.clear()  # the broker delivers it (and what follows) again
                lane.held_until = time.monotonic() + max(0.0, (delivery.not_before or 0) - time.time())
                self._held[lane.partition] = lane.held_until
                self._unwant(lane.partition)  # until the hold is over (the read loop's next_held)
                self._wake.set()
                continue
            elif buffer and buffer[0] is delivery:
                buffer.popleft()
                if lane.failures:
                    lane.failures.pop(delivery, None)
            if len(buffer) < low_water and partition not in wanting:
                self._want(lane)

    # -- unordered: a bounded pool of workers ------------------------------------------------

    def _dispatch(self, count: int) -> None:
        """Work for up to ``count`` more handlers arrived: wake idle workers, then start new
        ones while fewer than the concurrency limit exist."""
        idle = self._idle
        while count > 0 and idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1
        while count > 0 and self._workers < self._limit and not self._closing:
            self._workers += 1
            task = asyncio.create_task(self._worker(), name=f"msgbroker-worker-{self.topic}")
            self._spawned.add(task)
            task.add_done_callback(self._spawned.discard)
            count -= 1

    async def _worker(self) -> None:
        """Take the next delivery of the lanes with work in turn, handle it, repeat."""
        ready, idle, handling = self._ready, self._idle, self._handling
        me = asyncio.current_task()
        assert me is not None
        loop = asyncio.get_running_loop()
        low_water = self._low_water
        handling[me] = None
        try:
            while True:
                if not ready:
                    waiter = loop.create_future()
                    idle.append(waiter)
                    try:
                        await waiter
                    finally:
                        waiter.cancel()  # a no-op once woken; leaves _dispatch a done waiter to skip
                    continue
                lane = ready[0]
                buffer = lane.buffer
                if lane.stopping or not buffer:
                    ready.popleft()
                    lane.queued = False
                    continue
                delivery = buffer.popleft()
                if buffer:
                    ready.rotate(-1)  # the lanes with work take turns
                else:
                    ready.popleft()
                    lane.queued = False
                lane.in_flight += 1
                handling[me] = lane
                try:
                    await self._handle_unordered(lane, delivery)
                finally:
                    handling[me] = None
                    lane.in_flight -= 1
                    if not lane.in_flight and lane.drained is not None and not lane.drained.done():
                        lane.drained.set_result(None)
                if len(buffer) < low_water:
                    self._want(lane)
        finally:
            self._workers -= 1
            handling.pop(me, None)
            if ready and not self._closing:
                self._dispatch(1)  # cut off mid-handler (grace period over): others take over

    async def _handle_unordered(self, lane: LaneState, delivery: Delivery) -> None:
        while True:
            if delivery.not_before is not None:
                if not await self._wait_not_before(lane, delivery):
                    return  # stays in lane.waiting: handed back when the lane stops
            elif lane.stopping:
                return
            if lane.waiting:
                lane.waiting.discard(delivery)
            if self._observed:
                result = await self.settling.handle_observed(lane, delivery, limited=False)
            else:
                result = await self.settling.handle(lane, delivery, False, None)
            if result != Outcome.RETRY or self.transport.REDELIVERY != "local":
                if lane.failures:
                    lane.failures.pop(delivery, None)
                return
            lane.waiting.add(delivery)  # the next attempt is announced, not handed yet

