"""A member's reader of one (topic, group): one long-lived pull request per lane, all answered
on a single inbox subscription, so polling 64 lanes costs no task per lane and no round trip
per poll.

Each open lane always has one pull request (batch 1) waiting on the server. Because the lane's
consumer has ``max_ack_pending = 1``, the server answers it with the lane's next message only
after the previous one is acked — so the request made right after a message arrives is what the
ack releases: one hop from ack to next message, and members compete message by message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nats.js.errors
from msgbroker.spi import BrokerClosedError, DeadLetter, Delivery, LaneConsumer, MsgBrokerError, dead_letter_record

from ._errors import map_error
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
_PULL_REQUEST = b'{"batch":1,"expires":%d}' % int(PULL_EXPIRES * 1e9)
_ACK, _NAK, _TERM, _WPI = b"+ACK", b"-NAK", b"+TERM", b"+WPI"
_REWOUND = "_MSGBROKER_NATS.rewound"
"""``<_REWOUND>.<stream>.<consumer group>.<partition>``, payload a stream sequence: a member tells
the group that this settled message will be delivered once more as new (see _settle)."""
_REMEMBERED = 64


def _ack_fields(reply: str) -> tuple[int, int]:
    """(deliveries, stream sequence) from a JetStream ack subject, without nats-py's full parse:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...`` (or with domain and account hash)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5])
    return int(tokens[6]), int(tokens[7])


class _Held:
    """One message this member holds (received, not settled). ``msg`` is replaced when the
    server redelivers the same message to us, so settling uses the newest delivery."""

    __slots__ = ("delivered", "failures", "msg", "seq")

    def __init__(self, msg: Msg, seq: int, delivered: int, failures: int | None = None) -> None:
        self.msg = msg
        self.seq = seq
        self.delivered = delivered
        self.failures = failures


class _Lane:
    __slots__ = ("deadline", "gen", "held", "next_subject", "open", "outstanding", "partition", "ready", "retried",
                 "retry_at", "rewound", "seen", "settled")

    def __init__(self, partition: int, next_subject: str) -> None:
        self.partition = partition
        self.next_subject = next_subject
        self.open = False
        self.gen = 0
        self.outstanding = False
        self.deadline = 0.0
        self.retry_at = 0.0
        self.ready: deque[_Held] = deque()
        self.held: dict[int, _Held] = {}
        self.retried: Delivery | None = None
        self.seen = 0  # the highest stream sequence of this lane delivered (as far as we know)
        self.settled = 0  # the highest stream sequence this member acked or terminated
        self.rewound: set[int] = set()  # settled elsewhere, announced to come back as new (see _settle)


class _LanePin:
    """``subscribe_to_partition``'s exclusive claim on its lane: a key in the pins bucket,
    created only if absent, renewed (revision-checked) every ttl/4, deleted on close; a crashed
    holder's key ages out after the bucket's TTL. Only the holder pulls the lane."""

    def __init__(self, transport: ConsumerHost, topic: str, group: str, partition: int, member: str) -> None:
        self._transport = transport
        # '/' is in neither name, so the key is one per lane; the partition is the subject's last
        # token, so members of the group can list the pins with one wildcard.
        self.key = f"{topic}/{group}.{partition}"
        self._member = member.encode()
        self.revision: int | None = None

    @property
    def held(self) -> bool:
        return self.revision is not None

    async def acquire(self) -> bool:
        kv = await self._transport.pins()
        try:
            self.revision = await kv.create(self.key, self._member)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def renew(self) -> bool:
        kv = await self._transport.pins()
        try:
            self.revision = await kv.update(self.key, self._member, last=self.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            self.revision = None
            return False
        return True

    async def release(self) -> None:
        revision, self.revision = self.revision, None
        if revision is not None:
            kv = await self._transport.pins()
            await kv.delete(self.key, last=revision)


class NatsLaneConsumer(LaneConsumer):
    """Reads the lanes of one (topic, group) for one member."""

    def __init__(self, transport: ConsumerHost, topic: str, group: str, member_id: str) -> None:
        self._transport = transport
        self._layout = transport.layout(topic)
        self._topic = topic
        self._group = group
        self._member = member_id
        self._lanes: dict[int, _Lane] = {}
        self._ready_lanes: set[int] = set()
        self._needs_request: set[int] = set()
        self._arrival: asyncio.Future[None] | None = None
        self._inbox = ""
        self._sub: Subscription | None = None
        self._rewound_sub: Subscription | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._pin: _LanePin | None = None
        self._listener: AssignmentListener | None = None
        self._pinner: asyncio.Task[None] | None = None
        self._next_sweep = 0.0
        self._stopped = False
        self._delivered_at_start: dict[int, int] = {}
        self._recreating: set[asyncio.Task[None]] = set()  # referenced until done (not collected)
        self._lane_opened = asyncio.Event()
        """Set when the engine opens a lane (``_keep_pin`` waits for its partition's)."""

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, listener: AssignmentListener, partition: int | None) -> None:
        transport = self._transport
        await transport.ensure_stream(self._layout, None)
        wanted = [partition] if partition is not None else list(range(transport.partition_count))
        delivered = await asyncio.gather(*(transport.ensure_consumer(self._layout, self._group, p) for p in wanted))
        self._delivered_at_start = dict(zip(wanted, delivered, strict=True))
        nc = transport.nc
        self._inbox = nc.new_inbox()
        try:
            self._sub = await nc.subscribe(f"{self._inbox}.>", cb=self._on_message, pending_msgs_limit=-1,
                                           pending_bytes_limit=-1)
            self._rewound_sub = await nc.subscribe(f"{self._rewound_subject()}.*", cb=self._on_rewound)
        except Exception as exc:
            raise map_error(exc, "subscribing to the pull inbox") from exc
        self._keeper = asyncio.create_task(self._keep_in_progress(), name=f"msgbroker-nats-wpi-{self._topic}")
        if partition is not None:
            self._listener = listener
            self._pin = _LanePin(transport, self._topic, self._group, partition, self._member)
            try:
                await self._pin.acquire()
            except BaseException as exc:
                await self.stop(flush=False)  # the engine never got this consumer: leave nothing running
                if isinstance(exc, Exception):
                    raise map_error(exc, f"pinning {self._topic}[{partition}] for {self._group}") from exc
                raise
            self._pinner = asyncio.create_task(self._keep_pin(partition), name=f"msgbroker-nats-pin-{self._topic}")
        else:
            self._listener = listener
            self._pinner = asyncio.create_task(self._respect_pins(), name=f"msgbroker-nats-pins-{self._topic}")

    async def _respect_pins(self) -> None:
        """A ``subscribe()`` member leaves the partitions that a ``subscribe_to_partition``
        member of the group has pinned (after settling what it holds of them), and reads them
        again when the pin goes (closed, or aged out after the crash of its holder)."""
        assert self._listener is not None
        listener = self._listener
        interval = max(0.1, self._transport.ack_wait / 4)
        left: set[int] = set()
        while True:
            await asyncio.sleep(interval)
            try:
                pinned = await self._transport.pinned_partitions(self._topic, self._group)
                for partition in sorted(pinned - left):
                    if partition in self._lanes and self._lanes[partition].open:
                        left.add(partition)
                        await listener.revoked([partition])
                for partition in sorted(left - pinned):
                    left.discard(partition)
                    await listener.assigned([partition])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("nats: reading the pins of %s for %s failed: %r", self._topic, self._group, exc)

    def _gated(self) -> bool:
        """Pinned to one partition but another member holds the pin: pull nothing."""
        return self._pin is not None and not self._pin.held

    async def _keep_pin(self, partition: int) -> None:
        """Hold, renew or wait for the pin. The engine opens a partition subscription's lane at
        once (shared assignment); while another member holds the pin this member gives the lane
        back (so it neither reads nor claims it) and takes it when the pin is free."""
        assert self._pin is not None and self._listener is not None
        pin, listener = self._pin, self._listener
        interval = max(0.05, self._transport.ack_wait / 4)
        if not pin.held:
            while not (partition in self._lanes and self._lanes[partition].open):
                self._lane_opened.clear()
                await self._lane_opened.wait()  # the engine is still opening it
            await listener.revoked([partition])
        while True:
            await asyncio.sleep(interval)
            try:
                if pin.held:
                    if not await pin.renew():
                        log.warning("nats: %s lost the pin of %s[%d] for %s", self._member, self._topic, partition,
                                    self._group)
                        await listener.revoked([partition])
                elif await pin.acquire():
                    await listener.assigned([partition])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("nats: keeping the pin of %s[%d] for %s failed: %r", self._topic, partition, self._group,
                            exc)

    async def open_lane(self, partition: int, lease: str | None) -> None:
        lane = self._lanes.get(partition)
        if lane is None:
            stream, consumer = self._layout.stream, self._layout.consumer(self._group, partition)
            lane = self._lanes[partition] = _Lane(partition, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}")
            lane.seen = self._delivered_at_start.get(partition, 0)
        lane.open = True
        self._lane_opened.set()
        if not self._gated():
            await self._request(lane)

    async def close_lane(self, partition: int) -> None:
        lane = self._lanes.get(partition)
        if lane is None:
            return
        lane.open = False
        await self._release(lane)

    async def _release(self, lane: _Lane) -> None:
        """Hand back what this member holds of the lane and never handled (a nak without delay
        redelivers it at once to another member)."""
        held = [*lane.ready, *lane.held.values()]
        lane.ready.clear()
        lane.held.clear()
        self._ready_lanes.discard(lane.partition)
        for item in held:
            with contextlib.suppress(Exception):
                await self._transport.nc.publish(item.msg.reply, _NAK)

    async def stop(self, flush: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._transport.forget(self)
        background = [t for t in (self._keeper, self._pinner) if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        sub, self._sub = self._sub, None
        rewound, self._rewound_sub = self._rewound_sub, None
        if rewound is not None:
            with contextlib.suppress(Exception):
                await rewound.unsubscribe()
        if not flush:
            # A crash: stop receiving (the server forgets our pull requests), settle nothing;
            # what we hold comes back to the others after ack_wait.
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self._wake_poll()
            return
        for lane in self._lanes.values():
            lane.open = False
            await self._release(lane)
        if sub is not None:
            with contextlib.suppress(Exception):
                # Unsubscribe and wait until the server sent all it had for us: those messages
                # reach _on_message, which hands them back, instead of waiting out ack_wait.
                await asyncio.wait_for(sub.drain(), 5.0)  # type: ignore[no-untyped-call]  # nats-py: unannotated
        with contextlib.suppress(Exception):
            await self._transport.nc.flush(timeout=2)
        if self._pin is not None:
            with contextlib.suppress(Exception):
                await self._pin.release()  # the next member takes the partition over now
        self._wake_poll()

    def reconnected(self) -> None:
        """The server forgot our pull requests: ask again on every open lane."""
        for lane in self._lanes.values():
            if lane.open:
                lane.outstanding = False
                lane.retry_at = 0.0
                self._needs_request.add(lane.partition)
        self._wake_poll()

    # -- pull requests ---------------------------------------------------------------------

    async def _request(self, lane: _Lane) -> None:
        lane.gen += 1
        lane.outstanding = True
        lane.deadline = time.monotonic() + PULL_EXPIRES + 2.0
        self._needs_request.discard(lane.partition)
        try:
            await self._transport.nc.publish(lane.next_subject, _PULL_REQUEST,
                                             reply=f"{self._inbox}.{lane.partition}.{lane.gen}")
        except Exception as exc:
            lane.outstanding = False
            self._needs_request.add(lane.partition)
            raise map_error(exc, f"pulling from {self._topic}[{lane.partition}]") from exc

    async def _maintain(self) -> None:
        """Renew pull requests that ended (expired, refused, lost with a reconnect)."""
        if self._gated():
            return
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            for lane in self._lanes.values():
                if lane.open and lane.outstanding and now > lane.deadline:
                    lane.outstanding = False  # no answer at all: the request is gone
                    self._needs_request.add(lane.partition)
        for partition in list(self._needs_request):
            wanting = self._lanes.get(partition)
            if wanting is None or not wanting.open or wanting.outstanding:
                self._needs_request.discard(partition)
            elif now >= wanting.retry_at:
                await self._request(wanting)

    def _wake_poll(self) -> None:
        arrival = self._arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(None)

    async def _on_message(self, msg: Msg) -> None:
        """Every answer to every lane's pull request: a message or a status."""
        try:
            if not msg.reply:
                # A status comes on our inbox subject: <inbox>.<partition>.<request generation>.
                part, _, gen = msg.subject[len(self._inbox) + 1:].partition(".")
                self._on_status(self._lanes.get(int(part)), int(gen or 0), msg)
                return
            # A message keeps its stream subject (<prefix>.<topic>.<partition>).
            lane = self._lanes.get(self._layout.partition_of(msg.subject))
            if lane is None or not lane.open or self._stopped or self._gated():
                # Arrived for a lane this member does not read (now): hand it back at once
                # (or, a message this member settled already sent again, settle it again).
                sseq = _ack_fields(msg.reply)[1]
                settled = lane is not None and (sseq <= lane.settled or sseq in lane.rewound)
                await self._transport.nc.publish(msg.reply, _ACK if settled else _NAK)
                return
            lane.outstanding = False  # a batch-1 request is used up by its message
            delivered, seq = _ack_fields(msg.reply)
            current = lane.held.get(seq) or next((h for h in lane.ready if h.seq == seq), None)
            if current is None and seq in lane.rewound:
                # Settled by another member, which saw the consumer's pointer rewound onto it.
                lane.rewound.discard(seq)
                log.warning("nats: %s[%d] sequence %d came back as new after it was settled elsewhere; dropped",
                            self._topic, lane.partition, seq)
                await self._transport.nc.publish(msg.reply, _ACK)
                if not lane.outstanding and not self._gated():
                    await self._request(lane)
                return
            if current is None and seq <= lane.seen and await self._is_ghost(lane, seq, msg):
                return  # a settled message sent again (see _is_ghost)
            lane.seen = max(lane.seen, seq)
            if current is not None:
                # Redelivered to us while we still hold it (ack_wait passed): settle the newest.
                current.msg = msg
                current.delivered = delivered
            else:
                failures = None
                retried = lane.retried
                if delivered > 1 and not (retried is not None and retried.position.seq == seq
                                          and retried.attempt == delivered):
                    failures = await self._failures_of(lane, seq, delivered)
                lane.ready.append(_Held(msg, seq, delivered, failures))
                self._ready_lanes.add(lane.partition)
            if not lane.outstanding and not self._gated():
                # Ask for the next one now: the server answers when this one is acked.
                await self._request(lane)
            self._wake_poll()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one bad answer stop the inbox
            log.warning("nats: handling a pull answer on %s failed: %r", msg.subject, exc)

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

    async def _failures_of(self, lane: _Lane, seq: int, delivered: int) -> int | None:
        """How many of a redelivered message's earlier attempts failed, from the record its last
        nak left: the failures then, plus every delivery since that ended without a nak (a
        crashed member). None when there is no record (the engine then counts them all)."""
        try:
            kv = await self._transport.failure_counts()
            entry = await kv.get(self._attempts_key(lane.partition, seq))
        except nats.js.errors.KeyNotFoundError:
            return None
        except Exception as exc:
            log.debug("nats: reading the failed attempts of %s[%d] #%d failed: %r", self._topic, lane.partition,
                      seq, exc)
            return None
        try:
            failures, at = (int(x) for x in (entry.value or b"").decode().split(":"))
        except ValueError:
            return None
        return failures + max(0, delivered - 1 - at)

    async def _is_ghost(self, lane: _Lane, seq: int, msg: Msg) -> bool:
        """A redelivery (a sequence this lane delivered before) of a message already settled:
        nats-server 2.9.10 sometimes delivers a message again after it was acked or terminated,
        its count restarted or not (seen around naks, delays and crashes, and right after an ack
        with a pull request waiting). If this member settled it, or the consumer's ack floor is
        past it, ack it again (so it stops holding the lane) and drop it."""
        floor = lane.settled  # settled here: no need to ask
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
        if not lane.outstanding and not self._gated():
            await self._request(lane)
        return True

    def _on_status(self, lane: _Lane | None, gen: int, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100" or lane is None or gen != lane.gen:
            return  # heartbeat, or the end of a request we already replaced
        lane.outstanding = False
        description = str(headers.get("Description", ""))
        now = time.monotonic()
        if status in ("408", "404"):
            lane.retry_at = now  # expired (or nothing right now): ask again
        elif status == "409" and "Consumer Deleted" in description:
            lane.retry_at = now + 0.5
            task = asyncio.ensure_future(self._recreate(lane.partition))
            self._recreating.add(task)
            task.add_done_callback(self._recreating.discard)
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
        """``+WPI`` for every message this member holds, every ack_wait/3: a long handler on a
        live member is not redelivered elsewhere; a dead member's message is after ack_wait."""
        interval = max(0.05, self._transport.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                nc = self._transport.nc
                for lane in list(self._lanes.values()):
                    for item in [*lane.ready, *lane.held.values()]:
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
        try:
            while True:
                await self._maintain()
                out: list[Delivery] = []
                if self._ready_lanes:
                    wanted = wanted if wanted is not None else set(partitions)
                    for partition in [p for p in self._ready_lanes if p in wanted]:
                        lane = self._lanes[partition]
                        for _ in range(max_per_lane):
                            if not lane.ready:
                                break
                            item = lane.ready.popleft()
                            lane.held[item.seq] = item
                            out.append(self._delivery(lane, item))
                        if not lane.ready:
                            self._ready_lanes.discard(partition)
                remaining = deadline - time.monotonic()
                if out or wake.is_set() or remaining <= 0 or self._stopped:
                    return out
                arrival = self._arrival = asyncio.get_running_loop().create_future()
                if waker is None:
                    waker = asyncio.ensure_future(wake.wait())
                # Wake up for renewals too: a request that ended is asked again within a second.
                await asyncio.wait({arrival, waker}, timeout=min(remaining, 1.0),
                                   return_when=asyncio.FIRST_COMPLETED)
                self._arrival = None
        finally:
            if waker is not None:
                waker.cancel()

    def _delivery(self, lane: _Lane, item: _Held) -> Delivery:
        retried, lane.retried = lane.retried, None
        if retried is not None and retried.position.seq == item.seq and retried.attempt == item.delivered:
            # The message this member nak'ed, straight back from the server (no delivery to
            # anyone else in between: the engine counted this attempt already): the same Delivery
            # object, so the engine still knows which attempts failed (a delay is not a failure).
            retried.position = item
            return retried
        msg = item.msg
        raw = msg.headers.get(ENVELOPE_HEADER) if msg.headers else None
        envelope = decode_envelope(raw, f"nats-{self._layout.stream}-{item.seq}")
        return Delivery(
            partition=lane.partition,
            message_id=envelope.message_id,
            key=envelope.key,
            headers=envelope.headers,
            body=msg.data,
            attempt=item.delivered,
            position=item,
            **({"failures": item.failures} if item.failures is not None else {}),
        )

    # -- settling --------------------------------------------------------------------------

    async def _settle(self, delivery: Delivery, payload: bytes, doing: str, confirm: bool = False) -> None:
        item: _Held = delivery.position
        lane = self._lanes.get(delivery.partition)
        if lane is not None:
            lane.held.pop(item.seq, None)  # whatever happens next, stop extending it
            if payload is not _NAK and not payload.startswith(_NAK):
                lane.settled = max(lane.settled, item.seq)
                if item.delivered > 1:
                    await self._announce_if_rewound(lane, item)
        try:
            if confirm:
                await self._transport.nc.request(item.msg.reply, payload, timeout=5.0)
            else:
                await self._transport.nc.publish(item.msg.reply, payload)
        except BrokerClosedError:
            raise
        except Exception as exc:
            raise map_error(exc, f"{doing} {delivery.message_id} on {self._topic}[{delivery.partition}]") from exc

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery, _ACK, "acking")

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        # The server counts deliveries itself (num_delivered); the nak holds the lane until the
        # message is redelivered (max_ack_pending=1), after the delay when there is one.
        delay = (not_before - time.time()) if not_before is not None else 0.0
        payload = _NAK if delay <= 0.001 else b'-NAK {"delay":%d}' % int(delay * 1e9)
        failures = getattr(delivery, "failures", None)  # set by the engine (msgbroker >= 0.1 with it)
        if failures is not None:
            # Recorded before the nak, so whoever gets the message next knows which attempts
            # failed; without the record the next member counts every delivery as failed.
            item: _Held = delivery.position
            try:
                kv = await self._transport.failure_counts()
                record = f"{failures}:{delivery.attempt}".encode()
                await kv.put(self._attempts_key(delivery.partition, item.seq), record)
            except Exception as exc:
                log.debug("nats: recording the failed attempts of %s failed: %r", delivery.message_id, exc)
        await self._settle(delivery, payload, "naking")
        lane = self._lanes.get(delivery.partition)
        if lane is not None:
            lane.retried = delivery

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
