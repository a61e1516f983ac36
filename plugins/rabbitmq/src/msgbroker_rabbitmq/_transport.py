"""The RabbitMQ provider: client-side partitions on quorum queues, lanes owned through
exclusive-queue leases, publisher confirms with mandatory routing. See docs/providers/rabbitmq.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import ssl
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiormq
from aiormq import exceptions as amqp
from aiormq.abc import DeliveredMessage
from msgbroker.spi import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_ERROR,
    DEAD_LETTER_GROUP,
    DEAD_LETTER_PARTITION,
    KEY_HEADER,
    BrokerClosedError,
    BrokerConnectionError,
    Capabilities,
    ConfigurationError,
    DeadLetter,
    GroupView,
    Lane,
    LaneConsumer,
    MemberView,
    OutgoingRecord,
    ReplySink,
    Transport,
    dead_letter_from_record,
    dead_letter_group,
    describe_from_interface,
    letter_key,
    tls_client_context,
)
from pamqp import commands as spec
from yarl import URL

from ._consumer import RabbitMQLaneConsumer, delivery_headers
from ._declare import declare_topic
from ._errors import redacted, translate
from ._host import Member
from ._link import Link, split_urls
from ._names import DELIVERY_LIMIT, Topology
from ._publish import publish_confirmed
from ._replies import ReplyInbox, declare_replies_exchange, replies_exchange, reply_properties
from ._schedule import Schedules
from ._settings import RabbitMQSettings

__all__ = ["RabbitMQLaneConsumer", "RabbitMQTransport"]

log = logging.getLogger("msgbroker.rabbitmq")

RECONNECT_WAIT = 5.0
"""How long a call waits for a lost connection to come back before it raises."""
CENSUS_TIMEOUT = 2.0
"""How long ``pending_count`` waits for the group's members to report what they hold."""


class RabbitMQTransport(Transport):
    """``amqp://`` / ``amqps://`` — RabbitMQ ≥ 3.10 through aio-pika, no plugins needed."""

    NAME: ClassVar[str] = "rabbitmq"
    SCHEMES: ClassVar[tuple[str, ...]] = ("amqp", "amqps")
    SETTINGS = RabbitMQSettings
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        retains_before_group=False,
        deduplication="none",
        server_restart=True,
        max_message_bytes=16 * 1024 * 1024,
        request_reply=True,
        scheduling="store",
        schedule_precision=0.5,
        reasons={
            "retains_before_group": (
                "RabbitMQ keeps a message only in the queues bound when it is published: a group's queues "
                "exist from its first subscribe, so a group created while others exist does not get what "
                "was published before it (messages published while no group existed are kept for the first)"
            ),
            "deduplication": (
                "RabbitMQ 3.10 has no publish-side deduplication and no atomic key store without the "
                "rabbitmq-message-deduplication plugin, which Debian does not ship"
            ),
        },
    )
    ASSIGNMENT = "leases"
    REDELIVERY = "local"
    MAX_POLL_BLOCK: ClassVar[float] = 0.25

    @classmethod
    def settings_from_url(cls, url: str) -> dict[str, Any]:
        return {"rabbitmq": {"url": url}}

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        section = settings.rabbitmq
        if section.queue_type != "quorum":
            raise ConfigurationError(
                f"rabbitmq.queue_type={section.queue_type!r}: only 'quorum' is supported (quorum queues count "
                "deliveries and keep a requeued message's position, which ordered lanes need)"
            )
        if settings.max_retry_attempts >= DELIVERY_LIMIT:
            raise ConfigurationError(
                f"max_retry_attempts={settings.max_retry_attempts} must stay below the lane queues' "
                f"delivery limit of {DELIVERY_LIMIT}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,50}", section.exchange_prefix):
            raise ConfigurationError(
                f"rabbitmq.exchange_prefix={section.exchange_prefix!r} must be 1-50 characters of A-Z a-z 0-9 _ . -"
            )
        self.urls: list[str] = split_urls(section.url)
        """The node addresses: one, or a cluster's (tried in order)."""
        expires = section.queue_expires
        if expires is not None and expires.total_seconds() < 1:
            raise ConfigurationError(f"rabbitmq.queue_expires={expires} must be at least 1 second (or None)")
        self.topology = Topology(
            section.exchange_prefix, None if expires is None else int(expires.total_seconds() * 1000),
            section.quorum_initial_group_size,
        )
        claim = section.claim_timeout.total_seconds()
        # The server drops a connection it heard nothing from for one to two heartbeat periods
        # (aiormq sends a frame every heartbeat / 2 s): a member whose event loop stalls for
        # longer than the claim timeout loses its connection, and with it its lease queues
        # (fencing, docs/semantics.md). Never below 2 s: aiormq sends at most once a second, and
        # the server must not drop a member that is only busy; so a claim timeout under 4 s
        # fences a stalled member after 2 to 4 s, not within the claim timeout.
        self.amqp_heartbeat = max(2, math.ceil(claim / 2))
        self._link: Link | None = None
        self.ssl_context: ssl.SSLContext | None = None
        """Made from ``rabbitmq.ssl_cafile`` at connect; every connection of this transport uses it."""
        self._members: dict[str, Member] = {}
        self._declared: dict[tuple[int, int, str], asyncio.Future[None]] = {}
        self._publisher: aiormq.abc.AbstractChannel | None = None
        self._inbox: ReplyInbox | None = None
        self._publisher_lock = asyncio.Lock()
        self.schedules = Schedules(self)

    # -- lifecycle -----------------------------------------------------------------------------

    def lease_ttl(self) -> float:
        return float(self.settings.rabbitmq.claim_timeout.total_seconds())

    @property
    def link(self) -> Link:
        if self._link is None:
            raise BrokerClosedError("the rabbitmq transport is not connected")
        return self._link

    def _tls_context(self) -> ssl.SSLContext | None:
        cafile = self.settings.rabbitmq.ssl_cafile
        if not cafile:
            return None  # amqps:// trusts the system's CAs (or the url's ?cafile=)
        if URL(self.urls[0]).scheme != "amqps":
            raise ConfigurationError(
                f"rabbitmq.ssl_cafile is set, but rabbitmq.url={redacted(self.urls[0])!r} is not an amqps:// url (TLS)"
            )
        return tls_client_context("rabbitmq", cafile)

    async def connect(self) -> None:
        self.ssl_context = self._tls_context()
        link = Link(self.urls, "msgbroker-publisher", heartbeat=self.amqp_heartbeat, on_down=self._down,
                    on_up=self._relinked, ssl_context=self.ssl_context)
        await link.open()
        self._link = link

    async def _relinked(self) -> None:
        """A reconnect: the reply inbox (an exclusive queue) died with the old connection."""
        inbox, link = self._inbox, self._link
        if inbox is not None and link is not None:
            try:
                await inbox.declare(link)
            except Exception as exc:
                log.warning("rabbitmq: the reply inbox %s could not be declared again (%s): requests on this "
                            "connection will time out", inbox.queue, exc)

    # -- request/reply (_replies.py) ----------------------------------------------------------------

    async def open_replies(self, deliver: ReplySink) -> str:
        link = await self._up()
        inbox = ReplyInbox(self.topology, deliver)
        try:
            await inbox.declare(link)
        except Exception as exc:
            raise translate(exc, "opening the reply inbox") from exc
        self._inbox = inbox
        return inbox.queue

    async def send_reply(self, address: str, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        exchange = replies_exchange(self.topology)
        if not address.startswith(exchange + ":"):
            log.warning("rabbitmq: a reply address %r outside this exchange prefix; reply dropped", address)
            return
        link = await self._up()
        try:
            key = (id(link), link.generation, "@replies")
            declared = self._declared.get(key)
            if declared is None or (declared.done() and declared.exception() is not None):
                declared = asyncio.ensure_future(declare_replies_exchange(link, self.topology))
                self._declared[key] = declared
            await asyncio.shield(declared)
            raw = await self._publisher_channel(link)
            await raw.basic_publish(body, exchange=exchange, routing_key=address,
                                    properties=reply_properties(request_id, headers))
        except Exception as exc:
            raise translate(exc, f"sending the reply to request {request_id}") from exc

    def _down(self) -> None:
        self._publisher = None
        self._declared.clear()

    async def close(self) -> None:
        for member in list(self._members.values()):
            with contextlib.suppress(Exception):
                await member.stop(flush=True)
        await self.schedules.stop()
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    async def abort(self) -> None:
        for member in list(self._members.values()):
            with contextlib.suppress(Exception):
                await member.stop(flush=False)
        await self.schedules.stop()  # nothing acked: the connection's close hands the messages on
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    async def ping(self) -> bool:
        link = self._link
        if link is None or not link.is_up:
            return False
        try:
            channel, raw = await link.channel()
            try:
                await asyncio.wait_for(raw.exchange_declare("amq.direct", exchange_type="direct", passive=True), 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False
        return True

    def register_member(self, member: Member) -> None:
        self._members[member.member_id] = member

    def unregister_member(self, member: Member) -> None:
        if self._members.get(member.member_id) is member:
            del self._members[member.member_id]

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return RabbitMQLaneConsumer(self, topic, group, member_id)

    # -- publishing ----------------------------------------------------------------------------

    async def _up(self) -> Link:
        link = self.link
        if not await link.wait_up(RECONNECT_WAIT):
            raise BrokerConnectionError("rabbitmq: the connection is down (reconnecting)")
        return link

    async def ensure_topic(self, topic: str, link: Link | None = None) -> None:
        """Declare the topic's exchanges and backlog queues once per connection generation."""
        link = link or await self._up()
        key = (id(link), link.generation, topic)
        declared = self._declared.get(key)
        if declared is None or (declared.done() and declared.exception() is not None):
            declared = asyncio.ensure_future(
                declare_topic(link, self.topology, topic, self.settings.partition_count)
            )
            self._declared[key] = declared
        await asyncio.shield(declared)

    async def up(self) -> Link:
        """The link once it is up (waiting a little for a reconnect)."""
        return await self._up()

    async def confirm_channel(self, link: Link) -> aiormq.abc.AbstractChannel:
        """This connection's publishing channel (publisher confirms)."""
        return await self._publisher_channel(link)

    # -- scheduled messages (_schedule.py) ------------------------------------------------------

    async def schedule(self, record: OutgoingRecord, deliver_at: float) -> None:
        await self.schedules.schedule(record, deliver_at)

    async def cancel_scheduled(self, topic: str, message_id: str) -> bool:
        return await self.schedules.cancel(topic, message_id)

    def run_mover(self, topic: str) -> None:
        self.schedules.run_mover(topic)

    async def _publisher_channel(self, link: Link) -> aiormq.abc.AbstractChannel:
        async with self._publisher_lock:
            raw = self._publisher
            if raw is None or raw.is_closed:
                _, raw = await link.channel(confirms=True)
                self._publisher = raw
            return raw

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        if dedup_window is not None:
            self.CAPABILITIES.require("deduplication")
        link = await self._up()
        if len(records) == 1:  # one publish(): no set of topics to build
            await self.ensure_topic(records[0].topic, link)
        else:
            for topic in dict.fromkeys(r.topic for r in records):
                await self.ensure_topic(topic, link)
        raw = self._publisher
        if raw is None or raw.is_closed:  # else what the locked path would return
            raw = await self._publisher_channel(link)
        await publish_confirmed(link, self.topology, raw, records)

    # -- membership and leases (delegated to the member's own connection) ------------------------

    def _member(self, member_id: str) -> Member:
        member = self._members.get(member_id)
        if member is None:
            raise BrokerClosedError(f"rabbitmq: member {member_id} is not running on this connection")
        return member

    async def heartbeat(self, topic: str, group: str, member_id: str, ttl: float) -> list[str]:
        return await self._member(member_id).heartbeat(ttl)

    async def leave(self, topic: str, group: str, member_id: str) -> None:
        member = self._members.get(member_id)
        if member is not None:
            await member.leave()

    async def acquire_lease(self, lane: Lane, member_id: str, ttl: float) -> str | None:
        return await self._member(member_id).acquire(lane.partition)

    async def renew_leases(self, leases: Mapping[Lane, str], ttl: float) -> set[Lane]:
        kept: set[Lane] = set()
        for lane, token in leases.items():
            member = self._members.get(token.split("/", 1)[0])
            if member is not None and await member.renew(lane.partition, token):
                kept.add(lane)
        return kept

    async def release_lease(self, lane: Lane, token: str) -> None:
        member = self._members.get(token.split("/", 1)[0])
        if member is not None:
            await member.release(lane.partition, token)

    # -- management ----------------------------------------------------------------------------

    async def _passive_counts(self, link: Link, queues: Sequence[str]) -> list[tuple[int, int] | None]:
        """(ready messages, consumers) of each queue, or None where it does not exist."""
        out: list[tuple[int, int] | None] = []
        channel, raw = await link.channel()
        try:
            for queue in queues:
                try:
                    ok = await raw.queue_declare(queue, passive=True)
                except amqp.ChannelNotFoundEntity:
                    out.append(None)
                    with contextlib.suppress(Exception):
                        await channel.close()
                    channel, raw = await link.channel()
                    continue
                out.append((ok.message_count or 0, ok.consumer_count or 0))
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return out

    async def pending_count(self, topic: str, group: str) -> int:
        """Ready messages of the group's lane queues and of the topic's backlog, plus what the
        group's live members hold unacked (asked for through a census on the members exchange)."""
        return sum((await self._counts(topic, group))[0].values())

    async def pending_by_partition(self, topic: str, group: str) -> dict[int, int]:
        """:meth:`pending_count` per partition (the backlog, lane and census counts are per lane)."""
        return {p: n for p, n in (await self._counts(topic, group))[0].items() if n}

    async def describe(self, topic: str, group: str) -> GroupView:
        """The default view with the counts and the census answers of one :meth:`_counts`: the
        members that answered (with their join time) and the lanes each holds."""
        per, replies = await self._counts(topic, group)
        view = await describe_from_interface(self, topic, group, knows_members=True, pending=per)
        owners = {int(p): member for member, data in replies.items() for p in data.get("lanes", {})}
        known = {*replies, *(str(m) for data in replies.values() for m in data.get("members", ()))}
        members = []
        for member in sorted(known):
            joined = replies.get(member, {}).get("joined")
            members.append(MemberView(
                member, datetime.fromtimestamp(joined, UTC) if isinstance(joined, (int, float)) else None,
                tuple(sorted(p for p, owner in owners.items() if owner == member))))
        partitions = tuple(replace(part, owner=owners.get(part.partition)) for part in view.partitions)
        return replace(view, partitions=partitions, members=tuple(members))

    async def _counts(self, topic: str, group: str) -> tuple[dict[int, int], dict[str, dict[str, Any]]]:
        """Pending per partition (every partition), and the members' census answers."""
        link = await self._up()
        count = self.settings.partition_count
        try:
            backlog = await self._passive_counts(link, [self.topology.backlog_queue(topic, p) for p in range(count)])
            lanes = await self._passive_counts(
                link, [self.topology.lane_queue(topic, group, p) for p in range(count)]
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, f"counting pending messages of {group!r} on {topic!r}") from exc
        per = {p: (b[0] if b else 0) + (c[0] if c else 0) for p, (b, c) in enumerate(zip(backlog, lanes, strict=True))}
        if all(c is None for c in lanes):
            return per, {}  # the group does not exist yet: it would get the backlog
        consumed = {p for p, c in enumerate(lanes) if c and c[1]}
        try:
            replies = await self._census(link, topic, group, consumed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, f"asking the members of {group!r} on {topic!r} what they hold") from exc
        for data in replies.values():
            for p, n in data.get("lanes", {}).items():
                if int(p) in per:
                    per[int(p)] += int(n)
        return per, replies

    async def _census(self, link: Link, topic: str, group: str, consumed: set[int]) -> dict[str, dict[str, Any]]:
        """Ask the group's members what they hold; wait until every member anyone knows of and
        every lane with a consumer has answered (bounded). The answers come to an exclusive queue
        of this call, bound to the provider's direct exchange (not through direct reply-to, whose
        answers go through the default exchange: a user limited to its prefix may not write there)."""
        replies: dict[str, dict[str, Any]] = {}
        arrived = asyncio.Event()

        async def on_reply(message: DeliveredMessage) -> None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                data = json.loads(message.body)
                replies[str(data["member"])] = data
                arrived.set()

        def complete() -> bool:
            if not replies:
                return False
            known = {m for data in replies.values() for m in data.get("members", ())}
            covered = {int(p) for data in replies.values() for p in data.get("lanes", {})}
            return known <= set(replies) and consumed <= covered

        channel, raw = await link.channel(confirms=True)
        try:
            inbox = self.topology.census_queue(topic, group, uuid.uuid4().hex[:12])
            direct = self.topology.direct_exchange()
            await raw.exchange_declare(direct, exchange_type="direct", durable=True)
            await raw.queue_declare(inbox, exclusive=True, auto_delete=True)  # gone with this channel's consumer
            await raw.queue_bind(inbox, direct, routing_key=inbox)
            await raw.basic_consume(inbox, on_reply, no_ack=True)
            try:
                result = await raw.basic_publish(
                    json.dumps({"kind": "census"}).encode(),
                    exchange=self.topology.members_exchange(topic, group),
                    routing_key="",
                    properties=spec.Basic.Properties(reply_to=inbox, message_type="census"),
                    mandatory=True,
                )
            except amqp.ChannelNotFoundEntity:
                return {}  # no member ever joined
            if isinstance(result, DeliveredMessage) and not consumed:
                return {}  # no member is bound now, and no lane has a consumer
            deadline = time.monotonic() + CENSUS_TIMEOUT
            while not complete():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.info("rabbitmq: pending_count of %s/%s: not every member answered in %.1fs",
                             topic, group, CENSUS_TIMEOUT)
                    break
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), remaining)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return replies

    async def _read_letters(
        self, topic: str, group: str, remove: Callable[[DeadLetter], bool] | None
    ) -> tuple[list[DeadLetter], int]:
        """Every letter of the letters queue, oldest first: fetched unacked (those ``remove``
        picks acked), then the channel closes and the rest go back in their place."""
        link = await self._up()
        queue = self.topology.letters_queue(topic, group)
        channel, raw = await link.channel()
        letters: list[DeadLetter] = []
        seen: set[str] = set()
        removed: set[str] = set()
        try:
            try:
                await raw.queue_declare(queue, passive=True)
            except amqp.ChannelNotFoundEntity:
                return [], 0
            while True:
                message = await raw.basic_get(queue, no_ack=False)
                if isinstance(message.delivery, spec.Basic.GetEmpty):
                    break
                letter = self._letter(topic, group, message)
                if remove is not None and remove(letter):
                    await raw.basic_ack(message.delivery_tag or 0)
                    removed.add(letter.message_id)  # a letter stored twice (see below) counts once
                    continue
                if letter.message_id not in seen:  # a crash between storing and acking stores it twice
                    seen.add(letter.message_id)
                    letters.append(letter)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, f"reading the dead letters of {group!r} on {topic!r}") from exc
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return letters, len(removed)

    def _letter(self, topic: str, group: str, message: DeliveredMessage) -> DeadLetter:
        """A message of the letters queue: a letter's ``<topic>.dlq`` record (msgbroker.wire) with
        the partition key in its AMQP headers, or one the broker dead-lettered itself past the
        delivery limit (the safety net: no letter headers, its ``x-death`` says why)."""
        properties = message.header.properties
        raw = properties.headers or {}
        headers = delivery_headers(raw)
        if dead_letter_group(headers) is None:
            deaths = raw.get("x-death")
            death: dict[str, Any] = {}
            if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
                death = deaths[0]
            keys = death.get("routing-keys") or ["0"]
            headers.update({
                DEAD_LETTER_ERROR: f"the broker dead-lettered it past its delivery limit of {DELIVERY_LIMIT} "
                                   f"(reason: {_as_text(death.get('reason')) or 'unknown'})",
                DEAD_LETTER_ATTEMPTS: str(raw.get("x-delivery-count", DELIVERY_LIMIT)),
                DEAD_LETTER_GROUP: group,
                DEAD_LETTER_PARTITION: _as_text(keys[0]) or "0",
            })
        at = properties.timestamp
        return dead_letter_from_record(
            topic, 0, properties.message_id or "", _as_text(raw.get(KEY_HEADER)) or "", headers, message.body,
            dead_lettered_at=at.replace(tzinfo=UTC) if isinstance(at, datetime) and at.tzinfo is None else at,
        )

    async def delete_topic(self, topic: str, groups: Sequence[str]) -> int:
        """Retire ``topic`` and its ``<topic>.dlq``: delete their exchanges, backlog and marker
        queues and, for each of ``groups``, the lane, note and letters queues (RabbitMQ cannot list queues without the
        management plugin, so the groups are named). Messages in them are gone. Returns how many
        queues existed and were deleted."""
        link = await self._up()
        count = self.settings.partition_count
        queues = [self.topology.backlog_queue(topic, p) for p in range(count)] + [self.topology.meta_queue(topic)]
        for group in groups:
            queues += [self.topology.lane_queue(topic, group, p) for p in range(count)]
            queues += [self.topology.note_queue(topic, group, p) for p in range(count)]
            queues.append(self.topology.letters_queue(topic, group))
        existing = [q for q, c in zip(queues, await self._passive_counts(link, queues), strict=True) if c is not None]
        channel, raw = await link.channel()
        try:
            for queue in existing:
                await raw.queue_delete(queue)
            for group in groups:
                await raw.exchange_delete(self.topology.members_exchange(topic, group))
            await raw.exchange_delete(self.topology.exchange(topic))
            await raw.exchange_delete(self.topology.backlog_exchange(topic))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, f"deleting topic {topic!r}") from exc
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        for key in [k for k in self._declared if k[2] == topic]:
            del self._declared[key]
        if not topic.endswith(".dlq"):  # dead letters are also published to <topic>.dlq: retire it too
            return len(existing) + await self.delete_topic(f"{topic}.dlq", groups)
        return len(existing)

    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        letters, _ = await self._read_letters(topic, group, None)
        return letters

    async def remove_dead_letters(self, topic: str, group: str, message_ids: Sequence[str]) -> int:
        wanted = set(message_ids)
        _, removed = await self._read_letters(topic, group, lambda letter: letter.message_id in wanted)
        return removed

    async def remove_listed_dead_letters(self, topic: str, group: str, letters: Sequence[DeadLetter]) -> int:
        listed = {letter_key(letter) for letter in letters}
        _, removed = await self._read_letters(topic, group, lambda letter: letter_key(letter) in listed)
        return removed


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)
