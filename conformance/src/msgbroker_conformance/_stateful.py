"""The Hypothesis state machine: random sequences of publish / handle (ack, nak, reject, delay) /
member crash / member join / member leave run against the real provider and, step by step, a
pure-Python reference model of one topic and one group.

Hypothesis stateful tests are synchronous, provider connections are bound to their event loop:
each machine owns one event loop in a background thread for its whole life (zarr's SyncMixin
approach) and every rule bridges into it with ``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from hypothesis import HealthCheck, Phase, event, note, reject, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyFailure
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from msgbroker import Broker, MessageContext, Subscription, partition_for
from msgbroker.spi import assign_partitions  # the engine's lease assignment, to know when it settled

from ._support import ConformanceFailure, ConformanceMessage
from ._volume import StallWatch

if TYPE_CHECKING:
    from ._harness import ConformanceHarness

__all__ = ["PROFILES", "BrokerMachine", "ModelViolation", "ReferenceModel", "machine_settings", "run_machine"]

T = TypeVar("T")

PARTITIONS = 4
KEYS = ("a", "b", "c", "d", "e", "f")
MAX_ATTEMPTS = 3
EPSILON = 0.005
"""Clock slack (seconds) for the "not before" check of a delay."""

PROFILES: dict[str, dict[str, Any]] = {
    # (examples, steps) for in-process providers, then for providers with a server
    "default": {"local": (25, 25), "remote": (10, 20), "derandomize": False},
    # CI runs every provider's machine in one bounded job: fewer, fixed examples against servers.
    "ci": {"local": (25, 25), "remote": (6, 15), "derandomize": True},
    "nightly": {"local": (300, 60), "remote": (60, 40), "derandomize": False},
}
"""Budgets of the state machine, chosen by ``HYPOTHESIS_PROFILE`` (unknown names: ``default``)."""


def machine_settings(local: bool, profile: str | None = None) -> settings:
    """Hypothesis settings for the profile named by ``HYPOTHESIS_PROFILE`` (or ``profile``)."""
    name = profile or os.environ.get("HYPOTHESIS_PROFILE", "default")
    chosen = PROFILES.get(name, PROFILES["default"])
    examples, steps = chosen["local" if local else "remote"]
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=chosen["derandomize"],
        database=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=True,
    )


class ModelViolation(ConformanceFailure):
    """The provider did something the reference model says a correct broker never does."""

    def __init__(self, message: str, kind: str = "", since: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.since = since
        """When the provider last acted on the message concerned (``time.monotonic()``): a stall
        that ended before it cannot excuse the violation."""


# -- the reference model -------------------------------------------------------------------------

READY, INFLIGHT, ACKED, DEAD = "ready", "in flight", "acked", "dead"


@dataclass(slots=True)
class Entry:
    """One published message, as the model tracks it for the group."""

    message_id: str
    key: str
    seq: int
    partition: int
    state: str = READY
    holder: str | None = None
    deliveries: int = 0
    """Handler invocations seen."""
    last_attempt: int = 0
    naks: int = 0
    disturbed: bool = False
    """A member joined, left or died while this was unsettled: the broker may have counted
    deliveries no handler saw (prefetched, then handed over), so attempts may jump."""
    delayed_until: float | None = None
    acked_by: str | None = None
    uncertain: bool = False
    """Acked by a member that died later: a broker that buffers acks may deliver it again."""
    lettered: bool = False
    """Dead-lettered once: a dead letter may stay listed if the message came back (rule 4)."""
    exposures: int = 0
    """Members that died while it was unsettled: each may count as a failure (docs/semantics.md,
    rule 3: a delivery to a member that died), a graceful hand-over never does."""
    since: float = field(default_factory=time.monotonic)


@dataclass
class ReferenceModel:
    """What a correct broker may do with one topic, one group and ``partitions`` partitions
    (docs/semantics.md): a pure function of the history of publishes and settlements."""

    partitions: int = PARTITIONS
    max_attempts: int = MAX_ATTEMPTS
    entries: dict[str, Entry] = field(default_factory=dict)
    order: dict[int, list[str]] = field(default_factory=dict)
    duplicates: int = 0

    def publish(self, message_id: str, key: str, seq: int) -> None:
        partition = partition_for(key, self.partitions)
        self.entries[message_id] = Entry(message_id, key, seq, partition)
        self.order.setdefault(partition, []).append(message_id)

    def head(self, partition: int) -> Entry | None:
        """The oldest message of the partition the group has not settled."""
        for mid in self.order.get(partition, ()):
            entry = self.entries[mid]
            if entry.state not in (ACKED, DEAD):
                return entry
        return None

    def expects_delivery(self) -> bool:
        """Some partition's head is waiting for a handler (not in flight)."""
        return any((h := self.head(p)) is not None and h.state == READY for p in self.order)

    def unsettled(self) -> tuple[int, int]:
        """(exact, extra): the pending count must lie in [exact, exact + extra]."""
        exact = sum(1 for e in self.entries.values() if e.state in (READY, INFLIGHT))
        extra = sum(1 for e in self.entries.values() if e.state in (ACKED, DEAD) and e.uncertain)
        return exact, extra

    def deliver(self, message_id: str, member: str, attempt: int, at: float) -> Entry:
        """A handler of ``member`` was handed ``message_id``: check it may be, then commit."""
        entry = self.entries.get(message_id)
        if entry is None:
            raise ModelViolation(f"delivered {message_id}, which was never published to this topic")
        name = f"{entry.key}#{entry.seq} ({message_id[:8]})"
        since = entry.since
        if entry.state == DEAD and not entry.uncertain:
            raise ModelViolation(f"{name} was delivered after it was dead-lettered", since=since)
        if entry.state == ACKED and not entry.uncertain:
            raise ModelViolation(f"{name} was delivered again after it was acked (by {entry.acked_by})", since=since)
        if entry.state == INFLIGHT:
            raise ModelViolation(f"{name} was delivered to {member} while {entry.holder} still handles it", since=since)
        for mid in self.order[entry.partition]:
            if mid == message_id:
                break
            earlier = self.entries[mid]
            if earlier.state not in (ACKED, DEAD):
                raise ModelViolation(
                    f"{name} was handed to {member} before the earlier {earlier.key}#{earlier.seq} of partition "
                    f"{entry.partition} was settled (it is {earlier.state})", "order", since=earlier.since
                )
        if entry.state == ACKED:
            self.duplicates += 1
        if not entry.disturbed and attempt != entry.deliveries + 1:
            raise ModelViolation(f"{name} has delivery_attempt {attempt}; it was handled {entry.deliveries} time(s)",
                                 since=since)
        if attempt <= entry.last_attempt or attempt < entry.deliveries + 1:
            raise ModelViolation(
                f"{name} has delivery_attempt {attempt} after attempt {entry.last_attempt} "
                f"({entry.deliveries} handler call(s)): attempts must grow", since=since
            )
        if entry.delayed_until is not None and at < entry.delayed_until - EPSILON:
            raise ModelViolation(f"{name} was redelivered {entry.delayed_until - at:.3f}s before its delay ended",
                                 since=since)
        entry.state, entry.holder = INFLIGHT, member
        entry.since = time.monotonic()
        entry.deliveries += 1
        entry.last_attempt = attempt
        entry.delayed_until = None
        entry.uncertain = False
        return entry

    def settle(self, message_id: str, action: str, dead: bool, not_before: float | None = None) -> None:
        """The handler settled: ``dead`` says whether the broker lists it as a dead letter now."""
        entry = self.entries[message_id]
        name = f"{entry.key}#{entry.seq}"
        holder = entry.holder
        entry.holder = None
        since, entry.since = entry.since, time.monotonic()
        if action == "ack":
            entry.state, entry.acked_by = ACKED, holder
        elif action == "reject":
            if not dead:
                raise ModelViolation(f"{name} was naked with requeue=False but is not among the dead letters",
                                     since=since)
            entry.state, entry.acked_by, entry.lettered = DEAD, holder, True
        elif action == "nak":
            entry.naks += 1
            if dead and entry.lettered and entry.disturbed:
                # Listed since an earlier settlement whose ack a crash may have lost (the letter
                # stays, rule 4): whether this nak dead-lettered it again cannot be told apart.
                entry.state, entry.acked_by, entry.uncertain = DEAD, holder, True
            elif dead:
                if entry.naks + entry.exposures < self.max_attempts and not entry.lettered:
                    raise ModelViolation(
                        f"{name} was dead-lettered after a nak on attempt {entry.last_attempt}: {entry.naks} "
                        f"failure(s) and {entry.exposures} member(s) dead while it was unsettled, fewer than "
                        f"max_retry_attempts={self.max_attempts}", since=since
                    )
                entry.state, entry.acked_by, entry.lettered = DEAD, holder, True
            elif entry.naks >= self.max_attempts:
                raise ModelViolation(f"{name} failed {entry.naks} times and is still not dead-lettered", since=since)
            else:
                entry.state = READY
        elif action == "delay":
            if dead and not (entry.lettered and entry.disturbed):  # not a letter of an earlier settlement
                raise ModelViolation(f"{name} was dead-lettered on a delay", since=since)
            entry.state, entry.delayed_until = READY, not_before
        else:  # pragma: no cover - the machine only draws the actions above
            raise ValueError(action)

    def forget_holder(self, member: str) -> None:
        """``member`` died: what it held is unsettled again, and acks it sent may be lost."""
        for entry in self.entries.values():
            if entry.state == INFLIGHT and entry.holder == member:
                entry.state, entry.holder = READY, None
            if entry.state in (ACKED, DEAD) and entry.acked_by == member:
                # its settlement may not have reached the broker (buffered acks, rule 12; a dead
                # letter stored before the original was settled, rule 4): it may come again, and
                # the broker then saw a delivery to a member that died (rule 3) — one more
                # possible failure
                entry.uncertain = entry.disturbed = True
                entry.exposures += 1
            if entry.state in (READY, INFLIGHT):
                entry.exposures += 1
        self.disturb()

    def release(self, message_id: str) -> None:
        """The handler of ``message_id`` was cut off (the shutdown grace period of a lane that
        moved ran out): unsettled again, for whichever member owns the lane next."""
        entry = self.entries.get(message_id)
        if entry is not None and entry.state == INFLIGHT:
            entry.state, entry.holder = READY, None
        self.disturb()

    def disturb(self) -> None:
        """Membership changed: prefetched-but-unhandled deliveries may be counted."""
        for entry in self.entries.values():
            if entry.state in (READY, INFLIGHT):
                entry.disturbed = True

    def dead_without_handler(self, message_id: str) -> bool:
        """The broker dead-lettered a message the model did not see go (a member died holding it
        too often); legal only for an unsettled message whose failures plus the members that died
        while it was unsettled reach max_retry_attempts (a graceful hand-over costs nothing).
        Commits when legal."""
        entry = self.entries.get(message_id)
        if entry is None:
            raise ModelViolation(f"dead letter {message_id} was never published to this topic")
        if entry.state == DEAD:
            return True
        if entry.state == READY and entry.naks + entry.exposures >= self.max_attempts:
            entry.state, entry.lettered = DEAD, True
            return True
        return False


# -- the bridge ----------------------------------------------------------------------------------


class _LoopThread:
    """One event loop in a background thread, for the whole life of a machine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="msgbroker-conformance-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise ConformanceFailure(f"a provider call did not return within {timeout:.0f}s") from exc

    def close(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_rest(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()


@dataclass(eq=False)
class Arrival:
    """One handler invocation, parked until the machine decides how to settle it."""

    member: str
    message_id: str
    key: str
    seq: int
    partition: int
    attempt: int
    at: float
    action: asyncio.Future[tuple[str, float]] | None
    done: concurrent.futures.Future[str] = field(default_factory=concurrent.futures.Future)


@dataclass(eq=False)
class Member:
    name: str
    broker: Broker
    subscription: Subscription | None = None
    auto: bool = False
    """Ack at once without asking the machine (while leaving, and while draining)."""


class BrokerMachine(RuleBasedStateMachine):
    """The provider under test beside :class:`ReferenceModel`. Bound to a harness by
    :func:`run_machine` (``harness`` is set on a subclass)."""

    harness: ConformanceHarness

    def __init__(self) -> None:
        super().__init__()
        self.bridge = _LoopThread()
        self.model = ReferenceModel()
        self.namespace = uuid.uuid4().hex[:10]
        self.topic = f"sm-{uuid.uuid4().hex[:8]}"
        self.group = f"g-{uuid.uuid4().hex[:8]}"
        self.multiplier = float(self.harness.timeout_multiplier)
        self.capabilities = self.harness.capabilities()
        self.members: dict[str, Member] = {}
        self.departed: list[Member] = []
        self.arrivals: queue.SimpleQueue[Arrival] = queue.SimpleQueue()
        self.inbox: list[Arrival] = []
        self.seqs: Counter[str] = Counter()
        self.producer: Broker | None = None
        self.crashes = 0
        self.joined = 0
        self.in_step = False
        self.coverage: Counter[str] = Counter()
        self.max_lag = 0.0
        self.rebalancing = False
        self.handed: list[Arrival] = []
        """Every parked invocation, so that a close never waits on one the machine forgot."""
        self.stall_limit = float("inf")
        self.stalls: list[tuple[float, float]] = []
        """(end, length) of every event-loop stall of ``stall_limit`` or more."""
        self.watch: StallWatch | None = None
        self.failure: AssertionError | None = None
        """The first violation: the rest of the example runs as no-ops, and teardown raises it."""
        self.dropped = False
        """A violation seen after the loop stalled: teardown drops the example."""
        self.plan: Counter[str] = Counter()
        """What the rules did so far as Hypothesis chose them, whatever the provider did: the
        preconditions read only this, so the rules a replay may draw never depend on timing."""

    # -- plumbing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, name: str = "") -> Iterator[bool]:
        """One step; yields False (do nothing) once an earlier step failed.

        A violation is not raised here but kept and raised by teardown, and the steps after
        it do nothing: so an example draws the same data from Hypothesis whether it fails at
        its 5th step or, on a replay under other timing, at its 10th or not at all (Hypothesis
        would otherwise stop with ``FlakyStrategyDefinition`` instead of the failure)."""
        if self.failure is not None or self.dropped:
            yield False
            return
        self.in_step = True
        if name:
            self.coverage[f"step:{name}"] += 1
        try:
            yield True
        except (AssertionError, Exception, asyncio.CancelledError) as exc:
            # a ConformanceFailure, an assertion of the machine itself, or an error a provider
            # call raised: kept for teardown like any violation (raising it here would change
            # what Hypothesis draws after it)
            failure = exc if isinstance(exc, AssertionError) else ConformanceFailure(
                f"a step raised {type(exc).__name__}: {exc}")
            failure.__cause__ = None if failure is exc else exc
            if self._excused(failure):
                self._drop(failure)
            elif self.failure is None:  # (a provider that blocked the loop is already the failure)
                self.failure = failure
            return
        self.in_step = False

    def _excused(self, failure: BaseException) -> bool:
        """A stall of half a claim timeout excuses only what it overlapped: a violation about a
        message the provider last acted on before the stall ended (a member starved that long may
        have lost its lease, docs/semantics.md rule 11), or one about no message in particular
        (liveness, pending count) seen within two claim timeouts after it. A stall inside the
        provider's own code excuses nothing: it becomes the failure, with its stack."""
        if not self.stalls:
            return False
        blocked = self.watch.blocking() if self.watch is not None else None
        if blocked is not None:
            self.failure = ConformanceFailure(f"{blocked}\n(it overlapped: {failure})")
            return False
        since = getattr(failure, "since", None)
        if since is None:
            return self.stalls[-1][0] >= time.monotonic() - 2 * self._claim_timeout()
        return any(end >= since for end, _ in self.stalls)

    def _drop(self, exc: BaseException) -> None:
        event("example dropped: the event loop stalled past half a claim timeout")
        note(f"dropped: the loop stalled {self.max_lag:.2f}s (limit {self.stall_limit:.2f}s): {exc}")
        self.dropped = True

    @contextlib.contextmanager
    def _judging(self) -> Iterator[None]:
        """A violation seen after the event loop stalled for half a claim timeout or more is not
        judged: a member may legitimately have lost its lease meanwhile (a paused member's
        partitions move, docs/semantics.md), which this model cannot see. Hypothesis drops the example."""
        try:
            yield
        except ConformanceFailure as exc:
            if self._excused(exc):
                self._drop(exc)
                reject()
            if self.failure is not None and self.failure is not exc:
                raise self.failure from exc  # the provider blocked the loop: that is the report
            raise

    def _stalled(self, end: float, lag: float) -> None:
        self.stalls.append((end, lag))
        self.max_lag = max(self.max_lag, lag)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return self.bridge.run(coro, timeout * self.multiplier)

    async def _connect(self) -> Broker:
        broker = self.harness.connect(
            self.namespace, partition_count=PARTITIONS, retry_delay=0, max_retry_attempts=MAX_ATTEMPTS,
            shutdown_timeout=5,
        )
        await broker.open()
        return broker

    def _handler(self, member: Member) -> Any:
        loop = self.bridge.loop

        async def handle(ctx: MessageContext[ConformanceMessage]) -> None:
            message = ctx.message
            action: asyncio.Future[tuple[str, float]] | None = None if member.auto else loop.create_future()
            arrival = Arrival(member.name, ctx.message_id, message.key, message.seq, ctx.partition,
                              ctx.delivery_attempt, time.time(), action)
            if action is not None:
                self.handed.append(arrival)
            self.arrivals.put(arrival)
            try:
                kind, arg = ("ack", 0.0) if action is None else await action
                if kind == "ack":
                    await ctx.ack()
                elif kind == "nak":
                    await ctx.nak(requeue=True, error="naked by the state machine")
                elif kind == "reject":
                    await ctx.nak(requeue=False, error="rejected by the state machine")
                else:
                    await ctx.delay(arg)
                arrival.done.set_result(kind)
            except BaseException as exc:
                if not arrival.done.done():
                    arrival.done.set_exception(exc)
                raise

        return handle

    def _join(self) -> Member:
        self.joined += 1
        name = f"m{self.joined}"
        self.model.disturb()
        self.rebalancing = True
        broker = self.run(self._connect())
        member = Member(name, broker)
        member.subscription = self.run(
            broker.subscribe(self.topic, self.group, self._handler(member), message_type=ConformanceMessage)
        )
        self.members[name] = member
        note(f"{name} joined")
        return member

    def _dead_ids(self) -> set[str]:
        assert self.producer is not None
        return {x.message_id for x in self.run(self.producer.dead_letters(self.topic, self.group))}

    def _refresh_dead(self) -> None:
        for mid in self._dead_ids():
            if mid in self.model.entries and not self.model.dead_without_handler(mid):
                entry = self.model.entries[mid]
                if entry.state != DEAD and not entry.lettered:
                    raise ModelViolation(
                        f"{entry.key}#{entry.seq} is among the dead letters but is {entry.state} ({entry.naks} "
                        f"failure(s), {entry.exposures} member(s) dead while it was unsettled, max_retry_attempts="
                        f"{self.model.max_attempts})", since=entry.since)

    def _reap_cut_off(self, message_id: str) -> None:
        """The parked handler of ``message_id`` whose lane moved was cut off by the engine (the
        grace period ran out, or the lease was lost): unsettled again. The engine cancels that
        handler before it closes the lane and releases the lease, so its end is visible here
        before the next owner's delivery of the message arrives."""
        for parked in [a for a in self.inbox if a.message_id == message_id]:
            if parked.done.done() and isinstance(parked.done.exception(), asyncio.CancelledError):
                event("handler cut off after the grace period")
                self.inbox.remove(parked)
                self.model.release(message_id)

    def _admit(self, arrival: Arrival) -> None:
        self._reap_cut_off(arrival.message_id)
        try:
            self.model.deliver(arrival.message_id, arrival.member, arrival.attempt, arrival.at)
        except ModelViolation as exc:
            if exc.kind != "order":
                raise
            self._refresh_dead()  # an earlier message may have been dead-lettered unseen
            self.model.deliver(arrival.message_id, arrival.member, arrival.attempt, arrival.at)
        entry = self.model.entries[arrival.message_id]
        if entry.deliveries > 1:
            self.coverage["redelivered"] += 1
        if arrival.action is None:
            arrival.done.result(self.multiplier * 10)
            self.model.settle(arrival.message_id, "ack", dead=False)
        else:
            self.inbox.append(arrival)

    def _collect(self, wait: bool) -> None:
        """Admit every new handler invocation; with ``wait``, block (bounded) for one."""
        deadline = time.monotonic() + (10.0 + self._claim_timeout()) * self.multiplier
        while True:
            try:
                while True:
                    self._admit(self.arrivals.get_nowait())
            except queue.Empty:
                pass
            if not wait or self.inbox or not self.model.expects_delivery() or not self._live():
                return
            if time.monotonic() > deadline:
                self._refresh_dead()
                if not self.model.expects_delivery():
                    return
                heads = [h for p in sorted(self.model.order) if (h := self.model.head(p)) is not None]
                raise ConformanceFailure(
                    "liveness: no delivery arrived although these partition heads wait for a handler: "
                    + ", ".join(f"{h.key}#{h.seq} (partition {h.partition}, {h.state})" for h in heads)
                )
            try:
                self._admit(self.arrivals.get(timeout=0.05))
            except queue.Empty:
                pass

    def _claim_timeout(self) -> float:
        """The provider's declared claim timeout (``Transport.lease_ttl()``)."""
        return float(self.producer.transport.lease_ttl()) if self.producer is not None else 30.0

    def _live(self) -> list[Member]:
        return list(self.members.values())

    def _ack_parked(self, arrival: Arrival) -> None:
        """Ack a message the machine held; one whose handler the engine has cut off meanwhile
        (its lane moved and the grace period ran out) is unsettled again, as in :meth:`settle`."""
        try:
            self._resolve(arrival, "ack")
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            event("handler cut off after the grace period")
            self.model.release(arrival.message_id)
            return
        self.model.settle(arrival.message_id, "ack", dead=False)

    def _resolve(self, arrival: Arrival, kind: str, arg: float = 0.0) -> str:
        assert arrival.action is not None
        self.bridge.loop.call_soon_threadsafe(arrival.action.set_result, (kind, arg))
        try:
            return arrival.done.result(10 * self.multiplier)
        except concurrent.futures.TimeoutError as exc:
            raise ConformanceFailure(f"settling {arrival.key}#{arrival.seq} with {kind} did not return") from exc

    # -- rules ------------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self.plan["members"] += 1
        self.plan["joined"] += 1
        with self._step("start") as live:
            if live:
                self.producer = self.run(self._connect())
                self.stall_limit = self.producer.transport.lease_ttl() / 2
                package = type(self.producer.transport).__module__.split(".")[0]
                self.watch = StallWatch(self._stalled, self.stall_limit, f"{package}/")
                asyncio.run_coroutine_threadsafe(self.watch.run(), self.bridge.loop)
                self._join()

    @rule(key=st.sampled_from(KEYS), n=st.integers(1, 3))
    def publish(self, key: str, n: int) -> None:
        self.plan["published"] += n
        with self._step("publish") as live:
            if live:
                self._publish(key, n)

    def _publish(self, key: str, n: int) -> None:
        assert self.producer is not None
        messages = []
        for _ in range(n):
            messages.append(ConformanceMessage(key=key, seq=self.seqs[key]))
            self.seqs[key] += 1
        moving = self.rebalancing and not self._assignment_settled()
        self.rebalancing = moving
        for message in messages:
            self.model.publish(str(message.message_id), message.key, message.seq)
            if moving:  # an old owner may read it ahead, then hand its lane over unhandled
                self.model.entries[str(message.message_id)].disturbed = True
        self.run(self.producer.publish_batch(self.topic, messages))

    def _assignment_settled(self) -> bool:
        """The joins' hand-overs are done: every partition is read by the live member that will
        keep it (under engine leases: its rendezvous owner; otherwise every member holds some)."""
        assert self.producer is not None
        mode = self.producer.transport.ASSIGNMENT
        if mode == "shared" or not self.members:
            return True

        async def held() -> dict[str, list[int]]:
            return {m.subscription.member_id: list(m.subscription.partitions)
                    for m in self.members.values() if m.subscription is not None}

        holdings = self.run(held())
        if sorted(p for ps in holdings.values() for p in ps) != list(range(PARTITIONS)):
            return False
        if mode == "leases":
            owners = assign_partitions(PARTITIONS, sorted(holdings))
            return all(owners[p] == member for member, ps in holdings.items() for p in ps)
        return all(holdings.values())

    # One rule per settlement, so that Hypothesis's swarm testing (which switches whole rules
    # off per example) rarely leaves an example without any handling at all.

    def _can_handle(self) -> bool:
        # Only what the history decides (never what has arrived yet): Hypothesis replays
        # examples and needs the same rules enabled each time.
        # (Not "something is unsettled": a leaving member acks what it is handed meanwhile, and
        # which messages those are depends on timing.)
        return self.plan["members"] > 0 and self.plan["published"] > 0

    @precondition(_can_handle)
    @rule(pick=st.integers(0, 7))
    def ack(self, pick: int) -> None:
        with self._step("ack") as live:
            if live:
                self._handle(pick, "ack", 0.0)

    @precondition(_can_handle)
    @rule(pick=st.integers(0, 7))
    def ack_everything(self, pick: int) -> None:
        with self._step("ack_everything") as live:
            if live:
                self._handle(pick, "ack", 0.0)
                while self.inbox:
                    self._handle(0, "ack", 0.0)

    @precondition(_can_handle)
    @rule(pick=st.integers(0, 7))
    def nak(self, pick: int) -> None:
        with self._step("nak") as live:
            if live:
                self._handle(pick, "nak", 0.0)

    @precondition(_can_handle)
    @rule(pick=st.integers(0, 7))
    def reject(self, pick: int) -> None:
        with self._step("reject") as live:
            if live:
                self._handle(pick, "reject", 0.0)

    @precondition(_can_handle)
    @rule(pick=st.integers(0, 7), seconds=st.floats(0.01, 0.1))
    def delay(self, pick: int, seconds: float) -> None:
        with self._step("delay") as live:
            if live:
                self._handle(pick, "delay", seconds)

    def _handle(self, pick: int, action: str, delay: float) -> None:
        self._collect(wait=True)
        if not self.inbox:
            return
        arrival = self.inbox.pop(pick % len(self.inbox))
        if action == "delay" and not self.capabilities.delay:
            action = "nak"
        not_before = time.time() + delay if action == "delay" else None
        note(f"{arrival.member} settles {arrival.key}#{arrival.seq} attempt {arrival.attempt}: {action}")
        try:
            outcome = self._resolve(arrival, action, delay)
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            # the engine cut the handler off: its lane moved and the grace period ran out while
            # the machine held the message (docs/semantics.md, shutdown); it comes back unsettled
            note(f"{arrival.member}'s handler of {arrival.key}#{arrival.seq} was cut off; unsettled again")
            event("handler cut off after the grace period")
            self.model.release(arrival.message_id)
            return
        assert outcome == action
        dead = arrival.message_id in self._dead_ids() if action in ("nak", "reject", "delay") else False
        self.model.settle(arrival.message_id, action, dead, not_before)
        self.coverage[f"{action}{'-dead' if dead else ''}"] += 1
        event(f"settle: {action}{' (dead-lettered)' if dead else ''}")

    @precondition(lambda self: self.plan["crashes"] < 2 and self.plan["members"] > 0)
    @rule(pick=st.integers(0, 7))
    def crash_member(self, pick: int) -> None:
        if not (self.capabilities.kill_member and self.capabilities.redelivery_on_crash):
            return
        self.plan["crashes"] += 1
        self.plan["members"] -= 1
        with self._step("crash") as live:
            if live:
                self._crash(pick)

    def _crash(self, pick: int) -> None:
        self._collect(wait=False)
        member = self._live()[pick % len(self.members)]
        self.crashes += 1
        held = [a for a in self.inbox if a.member == member.name]
        note(f"{member.name} crashes holding {[f'{a.key}#{a.seq}' for a in held]}")
        event("crash with a message in flight" if held else "crash while idle")
        if held:
            self.coverage["crash-in-flight"] += 1
        self.run(member.broker.abort())
        del self.members[member.name]
        self.departed.append(member)
        self._collect(wait=False)  # invocations that began before the abort landed
        self.inbox = [a for a in self.inbox if a.member != member.name]
        self.model.forget_holder(member.name)

    @precondition(lambda self: self.plan["members"] < 3 and self.plan["joined"] < 5)
    @rule()
    def join_member(self) -> None:
        if not self.capabilities.competing_consumers:
            return
        self.plan["members"] += 1
        self.plan["joined"] += 1
        with self._step("join") as live:
            if live:
                self._collect(wait=False)
                self._join()
                event("member joined")

    @precondition(lambda self: self.plan["members"] >= 2)
    @rule(pick=st.integers(0, 7))
    def leave_member(self, pick: int) -> None:
        self.plan["members"] -= 1
        with self._step("leave") as live:
            if not live:
                return
            self._collect(wait=False)
            member = self._live()[pick % len(self.members)]
            note(f"{member.name} leaves")
            self.model.disturb()
            self._finish(member, member.broker.close())
            del self.members[member.name]
            self.departed.append(member)
            self._collect(wait=False)

    def _finish(self, member: Member, closing: Coroutine[Any, Any, None]) -> None:
        """Run ``closing`` while acking whatever ``member`` is handed meanwhile (a graceful
        close waits for in-flight handlers, which would otherwise wait for the machine)."""
        member.auto = True
        future = asyncio.run_coroutine_threadsafe(closing, self.bridge.loop)
        deadline = time.monotonic() + 30 * self.multiplier
        while True:
            self._collect(wait=False)
            for arrival in [a for a in self.inbox if a.member == member.name]:
                self.inbox.remove(arrival)
                self._ack_parked(arrival)
            if future.done():
                future.result()
                return
            if time.monotonic() > deadline:
                raise ConformanceFailure(f"closing member {member.name} did not finish")
            time.sleep(0.01)

    @precondition(lambda self: self.capabilities.pending_count_exact)
    @rule()
    def check_pending(self) -> None:
        with self._step("check_pending") as live:
            if live:
                self._check_pending()

    def _check_pending(self) -> None:
        self._collect(wait=False)
        self._refresh_dead()
        low, extra = self.model.unsettled()
        assert self.producer is not None
        deadline = time.monotonic() + 2.0 * self.multiplier
        while True:
            pending = self.run(self.producer.pending_count(self.topic, self.group))
            self._collect(wait=False)
            low, extra = self.model.unsettled()
            if low <= pending <= low + extra:
                break
            if time.monotonic() > deadline:
                raise ModelViolation(f"pending_count is {pending}; the model has {low} unsettled (+{extra} uncertain)")
            time.sleep(0.02)

    @invariant()
    def deliveries_keep_the_contract(self) -> None:
        with self._step() as live:
            if live:
                self._collect(wait=False)

    # -- the end ------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Settle everything: every published message must end acked or dead-lettered."""
        if not self.members:
            self._join()
        for member in self.members.values():
            member.auto = True
        deadline = time.monotonic() + (10.0 + self._claim_timeout()) * self.multiplier
        while True:
            self._collect(wait=False)
            for arrival in list(self.inbox):  # parked before auto was set
                self.inbox.remove(arrival)
                self._ack_parked(arrival)
            open_ = [e for e in self.model.entries.values() if e.state in (READY, INFLIGHT)]
            if not open_:
                break
            if time.monotonic() > deadline:
                self._refresh_dead()
                open_ = [e for e in self.model.entries.values() if e.state in (READY, INFLIGHT)]
                if not open_:
                    break
                raise ConformanceFailure(
                    f"lost: {len(open_)} published message(s) were never handled to the end, e.g. "
                    + ", ".join(f"{e.key}#{e.seq} (partition {e.partition}, handled {e.deliveries}x)"
                                for e in open_[:5])
                )
            time.sleep(0.02)
        if self.capabilities.pending_count_exact:
            assert self.producer is not None
            deadline = time.monotonic() + 5.0 * self.multiplier
            while (pending := self.run(self.producer.pending_count(self.topic, self.group))) != 0:
                if time.monotonic() > deadline:
                    raise ModelViolation(f"pending_count is {pending} after everything was settled")
                time.sleep(0.02)

    def teardown(self) -> None:
        try:
            if self.failure is None and not self.dropped:  # a failed step is the report: no drain to bury it
                with self._judging():
                    self.drain()
                _COVERAGE.update(self.coverage)
        finally:
            try:
                self._close_everything()
            finally:
                self.bridge.close()
        if self.failure is not None:
            raise self.failure
        if self.dropped:
            reject()

    def _close_everything(self) -> None:
        """Close every broker, acking whatever is still parked or arrives meanwhile (a graceful
        close waits for in-flight handlers)."""
        for member in [*self.members.values(), *self.departed]:
            member.auto = True
        brokers = [m.broker for m in self.members.values()]
        if self.producer is not None:
            brokers.append(self.producer)
        closing = asyncio.run_coroutine_threadsafe(_close_all(brokers), self.bridge.loop)
        parked = [*self.inbox, *self.handed]
        deadline = time.monotonic() + 60 * self.multiplier
        while not closing.done() and time.monotonic() < deadline:
            try:
                while True:
                    parked.append(self.arrivals.get_nowait())
            except queue.Empty:
                pass
            for arrival in parked:
                if arrival.action is not None and not arrival.action.done():
                    self.bridge.loop.call_soon_threadsafe(_release, arrival.action)
            parked.clear()
            time.sleep(0.01)
        closing.result(1)


def _release(action: asyncio.Future[tuple[str, float]]) -> None:
    if not action.done():
        action.set_result(("ack", 0.0))


async def _close_all(brokers: list[Broker]) -> None:
    for broker in brokers:
        try:
            await asyncio.wait_for(broker.close(), 20)
        except Exception:
            await broker.abort()


_COVERAGE: Counter[str] = Counter()


def last_coverage() -> dict[str, int]:
    """How often each scenario happened in the last :func:`run_machine` (for the report)."""
    return dict(sorted(_COVERAGE.items()))


def run_machine(harness: ConformanceHarness, session_seed: int, profile: str | None = None,
                shrink: bool = True) -> Counter[str]:
    """Run :class:`BrokerMachine` against ``harness`` with the profile's budget; returns how
    often each interesting scenario happened (crash with a message in flight, dead letter...)."""
    from hypothesis.stateful import run_state_machine_as_test

    machine = type("BrokerMachineFor" + type(harness).__name__, (BrokerMachine,), {"harness": harness})
    chosen = machine_settings(bool(harness.local), profile)
    if not shrink:
        chosen = settings(chosen, phases=[Phase.explicit, Phase.reuse, Phase.generate])
    if not chosen.derandomize:
        machine = seed(session_seed)(machine)
    _COVERAGE.clear()
    try:
        run_state_machine_as_test(machine, settings=chosen)
    except FlakyFailure as flaky:
        raise _once_seen(flaky) from flaky
    return Counter(_COVERAGE)


def _once_seen(flaky: FlakyFailure) -> ConformanceFailure:
    """A failure Hypothesis saw once but not when it ran the same steps again (their timing
    differs): the provider's failure all the same, reported as such with the steps that led to
    it — not as a Hypothesis error about flakiness."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [flaky]
    while pending:
        current = pending.pop(0)
        if isinstance(current, BaseExceptionGroup):
            pending[:0] = list(current.exceptions)
        else:
            leaves.append(current)
    first = next((e for e in leaves if isinstance(e, AssertionError)), leaves[0] if leaves else flaky)
    failure = ConformanceFailure(
        f"{type(first).__name__}: {first} — seen once; the same steps run again under other timing "
        f"did not repeat it, so there is no smaller example: the steps are below"
    )
    for note_ in [*getattr(flaky, "__notes__", []), *getattr(first, "__notes__", [])]:
        failure.add_note(note_)
    return failure
