"""``kafka://`` — the Apache Kafka provider (aiokafka).

A msgbroker topic is a Kafka topic with ``partition_count`` partitions; a msgbroker group is
a Kafka consumer group with Kafka's own assignment (see ``_consumer.py``). Dead letters go to
``<topic>.dlq`` (same partition count, same partition as the original, so it can be
subscribed to like any topic). Kafka cannot delete single records, so removing a dead letter
appends a marker naming it to ``<topic>.dlq.removed``, which readers apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType  # type: ignore[import-untyped]
from aiokafka.conn import AIOKafkaConnection  # type: ignore[import-untyped]
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]
from msgbroker.spi import (
    DEAD_LETTER_GROUP,
    DEAD_LETTER_TOPIC_SUFFIX,
    DEAD_LETTERS_REMOVED_HEADER,
    AccessDeniedError,
    BrokerClosedError,
    BrokerConnectionError,
    BrokerSettings,
    Capabilities,
    ConfigurationError,
    DeadLetter,
    GroupView,
    LaneConsumer,
    MsgBrokerError,
    OutgoingRecord,
    PublishIndeterminateError,
    ReplySink,
    Transport,
    dead_letter_from_record,
    dead_letter_group,
    dead_letter_record,
    dead_letter_topic,
    describe_from_interface,
    letter_key,
    tls_client_context,
    tls_verification_error,
)

from ._clients import start_client
from ._consumer import KafkaLaneConsumer
from ._describe import with_group_members
from ._errors import GRANT, access_denied, map_error
from ._host import Flushable
from ._logs import hide_sasl_bytes
from ._records import MESSAGE_ID_HEADER, decode_headers, encode_headers
from ._replies import ReplyInbox, send_reply
from ._schedule import Schedules
from ._settings import KafkaSettings

__all__ = [
    "DEAD_LETTER_TOPIC_SUFFIX",
    "MESSAGE_ID_HEADER",
    "KafkaTransport",
    "dead_letter_topic",
]

log = logging.getLogger("msgbroker.kafka")
hide_sasl_bytes()

MOVER_AFTER_SUBSCRIBE = 1.0
"""Seconds after a subscribe that its connection's schedule mover joins the movers' group
(scheduling or cancelling starts it at once)."""
REMOVED_TOPIC_SUFFIX = ".removed"
"""``<topic>.dlq.removed`` holds the markers of removed letters (headers: the group and
``msgbroker-dead-letters-removed``, the ``partition:offset`` of each)."""
_TOPIC_EXISTS = 36
_PRODUCER_STATE_LOST = (
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.UnknownProducerId,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.ProducerFenced,
)
"""The broker lost the idempotent producer's sequence state (seen after a broker restart); the
producer is useless from then on (aiokafka#1017) and is replaced by a new one."""
_TOPIC_AUTHORIZATION_FAILED = 29
_ADMIN_TIMEOUT = 15.0
_LOGIN_REFUSED_FOR = 20.0
"""Seconds a login must be refused in a row, in session, before the transport gives up on it."""
_TLS_PROTOCOLS = ("SSL", "SASL_SSL")
_PREFIX = re.compile(r"[A-Za-z0-9_\-]{1,100}")


class KafkaTransport(Transport):
    """``kafka://host:port[,host:port...]`` — one connection to one Kafka cluster."""

    NAME: ClassVar[str] = "kafka"
    SCHEMES: ClassVar[tuple[str, ...]] = ("kafka",)
    SETTINGS = KafkaSettings
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        retains_before_group=True,
        competing_consumers=True,
        redelivery_on_crash=True,
        kill_member=True,
        delay=True,
        deduplication="none",
        pending_count_exact=True,
        partition_exclusive=True,
        server_restart=True,
        max_message_bytes=1_000_000,
        request_reply=True,
        scheduling="store",
        schedule_precision=1.0,
        reasons={
            "deduplication": (
                "Kafka's idempotent producer only drops its own retries within one producer session; "
                "a second publish of the same message id is a new record, and keeping a shared store "
                "of ids would need a server Kafka does not have"
            ),
        },
    )
    ASSIGNMENT = "native"
    REDELIVERY = "local"
    MAX_POLL_BLOCK: ClassVar[float] = 0.25

    @classmethod
    def settings_from_url(cls, url: str) -> dict[str, Any]:
        parts = urlsplit(url)
        servers = unquote(parts.netloc.rsplit("@", 1)[-1])
        return {"kafka": {"bootstrap_servers": servers}} if servers else {}

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__(settings)
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._offsets: AIOKafkaConsumer | None = None
        self._offsets_lock = asyncio.Lock()
        self._inbox: ReplyInbox | None = None
        self._topics: dict[str, int] = {}
        self._topic_lock = asyncio.Lock()
        self._replication: int | None = settings.kafka.replication_factor
        """Replicas of the topics this transport creates: the setting, or the brokers' default once read."""
        insync = settings.kafka.min_insync_replicas
        if insync is not None and self._replication is not None and insync > self._replication:
            raise ConfigurationError(
                f"kafka.min_insync_replicas={insync} is more than kafka.replication_factor={self._replication}: "
                "no acks=all produce could ever be confirmed"
            )
        prefix = settings.kafka.name_prefix
        if prefix and not _PREFIX.fullmatch(prefix):
            raise ConfigurationError(
                f"kafka.name_prefix={prefix!r} must be 1-100 characters of A-Z a-z 0-9 _ - (no dot: the provider "
                "adds one, and a prefix with a dot could be the start of another's)"
            )
        self._prefix = f"{prefix}." if prefix else ""
        self.user: str | None = settings.kafka.sasl_username if settings.kafka.sasl_mechanism else None
        """The SASL user, named in refusals (None: ANONYMOUS, or a TLS client certificate's name)."""
        self.refused: AccessDeniedError | None = None
        """The brokers refused this connection's login in session (see :meth:`login_refused`): for
        good, every later call raises it."""
        self._login_check: asyncio.Future[AccessDeniedError | None] | None = None
        self._login_checked = 0.0
        self._refused_since: float | None = None
        """When the probes of :meth:`login_refused` began to be refused (monotonic), without an
        accepted one since."""
        self._stopping_clients: asyncio.Task[None] | None = None
        self._producer_lock = asyncio.Lock()
        self.consumers: set[Flushable] = set()
        """The running consumers of this transport (each adds itself at start)."""
        self.schedules = Schedules(self)
        """Scheduled messages: the schedule topic, this connection's mover (``_schedule.py``)."""

    def _who(self) -> str:
        return f"user {self.user!r}" if self.user else "the connection's user"

    def kafka_name(self, name: str) -> str:
        """The Kafka topic or consumer group name of a msgbroker topic or group: with
        ``kafka.name_prefix`` and a dot in front."""
        return self._prefix + name

    def error(self, exc: BaseException, doing: str, *, publishing: bool = False) -> MsgBrokerError:
        """:func:`map_error` naming this connection's user in a refusal."""
        return map_error(exc, doing, publishing=publishing, user=self.user)

    async def describe(self, topic: str, group: str) -> GroupView:
        """The default view plus the group coordinator's members and their assignment (``_describe``)."""
        view = await describe_from_interface(self, topic, group, knows_members=True)
        try:
            described = await self.admin.describe_consumer_groups([self.kafka_name(group)])
        except MsgBrokerError:
            raise
        except Exception as exc:
            raise self.error(exc, f"describing group {self.kafka_name(group)!r}") from exc
        return with_group_members(view, described, self.kafka_name(topic))

    def lease_ttl(self) -> float:
        """The group's session timeout: how long a silent member keeps its partitions (what the
        conformance suite derives its failover bounds from)."""
        return float(self.settings.kafka.session_timeout.total_seconds())

    # -- connection -----------------------------------------------------------------------------

    def client_options(self) -> dict[str, Any]:
        """Connection options shared by every aiokafka client of this transport."""
        if self.refused is not None:
            raise AccessDeniedError(str(self.refused))  # no new client for a refused login
        kafka = self.settings.kafka
        options: dict[str, Any] = {
            "bootstrap_servers": kafka.bootstrap_servers,
            "client_id": kafka.client_id,
            "security_protocol": kafka.security_protocol,
        }
        if kafka.security_protocol in _TLS_PROTOCOLS:
            options["ssl_context"] = tls_client_context(
                "kafka", kafka.ssl_cafile, kafka.ssl_certfile, kafka.ssl_keyfile
            )
        elif kafka.ssl_cafile or kafka.ssl_certfile:
            raise ConfigurationError(
                f"kafka.ssl_cafile / ssl_certfile are set, but kafka.security_protocol={kafka.security_protocol!r} "
                "does not use TLS (use 'SSL' or 'SASL_SSL')"
            )
        if kafka.sasl_mechanism:
            options["sasl_mechanism"] = kafka.sasl_mechanism
            options["sasl_plain_username"] = kafka.sasl_username
            options["sasl_plain_password"] = kafka.sasl_password
        return options

    @property
    def producer(self) -> AIOKafkaProducer:
        if self.refused is not None:
            raise AccessDeniedError(str(self.refused))
        if self._producer is None:
            raise BrokerClosedError("the kafka connection is closed")
        return self._producer

    @property
    def admin(self) -> AIOKafkaAdminClient:
        if self.refused is not None:
            raise AccessDeniedError(str(self.refused))
        if self._admin is None:
            raise BrokerClosedError("the kafka connection is closed")
        return self._admin

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self.client_options(),
            acks="all",
            enable_idempotence=True,
            # no linger: a lone publish() is sent at once (2 ms of linger were most of its
            # latency); concurrent publishes still share requests, as records accumulate while
            # one is in flight, and publish_batch appends every record before the first send
            linger_ms=0,
            max_request_size=1024 * 1024,
        )

    async def _produce_failed(self, exc: Exception, doing: str, broken: AIOKafkaProducer) -> MsgBrokerError:
        """The error to raise for a failed produce; replaces a producer whose idempotence state
        the broker lost (the records may or may not have been written: a retry may duplicate)."""
        if not isinstance(exc, _PRODUCER_STATE_LOST):
            error = self.error(exc, doing, publishing=True)
            if isinstance(error, PublishIndeterminateError) and self.user:
                # a timeout or a lost connection: is it a login refused in session?
                refused = await self.login_refused()
                if refused is not None:
                    return AccessDeniedError(f"{refused} (while {doing})")
            return error
        async with self._producer_lock:
            if self._producer is broken:
                log.warning("kafka: the broker lost this producer's sequence state (%s); starting a new producer", exc)
                fresh = self._new_producer()
                try:
                    await start_client(fresh)
                except Exception as start_exc:
                    with contextlib.suppress(Exception):
                        await fresh.stop()
                    return self.error(start_exc, "restarting the producer", publishing=True)
                self._producer = fresh
                stale: Any = broken
                with contextlib.suppress(Exception):
                    await stale.stop()
        return PublishIndeterminateError(f"kafka: {doing} failed: {type(exc).__name__}: {exc}; retry")

    async def connect(self) -> None:
        options = self.client_options()
        producer = self._new_producer()
        admin = AIOKafkaAdminClient(**options, request_timeout_ms=int(_ADMIN_TIMEOUT * 1000))
        try:
            await start_client(producer)
            await start_client(admin)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            with contextlib.suppress(Exception):
                await admin.close()
            if "ssl_context" in options:
                untrusted = await self._tls_refusal(options["ssl_context"])
                if untrusted is not None:
                    raise untrusted from exc
            if "sasl_mechanism" in options:
                refused = await self._login_refusal(options)
                if refused is not None:
                    raise refused from exc
            denied = access_denied(
                exc, "starting the idempotent producer (it needs Write on some topic, or IdempotentWrite on the "
                "Cluster)", self.user)
            if denied is not None:
                raise denied from exc
            raise BrokerConnectionError(
                f"cannot connect to kafka at {self.settings.kafka.bootstrap_servers}: {exc}"
            ) from exc
        self._producer, self._admin = producer, admin

    async def _tls_refusal(self, context: ssl.SSLContext) -> ConfigurationError | None:
        """Why the first bootstrap server's TLS handshake fails, when it is its certificate:
        aiokafka only logs that and reports "Unable to bootstrap", so one handshake finds out."""
        first = self.settings.kafka.bootstrap_servers.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        if not host or not port.isdigit():
            return None
        try:
            async with asyncio.timeout(5):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port), ssl=context)
        except Exception as exc:
            return tls_verification_error(exc, "kafka", first)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return None

    async def login_refused(self) -> AccessDeniedError | None:
        """In session: do the brokers refuse this connection's login now (its SASL credential
        deleted or changed while it ran)? aiokafka then retries its connections without end,
        each refusal only logged. One probe connection, at most every 2 s (concurrent callers
        share it). A login refused for :data:`_LOGIN_REFUSED_FOR` seconds in a row (not a moment
        of a rotation, or of brokers coming back before their users) is kept for good
        (:attr:`refused`), logged once, and stops the transport's clients, whose reconnecting
        would go on. None without SASL, when accepted, or refused for a shorter time so far."""
        if self.refused is not None or not self.user:
            return self.refused
        check = self._login_check
        if check is None or (check.done() and time.monotonic() - self._login_checked > 2.0):
            self._login_checked = time.monotonic()
            check = self._login_check = asyncio.ensure_future(
                self._login_refusal(self.client_options(), doing="reconnecting to")
            )
        refused = await asyncio.shield(check)
        if refused is None:
            self._refused_since = None
            return None
        if self._refused_since is None:
            self._refused_since = self._login_checked
        log.debug("kafka: the login of user %r is refused (for %.1fs so far)", self.user,
                  time.monotonic() - self._refused_since)
        if time.monotonic() - self._refused_since < _LOGIN_REFUSED_FOR:
            return None
        if self.refused is None:
            self.refused = refused
            log.error("%s; this connection's clients stop (restart the service once the credentials are valid "
                      "again)", refused)
            self._stopping_clients = asyncio.ensure_future(self._stop_clients())
        return self.refused

    async def _stop_clients(self) -> None:
        """Stop the schedule mover and the producer, admin and offsets clients (their
        reconnecting ends); the transport raises :attr:`refused` from now on."""
        producer, admin, offsets = self._producer, self._admin, self._offsets
        self._producer = self._admin = self._offsets = None
        for stop in (self.schedules.stop, producer.stop if producer else None, offsets.stop if offsets else None,
                     admin.close if admin else None):
            if stop is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(stop(), 10)

    async def _login_refusal(self, options: dict[str, Any], doing: str = "connecting to") -> AccessDeniedError | None:
        """Why the first bootstrap server refuses the login, when it does: aiokafka only logs
        that and reports "Unable to bootstrap", so one connection finds out (not retried)."""
        first = self.settings.kafka.bootstrap_servers.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        if not host or not port.isdigit():
            return None
        keys = ("client_id", "ssl_context", "security_protocol", "sasl_mechanism", "sasl_plain_username",
                "sasl_plain_password")
        # aiokafka's create_conn drops a connection whose login failed after the socket (and TLS)
        # connected, unclosed (aio-libs/aiokafka#715): the probe makes and closes its own.
        conn = AIOKafkaConnection(host.strip("[]"), int(port), request_timeout_ms=5000,
                                  **{k: options[k] for k in keys if k in options})
        try:
            async with asyncio.timeout(5):
                await conn.connect()
        except Exception as exc:
            return access_denied(exc, f"{doing} {self.settings.kafka.bootstrap_servers}", self.user,
                                 self.settings.kafka.sasl_mechanism)
        finally:
            conn.close()
        return None

    async def close(self) -> None:
        await self.schedules.stop()
        inbox, self._inbox = self._inbox, None
        if inbox is not None:
            await inbox.close()
        producer, admin, offsets = self._producer, self._admin, self._offsets
        self._producer = self._admin = self._offsets = None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        if offsets is not None:
            with contextlib.suppress(Exception):
                await offsets.stop()
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()

    async def ping(self) -> bool:
        if self._admin is None:
            return False
        try:
            info = await asyncio.wait_for(self._admin.describe_cluster(), 3.0)
            return bool(info.get("brokers"))
        except Exception:
            return False

    # -- topics ---------------------------------------------------------------------------------

    async def ensure_topic(self, topic: str, partitions: int | None = None) -> int:
        """Create ``topic`` with ``partitions`` (default ``partition_count``) when missing and
        check an existing one has exactly that many; return the count.

        Always create first: a metadata request for a missing topic makes a broker with
        ``auto.create.topics.enable`` create it with its default (wrong) partition count.
        """
        wanted = self.settings.partition_count if partitions is None else partitions
        known = self._topics.get(topic)
        if known is None:
            async with self._topic_lock:
                known = self._topics.get(topic)
                if known is None:
                    known = self._topics[topic] = await self._create_or_describe(self.kafka_name(topic), wanted)
        if partitions is None and known != wanted:
            raise ConfigurationError(
                f"kafka topic {self.kafka_name(topic)!r} exists with {known} partitions; this connection has "
                f"partition_count={wanted} (partitions decide ordering: use the topic's count or another topic)"
            )
        return known

    async def _broker_default(self, name: str) -> str | None:
        """A broker configuration value (``default.replication.factor``), asked of the first
        broker of the cluster that answers."""
        admin = self.admin
        cluster = await asyncio.wait_for(admin.describe_cluster(), _ADMIN_TIMEOUT)
        failure: Exception | None = None
        for broker in cluster.get("brokers", []):
            try:
                responses = await asyncio.wait_for(
                    admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, str(broker["node_id"]),
                                                           {name: None})]),
                    _ADMIN_TIMEOUT,
                )
            except Exception as exc:
                failure = exc
                continue
            for response in responses:
                for resource in response.resources:
                    if resource[0]:  # refused: no DescribeConfigs on the cluster
                        error = kafka_errors.for_code(resource[0])
                        raise error(f"{resource[1] or error.description} (DescribeConfigs on the Cluster)")
                    for entry in resource[4]:
                        if entry[0] == name:
                            return str(entry[1])
            return None
        raise failure or BrokerConnectionError("kafka: the cluster lists no broker")

    async def _replication_factor(self) -> int:
        """``kafka.replication_factor``, or the brokers' ``default.replication.factor`` (read
        once): CreateTopics before v4, the newest aiokafka speaks, cannot ask for the default."""
        if self._replication is None:
            try:
                found = await self._broker_default("default.replication.factor")
            except Exception as exc:
                denied = access_denied(exc, "reading the brokers' default.replication.factor", self.user)
                if denied is None:
                    raise
                raise type(denied)(f"{denied}, or set kafka.replication_factor (then it is not read)") from exc
            replication = int(found) if found and found.isdigit() else 1
            insync = self.settings.kafka.min_insync_replicas
            if insync is not None and insync > replication:
                raise ConfigurationError(
                    f"kafka.min_insync_replicas={insync} is more than the brokers' default.replication.factor="
                    f"{replication}: set kafka.replication_factor"
                )
            self._replication = replication
        return self._replication

    def _topic_configs(self) -> dict[str, str]:
        """Configuration of each topic this transport creates."""
        insync = self.settings.kafka.min_insync_replicas
        return {} if insync is None else {"min.insync.replicas": str(insync)}

    async def _create_or_describe(self, topic: str, partitions: int) -> int:
        admin = self.admin
        try:
            replication = await self._replication_factor()
            response = await asyncio.wait_for(
                admin.create_topics([NewTopic(topic, partitions, replication, topic_configs=self._topic_configs())]),
                _ADMIN_TIMEOUT,
            )
            for name, code, message in response.topic_errors:
                if name != topic or code in (0, _TOPIC_EXISTS):
                    continue
                if code == _TOPIC_AUTHORIZATION_FAILED:
                    # No Create on it: fine if it exists (made by an operator) and may be described.
                    [described] = await asyncio.wait_for(admin.describe_topics([topic]), _ADMIN_TIMEOUT)
                    if described["error_code"] == 0 and described["partitions"]:
                        return len(described["partitions"])
                    why = ("it may neither create the topic nor describe it" if described["error_code"] == code
                           else "the topic does not exist and it may not create it")
                    raise AccessDeniedError(
                        f"kafka: creating topic {topic!r} failed: {self._who()} has no permission for it ({why}: "
                        f"TopicAuthorizationFailedError: {message or 'Authorization failed.'}); "
                        f"{GRANT}, or create the topic in advance"
                    )
                error = kafka_errors.for_code(code)
                if getattr(error, "retriable", False):  # e.g. a controller moving to another node
                    raise error(message)
                hint = " (see kafka.replication_factor)" if "eplication" in str(message) else ""
                raise ConfigurationError(f"kafka refused to create topic {topic!r}: error {code}: {message}{hint}")
            deadline = time.monotonic() + _ADMIN_TIMEOUT
            while True:
                [described] = await asyncio.wait_for(admin.describe_topics([topic]), _ADMIN_TIMEOUT)
                count = len(described["partitions"])
                if described["error_code"] == 0 and count:
                    return count
                if described["error_code"] == _TOPIC_AUTHORIZATION_FAILED:
                    raise kafka_errors.TopicAuthorizationFailedError(f"describing topic {topic!r}")
                if time.monotonic() > deadline:  # metadata of a new topic propagates asynchronously
                    raise ConfigurationError(f"kafka topic {topic!r} has no metadata: error {described['error_code']}")
                await asyncio.sleep(0.05)
        except ConfigurationError:
            raise
        except Exception as exc:
            raise self.error(exc, f"creating topic {topic!r}") from exc

    async def _existing_partitions(self, topic: str) -> list[int] | None:
        """The partitions of Kafka topic ``topic`` without creating it, or None when it does not
        exist — or the user may not describe it: the broker lists only the topics it may."""
        try:
            names = await asyncio.wait_for(self.admin.list_topics(), _ADMIN_TIMEOUT)
            if topic not in names:
                return None
            [described] = await asyncio.wait_for(self.admin.describe_topics([topic]), _ADMIN_TIMEOUT)
            if described["error_code"] == _TOPIC_AUTHORIZATION_FAILED:
                raise kafka_errors.TopicAuthorizationFailedError(f"describing topic {topic!r}")
        except Exception as exc:
            raise self.error(exc, f"describing topic {topic!r}") from exc
        return sorted(p["partition"] for p in described["partitions"])

    async def offsets_client(self) -> AIOKafkaConsumer:
        """A group-less consumer used for log start/end offsets, started once. Callers that
        come together wait for the one start: a second client started meanwhile and stopped
        again raised CancelledError to its caller (aiokafka's stop of a consumer just started
        cancels its group coordinator's first task and re-raises that)."""
        if self._offsets is not None:
            return self._offsets
        async with self._offsets_lock:
            if self._offsets is None:
                consumer = AIOKafkaConsumer(**self.client_options(), enable_auto_commit=False)
                try:
                    await start_client(consumer)
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                    raise self.error(exc, "starting the offsets client") from exc
                if self._admin is None:  # the connection closed (or its clients stopped) meanwhile
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                    raise BrokerClosedError("the kafka connection is closed")
                self._offsets = consumer
            return self._offsets

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        if dedup_window is not None:
            self.CAPABILITIES.require("deduplication")
        if self.refused is not None:
            raise AccessDeniedError(str(self.refused))
        if len(records) == 1:
            await self._publish_one(records[0])
            return
        for topic in {r.topic for r in records}:
            await self.ensure_topic(topic)
        producer = self.producer
        try:
            # send() all, then await the confirmations: one round trip per batch, not per record
            futures = [
                await producer.send(
                    self.kafka_name(r.topic),
                    r.body,
                    key=r.key.encode("utf-8"),
                    partition=r.partition,
                    headers=[(MESSAGE_ID_HEADER, r.message_id.encode()), *encode_headers(r.headers)],
                )
                for r in records
            ]
            await asyncio.gather(*futures)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise await self._produce_failed(exc, f"publishing {len(records)} record(s)", producer) from exc

    async def _publish_one(self, record: OutgoingRecord) -> None:
        """One ``publish()``: what :meth:`publish` does for a batch, less what only a batch needs.

        Many callers publishing at once share each produce request (aiokafka sends one request
        per broker at a time, with every record appended meanwhile), so the client's CPU per
        call is what stands between two requests: no set of topics, no ``gather`` (a future
        and a callback more per call, and one more event-loop turn before the caller resumes)."""
        topic = record.topic
        if self._topics.get(topic) != self.settings.partition_count:
            await self.ensure_topic(topic)  # creates, or raises for a count that differs
        producer = self.producer
        headers = [(MESSAGE_ID_HEADER, record.message_id.encode())]
        if record.headers:
            headers.extend(encode_headers(record.headers))
        try:
            confirmed = await producer.send(
                self._prefix + topic, record.body, key=record.key.encode("utf-8"), partition=record.partition,
                headers=headers,
            )
            await confirmed
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise await self._produce_failed(exc, "publishing 1 record(s)", producer) from exc

    # -- request/reply (_replies.py) --------------------------------------------------------------

    async def open_replies(self, deliver: ReplySink) -> str:
        inbox = ReplyInbox(self, deliver)
        address = await inbox.open()
        self._inbox = inbox
        return address

    async def send_reply(self, address: str, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        await send_reply(self, address, request_id, headers, body)

    # -- scheduled messages (_schedule.py) ------------------------------------------------------

    async def schedule(self, record: OutgoingRecord, deliver_at: float) -> None:
        await self.schedules.schedule(record, deliver_at)

    async def cancel_scheduled(self, topic: str, message_id: str) -> bool:
        return await self.schedules.cancel(topic, message_id)

    # -- consuming ------------------------------------------------------------------------------

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        # Due scheduled messages move while a member runs. Its mover joins a second later: its
        # group's join and its reading of the schedule topic took the CPU, the coordinator and
        # the connections while the subscription joined its own group and fetched its first
        # messages (4 worker processes draining a backlog together: their last message
        # 620-840 ms after they subscribed with it, 490-610 ms without).
        self.schedules.run_mover(MOVER_AFTER_SUBSCRIBE)
        return KafkaLaneConsumer(self, topic, group, member_id)

    async def committed_offsets(self, group: str, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, Any]:
        """The committed offsets (``OffsetAndMetadata``) of msgbroker group ``group`` for the Kafka
        ``partitions``; absent when none."""
        name = self.kafka_name(group)
        try:
            found = await asyncio.wait_for(
                self.admin.list_consumer_group_offsets(name, partitions=list(partitions)), _ADMIN_TIMEOUT
            )
        except Exception as exc:
            raise self.error(exc, f"reading committed offsets of group {name!r}") from exc
        return {tp: meta for tp, meta in found.items() if meta.offset >= 0}

    async def pending_count(self, topic: str, group: str) -> int:
        name = self.kafka_name(topic)
        partitions = await self._existing_partitions(name)
        if not partitions:
            return 0
        # settled-but-buffered acks of this process's own members count as settled
        await asyncio.gather(*(c.flush() for c in list(self.consumers) if c.topic == topic and c.group == group))
        tps = [TopicPartition(name, p) for p in partitions]
        committed = await self.committed_offsets(group, tps)
        offsets = await self.offsets_client()
        try:
            ends = await asyncio.wait_for(offsets.end_offsets(tps), _ADMIN_TIMEOUT)
            starts = await asyncio.wait_for(offsets.beginning_offsets(tps), _ADMIN_TIMEOUT)
        except Exception as exc:
            raise self.error(exc, f"reading offsets of topic {name!r}") from exc
        total = 0
        for tp in tps:
            done = committed[tp].offset if tp in committed else starts[tp]
            total += max(0, ends[tp] - max(done, starts[tp]))
        return total

    # -- dead letters ---------------------------------------------------------------------------

    async def write_dead_letter(self, letter: DeadLetter, key: str, message_id: str) -> None:
        """Append ``letter``'s ``<topic>.dlq`` record (msgbroker.wire; ``key`` and ``message_id``
        are the original's, the letter's own) and wait until Kafka confirmed it (acks=all)."""
        record = dead_letter_record(letter)
        await self.ensure_topic(record.topic)
        producer = self.producer
        name = self.kafka_name(record.topic)
        try:
            await producer.send_and_wait(
                name,
                record.body,
                key=key.encode("utf-8"),
                partition=record.partition,
                headers=[(MESSAGE_ID_HEADER, message_id.encode()), *encode_headers(record.headers)],
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise await self._produce_failed(exc, f"writing a dead letter to {name!r}", producer) from exc

    async def _read_topic(self, topic: str) -> list[tuple[int, int, Any]]:
        """Every record of msgbroker topic ``topic`` (a ``.dlq``) as (partition, offset, record),
        oldest first."""
        dlq = self.kafka_name(topic)
        partitions = await self._existing_partitions(dlq)
        if not partitions:
            return []
        tps = [TopicPartition(dlq, p) for p in partitions]
        reader = AIOKafkaConsumer(**self.client_options(), enable_auto_commit=False, auto_offset_reset="earliest")
        out: list[tuple[int, int, Any]] = []
        try:
            await start_client(reader)
            reader.assign(tps)
            ends = await asyncio.wait_for(reader.end_offsets(tps), _ADMIN_TIMEOUT)
            await reader.seek_to_beginning(*tps)
            remaining = {tp for tp in tps if ends[tp] > 0}
            deadline = time.monotonic() + 4 * _ADMIN_TIMEOUT
            while remaining:
                if time.monotonic() > deadline:
                    raise BrokerConnectionError(f"kafka: reading {dlq!r} did not reach its end in time")
                batch = await reader.getmany(*remaining, timeout_ms=500)
                for tp, records in batch.items():
                    out.extend((tp.partition, r.offset, r) for r in records)
                for tp in list(remaining):
                    if await reader.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        except asyncio.CancelledError:
            raise
        except BrokerConnectionError:
            raise
        except Exception as exc:
            raise self.error(exc, f"reading {dlq!r}") from exc
        finally:
            with contextlib.suppress(Exception):
                await reader.stop()
        out.sort(key=lambda item: (item[2].timestamp, item[0], item[1]))
        return out

    async def _letters(self, topic: str, group: str) -> list[tuple[str, DeadLetter]]:
        dlq = dead_letter_topic(topic)
        records, markers = await asyncio.gather(self._read_topic(dlq), self._read_topic(dlq + REMOVED_TOPIC_SUFFIX))
        removed: set[str] = set()
        for _, _, record in markers:
            headers = decode_headers(record.headers)
            if dead_letter_group(headers) == group:
                removed.update(p for p in headers.get(DEAD_LETTERS_REMOVED_HEADER, "").split(",") if p)
        letters: list[tuple[str, DeadLetter]] = []
        for partition, offset, record in records:
            headers = decode_headers(record.headers)
            if dead_letter_group(headers) != group or f"{partition}:{offset}" in removed:
                continue
            message_id = headers.pop(MESSAGE_ID_HEADER, "")
            letter = dead_letter_from_record(
                topic, partition, message_id, (record.key or b"").decode("utf-8", errors="replace"), headers,
                record.value or b"", dead_lettered_at=datetime.fromtimestamp(record.timestamp / 1000, UTC),
            )
            letters.append((f"{partition}:{offset}", letter))
        return letters

    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        return [letter for _, letter in await self._letters(topic, group)]

    async def remove_dead_letters(self, topic: str, group: str, message_ids: Sequence[str]) -> int:
        wanted = set(message_ids)
        return await self._remove_letters(topic, group, lambda letter: letter.message_id in wanted)

    async def remove_listed_dead_letters(self, topic: str, group: str, letters: Sequence[DeadLetter]) -> int:
        listed = {letter_key(letter) for letter in letters}
        return await self._remove_letters(topic, group, lambda letter: letter_key(letter) in listed)

    async def _remove_letters(self, topic: str, group: str, doomed: Callable[[DeadLetter], bool]) -> int:
        gone = [pos for pos, letter in await self._letters(topic, group) if doomed(letter)]
        if not gone:
            return 0
        marker = {DEAD_LETTER_GROUP: group, DEAD_LETTERS_REMOVED_HEADER: ",".join(gone)}
        removed_topic = dead_letter_topic(topic) + REMOVED_TOPIC_SUFFIX
        await self.ensure_topic(removed_topic, 1)
        try:
            await self.producer.send_and_wait(self.kafka_name(removed_topic), b"", headers=encode_headers(marker))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self.error(exc, f"removing dead letters of {topic!r}", publishing=True) from exc
        return len(gone)
