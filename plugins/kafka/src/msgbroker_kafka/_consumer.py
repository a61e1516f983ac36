"""A member's reader of one (topic, group) on Kafka: a native consumer-group member.

* One ``AIOKafkaConsumer`` per subscription; Kafka assigns the partitions (our assignor keeps
  ``subscribe_to_partition`` exclusive) and the rebalance listener hands them to the engine.
* Handlers never run here: the engine calls :meth:`poll` from its reader task and runs
  handlers in lane tasks, so a slow handler cannot starve heartbeats (aiokafka#848).
* Redelivery is local (the engine holds the lane), so there is no seek loop and no pause
  to lose on a rebalance; a lane that waits is simply not polled.
* Commits: the lowest unsettled offset of each partition, each ack committed before the
  engine starts the lane's next message (acks of all lanes share one request), synchronously
  on revoke and on a graceful stop, never on a crash. The commit metadata carries the attempt
  counts (:class:`AttemptRecord`), so a new owner after a rebalance or crash knows how often
  each message was tried.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka import errors as kafka_errors
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]
from msgbroker.spi import DeadLetter, Delivery, LaneConsumer, failures_since

from . import _compat
from ._assignor import PinningAssignor
from ._errors import map_error
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
"""Characters of attempt runs in a commit's metadata (brokers keep 4096 by default)."""


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """What a commit's metadata says about delivery attempts: ``started`` deliveries of the
    message at the committed offset began (the next is due no earlier than ``not_before``);
    for the offsets after it up to ``until`` (exclusive), ``runs`` of (first offset, deliveries
    begun) — messages handed out, maybe handled and acked, whose acks were not committed yet
    when the member died. Encoded as ``msgbroker:a=2;nb=...;due=1;r=15:1,18:2;h=20``."""

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

    def began(self, committed: int, offset: int) -> int:
        """Deliveries begun of the message at ``offset``, for a commit at ``committed``."""
        if offset == committed:
            return self.started
        if not self.runs or self.until is None or not self.runs[0][0] <= offset < self.until:
            return 0
        index = bisect.bisect_right([first for first, _ in self.runs], offset) - 1
        return self.runs[index][1]

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
            failures, _, retried_at = fields.get("f", "").partition(":")
            return cls(
                failures=int(failures) if failures else None,
                retried_at=int(retried_at) if failures else 0,
                started=int(fields["a"]),
                not_before=float(fields["nb"]) if fields.get("nb") else None,
                runs=runs,
                until=int(fields["h"]) if fields.get("h") else None,
                due=fields.get("due") == "1",
            )
        except (KeyError, ValueError):
            return None


def next_attempt(record: AttemptRecord, began: int, at_commit: bool, now: float) -> tuple[int, float | None]:
    """The attempt number (and the delay still to wait out) of the next delivery of a message
    of which ``began`` deliveries began; ``at_commit``: it is the message at the committed
    offset (the one ``record.not_before`` and ``record.due`` speak of)."""
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


@dataclass(slots=True, eq=False)
class _Track:
    """What this member knows about one owned partition."""

    tp: TopicPartition
    pending: dict[int, Delivery] = field(default_factory=dict)
    """Fetched and not settled, by offset (insertion order is offset order)."""
    handed: set[int] = field(default_factory=set)
    """Offsets handed to the engine (the others wait in ``surplus``)."""
    surplus: deque[Delivery] = field(default_factory=deque)
    retried: dict[int, tuple[int, float | None, int | None]] = field(default_factory=dict)
    """Offset: (the attempt a retry announced, its not_before, failures as of that retry)."""
    settled: dict[int, int] = field(default_factory=dict)
    """Attempts of settled offsets the group's commit has not passed yet."""
    fetched_to: int | None = None
    inherited: AttemptRecord | None = None
    inherited_at: int = -1
    """The previous owner's record and the offset it was committed at."""
    committed: tuple[int, str] | None = None
    closed: bool = False
    ordered: bool = True
    """Only the lowest unsettled message can be in a handler (the engine's ordered lanes)."""

    def target(self) -> int | None:
        """The offset to commit: the lowest unsettled one, or the next to fetch."""
        if self.pending:
            return next(iter(self.pending))
        if self.fetched_to is not None:
            return self.fetched_to
        return self.committed[0] if self.committed else None

    def inherited_began(self, offset: int) -> int:
        return self.inherited.began(self.inherited_at, offset) if self.inherited is not None else 0

    def _began(self, offset: int, delivery: Delivery, final: bool) -> tuple[int, float | None, bool]:
        """(deliveries begun, delay still to wait out, whether that attempt is the one due
        then) of a handed, unsettled message."""
        attempt, not_before = delivery.attempt, delivery.not_before
        retried = self.retried.get(offset)
        if retried is not None and retried[0] >= attempt:
            attempt, not_before = retried[0], retried[1]
        waiting = not_before is not None and time.time() < not_before
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

    def record(self, offset: int, *, final: bool = False) -> str:
        """The commit metadata for a commit at ``offset``. ``final``: the engine drained the
        lane (revoke, close), so nothing is in a handler."""
        delivery = self.pending.get(offset)
        due = False
        failures: int | None = None
        retried_at = 0
        if delivery is not None and offset in self.handed:
            started, not_before, due = self._began(offset, delivery, final)
            retried = self.retried.get(offset)
            if retried is not None:
                retried_at, failures = retried[0], retried[2]
            elif delivery.failures is not None:  # inherited and not retried here
                failures, retried_at = delivery.failures, delivery.attempt
        else:
            started = self.inherited_began(offset)
            not_before, due = None, False
            if self.inherited is not None and offset == self.inherited_at:
                not_before, due = self.inherited.not_before, self.inherited.due
                failures, retried_at = self.inherited.failures, self.inherited.retried_at
        counts: list[tuple[int, int]] = []
        after = sorted(o for o in (*self.handed, *self.settled) if o > offset)
        for later in after:
            if later in self.settled:
                counts.append((later, self.settled[later]))
            else:
                counts.append((later, self._began(later, self.pending[later], final)[0]))
        inherited_until = self.inherited.until if self.inherited is not None else None
        if inherited_until is not None:  # what the previous owner handed and this one has not yet
            known = {o for o, _ in counts}
            counts.extend((o, n) for o in range(offset + 1, inherited_until)
                          if o not in known and (n := self.inherited_began(o)))
            counts.sort()
        counts = [(o, n) for o, n in counts if n > 0]
        runs, until = _runs(counts, _RUNS_BUDGET)
        if not started and not runs and not_before is None:
            return ""
        return AttemptRecord(started, not_before, runs, until, due, failures, retried_at).encode()


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
            _report(stopping)
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
    if done:
        _report(stopping)
    else:
        log.warning("kafka: a consumer did not stop within %.0fs", _FINAL_BOUND)


def _report(stopped: asyncio.Future[Any]) -> None:
    # a stop cut short by the dropped connections may end cancelled: that is not ours to raise
    if not stopped.cancelled() and stopped.exception() is not None:
        log.debug("kafka: stopping a consumer: %r", stopped.exception())


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: KafkaLaneConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.owner.on_revoked(sorted(tp.partition for tp in revoked if tp.topic == self.owner.topic))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.owner.on_assigned(sorted(tp.partition for tp in assigned if tp.topic == self.owner.topic))


class KafkaLaneConsumer(LaneConsumer):
    """One member of a Kafka consumer group for one topic."""

    def __init__(self, transport: ConsumerHost, topic: str, group: str, member_id: str) -> None:
        self.transport = transport
        self.topic = topic
        self.group = group
        self.member_id = member_id
        self._consumer: AIOKafkaConsumer | None = None
        self._listener: AssignmentListener | None = None
        self._lanes: dict[int, _Track] = {}
        self._committed: dict[int, tuple[int, str]] = {}
        self._commit_lock = asyncio.Lock()
        self._changes = 0
        self._flushed = 0
        self._ordered = True
        self._dirty = asyncio.Event()
        self._assigned_once = asyncio.Event()
        self._gone = asyncio.Event()
        self._parked = False
        self._commit_task: asyncio.Task[None] | None = None
        self._stopped = False
        self._commits_failing = False
        kafka = transport.settings.kafka
        self._commit_interval = kafka.commit_interval.total_seconds()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, listener: AssignmentListener, partition: int | None) -> None:
        await self.transport.ensure_topic(self.topic)
        settings = self.transport.settings
        kafka = settings.kafka
        session = int(kafka.session_timeout.total_seconds() * 1000)
        grace = int(settings.shutdown_timeout.total_seconds() * 1000)
        consumer = AIOKafkaConsumer(
            **self.transport.client_options(),
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a new group also gets what was published before it
            session_timeout_ms=session,
            heartbeat_interval_ms=int(kafka.heartbeat_interval.total_seconds() * 1000),
            # a revoke waits for in-flight handlers (the engine bounds them by the grace period)
            rebalance_timeout_ms=session + 2 * grace,
            # handlers never block polling here; the engine just stops polling full lanes, which
            # must not count as a stuck member (liveness is the heartbeat's job)
            max_poll_interval_ms=24 * 3600 * 1000,
            partition_assignment_strategy=(PinningAssignor(partition),),
            fetch_max_wait_ms=250,
        )
        self._listener = listener
        self._ordered = bool(listener.ordered)
        try:
            await consumer.start()
            consumer.subscribe([self.topic], listener=_RebalanceListener(self))
        except Exception as exc:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise map_error(exc, f"joining group {self.group!r} on {self.topic!r}") from exc
        self._consumer = consumer
        self.transport.consumers.add(self)
        self._commit_task = asyncio.create_task(self._commit_loop(), name=f"msgbroker-kafka-commit-{self.topic}")
        # Return once this member holds its share when that is quick (the first member of a
        # group: at once). Joining a busy group takes until every member drained its in-flight
        # handlers (eager rebalance); waiting for that here would stall a caller whose own
        # handlers wait for it, until the grace period cancels them. So: at most a second.
        bound = min(1.0, kafka.heartbeat_interval.total_seconds())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._assigned_once.wait(), bound)

    async def stop(self, flush: bool) -> None:
        self._stopped = True
        task, self._commit_task = self._commit_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if flush:
            await self._commit(None, bound=_FINAL_BOUND, final=True)
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
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self._committed = {}
        for attempt in range(3):
            try:
                found = await self.transport.committed_offsets(self.group, tps) if tps else {}
            except Exception as exc:
                # the lanes open anyway (aiokafka starts them at the committed offsets); only
                # the attempt counts recorded by the previous owner are unknown then
                log.warning("kafka: reading the commits of %s for %s failed (%d): %s", self.topic, self.group,
                            attempt + 1, exc)
                await asyncio.sleep(0.2)
                continue
            self._committed = {tp.partition: (meta.offset, meta.metadata or "") for tp, meta in found.items()}
            break
        try:
            await self._listener.assigned(partitions)
        except Exception:
            log.exception("kafka: taking over %s%s for %s failed", self.topic, partitions, self.group)
        finally:
            self._assigned_once.set()

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
        # commit what was settled, then release; a failed commit only means redelivery
        await self._commit(partitions, bound=_FINAL_BOUND, final=True)
        for partition in partitions:
            self._lanes.pop(partition, None)

    async def open_lane(self, partition: int, lease: str | None) -> None:
        tp = TopicPartition(self.topic, partition)
        track = _Track(tp, ordered=self._ordered)
        committed = self._committed.get(partition)
        if committed is not None:
            offset, metadata = committed
            track.committed = committed
            track.inherited = AttemptRecord.decode(metadata)
            track.inherited_at = offset
            if self._consumer is not None:
                try:
                    # records fetched before a rebalance and never settled are read again
                    self._consumer.seek(tp, offset)
                except (kafka_errors.IllegalStateError, AssertionError) as exc:
                    log.debug("kafka: seek of %s failed: %s", tp, exc)
        self._lanes[partition] = track

    async def close_lane(self, partition: int) -> None:
        track = self._lanes.get(partition)
        if track is not None:
            track.closed = True
            track.surplus.clear()

    # -- reading --------------------------------------------------------------------------------

    def _delivery(self, track: _Track, record: Any) -> Delivery:
        headers = decode_headers(record.headers)
        message_id = headers.pop(MESSAGE_ID_HEADER, "")
        attempt, not_before, failures = 1, None, None
        if track.inherited is not None:
            began = track.inherited.began(track.inherited_at, record.offset)
            attempt, not_before = next_attempt(
                track.inherited, began, record.offset == track.inherited_at, time.time()
            )
            if record.offset == track.inherited_at:
                failures = failures_since(track.inherited.failures, track.inherited.retried_at, attempt)
        return Delivery(
            partition=record.partition,
            message_id=message_id,
            key=(record.key or b"").decode("utf-8", errors="replace"),
            headers=headers,
            body=record.value or b"",
            attempt=attempt,
            position=record.offset,
            not_before=not_before,
            failures=failures,
        )

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
        if consumer is None or self._stopped:
            return []
        out: list[Delivery] = []
        to_fetch: list[TopicPartition] = []
        for partition in partitions:
            track = self._lanes.get(partition)
            if track is None or track.closed:
                continue
            if track.surplus:
                self._hand_out(track, max_per_lane, out)
            else:
                to_fetch.append(track.tp)
        if to_fetch:
            try:
                batch = await self._fetch(consumer, to_fetch, 0 if out else timeout, wake)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise map_error(exc, f"polling {self.topic!r} for {self.group!r}") from exc
            for tp, records in batch.items():
                track = self._lanes.get(tp.partition)
                if track is None or track.closed:
                    continue  # not ours now: the next owner (or our reopened lane) seeks back
                for record in records:
                    delivery = self._delivery(track, record)
                    track.pending[record.offset] = delivery
                    track.surplus.append(delivery)
                    track.fetched_to = record.offset + 1
                self._hand_out(track, max_per_lane, out)
        # A lane whose head was just handed out: record that its delivery began before its
        # handler runs, so a crash during it counts as an attempt for the next owner.
        handed_now = {(d.partition, d.position) for d in out}
        started = [
            p for p, t in self._lanes.items()
            if not t.closed and (head := t.target()) is not None and (p, head) in handed_now
            and t.committed != (head, t.record(head))
        ]
        if started and not self._commits_failing:
            await self._commit(started, bound=_MARKER_BOUND)
        return out

    @staticmethod
    def _hand_out(track: _Track, limit: int, out: list[Delivery]) -> None:
        for _ in range(min(limit, len(track.surplus))):
            delivery = track.surplus.popleft()
            track.handed.add(delivery.position)
            out.append(delivery)

    # -- settling -------------------------------------------------------------------------------

    def _owned(self, delivery: Delivery) -> _Track | None:
        track = self._lanes.get(delivery.partition)
        if track is None or track.pending.get(delivery.position) is not delivery:
            log.debug("kafka: settle of %s on %s[%d] ignored: the partition moved on",
                      delivery.message_id, self.topic, delivery.partition)
            return None
        return track

    async def ack(self, delivery: Delivery) -> None:
        track = self._owned(delivery)
        if track is None:
            return
        del track.pending[delivery.position]
        track.handed.discard(delivery.position)
        track.retried.pop(delivery.position, None)
        track.settled[delivery.position] = delivery.attempt  # until the commit passes it
        if track.closed or self._commits_failing:
            self._dirty.set()  # committed in the next batch (or on revoke / close)
            return
        # Committed before the engine starts the next message: so a crash loses no ack (no
        # redelivery of what was handled, attempt counts exact) and a crash in the next
        # handler counts as its attempt. Acks of all lanes share one commit request.
        await self._group_commit()

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        track = self._owned(delivery)
        if track is None:
            return
        track.retried[delivery.position] = (attempt, not_before, delivery.failures)
        if track.target() == delivery.position:
            # persisted at once, so the attempt and the delay survive a crash; a message behind
            # the lowest unsettled offset (unordered lanes) cannot carry metadata in Kafka
            await self._commit([delivery.partition], bound=_MARKER_BOUND)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        if self._owned(delivery) is None:
            return
        await self.transport.write_dead_letter(letter, delivery.key, delivery.message_id)
        await self.ack(delivery)

    # -- committing -----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Commit what is settled now (used before counting pending messages)."""
        if not self._stopped:
            await self._commit(None, bound=_FINAL_BOUND)

    async def _commit_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._commit_interval)  # batch the acks of this interval
            self._dirty.clear()
            await self._commit(None, bound=_FINAL_BOUND)

    async def _group_commit(self) -> None:
        """Wait for a commit that began after this call (one request serves every caller that
        arrived while the previous one was in flight)."""
        self._changes += 1
        ticket = self._changes
        async with self._commit_lock:
            if self._flushed >= ticket:
                return
            upto = self._changes
            await self._commit_locked(None, bound=_MARKER_BOUND, final=False)
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
        try:
            await asyncio.wait_for(consumer.commit(offsets), bound)
        except asyncio.CancelledError:
            raise
        except (kafka_errors.CommitFailedError, kafka_errors.IllegalStateError) as exc:
            # the group rebalanced meanwhile: the partitions' next owner starts from the
            # previous commit and redelivers (at least once), nothing is lost
            log.info("kafka: commit of %s for %s skipped (group rebalancing): %s", self.topic, self.group, exc)
        except Exception as exc:
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
                for offset in [o for o in track.settled if o < entry[0]]:
                    del track.settled[offset]
