"""A member's reader of one (topic, group) on Kafka: a native consumer-group member.

* One ``AIOKafkaConsumer`` per subscription; Kafka assigns the partitions (our assignor keeps
  ``subscribe_to_partition`` exclusive) and the rebalance listener hands them to the engine.
* Handlers never run here: the engine calls :meth:`poll` from its reader task and runs
  handlers in lane tasks, so a slow handler cannot starve heartbeats (aiokafka#848).
* Redelivery is local (the engine holds the lane), so there is no seek loop and no pause
  to lose on a rebalance; a lane that waits is simply not polled.
* Commits: the lowest unsettled offset of each partition, coalesced — a background loop commits
  every ``commit_interval`` or after ``commit_batch`` acks, and a poll commits before it hands
  out what it read; synchronously on revoke and on a graceful stop, never on a crash. A first
  delivery's ack waits for nothing. The commit metadata carries the attempt counts
  (:class:`AttemptRecord`): what a new owner needs to count each message's attempts after a
  rebalance or a crash. A message handed out since the last commit is *in doubt* there (one
  more delivery may have begun, and ended in an ack or a crash): after a crash it comes back
  with one attempt more, not counted as a failure, and is then handled *carefully* — its start
  and its ack are committed (awaited) before the lane goes on, like every redelivered or
  retried message, so that a second crash in it counts.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka import errors as kafka_errors
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]
from msgbroker.spi import (
    AccessDeniedError,
    DeadLetter,
    Delivery,
    LaneConsumer,
    MsgBrokerError,
    cancel_and_wait,
    failures_since,
)

from . import _compat
from ._assignor import PinningAssignor
from ._clients import start_client
from ._host import ConsumerHost
from ._records import MESSAGE_ID_HEADER, decode_headers

if TYPE_CHECKING:
    from msgbroker.spi import AssignmentListener

__all__ = ["AttemptRecord", "KafkaLaneConsumer", "next_attempt"]

log = logging.getLogger("msgbroker.kafka")

_META_PREFIX = "msgbroker:"
_MARKER_BOUND = 5.0
_FINAL_BOUND = 10.0
_LEAVE_BOUND = 2.0
_RUNS_BUDGET = 3000
"""Characters of attempt runs and doubt ranges in a commit's metadata (brokers keep 4096 by default)."""
STARTS_TOPIC_SUFFIX = ".starts"
"""``<topic>.starts``: the start markers of first deliveries (see :meth:`KafkaLaneConsumer.poll`),
one partition per partition of the topic."""


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """What a commit's metadata says about delivery attempts: ``started`` deliveries of the
    message at the committed offset began (the next is due no earlier than ``not_before``);
    for the offsets after it up to ``until`` (exclusive), ``runs`` of (first offset, deliveries
    begun) — messages handed out, maybe handled and acked, whose acks were not committed yet
    when the member died. ``doubt``: ranges [first, until) of offsets (the committed one may be
    among them) of which one more delivery may have begun than counted — handed out since the
    last commit, maybe acked, maybe in a handler when the member died; such a delivery counts as
    an attempt but not as a failure. Encoded as ``msgbroker:a=2;nb=...;due=1;r=15:1,18:2;h=20;d=20-40``."""

    started: int = 0
    not_before: float | None = None
    runs: tuple[tuple[int, int], ...] = ()
    until: int | None = None
    due: bool = False
    """Attempt ``started`` itself is due at ``not_before`` (a delay): it began only if its owner
    lived past that time."""
    failures: int | None = None
    """Failed attempts of the message at the committed offset as of its last retry, which
    announced attempt ``retried_at`` (``msgbroker.spi.failures_since``); None: never retried."""
    retried_at: int = 0
    doubt: tuple[tuple[int, int], ...] = ()
    marks: int | None = None
    """Start markers of this partition's later hand-outs are in ``<topic>.starts`` from this
    offset on (each names a range of offsets in doubt); None: the writer used none."""

    def began(self, committed: int, offset: int) -> int:
        """Deliveries begun of the message at ``offset``, for a commit at ``committed``."""
        if offset == committed:
            return self.started
        if not self.runs or self.until is None or not self.runs[0][0] <= offset < self.until:
            return 0
        index = bisect.bisect_right([first for first, _ in self.runs], offset) - 1
        return self.runs[index][1]

    def doubtful(self, offset: int) -> bool:
        """One more delivery of the message at ``offset`` may have begun than :meth:`began` says."""
        doubt = self.doubt
        if not doubt or not doubt[0][0] <= offset < doubt[-1][1]:
            return False
        index = bisect.bisect_right([first for first, _ in doubt], offset) - 1
        return offset < doubt[index][1]

    def end(self, committed: int) -> int:
        """The first offset after ``committed`` that this record says nothing about."""
        end = committed + 1
        if self.runs and self.until is not None:
            end = max(end, self.until)
        if self.doubt:
            end = max(end, self.doubt[-1][1])
        return end

    def encode(self) -> str:
        parts = [f"a={self.started}"]
        if self.not_before is not None:
            parts.append(f"nb={self.not_before:.3f}")
            if self.due:
                parts.append("due=1")
        if self.failures is not None:
            parts.append(f"f={self.failures}:{self.retried_at}")
        if self.runs and self.until is not None:
            parts.append("r=" + ",".join(f"{first}:{count}" for first, count in self.runs))
            parts.append(f"h={self.until}")
        if self.doubt:
            parts.append("d=" + ",".join(f"{first}-{until}" for first, until in self.doubt))
        if self.marks is not None:
            parts.append(f"m={self.marks}")
        return _META_PREFIX + ";".join(parts)

    @classmethod
    def decode(cls, metadata: str | None) -> AttemptRecord | None:
        """The record in ``metadata``, or None for foreign or malformed metadata."""
        if not metadata or not metadata.startswith(_META_PREFIX):
            return None
        fields = dict(part.partition("=")[::2] for part in metadata[len(_META_PREFIX):].split(";"))
        try:
            runs = tuple(
                (int(first), int(count))
                for first, count in (run.split(":") for run in fields.get("r", "").split(",") if run)
            )
            doubt = tuple(
                (int(first), int(until))
                for first, until in (span.split("-") for span in fields.get("d", "").split(",") if span)
            )
            failures, _, retried_at = fields.get("f", "").partition(":")
            return cls(
                failures=int(failures) if failures else None,
                retried_at=int(retried_at) if failures else 0,
                started=int(fields["a"]),
                not_before=float(fields["nb"]) if fields.get("nb") else None,
                runs=runs,
                until=int(fields["h"]) if fields.get("h") else None,
                due=fields.get("due") == "1",
                doubt=tuple(sorted(span for span in doubt if span[0] < span[1])),
                marks=int(fields["m"]) if fields.get("m") else None,
            )
        except (KeyError, ValueError):
            return None


def next_attempt(
    record: AttemptRecord, began: int, at_commit: bool, now: float, doubt: bool = False
) -> tuple[int, float | None]:
    """The attempt number (and the delay still to wait out) of the next delivery of a message
    of which ``began`` deliveries began, and one more if ``doubt``; ``at_commit``: it is the
    message at the committed offset (the one ``record.not_before`` and ``record.due`` speak of)."""
    began += 1 if doubt else 0
    if not at_commit or record.not_before is None:
        return began + 1, None
    if now < record.not_before:
        return (began if record.due else began + 1), record.not_before
    return began + 1, None


def _runs(counts: list[tuple[int, int]], budget: int) -> tuple[tuple[tuple[int, int], ...], int | None]:
    """Run-length encode (offset, deliveries begun) pairs sorted by offset (a gap counts 0),
    cut to ``budget`` characters: a count lost past the cut is counted low, never high."""
    runs: list[tuple[int, int]] = []
    until: int | None = None
    used = 0
    for offset, count in counts:
        pieces = [(until, 0)] if until is not None and offset != until else []
        pieces.append((offset, count))
        for first, began in pieces:
            if runs and runs[-1][1] == began:
                continue
            used += len(f"{first}:{began},")
            if used > budget:
                return tuple(runs), first
            runs.append((first, began))
        until = offset + 1
    return tuple(runs), until


def _spans(offsets: list[int], budget: int) -> tuple[tuple[int, int], ...]:
    """Sorted offsets as ranges [first, until), cut to ``budget`` characters (past the cut an
    offset is not in doubt: counted low, never high)."""
    spans: list[tuple[int, int]] = []
    used = 0
    for offset in offsets:
        if spans and spans[-1][1] == offset:
            spans[-1] = (spans[-1][0], offset + 1)
            continue
        used += len(f"{offset}-{offset + 1},") + 4
        if used > budget:
            break
        spans.append((offset, offset + 1))
    return tuple(spans)


@dataclass(slots=True, eq=False)
class _Track:
    """What this member knows about one owned partition."""

    tp: TopicPartition
    pending: dict[int, Delivery] = field(default_factory=dict)
    """Handed to the engine and not settled, by offset."""
    queue: deque[int] = field(default_factory=deque)
    """The offsets handed to the engine, in order; settled ones leave it lazily from the left."""
    handed_to: int = 0
    """The offsets below it were handed to the engine."""
    surplus: deque[Any] = field(default_factory=deque)
    """Records fetched and not handed to the engine yet (made deliveries when they are)."""
    careful: set[int] = field(default_factory=set)
    """Pending offsets delivered before (attempt > 1) or retried here: their start is committed
    before their handler runs and their ack before the lane goes on."""
    retried: dict[int, tuple[int, float | None, int | None]] = field(default_factory=dict)
    """Offset: (the attempt a retry announced, its not_before, failures as of that retry)."""
    settled: dict[int, int] = field(default_factory=dict)
    """Attempts of settled offsets above a lower unsettled one (unordered lanes), until a commit passes them."""
    unhanded: set[int] = field(default_factory=set)
    """Pending offsets the engine handed back unhandled (read ahead as its lane stopped): their
    delivery never began."""
    fetched_to: int | None = None
    inherited: AttemptRecord | None = None
    inherited_at: int = -1
    """The previous owner's record and the offset it was committed at."""
    inherited_end: int = -1
    """The first offset after ``inherited_at`` the previous owner's record says nothing about."""
    start: int | None = None
    """The partition's first offset when this member took it over, for a group that never
    committed it: where reading starts (so the takeover commit can name ``marked``)."""
    marked: int | None = None
    """This member's start markers of the partition land in ``<topic>.starts`` at or past this
    offset (its end when the member took the partition over, then past each marker written)."""
    marking: bool = False
    """The last successful commit named ``marked`` (``m=``): a next owner reads the markers from
    there, so a first delivery may be recorded by a marker instead of a commit."""
    committed: tuple[int, str] | None = None
    closed: bool = False
    ordered: bool = True
    """Only the lowest unsettled message can be in a handler (the engine's ordered lanes)."""

    def target(self) -> int | None:
        """The offset to commit: the lowest unsettled one, or the next to fetch."""
        pending, queue = self.pending, self.queue
        while queue:
            first: int = queue[0]
            if first in pending:
                return first
            queue.popleft()
        if self.surplus:
            offset: int = self.surplus[0].offset
            return offset
        if self.fetched_to is not None:
            return self.fetched_to
        return self.committed[0] if self.committed else self.start

    def inherited_state(self, offset: int) -> tuple[int, bool]:
        """(deliveries begun, one more in doubt) of ``offset`` as the previous owner recorded it."""
        inherited = self.inherited
        if inherited is None or not self.inherited_at <= offset < self.inherited_end:
            return 0, False
        return inherited.began(self.inherited_at, offset), inherited.doubtful(offset)

    def inherit(self, offset: int, metadata: str, marks: Sequence[tuple[int, int]] = ()) -> None:
        """Take over after the previous owner's commit at ``offset`` with ``metadata`` and its
        start markers written after that commit (``marks``: ranges of offsets in doubt)."""
        self.committed = (offset, metadata)
        self.inherited = AttemptRecord.decode(metadata)
        self.inherited_at = offset
        inherited = self.inherited
        if inherited is not None and marks:
            spans = sorted({*inherited.doubt, *((max(a, offset), b) for a, b in marks if b > offset)})
            merged: list[tuple[int, int]] = []
            for first, until in spans:
                if merged and first <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], until))
                else:
                    merged.append((first, until))
            self.inherited = inherited = dataclasses.replace(inherited, doubt=tuple(merged))
        if inherited is not None:
            self.inherited_end = inherited.end(offset)

    def deliver(self, record: Any) -> Delivery:
        """The delivery of a fetched record, its attempt counted from the previous owner's record;
        handed to the engine from now on."""
        headers = decode_headers(record.headers)
        message_id = headers.pop(MESSAGE_ID_HEADER, "")
        offset: int = record.offset
        attempt, not_before, failures = 1, None, None
        inherited = self.inherited
        if inherited is not None and self.inherited_at <= offset < self.inherited_end:
            at_commit = offset == self.inherited_at
            began, doubt = self.inherited_state(offset)
            attempt, not_before = next_attempt(inherited, began, at_commit, time.time(), doubt)
            if at_commit and inherited.failures is not None:
                # a delivery in doubt counts as an attempt, not as a failure
                failures = failures_since(inherited.failures, inherited.retried_at, attempt - doubt)
            elif doubt:
                failures = began
            if attempt > 1:
                self.careful.add(offset)
        delivery = Delivery(
            partition=record.partition,
            message_id=message_id,
            key=(record.key or b"").decode("utf-8", errors="replace"),
            headers=headers,
            body=record.value or b"",
            attempt=attempt,
            position=offset,
            not_before=not_before,
            failures=failures,
        )
        self.pending[offset] = delivery
        self.queue.append(offset)
        self.handed_to = offset + 1
        return delivery

    def _began(self, offset: int, delivery: Delivery, final: bool) -> tuple[int, float | None, bool]:
        """(deliveries begun, delay still to wait out, whether that attempt is the one due
        then) of a handed, unsettled message."""
        attempt, not_before = delivery.attempt, delivery.not_before
        retried = self.retried.get(offset)
        if retried is not None and retried[0] >= attempt:
            attempt, not_before = retried[0], retried[1]
        waiting = not_before is not None and time.time() < not_before
        if offset in self.unhanded:
            return attempt - 1, (not_before if waiting else None), False
        is_head = offset == self.target()
        if not final:
            if waiting:
                return attempt, not_before, True  # begins at not_before, locally
            # the head is in its handler (a nak'ed one is handed again at once); what follows
            # it in an ordered lane has not begun
            return (attempt if is_head or not self.ordered else attempt - 1), None, False
        # The engine drained the lane: a nak'ed or delayed head's next attempt never began; a
        # head never nak'ed and still unsettled was cut short in its handler: that counts.
        if retried is not None or waiting or not is_head:
            return attempt - 1, (not_before if waiting else None), False
        return attempt, None, False

    def _state(self, offset: int, final: bool) -> tuple[int, bool, float | None, bool]:
        """(deliveries begun, one more in doubt, delay still to wait out, due) of ``offset``
        for a record written now; ``final``: the engine drained the lane, nothing is in a handler."""
        delivery = self.pending.get(offset)
        if delivery is not None:
            if offset not in self.careful:
                # a first delivery: may begin (or began, and was acked) before the next commit
                if final or offset in self.unhanded:
                    return self._began(offset, delivery, True)[0], False, None, False
                return 0, True, None, False
            began, not_before, due = self._began(offset, delivery, final)
            if offset not in self.retried and began < delivery.attempt and not due:
                known, doubt = self.inherited_state(offset)
                if doubt:  # not begun here: the previous owner's delivery in doubt stays in doubt
                    return known, True, not_before, False
            return began, False, not_before, due
        attempt = self.settled.get(offset)
        if attempt is not None:  # acked, the ack not yet committed: began, and was no failure
            return attempt - 1, True, None, False
        known, doubt = self.inherited_state(offset)
        return known, doubt, None, False

    def fast(self, offset: int) -> bool:
        """Every handed message from ``offset`` on is a first delivery, nothing settled lies beyond it and
        the previous owner's record is passed: the record is one range in doubt."""
        return not self.careful and not self.retried and not self.settled and offset >= self.inherited_end

    def record(self, offset: int, *, final: bool = False) -> str:
        """The commit metadata for a commit at ``offset``. ``final``: the engine drained the
        lane (revoke, close), so nothing is in a handler. With ``marked``, it names where this
        member's later start markers begin (``m=``)."""
        marks = "" if self.marked is None else f";m={self.marked}"
        if not final and self.fast(offset):
            if offset in self.pending:
                return f"{_META_PREFIX}a=0;d={offset}-{self.handed_to}{marks}"
            return f"{_META_PREFIX}a=0{marks}" if marks else ""
        started, head_doubt, not_before, due = self._state(offset, final)
        failures: int | None = None
        retried_at = 0
        delivery = self.pending.get(offset)
        retried = self.retried.get(offset)
        if retried is not None:
            retried_at, failures = retried[0], retried[2]
        elif delivery is not None and delivery.failures is not None:
            failures, retried_at = delivery.failures, delivery.attempt  # inherited, not retried here
        elif self.inherited is not None and offset == self.inherited_at and delivery is None:
            failures, retried_at = self.inherited.failures, self.inherited.retried_at
            if not_before is None and self.inherited.not_before is not None:
                not_before, due = self.inherited.not_before, self.inherited.due
        later: set[int] = {o for o in self.settled if o > offset}
        later.update(other for other in self.pending if other > offset)
        if self.inherited is not None and offset + 1 < self.inherited_end:
            later.update(range(max(offset + 1, self.inherited_at), self.inherited_end))
        counts: list[tuple[int, int]] = []
        doubtful: list[int] = [offset] if head_doubt else []
        for other in sorted(later):
            began, doubt = self._state(other, final)[:2]
            if began:
                counts.append((other, began))
            if doubt:
                doubtful.append(other)
        doubt_spans = _spans(doubtful, _RUNS_BUDGET // 2)
        runs, until = _runs(counts, _RUNS_BUDGET - sum(len(f"{a}-{b},") for a, b in doubt_spans))
        if not started and not runs and not doubt_spans and not_before is None and self.marked is None:
            return ""
        return AttemptRecord(started, not_before, runs, until, due, failures, retried_at, doubt_spans,
                             self.marked).encode()


async def _leave(consumer: AIOKafkaConsumer, graceful: bool, parked: bool) -> None:
    """Stop ``consumer``. Gracefully it leaves the group at once; but aiokafka first finishes
    a join in progress, which waits for the other members to drain their in-flight handlers
    (eager rebalance) — possibly handlers waiting for whoever closes this one. So after a short
    wait, and at once for a crash (``graceful=False``), the member vanishes instead: its group
    protocol stops where it stands, no LeaveGroup is sent, and Kafka expires it after
    ``session_timeout``, as it does a killed process. ``parked``: the group protocol waits in
    our revoke callback (safe to cancel there)."""
    stopping: asyncio.Future[Any] | None = None
    if graceful:
        stopping = asyncio.ensure_future(consumer.stop())
        done, _ = await asyncio.wait({stopping}, timeout=_LEAVE_BOUND)
        if done:
            if not _report(stopping):
                await _compat.finish_stop(consumer, _FINAL_BOUND)
            return
    # aiokafka internals (_compat): no LeaveGroup on close, the task running joins and
    # rebalance callbacks, and the connections
    _compat.skip_leave_group(consumer)
    routine = _compat.coordination_task(consumer)
    if parked and routine is not None and not routine.done():
        routine.cancel()  # it waits in our callback: no request or connection is half made
        await asyncio.wait({routine}, timeout=_FINAL_BOUND)
    if stopping is None:
        stopping = asyncio.ensure_future(consumer.stop())
        await asyncio.sleep(0)  # stop() marks the coordinator closing first
    with contextlib.suppress(Exception):
        await _compat.drop_connections(consumer)  # a join waiting on the broker fails at once and sees the close
    done, _ = await asyncio.wait({stopping}, timeout=_FINAL_BOUND)
    if not done:
        log.warning("kafka: a consumer did not stop within %.0fs", _FINAL_BOUND)
        stopping.cancel()
    # a stop cut short (the coordination task cancelled above ends it before the fetcher and
    # the client close) leaves a fetcher that would reconnect on sockets nobody closes
    if not done or not _report(stopping):
        await _compat.finish_stop(consumer, _FINAL_BOUND)


def _names_marks(commits: Iterable[tuple[int, str]]) -> bool:
    """Whether one of these (offset, metadata) commits names where its owner's markers begin."""
    for _, metadata in commits:
        record = AttemptRecord.decode(metadata)
        if record is not None and record.marks is not None:
            return True
    return False


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until ``event`` is set or ``timeout`` passed."""
    if event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def _retrieve(done: asyncio.Future[Any]) -> None:
    """Mark the outcome of a request whose caller may be gone as seen."""
    if not done.cancelled():
        done.exception()


def _report(stopped: asyncio.Future[Any]) -> bool:
    """Whether a finished ``consumer.stop()`` ran to its end (logged when it did not)."""
    # a stop cut short by the dropped connections may end cancelled: that is not ours to raise
    if stopped.cancelled():
        log.debug("kafka: stopping a consumer was cut short")
        return False
    if stopped.exception() is not None:
        log.debug("kafka: stopping a consumer: %r", stopped.exception())
        return False
    return True


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: KafkaLaneConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.owner.on_revoked(sorted(tp.partition for tp in revoked if tp.topic == self.owner.kafka_topic))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.owner.on_assigned(sorted(tp.partition for tp in assigned if tp.topic == self.owner.kafka_topic))


class KafkaLaneConsumer(LaneConsumer):
    """One member of a Kafka consumer group for one topic."""

    def __init__(self, transport: ConsumerHost, topic: str, group: str, member_id: str) -> None:
        self.transport = transport
        self.topic = topic
        self.group = group
        self.kafka_topic = transport.kafka_name(topic)
        self.kafka_group = transport.kafka_name(group)
        self.member_id = member_id
        self._refused: AccessDeniedError | None = None
        """The broker refused this member a permission it cannot read or commit without (its
        user's ACLs): the next poll raises it, which stops the subscription."""
        self._consumer: AIOKafkaConsumer | None = None
        self._listener: AssignmentListener | None = None
        self._assignor: PinningAssignor | None = None
        self._lanes: dict[int, _Track] = {}
        self._committed: dict[int, tuple[int, str]] = {}
        self._log_starts: dict[int, int] = {}
        """Each assigned partition's first offset when it was assigned (see ``_Track.start``)."""
        self._sought: set[int] = set()
        """Assigned partitions the consumer was pointed at their start by ``on_assigned`` (their
        lanes need no seek of their own when they open)."""
        self.starts_topic = transport.kafka_name(topic + STARTS_TOPIC_SUFFIX)
        self._marking = False
        """``<topic>.starts`` is there to write start markers to (else every hand-out commits)."""
        self._mark_ends: dict[int, int] = {}
        """``<topic>.starts``'s end offset of each partition when it was assigned."""
        self._marks: dict[int, list[tuple[int, int]]] = {}
        """The previous owners' start markers after their last commit, per assigned partition."""
        self._commit_lock = asyncio.Lock()
        self._changes = 0
        self._flushed = 0
        self._ordered = True
        self._dirty = asyncio.Event()
        self._assigned_once = asyncio.Event()
        self._gone = asyncio.Event()
        self._parked = False
        self._commit_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._stopped = False
        self._commits_failing = False
        kafka = transport.settings.kafka
        self._commit_interval = kafka.commit_interval.total_seconds()
        self._commit_batch = kafka.commit_batch
        self._acks = 0
        """First deliveries acked since the last commit of every lane."""
        self._inflight: asyncio.Future[Any] | None = None
        """The last commit request (it may outlive a cancelled caller)."""
        self._full = asyncio.Event()
        """``commit_batch`` acks are waiting: the loop commits before ``commit_interval`` ends."""
        self._starts_ready: asyncio.Future[None] | None = None
        """Done once ``<topic>.starts`` is made, or known not to be (see :meth:`start`)."""
        self._ends_task: asyncio.Task[None] | None = None
        """Learning the ``<topic>.starts`` ends of lanes opened without them (see on_assigned)."""
        self._handing: list[Delivery] = []
        """Handed out by a poll that is still fetching (see :meth:`poll`): not in a handler yet."""

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, listener: AssignmentListener, partition: int | None) -> None:
        await self.transport.ensure_topic(self.topic)
        # ``<topic>.starts`` is made while the member joins the group: the first assignment
        # waits for it (on_assigned), nothing before reads it. (Making it is quick, 0.05 s at
        # 1,024 partitions; what a new one makes slow is reading its ends: see on_assigned.)
        ready = self._starts_ready = asyncio.ensure_future(self._prepare_starts())
        try:
            await self._start_member(listener, partition)
        except BaseException:
            await cancel_and_wait([ready])
            raise

    async def _prepare_starts(self) -> None:
        """Create ``<topic>.starts`` where missing; without it (no Create on it, or the broker
        failed to make it) every hand-out of this member commits instead: slower, as exact."""
        try:
            await self.transport.ensure_topic(self.topic + STARTS_TOPIC_SUFFIX)
            self._marking = True
        except Exception as exc:
            log.warning("kafka: no start markers for %s (%s): each hand-out waits for a commit", self.topic, exc)

    async def _start_member(self, listener: AssignmentListener, partition: int | None) -> None:
        settings = self.transport.settings
        kafka = settings.kafka
        session = int(kafka.session_timeout.total_seconds() * 1000)
        grace = int(settings.shutdown_timeout.total_seconds() * 1000)
        assignor = self._assignor = PinningAssignor(partition)
        consumer = AIOKafkaConsumer(
            **self.transport.client_options(),
            group_id=self.kafka_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a new group also gets what was published before it
            session_timeout_ms=session,
            heartbeat_interval_ms=int(kafka.heartbeat_interval.total_seconds() * 1000),
            # a revoke waits for in-flight handlers (the engine bounds them by the grace period)
            rebalance_timeout_ms=session + 2 * grace,
            # handlers never block polling here; the engine just stops polling full lanes, which
            # must not count as a stuck member (liveness is the heartbeat's job)
            max_poll_interval_ms=24 * 3600 * 1000,
            partition_assignment_strategy=(assignor,),
            fetch_max_wait_ms=250,
        )
        self._listener = listener
        self._ordered = bool(listener.ordered)
        try:
            await start_client(consumer)
            await self._topic_visible(consumer)
            consumer.subscribe([self.kafka_topic], listener=_RebalanceListener(self))
        except Exception as exc:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise self.transport.error(exc, f"joining group {self.kafka_group!r} on {self.kafka_topic!r}") from exc
        self._consumer = consumer
        self.transport.consumers.add(self)
        self._commit_task = asyncio.create_task(self._commit_loop(), name=f"msgbroker-kafka-commit-{self.topic}")
        self._watch_task = asyncio.create_task(self._watch_group(), name=f"msgbroker-kafka-watch-{self.topic}")
        # Return once this member holds its share when that is quick (the first member of a
        # group: at once). Joining a busy group takes until every member drained its in-flight
        # handlers (eager rebalance); waiting for that here would stall a caller whose own
        # handlers wait for it, until the grace period cancels them. So: at most a second.
        bound = min(1.0, kafka.heartbeat_interval.total_seconds())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._assigned_once.wait(), bound)

    async def _topic_visible(self, consumer: AIOKafkaConsumer) -> None:
        """Wait (at most 10 s) until the broker the consumer asks lists the topic.

        On a cluster a topic just created reaches the brokers' metadata one after the other; a
        member that joined while its metadata lacked the topic was assigned nothing, and aiokafka
        looks again only after ``metadata_max_age_ms`` (5 minutes): its lanes stalled that long
        (the cluster conformance run: nothing delivered within 15 s)."""
        deadline = time.monotonic() + 10.0
        pause = 0.02
        while self.kafka_topic not in await consumer.topics():
            if time.monotonic() > deadline:
                log.warning("kafka: topic %s is still missing from the cluster's metadata after 10 s; "
                            "joining group %s anyway", self.kafka_topic, self.kafka_group)
                return
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.5)

    async def stop(self, flush: bool) -> None:
        self._stopped = True
        tasks = [t for t in (self._commit_task, self._watch_task, self._starts_ready, self._ends_task) if t is not None]
        self._commit_task = self._watch_task = None
        await cancel_and_wait(tasks)
        if flush:
            await self._commit(None, bound=_FINAL_BOUND, final=True)
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            if self._refused is not None:
                inflight.cancel()  # refused: it is not answered (or no connection is let in to send it)
            else:
                await asyncio.wait({inflight}, timeout=_LEAVE_BOUND)  # a crash cannot take back what is sent
        self._lanes.clear()
        self.transport.consumers.discard(self)
        consumer, self._consumer = self._consumer, None
        if flush:
            self._gone.set()  # a revoke waiting in the group protocol may go on to leave
        if consumer is not None:
            await _leave(consumer, graceful=flush, parked=self._parked)
        self._gone.set()

    # -- assignment (called by aiokafka's coordinator) ------------------------------------------

    async def on_assigned(self, partitions: list[int]) -> None:
        if self._stopped or self._listener is None:
            return
        ready = self._starts_ready
        if ready is not None and not ready.done():
            await asyncio.shield(ready)  # _marking is known from here on
        await cancel_and_wait([t for t in (self._ends_task,) if t is not None])
        self._ends_task = None
        tps = [TopicPartition(self.kafka_topic, p) for p in partitions]
        self._committed = {}
        self._log_starts = {}
        self._sought = set()
        self._mark_ends = {}
        self._marks = {}
        ends_task: asyncio.Task[dict[TopicPartition, int]] | None = None
        for attempt in range(3):
            try:
                # after the previous owners are gone: they write no more commits or markers
                found: dict[TopicPartition, Any] = {}
                starts: dict[TopicPartition, int] = {}
                ends: dict[TopicPartition, int] = {}
                if tps:
                    if ends_task is None or ends_task.done():
                        ends_task = asyncio.ensure_future(self._mark_bounds(tps))
                    found, starts = await asyncio.gather(
                        self.transport.committed_offsets(self.group, tps), self._log_starts_of(tps)
                    )
                committed = {tp.partition: (meta.offset, meta.metadata or "") for tp, meta in found.items()}
                if ends_task is not None and (ends_task.done() or _names_marks(committed.values())):
                    # a previous owner's markers are read up to these ends: wait for them
                    ends = await asyncio.shield(ends_task)
                    ends_task = None
                marks = await self._read_marks(committed, ends)
            except AccessDeniedError as exc:
                self._refuse(exc)
                break
            except Exception as exc:
                # the lanes open anyway (aiokafka starts them at the committed offsets); only
                # the attempt counts recorded by the previous owner are unknown then
                log.warning("kafka: reading the commits of %s for %s failed (%d): %s", self.topic, self.group,
                            attempt + 1, exc)
                await asyncio.sleep(0.2)
                continue
            self._committed, self._marks = committed, marks
            self._log_starts = {tp.partition: start for tp, start in starts.items()}
            self._seek_starts(tps)
            self._mark_ends = {tp.partition: end for tp, end in ends.items()}
            break
        if ends_task is not None:
            # No previous owner's markers to read: the lanes open now, their hand-outs commit
            # until these ends come (a new ``<topic>.starts`` answers only once the broker has
            # elected a leader for each of its partitions: 1.8 s at 1,024 on one node).
            self._ends_task = asyncio.create_task(self._learn_mark_ends(ends_task),
                                                  name=f"msgbroker-kafka-marks-{self.topic}")
        try:
            await self._listener.assigned(partitions)
        except Exception:
            log.exception("kafka: taking over %s%s for %s failed", self.topic, partitions, self.group)
        finally:
            self._assigned_once.set()
        if self._lanes and self._mark_ends:
            # a commit soon names where this member's start markers begin (``m=``): from then
            # on a first delivery is recorded by a marker, not a commit (see ``poll``)
            self._full.set()
            self._dirty.set()

    async def _learn_mark_ends(self, ends_task: asyncio.Task[dict[TopicPartition, int]]) -> None:
        """The ``<topic>.starts`` ends of lanes opened without them: each lane still open names
        its end as where its markers begin (``marked``), and a commit soon says so (``m=``)."""
        for attempt in range(3):
            if attempt:
                await asyncio.sleep(0.2)
                ends_task = asyncio.ensure_future(self._mark_bounds(self._lanes_tps()))
            try:
                ends = await ends_task
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("kafka: reading the ends of %s failed (%d): %s", self.starts_topic, attempt + 1, exc)
        else:
            return  # these lanes commit at each hand-out until the next assignment
        learned = False
        for tp, end in ends.items():
            self._mark_ends[tp.partition] = end
            track = self._lanes.get(tp.partition)
            if track is not None and not track.closed and track.marked is None:
                track.marked = end
                learned = True
        if learned:
            self._full.set()
            self._dirty.set()

    def _lanes_tps(self) -> list[TopicPartition]:
        return [track.tp for track in self._lanes.values() if not track.closed]

    def _seek_starts(self, tps: list[TopicPartition]) -> None:
        """Point the consumer at where each newly assigned partition starts: its committed
        offset, or its first offset when the group never committed it.

        aiokafka would find these itself, but it asks its group coordinator for one partition's
        commit at a time (about 1.5 ms each here: 64 partitions kept the first fetch waiting
        ~0.1 s behind the assignment, 1,024 partitions seconds), and only then for the first offsets of
        those without one. Both are known here already. A start that is gone by the time it
        is fetched (retention) is reset by aiokafka to the earliest offset, as without this."""
        consumer = self._consumer
        if consumer is None:
            return
        for tp in tps:
            committed = self._committed.get(tp.partition)
            offset = committed[0] if committed is not None else self._log_starts.get(tp.partition)
            if offset is None:
                continue
            try:
                consumer.seek(tp, offset)
            except (kafka_errors.IllegalStateError, AssertionError) as exc:
                log.debug("kafka: seek of %s failed: %s", tp, exc)  # revoked meanwhile
                continue
            self._sought.add(tp.partition)

    async def _log_starts_of(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The first offsets of ``tps`` now, asked by the member's own consumer: it knows the
        topic's partition leaders already (the offsets client of the connection may not yet, and
        at 1,024 partitions of a new topic learning them kept the first fetch waiting about
        0.6 s longer)."""
        consumer = self._consumer
        offsets = consumer if consumer is not None else await self.transport.offsets_client()
        try:
            found: dict[TopicPartition, int] = await asyncio.wait_for(offsets.beginning_offsets(tps), _FINAL_BOUND)
        except Exception as exc:
            raise self.transport.error(exc, f"reading the offsets of {self.kafka_topic!r}") from exc
        return found

    async def _mark_bounds(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The end offsets of the ``<topic>.starts`` partitions of ``tps`` now (none without it)."""
        if not self._marking or not tps:
            return {}
        offsets = await self.transport.offsets_client()
        marks = [TopicPartition(self.starts_topic, tp.partition) for tp in tps]
        try:
            found: dict[TopicPartition, int] = await asyncio.wait_for(offsets.end_offsets(marks), _FINAL_BOUND)
        except Exception as exc:
            raise self.transport.error(exc, f"reading the offsets of {self.starts_topic!r}") from exc
        return found

    async def _read_marks(
        self, committed: dict[int, tuple[int, str]], ends: dict[TopicPartition, int]
    ) -> dict[int, list[tuple[int, int]]]:
        """The start markers of this group written after the last commit of each partition (from
        the commit's ``m=`` to ``ends``): ranges of offsets whose delivery may have begun."""
        since: dict[TopicPartition, int] = {}
        for tp, end in ends.items():
            entry = committed.get(tp.partition)
            record = AttemptRecord.decode(entry[1]) if entry else None
            if record is not None and record.marks is not None and record.marks < end:
                since[tp] = record.marks
        out: dict[int, list[tuple[int, int]]] = {}
        if not since:
            return out
        group = self.kafka_group.encode()
        reader = AIOKafkaConsumer(**self.transport.client_options(), enable_auto_commit=False)
        try:
            await start_client(reader)
            reader.assign(list(since))
            for tp, offset in since.items():
                reader.seek(tp, offset)
            deadline = time.monotonic() + _FINAL_BOUND
            remaining = set(since)
            while remaining:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {self.starts_topic!r} did not reach its end in time")
                batch = await reader.getmany(*remaining, timeout_ms=200)
                for tp, records in batch.items():
                    for record in records:
                        if record.key == group and record.offset < ends[tp]:
                            first, _, until = (record.value or b"").decode().partition("-")
                            out.setdefault(tp.partition, []).append((int(first), int(until)))
                for tp in list(remaining):
                    if await reader.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        finally:
            with contextlib.suppress(Exception):
                await reader.stop()
        return out

    async def on_revoked(self, partitions: list[int]) -> None:
        if self._listener is None or not partitions:
            return
        try:
            await self._listener.revoked(partitions)  # stops the lanes, in-flight handlers finish (bounded)
        except Exception:
            log.exception("kafka: giving up %s%s for %s failed", self.topic, partitions, self.group)
        if self._stopped or self._listener.closing:
            # The subscription is closing or crashing (the engine cut the handlers short): no
            # commit here (close commits itself, a crash commits nothing) and no rejoin — the
            # member must not hand its partitions on before it has gone (stop() ends this wait).
            self._parked = True
            try:
                await self._gone.wait()
            finally:
                self._parked = False
            return
        # What a poll handed out and still holds never reaches a handler of these lanes (see
        # poll): the commit records it as not begun, as what the lanes read ahead.
        for delivery in self._handing:
            if delivery.partition in partitions and self._current(delivery):
                self._lanes[delivery.partition].unhanded.add(delivery.position)
        # commit what was settled, then release; a failed commit only means redelivery
        await self._commit(partitions, bound=_FINAL_BOUND, final=True)
        for partition in partitions:
            self._lanes.pop(partition, None)

    async def open_lane(self, partition: int, lease: str | None) -> None:
        tp = TopicPartition(self.kafka_topic, partition)
        track = _Track(tp, ordered=self._ordered)
        track.marked = self._mark_ends.get(partition)
        committed = self._committed.get(partition)
        if committed is None:
            # never committed: the group reads it from its first offset (auto_offset_reset)
            track.start = self._log_starts.get(partition)
        else:
            offset, metadata = committed
            track.inherit(offset, metadata, self._marks.get(partition, ()))
            if partition in self._sought:
                self._sought.discard(partition)  # on_assigned did (a second seek drops what was fetched since)
            elif self._consumer is not None:
                try:
                    # records fetched before a rebalance and never settled are read again
                    self._consumer.seek(tp, offset)
                except (kafka_errors.IllegalStateError, AssertionError) as exc:
                    log.debug("kafka: seek of %s failed: %s", tp, exc)
        self._lanes[partition] = track

    async def unread(self, deliveries: Sequence[Delivery]) -> None:
        """Read ahead, never handed to a handler, and the lane stops: the commit records no
        delivery of these begun, so the next owner's attempt counts handlings (docs/semantics.md,
        rule 3). A crash before that commit leaves them in doubt as any first delivery."""
        for delivery in deliveries:
            track = self._lanes.get(delivery.partition)
            if track is not None and track.pending.get(delivery.position) is delivery:
                track.unhanded.add(delivery.position)
                self._dirty.set()

    async def close_lane(self, partition: int) -> None:
        track = self._lanes.get(partition)
        if track is not None:
            track.closed = True  # what it read and did not hand out stays unsettled (its offsets too)

    def _refuse(self, error: AccessDeniedError) -> None:
        """Remember a refusal the subscription cannot go on without; poll raises it."""
        if self._refused is None:
            self._refused = error
            self._dirty.set()

    async def _see_topics(self, consumer: AIOKafkaConsumer, bound: float) -> None:
        """This member, as the group's leader, assigned partitions while its metadata lacked a
        topic: no member was given that topic's partitions. On a cluster, a topic just created
        reaches the brokers one after the other, and ``_topic_visible`` asked one of them;
        aiokafka would look again only after ``metadata_max_age_ms`` (5 minutes), and the
        group's lanes stayed closed that long (a cluster conformance run: a message published
        after subscribe not delivered within 19 s). So the metadata is asked for now, and once it
        lists the topic the group joins again (every heartbeat interval until it does)."""
        assert self._assignor is not None
        missing = sorted(self._assignor.blind)
        if await _compat.refresh_metadata_and_rejoin(consumer, self.kafka_topic, bound):
            log.warning("kafka: group %s was assigned while the metadata lacked %s; it lists it now: joining again",
                        self.kafka_group, ", ".join(missing))
            self._assignor.blind = set()

    async def _watch_group(self) -> None:
        """Every heartbeat interval: has the broker refused this member its group (no Read on
        it, taken away or never given), or its login (a SASL credential deleted or changed while
        it ran: its connections are refused once they are made again)? aiokafka's group protocol
        stops on the first and keeps the error for a getmany() that a member holding no partition
        never makes; the second it retries without end, reading nothing. So the member looks: at
        the group protocol's error, and — while it has no coordinator, with SASL — at whether its
        login is refused now (the transport tries one connection). A refusal is kept for poll,
        and a member holding no partition reports partition 0 taken so that the engine polls it
        and stops the subscription (nothing is read: poll raises first)."""
        interval = max(0.2, self.transport.settings.kafka.heartbeat_interval.total_seconds())
        while self._refused is None:
            await asyncio.sleep(interval)
            consumer = self._consumer
            if consumer is None or self._stopped:
                return
            if self._assignor is not None and self._assignor.blind:
                await self._see_topics(consumer, interval)
            error: MsgBrokerError | None = None
            failure = _compat.coordinator_failure(consumer)
            if failure is not None:
                error = self.transport.error(failure, f"joining group {self.kafka_group!r} on {self.kafka_topic!r}")
            if not isinstance(error, AccessDeniedError) and self.transport.user and _compat.coordinator_unknown(
                consumer
            ):
                error = await self.transport.login_refused()
            if not isinstance(error, AccessDeniedError) or self._stopped:
                continue
            self._refuse(error)
            if not self._lanes and self._listener is not None and not self._listener.closing:
                await self._listener.assigned([0])
            return

    # -- reading --------------------------------------------------------------------------------

    async def _fetch(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition], timeout: float, wake: asyncio.Event
    ) -> dict[TopicPartition, list[Any]]:
        fetch: asyncio.Future[dict[TopicPartition, list[Any]]] = asyncio.ensure_future(
            consumer.getmany(*tps, timeout_ms=int(timeout * 1000))
        )
        if timeout <= 0:
            return await fetch
        waker: asyncio.Future[Any] = asyncio.ensure_future(wake.wait())
        racing: set[asyncio.Future[Any]] = {fetch, waker}
        try:
            # getmany ignores its timeout while a rebalance is in progress: bound it here
            done, _ = await asyncio.wait(racing, timeout=timeout + 0.05, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
        if fetch in done:
            return fetch.result()
        fetch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            result = await fetch
            if result:
                return result  # finished just before the cancel: keep what was consumed
        return {}

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        consumer = self._consumer
        if self._refused is not None:
            raise self._refused
        if consumer is None or self._stopped:
            return []
        out: list[Delivery] = []
        to_fetch: list[TopicPartition] = []
        lanes = self._lanes
        for partition in partitions:
            track = lanes.get(partition)
            if track is None or track.closed:
                continue
            if track.surplus:
                self._hand_out(track, max_per_lane, out)
            else:
                to_fetch.append(track.tp)
        if to_fetch:
            self._handing = out
            try:
                batch = await self._fetch(consumer, to_fetch, 0 if out else timeout, wake)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = self.transport.error(exc, f"reading {self.kafka_topic!r} for group {self.kafka_group!r}")
                if isinstance(error, AccessDeniedError):
                    self._refuse(error)
                raise error from exc
            finally:
                self._handing = []
            if out:
                # Handed out from the lanes' surplus before this fetch, which can wait through a
                # rebalance (aiokafka's getmany waits for the new assignment): a lane revoked
                # meanwhile committed them as its own, unsettled, and a lane opened again on the
                # partition reads them again from that commit. Handed on, they would run under
                # that new lane, whose settle calls ignore them (an ack or a failure lost).
                out = [delivery for delivery in out if self._current(delivery)]
            for tp, records in batch.items():
                track = lanes.get(tp.partition)
                if track is None or track.closed or not records:
                    continue  # not ours now: the next owner (or our reopened lane) seeks back
                track.surplus.extend(records)
                track.fetched_to = records[-1].offset + 1
                self._hand_out(track, max_per_lane, out)
        # What is handed out now may begin before the next commit: the broker must know first,
        # so that a crash in its handler counts. First deliveries of lanes whose last commit
        # named where their start markers begin get a marker in ``<topic>.starts`` (a produce
        # round trip: one record per lane, written together, naming the range handed out); a
        # careful message, or a lane without such a commit, waits for one commit for every
        # lane, carrying the acks since the last one too (a commit's round trip is several
        # times a produce's: Kafka 4's group coordinator lingers before writing).
        if out and not self._commits_failing:
            ranges: dict[int, list[int]] = {}
            for delivery in out:
                track = lanes.get(delivery.partition)
                if track is None or not track.marking or delivery.position in track.careful:
                    ranges.clear()
                    break
                span = ranges.setdefault(delivery.partition, [delivery.position, delivery.position + 1])
                span[0], span[1] = min(span[0], delivery.position), max(span[1], delivery.position + 1)
            if not ranges or not await self._mark(ranges):
                await self._group_commit()
        return out

    async def _mark(self, ranges: dict[int, list[int]]) -> bool:
        """Write one start marker per partition (its range of offsets handed out now) and wait
        until Kafka has them all (acks=all); False when that failed (commit instead)."""
        try:
            producer = self.transport.producer
            group = self.kafka_group.encode()
            sent = [
                (partition, await producer.send(self.starts_topic, f"{first}-{until}".encode(), key=group,
                                                partition=partition))
                for partition, (first, until) in ranges.items()
            ]
            written = await asyncio.gather(*(future for _, future in sent))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("kafka: writing start markers of %s for %s failed (%r): committing instead", self.topic,
                     self.group, exc)
            return False
        for (partition, _), meta in zip(sent, written, strict=True):
            track = self._lanes.get(partition)
            if track is not None and track.marked is not None:
                track.marked = max(track.marked, meta.offset + 1)
        return True

    @staticmethod
    def _hand_out(track: _Track, limit: int, out: list[Delivery]) -> None:
        """Hand up to ``limit`` fetched records to the engine, in order."""
        surplus, deliver = track.surplus, track.deliver
        out.extend(deliver(surplus.popleft()) for _ in range(min(limit, len(surplus))))

    # -- settling -------------------------------------------------------------------------------

    def _current(self, delivery: Delivery) -> bool:
        """``delivery`` belongs to the partition's lane as it is now (not to one revoked since)."""
        track = self._lanes.get(delivery.partition)
        return track is not None and track.pending.get(delivery.position) is delivery

    def _owned(self, delivery: Delivery) -> _Track | None:
        track = self._lanes.get(delivery.partition)
        if track is None or track.pending.get(delivery.position) is not delivery:
            log.debug("kafka: settle of %s on %s[%d] ignored: the partition moved on",
                      delivery.message_id, self.topic, delivery.partition)
            return None
        return track

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery, durable=False)

    async def _settle(self, delivery: Delivery, *, durable: bool) -> None:
        track = self._owned(delivery)
        if track is None:
            return
        offset = delivery.position
        del track.pending[offset]
        careful = track.careful
        if careful and offset in careful:
            careful.discard(offset)
            track.retried.pop(offset, None)
            durable = True  # its attempts are recorded exactly: so must its ack be
        head = track.target()
        if head is not None and head < offset:
            track.settled[offset] = delivery.attempt  # until the commit passes it
        elif track.ordered and head is not None and head in careful:
            durable = True  # the lane's next message is careful: its start is committed before it runs
        if track.closed or self._commits_failing:
            self._dirty.set()  # committed in the next batch (or on revoke / close)
            return
        if durable:
            await self._group_commit()
            return
        # A first delivery's ack waits for nothing: it is committed with the next batch. Until
        # then the commit metadata has it in doubt (see the module docstring).
        self._acks += 1
        if self._acks >= self._commit_batch:
            self._full.set()
        self._dirty.set()

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        track = self._owned(delivery)
        if track is None:
            return
        track.retried[delivery.position] = (attempt, not_before, delivery.failures)
        track.careful.add(delivery.position)
        # persisted at once, so the attempt, the failures and the delay survive a crash
        await self._group_commit()

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        if self._owned(delivery) is None:
            return
        await self.transport.write_dead_letter(letter, delivery.key, delivery.message_id)
        await self._settle(delivery, durable=True)

    # -- committing -----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Commit what is settled now (used before counting pending messages)."""
        if not self._stopped:
            await self._commit(None, bound=_FINAL_BOUND)

    async def _commit_loop(self) -> None:
        while True:
            await self._dirty.wait()
            # batch the acks of this interval, or of commit_batch acks
            await _wait_event(self._full, self._commit_interval)
            self._dirty.clear()
            self._full.clear()
            await self._group_commit(bound=_FINAL_BOUND)

    async def _group_commit(self, bound: float = _MARKER_BOUND) -> None:
        """Wait for a commit of every lane that began after this call (one request serves every
        caller that arrived while the previous one was in flight)."""
        self._changes += 1
        ticket = self._changes
        async with self._commit_lock:
            if self._flushed >= ticket:
                return
            upto = self._changes
            await self._commit_locked(None, bound=bound, final=False)
            self._flushed = upto

    async def _commit(self, partitions: Iterable[int] | None, *, bound: float, final: bool = False) -> None:
        async with self._commit_lock:
            await self._commit_locked(partitions, bound=bound, final=final)

    async def _commit_locked(self, partitions: Iterable[int] | None, *, bound: float, final: bool) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        wanted = self._lanes if partitions is None else {p: self._lanes[p] for p in partitions if p in self._lanes}
        offsets: dict[TopicPartition, tuple[int, str]] = {}
        tracks: dict[TopicPartition, _Track] = {}
        if partitions is None:
            self._acks = 0
        for track in wanted.values():
            target = track.target()
            if target is None or track.tp not in assigned:
                continue
            entry = (target, track.record(target, final=final))
            if track.committed != entry:
                offsets[track.tp] = entry
                tracks[track.tp] = track
        if not offsets:
            return
        # A caller cancelled meanwhile (a lane or the reader stopped) leaves the request to
        # finish: aiokafka goes on sending it anyway, and stop() waits for it before it closes
        # the connections (else the request may open a new one, left unclosed).
        commit: asyncio.Future[Any] = asyncio.ensure_future(consumer.commit(offsets))
        commit.add_done_callback(_retrieve)
        self._inflight = commit
        try:
            done, _ = await asyncio.wait({commit}, timeout=bound)
            if not done:
                commit.cancel()
                raise TimeoutError(f"no answer within {bound:.0f}s")
            commit.result()
        except asyncio.CancelledError:
            raise
        except (kafka_errors.CommitFailedError, kafka_errors.IllegalStateError) as exc:
            # the group rebalanced meanwhile: the partitions' next owner starts from the
            # previous commit and redelivers (at least once), nothing is lost
            log.info("kafka: commit of %s for %s skipped (group rebalancing): %s", self.topic, self.group, exc)
        except Exception as exc:
            error = self.transport.error(exc, f"committing {self.kafka_topic!r} for group {self.kafka_group!r}")
            if isinstance(error, AccessDeniedError):
                # not retried: the subscription stops (at its next poll) like a crash
                self._refuse(error)
                return
            # until a commit succeeds again, progress is committed in batches only (settles
            # do not wait for an unreachable broker)
            log.warning("kafka: commit of %s for %s failed: %r; it is retried", self.topic, self.group, exc)
            self._commits_failing = True
            self._dirty.set()
        else:
            self._commits_failing = False
            for tp, entry in offsets.items():
                track = tracks[tp]
                track.committed = entry
                track.marking = track.marked is not None  # the record named it (``m=``)
                if track.settled:
                    for offset in [o for o in track.settled if o < entry[0]]:
                        del track.settled[offset]
