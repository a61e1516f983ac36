"""The consumption engine, written once: ordered lanes, settling, attempts, dead letters,
bounded concurrency, assignment over live members, graceful shutdown and crash simulation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from ._codec import REPLAY_GROUP_HEADER, decode
from ._errors import MsgBrokerError, SerializationError, redact
from ._hookspecs import HandleEvent, has_implementations
from ._message import DeadLetter, Handler, Message, MessageContext, Outcome
from ._partitioner import murmur2
from ._provider import Delivery, Lane, LaneConsumer, Transport
from ._registry import registry

if TYPE_CHECKING:
    from ._settings import BrokerSettings

__all__ = ["SubscriptionRunner", "assign_partitions", "rendezvous_owner"]

log = logging.getLogger("msgbroker")


def rendezvous_owner(partition: int, members: Sequence[str]) -> str:
    """Highest-random-weight hashing: every member computes the same owner, and a member
    joining or leaving moves only the partitions it gains or loses."""
    return max(members, key=lambda m: (murmur2(f"{m}/{partition}".encode()), m))


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


_HOOK_OUTCOMES = {Outcome.ACK: HandleEvent.ACK, Outcome.RETRY: HandleEvent.NAK, Outcome.DEAD: HandleEvent.DEAD_LETTER}


class Settler:
    """Carries out a handler's settle calls for one delivery (used by MessageContext)."""

    __slots__ = ("_delivery", "_lane", "_runner", "delayed", "result")

    def __init__(self, runner: SubscriptionRunner, lane: _LaneState, delivery: Delivery) -> None:
        self._runner = runner
        self._lane = lane
        self._delivery = delivery
        self.result: str | None = None
        self.delayed = False

    def ack(self) -> Awaitable[None]:
        # not a coroutine itself: the caller awaits the provider's ack directly (one frame less)
        self.result = Outcome.ACK
        return self._runner.consumer.ack(self._delivery)

    async def retry(self, delay: float | None, error: BaseException | str | None) -> None:
        self.delayed = delay is not None
        await self._runner._retry(self, self._lane, self._delivery, delay, error)

    async def dead_letter(self, error: BaseException | str) -> None:
        self.result = Outcome.DEAD
        await self._runner._dead_letter(self._lane, self._delivery, error)


class _LaneState:
    __slots__ = ("buffer", "data", "drained", "failures", "handed", "held_until", "in_flight", "lease", "partition",
                 "queued", "stopping", "task", "waiting")

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
        self.task: asyncio.Task[None] | None = None


def _failures(lane: _LaneState, delivery: Delivery) -> int:
    """How many of the delivery's earlier attempts failed: counted here once it was retried
    here, else what the provider knows, else (unknown past) every earlier delivery, crashes
    included."""
    failures = lane.failures.get(delivery)
    if failures is None:
        known = delivery.failures
        failures = max(0, delivery.attempt - 1) if known is None else known
    return failures


async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
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


def _error_text(error: BaseException | str | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


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
        self._ready: deque[_LaneState] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._workers = 0
        self._handling: dict[asyncio.Task[None], _LaneState | None] = {}
        self._lanes: dict[int, _LaneState] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._coordinator: _LeaseCoordinator | None = None
        self._spawned: set[asyncio.Task[None]] = set()
        self._max_attempts = settings.max_retry_attempts
        self._retry_delay = settings.retry_delay.total_seconds()
        self._grace = settings.shutdown_timeout.total_seconds()
        self._poll_timeout = min(settings.poll_timeout.total_seconds(), transport.MAX_POLL_BLOCK)
        self._batch = settings.batch_size
        self._low_water = max(1, settings.batch_size // 2)
        # Looked up once: with no plugin observing handling, the hot path skips the hook.
        self._observed = has_implementations("msgbroker_handle", registry.plugins)

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
        await self.consumer.start(self, self.only_partition)
        mode = self.transport.ASSIGNMENT
        if mode == "shared":
            wanted = [self.only_partition] if self.only_partition is not None else range(self.settings.partition_count)
            await self.assigned(list(wanted))
        elif mode == "leases":
            self._coordinator = coordinator = _LeaseCoordinator(self)
            await coordinator.beat()
            self._tasks.append(asyncio.create_task(coordinator.run(), name=f"msgbroker-leases-{self.topic}"))
        self._tasks.append(asyncio.create_task(self._read_loop(), name=f"msgbroker-reader-{self.topic}"))

    async def close(self) -> None:
        """Stop taking messages, let in-flight handlers finish (bounded), settle, release."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.revoked(list(self._lanes))
        workers = list(self._spawned)  # unordered: idle now (their lanes are stopped)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
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
        tasks = [*self._tasks, *self._spawned, *(lane.task for lane in self._lanes.values() if lane.task)]
        if self._coordinator is not None:  # a hand-over in progress must not release its lease
            tasks += self._coordinator._draining.values()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._lanes.clear()
        with contextlib.suppress(Exception):
            await self.consumer.stop(flush=False)

    # -- assignment (AssignmentListener) ----------------------------------------------------

    async def assigned(self, partitions: Sequence[int], leases: dict[int, str] | None = None) -> None:
        for partition in partitions:
            if partition in self._lanes or self._closing:
                continue
            lease = leases.get(partition) if leases else None
            await self.consumer.open_lane(partition, lease)
            lane = _LaneState(partition, lease)
            self._lanes[partition] = lane
            if self.ordered:
                lane.task = asyncio.create_task(self._run_ordered_lane(lane),
                                                name=f"msgbroker-lane-{self.topic}-{partition}")
        self._wake.set()

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
            if lane.task:
                lane.task.cancel()
                await asyncio.gather(lane.task, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.consumer.close_lane(partition)

    async def _stop_lane(self, lane: _LaneState) -> None:
        lane.stopping = True
        lane.data.set()
        if lane.task is not None:
            done, _ = await asyncio.wait({lane.task}, timeout=self._grace)
            if not done:
                log.warning("msgbroker: handler on %s[%d] outlived the grace period; it is cancelled and "
                            "its message will be redelivered", self.topic, lane.partition)
                lane.task.cancel()
                await asyncio.gather(lane.task, return_exceptions=True)
        if lane.in_flight:  # unordered: wait for this lane's handlers, then cut them off
            drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lane.drained = drained
            done, _ = await asyncio.wait({drained}, timeout=self._grace)
            if not done:
                late = [task for task, handled in self._handling.items() if handled is lane]
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        self._lanes.pop(lane.partition, None)
        # The broker counted these deliveries (a read, or a retry that announced the next attempt)
        # but no handler saw that attempt: handed back, the next owner's attempt counts handlings.
        unhandled = [d for d in lane.buffer if d is not lane.handed]
        unhandled += lane.waiting
        with contextlib.suppress(Exception):
            if unhandled:
                await self.consumer.unread(unhandled)
            await self.consumer.close_lane(lane.partition)

    # -- reading ----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        failures = 0
        while not self._closing:
            now, low_water = time.monotonic(), self._low_water
            idle = [p for p, lane in self._lanes.items()
                    if not lane.stopping and len(lane.buffer) < low_water and lane.held_until <= now]
            if not idle:
                self._wake.clear()
                held = [lane.held_until for lane in self._lanes.values() if lane.held_until > time.monotonic()]
                timeout = max(0.0, min(held) - time.monotonic()) if held else None
                await _wait_event(self._wake, timeout)
                continue
            self._wake.clear()
            try:
                deliveries = await self.consumer.poll(idle, self._batch, self._poll_timeout, self._wake)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                pause = min(2.0, 0.05 * 2**failures)
                log.warning("msgbroker: polling %s for %s failed (%s); again in %.2fs", self.topic, self.group,
                            redact(str(exc)), pause)
                await asyncio.sleep(pause)
                continue
            lanes = self._lanes
            if self.ordered:
                last = None
                for delivery in deliveries:
                    lane = lanes.get(delivery.partition)
                    if lane is None or lane.stopping:
                        continue  # still unsettled at the broker: the lane's next owner gets it
                    lane.buffer.append(delivery)
                    if lane is not last:  # a lane's deliveries come together: wake it once
                        last = lane
                        lane.data.set()
            elif deliveries:
                ready = self._ready
                for delivery in deliveries:
                    lane = lanes.get(delivery.partition)
                    if lane is None or lane.stopping:
                        continue
                    lane.buffer.append(delivery)
                    if not lane.queued:
                        lane.queued = True
                        ready.append(lane)
                self._dispatch(len(deliveries))

    # -- handling ---------------------------------------------------------------------------

    async def _wait_not_before(self, lane: _LaneState, delivery: Delivery) -> bool:
        """Sleep until the delivery may be handled; False when the lane is stopping."""
        if delivery.not_before is None:
            return not lane.stopping
        wait = delivery.not_before - time.time()
        if wait > 0:
            lane.data.clear()
            await _wait_event(lane.data, wait)
            if delivery.not_before - time.time() > 0.001:
                return False if lane.stopping else await self._wait_not_before(lane, delivery)
        return not lane.stopping

    async def _run_ordered_lane(self, lane: _LaneState) -> None:
        buffer = lane.buffer
        semaphore = self._semaphore
        local = self.transport.REDELIVERY == "local"
        low_water = self._low_water
        observed = self._observed
        while not lane.stopping:
            if not buffer:
                lane.data.clear()
                self._wake.set()
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
                    result = await self._handle(lane, delivery, limited=False)
            else:
                lane.handed = delivery
                if observed:
                    result = await self._handle(lane, delivery)
                else:
                    result = await self._handle_delivery(lane, delivery, False, None)
            if result == Outcome.RETRY:
                if local:
                    continue  # the head stays: it is handed again before anything after it
                buffer.clear()  # the broker delivers it (and what follows) again
                lane.held_until = time.monotonic() + max(0.0, (delivery.not_before or 0) - time.time())
            elif buffer and buffer[0] is delivery:
                buffer.popleft()
                if lane.failures:
                    lane.failures.pop(delivery, None)
            if len(buffer) < low_water:
                self._wake.set()

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
                    self._wake.set()
        finally:
            self._workers -= 1
            handling.pop(me, None)
            if ready and not self._closing:
                self._dispatch(1)  # cut off mid-handler (grace period over): others take over

    async def _handle_unordered(self, lane: _LaneState, delivery: Delivery) -> None:
        while True:
            if delivery.not_before is not None:
                if not await self._wait_not_before(lane, delivery):
                    return  # stays in lane.waiting: handed back when the lane stops
            elif lane.stopping:
                return
            if lane.waiting:
                lane.waiting.discard(delivery)
            if self._observed:
                result = await self._handle(lane, delivery, limited=False)
            else:
                result = await self._handle_delivery(lane, delivery, False, None)
            if result != Outcome.RETRY or self.transport.REDELIVERY != "local":
                if lane.failures:
                    lane.failures.pop(delivery, None)
                return
            lane.waiting.add(delivery)  # the next attempt is announced, not handed yet

    async def _handle(self, lane: _LaneState, delivery: Delivery, limited: bool = True) -> str | None:
        if not self._observed:
            return await self._handle_delivery(lane, delivery, limited, None)
        replay_for = delivery.headers.get(REPLAY_GROUP_HEADER)
        if replay_for is not None and replay_for != self.group:
            return await self._handle_delivery(lane, delivery, limited, None)  # not ours: nothing to observe
        event = HandleEvent(self.transport.NAME, self.topic, self.group, delivery.partition, delivery.message_id,
                            delivery.attempt, delivery.headers, self.member_id, len(delivery.body))
        with contextlib.ExitStack() as observers:
            for observer in registry.plugins.hook.msgbroker_handle(event=event):
                observers.enter_context(observer)
            result = await self._handle_delivery(lane, delivery, limited, event)
            if event.outcome is None:
                event.outcome = _HOOK_OUTCOMES.get(result or "", HandleEvent.FAILED)
        return result

    async def _handle_delivery(
        self, lane: _LaneState, delivery: Delivery, limited: bool, event: HandleEvent | None
    ) -> str | None:
        try:
            headers = delivery.headers
            if headers:
                replay_for = headers.get(REPLAY_GROUP_HEADER)
                if replay_for is not None and replay_for != self.group:
                    await self.consumer.ack(delivery)  # a dead letter replayed for another group
                    return Outcome.ACK
            if delivery.attempt > self._max_attempts and _failures(lane, delivery) >= self._max_attempts:
                died = f"delivered {delivery.attempt} times without being settled (the worker died)"
                if event is not None:
                    event.error = died
                await self._dead_letter(lane, delivery, died)
                return Outcome.DEAD
            try:
                message = decode(delivery, self.message_type)
            except SerializationError as exc:
                if event is not None:
                    event.error = exc
                await self._dead_letter(lane, delivery, exc)
                return Outcome.DEAD
            settler = Settler(self, lane, delivery)
            ctx: MessageContext[Any] = MessageContext(
                message=message,
                topic=self.topic,
                group=self.group,
                partition=delivery.partition,
                message_id=delivery.message_id or str(message.message_id),
                delivery_attempt=delivery.attempt,
                headers=delivery.headers,
                settler=settler,
            )
            if event is not None:
                event.context = ctx
            try:
                if limited and self._semaphore is not None:
                    async with self._semaphore:
                        await self.handler(ctx)
                else:
                    await self.handler(ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if event is not None:
                    event.error = exc
                if ctx.settled is None:
                    log.info("msgbroker: handler failed on %s[%d] %s attempt %d: %r", self.topic,
                             delivery.partition, ctx.message_id, delivery.attempt, exc)
                    ctx.settled = Outcome.RETRY
                    await settler.retry(None, exc)
                else:
                    log.warning("msgbroker: handler raised after settling %s: %r", ctx.message_id, exc)
            else:
                if ctx.settled is None:
                    ctx.settled = Outcome.ACK
                    await settler.ack()
            if event is not None and settler.result == Outcome.RETRY and settler.delayed:
                event.outcome = HandleEvent.DELAY
            if settler.result is not None:
                ctx.settled = settler.result  # a retry past the attempt limit became a dead letter
            return settler.result
        except asyncio.CancelledError:
            raise
        except MsgBrokerError as exc:
            if event is not None:
                event.outcome, event.error = HandleEvent.FAILED, exc
            # The settle itself failed (connection lost, lease lost): the message stays
            # unsettled at the broker and comes back; this member retries it after a pause.
            log.warning("msgbroker: settling %s on %s[%d] failed: %s", delivery.message_id, self.topic,
                        delivery.partition, exc)
            await asyncio.sleep(0.2)
            return Outcome.RETRY if self.transport.REDELIVERY == "local" else None

    async def _retry(
        self,
        settler: Settler,
        lane: _LaneState,
        delivery: Delivery,
        delay: float | None,
        error: BaseException | str | None,
    ) -> None:
        failures = lane.failures.get(delivery)
        if failures is None:
            failures = lane.failures[delivery] = _failures(lane, delivery)
        failures += 1 if delay is None else 0
        if delay is None and failures >= self._max_attempts:
            settler.result = Outcome.DEAD
            await self._dead_letter(lane, delivery, error)
            return
        if delay:
            self.transport.CAPABILITIES.require("delay")
        wait = self._retry_delay if delay is None else delay
        not_before = time.time() + wait if wait > 0 else None
        delivery.failures = failures  # for providers that carry the count to the next owner
        await self.consumer.retry(delivery, delivery.attempt + 1, not_before)
        if lane.handed is delivery:
            lane.handed = None  # the announced attempt has not been handed yet
        lane.failures[delivery] = failures
        delivery.attempt += 1
        delivery.not_before = not_before
        settler.result = Outcome.RETRY

    async def _dead_letter(self, lane: _LaneState, delivery: Delivery, error: BaseException | str | None) -> None:
        letter = DeadLetter(
            message_id=delivery.message_id,
            topic=self.topic,
            group=self.group,
            partition=delivery.partition,
            error=_error_text(error),
            attempts=delivery.attempt,
            headers=dict(delivery.headers),
            payload=delivery.body,
            partition_key=delivery.key,
        )
        log.warning("msgbroker: dead-lettering %s from %s[%d] for %s after %d attempt(s): %s",
                    delivery.message_id, self.topic, delivery.partition, self.group, delivery.attempt, letter.error)
        await self.consumer.dead_letter(delivery, letter)
        if lane.failures:
            lane.failures.pop(delivery, None)


class _LeaseCoordinator:
    """Membership heartbeats, rendezvous assignment and exclusive leases over the provider's
    primitives (``Transport.ASSIGNMENT == "leases"``)."""

    def __init__(self, runner: SubscriptionRunner) -> None:
        self.runner = runner
        self.transport = runner.transport
        self.ttl = self.transport.lease_ttl()
        self.interval = max(0.05, min(1.0, self.ttl / 4))
        self.held: dict[int, str] = {}
        self._draining: dict[int, asyncio.Task[None]] = {}

    def _lane(self, partition: int) -> Lane:
        return Lane(self.runner.topic, self.runner.group, partition)

    async def run(self) -> None:
        # Checks _closing too: a provider call that swallows the cancellation must not keep
        # close() waiting for this loop forever.
        while not self.runner._closing:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("msgbroker: membership of %s/%s failed: %s", self.runner.topic, self.runner.group, exc)

    async def beat(self) -> None:
        runner = self.runner
        count = runner.settings.partition_count
        if runner.only_partition is not None:
            desired = {runner.only_partition}
        else:
            members = await self.transport.heartbeat(runner.topic, runner.group, runner.member_id, self.ttl)
            if runner.member_id not in members:
                members = [*members, runner.member_id]
            owners = assign_partitions(count, members)
            desired = {p for p, owner in owners.items() if owner == runner.member_id}
        if self.held:
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
                self._draining[partition] = asyncio.create_task(self._hand_over(partition))
        for partition in sorted(desired - set(self.held)):
            token = await self.transport.acquire_lease(self._lane(partition), runner.member_id, self.ttl)
            if token is not None:
                self.held[partition] = token
                await runner.assigned([partition], {partition: token})

    async def _hand_over(self, partition: int) -> None:
        """Rebalance: finish the in-flight message, then release the lane."""
        try:
            await self.runner.revoked([partition])
            token = self.held.pop(partition, None)
            if token is not None:
                await self.transport.release_lease(self._lane(partition), token)
        finally:
            self._draining.pop(partition, None)

    async def release_all(self) -> None:
        for partition, token in list(self.held.items()):
            with contextlib.suppress(Exception):
                await self.transport.release_lease(self._lane(partition), token)
        self.held.clear()
