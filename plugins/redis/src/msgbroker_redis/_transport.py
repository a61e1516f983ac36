"""The Redis Streams provider: a stream per (topic, partition), a consumer group per msgbroker
group, leases with fencing for exclusive ordered lanes.

Key layout (``P`` = ``key_prefix``, ``{T}`` = the topic as a hash tag, so one topic's keys
share a cluster slot)::

    P:{T}:<n>                  lane stream of partition n (fields i=id, k=key, h=headers, b=body)
    P:{T}:meta                 hash: partitions = the topic's partition count
    P:{T}:dedup:<message id>   dedup marker (SET NX PX deduplication_window)
    P:{T}:members:<group>      sorted set: live members, score = expiry (server clock)
    P:{T}:lease:<group>:<n>    the lane's lease, "<member>/<token>", PX claim_timeout
    P:{T}:delay:<group>:<n>    hash: entry id -> not-before (epoch seconds) of a delayed retry
    P:{T}:dead:<group>         stream of the group's dead letters
    P:{T}.dlq:...              the keys of the topic ``T.dlq`` (its dead-letter topic), in T's slot

The Redis consumer name of a lane is its partition number, so the consumer's pending list
*is* the lane's in-flight list: a new owner resumes by reading it (which also counts the
delivery), and nothing is ever claimed from a live owner by idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import struct
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import urlsplit

from msgbroker.spi import (
    DEAD_LETTER_AT,
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_ERROR,
    DEAD_LETTER_GROUP,
    DEAD_LETTER_PARTITION,
    BrokerClosedError,
    Capabilities,
    ConfigurationError,
    DeadLetter,
    Delivery,
    GroupView,
    Lane,
    LaneConsumer,
    MemberView,
    MsgBrokerError,
    OutgoingRecord,
    PublishFailedError,
    PublishIndeterminateError,
    ReplySink,
    Transport,
    cancel_and_wait,
    dead_letter_from_record,
    dead_letter_record,
    describe_from_interface,
    failures_since,
    letter_key,
    tls_client_context,
)
from redis import exceptions as rex

from . import _scripts
from ._clients import Client, Connections, Reader
from ._errors import REDIS_ERRORS, redacted, translate, user_of
from ._replies import ReplyInbox, send_reply
from ._schedule import Movers
from ._settings import RedisSettings

if TYPE_CHECKING:
    from msgbroker.spi import AssignmentListener, BrokerSettings
    from redis.commands.core import AsyncScript

__all__ = ["RedisLaneConsumer", "RedisTransport", "TopicKeys"]

log = logging.getLogger("msgbroker.redis")

LONG_CLAIM_TIMEOUT = 60.0
"""A claim_timeout above this (seconds) is said in a warning when the broker opens: the seed's
``ClaimTimeout`` of 5 minutes stalls a dead member's partitions for 5 minutes."""
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")

ACK_BATCH = 512
"""Buffered acks of one consumer flushed at once without waiting for the linger."""
ACK_LINGER = 0.002
"""Seconds an ack waits for company before it is flushed."""
IDLE_RECHECK = 10.0
"""A lane that had nothing at its last read is idle: polls do not read it again until the
topic's notify stream names it (every publish adds one entry there naming the lanes it
appended to), so a poll's cost follows the traffic, not the partition count, and a member with
nothing to do blocks on that one stream. Every this many seconds all idle lanes are read again
anyway (entries a publisher of an earlier version appended without a notification)."""
READ_LANES = 256
"""The most lanes one read covers (in turn, when more have room): what a read sends grows with
its lanes (a lease token and a cursor each), and a read stops at READ_BUDGET entries anyway."""
NOTIFY_PEEK = 50
"""Notifications a blocked wait returns at most: the lanes they name are read at once (a read
after the wait takes in the rest of the notify stream anyway)."""
READ_BUDGET = 2000
"""The most entries one read returns over all its lanes (the rest: read again at once)."""
PUBLISH_CHUNK = 1000
"""Records per publish script call at most."""
PUBLISH_BYTES = 4 * 1024 * 1024
"""Bytes of bodies per publish script call at most (a larger single record goes alone)."""


class TopicKeys:
    """The keys of one topic under ``prefix`` (see the module docstring)."""

    __slots__ = ("base",)

    def __init__(self, prefix: str, topic: str) -> None:
        # A dead-letter topic (``T.dlq``, ``T.dlq.dlq``...) keeps T's hash tag, so a dead letter
        # and the ack of its original are one script on one Redis Cluster slot. Names hold no
        # braces, so the tag is exact; ``P:{T}.dlq:`` never meets T's own ``P:{T}:``.
        root, suffix = topic, ""
        while root.endswith(".dlq") and len(root) > 4:
            root, suffix = root[:-4], ".dlq" + suffix
        self.base = f"{prefix}:{{{root}}}{suffix}"

    def stream(self, partition: int) -> str:
        return f"{self.base}:{partition}"

    @property
    def meta(self) -> str:
        return f"{self.base}:meta"

    @property
    def notify(self) -> str:
        return f"{self.base}:notify"

    def dedup(self, message_id: str) -> str:
        return f"{self.base}:dedup:{message_id}"

    def members(self, group: str) -> str:
        return f"{self.base}:members:{group}"

    def joined(self, group: str) -> str:
        return f"{self.base}:joined:{group}"

    def lease(self, group: str, partition: int) -> str:
        return f"{self.base}:lease:{group}:{partition}"

    def delay(self, group: str, partition: int) -> str:
        return f"{self.base}:delay:{group}:{partition}"

    def dead(self, group: str) -> str:
        return f"{self.base}:dead:{group}"


_HEAD = struct.Struct(">II")
_LANE = struct.Struct(">III")
_LENGTH = struct.Struct(">I")


def _fresh_token() -> str:
    """The part of a lease's value that tells this member's successive holds of it apart (64
    random bits; the member's id before it tells members apart). Short: every wait sends the
    token of each of the member's idle lanes."""
    return secrets.token_hex(8)


def _entry_time(delivery: Delivery) -> float | None:
    """When a peeked entry was appended: its stream id's milliseconds (the server's clock)."""
    position = delivery.position
    return int(position.split(b"-")[0]) / 1000 if isinstance(position, bytes) else None


def _unpack(packed: bytes, pos: int, end: int, partition: int, into: list[Delivery]) -> bytes:
    """Decode packed entries of one lane (``packed[pos:end]``) into ``into``; the last entry id."""
    head, length = _HEAD.unpack_from, _LENGTH.unpack_from
    entry_id = b""
    while pos < end:
        delivered, pairs = head(packed, pos)
        (size,) = length(packed, pos + 8)
        pos += 12
        entry_id = packed[pos:pos + size]
        pos += size
        (size,) = length(packed, pos)
        pos += 4
        not_before = packed[pos:pos + size]
        pos += size
        fields: dict[bytes, bytes] = {}
        for _ in range(pairs):
            (size,) = length(packed, pos)
            name = packed[pos + 4:pos + 4 + size]
            pos += 4 + size
            (size,) = length(packed, pos)
            fields[name] = packed[pos + 4:pos + 4 + size]
            pos += 4 + size
        failures = None
        if b";" in not_before:  # the attempt record a retry left: "<not_before>;<failures>:<attempt>"
            not_before, _, record = not_before.partition(b";")
            recorded, _, retried_at = record.partition(b":")
            failures = failures_since(int(recorded), int(retried_at), delivered)
        into.append(Delivery(
            partition=partition,
            message_id=_text(fields.get(b"i")),
            key=_text(fields.get(b"k")),
            headers=_headers(fields.get(b"h")),
            body=fields.get(b"b", b""),
            attempt=delivered,
            position=entry_id,
            not_before=float(not_before) if not_before else None,
            failures=failures,
        ))
    return entry_id


def _pack_records(records: Sequence[OutgoingRecord]) -> bytes:
    """The PUBLISH script's records argument: partition, then id, key, headers, body, each
    length-prefixed."""
    pack = _LENGTH.pack
    parts: list[bytes] = []
    for record in records:
        parts.append(pack(record.partition))
        for part in (_utf8(record.message_id), _utf8(record.key), _utf8(_encode_headers(record.headers)), record.body):
            parts.append(pack(len(part)))
            parts.append(part)
    return b"".join(parts)


def _utf8(text: str) -> bytes:
    # Keys and error texts are any str: surrogatepass round-trips even a lone surrogate exactly.
    return text.encode("utf-8", "surrogatepass")


def _text(value: bytes | None) -> str:
    if value is None:
        return ""
    try:
        return value.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # written by someone else: keep what can be read
        return value.decode("utf-8", "replace")


def _headers(raw: bytes | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _encode_headers(headers: Mapping[str, str]) -> str:
    return json.dumps(dict(headers), ensure_ascii=False, separators=(",", ":")) if headers else ""


_LEGACY_FIELDS = {
    DEAD_LETTER_ERROR: b"e", DEAD_LETTER_ATTEMPTS: b"a", DEAD_LETTER_PARTITION: b"p", DEAD_LETTER_AT: b"t",
}
"""Fields of a dead-letter stream entry written before msgbroker.wire, and the headers they are."""


def _dead_letter(topic: str, group: str, fields: Mapping[bytes, bytes]) -> DeadLetter:
    """An entry of a group's dead-letter stream: the letter's ``<topic>.dlq`` record (``i``, ``k``,
    ``h``, ``b``). Entries written before msgbroker.wire kept the original's headers in ``h`` and
    the letter's own fields apart (``e`` error, ``a`` attempts, ``p`` partition, ``t`` time):
    those become the record's headers they stand for."""
    headers = _headers(fields.get(b"h"))
    if DEAD_LETTER_GROUP not in headers:
        headers.update({name: _text(fields[field]) for name, field in _LEGACY_FIELDS.items() if field in fields})
        headers[DEAD_LETTER_GROUP] = group
    return dead_letter_from_record(topic, 0, _text(fields.get(b"i")), _text(fields.get(b"k")), headers,
                                   fields.get(b"b", b""))


class RedisTransport(Transport):
    """``redis://`` and ``rediss://`` — Redis ≥ 7.0 Streams (redis.asyncio)."""

    NAME: ClassVar[str] = "redis"
    SCHEMES: ClassVar[tuple[str, ...]] = ("redis", "rediss")
    SETTINGS = RedisSettings
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        deduplication="store",
        server_restart=True,
        max_message_bytes=16 * 1024 * 1024,
        request_reply=True,
        scheduling="store",
        schedule_precision=0.5,
    )
    ASSIGNMENT = "leases"
    REDELIVERY = "local"
    MAX_POLL_BLOCK: ClassVar[float] = 0.25

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__(settings)
        self._connections: Connections | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._checked_topics: set[str] = set()
        self._consumers: weakref.WeakSet[RedisLaneConsumer] = weakref.WeakSet()
        config = settings.redis
        self.url: str = config.url
        if not isinstance(config.key_prefix, str) or not _KEY_PREFIX.fullmatch(config.key_prefix):
            # a brace would move the Cluster hash tag off the topic, a space or newline would
            # not survive CLIENT SETNAME: refuse, naming it
            raise ConfigurationError(
                f"redis.key_prefix={config.key_prefix!r} is invalid: use 1-64 characters of A-Z a-z 0-9 _ . : -"
            )
        self.prefix: str = config.key_prefix
        self.max_stream_length: int = config.max_stream_length
        # Trim in steps rather than at every entry; 0 keeps small limits exact.
        self.trim_slack: int = min(100, config.max_stream_length // 10)
        self.partitions: int = settings.partition_count
        self.wait_replicas: int = config.wait_replicas
        self.wait_timeout: float = config.wait_timeout.total_seconds()
        self._inbox: ReplyInbox | None = None
        self._movers = Movers(self)

    @classmethod
    def settings_from_url(cls, url: str) -> dict[str, Any]:
        return {"redis": {"url": url}}

    def lease_ttl(self) -> float:
        return float(self.settings.redis.claim_timeout.total_seconds())

    # -- connection ---------------------------------------------------------------------------

    @property
    def user(self) -> str:
        """The ACL user this transport logs in as, named when the server denies a permission."""
        return user_of(self.url.split(",")[0].strip())

    @property
    def connections(self) -> Connections:
        if self._connections is None:
            raise BrokerClosedError("the redis broker connection is closed")
        return self._connections

    @property
    def redis(self) -> Client:
        """The client commands go through: the server's, or the cluster client."""
        return self.connections.main

    @property
    def cluster(self) -> bool:
        """Whether the broker talks to a Redis Cluster (known once open)."""
        return bool(self._connections is not None and self._connections.cluster)

    def script(self, name: str) -> AsyncScript:
        return self._scripts[name]

    def _tls_options(self) -> dict[str, Any]:
        """redis-py's options for ``redis.ssl_cafile``, its file checked once, here."""
        cafile = self.settings.redis.ssl_cafile
        if not cafile:
            return {}
        if any(urlsplit(u.strip()).scheme != "rediss" for u in self.url.split(",") if "://" in u):
            raise ConfigurationError(
                f"redis.ssl_cafile is set, but redis.url={redacted(self.url)!r} is not a rediss:// url (TLS)"
            )
        tls_client_context("redis", cafile)  # names an unreadable or non-PEM file now, not at each connection
        return {"ssl_ca_certs": cafile}

    async def connect(self) -> None:
        connections = Connections(self.url, self.prefix, self.settings.redis.cluster, self._tls_options(),
                                  self.settings.redis.max_connections)
        client = await connections.open()
        self._connections = connections
        self._scripts = {
            name: client.register_script(getattr(_scripts, name))
            for name in _scripts.__all__
        }
        claim = self.settings.redis.claim_timeout.total_seconds()
        if claim > LONG_CLAIM_TIMEOUT:
            log.warning(
                "redis: claim_timeout is %s: a member process that dies keeps its partitions, and the message it "
                "held, that long before another member takes them (the default is 8s; see "
                "docs/providers/redis.md, Failover)", self.settings.redis.claim_timeout)

    async def close(self) -> None:
        consumers = list(self._consumers)
        await asyncio.gather(*(c.stop(flush=True) for c in consumers), return_exceptions=True)
        if self._connections is not None:
            await self._movers.stop(release=True)
        inbox, self._inbox = self._inbox, None
        if inbox is not None and self._connections is not None:
            await inbox.close()
        connections, self._connections = self._connections, None
        if connections is not None:
            await connections.close()

    async def abort(self) -> None:
        consumers = list(self._consumers)
        await asyncio.gather(*(c.stop(flush=False) for c in consumers), return_exceptions=True)
        await self._movers.stop(release=False)
        inbox, self._inbox = self._inbox, None
        if inbox is not None and self._connections is not None:
            await inbox.close()
        connections, self._connections = self._connections, None
        if connections is not None:
            await connections.close()

    async def ping(self) -> bool:
        connections = self._connections
        if connections is None:
            return False
        client = connections.main
        try:
            return bool(await asyncio.wait_for(client.ping(), 2.0))
        except asyncio.CancelledError:
            raise
        except Exception:
            return False

    async def call(self, name: str, keys: Sequence[Any], args: Sequence[Any], doing: str,
                   client: Client | None = None) -> Any:
        """Run one script, mapping errors into msgbroker's tree. ``keys`` is never empty: on a
        Redis Cluster its first key picks the node (every key of a script shares the topic's slot)."""
        try:
            return await self.script(name)(keys=list(keys), args=list(args), client=client or self.redis)
        except REDIS_ERRORS as exc:
            raise translate(exc, doing, self.user) from exc

    async def call_replicated(self, name: str, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
                              doing: str) -> tuple[list[Any], int]:
        """Run ``name`` once per (keys, args), then ``WAIT`` for ``redis.wait_replicas`` on the same
        connection(s): each call's reply or exception, and how many replicas have the writes."""
        try:
            return await self.connections.replicated(self.script(name), calls, self.wait_replicas, self.wait_timeout)
        except REDIS_ERRORS as exc:
            raise translate(exc, doing, self.user) from exc

    # -- topics --------------------------------------------------------------------------------

    def keys(self, topic: str) -> TopicKeys:
        return TopicKeys(self.prefix, topic)

    def _refuse(self, topic: str, recorded: Any) -> ConfigurationError:
        count = int(recorded) if recorded is not None else "?"
        return ConfigurationError(
            f"topic {topic!r} exists on redis with {count} partitions; this connection has "
            f"partition_count={self.partitions} (keys under {self.keys(topic).base!r})"
        )

    async def check_topic(self, topic: str) -> None:
        """Refuse a topic whose recorded partition count differs from ours (once per topic)."""
        if topic in self._checked_topics:
            return
        recorded = await self.call("TOPIC_META", [self.keys(topic).meta], [self.partitions],
                                   f"checking topic {topic!r}")
        if recorded is None or int(recorded) != self.partitions:
            raise self._refuse(topic, recorded)
        self._checked_topics.add(topic)

    async def create_groups(self, topic: str, group: str) -> None:
        """Create ``group`` on every lane of ``topic`` at 0 and check the partition count."""
        keys = self.keys(topic)
        call = ([keys.meta, *(keys.stream(p) for p in range(self.partitions))], [group, self.partitions])
        doing = f"creating group {group!r} on {topic!r}"
        if self.wait_replicas:
            # A group lost in a failover is created again at 0 by the next read: every message
            # of the lanes would be handled again.
            [recorded], confirmed = await self.call_replicated("CREATE_GROUPS", [call], doing)
            if isinstance(recorded, Exception):
                raise translate(recorded, doing) from recorded
            if confirmed < self.wait_replicas:
                log.warning("redis: group %r on %r is on %d of %d replica(s) after %.1fs (redis.wait_replicas)",
                            group, topic, confirmed, self.wait_replicas, self.wait_timeout)
        else:
            recorded = await self.call("CREATE_GROUPS", *call, doing)
        if recorded is None or int(recorded) != self.partitions:
            raise self._refuse(topic, recorded)
        self._checked_topics.add(topic)

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        client = self.redis
        for topic in {r.topic for r in records}:
            await self.check_topic(topic)
        window = max(1, int(dedup_window * 1000)) if dedup_window is not None else 0
        by_topic: dict[str, list[OutgoingRecord]] = {}
        for record in records:
            by_topic.setdefault(record.topic, []).append(record)
        calls: list[tuple[list[str], list[Any]]] = []
        for topic, batch in by_topic.items():
            keys = self.keys(topic)
            base = keys.base
            start = 0
            while start < len(batch):
                # Bound one script run (Redis serves nobody else meanwhile): records and bytes.
                end, size = start, 0
                while end < len(batch) and end - start < PUBLISH_CHUNK and (end == start or size < PUBLISH_BYTES):
                    size += len(batch[end].body)
                    end += 1
                packed = _pack_records(batch[start:end])
                # The script derives the lane and dedup keys from the base; the meta key, in the
                # same slot, routes the call on a Redis Cluster.
                calls.append(([keys.meta], [base, self.max_stream_length, self.trim_slack, window, packed]))
                start = end
        script = self.script("PUBLISH")
        if self.wait_replicas:
            await self._publish_replicated(calls, len(records))
            return
        if len(calls) == 1:
            try:
                await script(keys=calls[0][0], args=calls[0][1], client=client)
            except REDIS_ERRORS as exc:
                raise self._publish_error(exc, 1, len(records)) from exc
            return
        try:
            results = await self._pipelined(script, calls)
        except REDIS_ERRORS as exc:
            raise self._publish_error(exc, len(calls), len(records)) from exc
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise self._publish_error(failed[0], len(calls), len(records)) from failed[0]

    async def _publish_replicated(self, calls: list[tuple[list[str], list[Any]]], count: int) -> None:
        """Publish, then WAIT until ``redis.wait_replicas`` replicas have it: a publish they did not
        confirm within ``redis.wait_timeout`` is indeterminate (written on the primary, which may
        fail before a replica has it)."""
        try:
            results, confirmed = await self.connections.replicated(self.script("PUBLISH"), calls, self.wait_replicas,
                                                                   self.wait_timeout)
        except REDIS_ERRORS as exc:
            raise self._publish_error(exc, len(calls), count) from exc
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise self._publish_error(failed[0], len(calls), count) from failed[0]
        if confirmed < self.wait_replicas:
            raise PublishIndeterminateError(
                f"redis: {count} message(s) written on the primary, but {confirmed} of {self.wait_replicas} "
                f"replica(s) confirmed them within {self.wait_timeout:g}s (redis.wait_replicas, redis.wait_timeout): "
                "they are lost if that primary fails before a replica has them"
            )

    @staticmethod
    def _publish_error(exc: BaseException, calls: int, count: int) -> MsgBrokerError:
        if calls == 1 and isinstance(exc, (rex.AskError, rex.TryAgainError, rex.ClusterDownError)):
            # A cluster node refused to run it (the slot moved, the cluster is failing over): not written.
            return translate(exc, f"publishing {count} message(s)")
        if isinstance(exc, rex.ResponseError) and count == 1:
            return PublishFailedError(f"redis refused the publish: {exc}")
        if isinstance(exc, rex.ResponseError):
            # A script is not rolled back: the records before the failing one were appended.
            return PublishIndeterminateError(f"redis failed part of a publish of {count} messages: {exc}")
        return PublishIndeterminateError(
            f"publishing {count} message(s) to redis may or may not have happened: {translate(exc, 'publish')}"
        )

    async def _pipelined(self, script: AsyncScript, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run many calls of one script in one round trip; load it once if the server lost it."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            out = await pipe.execute(raise_on_error=False)
            missing = []
            for i, result in zip(todo, out, strict=True):
                results[i] = result
                if isinstance(result, rex.NoScriptError):
                    missing.append(i)
            if not missing:
                break
            await self.redis.script_load(script.script)
            todo = missing
        return results

    # -- scheduled messages (_schedule.py) ------------------------------------------------------------

    async def schedule(self, record: OutgoingRecord, deliver_at: float) -> None:
        """The record waits in ``<base>:sched`` / ``<base>:sched:rec`` (one script), and this
        connection runs a mover for its topic from now on."""
        topic = record.topic
        await self.check_topic(topic)
        keys = self.keys(topic)
        packed = _pack_records([record])
        due_ms = max(0, int(deliver_at * 1000 + 0.999))  # never before: round up to the ms
        call: tuple[list[str], list[Any]] = ([keys.meta], [keys.base, due_ms, record.message_id, packed])
        doing = f"scheduling message {record.message_id} on {topic!r}"
        if self.wait_replicas:
            [result], confirmed = await self.call_replicated("SCHEDULE", [call], doing)
            if isinstance(result, Exception):
                raise self._publish_error(result, 1, 1) from result
            if confirmed < self.wait_replicas:
                raise PublishIndeterminateError(
                    f"redis: scheduled message {record.message_id} written on the primary, but {confirmed} of "
                    f"{self.wait_replicas} replica(s) confirmed it within {self.wait_timeout:g}s (redis.wait_replicas)")
        else:
            try:
                await self.script("SCHEDULE")(keys=call[0], args=call[1], client=self.redis)
            except REDIS_ERRORS as exc:
                raise self._publish_error(exc, 1, 1) from exc
        self._movers.ensure(topic)

    async def cancel_scheduled(self, topic: str, message_id: str) -> bool:
        keys = self.keys(topic)
        removed = await self.call("CANCEL_SCHEDULED", [keys.meta], [keys.base, message_id],
                                  f"cancelling scheduled message {message_id} on {topic!r}")
        return bool(removed)

    def run_mover(self, topic: str) -> None:
        """Move ``topic``'s due scheduled messages from this connection (when it holds the lease)."""
        self._movers.ensure(topic)

    # -- consuming -----------------------------------------------------------------------------

    # -- request/reply (_replies.py) --------------------------------------------------------------

    async def open_replies(self, deliver: ReplySink) -> str:
        inbox = ReplyInbox(self, deliver)
        address = await inbox.open()
        self._inbox = inbox
        return address

    async def send_reply(self, address: str, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        await send_reply(self, address, request_id, headers, body)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        consumer = RedisLaneConsumer(self, topic, group, member_id)
        self._consumers.add(consumer)
        return consumer

    async def pending_count(self, topic: str, group: str) -> int:
        # Acks this process buffered count as settled: pending_by_partition writes them first.
        return sum((await self.pending_by_partition(topic, group)).values())

    async def pending_by_partition(self, topic: str, group: str) -> dict[int, int]:
        for consumer in list(self._consumers):
            with contextlib.suppress(MsgBrokerError):
                await consumer.flush_acks()
        keys = self.keys(topic)
        counts = await self.call("PENDING", [keys.stream(p) for p in range(self.partitions)], [group],
                                 f"counting pending of {group!r} on {topic!r}")
        return {p: int(n) for p, n in enumerate(counts) if int(n)}

    async def peek(self, topic: str, group: str, limit: int) -> list[Delivery]:
        keys = self.keys(topic)
        lanes = await self.call("PEEK", [keys.stream(p) for p in range(self.partitions)], [group, max(0, limit)],
                                f"peeking at {topic!r} for {group!r}")
        out: list[Delivery] = []
        for partition, packed in enumerate(lanes):
            if packed:
                _unpack(packed, 0, len(packed), partition, out)
        return out

    async def describe(self, topic: str, group: str) -> GroupView:
        """The default view plus the server's own state: live members and their join times, each
        lease's holder, appended counts (XINFO GROUPS), and ages from the head entries' ids."""
        keys, n = self.keys(topic), self.partitions
        calls: list[tuple[list[Any], list[Any]]] = [([keys.stream(p)], [group, 1]) for p in range(n)]
        if self.cluster:  # a cluster pipeline refuses EVALSHA: one call per partition, concurrently
            peeked: list[Any] = list(await asyncio.gather(
                *(self.script("PEEK")(keys=k, args=a, client=self.redis) for k, a in calls), return_exceptions=True))
        else:
            peeked = await self._pipelined(self.script("PEEK"), calls)
        first: dict[int, Delivery] = {}
        for p, packed in enumerate(peeked):
            if isinstance(packed, Exception):
                raise translate(packed, f"peeking at {topic!r} for {group!r}", self.user)
            lane: list[Delivery] = []
            if packed and packed[0]:
                _unpack(packed[0], 0, len(packed[0]), p, lane)
            if lane:
                first[p] = lane[0]
        view = await describe_from_interface(self, topic, group, first=first, age_from=_entry_time,
                                            knows_members=True)
        _now, flat, owners, published = await self.call(
            "DESCRIBE",
            [keys.members(group), keys.joined(group), *(keys.lease(group, p) for p in range(n)),
             *(keys.stream(p) for p in range(n))],
            [group, n], f"describing {group!r} on {topic!r}")
        holders = {p: o.decode() for p, o in enumerate(owners) if o}
        members = []
        for i in range(0, len(flat), 2):
            member, joined = flat[i].decode(), flat[i + 1]
            members.append(MemberView(
                member, datetime.fromtimestamp(int(joined) / 1000, UTC) if joined else None,
                tuple(p for p, owner in sorted(holders.items()) if owner == member)))
        partitions = []
        for part in view.partitions:
            count = int(published[part.partition])
            partitions.append(replace(part, owner=holders.get(part.partition), published=count if count >= 0 else None))
        return replace(view, partitions=tuple(partitions), members=tuple(members))

    async def topics(self) -> dict[str, list[str]]:
        """Topics from their ``meta`` keys (SCAN), groups from partition 0's stream groups and
        from the groups' dead letters."""
        found: dict[str, set[str]] = {}
        try:
            async for raw in self.redis.scan_iter(match=f"{self.prefix}:{{*}}:meta", count=1000):
                base = (raw.decode() if isinstance(raw, bytes) else str(raw))[len(self.prefix) + 2:-len("}:meta")]
                if "}" not in base:
                    found.setdefault(base, set())
            for topic, groups in found.items():
                keys = self.keys(topic)
                if await self.redis.exists(keys.stream(0)):
                    for info in await self.redis.xinfo_groups(keys.stream(0)):
                        name = info.get("name")
                        groups.add(name.decode() if isinstance(name, bytes) else str(name))
                async for raw in self.redis.scan_iter(match=f"{keys.base}:dead:*", count=1000):
                    key = raw.decode() if isinstance(raw, bytes) else str(raw)
                    groups.add(key[len(f"{keys.base}:dead:"):])
        except REDIS_ERRORS as exc:
            raise translate(exc, "listing topics and groups", self.user) from exc
        return {topic: sorted(groups) for topic, groups in sorted(found.items())}

    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        entries = await self._entries(self.keys(topic).dead(group), f"reading dead letters of {group!r} on {topic!r}")
        return [_dead_letter(topic, group, fields) for _entry_id, fields in entries]

    async def remove_dead_letters(self, topic: str, group: str, message_ids: Sequence[str]) -> int:
        wanted = {m.encode() for m in message_ids}
        key = self.keys(topic).dead(group)
        doing = f"removing dead letters of {group!r} on {topic!r}"
        entries = await self._entries(key, doing)
        doomed = [entry_id for entry_id, fields in entries if fields.get(b"i") in wanted]
        try:
            return int(await self.redis.xdel(key, *doomed)) if doomed else 0
        except REDIS_ERRORS as exc:
            raise translate(exc, doing, self.user) from exc

    async def remove_listed_dead_letters(self, topic: str, group: str, letters: Sequence[DeadLetter]) -> int:
        listed = {letter_key(letter) for letter in letters}
        key = self.keys(topic).dead(group)
        doing = f"removing dead letters of {group!r} on {topic!r}"
        entries = await self._entries(key, doing)
        doomed = [entry_id for entry_id, fields in entries
                  if letter_key(_dead_letter(topic, group, fields)) in listed]
        try:
            return int(await self.redis.xdel(key, *doomed)) if doomed else 0
        except REDIS_ERRORS as exc:
            raise translate(exc, doing, self.user) from exc

    async def _entries(self, key: str, doing: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        try:
            entries = await self.redis.xrange(key, "-", "+")
        except REDIS_ERRORS as exc:
            raise translate(exc, doing, self.user) from exc
        return cast("list[tuple[bytes, dict[bytes, bytes]]]", entries or [])

    # -- membership and leases -----------------------------------------------------------------

    async def heartbeat(self, topic: str, group: str, member_id: str, ttl: float) -> list[str]:
        keys = self.keys(topic)
        members = await self.call("HEARTBEAT", [keys.members(group), keys.joined(group)], [member_id, int(ttl * 1000)],
                                  f"heartbeat of {group!r} on {topic!r}")
        return sorted(m.decode() for m in members)

    async def leave(self, topic: str, group: str, member_id: str) -> None:
        try:
            await self.redis.zrem(self.keys(topic).members(group), member_id)
            await self.redis.hdel(self.keys(topic).joined(group), member_id)
        except REDIS_ERRORS as exc:
            raise translate(exc, f"leaving {group!r} on {topic!r}", self.user) from exc

    async def acquire_lease(self, lane: Lane, member_id: str, ttl: float) -> str | None:
        key = self.keys(lane.topic).lease(lane.group, lane.partition)
        value = await self.call("ACQUIRE", [key], [member_id, _fresh_token(), max(1, int(ttl * 1000))],
                                f"taking the lease of {lane.topic}[{lane.partition}]")
        return value.decode() if value else None

    async def acquire_leases(self, lanes: Sequence[Lane], member_id: str, ttl: float) -> dict[Lane, str]:
        """One script call per topic (its keys share a slot) for all the lanes."""
        taken: dict[Lane, str] = {}
        by_topic: dict[str, list[Lane]] = {}
        for lane in lanes:
            by_topic.setdefault(lane.topic, []).append(lane)
        for topic, some in by_topic.items():
            keys = self.keys(topic)
            values = await self.call("ACQUIRE_MANY", [keys.lease(lane.group, lane.partition) for lane in some],
                                     [member_id, max(1, int(ttl * 1000)), *(_fresh_token() for _ in some)],
                                     f"taking the leases of {len(some)} lane(s) of {topic}")
            taken.update((lane, value.decode()) for lane, value in zip(some, values, strict=True) if value)
        return taken

    async def renew_leases(self, leases: Mapping[Lane, str], ttl: float) -> set[Lane]:
        """One script call per topic and group, the leases packed into one argument."""
        by_group: dict[tuple[str, str], list[Lane]] = {}
        for lane in leases:
            by_group.setdefault((lane.topic, lane.group), []).append(lane)
        kept: set[Lane] = set()
        for (topic, group), lanes in by_group.items():
            keys = self.keys(topic)
            spec = ";".join(f"{lane.partition} {leases[lane]}" for lane in lanes)
            lost = await self.call("RENEW", [keys.meta], [max(1, int(ttl * 1000)), keys.base, group, spec],
                                   f"renewing the leases of {group!r} on {topic!r}")
            gone = {int(p) for p in lost}
            kept.update(lane for lane in lanes if lane.partition not in gone)
        return kept

    async def release_lease(self, lane: Lane, token: str) -> None:
        key = self.keys(lane.topic).lease(lane.group, lane.partition)
        await self.call("RELEASE", [key], [token], f"releasing the lease of {lane.topic}[{lane.partition}]")


class RedisLaneConsumer(LaneConsumer):
    """One member's reader of one (topic, group): fenced reads and settles, buffered acks,
    one blocking wait across all its lanes on a connection of its own."""

    def __init__(self, transport: RedisTransport, topic: str, group: str, member_id: str) -> None:
        self._transport = transport
        self._topic = topic
        self._group = group
        self._member = member_id
        self._keys = transport.keys(topic)
        self._tokens: dict[int, str] = {}
        self._specs: dict[int, str] = {}
        """Each open lane as the READ script takes it: "<partition> <token or -> <cursor>", the cursor
        being the last entry id handed out."""
        self._short: dict[int, str] = {}
        """Each open lane held by a lease of this member's as a wait's READ takes it (see ``_compact``)."""
        self._acks: dict[int, tuple[str, list[bytes]]] = {}
        self._ack_count = 0
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._reader: Reader | None = None
        self._stopped = False
        self._idle: set[int] = set()
        """Lanes that had nothing at their last read (see IDLE_RECHECK)."""
        self._notified = ""
        """The cursor in the topic's notify stream ('' before the first read)."""
        self._recheck_at = time.monotonic() + IDLE_RECHECK
        self._turn = 0
        self._waiting: asyncio.Future[None] | None = None
        """Done when the wait in progress, with its read of the lanes in ``_waiting_lanes``, has
        ended and its deliveries were taken in."""
        self._waiting_lanes: Sequence[int] = ()
        self._closing: set[int] = set()
        """Lanes being closed while a wait that reads them is in progress."""
        self._wake: asyncio.Event | None = None
        self._asked: Sequence[int] = ()
        self._asked_opened = -1
        self._opened = 0
        """Counts the lanes opened and closed (what ``_asked_lanes`` was filtered with)."""
        self._asked_lanes: list[int] = []
        self._asked_set: frozenset[int] = frozenset()
        self._wait_lanes: Sequence[int] | None = None
        self._wait_opened = -1
        self._wait_spec = ("", "")
        """The lanes of the last wait (the list ``poll`` was handed) and their spec (see ``_compact``)."""

    def _lane_keys(self, partition: int) -> list[str]:
        keys = self._keys
        return [keys.stream(partition), keys.lease(self._group, partition), keys.delay(self._group, partition)]

    async def start(self, listener: AssignmentListener, partition: int | None) -> None:
        await self._transport.create_groups(self._topic, self._group)
        self._transport.run_mover(self._topic)  # due scheduled messages move while a member runs
        reader = self._reader = Reader(self._transport.connections, self._keys.meta)
        await reader.open()

    async def open_lane(self, partition: int, lease: str | None) -> None:
        self._tokens[partition] = token = lease or ""
        self._specs[partition] = f"{partition} {token or '-'} 0-0"  # the lane's unsettled history first
        prefix = f"{self._member}/"
        if token.startswith(prefix):
            self._short[partition] = f"{partition} {token[len(prefix):]}"
        else:
            self._short.pop(partition, None)
        self._idle.discard(partition)
        self._opened += 1

    async def close_lane(self, partition: int) -> None:
        self._closing.add(partition)  # no wait that starts from now on reads it
        try:
            waiting = self._waiting
            if waiting is not None and partition in self._waiting_lanes:
                # A wait in progress reads this lane as soon as something is appended to it: cut
                # it short and let it finish, so that what it read is handed back (unread) while
                # this member still holds the lane, rather than left counted as a delivery to it.
                if self._wake is not None:
                    self._wake.set()
                with contextlib.suppress(Exception):
                    await asyncio.shield(waiting)
            await self.flush_acks()
        finally:
            self._closing.discard(partition)
            self._tokens.pop(partition, None)
            self._specs.pop(partition, None)
            self._short.pop(partition, None)
            self._idle.discard(partition)
            self._opened += 1
            dropped = self._acks.pop(partition, None)
            if dropped:
                self._ack_count -= len(dropped[1])
                log.warning("redis: %d ack(s) on %s[%d] could not be written; those messages will be redelivered",
                            len(dropped[1]), self._topic, partition)

    # -- reading -------------------------------------------------------------------------------

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        tokens = self._tokens
        # The engine hands the same tuple while its lanes do not change: a thousand lanes are
        # not walked at every poll.
        if partitions is self._asked and self._opened == self._asked_opened:
            lanes, asked = self._asked_lanes, self._asked_set
        else:
            lanes = [p for p in partitions if p in tokens]
            asked = frozenset(lanes)  # a set: ``idle >= asked`` then builds none at every poll
            self._asked, self._asked_opened, self._asked_lanes, self._asked_set = (
                partitions, self._opened, lanes, asked)
        if self._stopped or not lanes:
            return []
        if time.monotonic() >= self._recheck_at:
            self._recheck_at = time.monotonic() + IDLE_RECHECK
            self._idle.clear()
        idle = self._idle
        waited = False
        self._wake = wake
        for _ in range(4):
            active = [] if idle >= asked else [p for p in lanes if p not in idle and p in tokens]
            # Every lane idle and the notify cursor known: nothing to read until a notification
            # comes, and the blocking read below returns at once when one came since the cursor.
            if active or waited or not self._notified or timeout <= 0:
                truncated = len(active) > READ_LANES
                if truncated:
                    start = self._turn % len(active)
                    self._turn += READ_LANES
                    active = (active[start:] + active[:start])[:READ_LANES]
                deliveries, more, notified = await self._read(active, max_per_lane)
                more = more or truncated
                if deliveries or more or timeout <= 0 or wake.is_set() or self._stopped:
                    return deliveries
                if any(p in notified and p in tokens for p in lanes):
                    continue  # an idle lane has new entries: read it now
                if waited:
                    return []
                if not any(p in idle for p in lanes):  # every lane is fenced: the lease coordinator will notice
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout)
                    return []
            else:
                # Let the lanes this poll's caller just handed deliveries to start their
                # handlers before the blocking read is set up (it waits for the next publish).
                await asyncio.sleep(0)
                if wake.is_set() or self._stopped:
                    return []
                if not self._transport.cluster:
                    # On one server the read of the lanes goes in the same write as the wait,
                    # behind it on its connection: Redis runs it as soon as the wait returns.
                    done, deliveries, more = await self._wait_and_read(lanes, max_per_lane, timeout, wake)
                    if done:
                        if deliveries or more or wake.is_set() or self._stopped:
                            return deliveries
                        if idle >= asked or idle.issuperset(p for p in lanes if p in tokens):
                            return []  # the timeout, or notifications of lanes not asked for now
                        waited = True  # a lane was named but not read (notifications missed): read it
                        continue
            woken = await self._wait_for_notification(timeout, wake)
            if woken is None:
                return []
            # The lanes the notifications name are read by the next read, which also takes in
            # the notify stream from the cursor (and sees whether entries were trimmed past it).
            idle -= woken
            waited = True
        return []

    async def _wait_for_notification(self, timeout: float, wake: asyncio.Event) -> set[int] | None:
        """Block (XREAD on the topic's notify stream, no group state touched) until a publish
        appends to the topic, the timeout passes, or ``wake`` is set (then the blocked read is cut
        short with CLIENT UNBLOCK). The lanes the first notifications after the cursor name
        (possibly none), or None when nothing was appended."""
        reader = self._reader
        if reader is None:
            return None
        waits = {self._keys.notify: self._notified.encode() or b"$"}
        reply = await reader.block(waits, timeout, wake, f"waiting for {self._topic}", NOTIFY_PEEK)
        if not reply:
            return None
        woken: set[int] = set()
        for entries in (reply.values() if isinstance(reply, dict) else (item[1] for item in reply)):
            for _entry_id, fields in entries:
                lanes = fields.get(b"p") if isinstance(fields, dict) else None
                if lanes:
                    woken.update(int(p) for p in lanes.split(b","))
        return woken

    async def _wait_and_read(self, lanes: list[int], count: int, timeout: float,
                             wake: asyncio.Event) -> tuple[bool, list[Delivery], bool]:
        """Block on the notify stream with the READ of the idle ``lanes`` pipelined behind it
        (the script reads those the notifications since the cursor name): one round trip from a
        publish to its delivery. Returns whether it ran (False: the script was not loaded), the
        deliveries and whether a lane has more.

        The lanes go as partition and lease token only (the tokens' common start once): an idle
        lane has no history after its cursor, so the script reads its new entries. A wait whose
        reply is not taken in (an error, a cancel) leaves its lanes not idle, so the next poll
        reads them from their cursors (what that lost reply held is their history then)."""
        reader = self._reader
        tokens, closing = self._tokens, self._closing
        if not closing and lanes is self._wait_lanes and self._wait_opened == self._opened:
            prefix, spec = self._wait_spec  # the lanes and their leases did not change: no walk
        else:
            if closing:
                lanes = [p for p in lanes if p in tokens and p not in closing]
            prefix, spec = self._compact(lanes)
            if not closing:
                self._wait_lanes, self._wait_opened, self._wait_spec = lanes, self._opened, (prefix, spec)
        if reader is None or not lanes:
            return False, [], False
        args = [self._group, self._keys.base, self._transport.partitions, count,
                spec, READ_BUDGET, self._notified, "1", prefix]
        waiting = self._waiting = asyncio.get_running_loop().create_future()
        self._waiting_lanes = lanes
        taken = False
        try:
            result = await reader.block_and_run(
                {self._keys.notify: self._notified.encode()}, timeout, wake, f"waiting for {self._topic}", 1,
                self._transport.script("READ"), [self._keys.meta], args)
            if result is None:
                return True, [], False  # woken while the server did not answer: the reply is lost
            _appended, reply = result
            if isinstance(reply, rex.NoScriptError):
                return False, [], False  # the server lost it (a restart): the plain read loads it
            if isinstance(reply, Exception):
                raise translate(reply, f"reading {self._topic} for {self._group}", self._transport.user) from reply
            deliveries, more, _notified = self._take(reply)
            taken = True
            if closing and deliveries:
                back = [d for d in deliveries if d.partition in closing]
                if back:
                    deliveries = [d for d in deliveries if d.partition not in closing]
                    with contextlib.suppress(MsgBrokerError):
                        await self.unread(back)
            return True, deliveries, more
        finally:
            if not taken:
                self._idle.difference_update(lanes)
            self._waiting, self._waiting_lanes = None, ()
            waiting.set_result(None)

    def _compact(self, lanes: Sequence[int]) -> tuple[str, str]:
        """The lanes as the wait's READ takes them: "<partition> <token>;...", each token without
        the start all of them share (this member's id: its leases are "<member>/<token>")."""
        short = self._short
        try:
            return f"{self._member}/", ";".join([short[p] for p in lanes])
        except KeyError:  # a lane without a lease of this member's: each token whole
            tokens = self._tokens
            return "", ";".join([f"{p} {tokens[p] or '-'}" for p in lanes])

    async def _read(self, lanes: list[int], count: int) -> tuple[list[Delivery], bool, set[int]]:
        """Read these lanes (their pending history after the cursor, then new entries) and the
        notifications since the last read: returns the deliveries, whether a lane has more, and
        the lanes notified (no longer idle). A lane that had nothing becomes idle."""
        reader = self._reader
        if reader is None:
            raise BrokerClosedError("the redis consumer is stopped")
        specs = self._specs
        args = [self._group, self._keys.base, self._transport.partitions, count, ";".join([specs[p] for p in lanes]),
                READ_BUDGET, self._notified]
        # The script derives the lanes' keys from the base; the meta key, in the same slot,
        # routes the call on a Redis Cluster.
        reply = await self._transport.call("READ", [self._keys.meta], args, f"reading {self._topic} for {self._group}",
                                           await reader.script_client())
        return self._take(reply)

    def _take(self, reply: bytes) -> tuple[list[Delivery], bool, set[int]]:
        """Take in a READ reply: the notify cursor, the lanes notified, each lane's entries."""
        deliveries: list[Delivery] = []
        idle = self._idle
        more = False
        (size,) = _LENGTH.unpack_from(reply, 0)
        self._notified = reply[4:4 + size].decode()
        missed, size_notified = _HEAD.unpack_from(reply, 4 + size)
        pos = 12 + size
        notified = {int(p) for p in reply[pos:pos + size_notified].split(b",") if p}
        pos += size_notified
        if missed:
            notified |= idle
            idle.clear()
        else:
            notified &= idle
            idle -= notified
        end = len(reply)
        tokens = self._tokens
        while pos < end:
            partition, status, size = _LANE.unpack_from(reply, pos)
            start, pos = pos + 12, pos + 12 + size
            if status == 2:
                continue  # fenced: the lease coordinator will notice
            more = more or status == 1
            if partition not in tokens:
                continue  # closed meanwhile: the entries stay pending for the lane's next owner
            if start < pos:
                cursor = _unpack(reply, start, pos, partition, deliveries).decode()
                self._specs[partition] = f"{partition} {tokens[partition] or '-'} {cursor}"
            if status == 3:
                idle.add(partition)  # drained: read again once the notify stream names it
        return deliveries, more, notified

    # -- settling ------------------------------------------------------------------------------

    async def ack(self, delivery: Delivery) -> None:
        partition = delivery.partition
        token = self._tokens.get(partition)
        if token is None:
            log.warning("redis: ack of %s dropped: %s[%d] is not open here", delivery.message_id, self._topic,
                        partition)
            return
        buffered = self._acks.get(partition)
        if buffered is None or buffered[0] != token:
            buffered = self._acks[partition] = (token, [])
        buffered[1].append(delivery.position)
        self._ack_count += 1
        # A full batch is written now, unless a write is in progress: then the acks after it
        # wait for the next ack or the flusher. Queueing every ack past the mark behind that
        # write (as before) made each of them a write of its own once the lock came round: with
        # a thousand lanes acking at once, 14 acks a write instead of 100.
        if self._ack_count >= ACK_BATCH and not self._flush_lock.locked():
            with contextlib.suppress(MsgBrokerError):
                await self.flush_acks()  # a failure leaves them buffered for the flusher
        if self._ack_count and self._flusher is None and not self._stopped:
            self._flusher = asyncio.create_task(self._flush_soon(), name=f"msgbroker-redis-acks-{self._topic}")

    async def _flush_soon(self) -> None:
        pause = ACK_LINGER
        try:
            while self._ack_count and not self._stopped:
                await asyncio.sleep(pause)
                try:
                    await self.flush_acks()
                    pause = ACK_LINGER
                except MsgBrokerError as exc:
                    pause = min(1.0, max(0.05, pause * 2))
                    log.warning("redis: writing acks of %s failed (%s); again in %.2fs", self._topic, exc, pause)
        finally:
            self._flusher = None

    async def flush_acks(self) -> None:
        """Write the buffered acks now (fenced: acks of a lane whose lease is gone are dropped)."""
        async with self._flush_lock:
            if not self._acks:
                return
            batch, self._acks, self._ack_count = self._acks, {}, 0
            spec = b";".join(b"%d %s %s" % (p, (token or "-").encode(), b" ".join(ids))
                             for p, (token, ids) in batch.items())
            try:
                fenced = await self._write_acks([self._keys.meta], [self._group, self._keys.base, spec])
            except MsgBrokerError:
                for p, (token, ids) in batch.items():  # keep them, oldest first, for the next try
                    current = self._acks.get(p)
                    if current is not None and current[0] == token:
                        current[1][:0] = ids
                    elif current is None:
                        self._acks[p] = (token, ids)
                    self._ack_count += len(ids)
                raise
            for partition in fenced:
                p = int(partition)
                log.warning("redis: %d ack(s) on %s[%d] dropped: this member no longer holds the lane "
                            "(they will be redelivered to its owner)", len(batch[p][1]), self._topic, p)

    async def _write_acks(self, keys: list[str], args: list[Any]) -> Any:
        """The ACK script; with ``redis.wait_replicas``, then a WAIT for the replicas (an ack they do
        not have when the primary fails comes back as a redelivery, not a loss)."""
        transport, doing = self._transport, f"acking on {self._topic}"
        if not transport.wait_replicas:
            return await transport.call("ACK", keys, args, doing)
        [fenced], confirmed = await transport.call_replicated("ACK", [(keys, args)], doing)
        if isinstance(fenced, Exception):
            raise translate(fenced, doing) from fenced
        if confirmed < transport.wait_replicas:
            log.debug("redis: acks on %s are on %d of %d replica(s)", self._topic, confirmed, transport.wait_replicas)
        return fenced

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        partition = delivery.partition
        token = self._tokens.get(partition)
        if token is None:
            return
        result = await self._transport.call(
            "RETRY", self._lane_keys(partition),
            [self._group, str(partition), token, delivery.position, attempt, repr(not_before) if not_before else "",
             "" if delivery.failures is None else delivery.failures],
            f"recording a retry on {self._topic}[{partition}]",
        )
        if int(result) < 0:
            log.warning("redis: retry of %s not recorded: this member no longer holds %s[%d]",
                        delivery.message_id, self._topic, partition)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        partition = delivery.partition
        token = self._tokens.get(partition)
        if token is None:
            return
        transport = self._transport
        record = dead_letter_record(letter)
        dlq = transport.keys(record.topic)
        # The group's dead-letter stream holds each letter as its <topic>.dlq record (the fields of a
        # lane entry); the script writes it there and to the dlq lane.
        entry = [_utf8(record.message_id), _utf8(record.key), _utf8(_encode_headers(record.headers)), record.body]
        pairs: list[Any] = ["i", entry[0], "k", entry[1], "h", entry[2], "b", entry[3]]
        keys = [*self._lane_keys(partition), self._keys.dead(self._group), dlq.stream(record.partition), dlq.meta]
        args: list[Any] = [self._group, token, delivery.position, transport.max_stream_length, transport.trim_slack,
                           transport.partitions, len(pairs) // 2, *pairs, *entry]
        result = await transport.call("DEAD_LETTER", keys, args, f"dead-lettering on {self._topic}[{partition}]")
        if int(result) < 0:
            log.warning("redis: dead letter of %s not written: this member no longer holds %s[%d] "
                        "(its owner will handle it)", delivery.message_id, self._topic, partition)

    async def unread(self, deliveries: Sequence[Delivery]) -> None:
        by_lane: dict[int, list[bytes]] = {}
        for delivery in deliveries:
            by_lane.setdefault(delivery.partition, []).append(b"%s=%d" % (delivery.position, delivery.attempt))
        for partition, ids in by_lane.items():
            token = self._tokens.get(partition)
            if token is not None:
                await self._transport.call(
                    "UNREAD", self._lane_keys(partition)[:2], [self._group, token, b" ".join(ids)],
                    f"handing back read-ahead entries of {self._topic}[{partition}]",
                )

    async def stop(self, flush: bool) -> None:
        if flush and not self._stopped:
            try:
                await self.flush_acks()
            except MsgBrokerError as exc:
                log.warning("redis: %d buffered ack(s) on %s could not be written (%s); those messages will "
                            "be redelivered", self._ack_count, self._topic, exc)
        self._stopped = True
        self._acks.clear()
        self._ack_count = 0
        self._tokens.clear()
        self._specs.clear()
        self._short.clear()
        self._opened += 1
        flusher, self._flusher = self._flusher, None
        if flusher is not None and flusher is not asyncio.current_task():
            await cancel_and_wait([flusher])
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()

