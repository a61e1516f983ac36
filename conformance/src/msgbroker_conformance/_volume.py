"""The volume tier: thousands of messages over many keys, with random naks, raises, rejects and
delays, while members join, crash and leave; every delivery is checked against a model of the
contract as it happens, and every message's end (acked or dead-lettered) at the end.

It exists for low-rate bugs: a provider that reorders one batch in 50 or loses one message in
1,000 passes a case of tens of messages on a lucky day, never a run of thousands. The size is
a harness setting (``ConformanceHarness.volume``, or ``MSGBROKER_CONFORMANCE_VOLUME``): small
in a provider's everyday test run, large for a nightly one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from msgbroker import Broker, MessageContext, partition_for

from ._support import ConformanceFailure, ConformanceMessage, eventually

if TYPE_CHECKING:
    from types import FrameType

    from ._support import Scenario

__all__ = ["StallWatch", "VolumeModel", "run_volume"]

PARTITIONS = 8
MAX_ATTEMPTS = 4
EPSILON = 0.005
"""Clock slack (seconds) for the "not before its delay" check."""

READY, INFLIGHT, ACKED, DEAD = "ready", "in flight", "acked", "dead"
MAYBE_DEAD = "failed, and dead-lettered if the provider counted a crash's delivery"
"""A nak or raise brought failures + crash exposures to max_retry_attempts: the provider may
have dead-lettered it (a delivery to a member that died counts as a failure) or hand it again (a
read-ahead handed back uncounted, Kafka's in-doubt delivery)."""
OPEN = (READY, INFLIGHT, MAYBE_DEAD)


@dataclass(slots=True)
class _Entry:
    key: str
    seq: int
    partition: int
    index: int
    """Position in its partition, in publish order."""
    state: str = READY
    holder: str | None = None
    deliveries: int = 0
    last_attempt: int = 0
    failures: int = 0
    """Naks and raises a handler made."""
    exposures: int = 0
    """Crashes of a member while the message was unsettled (each may count as a failure)."""
    rejected: bool = False
    disturbed: bool = False
    delayed_until: float | None = None
    acked_by: str | None = None
    """The member that acked or dead-lettered it."""
    uncertain: bool = False
    since: float = field(default_factory=time.monotonic)
    """When the provider last had to act on it (published, delivered, settled)."""
    passed_by: str | None = None
    """A later message of its partition handed while it was MAYBE_DEAD (legal only if it is)."""


@dataclass
class VolumeModel:
    """What a correct provider may do with one topic and one group (docs/semantics.md, rules 2-4,
    10 and 12), checked delivery by delivery."""

    partitions: int = PARTITIONS
    max_attempts: int = MAX_ATTEMPTS
    entries: dict[str, _Entry] = field(default_factory=dict)
    order: dict[int, list[str]] = field(default_factory=dict)
    head: dict[int, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    last_progress: float = field(default_factory=time.monotonic)
    stalls: list[tuple[float, float]] = field(default_factory=list)
    """(end, length) of every event-loop stall of half a claim timeout or more."""
    excused: list[str] = field(default_factory=list)
    """Violations a stall overlapped: a starved member may have lost its lease meanwhile
    (docs/semantics.md, rule 11), which this model cannot see."""

    def publish(self, message_id: str, key: str, seq: int, disturbed: bool) -> None:
        partition = partition_for(key, self.partitions)
        lane = self.order.setdefault(partition, [])
        self.entries[message_id] = _Entry(key, seq, partition, len(lane), disturbed=disturbed)
        lane.append(message_id)

    def _settled(self, entry: _Entry) -> bool:
        return entry.state in (ACKED, DEAD)

    def _violate(self, text: str, entry: _Entry | None = None) -> None:
        if entry is not None and any(end >= entry.since for end, _ in self.stalls):
            self.excused.append(text)
        else:
            self.violations.append(text)

    def deliver(self, message_id: str, member: str, partition: int, attempt: int, at: float) -> None:
        self.last_progress = time.monotonic()
        self.counts["deliveries"] += 1
        entry = self.entries.get(message_id)
        if entry is None:
            self._violate(f"delivered {message_id}, which was never published to this topic")
            return
        name = f"{entry.key}#{entry.seq} ({message_id[:8]})"
        if partition != entry.partition:
            self._violate(f"{name} arrived on partition {partition}; the partitioner says {entry.partition}")
        if (entry.state == DEAD and not entry.uncertain) or (
                entry.failures >= self.max_attempts and not self._settled(entry)):
            self._violate(f"{name} was delivered (attempt {attempt}) after it was dead-lettered or failed "
                          f"max_retry_attempts={self.max_attempts} times", entry)
        elif entry.state == ACKED and not entry.uncertain:
            self._violate(f"{name} was delivered again (attempt {attempt}) after {entry.acked_by} acked it", entry)
        elif entry.state == INFLIGHT:
            self._violate(f"{name} was delivered to {member} while {entry.holder} still handles it", entry)
        elif entry.state == MAYBE_DEAD and entry.passed_by is not None:
            self._violate(f"{entry.passed_by} was handed before {name} was settled: {name} was not dead-lettered "
                          f"after all (attempt {attempt} now)", entry)
        lane = self.order[entry.partition]
        if entry.state == MAYBE_DEAD:  # not dead after all: the lane's head again
            self.head[entry.partition] = min(self.head.get(entry.partition, 0), entry.index)
        head = self.head.get(entry.partition, 0)
        while head < len(lane) and self._settled(self.entries[lane[head]]):
            head += 1
        self.head[entry.partition] = head
        for mid in lane[head:entry.index]:  # passing failed messages that may be dead letters
            earlier = self.entries[mid]
            if earlier.state == MAYBE_DEAD:
                earlier.passed_by = earlier.passed_by or name
            elif not self._settled(earlier):
                break
            head += 1
        if head < entry.index:
            earlier = self.entries[lane[head]]
            never = ", never delivered: lost or handed out of order" if earlier.deliveries == 0 else (
                f", handled {earlier.deliveries}x, last attempt {earlier.last_attempt}, {earlier.failures} failure(s), "
                f"{earlier.exposures} crash(es) while unsettled")
            self._violate(f"{name} was handed to {member} before the earlier {earlier.key}#{earlier.seq} of partition "
                          f"{entry.partition} was settled (it is {earlier.state}{never})", earlier)
        if not entry.disturbed and attempt != entry.deliveries + 1:
            self._violate(f"{name} has delivery_attempt {attempt}; it was handled {entry.deliveries} time(s) and no "
                          f"member joined, left or died while it was unsettled", entry)
        if attempt <= entry.last_attempt:
            self._violate(f"{name} has delivery_attempt {attempt} after attempt {entry.last_attempt}: attempts grow",
                          entry)
        if entry.delayed_until is not None and at < entry.delayed_until - EPSILON:
            self._violate(f"{name} was redelivered {entry.delayed_until - at:.3f}s before its delay ended", entry)
        if entry.state == ACKED:
            self.counts["duplicates"] += 1
        if entry.state == DEAD:  # it came back after its member died: its letter may never have been stored
            self.counts["dead letters redelivered"] += 1
            entry.rejected, entry.failures, entry.exposures = False, 0, self.max_attempts
        entry.state, entry.holder, entry.uncertain, entry.passed_by = INFLIGHT, member, False, None
        entry.since = time.monotonic()
        entry.deliveries += 1
        entry.last_attempt = attempt
        entry.delayed_until = None

    def settle(self, message_id: str, action: str, not_before: float | None = None) -> None:
        self.last_progress = time.monotonic()
        entry = self.entries.get(message_id)
        if entry is None or entry.state != INFLIGHT:
            return
        holder, entry.holder = entry.holder, None
        entry.since = time.monotonic()
        self.counts[action] += 1
        if action == "ack":
            entry.state, entry.acked_by = ACKED, holder
        elif action == "reject":
            entry.state, entry.rejected, entry.acked_by = DEAD, True, holder
        elif action in ("nak", "raise"):
            entry.failures += 1
            if entry.failures >= self.max_attempts:
                entry.state, entry.acked_by = DEAD, holder
            elif entry.failures + entry.exposures >= self.max_attempts:
                entry.state = MAYBE_DEAD
            else:
                entry.state = READY
        else:  # delay
            entry.state, entry.delayed_until = READY, not_before

    def crashed(self, member: str) -> None:
        """``member`` died: what it held is unsettled again, acks it sent may be lost, and every
        unsettled message may have had a delivery counted that no handler settled."""
        for entry in self.entries.values():
            if entry.state == INFLIGHT and entry.holder == member:
                entry.state, entry.holder = READY, None
            if entry.state in (ACKED, DEAD) and entry.acked_by == member:
                # its settlement may not have reached the broker (buffered acks, rule 12; a dead
                # letter stored before the original was settled, rule 4): it may come again
                entry.uncertain = entry.disturbed = True
            if entry.state in (READY, INFLIGHT, MAYBE_DEAD):
                entry.exposures += 1
                if entry.state == READY and entry.failures + entry.exposures >= self.max_attempts:
                    # the crash may have counted its last delivery: it may be dead-lettered
                    # unhandled, and a later message of its partition may pass it then
                    entry.state = MAYBE_DEAD
        self.disturb()

    def disturb(self) -> None:
        for entry in self.entries.values():
            if entry.state in OPEN:
                entry.disturbed = True

    def open_entries(self) -> list[_Entry]:
        return [e for e in self.entries.values() if e.state in OPEN]

    def judge_dead_letters(self, listed: dict[str, int]) -> None:
        """``listed``: message id -> how often it is among the group's dead letters."""
        for message_id, entry in self.entries.items():
            name = f"{entry.key}#{entry.seq} ({message_id[:8]})"
            must = entry.rejected or entry.failures >= self.max_attempts or entry.passed_by is not None
            may = must or entry.failures + entry.exposures >= self.max_attempts
            if message_id in listed:
                if not may:
                    self._violate(
                        f"{name} is a dead letter, but it failed {entry.failures} time(s) and was exposed to "
                        f"{entry.exposures} crash(es): fewer than max_retry_attempts={self.max_attempts} (handled "
                        f"{entry.deliveries}x, last delivery_attempt {entry.last_attempt}; an attempt higher than "
                        f"the handlings is a delivery the provider counted and no handler saw)", entry
                    )
                elif entry.state != DEAD:
                    entry.state = DEAD  # dead-lettered unhandled after crashes: legal, see above
            elif must:
                why = "was rejected" if entry.rejected else "failed too often" if entry.state == DEAD else (
                    f"was passed by the later {entry.passed_by}")
                self._violate(f"{name} {why} but is not among the dead letters", entry)
        for message_id in listed:
            if message_id not in self.entries:
                self._violate(f"dead letter {message_id} was never published to this topic")


class StallWatch:
    """How late the event loop wakes up. A stall of ``limit`` seconds or more is passed to
    ``on_stall(end, length)`` (it excuses the violations it overlapped), and a watchdog thread
    keeps the loop thread's stack at that moment: if the loop was running the provider's own
    code, the provider blocked the event loop, which is its failure (a member that blocks loses
    its leases). Used by the volume tier and the state machine."""

    def __init__(self, on_stall: Callable[[float, float], None], limit: float, provider_package: str) -> None:
        self.on_stall, self.limit, self.package = on_stall, limit, provider_package
        self.tick = time.monotonic()
        self.max_lag = 0.0
        self.stacks: list[tuple[float, str]] = []
        self.thread_id = threading.get_ident()
        self.stopped = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="msgbroker-conformance-stall-watch", daemon=True)

    async def run(self) -> None:
        self.thread_id = threading.get_ident()  # the loop's thread
        self.watchdog.start()
        try:
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.02)
                self.tick = now = time.monotonic()
                lag = now - before - 0.02
                self.max_lag = max(self.max_lag, lag)
                if lag >= self.limit:
                    self.on_stall(now, lag)
        finally:
            self.stopped.set()

    def _watch(self) -> None:
        """Sample the loop thread while it is late. It counts as blocked (not starved of CPU)
        only when this thread itself wakes on time, the loop has not ticked for twice ``limit``
        (a whole claim timeout), and two samples a quarter ``limit`` apart show the loop thread
        on the same line of the provider's code."""
        step = self.limit / 4
        previous: tuple[float, str, str] | None = None  # (tick, innermost line, stack)
        while True:
            asked = time.monotonic()
            if self.stopped.wait(step):
                return
            on_time = time.monotonic() - asked < step * 1.5
            late = time.monotonic() - self.tick
            frame = sys._current_frames().get(self.thread_id) if late >= self.limit else None
            if frame is None or not on_time:
                previous = None
                continue
            stack = _plain_stack(frame)
            here = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            if (previous is not None and previous[0] == self.tick and previous[1] == here
                    and late >= 2 * self.limit and self.package in frame.f_code.co_filename.replace("\\", "/")):
                if not self.stacks or self.stacks[-1][1] != stack:
                    self.stacks.append((late, stack))
            previous = (self.tick, here, stack)

    def blocking(self) -> str | None:
        """The stack of a stall in which the provider's own code held the loop, if any."""
        for late, stack in self.stacks:
            return f"the event loop was blocked for {late:.2f}s or more in the provider's code:\n{stack}"
        return None


def _plain_stack(frame: FrameType) -> str:
    """``traceback.format_stack(frame)`` without its carets: on Python 3.11 those parse source
    lines with the ``ast`` module, whose state is not safe beside a compile in another thread
    (CPython gh-106905: the loop thread's next ``inspect.getsource`` — Hypothesis calls it —
    failed with "SystemError: AST constructor recursion depth mismatch")."""
    return "".join(f'  File "{entry.filename}", line {entry.lineno}, in {entry.name}\n'
                   + (f"    {entry.line.strip()}\n" if entry.line else "")
                   for entry in traceback.extract_stack(frame))


def _fate(seed: int, key: str, seq: int, attempt: int, delay: bool) -> tuple[str, float]:
    """What the handler does with one delivery: a pure function of the seed and the delivery,
    so a run's choices never depend on timing."""
    rng = random.Random(f"{seed}-{key}-{seq}-{attempt}")
    roll = rng.random()
    if roll < 0.06:
        return "nak", 0.0
    if roll < 0.11:
        return "raise", 0.0
    if roll < 0.13:
        return "reject", 0.0
    if roll < 0.18 and delay:
        return "delay", rng.uniform(0.005, 0.05)
    return "ack", 0.0


async def run_volume(s: Scenario, size: int) -> Counter[str]:
    """Publish ``size`` messages over many keys through members that join, crash and leave;
    raise :class:`ConformanceFailure` with the first violation the model saw."""
    caps = s.capabilities
    rng = random.Random(f"{s.seed}-volume")
    model = VolumeModel()
    settings = {"partition_count": PARTITIONS, "max_retry_attempts": MAX_ATTEMPTS, "retry_delay": 0}
    producer = await s.connect(**settings)
    topic, group = s.topic("vol"), s.group("vol")
    members: dict[str, Broker] = {}
    jitter = random.Random(f"{s.seed}-jitter")  # apart from rng: handlers run in timing's order

    def handler(member: str):  # type: ignore[no-untyped-def]
        async def handle(ctx: MessageContext[ConformanceMessage]) -> None:
            message, message_id = ctx.message, ctx.message_id
            model.deliver(message_id, member, ctx.partition, ctx.delivery_attempt, time.time())
            action, seconds = _fate(s.seed, message.key, message.seq, ctx.delivery_attempt, bool(caps.delay))
            if jitter.random() < 0.2:
                await asyncio.sleep(0)  # let other lanes interleave
            if action == "raise":
                model.settle(message_id, "raise")
                raise RuntimeError(f"volume: {message.key}#{message.seq} attempt {ctx.delivery_attempt}")
            if action == "nak":
                model.settle(message_id, "nak")
                await ctx.nak(requeue=True)
            elif action == "reject":
                model.settle(message_id, "reject")
                await ctx.nak(requeue=False, error="volume: rejected")
            elif action == "delay":
                model.settle(message_id, "delay", time.time() + seconds)
                await ctx.delay(seconds)
            else:
                model.settle(message_id, "ack")
                await ctx.ack()

        return handle

    package = type(producer.transport).__module__.split(".")[0].replace(".", "/")
    watch = StallWatch(lambda end, lag: model.stalls.append((end, lag)), s.claim_timeout() / 2, f"{package}/")
    watching = asyncio.create_task(watch.run())
    try:
        return await _drive(s, model, producer, topic, group, size, settings, members, handler, rng, watch)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


async def _drive(s: Scenario, model: VolumeModel, producer: Broker, topic: str, group: str, size: int,
                 settings: dict[str, int], members: dict[str, Broker], handler: Any, rng: random.Random,
                 watch: StallWatch) -> Counter[str]:
    caps = s.capabilities
    can_crash = caps.kill_member and caps.redelivery_on_crash
    joined = 0

    async def join() -> None:
        nonlocal joined
        joined += 1
        name = f"v{joined}"
        model.disturb()
        broker = await s.connect(**settings)
        await broker.subscribe(topic, group, handler(name), message_type=ConformanceMessage)
        members[name] = broker

    async def crash() -> None:
        name = rng.choice(sorted(members))
        broker = members.pop(name)
        await broker.abort()
        model.crashed(name)

    async def leave() -> None:
        name = rng.choice(sorted(members))
        model.disturb()
        await members.pop(name).close()

    await join()
    if caps.competing_consumers:
        await join()
    # membership events at seeded points of the publishing
    plan: list[tuple[int, str]] = []
    if caps.competing_consumers:
        plan.append((rng.randrange(size // 8, size // 3 + 1), "join"))
        plan.append((rng.randrange(size // 2, 3 * size // 4 + 1), "leave"))
    if can_crash and caps.competing_consumers:
        plan.append((rng.randrange(size // 3, 2 * size // 3 + 1), "crash"))
    plan.sort()
    keys = [f"vol-{i}" for i in range(max(PARTITIONS * 2, min(128, size // 25)))]
    seqs: Counter[str] = Counter()
    published = 0
    hand_over = s.timeout(s.failover_timeout())
    moving_until = time.monotonic() + hand_over
    while published < size:
        while plan and plan[0][0] <= published:
            _, what = plan.pop(0)
            if what == "crash" and len(members) > 1:
                await crash()
            elif what == "leave" and len(members) > 1:
                await leave()
            elif what == "join":
                await join()
            moving_until = time.monotonic() + hand_over
        batch = []
        for _ in range(min(size - published, rng.randint(1, 40))):
            key = rng.choice(keys)
            batch.append(ConformanceMessage(key=key, seq=seqs[key]))
            seqs[key] += 1
        moving = time.monotonic() < moving_until  # an old owner may read these ahead, then hand them over
        for message in batch:
            model.publish(str(message.message_id), message.key, message.seq, disturbed=moving)
        await producer.publish_batch(topic, batch)
        published += len(batch)
        # bounded backlog: a slow server is not buried, and the run stays a test of the contract
        with contextlib.suppress(ConformanceFailure):  # a stuck backlog is judged at the end
            await eventually(lambda: len(model.open_entries()) <= 400 or model.violations,
                             hand_over + s.timeout(10), "the backlog to shrink")
        if model.violations:
            break
    # the end: every message acked or dead-lettered; quiet for a hand-over's time means lost
    quiet = hand_over + s.timeout(2)
    listed: Counter[str] = Counter()
    while not model.violations:
        open_ = model.open_entries()
        if not open_:
            break
        listed = Counter(x.message_id for x in await producer.dead_letters(topic, group))
        if all(str(mid) in listed for mid, e in model.entries.items() if e.state in OPEN):
            break
        if time.monotonic() - model.last_progress > quiet:
            lost = [e for m, e in model.entries.items() if e.state in OPEN and m not in listed]
            raise ConformanceFailure(
                f"lost: {len(lost)} of {size} published message(s) were never handled to the end (nothing "
                f"happened for {quiet:.1f}s), e.g. " + ", ".join(
                    f"{e.key}#{e.seq} (partition {e.partition}, handled {e.deliveries}x, {e.state})" for e in lost[:5])
                + f" (seed {s.seed})"
            )
        await asyncio.sleep(0.05)
    blocked = watch.blocking()
    if blocked is not None:
        raise ConformanceFailure(f"{blocked}\n({len(model.excused)} violation(s) it overlapped not judged, seed "
                                 f"{s.seed})")
    if model.violations:
        raise ConformanceFailure(f"{model.violations[0]} ({len(model.violations)} violation(s) in {size} messages, "
                                 f"seed {s.seed})")
    listed = Counter(x.message_id for x in await producer.dead_letters(topic, group))
    model.judge_dead_letters(dict(listed))
    if model.violations:
        raise ConformanceFailure(f"{model.violations[0]} ({len(model.violations)} violation(s), seed {s.seed})")
    if caps.pending_count_exact:
        deadline = time.monotonic() + hand_over + s.timeout(10)
        while (pending := await producer.pending_count(topic, group)) != 0:
            if time.monotonic() > deadline:
                raise ConformanceFailure(f"pending_count is {pending} after all {size} messages were settled")
            await asyncio.sleep(0.05)
    for broker in list(members.values()):
        with contextlib.suppress(Exception):
            await broker.close()
    model.counts["messages"] = size
    model.counts["dead letters"] = len(listed)
    model.counts["stalls"] = len(model.stalls)
    model.counts["violations excused by a stall"] = len(model.excused)
    return model.counts
