"""A member's reader of one (topic, group): for each lane it owns (the engine's leases), one
long-lived pull request on a subscription of its own, answered with up to ``max_ack_pending``
messages in flight, which this member hands to the engine in stream order.

A lane's durable consumer is shared by the group, so what is in flight at the server may be
held by a member that died or is handing the lane over. The owner record of the lane (KV) says
which: a member that closed names the messages it handed back, and the next owner hands nothing
after them until they are back; a member that died left its record open, and the next owner
hands nothing until the server counts no message of the lane in flight but those it holds (what
the dead member held comes back after ack_wait, first). A nak keeps the lane behind the
message until the server delivers it again (after the delay), so nothing overtakes it.
docs/providers/nats.md has the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nats.js.errors
from msgbroker.spi import (
    BrokerClosedError,
    DeadLetter,
    Delivery,
    LaneConsumer,
    MsgBrokerError,
    cancel_and_wait,
    dead_letter_record,
)

from ._errors import map_error, through_elections
from ._host import ConsumerHost
from ._layout import ENVELOPE_HEADER, decode_envelope

if TYPE_CHECKING:
    from msgbroker.spi import AssignmentListener
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["NatsLaneConsumer"]

log = logging.getLogger("msgbroker.nats")

PULL_EXPIRES = 15.0
"""Seconds a pull request waits on the server; renewed when it expires (the server also drops
it at once when our inbox goes away, so a dead member leaves no request behind)."""
_PULL_REQUEST = '{"batch":%d,"expires":%d}'
_CHECK_AGAIN = 0.25
"""Seconds a poll naps at most while a lane waits for a dead owner's messages."""
_UNCONFIRMED_CLEAN = 4
"""Times ack_wait: a lane the server never confirms clean (see _check_clean) goes on after this."""
_ACK, _NAK, _TERM, _WPI = b"+ACK", b"-NAK", b"+TERM", b"+WPI"
_HAND_BACK_DELAY = 2.0
"""Seconds a message handed back on close waits at the server (see _release)."""
_HAND_BACK = b'-NAK {"delay":%d}' % int(_HAND_BACK_DELAY * 1e9)
_REWOUND = "_MSGBROKER_NATS.rewound"
"""``<_REWOUND>.<stream>.<consumer group>.<partition>``, payload a stream sequence: a member tells
the group that this settled message will be delivered once more as new (see _settle)."""
_REMEMBERED = 64
_REMEMBERED_SETTLED = 4096


def _ack_fields(reply: str) -> tuple[int, int, int]:
    """(deliveries, stream sequence, consumer sequence) from a JetStream ack subject, without
    nats-py's full parse: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>...`` (or with
    domain and account hash)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5]), int(tokens[6])
    return int(tokens[6]), int(tokens[7]), int(tokens[8])


def _record(raw: bytes | None) -> tuple[int, int, bool] | None:
    """An attempt record: ``<failures>:<delivery>`` (a retry: the failures when it announced
    that delivery) or ``<failures>:<delivery>:s`` (that delivery began in a handler with those
    failures before it)."""
    try:
        fields = (raw or b"").decode().split(":")
        return int(fields[0]), int(fields[1]), len(fields) > 2 and fields[2] == "s"
    except (ValueError, IndexError):
        return None


class _Held:
    """One message this member holds (received, not settled). ``msg`` is replaced when the
    server redelivers the same message to us, so settling uses the newest delivery.
    ``careful``: a redelivery, whose start is recorded before a handler gets it."""

    __slots__ = ("careful", "delivered", "dseq", "failures", "msg", "seq", "started", "touched")

    def __init__(self, msg: Msg, seq: int, dseq: int, delivered: int, failures: int | None, careful: bool) -> None:
        self.msg = msg
        self.seq = seq
        self.dseq = dseq
        self.delivered = delivered
        self.failures = failures
        self.careful = careful
        self.started: int | None = None  # this delivery's start was recorded here, with these failures
        self.touched = time.monotonic()


class _Lane:
    __slots__ = (
        "awaiting",
        "clean",
        "clean_at",
        "clean_by",
        "clean_check_at",
        "closing",
        "deadline",
        "floor_check_at",
        "gen",
        "handed",
        "items",
        "last_dseq",
        "lease",
        "left_at",
        "lost",
        "next_subject",
        "offsets",
        "open",
        "owner_revision",
        "partition",
        "polled",
        "remaining",
        "retried",
        "retry_at",
        "rewound",
        "seen",
        "settled",
        "settled_here",
        "starting",
        "sub",
        "turn",
        "unread",
    )

    def __init__(self, partition: int, next_subject: str) -> None:
        self.partition = partition
        self.next_subject = next_subject
        self.open = False
        self.gen = 0
        self.remaining = 0  # messages the lane's pull requests on the server may still bring
        self.deadline = 0.0
        self.retry_at = 0.0
        self.sub: Subscription | None = None
        self.items: dict[int, _Held] = {}  # stream sequence -> held message
        self.handed: set[int] = set()  # the sequences handed to the engine and not settled
        self.polled: set[int] = set()  # handed by a poll that has not returned yet (the engine has not got them)
        self.awaiting: set[int] = set()  # ordered: sequences at the server nothing after may overtake
        self.offsets: dict[int, int] = {}  # sequence -> its deliveries that were read ahead and handed back
        self.unread: set[int] = set()  # handed to the engine, given back unhandled (LaneConsumer.unread)
        self.closing = False  # draining its subscription: what still arrives is handed back with the rest
        self.lease: str | None = None  # the engine's lease token for the lane
        self.turn = 0  # one more at each retry of an ordered lane (the engine drops what it holds)
        self.clean = False  # nothing of the lane is in flight at the server but what is held here
        self.clean_at = 0.0  # not clean: not before then (ack_wait + 0.5 s after the take-over)
        self.clean_by = 0.0  # not clean: when to go on even if the server never confirmed it (see _check_clean)
        self.clean_check_at = 0.0  # not clean: when to ask the server again
        self.floor_check_at = 0.0  # when to look for awaited sequences settled meanwhile (see _prune_awaiting)
        self.owner_revision: int | None = None  # of the lane's owner record this member wrote
        self.retried: Delivery | None = None
        self.starting: tuple[asyncio.Future[None], _Held, int] | None = None  # a start being recorded (see _hand_out)
        self.seen = 0  # the highest stream sequence of this lane delivered (as far as we know)
        self.settled = 0  # the highest stream sequence this member acked or terminated
        self.settled_here: set[int] = set()  # the last sequences this member acked or terminated
        self.rewound: set[int] = set()  # settled elsewhere, announced to come back as new (see _settle)
        self.last_dseq = 0  # the highest consumer delivery sequence this member received on the lane
        self.left_at: int | None = None  # the last owner's last delivery (its closing record), until checked
        self.lost = 0  # deliveries to the last owner that never reached it, not yet come back


class NatsLaneConsumer(LaneConsumer):
    """Reads the lanes of one (topic, group) for one member."""

    OPENS_AT_ONCE = 16
    """Opening a lane reads and writes its owner record and sends a pull request (three round
    trips): one after another, a member taking 64 lanes waited 192 round trips."""

    def __init__(self, transport: ConsumerHost, topic: str, group: str, member_id: str) -> None:
        self._transport = transport
        self._layout = transport.layout(topic)
        self._topic = topic
        self._group = group
        self._member = member_id
        self._lanes: dict[int, _Lane] = {}
        self._ready_lanes: set[int] = set()
        self._needs_request: set[int] = set()
        self._watched: set[int] = set()
        """Lanes the sweep of _maintain looks at: not clean, or awaiting a sequence (added
        wherever either begins, dropped by the sweep once neither holds). Sweeping every lane at
        every poll cost a member of 1,024 lanes about 0.4 ms a poll, and its p50 latency twice
        the raw client's."""
        self._arrival: asyncio.Future[None] | None = None
        self._inbox = ""
        self._epoch = 0
        self._rewound_sub: Subscription | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._ordered = True
        self._next_sweep = 0.0
        self._stopped = False
        self._delivered_at_start: dict[int, int] = {}
        self._unmade: set[int] = set()
        """Lanes whose consumer is missing or has other settings: made or updated as they open."""
        self._background: set[asyncio.Task[Any]] = set()  # referenced until done (not collected)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, listener: AssignmentListener, partition: int | None) -> None:
        transport = self._transport
        self._ordered = listener.ordered
        await transport.ensure_stream(self._layout, None)
        wanted = [partition] if partition is not None else list(range(transport.partition_count))
        if len(wanted) <= self.OPENS_AT_ONCE:
            self._delivered_at_start = await transport.ensure_consumers(self._layout, self._group, wanted)
        else:
            # Made as their lanes open (see open_lane): the first lanes open while the server
            # makes the others' consumers. Made here, 1,024 of them (a new group of a
            # 1,024-partition topic) kept every lane waiting 1.6 s.
            self._delivered_at_start, unmade = await transport.check_consumers(self._layout, self._group, wanted)
            self._unmade.update(unmade)
        await transport.pins()  # the leases' bucket (its TTL is the lease time)
        nc = transport.nc
        self._inbox = nc.new_inbox()
        try:
            self._rewound_sub = await nc.subscribe(f"{self._rewound_subject()}.*", cb=self._on_rewound)
        except Exception as exc:
            raise map_error(exc, "subscribing to the group's announcements") from exc
        self._keeper = asyncio.create_task(self._keep_in_progress(), name=f"msgbroker-nats-wpi-{self._topic}")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def open_lane(self, partition: int, lease: str | None) -> None:
        if partition in self._unmade:
            self._delivered_at_start[partition] = await self._transport.ensure_consumer(self._layout, self._group,
                                                                                        partition)
            self._unmade.discard(partition)
        lane = self._lanes.get(partition)
        if lane is None:
            stream, consumer = self._layout.stream, self._layout.consumer(self._group, partition)
            lane = self._lanes[partition] = _Lane(partition, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}")
            lane.seen = self._delivered_at_start.get(partition, 0)
        lane.awaiting = set()
        lane.clean = True
        lane.lease = lease
        lane.last_dseq = 0  # deliveries to others since this member last held it are no gap
        lane.floor_check_at = time.monotonic() + self._transport.ack_wait
        await self._take_over(lane)
        lane.open = True
        self._watched.add(partition)
        self._epoch += 1
        try:
            # A subscription per lane: when the lane closes, the server drops its pull request
            # (no interest) instead of handing it messages for the next owner.
            lane.sub = await self._transport.nc.subscribe(f"{self._inbox}.{partition}.{self._epoch}.*",
                                                          cb=self._on_message, pending_msgs_limit=-1,
                                                          pending_bytes_limit=-1)
        except Exception as exc:
            lane.open = False
            raise map_error(exc, f"subscribing to {self._topic}[{partition}]") from exc
        lane.remaining = 0
        await self._top_up(lane)

    def _owner_key(self, partition: int) -> str:
        return f"{self._topic}/{self._group}/{partition}/owner"  # '/' is in neither name

    async def _take_over(self, lane: _Lane) -> None:
        """Read how the lane's last owner left it (its owner record) and mark it ours.

        The record is ``closed|<sequences>`` or ``open:<member>|<sequences>``; the sequences are
        messages of the lane still at the server that nothing after may overtake (handed back on
        close, or nak'ed with a delay), each with how many of its deliveries were only read ahead
        (``<sequence>~<n>``), and the last consumer delivery sequence it received (``#<n>``).
        Closed: everything else it held was handed back before (a confirmed nak), so the lane
        goes on at once after those, unless a delivery to it was lost (_check_lost). Still open
        (its owner died, or lost the lease): what it held comes back after ack_wait, so nothing is
        handed before the server counts nothing in flight but what this member holds (see
        _check_clean)."""
        key = self._owner_key(lane.partition)
        left: str | None = None
        try:
            kv = await self._transport.failure_counts()
            try:
                left = ((await kv.get(key)).value or b"").decode()
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                left = "closed"  # never owned (or a day ago): nothing of it in flight
        except Exception as exc:
            log.warning("nats: reading the owner record of %s[%d] for %s failed (%r); waiting ack_wait as after "
                        "a crash", self._topic, lane.partition, self._group, exc)
        state, _, back = (left or "").partition("|")
        lane.left_at, lane.lost = None, 0
        for entry in back.split(","):
            if entry.startswith("#") and entry[1:].isdigit() and state.startswith("closed"):
                lane.left_at = int(entry[1:])
                continue
            seq, _, offset = entry.partition("~")
            if seq.isdigit():
                lane.awaiting.add(int(seq))
                self._watched.add(lane.partition)
                if offset.isdigit():
                    lane.offsets[int(seq)] = int(offset)
        if self._ordered and (left is None or not state.startswith("closed")):
            lane.clean = False
            self._not_clean(lane, time.monotonic())
            log.info("nats: %s[%d] for %s was left by %s without closing; handing nothing until what it held is back",
                     self._topic, lane.partition, self._group, state or "an unknown owner")
        lane.owner_revision = None
        await self._write_owner_record(lane, closing=False)

    def _owner_record(self, lane: _Lane, closing: bool) -> bytes:
        """See _take_over. Closing: what this member holds is handed back, one more read-ahead
        delivery for each that no handler saw; a lane not clean stays open (what a dead owner
        held may still be out). A closing record also names the last consumer delivery sequence
        the member received (``#<n>``), for the next owner's _check_lost."""
        back = {seq: lane.offsets.get(seq, 0) for seq in lane.awaiting if seq not in lane.items}
        if closing:
            for seq in lane.items:
                back[seq] = lane.offsets.get(seq, 0) + (1 if seq not in lane.handed or seq in lane.unread else 0)
        entries = [f"{seq}~{offset}" if offset else str(seq) for seq, offset in sorted(back.items())]
        state = "closed" if closing and lane.clean else f"open:{self._member}"
        mark = max(lane.last_dseq, lane.left_at or 0)
        if closing and mark:
            entries.append(f"#{mark}")  # the last delivery it received: see _check_lost
        return f"{state}|{','.join(entries)}".encode()

    async def _write_owner_record(self, lane: _Lane, closing: bool) -> None:
        """Write the lane's owner record: at take-over unconditionally, later only over our own
        (revision-checked: a newer owner's record is never overwritten)."""
        record = self._owner_record(lane, closing)
        try:
            kv = await self._transport.failure_counts()
            key = self._owner_key(lane.partition)
            last = lane.owner_revision
            if last is None:
                lane.owner_revision = await through_elections(lambda: kv.put(key, record))
            else:
                lane.owner_revision = await through_elections(lambda: kv.update(key, record, last=last))
        except Exception as exc:
            log.debug("nats: writing the owner record of %s[%d] failed: %r", self._topic, lane.partition, exc)
            if closing:
                lane.owner_revision = None

    async def close_lane(self, partition: int) -> None:
        lane = self._lanes.get(partition)
        if lane is None or not lane.open:
            return
        lane.open = False
        sub, lane.sub = lane.sub, None
        if sub is not None:
            lane.closing = True
            try:
                with contextlib.suppress(Exception):
                    # Unsubscribe and take what the server sent before it saw that: _on_message
                    # keeps it with the rest, to be handed back below (not left to ack_wait).
                    await asyncio.wait_for(sub.drain(), 5.0)  # type: ignore[no-untyped-call]  # nats-py: unannotated
            finally:
                lane.closing = False
        unstarted = await self._not_started(lane)
        record = self._owner_record(lane, closing=True)  # before _release forgets what it held
        lane.unread.clear()
        lease, lane.lease = lane.lease, None
        if lease is not None and not await self._holds(lane, lease):
            # Lost (paused past the lease): the new owner has what we held (redelivered to it);
            # a nak now would hand it out once more. The new owner's record is not ours to write.
            lane.items.clear()
            lane.handed.clear()
            lane.awaiting = set()
            lane.owner_revision = None
            return
        for item, failures in unstarted:
            with contextlib.suppress(Exception):
                kv = await self._transport.failure_counts()
                await kv.put(self._attempts_key(partition, item.seq), f"{failures}:{item.delivered + 1}".encode())
        await self._release(lane)
        if lane.owner_revision is not None:
            # Once what we held is handed back (confirmed): the next owner then goes on at once,
            # after the sequences named (or, not clean yet here, after ack_wait as we would).
            with contextlib.suppress(Exception):
                kv = await self._transport.failure_counts()
                await kv.update(self._owner_key(partition), record, last=lane.owner_revision)
        lane.owner_revision = None

    async def _not_started(self, lane: _Lane) -> list[tuple[_Held, int]]:
        """Deliveries of the closing lane that no handler gets although their start may be
        recorded, with the failures recorded: one whose start is being recorded (see _hand_out;
        waited for), and those a poll still running took (counted read ahead). close_lane makes
        their records say, before the messages go back, that they began no handling — the next
        owner would count a recorded start as a failure (a member that died in the handler) and
        dead-letter the message an attempt early. Not when the lease was lost: the records are
        the new owner's then."""
        undo: list[tuple[_Held, int]] = []
        starting, lane.starting = lane.starting, None
        if starting is not None:
            started, item, failures = starting
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(started), 5.0)
            if item.seq not in lane.handed:
                undo.append((item, failures))
        # Taken by a poll still running (it waits on another lane): the engine drops them when
        # it gets them, but only then says so (unread) — maybe after the next owner read the
        # record. They are read ahead, and a start recorded for one of them did not happen.
        for seq in lane.polled & lane.handed:
            lane.unread.add(seq)
            taken = lane.items.get(seq)
            if taken is not None and taken.started is not None:
                undo.append((taken, taken.started))
        lane.polled.clear()
        return undo

    async def _holds(self, lane: _Lane, lease: str) -> bool:
        try:
            return await self._transport.holds_lease(self._topic, self._group, lane.partition, lease)
        except MsgBrokerError:
            return True  # cannot tell: hand back as usual (at worst one more delivery)

    async def _release(self, lane: _Lane) -> None:
        """Hand back what this member holds of the lane and never settled, in stream order, with
        a nak — on nats-server 2.9 delayed by ``_HAND_BACK_DELAY``: by then the next owner has a
        pull request waiting (2.9.10 rewinds a consumer that redelivers to dead requests only, see
        *Recovery*; 2.10 and later keep the message for the next live request, so there it goes
        back at once). The next owner waits for these sequences (the owner record names them).
        The last nak is confirmed: the server applied them all before the lane is given up."""
        payload = _NAK if self._transport.asks_consumers_freely() else _HAND_BACK
        held = [lane.items[seq] for seq in sorted(lane.items)]
        lane.items.clear()
        lane.handed.clear()
        lane.awaiting = set()
        self._ready_lanes.discard(lane.partition)
        nc = self._transport.nc
        for index, item in enumerate(held):
            try:
                if index == len(held) - 1:
                    await nc.request(item.msg.reply, payload, timeout=5.0)
                else:
                    await nc.publish(item.msg.reply, payload)
            except Exception as exc:
                lane.clean = False  # not sure the server has them back: the next owner waits ack_wait
                self._watched.add(lane.partition)
                log.debug("nats: handing back %s[%d] #%d failed: %r", self._topic, lane.partition, item.seq, exc)

    async def stop(self, flush: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._transport.forget(self)
        await cancel_and_wait([t for t in (self._keeper,) if t is not None])
        rewound, self._rewound_sub = self._rewound_sub, None
        if rewound is not None:
            with contextlib.suppress(Exception):
                await rewound.unsubscribe()
        subs = [lane.sub for lane in self._lanes.values() if lane.sub is not None]
        if not flush:
            # A crash: stop receiving (the server forgets our pull requests), settle nothing;
            # what we hold comes back to the others after ack_wait.
            for lane in self._lanes.values():
                lane.open, lane.sub = False, None
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self._wake_poll()
            return
        for partition in list(self._lanes):
            await self.close_lane(partition)
        with contextlib.suppress(Exception):
            await self._transport.nc.flush(timeout=2)
        self._wake_poll()

    def reconnected(self) -> None:
        """The server forgot our pull requests: ask again on every open lane. A message it sent
        as the connection broke never arrived and comes back only after ack_wait: an ordered lane
        hands nothing new until then (nothing later may overtake it)."""
        now = time.monotonic()
        for lane in self._lanes.values():
            if lane.open:
                lane.remaining = 0
                lane.retry_at = 0.0
                self._needs_request.add(lane.partition)
                if self._ordered:
                    lane.clean = False
                    self._not_clean(lane, now)
        self._wake_poll()

    # -- pull requests ---------------------------------------------------------------------

    async def _top_up(self, lane: _Lane) -> None:
        """Ask for as many messages as the lane has room for (``in_flight`` minus what this
        member holds and what its requests may still bring), once that is half of it. This
        member's own limit, not the consumer's max_ack_pending (twice as large), keeps the lane
        flowing: nats-server 2.9 hands a pull consumer at its max_ack_pending its next message
        only slowly (one about every 0.25 s measured) after the acks that free room."""
        if not lane.open or lane.sub is None or self._stopped:
            return
        room = self._transport.in_flight - len(lane.items) - lane.remaining
        if room >= max(1, self._transport.in_flight // 2) or (room > 0 and lane.remaining == 0):
            await self._request(lane, room)
        elif lane.remaining == 0 and (not lane.clean or any(seq not in lane.items for seq in lane.awaiting)):
            # Full, and waiting for a nak'ed or handed-back message, or for what a dead owner (or
            # this member before its connection broke) held: keep one request waiting for it. The
            # server redelivers only into a pull request (even at its max_ack_pending, which stops
            # new ones); without one, a lane that filled up while it waited went on after the wait
            # and the late redelivery came after later messages.
            await self._request(lane, 1)

    async def _request(self, lane: _Lane, batch: int) -> None:
        assert lane.sub is not None
        lane.gen += 1
        lane.remaining += batch
        lane.deadline = time.monotonic() + PULL_EXPIRES + 2.0
        self._needs_request.discard(lane.partition)
        try:
            await self._transport.nc.publish(lane.next_subject, (_PULL_REQUEST % (batch, PULL_EXPIRES * 1e9)).encode(),
                                             reply=f"{lane.sub.subject[:-1]}{lane.gen}")
        except Exception as exc:
            lane.remaining -= batch
            self._needs_request.add(lane.partition)
            raise map_error(exc, f"pulling from {self._topic}[{lane.partition}]") from exc

    async def _maintain(self) -> None:
        """Renew pull requests that ended (expired, refused, lost with a reconnect); check the
        lanes that wait for messages in flight elsewhere."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            for lane in self._lanes.values():
                if lane.open and lane.remaining and now > lane.deadline:
                    lane.remaining = 0  # no answer at all: the requests are gone
                    self._needs_request.add(lane.partition)
        for partition in list(self._needs_request):
            wanting = self._lanes.get(partition)
            if wanting is None or not wanting.open:
                self._needs_request.discard(partition)
            elif now >= wanting.retry_at:
                self._needs_request.discard(partition)
                await self._top_up(wanting)
        for partition in list(self._watched):
            found = self._lanes.get(partition)
            if found is None or not found.open or (found.clean and not found.awaiting):
                self._watched.discard(partition)
                continue
            lane = found
            if (lane.open and not lane.clean and lane.remaining == 0 and lane.sub is not None
                    and lane.partition not in self._needs_request):
                # Waiting for what was in flight elsewhere: it can come back only into a pull
                # request, and the last one may have been used up by anything (a new message, a
                # settled one sent again).
                await self._top_up(lane)
            if lane.open and not lane.clean and now >= lane.clean_at:
                if not self._transport.asks_consumers_freely():
                    self._now_clean(lane)
                elif now >= lane.clean_by:
                    log.warning("nats: %s[%d] for %s: the server still counts messages in flight elsewhere "
                                "%.0f s after the take-over; going on", self._topic, lane.partition, self._group,
                                _UNCONFIRMED_CLEAN * self._transport.ack_wait)
                    self._now_clean(lane)
                elif now >= lane.clean_check_at:
                    lane.clean_check_at = now + _CHECK_AGAIN
                    await self._check_clean(lane)
            if lane.open and lane.clean and lane.awaiting and now >= lane.floor_check_at:
                lane.floor_check_at = now + self._transport.ack_wait
                await self._prune_awaiting(lane)

    def _not_clean(self, lane: _Lane, now: float) -> None:
        """A lane left without closing hands nothing for ack_wait + 0.5 s: by then nats-server
        has redelivered what the dead owner held on 2.9, and a message it nak'ed with a shorter
        delay is back. On later servers (``asks_consumers_freely``) the server's count must then
        also say so (_check_clean), at most until ``_UNCONFIRMED_CLEAN`` times ack_wait."""
        ack_wait = self._transport.ack_wait
        lane.clean = False
        self._watched.add(lane.partition)
        lane.clean_at = now + ack_wait + 0.5
        lane.clean_by = now + _UNCONFIRMED_CLEAN * ack_wait

    def _now_clean(self, lane: _Lane) -> None:
        lane.clean = True
        if lane.items:
            self._ready_lanes.add(lane.partition)

    async def _check_clean(self, lane: _Lane) -> None:
        """A lane left without closing (its owner died, or our connection broke) is clean once
        the server counts no more messages in flight on its consumer than this member holds:
        what the dead owner held was redelivered here (or settled). Asked only after the
        ack_wait + 0.5 s of _not_clean: nats-server 2.10 and later redeliver an expired message
        up to about twice ack_wait after its last delivery (the timer alone let a later message
        overtake it), and a message the dead owner nak'ed with a delay is not always in that
        count (the count alone did: the NATS cluster's volume tier, a message nak'ed, then its
        member killed). Not on nats-server 2.9, which redelivers at ack_wait and which the
        request would slow down."""
        try:
            info = await self._transport.jsm.consumer_info(self._layout.stream,
                                                           self._layout.consumer(self._group, lane.partition))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("nats: checking what is in flight on %s[%d] failed: %r", self._topic, lane.partition, exc)
            return
        if lane.open and not lane.clean and int(info.num_ack_pending or 0) <= len(lane.items):
            self._now_clean(lane)

    async def _prune_awaiting(self, lane: _Lane) -> None:
        """Forget awaited sequences that were settled: they never come back. An owner record
        lists what the lane waited for when it was written (at take-over, a long retry, close);
        a member killed after it handled one of them leaves it listed, and without this every
        later owner of the lane would wait for it for good. Settled: the consumer's ack floor has
        passed it, and the server counts no message in flight but those this member holds (a
        message nak'ed with a delay counts until it is back; on the 2.15.3 cluster the ack floor
        alone dropped awaited messages that were still to come). Checked at most every ack_wait
        per lane that waits for something (one consumer-info request)."""
        try:
            info = await self._transport.jsm.consumer_info(self._layout.stream,
                                                           self._layout.consumer(self._group, lane.partition))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("nats: reading the consumer of %s[%d] failed: %r", self._topic, lane.partition, exc)
            return
        floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
        if int(info.num_ack_pending or 0) > len(lane.items):
            return
        settled = {seq for seq in lane.awaiting if seq <= floor and seq not in lane.items}
        if settled:
            log.info("nats: %s[%d] for %s no longer waits for %d settled message(s) up to #%d", self._topic,
                     lane.partition, self._group, len(settled), max(settled))
            lane.awaiting -= settled
            for seq in settled:
                lane.offsets.pop(seq, None)
            if lane.items:
                self._ready_lanes.add(lane.partition)

    def _wake_poll(self) -> None:
        arrival = self._arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(None)

    async def _on_message(self, msg: Msg) -> None:
        """Every answer to a lane's pull request: a message or a status."""
        try:
            if not msg.reply:
                # A status comes on the request's reply subject: <inbox>.<partition>.<epoch>.<gen>.
                part, _, rest = msg.subject[len(self._inbox) + 1:].partition(".")
                lane = self._lanes.get(int(part))
                gen = int(rest.rpartition(".")[2] or 0)
                live = lane is not None and lane.sub is not None and msg.subject.startswith(lane.sub.subject[:-1])
                self._on_status(lane if live else None, gen, msg)
                return
            # A message keeps its stream subject (<prefix>.<topic>.<partition>).
            lane = self._lanes.get(self._layout.partition_of(msg.subject))
            if lane is not None and lane.closing and not self._stopped:
                delivered, seq, dseq = _ack_fields(msg.reply)
                lane.last_dseq = max(lane.last_dseq, dseq)
                if seq not in lane.items and seq not in lane.settled_here:
                    lane.items[seq] = _Held(msg, seq, dseq, delivered, None, careful=False)
                elif seq in lane.items:
                    lane.items[seq].msg = msg
                else:
                    await self._transport.nc.publish(msg.reply, _ACK)
                return
            if lane is None or not lane.open or self._stopped:
                # Arrived for a lane this member does not read (now): hand it back at once
                # (or, a message this member settled already sent again, settle it again).
                sseq = _ack_fields(msg.reply)[1]
                settled = lane is not None and (sseq in lane.settled_here or sseq in lane.rewound)
                await self._transport.nc.publish(msg.reply, _ACK if settled else _NAK)
                return
            lane.remaining = max(0, lane.remaining - 1)
            delivered, seq, dseq = _ack_fields(msg.reply)
            last = lane.last_dseq
            if lane.left_at is not None or (last and dseq > last + 1):
                self._check_lost(lane, dseq)
            if dseq > last:
                lane.last_dseq = dseq
            current = lane.items.get(seq)
            if current is None and seq in lane.rewound:
                # Settled by another member, which saw the consumer's pointer rewound onto it.
                lane.rewound.discard(seq)
                log.warning("nats: %s[%d] sequence %d came back as new after it was settled elsewhere; dropped",
                            self._topic, lane.partition, seq)
                await self._transport.nc.publish(msg.reply, _ACK)
                return
            if current is None and seq <= lane.seen and await self._is_ghost(lane, seq, delivered, msg):
                return  # a settled message sent again (see _is_ghost)
            # nats-server 2.9.10 may send a message in flight again as new (see _count_again): one
            # delivered before (seen here, or awaited: handed back or nak'ed by the last owner), or
            # any while the lane waits for what a dead owner held.
            sent_again_as_new = (current is None and delivered == 1
                                 and (seq <= lane.seen or seq in lane.awaiting or not lane.clean)
                                 and not self._transport.asks_consumers_freely())
            lane.seen = max(lane.seen, seq)
            if current is not None:
                # Redelivered to us while we still hold it (ack_wait passed): settle the newest.
                current.msg = msg
                current.delivered = delivered
                current.dseq = dseq
                current.touched = time.monotonic()
            else:
                failures: int | None = None
                retried = lane.retried
                if lane.lost and delivered > 1 and seq not in lane.offsets and seq not in lane.awaiting:
                    lane.lost -= 1  # (most likely) sent to the last owner and lost: not an attempt
                    lane.offsets[seq] = 1
                if sent_again_as_new:
                    failures = await self._count_again(lane, seq)
                offset = lane.offsets.get(seq, 0)
                if failures is None and delivered > 1 and not (retried is not None and retried.position.seq == seq
                                                               and retried.attempt + offset == delivered):
                    failures = await self._failures_of(lane, seq, delivered)
                if not lane.open:
                    await self._transport.nc.publish(msg.reply, _NAK)
                    return
                lane.items[seq] = _Held(msg, seq, dseq, delivered, failures, careful=delivered - offset > 1)
                self._ready_lanes.add(lane.partition)
                if (lane.awaiting or not lane.clean) and lane.remaining == 0:
                    await self._top_up(lane)
            self._wake_poll()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one bad answer stop the inbox
            log.warning("nats: handling a pull answer on %s failed: %r", msg.subject, exc)

    def _check_lost(self, lane: _Lane, dseq: int) -> None:
        """A delivery of an open lane: the consumer's delivery sequence goes on from the last one
        this member received since it took the lane over (at the first, from the last owner's
        closing record's ``#<n>``) unless deliveries went elsewhere and were lost. A member that
        unsubscribes while its pull request is open can lose what the server sent just before it
        saw the unsubscribe (on a cluster, while that travels between nodes), and while that
        request still waits beside the owner's, the server serves them in turn, so the gap can
        come in the middle of a lane too. Counted as delivered, a lost message comes back only
        after ack_wait, behind what this member gets meanwhile. So with a gap an ordered lane
        waits as after a crash (_not_clean), and that many redeliveries are not counted as
        attempts."""
        left_at, lane.left_at = lane.left_at, None
        last = left_at if left_at is not None else lane.last_dseq
        if dseq <= last + 1:
            return
        lost = dseq - last - 1
        lane.lost += lost
        log.info("nats: %d delivery(ies) of %s[%d] for %s %s were lost; %s", lost, self._topic, lane.partition,
                 self._group, "to its last owner as it closed" if left_at is not None else "to another pull request",
                 "waiting for them as after a crash" if self._ordered else "they come back after ack_wait")
        if self._ordered and lane.clean:
            self._not_clean(lane, time.monotonic())

    def _rewound_subject(self) -> str:
        return f"{_REWOUND}.{self._layout.stream}.{self._layout.consumer(self._group, 0).rpartition('_')[0]}"

    async def _on_rewound(self, msg: Msg) -> None:
        """Another member of the group settled a message the consumer will deliver once more as
        new: whoever gets that copy acks it and drops it. Nothing here awaits, so this runs before
        the inbox handles the copy (the announcement precedes it on the connection)."""
        try:
            partition, seq = int(msg.subject.rpartition(".")[2]), int(msg.data)
        except ValueError:
            return
        lane = self._lanes.get(partition)
        if lane is not None and seq > lane.settled:
            lane.rewound.add(seq)
            while len(lane.rewound) > _REMEMBERED:
                lane.rewound.discard(min(lane.rewound))

    async def _announce_if_rewound(self, lane: _Lane, item: _Held) -> None:
        """nats-server 2.9.10 moves a consumer's stream pointer back by one when it takes a
        message to redeliver while every waiting pull request is dead (its member crashed or left)
        or expired (``o.sseq--`` for "redo this one", meant for a new message). With
        ``max_ack_pending = 1`` that lands on the very message being redelivered: once it is
        settled the consumer delivers it again as a *new* message (delivery count 1, ack floor
        left below it), to whichever member asks first. The member settling a redelivered message
        sees it (the consumer's delivered stream sequence is below the message) and, before its
        ack, tells the group's members, which drop that copy. One consumer-info request per
        settled redelivery; nothing for first deliveries."""
        try:
            info = await self._transport.jsm.consumer_info(self._layout.stream,
                                                           self._layout.consumer(self._group, lane.partition))
            delivered = int(info.delivered.stream_seq or 0) if info.delivered else 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("nats: checking the pointer of %s[%d] failed: %r", self._topic, lane.partition, exc)
            return
        if delivered >= item.seq:
            return
        log.warning("nats: the consumer of %s[%d] for %s was rewound onto sequence %d (delivered %d); "
                    "its copy will be dropped", self._topic, lane.partition, self._group, item.seq, delivered)
        try:
            nc = self._transport.nc
            await nc.publish(f"{self._rewound_subject()}.{lane.partition}", str(item.seq).encode())
            await nc.flush(timeout=2)  # the announcement reaches the server before the ack
        except Exception as exc:
            log.debug("nats: announcing the rewound pointer of %s[%d] failed: %r", self._topic, lane.partition, exc)

    def _attempts_key(self, partition: int, seq: int) -> str:
        return f"{self._topic}/{self._group}/{partition}/{seq}"  # '/' is in neither name

    async def _failures_of(self, lane: _Lane, seq: int, delivered: int) -> int:
        """How many of a redelivered message's earlier attempts failed, from its attempt record:
        the failures its last retry recorded, plus one when its last recorded start (a careful
        handling) ended without a settle (the member died in it). A delivery that began no
        recorded handling is not a failure: read ahead, or handed to the engine before a crash
        (in doubt — as Kafka's commits, docs/providers/nats.md). No record: none failed."""
        try:
            kv = await self._transport.failure_counts()
            entry = await kv.get(self._attempts_key(lane.partition, seq))
        except nats.js.errors.KeyNotFoundError:
            return 0
        except Exception as exc:
            log.debug("nats: reading the failed attempts of %s[%d] #%d failed: %r", self._topic, lane.partition,
                      seq, exc)
            return 0
        record = _record(entry.value)
        if record is None:
            return 0
        failures, at, started = record
        return failures + (1 if started and at < delivered else 0)

    async def _count_again(self, lane: _Lane, seq: int) -> int | None:
        """A message with a delivery count of 1 that may have been delivered before: one up to
        what this lane saw (not a ghost: not settled), one the last owner's record names, or any
        while the lane waits for what a dead owner held. nats-server 2.9.10's rewind (see
        _announce_if_rewound) sends a message still in flight again as new when it was due (a
        delayed nak, ack_wait) while only dead pull requests waited — its owner died, or closed
        the lane before a short delay ran out. If its attempt record says which delivery it was,
        this copy is the next one: its attempts and failures go on from there instead of starting
        again at 1 (the conformance state machine saw an attempt 1 after an attempt 2). One read
        of the record per such message, on 2.9 only."""
        try:
            kv = await self._transport.failure_counts()
            record = _record((await kv.get(self._attempts_key(lane.partition, seq))).value)
        except Exception:
            return None  # no record (or none readable): a first delivery as far as anyone knows
        if record is None:
            return None
        failures, at, started = record
        log.info("nats: %s[%d] sequence %d came back as new after delivery %d; counted as delivery %d",
                 self._topic, lane.partition, seq, at, at + 1)
        lane.offsets[seq] = -at  # delivery 1 of the copy is delivery at + 1
        return failures + (1 if started else 0)

    async def _record_start(self, lane: _Lane, item: _Held, failures: int) -> None:
        """Before a handler gets a redelivered message: record that this delivery began, so
        that if this member dies in it the next one counts the failure."""
        try:
            kv = await self._transport.failure_counts()
            await kv.put(self._attempts_key(lane.partition, item.seq), f"{failures}:{item.delivered}:s".encode())
        except Exception as exc:
            log.debug("nats: recording the start of %s[%d] #%d failed: %r", self._topic, lane.partition, item.seq,
                      exc)

    async def _is_ghost(self, lane: _Lane, seq: int, delivered: int, msg: Msg) -> bool:
        """A redelivery (a sequence this lane delivered before) of a message already settled:
        nats-server 2.9.10 sometimes delivers a message again after it was acked or terminated,
        its count restarted or not (seen around naks, delays and crashes, and right after an ack
        with a pull request waiting). If this member settled it, or — for one delivered again
        as new — the consumer's ack floor is past it, ack it again (so it stops holding the lane)
        and drop it. A redelivery this member did not settle is taken as such without asking the
        server: on 2.9.10 a consumer-info request slows the consumer's deliveries down (see
        docs/providers/nats.md), and after a crash every message the dead owner held is one."""
        if seq in lane.settled_here:
            floor = seq
        elif delivered > 1:
            return False
        else:
            floor = 0
        for pause in (0.0, 0.05, 0.2):
            if seq <= floor:
                break
            await asyncio.sleep(pause)  # the server applies acks in the consumer's own time
            try:
                floor = max(floor, await self._transport.ack_floor(self._layout, self._group, lane.partition))
            except MsgBrokerError as exc:
                log.warning("nats: cannot check a stale redelivery on %s[%d]: %s", self._topic, lane.partition, exc)
                return False
        if seq > floor:
            return False  # the consumer really delivers it afresh (it was reset or recreated)
        log.warning("nats: %s[%d] sequence %d came back after it was settled (ack floor %d); dropped",
                    self._topic, lane.partition, seq, floor)
        await self._transport.nc.publish(msg.reply, _ACK)
        return True

    def _on_status(self, lane: _Lane | None, gen: int, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100" or lane is None:
            return  # heartbeat, or the end of a request of a lane closed since
        try:
            # What the ended request did not bring (nats-server sends it with 408 and 409).
            lane.remaining = max(0, lane.remaining - int(headers["Nats-Pending-Messages"]))
        except (KeyError, ValueError):
            lane.remaining = 0 if gen == lane.gen else lane.remaining
        description = str(headers.get("Description", ""))
        now = time.monotonic()
        if status in ("408", "404"):
            lane.retry_at = now  # expired (or nothing right now): ask again
        elif status == "409" and "Consumer Deleted" in description:
            lane.retry_at = now + 0.5
            self._spawn(self._recreate(lane.partition))
        else:
            # 409 Server Shutdown / Exceeded MaxWaiting, 503: ask again soon, not in a loop.
            log.debug("nats: pull request on %s[%d] ended: %s %s", self._topic, lane.partition, status, description)
            lane.retry_at = now + 0.25
        if lane.open:
            self._needs_request.add(lane.partition)
        self._wake_poll()

    async def _recreate(self, partition: int) -> None:
        try:
            await self._transport.ensure_consumer(self._layout, self._group, partition)
        except Exception as exc:
            log.warning("nats: recreating the consumer of %s[%d] for %s failed: %s", self._topic, partition,
                        self._group, exc)

    async def _keep_in_progress(self) -> None:
        """``+WPI`` for every message this member has held for a while, every ack_wait/3: a long
        handler (or a message waiting behind it) on a live member is not redelivered elsewhere;
        a dead member's are, after ack_wait. Not for a lane whose lease this member has not
        renewed lately: paused past it, the lane may have a new owner already, which hands
        nothing until ack_wait after its take-over (see _take_over) — a late in-progress signal
        would keep a message away past that, and the next one overtake it."""
        interval = max(0.05, self._transport.ack_wait / 3)
        transport = self._transport
        while True:
            await asyncio.sleep(interval)
            try:
                nc = transport.nc
                now = time.monotonic()
                for lane in list(self._lanes.values()):
                    if lane.lease is not None and not transport.lease_is_fresh(lane.lease):
                        continue
                    for item in list(lane.items.values()):
                        if now - item.touched >= interval:
                            item.touched = now
                            await nc.publish(item.msg.reply, _WPI)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("nats: in-progress signal failed: %r", exc)

    # -- reading ---------------------------------------------------------------------------

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        if self._stopped:
            return []
        deadline = time.monotonic() + timeout
        wanted: set[int] | None = None
        waker: asyncio.Task[Any] | None = None
        touched: list[_Lane] = []
        try:
            while True:
                await self._maintain()
                out: list[Delivery] = []
                if self._ready_lanes:
                    wanted = wanted if wanted is not None else set(partitions)
                    taken: list[tuple[_Lane, int, int]] = []
                    for partition in [p for p in self._ready_lanes if p in wanted]:
                        self._ready_lanes.discard(partition)
                        lane = self._lanes[partition]
                        before, turn = len(out), lane.turn
                        await self._hand_out(lane, max_per_lane, out)
                        taken.append((lane, turn, len(out) - before))
                        touched.append(lane)
                    if any(lane.turn != turn for lane, turn, _ in taken):
                        # A retry on a lane while this poll awaited (a start record): the engine
                        # dropped what it held of that lane, so what was taken here goes too.
                        kept: list[Delivery] = []
                        at = 0
                        for lane, turn, count in taken:
                            if lane.turn == turn:
                                kept += out[at:at + count]
                            at += count
                        out = kept
                remaining = deadline - time.monotonic()
                if out or wake.is_set() or remaining <= 0 or self._stopped:
                    return out
                arrival = self._arrival = asyncio.get_running_loop().create_future()
                if waker is None:
                    waker = asyncio.ensure_future(wake.wait())
                # Wake up for renewals too: a request that ended is asked again within a second.
                nap = _CHECK_AGAIN if self._checks_due() else 1.0
                await asyncio.wait({arrival, waker}, timeout=min(remaining, nap), return_when=asyncio.FIRST_COMPLETED)
                self._arrival = None
        finally:
            if waker is not None:
                waker.cancel()
            for lane in touched:
                lane.polled.clear()  # returned (or cut off): the engine has them now, or never will

    def _checks_due(self) -> bool:
        if self._ready_lanes:
            return True
        lanes = self._lanes
        return any((lane := lanes.get(p)) is not None and lane.open and not lane.clean for p in self._watched)

    async def _hand_out(self, lane: _Lane, limit: int, out: list[Delivery]) -> None:
        """The lane's next messages in stream order, for an ordered lane only once every message
        of it in flight is held here (``clean``) and never past a nak'ed one that has not come
        back. A redelivery goes alone, as the next to start, its start recorded first."""
        if not lane.open or not lane.clean:
            return
        if lane.lease is not None and not self._transport.lease_is_fresh(lane.lease):
            # Not renewed lately (a pause, a slow beat): the lane may have another owner, and what
            # arrived meanwhile may be a delivery the pause kept in the socket. Handed once the
            # renewal comes (or dropped with the lane when the lease turns out lost).
            self._ready_lanes.add(lane.partition)
            return
        ordered = self._ordered
        missing = min((seq for seq in lane.awaiting if seq not in lane.items), default=None) if ordered else None
        handed = lane.handed
        count = 0
        for seq in sorted(lane.items):
            if missing is not None and seq > missing:
                break  # a message before it is still at the server (nak'ed, handed back): it comes first
            if count >= limit:
                self._ready_lanes.add(lane.partition)  # more to hand on the next poll
                break
            if seq in handed:
                continue
            item = lane.items.get(seq)
            if item is None:
                continue  # settled meanwhile (unordered: by a handler while a start was recorded)
            if item.careful:
                if ordered and (handed or count):
                    self._ready_lanes.add(lane.partition)  # after what the engine holds of the lane
                    break
                delivery = self._delivery(lane, item)
                # Until it is handed, a close undoes the recorded start (_not_started).
                started = asyncio.get_running_loop().create_future()
                lane.starting = (started, item, delivery.failures or 0)
                try:
                    await self._record_start(lane, item, delivery.failures or 0)
                finally:
                    started.set_result(None)
                item.careful = False
                if not lane.open:
                    return  # closed meanwhile: handed back, its start undone (_not_started)
                lane.starting = None
                if lane.items.get(seq) is not item:
                    return  # settled meanwhile
                item.started = delivery.failures or 0
                handed.add(seq)
                lane.polled.add(seq)
                out.append(delivery)
                count += 1
                lane.awaiting.discard(seq)
                if ordered:
                    if len(lane.items) > len(handed):
                        self._ready_lanes.add(lane.partition)
                    break
                continue
            handed.add(seq)
            lane.polled.add(seq)
            out.append(self._delivery(lane, item))
            count += 1
            lane.awaiting.discard(seq)

    def _delivery(self, lane: _Lane, item: _Held) -> Delivery:
        retried, lane.retried = lane.retried, None
        offset = lane.offsets.get(item.seq, 0)
        if retried is not None and retried.position.seq == item.seq and retried.attempt + offset == item.delivered:
            # The message this member nak'ed, straight back from the server (no delivery to
            # anyone else in between: the engine counted this attempt already): the same Delivery
            # object, so the engine still knows which attempts failed (a delay is not a failure).
            retried.position = item
            return retried
        if retried is not None and retried.position.seq != item.seq:
            lane.retried = retried  # still on its way back
        msg = item.msg
        raw = msg.headers.get(ENVELOPE_HEADER) if msg.headers else None
        envelope = decode_envelope(raw, f"nats-{self._layout.stream}-{item.seq}")
        return Delivery(
            partition=lane.partition,
            message_id=envelope.message_id,
            key=envelope.key,
            headers=envelope.headers,
            body=msg.data,
            attempt=max(1, item.delivered - offset),  # a copy the server sends again as new restarts at 1
            position=item,
            **({"failures": item.failures} if item.failures is not None else {}),
        )

    # -- settling --------------------------------------------------------------------------

    async def _settle(self, delivery: Delivery, payload: bytes, doing: str, confirm: bool = False) -> None:
        item: _Held = delivery.position
        lane = self._lanes.get(delivery.partition)
        ours = lane is not None and lane.items.get(item.seq) is item
        if lane is not None and ours:
            # Before anything awaits: a poll meanwhile must not hand it again.
            del lane.items[item.seq]  # whatever happens next, stop extending it
            lane.handed.discard(item.seq)
        if lane is not None and lane.lease is not None and not await self._transport.holds_lease(
                self._topic, self._group, lane.partition, lane.lease):
            # Paused past the lease: another member owns the lane and gets the message again;
            # this settle is dropped (docs/semantics.md rule 11), as Redis' fenced acks are.
            log.warning("nats: %s lost the lease of %s[%d]; its %s of %s is dropped", self._member, self._topic,
                        lane.partition, doing, delivery.message_id)
            return
        if lane is not None and ours and payload is not _NAK and not payload.startswith(_NAK):
            lane.offsets.pop(item.seq, None)
            lane.settled = max(lane.settled, item.seq)
            lane.settled_here.add(item.seq)
            if len(lane.settled_here) > _REMEMBERED_SETTLED:
                # Keep the newest half (sequences of one lane only grow).
                lane.settled_here = set(sorted(lane.settled_here)[_REMEMBERED_SETTLED // 2:])
            if item.delivered > 1:
                await self._announce_if_rewound(lane, item)
        try:
            if confirm:
                await self._transport.nc.request(item.msg.reply, payload, timeout=5.0)
            else:
                await self._transport.nc.publish(item.msg.reply, payload)
            if lane is not None:
                await self._top_up(lane)
        except BrokerClosedError:
            raise
        except Exception as exc:
            raise map_error(exc, f"{doing} {delivery.message_id} on {self._topic}[{delivery.partition}]") from exc

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery, _ACK, "acking")

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        # The server counts deliveries itself (num_delivered) and redelivers after the delay;
        # an ordered lane hands nothing after the message until it is back (awaiting).
        delay = (not_before - time.time()) if not_before is not None else 0.0
        payload = _NAK if delay <= 0.001 else b'-NAK {"delay":%d}' % int(delay * 1e9)
        item: _Held = delivery.position
        failures = getattr(delivery, "failures", None)  # set by the engine (msgbroker >= 0.1 with it)
        if failures is not None:
            # Recorded before the nak, so whoever gets the message next knows which attempts
            # failed (and that the next delivery began no handling yet).
            try:
                kv = await self._transport.failure_counts()
                record = f"{failures}:{item.delivered}".encode()
                await kv.put(self._attempts_key(delivery.partition, item.seq), record)
            except Exception as exc:
                log.debug("nats: recording the failed attempts of %s failed: %r", delivery.message_id, exc)
        lane = self._lanes.get(delivery.partition)
        if lane is not None and self._ordered and lane.items.get(item.seq) is item:
            # The engine drops what it holds of the lane after a retry: hand it again, after this.
            lane.handed.clear()
            lane.turn += 1
            lane.awaiting.add(item.seq)
            self._watched.add(lane.partition)
            if delay >= self._transport.ack_wait:
                # Longer than a next owner waits after our death: the owner record names it.
                del lane.items[item.seq]
                await self._write_owner_record(lane, closing=False)
                lane.items[item.seq] = item
        await self._settle(delivery, payload, "naking")
        if lane is not None:
            lane.retried = delivery
            if lane.items:
                self._ready_lanes.add(lane.partition)

    async def unread(self, deliveries: Sequence[Delivery]) -> None:
        """Read ahead, never handed to a handler: not an attempt (the lane's owner record says
        so when it is handed back), and a redelivery's recorded start did not happen."""
        for delivery in deliveries:
            item = delivery.position
            lane = self._lanes.get(delivery.partition)
            if isinstance(item, _Held) and lane is not None:
                lane.unread.add(item.seq)
            if isinstance(item, _Held) and item.delivered > 1:
                with contextlib.suppress(Exception):
                    kv = await self._transport.failure_counts()
                    await kv.put(self._attempts_key(delivery.partition, item.seq),
                                 f"{delivery.failures or 0}:{item.delivered + 1}".encode())

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        item: _Held = delivery.position
        record = dead_letter_record(letter)
        dead = self._layout.dead_letters
        try:
            await self._transport.ensure_stream(dead, None)
            # The stream sequence makes the letter's dedup id: dead-lettering the same delivery
            # twice (a TERM lost with a connection) stores it once.
            await self._transport.publish_records([record], [f"{self._layout.stream}:{self._group}:{item.seq}"])
        except MsgBrokerError:
            raise
        except Exception as exc:
            raise map_error(exc, f"dead-lettering {delivery.message_id}") from exc
        # Confirmed (rare, so the round trip is cheap): once dead_letter returns, the original
        # is settled on the server, not only in a buffer a crash would drop.
        await self._settle(delivery, _TERM, "terminating", confirm=True)
