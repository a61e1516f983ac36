"""One member of a group: its own connection, membership over a fanout exchange, exclusive
lane leases (exclusive queues) and one channel per owned lane.

Everything a member holds on the server — its lease queues, consumers and unacked deliveries —
lives on its connection, so when the member dies (or its connection does) RabbitMQ frees the
leases and returns the unsettled messages to the head of their lane queues at once.

When the server refuses the member's credentials or a permission it needs (``AccessDeniedError``),
the member does nothing more on the server: its next poll raises the refusal, and the engine
stops the subscription like a crash (docs/semantics.md rule 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, cast

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq import exceptions as amqp
from aiormq.abc import DeliveredMessage
from msgbroker.spi import (
    CONTENT_TYPE,
    AccessDeniedError,
    DeadLetter,
    Delivery,
    LaneConsumer,
    PublishFailedError,
    dead_letter_headers,
    dead_letter_record,
    failures_since,
)
from pamqp import commands as spec

from ._compat import is_consuming
from ._declare import backlog_exists, declare_group, declare_topic
from ._errors import translate
from ._host import MemberHost
from ._link import Link
from ._publish import KEY_HEADER, PERSISTENT, PUBLISH_TIMEOUT, REFUSED_BACKOFF, publish_confirmed

if TYPE_CHECKING:
    from msgbroker.spi import AssignmentListener

__all__ = ["RabbitMQLaneConsumer", "delivery_headers", "letter_headers"]

log = logging.getLogger("msgbroker.rabbitmq")

CANCEL_CHECK = 0.25
"""How often a poll checks that the server did not cancel a lane's consumer (its queue deleted):
a check of every owned lane, so not at every poll — with 1,024 lanes that was 4 ms per message."""
SHORT_CHANNELS = 128
"""At most this many channels opened for one look (a lane's retry note, its backlog) at a time:
with 1,024 lanes, their own channels and one such channel each went past the server's
``channel_max`` (2,047), which closes the whole connection."""

def _power_of_ten(tag: int) -> bool:
    return tag >= 10 and str(tag).rstrip("0") == "1"


async def _nothing() -> None:
    """What a consumer callback returns once it has done its work (see _on_push)."""
    return None


_BROKER_HEADERS = frozenset({
    KEY_HEADER, "x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue",
    "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason",
})


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return None


def delivery_headers(raw: dict[str, Any] | None) -> dict[str, str]:
    """The application's headers of an AMQP message (the provider's and the broker's removed)."""
    out: dict[str, str] = {}
    for name, value in (raw or {}).items():
        if name in _BROKER_HEADERS:
            continue
        text = _text(value)
        if text is not None:
            out[name] = text
    return out


def letter_headers(letter: DeadLetter) -> dict[str, str]:
    """The AMQP headers of a letter in the group's letters queue: its ``<topic>.dlq`` record's
    headers (msgbroker.wire) and, as on every message, the partition key."""
    return {**dead_letter_headers(letter), KEY_HEADER: letter.partition_key}


def _handed_back(note: dict[str, Any] | None, message_id: str) -> dict[str, Any] | None:
    """The note's entry for ``message_id`` handed back unhandled by an earlier owner, if any."""
    if note is None:
        return None
    entries = note.get("unread")
    entry = entries.get(message_id) if isinstance(entries, dict) else None
    return entry if isinstance(entry, dict) else None


def _settled(lane: _Lane, message_id: str) -> None:
    entries = (lane.note or {}).get("unread")
    if isinstance(entries, dict) and message_id in entries:
        lane.settled.add(message_id)


@dataclass(eq=False)
class _Lane:
    """An owned lane on this member: its channel, what the broker pushed and what is out."""

    partition: int
    token: str | None
    generation: int
    channel: AbstractChannel
    raw: aiormq.abc.AbstractChannel
    phase: Literal["backlog", "main"] = "backlog"
    consumer_tag: str | None = None
    incoming: deque[DeliveredMessage] = field(default_factory=deque)
    outstanding: dict[int, Delivery] = field(default_factory=dict)
    acks: list[int] = field(default_factory=list)
    dead: bool = False
    closing: bool = False
    backlog_checked: bool = False
    note: dict[str, Any] | None = None
    """The lane's note as this member last read or wrote it (see :meth:`RabbitMQLaneConsumer._to_delivery`)."""
    note_declared: bool = False
    counts: dict[int, int] = field(default_factory=dict)
    """Per delivery tag: the message's ``x-delivery-count`` as it arrived."""
    settled: set[str] = field(default_factory=set)
    """Message ids of the note's handed-back entries settled here: the next note leaves them out."""
    handed_back: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Entries for the note written when the lane closes: deliveries the engine handed back
    (:meth:`RabbitMQLaneConsumer.unread`), by message id."""
    returned: list[DeliveredMessage] = field(default_factory=list)
    """Pushed while the lane was closing: never taken, they go back with the channel."""
    last_get_tag: int = 0
    """The delivery tag of the last message read from the backlog (``basic.get``): every tag up
    to it is the backlog's, since the lane queue's consumer starts once the backlog is empty."""


class RabbitMQLaneConsumer(LaneConsumer):
    """A member of ``group`` on ``topic`` (see the module docstring)."""

    OPENS_AT_ONCE = 16
    """Opening a lane opens its channel, sets its prefetch and reads its retry note (round trips
    each): one after another, a member's first message of a drain on 64 lanes came 80-110 ms
    later than with 16 at once (docs/benchmarks.md, the drain's notes)."""

    def __init__(self, transport: MemberHost, topic: str, group: str, member_id: str) -> None:
        self._transport = transport
        self._topology = transport.topology
        self._partitions = transport.settings.partition_count
        self._prefetch = transport.settings.rabbitmq.prefetch
        self.topic = topic
        self.group = group
        self.member_id = member_id
        self._link: Link | None = None
        self._lanes: dict[int, _Lane] = {}
        self._busy: set[_Lane] = set()
        """Lanes a poll has work for: reading the backlog, pushed messages not taken yet, acks to
        send. A poll looks at these (and at every lane only every :data:`CANCEL_CHECK`), so its
        cost follows the traffic, not the number of lanes."""
        self._cancel_check_at = 0.0
        self._short_channels = asyncio.Semaphore(SHORT_CHANNELS)
        self._arrived = asyncio.Event()
        self._seen: dict[str, float] = {}
        self._joined: float | None = None
        """When this member first joined (epoch seconds; census answers carry it for describe)."""
        self._tokens: dict[int, str] = {}
        self._lost: set[int] = set()
        self._control: aiormq.abc.AbstractChannel | None = None
        self._membership: aiormq.abc.AbstractChannel | None = None
        self._lease_channel: aiormq.abc.AbstractChannel | None = None
        self._admin_channel: aiormq.abc.AbstractChannel | None = None
        self._stopped = False
        self._background: set[asyncio.Task[Any]] = set()
        self._refusal: AccessDeniedError | None = None
        """The server refused this member's credentials or a permission: raised by the next poll."""

    # -- connection and membership ----------------------------------------------------------

    @property
    def link(self) -> Link:
        if self._link is None:
            raise RuntimeError("the member has not started")
        return self._link

    async def start(self, listener: AssignmentListener, partition: int | None) -> None:
        self._transport.register_member(self)
        self._transport.run_mover(self.topic)  # due scheduled messages move while a member runs
        self._link = Link(
            self._transport.urls,
            f"msgbroker-member {self.topic}/{self.group}/{self.member_id}",
            heartbeat=self._transport.amqp_heartbeat,
            on_up=self._restore,
            on_down=self._down,
            on_refused=self._refused,
            ssl_context=self._transport.ssl_context,
        )
        try:
            await self._link.open()
            await declare_topic(self._link, self._topology, self.topic, self._partitions)
            await declare_group(self._link, self._topology, self.topic, self.group, self._partitions)
            try:
                await self._join()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise translate(exc, f"joining group {self.group!r} on topic {self.topic!r}") from exc
        except BaseException:
            self._stopped = True
            await self._link.close()
            self._transport.unregister_member(self)
            raise

    async def _restore(self) -> None:
        """After a reconnect: the group's queues again (a restarted server keeps durable ones;
        declaring is idempotent) and a fresh membership queue."""
        link = self.link
        self._control = self._membership = self._lease_channel = self._admin_channel = None
        await declare_topic(link, self._topology, self.topic, self._partitions)
        await declare_group(link, self._topology, self.topic, self.group, self._partitions)
        await self._join()

    def _refused(self, exc: AccessDeniedError) -> None:
        """The server refused a credential or permission for good: the next poll raises it."""
        if self._refusal is None:
            self._refusal = exc
        self._arrived.set()

    def _refused_if_denied(self, exc: BaseException, doing: str) -> BaseException:
        """``exc`` as msgbroker's error; a refusal is also kept for the next poll."""
        error = translate(exc, doing)
        if isinstance(error, AccessDeniedError):
            self._refused(error)
        return error

    def _down(self) -> None:
        """The connection is gone: every lease, consumer and unacked delivery went with it."""
        self._control = self._membership = self._lease_channel = self._admin_channel = None
        for lane in self._lanes.values():
            lane.dead = True
            lane.incoming.clear()
            self._lost.add(lane.partition)
        self._arrived.set()

    async def _join(self) -> None:
        """Bind a fresh exclusive auto-delete queue to the members exchange, consume it, beat.
        Its name is new at every join: the server may still hold the one of a connection it has
        not noticed dead yet."""
        _, raw = await self.link.channel(confirms=True)
        self._membership = raw
        exchange = self._topology.members_exchange(self.topic, self.group)
        await raw.exchange_declare(exchange, exchange_type="fanout", durable=True)
        queue = self._topology.member_queue(self.topic, self.group, self.member_id, uuid.uuid4().hex[:8])
        await raw.queue_declare(queue, exclusive=True, auto_delete=True)
        await raw.queue_bind(queue, exchange, routing_key="")
        await raw.basic_consume(queue, self._on_member_message, no_ack=True)
        if self._joined is None:
            self._joined = time.time()
        await self._announce("beat", None)

    async def _control_raw(self) -> aiormq.abc.AbstractChannel:
        """The confirm channel letters and retry notes are published on (reopened when closed)."""
        raw = self._control
        if raw is None or raw.is_closed:
            _, raw = await self.link.channel(confirms=True)
            self._control = raw
        return raw

    async def _announce(self, kind: str, ttl: float | None) -> None:
        raw = self._membership
        if raw is None or raw.is_closed:
            return
        body = json.dumps({"kind": kind, "member": self.member_id}).encode()
        expiration = str(max(1, int((ttl or self._transport.lease_ttl()) * 1000)))
        await raw.basic_publish(
            body,
            exchange=self._topology.members_exchange(self.topic, self.group),
            routing_key="",
            properties=spec.Basic.Properties(message_type=kind, expiration=expiration, content_type="application/json"),
        )

    async def _on_member_message(self, message: DeliveredMessage) -> None:
        try:
            data = json.loads(message.body)
            kind, member = str(data["kind"]), str(data.get("member", ""))
        except (ValueError, KeyError, TypeError):
            return
        if kind == "beat" and member != self.member_id:
            new = member not in self._seen
            self._seen[member] = time.monotonic()
            if new:
                self._spawn(self._announce("beat", None))  # let the newcomer see us at once
        elif kind == "leave":
            self._seen.pop(member, None)
        elif kind == "census":
            reply_to = message.header.properties.reply_to
            if reply_to:
                self._spawn(self._answer_census(reply_to))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are best effort

    def in_flight(self) -> dict[int, int]:
        """Per owned lane: deliveries pushed to this member and not settled yet."""
        return {p: len(lane.outstanding) + len(lane.incoming) for p, lane in self._lanes.items() if not lane.dead}

    def members(self, ttl: float) -> list[str]:
        now = time.monotonic()
        for member in [m for m, at in self._seen.items() if now - at > ttl]:
            del self._seen[member]
        return sorted({*self._seen, self.member_id})

    async def _answer_census(self, reply_to: str) -> None:
        raw = self._membership
        if raw is None or raw.is_closed:
            return
        ttl = self._transport.lease_ttl()
        body = json.dumps({"member": self.member_id, "members": self.members(ttl), "joined": self._joined,
                           "lanes": {str(p): n for p, n in self.in_flight().items()}}).encode()
        # The census's queue is bound to the direct exchange under its name; an earlier version
        # asked through direct reply-to, which is answered through the default exchange.
        exchange = "" if reply_to.startswith("amq.rabbitmq.reply-to") else self._topology.direct_exchange()
        await raw.basic_publish(body, exchange=exchange, routing_key=reply_to)

    async def heartbeat(self, ttl: float) -> list[str]:
        """Announce this member; the live members as heard within ``ttl``."""
        if self.link.is_up and self._refusal is None:
            try:
                if self._membership is None or self._membership.is_closed:
                    await self._join()  # its channel died: the membership queue went with it
                await self._announce("beat", ttl)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = self._refused_if_denied(exc, f"the heartbeat of {self.member_id}")
                log.info("rabbitmq: heartbeat of %s failed: %s", self.member_id, error)
        return self.members(ttl)

    async def leave(self) -> None:
        with contextlib.suppress(Exception):
            await self._announce("leave", None)

    # -- leases ------------------------------------------------------------------------------

    async def _lease_raw(self) -> aiormq.abc.AbstractChannel:
        """The channel lease declarations go through (a refused one closes it)."""
        raw = self._lease_channel
        if raw is None or raw.is_closed:
            _, raw = await self.link.channel()
            self._lease_channel = raw
        return raw

    async def _admin_raw(self) -> aiormq.abc.AbstractChannel:
        """A channel of its own for deleting leases, so that a refused declaration running at the
        same time cannot close it under a release."""
        raw = self._admin_channel
        if raw is None or raw.is_closed:
            _, raw = await self.link.channel()
            self._admin_channel = raw
        return raw

    async def acquire(self, partition: int) -> str | None:
        """Declare the lane's exclusive queue: only one connection can hold it. Once the server
        refused this member for good, the lane is reported taken without asking the server, so
        that the engine's next poll of it meets the refusal and stops the subscription."""
        link = self.link
        if self._refusal is not None:
            token = f"{self.member_id}/refused/{uuid.uuid4().hex[:8]}"
            self._tokens[partition] = token
            return token
        if not link.is_up:
            return None
        generation = link.generation
        try:
            raw = await self._lease_raw()
            await raw.queue_declare(self._topology.lease_queue(self.topic, self.group, partition),
                                    exclusive=True, auto_delete=False, durable=False)
        except amqp.ChannelLockedResource:
            return None  # another member's connection holds it
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._refused_if_denied(exc, f"taking the lease of {self.topic}[{partition}]") from exc
        if generation != link.generation:
            return None
        token = f"{self.member_id}/{generation}/{uuid.uuid4().hex[:8]}"
        self._tokens[partition] = token
        self._lost.discard(partition)
        return token

    async def renew(self, partition: int, token: str) -> bool:
        """Still held: same connection generation, and the lane's channel did not die. A lane
        given up here while the connection lives is released at once (closed, lease deleted)."""
        link = self.link
        if self._tokens.get(partition) != token:
            return False
        if self._refusal is not None:
            return True  # kept until the engine's next poll meets the refusal and stops
        if link.is_up and token.split("/")[1] == str(link.generation) and partition not in self._lost:
            return True
        self._tokens.pop(partition, None)
        lane = self._lanes.pop(partition, None)
        if lane is not None:
            await self._close_lane(lane, flush=False)
        await self._delete_lease(partition, token)
        return False

    async def release(self, partition: int, token: str) -> None:
        if self._tokens.get(partition) != token:
            return
        self._tokens.pop(partition, None)
        await self._delete_lease(partition, token)

    async def _delete_lease(self, partition: int, token: str) -> None:
        link = self.link
        if not link.is_up or token.split("/")[1] != str(link.generation):
            return  # the lease queue died with its connection
        name = self._topology.lease_queue(self.topic, self.group, partition)
        for _ in range(2):  # once more on a fresh channel if the first one failed
            try:
                raw = await self._admin_raw()
                await raw.queue_delete(name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("rabbitmq: releasing %s failed: %s", name, exc)

    # -- lanes -------------------------------------------------------------------------------

    async def open_lane(self, partition: int, lease: str | None) -> None:
        link = self.link
        if self._refusal is not None:
            return  # the next poll raises the refusal
        try:
            channel, raw = await link.channel()
            await raw.basic_qos(prefetch_count=self._prefetch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = self._refused_if_denied(exc, f"opening {self.topic}[{partition}]")
            log.warning("rabbitmq: opening %s[%d] failed (%s); it is taken again later", self.topic, partition, error)
            self._lost.add(partition)
            return
        lane = _Lane(partition, lease, link.generation, channel, raw)
        try:
            async with self._short_channels:
                lane.note = await self._read_note(partition)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = self._refused_if_denied(exc, f"reading the retry note of {self.topic}[{partition}]")
            log.warning("rabbitmq: reading the retry note of %s[%d] failed (%s); it is taken again later",
                        self.topic, partition, error)
            with contextlib.suppress(Exception):
                await channel.close()
            self._lost.add(partition)
            return

        def closed(_sender: Any, _exc: BaseException | None = None) -> None:
            if not lane.closing:
                log.warning("rabbitmq: the channel of %s[%d] closed: %s", self.topic, partition, _exc)
                lane.dead = True
                lane.incoming.clear()
                self._lost.add(partition)
                self._arrived.set()

        channel.close_callbacks.add(closed)
        self._lanes[partition] = lane
        self._busy.add(lane)  # its backlog is read first

    async def close_lane(self, partition: int) -> None:
        lane = self._lanes.pop(partition, None)
        if lane is not None:
            await self._close_lane(lane, flush=True)

    async def _close_lane(self, lane: _Lane, flush: bool) -> None:
        """Send the acks, note what goes back unhandled, then close the channel: what is still
        unacked goes back to the head of the queue in order. No ``basic.cancel`` first: with
        more than one message in flight, deliveries the server had sent before it acknowledged
        the cancel reached no consumer (aiormq drops them) and were requeued *ahead* of the
        unacked ones returned by the close — a lane's messages out of order for the next owner
        (the conformance case ``close_under_load`` with ``prefetch`` 32: 6 in 12 runs). Pushes
        arriving meanwhile are held unhandled; closing the channel ends the consumer and returns
        everything at once (and a cancel while holding deliveries is what spring-amqp#2482 warns of)."""
        lane.closing = True
        raw = lane.raw
        noting = False
        if not lane.dead and not raw.is_closed:
            with contextlib.suppress(Exception):
                if flush:
                    await self._send_acks(lane)
            if flush and not lane.dead and not raw.is_closed:
                noting = True
                await self._note_handed_back(lane)
                await self._hand_back_backlog(lane)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(lane.channel.close(), 5.0)
        if noting and (lane.incoming or lane.returned):
            # Pushed after the last note, before the close's answer (the acks made room): noted
            # now, before the lease goes, so the next owner reads them.
            await self._note_handed_back(lane, late=True)

    @staticmethod
    def _holds_backlog(lane: _Lane) -> bool:
        """Whether the server still counts a backlog message as the lane's (not settled, or its
        ack not sent yet). RabbitMQ 3.10 returns the messages a dead member took with
        ``basic.get`` in the text order of their delivery tags (see :meth:`_hand_back_backlog`),
        which is their order only while the tags have the same number of digits: a lane takes a
        tag with one digit more (10, 100, 1000, ...) only once it holds none of the backlog."""
        last = lane.last_get_tag
        return any(tag <= last for tag in lane.outstanding) or any(tag <= last for tag in lane.acks)

    async def _hand_back_backlog(self, lane: _Lane) -> None:
        """Return what the lane holds of the backlog, in order, before its channel closes.
        RabbitMQ 3.10 puts messages taken with ``basic.get`` back in the order of their delivery
        tags *as text* when their channel closes (1, 10, 11, ..., 19, 2, 20, ...), so a lane
        handed over while it held 29 backlog messages reached its next owner as 9-18, 1, 19-28,
        2, ... One ``basic.nack`` of them all (``multiple``, requeue) keeps their order. The tags
        up to the highest held are all the backlog's, and those acked are acked already."""
        held = [tag for tag in lane.outstanding if tag <= lane.last_get_tag]
        if held:
            with contextlib.suppress(Exception):  # the close returns them (out of order) instead
                await lane.raw.basic_nack(max(held), multiple=True, requeue=True)

    async def _send_acks(self, lane: _Lane) -> None:
        tags, lane.acks = sorted(lane.acks), []
        if not tags:
            return
        unsettled = [*lane.outstanding, *(m.delivery_tag or 0 for m in lane.incoming)]
        if not unsettled or min(unsettled) > tags[-1]:
            await lane.raw.basic_ack(tags[-1], multiple=True, wait=False)  # one frame settles them all
            return
        for tag in tags:
            await lane.raw.basic_ack(tag, wait=False)

    async def _read_note(self, partition: int) -> dict[str, Any] | None:
        """The lane's retry note left by an earlier owner (read, and left in place)."""
        channel, raw = await self.link.channel()
        try:
            try:
                await raw.queue_declare(self._topology.note_queue(self.topic, self.group, partition), passive=True)
            except amqp.ChannelNotFoundEntity:
                return None  # nothing on this lane was ever retried
            message = await raw.basic_get(self._topology.note_queue(self.topic, self.group, partition), no_ack=False)
            if isinstance(message.delivery, spec.Basic.GetEmpty):
                return None
            with contextlib.suppress(ValueError, TypeError):
                note = json.loads(message.body)
                if isinstance(note, dict):
                    return note
            return None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()  # the note goes back in place

    def _to_delivery(self, lane: _Lane, message: DeliveredMessage) -> Delivery:
        properties = message.header.properties
        raw_headers = properties.headers or {}
        count = raw_headers.get("x-delivery-count")
        returns = count if isinstance(count, int) else 0
        attempt = returns + 1
        not_before: float | None = None
        failures: int | None = None
        note = lane.note
        message_id = properties.message_id or ""
        back = _handed_back(note, message_id)
        if back is not None and returns > int(back.get("count", 0)):
            # Handed back by an owner that never handed this attempt to a handler: that return is
            # no delivery (docs/semantics.md rule 3); every further return counts one.
            handed = int(back.get("attempt", 1))
            attempt = handed + returns - int(back.get("count", 0)) - 1
            recorded = back.get("failures")
            failures = failures_since(recorded if isinstance(recorded, int) else None, handed, attempt)
            not_before = back.get("not_before")
        elif note is not None and note.get("message_id") == message_id and returns > int(note.get("count", 0)):
            # Retried by an owner that then died or handed the lane over: the noted attempt was
            # handed out unless the owner was still waiting out the noted delay; every further
            # return counts one more delivery.
            not_before = note.get("not_before")
            waiting = isinstance(not_before, (int, float)) and time.time() < not_before
            noted = int(note.get("attempt", 0)) + (0 if waiting else 1)
            attempt = max(attempt, noted + returns - int(note.get("count", 0)) - 1)
            recorded = note.get("failures")
            if isinstance(recorded, int):
                failures = failures_since(recorded, int(note.get("attempt", 0)), attempt)
        tag = message.delivery_tag or 0
        lane.counts[tag] = returns
        delivery = Delivery(
            partition=lane.partition,
            message_id=message_id,
            key=_text(raw_headers.get(KEY_HEADER)) or "",
            headers=delivery_headers(raw_headers),
            body=message.body,
            attempt=attempt,
            position=(lane, tag),
            not_before=float(not_before) if isinstance(not_before, (int, float)) else None,
            failures=failures,
        )
        lane.outstanding[tag] = delivery
        return delivery

    def _on_push(self, lane: _Lane) -> Any:
        """The lane's consumer callback. It does its work when called, not in the coroutine it
        returns: aiormq calls it as it reads the delivery and runs that coroutine as a task of the
        channel, which the channel's close cancels. A push read just before the close's answer
        was so never seen; RabbitMQ counted its return as a delivery, and the next owner handed
        it as one attempt more (the conformance volume case, seed 30248668: a message
        dead-lettered after 2 failures and no crash)."""

        def pushed(message: DeliveredMessage) -> Coroutine[Any, Any, None]:
            if lane.dead:
                return _nothing()  # its channel is gone: the message is back in the queue
            if lane.closing or self._lanes.get(lane.partition) is not lane:
                lane.returned.append(message)  # unacked: handed back when the lane's channel closes
                return _nothing()
            incoming = lane.incoming
            incoming.append(message)
            self._busy.add(lane)
            if len(incoming) > 1 and (incoming[-2].delivery_tag or 0) > (message.delivery_tag or 0):
                incoming_sorted = sorted(incoming, key=lambda m: m.delivery_tag or 0)  # keep delivery order
                incoming.clear()
                incoming.extend(incoming_sorted)
            self._arrived.set()
            return _nothing()

        return pushed

    async def _read_backlog(self, lane: _Lane, limit: int) -> list[Delivery]:
        """Messages published while no group was bound come first (they are older than anything
        in the lane queue); once the backlog is empty the lane consumes its own queue."""
        out: list[Delivery] = []
        queue = self._topology.backlog_queue(self.topic, lane.partition)
        try:
            present = True
            if not lane.backlog_checked:
                lane.backlog_checked = True  # declared only when something was published while no group was bound
                async with self._short_channels:
                    present = await backlog_exists(self.link, self._topology, self.topic, lane.partition)
            while present and len(out) < limit:
                if _power_of_ten(lane.last_get_tag + 1) and self._holds_backlog(lane):
                    break  # see _holds_backlog: read on once what it holds is acked
                message = await lane.raw.basic_get(queue, no_ack=False)
                if isinstance(message.delivery, spec.Basic.GetEmpty):
                    present = False
                else:
                    out.append(self._to_delivery(lane, message))
                    lane.last_get_tag = message.delivery_tag or 0
            if not present:
                lane.phase = "main"
                ok = await lane.raw.basic_consume(
                    self._topology.lane_queue(self.topic, self.group, lane.partition), self._on_push(lane)
                )
                lane.consumer_tag = ok.consumer_tag
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not lane.closing:
                error = self._refused_if_denied(exc, f"reading {self.topic}[{lane.partition}]")
                log.warning("rabbitmq: reading %s[%d] failed: %s", self.topic, lane.partition, error)
                lane.dead = True
                self._lost.add(lane.partition)
        return out

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        if self._refusal is not None:
            raise self._refusal
        deadline = time.monotonic() + timeout
        wanted = set(partitions)
        while not self._stopped:
            if self._refusal is not None:
                raise self._refusal
            self._arrived.clear()
            # Acks go out at every turn of the poll, not only when it begins: the engine polls
            # only the lanes that want deliveries and does not wake a waiting poll per handled
            # message, so a lane at its prefetch would otherwise get nothing more until the poll
            # timed out (ack() wakes the poll).
            for lane in self._wanted_busy(wanted):
                if lane.acks and not lane.dead:
                    try:
                        await self._send_acks(lane)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log.info("rabbitmq: acking on %s[%d] failed: %s", self.topic, lane.partition, exc)
            out: list[Delivery] = []
            if time.monotonic() >= self._cancel_check_at:
                self._cancel_check_at = time.monotonic() + CANCEL_CHECK
                self._check_consumers(wanted)
            lanes = self._wanted_busy(wanted)
            taken: dict[_Lane, int] = {}
            backlog = [lane for lane in lanes if lane.phase == "backlog" and not lane.dead and not lane.closing]
            if backlog:
                batches = await asyncio.gather(*(self._read_backlog(lane, max_per_lane) for lane in backlog))
                for lane, batch in zip(backlog, batches, strict=True):
                    out.extend(batch)
                    taken[lane] = len(batch)
            for lane in lanes:
                if lane.dead or lane.closing:
                    continue
                count = taken.get(lane, 0)
                while lane.incoming and count < max_per_lane:
                    out.append(self._to_delivery(lane, lane.incoming.popleft()))
                    count += 1
            for lane in lanes:
                if lane.dead or lane.closing or not (lane.incoming or lane.acks or lane.phase == "backlog"):
                    self._busy.discard(lane)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0 or wake.is_set():
                return out
            waiters = [asyncio.ensure_future(self._arrived.wait()), asyncio.ensure_future(wake.wait())]
            done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if not done or wake.is_set():
                return []
        return []

    def _wanted_busy(self, wanted: set[int]) -> list[_Lane]:
        """The busy lanes among the partitions asked for (a lane replaced since is dropped)."""
        lanes = []
        for lane in list(self._busy):
            if self._lanes.get(lane.partition) is not lane:
                self._busy.discard(lane)
            elif lane.partition in wanted:
                lanes.append(lane)
        return lanes

    def _check_consumers(self, wanted: set[int]) -> None:
        """A lane whose consumer the server cancelled (its queue deleted) is lost: it is taken again."""
        for partition in wanted:
            lane = self._lanes.get(partition)
            if lane is None or lane.dead or lane.closing or lane.consumer_tag is None:
                continue
            if not is_consuming(lane.raw, lane.consumer_tag):
                log.warning("rabbitmq: the server cancelled the consumer of %s[%d]", self.topic, lane.partition)
                lane.dead = True
                self._lost.add(lane.partition)

    def _current(self, delivery: Delivery) -> tuple[_Lane, int] | None:
        lane, tag = cast("tuple[_Lane, int]", delivery.position)
        if lane.dead or lane.closing or self._lanes.get(delivery.partition) is not lane:
            return None  # a stale delivery: it went back to the queue with its channel
        return lane, tag

    async def ack(self, delivery: Delivery) -> None:
        current = self._current(delivery)
        if current is None:
            log.info("rabbitmq: ack of %s on %s[%d] dropped: the lane's channel is gone, it is redelivered",
                     delivery.message_id, self.topic, delivery.partition)
            return
        lane, tag = current
        lane.outstanding.pop(tag, None)
        lane.counts.pop(tag, None)
        self._settle(lane, tag, delivery.message_id)

    def _settle(self, lane: _Lane, tag: int, message_id: str) -> None:
        """Buffer the ack of ``tag``: sent by the poll (woken here), before the lane's next retry
        note, or when the lane closes."""
        if lane.note is not None:
            _settled(lane, message_id)
        lane.acks.append(tag)
        self._busy.add(lane)
        self._arrived.set()

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        """The message stays unacked on this member, which hands it again itself (a nack would
        count a delivery and lose the delay). What a next owner needs after a crash — the attempt
        and the delay — goes into the lane's note queue first (confirmed)."""
        current = self._current(delivery)
        if current is None:
            return
        lane, tag = current
        if lane.acks:
            # The note holds one retry: this one replaces the record of a message retried and
            # settled here just before. Were its ack still buffered when this member dies, that
            # message would come back counted from its broker returns alone (attempts must grow,
            # docs/semantics.md rule 3). So the acks go out first, and a round trip on the lane's
            # channel (basic.qos, answered after the frames before it) shows they were taken.
            try:
                await self._send_acks(lane)
                await lane.raw.basic_qos(prefetch_count=self._prefetch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise PublishFailedError(
                    f"rabbitmq: noting the retry of {delivery.message_id} on {self.topic}[{lane.partition}]: "
                    f"the acks before it were not taken ({exc})") from exc
        note = {"message_id": delivery.message_id, "attempt": attempt, "not_before": not_before,
                "failures": delivery.failures, "count": lane.counts.get(tag, 0),
                "unread": self._carried(lane, skip=delivery.message_id)}
        await self._write_note(lane, note, f"noting the retry of {delivery.message_id}")

    def _carried(self, lane: _Lane, skip: str | None = None) -> dict[str, Any]:
        """The handed-back entries of the lane's note still to keep: not settled here (a
        message retried here is noted by its retry instead)."""
        entries = (lane.note or {}).get("unread")
        if not isinstance(entries, dict):
            return {}
        return {mid: entry for mid, entry in entries.items() if mid not in lane.settled and mid != skip}

    async def _write_note(self, lane: _Lane, note: dict[str, Any], doing: str) -> None:
        """Replace the lane's note (confirmed): the next owner reads it when it opens the lane."""
        queue = self._topology.note_queue(self.topic, self.group, lane.partition)
        where = f"{self.topic}[{lane.partition}]"
        deadline = time.monotonic() + PUBLISH_TIMEOUT
        refusals = 0
        while True:
            raw = None
            try:
                if not lane.note_declared:
                    await self._declare_note(queue)
                    lane.note_declared = True
                raw = await self._control_raw()
                stored = await raw.basic_publish(
                    json.dumps(note).encode(), exchange=self._topology.direct_exchange(), routing_key=queue,
                    mandatory=True,
                    properties=spec.Basic.Properties(delivery_mode=PERSISTENT, content_type="application/json"),
                )
            except asyncio.CancelledError:
                raise
            except amqp.DeliveryError as exc:  # basic.nack: the channel would go on nacking (see _publish)
                refusals += 1
                pause = REFUSED_BACKOFF.delay(refusals)
                if raw is not None:
                    with contextlib.suppress(Exception):
                        await raw.close()
                if time.monotonic() + pause > deadline:
                    raise translate(exc, f"{doing} on {where}") from exc
                await asyncio.sleep(pause)
                continue
            except Exception as exc:
                raise self._refused_if_denied(exc, f"{doing} on {where}") from exc
            break
        if not isinstance(stored, spec.Basic.Ack):
            raise PublishFailedError(f"rabbitmq: {doing} on {where}: the note was not stored")
        lane.note = note

    async def _declare_note(self, queue: str) -> None:
        """The lane's note queue, a quorum queue (a classic one an earlier version declared is
        kept), bound to the direct exchange under its name."""
        raw = await self._control_raw()
        try:
            await raw.queue_declare(queue, durable=True, arguments=self._topology.note_arguments())
        except amqp.ChannelPreconditionFailed as exc:
            if "'x-queue-type'" not in str(exc):
                raise
            raw = await self._control_raw()  # the refusal closed the channel
            await raw.queue_declare(queue, durable=True, arguments=self._topology.legacy_note_arguments())
        direct = self._topology.direct_exchange()
        await raw.exchange_declare(direct, exchange_type="direct", durable=True)
        await raw.queue_bind(queue, direct, routing_key=queue)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        current = self._current(delivery)
        if current is None:
            return  # not ours any more: it comes back and is decided again
        lane, tag = current
        link = self.link
        on_topic = dead_letter_record(letter)
        properties = spec.Basic.Properties(
            delivery_mode=PERSISTENT,
            message_id=on_topic.message_id,
            content_type=CONTENT_TYPE,
            headers=dict(letter_headers(letter)),
            timestamp=letter.dead_lettered_at.astimezone(UTC).replace(tzinfo=None)
            if letter.dead_lettered_at.tzinfo else datetime.now(UTC).replace(tzinfo=None),
        )
        dlq_topic = on_topic.topic
        try:
            raw = await self._control_raw()
            stored = await raw.basic_publish(  # the letters queue is bound to it under its name
                on_topic.body, exchange=self._topology.dead_letter_exchange(),
                routing_key=self._topology.letters_queue(self.topic, self.group), properties=properties, mandatory=True,
            )
            if not isinstance(stored, spec.Basic.Ack):
                raise PublishFailedError(f"rabbitmq: the dead letter of {delivery.message_id} was not stored "
                                         f"({type(stored).__name__}): is the group's letters queue missing?")
            await self._transport.ensure_topic(dlq_topic, link)
            await publish_confirmed(link, self._topology, raw, [on_topic])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._refused_if_denied(
                exc, f"dead-lettering {delivery.message_id} of {self.topic}[{delivery.partition}]"
            ) from exc
        lane.outstanding.pop(tag, None)
        lane.counts.pop(tag, None)
        self._settle(lane, tag, delivery.message_id)

    async def unread(self, deliveries: Sequence[Delivery]) -> None:
        """Read ahead and never handed to a handler: noted when the lane closes, so that their
        return to the queue (which RabbitMQ counts in ``x-delivery-count``) is no delivery for the
        next owner (docs/semantics.md rule 3)."""
        for delivery in deliveries:
            lane, tag = cast("tuple[_Lane, int]", delivery.position)
            if lane.dead or tag not in lane.outstanding:
                continue
            lane.handed_back[delivery.message_id] = {
                "count": lane.counts.get(tag, 0), "attempt": delivery.attempt,
                "failures": delivery.failures, "not_before": delivery.not_before,
            }

    async def _note_handed_back(self, lane: _Lane, late: bool = False) -> None:
        """Before the lane's channel closes: what goes back to the queue unhandled — deliveries the
        engine handed back, messages pushed and never taken — is written to the lane's note. The
        acks just sent make room in the prefetch, so the server may push more while the note is
        written: the note is written again with them (at most three times)."""
        entries = lane.handed_back
        for written in range(3):
            arrived = [*lane.incoming, *lane.returned]
            lane.incoming.clear()
            lane.returned.clear()
            for message in arrived:
                delivery = self._to_delivery(lane, message)
                entries.setdefault(delivery.message_id, {
                    "count": lane.counts.get(message.delivery_tag or 0, 0), "attempt": delivery.attempt,
                    "failures": delivery.failures, "not_before": delivery.not_before,
                })
            if not entries or ((written or late) and not arrived):
                return
            note = {key: value for key, value in (lane.note or {}).items() if key != "unread"}
            note["unread"] = {**self._carried(lane), **entries}
            try:
                await self._write_note(lane, note, "noting what goes back unhandled")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # their next delivery counts one more: never fewer
                log.info("rabbitmq: %s[%d]: the messages handed back could not be noted: %s",
                         self.topic, lane.partition, exc)
                return

    async def stop(self, flush: bool) -> None:
        self._stopped = True
        self._arrived.set()
        try:
            if flush:
                for lane in list(self._lanes.values()):
                    await self._close_lane(lane, flush=True)
            self._lanes.clear()
            for task in list(self._background):
                task.cancel()
            if self._link is not None:
                await self._link.close()  # leases, membership queue and unacked deliveries go with it
        finally:
            self._transport.unregister_member(self)
