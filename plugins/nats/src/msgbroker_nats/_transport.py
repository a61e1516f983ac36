"""The NATS JetStream provider: streams per topic, durable pull consumers per lane.

A lane's durable pull consumer (per group and partition) is read by the member holding the
lane's lease (``ASSIGNMENT = "leases"``, leases and membership in a KV bucket), with up to
``nats.max_ack_pending`` messages in flight, handed to the engine in stream order; the broker
redelivers (``REDELIVERY = "broker"``). docs/providers/nats.md has the design.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import nats.errors
import nats.js.errors
from msgbroker.spi import (
    DEAD_LETTER_HEADERS,
    AccessDeniedError,
    BrokerClosedError,
    BrokerConnectionError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    Capabilities,
    ConfigurationError,
    DeadLetter,
    Delivery,
    GroupView,
    Lane,
    LaneConsumer,
    MemberView,
    MessageTooLargeError,
    OutgoingRecord,
    PublishFailedError,
    PublishIndeterminateError,
    ReplySink,
    Transport,
    dead_letter_from_record,
    dead_letter_group,
    describe_from_interface,
    letter_key,
    redact,
    tls_client_context,
    tls_verification_error,
)
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, ReplayPolicy, StorageType, StreamConfig

from . import _compat, _schedule
from ._acks import Acks, Waiter
from ._consumer import NatsLaneConsumer
from ._errors import Refusals, RefusingClient, map_error, redacted, through_elections
from ._layout import (
    ENVELOPE_HEADER,
    MSG_ID_HEADER,
    TopicLayout,
    decode_envelope,
    encode_envelope,
    validate_stream_prefix,
)
from ._leases import Leases
from ._settings import NatsSettings, server_urls

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext, JetStreamManager
    from nats.js.kv import KeyValue

__all__ = ["DEAD_LETTER_HEADERS", "NatsTransport"]

log = logging.getLogger("msgbroker.nats")

_REPLIES = "_MSGBROKER_NATS.reply"
"""Reply inboxes: ``<_REPLIES>.<stream prefix>.<uuid>`` (core NATS, one per requesting connection)."""
_REPLY_ID_HEADER = "Msgbroker-Reply-Id"
_REPLY_HEADERS_HEADER = "Msgbroker-Reply-Headers"

_STREAM_NAME_IN_USE = 10058
_REPLICAS_REFUSED = (10074, 10023)
"""JetStream's "replicas > 1 not supported in non-clustered mode" and "insufficient resources"."""
_PUBLISH_TIMEOUT = 10.0
_API_TIMEOUT = 5.0
_MIN_CONSUMERS = 1000
_GROUPS_PER_STREAM = 64
"""The default ``nats.max_consumers``: this many groups' lanes on a topic's stream, at least
:data:`_MIN_CONSUMERS` (nats-server 2.15's own default for a stream that sets no limit)."""
_MAX_CONSUMERS_REACHED = 10026
_CONSUMER_PAGE = 256
"""Consumers one ``CONSUMER.LIST`` answer holds at most (nats-server's list limit)."""
_MAX_PENDING = 4000
"""Publishes awaiting their acks on one connection before the next one waits (nats-py's default)."""
_HEADER_ROOM = 4096
"""Bytes of a message's budget left for msgbroker's envelope and the user's headers."""
_SERVER_MAX_PAYLOAD = 1024 * 1024
"""nats-server's default ``max_payload``; the connection's real limit is checked at publish."""


class NatsTransport(Transport):
    """``nats://`` and ``tls://`` — NATS JetStream (nats-server >= 2.9) through nats-py."""

    NAME: ClassVar[str] = "nats"
    SCHEMES: ClassVar[tuple[str, ...]] = ("nats", "tls")
    SETTINGS = NatsSettings
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        retains_before_group=True,
        competing_consumers=True,
        redelivery_on_crash=True,
        kill_member=True,
        delay=True,
        deduplication="native",
        pending_count_exact=True,
        partition_exclusive=True,
        server_restart=True,
        max_message_bytes=_SERVER_MAX_PAYLOAD - _HEADER_ROOM,
        request_reply=True,
        scheduling="native",
        schedule_precision=1.0,
    )
    ASSIGNMENT = "leases"
    REDELIVERY = "broker"
    MAX_POLL_BLOCK: ClassVar[float] = 1.0

    @classmethod
    def settings_from_url(cls, url: str) -> dict[str, Any]:
        return {"nats": {"url": url}}

    @classmethod
    def capabilities_for_server(cls, version: str | None) -> Capabilities:
        """The declaration for a nats-server of ``version``: scheduling needs 2.12 or later (the
        server's message schedules); an older server has it missing, naming the version."""
        return _schedule.capabilities_for(cls.CAPABILITIES, version)

    @classmethod
    def capabilities_for_url(cls, url: str) -> Capabilities:
        """The declaration for the server at ``url``, its version read from the INFO line it
        sends on connect (no client, no credentials)."""
        return cls.capabilities_for_server(_schedule.server_version(url))

    @property
    def capabilities(self) -> Capabilities:
        nc = self._nc
        if nc is None:
            return self.CAPABILITIES
        try:
            version = nc.connected_server_version
        except ValueError:
            return self.CAPABILITIES
        return self.capabilities_for_server(f"{version.major}.{version.minor}.{version.patch}")

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        section = settings.nats
        self.prefix = validate_stream_prefix(section.stream_prefix)
        self.partition_count: int = settings.partition_count
        self.ack_wait = section.ack_wait.total_seconds()
        if self.ack_wait <= 0:
            raise ConfigurationError(f"nats.ack_wait={section.ack_wait!r} must be positive")
        self.max_age = section.max_age.total_seconds()
        self.replicas: int = section.replicas
        self.max_consumers: int = section.max_consumers or max(_MIN_CONSUMERS,
                                                               _GROUPS_PER_STREAM * self.partition_count)
        if section.max_deliver != -1 and section.max_deliver <= settings.max_retry_attempts:
            # The engine dead-letters after max_retry_attempts; the server limit is never used
            # (a message at the server's max_deliver is dropped silently), see docs/providers/nats.md.
            log.info("nats: max_deliver=%d is below max_retry_attempts=%d; the server-side limit is "
                     "unlimited anyway and msgbroker dead-letters first", section.max_deliver,
                     settings.max_retry_attempts)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._jsm: JetStreamManager | None = None
        self._streams: dict[str, asyncio.Task[float]] = {}
        self._expiring: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        """Single publishes awaiting their acks, with their deadlines (see ``_expire``)."""
        self._expirer: asyncio.Task[None] | None = None
        self._acks = Acks()
        """The publish acks of the connection (see _acks)."""
        self._scheduling: set[str] = set()
        """Topics whose stream has message schedules and the schedule subjects already."""
        self._consumers: weakref.WeakSet[NatsLaneConsumer] = weakref.WeakSet()
        self._pins: asyncio.Future[KeyValue] | None = None
        self._attempts: asyncio.Future[KeyValue] | None = None
        self._closing = False
        self.in_flight: int = section.max_ack_pending
        # Half ack_wait: a dead member's lanes have a new owner (with a pull request waiting)
        # before the server redelivers what it held (see _consumer._take_over).
        self._lease_ttl = max(1.0, self.ack_wait / 2)
        self._leases = Leases(self.pins, self.failure_counts, self.lease_ttl)
        """The lanes' leases (see _leases: one write per member and renewal)."""
        self._new_lanes: set[Lane] = set()
        """Lanes whose consumer was not listed (a new group): their lease key was most likely
        never written, so the first take tries a create (see Leases.acquire)."""

    # -- connection ----------------------------------------------------------------------------

    @property
    def nc(self) -> Client:
        if self._nc is None or self._nc.is_closed:
            refused = self._refusals.credentials if self._nc is not None else None
            if refused is not None:
                raise AccessDeniedError(str(refused))  # closed by the server for its credentials
            raise BrokerClosedError("the nats broker connection is closed")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BrokerClosedError("the nats broker connection is closed")
        return self._js

    @property
    def jsm(self) -> JetStreamManager:
        if self._jsm is None:
            raise BrokerClosedError("the nats broker connection is closed")
        return self._jsm

    async def connect(self) -> None:
        url = self.settings.nats.url
        servers = server_urls(url)
        if not servers:
            raise ConfigurationError("nats.url is empty: give a server URL (nats://host:4222), or several")
        cafile = self.settings.nats.ssl_cafile
        tls = tls_client_context("nats", cafile) if cafile else None  # tls:// without one: the system's CAs
        # nats-py hangs closing a connection whose TLS handshake failed when it may retry: over
        # TLS the first connect fails at once instead (reconnecting is switched on just below).
        first_retry = tls is None and not any(s.startswith("tls://") for s in servers)
        # What the server refuses (credentials, subject permissions) ends in AccessDeniedError
        # (_errors.RefusingClient, docs/security.md).
        public = self._nkey_public()
        self._refusals = Refusals(url, public)
        try:
            nc = RefusingClient(self._refusals)
            await nc.connect(
                servers=servers,
                tls=tls,
                nkeys_seed_str=self.settings.nats.nkeys_seed or None,
                nkeys_seed=self.settings.nats.nkeys_seed_file or None,
                name=f"msgbroker-{uuid.uuid4().hex[:8]}",
                connect_timeout=5,
                allow_reconnect=first_retry,
                # nats-py applies this to the first connect too: "forever" would hang on a
                # server that is not there; once connected, it reconnects forever (below).
                max_reconnect_attempts=1,
                reconnect_time_wait=0.25,  # type: ignore[arg-type]  # seconds; nats-py sleeps it, annotated int
                ping_interval=10,
                max_outstanding_pings=3,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
            )
        except Exception as exc:
            untrusted = tls_verification_error(exc, "nats", redact(url))
            if untrusted is not None:
                raise untrusted from exc
            if self._refusals.credentials is not None:
                raise self._refusals.credentials from None  # not retried: the operator must act
            raise BrokerConnectionError(
                f"cannot connect to nats at {redacted(url)}: {type(exc).__name__} {exc}"
            ) from exc
        self._nc = nc
        self._nc.options["allow_reconnect"] = True
        self._nc.options["max_reconnect_attempts"] = -1
        self._js = self._nc.jetstream(timeout=_API_TIMEOUT, publish_async_max_pending=_MAX_PENDING)
        self._jsm = self._nc.jsm(timeout=_API_TIMEOUT)
        try:
            await self._jsm.account_info()
        except Exception as exc:
            await self._nc.close()
            raise map_error(exc, f"checking JetStream on {redacted(url)}") from exc

    def _nkey_public(self) -> str | None:
        """The public key of the NKey user of ``nats.nkeys_seed`` / ``nats.nkeys_seed_file`` (named
        in refusals; the seed never is); None without one. A seed that is not one is refused here."""
        section = self.settings.nats
        if section.nkeys_seed and section.nkeys_seed_file:
            raise ConfigurationError("nats.nkeys_seed and nats.nkeys_seed_file are both set: give one")
        if section.nkeys_seed:
            seed, where = section.nkeys_seed, "nats.nkeys_seed"
        elif section.nkeys_seed_file:
            try:
                seed = Path(section.nkeys_seed_file).read_text().strip()
            except OSError as exc:
                raise ConfigurationError(
                    f"nats.nkeys_seed_file={section.nkeys_seed_file!r} cannot be read: {exc.strerror}"
                ) from None
            where = f"the file nats.nkeys_seed_file={section.nkeys_seed_file!r}"
        else:
            return None
        try:
            import nkeys  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ConfigurationError(f"nats.nkeys_seed needs the nkeys package: pip install nkeys ({exc})") from None
        try:
            pair = nkeys.from_seed(bytearray(seed.encode()))
            public = pair.public_key.decode()
            pair.wipe()
        except Exception:
            raise ConfigurationError(
                f"{where} does not hold an NKey seed (a line of 58 characters starting with 'SU' for a user)"
            ) from None
        return str(public)

    async def _on_error(self, exc: Exception) -> None:
        refused, new = self._refusals.note(exc)
        if refused is None:
            log.debug("nats: connection error: %r", exc)
            return
        nc = self._nc
        if nc is None or not new:
            return  # connecting (connect raises it), or told already
        log.error("%s", refused)
        if refused is self._refusals.credentials:
            # Refused at a reconnect (a password changed, a user removed): two attempts, then
            # nats-py closes the connection instead of retrying forever.
            nc.options["max_reconnect_attempts"] = 1
        if refused is self._refusals.reading:
            # A subscription cannot read without it: wake every consumer so that its next pull
            # request raises it (RefusingClient) and the engine stops the subscription.
            for consumer in list(self._consumers):
                consumer.reconnected()

    async def _on_closed(self) -> None:
        """The connection is closed for good: by us, or by nats-py after the server refused the
        credentials (an Authorization Violation in session, e.g. the password changed and the
        config reloaded: nats-py closes without telling the error callback)."""
        nc = self._nc
        if nc is not None and not self._closing and nc.last_error is not None:
            await self._on_error(nc.last_error)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats: disconnected from %s; reconnecting", redacted(self.settings.nats.url))

    async def _on_reconnected(self) -> None:
        nc = self._nc
        where = nc.connected_url if nc is not None else None
        log.warning("nats: reconnected to %s",
                    f"{where.hostname}:{where.port}" if where else redacted(self.settings.nats.url))
        for consumer in list(self._consumers):
            consumer.reconnected()  # the server dropped every pull request with the old connection

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._closing = True
        if nc is None or nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await nc.close()

    async def abort(self) -> None:
        nc, self._nc = self._nc, None
        self._closing = True
        if nc is None or nc.is_closed:
            return
        # A crash: whatever is still buffered (acks, naks) never reaches the server.
        _compat.drop_pending(nc)
        with contextlib.suppress(Exception):
            await nc.close()

    async def ping(self) -> bool:
        try:
            nc = self._nc
            if nc is None or not nc.is_connected:
                return False
            await nc.flush(timeout=2)
            await self.jsm.account_info()
            return True
        except Exception:
            return False

    # -- request/reply (semantics rule 13) ------------------------------------------------------

    async def open_replies(self, deliver: ReplySink) -> str:
        """A core NATS subscription on ``_MSGBROKER_NATS.reply.<stream prefix>.<uuid>`` (inside
        the subjects a tenant may use already: docs/security.md); a reply is one core publish
        there, its request id and headers (ASCII JSON) in NATS headers. At most once, like every
        core NATS message: a requester that is gone gets nothing."""
        subject = f"{_REPLIES}.{self.prefix}.{uuid.uuid4().hex}"

        async def on_reply(msg: Msg) -> None:
            headers = msg.headers or {}
            request_id = headers.get(_REPLY_ID_HEADER)
            if request_id is None:
                return
            try:
                reply_headers = json.loads(headers.get(_REPLY_HEADERS_HEADER, "{}"))
            except ValueError:
                log.warning("nats: a reply on %s has unreadable headers; dropped", subject)
                return
            deliver(request_id, reply_headers, msg.data)

        try:
            await self.nc.subscribe(subject, cb=on_reply)
            await self.nc.flush(timeout=5)  # the server has the interest before the first request goes out
        except Exception as exc:
            raise map_error(exc, "opening the reply inbox") from exc
        return subject

    async def send_reply(self, address: str, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        if not address.startswith(f"{_REPLIES}.{self.prefix}."):
            log.warning("nats: a reply address %r outside this stream prefix %r; reply dropped", address, self.prefix)
            return
        try:
            await self.nc.publish(address, body, headers={
                _REPLY_ID_HEADER: request_id, _REPLY_HEADERS_HEADER: json.dumps(dict(headers)),
            })
        except Exception as exc:
            raise map_error(exc, f"sending the reply to request {request_id}") from exc

    # -- streams ---------------------------------------------------------------------------------

    def layout(self, topic: str) -> TopicLayout:
        return TopicLayout(self.prefix, topic)

    async def ensure_stream(self, layout: TopicLayout, dedup_window: float | None) -> None:
        """Create the topic's stream, or check an existing one (partition count, subjects) and
        widen its duplicate window when deduplication asks for more."""
        task = self._streams.get(layout.topic)
        wanted = self._window(dedup_window)
        if (task is not None and task.done() and not task.cancelled() and task.exception() is None
                and (wanted is None or abs(task.result() - wanted) <= 0.001)):
            return  # open already, with the window asked for: the path of every publish
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._streams[layout.topic] = asyncio.ensure_future(self._open_stream(layout, dedup_window))
        try:
            window = await asyncio.shield(task)
        except BaseException:
            if task.done() and self._streams.get(layout.topic) is task:
                del self._streams[layout.topic]
            raise
        if wanted is not None and abs(window - wanted) > 0.001:
            self._streams[layout.topic] = asyncio.ensure_future(self._open_stream(layout, dedup_window))
            await self._streams[layout.topic]

    def _window(self, dedup_window: float | None) -> float | None:
        """The stream's duplicate window for a dedup window (JetStream wants it within max_age)."""
        if dedup_window is None:
            return None
        return min(dedup_window, self.max_age) if self.max_age > 0 else dedup_window

    async def _open_stream(self, layout: TopicLayout, dedup_window: float | None) -> float:
        jsm = self.jsm
        try:
            try:
                info = await jsm.stream_info(layout.stream)
            except nats.js.errors.NotFoundError:
                config = StreamConfig(
                    name=layout.stream,
                    description=layout.description(self.partition_count),
                    subjects=[layout.subjects],
                    storage=StorageType.FILE,
                    max_age=self.max_age or None,
                    duplicate_window=self._window(dedup_window) or 0,  # 0: the server's default (as None is sent)
                    num_replicas=self.replicas,
                    max_consumers=self.max_consumers,
                )
                try:
                    info = await jsm.add_stream(config)
                    return float(info.config.duplicate_window or 0)
                except nats.js.errors.APIError as exc:
                    if exc.err_code != _STREAM_NAME_IN_USE:
                        self._refuse_replicas(exc, f"stream {layout.stream!r}")
                        raise
                    info = await jsm.stream_info(layout.stream)  # another member created it just now
            config = info.config
            count = layout.partition_count_of(config.description)
            if count is not None and count != self.partition_count:
                raise ConfigurationError(
                    f"nats stream {layout.stream!r} of topic {layout.topic!r} was created with "
                    f"partition_count={count}; this connection has partition_count={self.partition_count}"
                )
            if layout.subjects not in (config.subjects or []):
                raise ConfigurationError(
                    f"nats stream {layout.stream!r} exists with subjects {config.subjects!r}, not "
                    f"{layout.subjects!r}: it is not a msgbroker stream (change nats.stream_prefix)"
                )
            window = float(config.duplicate_window or 0)
            changes: dict[str, Any] = {}
            if count is None:
                changes["description"] = layout.description(self.partition_count)
            if abs(float(config.max_age or 0) - self.max_age) > 0.001:
                changes["max_age"] = self.max_age or None  # the configured retention follows the settings
            wanted = self._window(dedup_window)
            if wanted is not None and abs(window - wanted) > 0.001:
                # The native window is the stream's: the deduplication_window of the last
                # connection that published with deduplication on.
                changes["duplicate_window"] = wanted
            if (config.num_replicas or 1) < self.replicas:
                # Scaled up, never down: one member with a smaller setting must not take copies away.
                changes["num_replicas"] = self.replicas
            if changes:
                log.info("nats: updating stream %s: %s", layout.stream, changes)
                try:
                    info = await jsm.update_stream(config.evolve(**changes))
                except nats.js.errors.APIError as exc:
                    self._refuse_replicas(exc, f"stream {layout.stream!r}")
                    raise
                window = float(info.config.duplicate_window or 0)
                config = info.config
            if config.max_consumers is not None and 0 < config.max_consumers < self.max_consumers:
                # a limit the stream was created with (nats-server 2.15's default of 1,000, or
                # a smaller nats.max_consumers) is raised, never lowered; servers before 2.13
                # refuse to change it: then the consumer that does not fit says so
                await self._raise_max_consumers(layout, config)
            return window
        except (ConfigurationError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise map_error(exc, f"opening stream {layout.stream!r}") from exc

    async def _raise_max_consumers(self, layout: TopicLayout, config: StreamConfig) -> None:
        try:
            await self.jsm.update_stream(config.evolve(max_consumers=self.max_consumers))
            log.info("nats: stream %s may have %d consumers now (it had %d)", layout.stream, self.max_consumers,
                     config.max_consumers)
        except nats.js.errors.APIError as exc:
            log.warning("nats: stream %s keeps its limit of %s consumers (nats.max_consumers=%d): the server refused "
                        "to raise it: %s", layout.stream, config.max_consumers, self.max_consumers, exc.description)

    def _refuse_replicas(self, exc: nats.js.errors.APIError, what: str) -> None:
        """Raise a ConfigurationError naming ``nats.replicas`` when the server refused that many
        copies (a single server, or a cluster with fewer nodes)."""
        text = str(exc.description or "")
        if self.replicas > 1 and (exc.err_code in _REPLICAS_REFUSED or "replica" in text or "insufficient" in text):
            raise ConfigurationError(
                f"nats: the server refused {what} with nats.replicas={self.replicas}: {text} (err_code "
                f"{exc.err_code}); a single server keeps 1 copy, a cluster at most as many as it has nodes"
            ) from exc

    def consumer_config(self, layout: TopicLayout, group: str, partition: int) -> ConsumerConfig:
        """The durable pull consumer of one lane: up to ``nats.max_ack_pending`` messages in
        flight to the lane's owner (who hands them out in order); no server-side delivery limit,
        because a message at ``max_deliver`` would be dropped silently — the engine dead-letters
        instead."""
        name = layout.consumer(group, partition)
        return ConsumerConfig(
            durable_name=name,
            description=f"msgbroker group {group} on {layout.topic} partition {partition}",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            filter_subject=layout.subject(partition),
            replay_policy=ReplayPolicy.INSTANT,
            max_ack_pending=2 * self.in_flight,  # headroom for acks on their way (see _consumer._top_up)
            max_waiting=512,
        )

    async def ensure_consumers(self, layout: TopicLayout, group: str, partitions: Sequence[int]) -> dict[int, int]:
        """:meth:`ensure_consumer` for many lanes, made or updated together where
        :meth:`check_consumers` finds them missing or with other settings."""
        delivered, stale = await self.check_consumers(layout, group, partitions)
        made = await asyncio.gather(*(self.ensure_consumer(layout, group, p) for p in stale))
        delivered.update(zip(stale, made, strict=True))
        return delivered

    async def check_consumers(
        self, layout: TopicLayout, group: str, partitions: Sequence[int]
    ) -> tuple[dict[int, int], list[int]]:
        """The lanes whose consumer is there with msgbroker's settings (with the last stream
        sequence each delivered), and the others, which need :meth:`ensure_consumer`. The
        stream's consumers are listed (one request per 256): a member subscribing to 64
        partitions had sent 64 ``CONSUMER.CREATE`` requests (1,024 at 1,024 partitions), each a
        write at the server even when nothing changed. A listing that fails lists none."""
        listed = await self._listed_consumers(layout)
        existing = listed if listed is not None else {}
        delivered: dict[int, int] = {}
        stale: list[int] = []
        for partition in partitions:
            info = existing.get(layout.consumer(group, partition))
            if info is not None and self._configured(info.config, self.consumer_config(layout, group, partition)):
                delivered[partition] = int(info.delivered.stream_seq or 0) if info.delivered else 0
            else:
                stale.append(partition)
        if listed is not None:  # the lanes whose consumer was not there
            self._new_lanes.update(Lane(layout.topic, group, p) for p in stale
                                   if layout.consumer(group, p) not in existing)
        return delivered, stale

    async def _listed_consumers(self, layout: TopicLayout) -> dict[str, ConsumerInfo] | None:
        """The stream's consumers by name; None when the listing fails (everything is then
        created or checked one by one, as before)."""
        found: dict[str, ConsumerInfo] = {}
        try:
            while True:
                page = await self.jsm.consumers_info(layout.stream, offset=len(found) or None)
                for info in page:
                    if info.config.durable_name:
                        found[info.config.durable_name] = info
                if len(page) < _CONSUMER_PAGE:
                    return found
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("nats: listing the consumers of %s failed (%r); checking them one by one", layout.stream, exc)
            return None

    @staticmethod
    def _configured(have: ConsumerConfig, want: ConsumerConfig) -> bool:
        """Whether an existing consumer has every setting msgbroker gives its lanes (the server
        reports the wait in nanoseconds, read back as float seconds)."""
        for field in fields(want):
            wanted = getattr(want, field.name)
            if wanted is None:
                continue
            got = getattr(have, field.name)
            if isinstance(wanted, float):
                if got is None or abs(float(got) - wanted) > 1e-6:
                    return False
            elif got != wanted:
                return False
        return True

    async def ensure_consumer(self, layout: TopicLayout, group: str, partition: int) -> int:
        """Create the lane's durable consumer, or bring an existing one to these settings
        (nats-server updates ack_wait, max_deliver, max_ack_pending in place); returns the last
        stream sequence it delivered."""
        config = self.consumer_config(layout, group, partition)
        try:
            info = await self.jsm.add_consumer(layout.stream, config)
            return int(info.delivered.stream_seq or 0) if info.delivered else 0
        except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as exc:
            if exc.err_code == _MAX_CONSUMERS_REACHED:
                raise ConfigurationError(
                    f"nats: stream {layout.stream!r} of topic {layout.topic!r} has as many consumers as it may "
                    f"have ({exc.description}): each group takes one per partition ({self.partition_count}); "
                    f"raise nats.max_consumers (now {self.max_consumers}; nats-server 2.13 and later raise an "
                    f"existing stream's limit to it) or delete the consumers of groups no longer used"
                ) from exc
            # 2.9 answers 500 / err_code 10012 for "deliver policy can not be updated".
            raise ConfigurationError(
                f"nats consumer {config.durable_name!r} on stream {layout.stream!r} exists with settings "
                f"that cannot be changed to msgbroker's ({exc.description}); delete it "
                f"(nats consumer rm {layout.stream} {config.durable_name}) or use another group name"
            ) from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"creating consumer {config.durable_name!r} on {layout.stream!r}") from exc

    async def pins(self) -> KeyValue:
        """The KV bucket ``<stream_prefix>_pins``: a key per live member of a group and per live
        incarnation holding leases (see _leases); its TTL (half ``ack_wait``) is the lease time."""
        task = self._pins
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._pins = asyncio.ensure_future(self._open_pins())
        return await asyncio.shield(task)

    async def _open_pins(self) -> KeyValue:
        bucket = f"{self.prefix}_pins"
        try:
            try:
                kv = await self.js.key_value(bucket)
                # The bucket's TTL is the lease time (fixed when it was created, perhaps by another
                # connection with another ack_wait).
                info = await self.jsm.stream_info(f"KV_{bucket}")
                self._lease_ttl = float(info.config.max_age or self._lease_ttl)
                return kv
            except nats.js.errors.BucketNotFoundError:
                try:
                    return await self.js.create_key_value(bucket=bucket, history=1, ttl=self._lease_ttl,
                                                          description="msgbroker subscribe_to_partition pins",
                                                          replicas=self.replicas)
                except nats.js.errors.APIError as exc:
                    self._refuse_replicas(exc, f"KV bucket {bucket!r}")
                    if not isinstance(exc, nats.js.errors.BadRequestError):
                        raise
                    return await self.js.key_value(bucket)  # another member created it just now
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"opening the KV bucket {bucket!r}") from exc

    async def failure_counts(self) -> KeyValue:
        """The KV bucket ``<stream_prefix>_attempts``: per nak'ed message, how many of its
        attempts failed and at which delivery, so the next member to get it knows (JetStream
        only counts deliveries, and a delay is not a failure). Entries age out after a day."""
        task = self._attempts
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._attempts = asyncio.ensure_future(self._open_bucket(f"{self.prefix}_attempts", 86400.0,
                                                                            "msgbroker failed attempts"))
        return await asyncio.shield(task)

    async def _open_bucket(self, bucket: str, ttl: float, description: str) -> KeyValue:
        try:
            try:
                return await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                try:
                    return await self.js.create_key_value(bucket=bucket, history=1, ttl=ttl, description=description,
                                                          replicas=self.replicas)
                except nats.js.errors.APIError as exc:
                    self._refuse_replicas(exc, f"KV bucket {bucket!r}")
                    if not isinstance(exc, nats.js.errors.BadRequestError):
                        raise
                    return await self.js.key_value(bucket)  # another member created it just now
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"opening the KV bucket {bucket!r}") from exc

    # -- membership and leases (the engine's lease assignment) ----------------------------------

    def lease_ttl(self) -> float:
        """The pins bucket's TTL: a silent member's leases (and membership) age out after it."""
        return float(self._lease_ttl)

    async def describe(self, topic: str, group: str) -> GroupView:
        """The default view plus the buckets: the live members (their keys in the pins bucket)
        and each lane's holder (its lease key's incarnation, while that lives). The pins bucket
        keeps no join time."""
        view = await describe_from_interface(self, topic, group, knows_members=True)
        bucket = f"{self.prefix}_pins"
        owners: dict[int, str] = {}
        try:
            await self.pins()
            info = await self.jsm.stream_info(f"KV_{bucket}",
                                              subjects_filter=f"$KV.{bucket}.{self._member_key(topic, group, '*')}")
            owners = await self._leases.holders([Lane(topic, group, p) for p in range(self.settings.partition_count)])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"describing {group!r} on {topic!r}") from exc
        live = sorted(subject.rpartition(".")[2] for subject in info.state.subjects or {})
        members = tuple(MemberView(m, None, tuple(p for p, owner in sorted(owners.items()) if owner == m))
                        for m in live)
        partitions = tuple(replace(part, owner=owners.get(part.partition)) for part in view.partitions)
        return replace(view, partitions=partitions, members=members)

    async def topics(self) -> dict[str, list[str]]:
        """Topics from their streams (the description names the topic, the subjects this prefix);
        groups from the streams' durable consumers (``<group>_<partition>``)."""
        found: dict[str, set[str]] = {}
        try:
            streams: list[Any] = []
            while page := await self.jsm.streams_info(offset=len(streams)):
                streams += page
            for info in streams:
                words = (info.config.description or "").split()
                if len(words) != 4 or words[:2] != ["msgbroker", "topic"] or words[2].endswith(".dlq"):
                    continue
                topic = words[2]
                if info.config.subjects != [self.layout(topic).subjects]:
                    continue  # another prefix's stream
                groups = found.setdefault(topic, set())
                consumers: list[Any] = []
                while more := await self.jsm.consumers_info(info.config.name, offset=len(consumers)):
                    consumers += more
                for consumer in consumers:
                    name, _, partition = (consumer.config.durable_name or "").rpartition("_")
                    if name and partition.isdigit():
                        groups.add(name.replace("~", "."))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, "listing topics and groups") from exc
        return {topic: sorted(groups) for topic, groups in sorted(found.items())}

    def _member_key(self, topic: str, group: str, member_id: str) -> str:
        # Two '/' (a lane's key has one, and names cannot hold it): never a lane's key.
        return f"m/{topic}/{group}.{member_id}"

    async def heartbeat(self, topic: str, group: str, member_id: str, ttl: float) -> list[str]:
        """A key per live member in the pins bucket, rewritten every beat (the bucket's TTL ends
        a silent member's); the live members are the subjects of one ``STREAM.INFO``."""
        bucket = f"{self.prefix}_pins"
        try:
            kv = await self.pins()
            await through_elections(lambda: kv.put(self._member_key(topic, group, member_id), b""))
            info = await self.jsm.stream_info(f"KV_{bucket}",
                                              subjects_filter=f"$KV.{bucket}.{self._member_key(topic, group, '*')}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"beating for {member_id} of {group!r} on {topic!r}") from exc
        return sorted(subject.rpartition(".")[2] for subject in info.state.subjects or {})

    async def leave(self, topic: str, group: str, member_id: str) -> None:
        self._leases.forget(member_id)
        bucket = f"{self.prefix}_pins"
        try:
            subject = f"$KV.{bucket}.{self._member_key(topic, group, member_id)}"
            await self.jsm.purge_stream(f"KV_{bucket}", subject=subject)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"leaving {group!r} on {topic!r}") from exc

    async def acquire_lease(self, lane: Lane, member_id: str, ttl: float) -> str | None:
        """The lane's key in the attempts bucket, created (or taken over from an incarnation that
        ended): see _leases."""
        return (await self._leases.acquire([lane], member_id)).get(lane)

    async def acquire_leases(self, lanes: Sequence[Lane], member_id: str, ttl: float) -> dict[Lane, str]:
        """:meth:`acquire_lease` for each lane, the writes sent together (one after another, a
        member taking 64 lanes waited 64 round trips before its first lane opened). On an error
        the leases taken are kept (the others at the next heartbeat); with none taken it is raised."""
        new = [lane for lane in lanes if lane in self._new_lanes]
        self._new_lanes.difference_update(new)
        return await self._leases.acquire(lanes, member_id, new)

    async def renew_leases(self, leases: Mapping[Lane, str], ttl: float) -> set[Lane]:
        """One write per member, however many lanes it holds (see _leases)."""
        return await self._leases.renew(leases)

    def asks_consumers_freely(self) -> bool:
        """Whether the server answers a consumer-info request without harm: nats-server 2.9 makes
        a pull consumer with messages pending deliver slowly after one (docs/providers/nats.md,
        *Recovery*), so on 2.9 the provider asks only where it must."""
        try:
            version = self.nc.connected_server_version
            return (version.major, version.minor) >= (2, 10)
        except (ValueError, BrokerClosedError):
            return False

    def lease_is_fresh(self, token: str) -> bool:
        """Whether this member surely holds the lease right now without asking: its incarnation
        renewed within three quarters of the lease time (the coordinator renews every quarter)."""
        return self._leases.is_fresh(token)

    async def holds_lease(self, topic: str, group: str, partition: int, token: str) -> bool:
        """Whether ``token`` still holds the lane: yes while renewed within half the lease time,
        else once its member's lease key is renewed now (a member paused past its lease must not
        settle: docs/semantics.md rule 11)."""
        return await self._leases.holds(Lane(topic, group, partition), token)

    async def release_lease(self, lane: Lane, token: str) -> None:
        await self._leases.release(lane, token)

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        if not records:
            return
        for topic in {r.topic for r in records}:
            await self.ensure_stream(self.layout(topic), dedup_window)
        ids = [r.message_id for r in records] if dedup_window is not None else None
        await self.publish_records(records, ids, dedup_window)

    # -- scheduled messages (_schedule.py) ------------------------------------------------------

    async def schedule(self, record: OutgoingRecord, deliver_at: float) -> None:
        """A schedule message in the topic's stream that the server turns into the message at
        ``deliver_at`` (nats-server 2.12+)."""
        self.capabilities.require("scheduling")
        layout = self.layout(record.topic)
        await self.ensure_stream(layout, None)
        subjects = _schedule.schedule_subjects(self.prefix, record.topic)
        try:
            if layout.topic not in self._scheduling:
                await _schedule.enable(self, layout.stream, subjects)
                self._scheduling.add(layout.topic)
            headers = {
                ENVELOPE_HEADER: encode_envelope(record.message_id, record.key, record.headers),
                _schedule.SCHEDULE_HEADER: _schedule.at_header(deliver_at),
                _schedule.TARGET_HEADER: layout.subject(record.partition),
            }
            size = len(record.body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12
            if size > self.nc.max_payload:
                raise MessageTooLargeError(
                    f"message {record.message_id} on {record.topic!r} is {size} bytes with its headers; "
                    f"the nats server accepts at most {self.nc.max_payload} (max_payload)")
            subject = _schedule.schedule_subject(self.prefix, record.topic, record.message_id)
            deadline = time.monotonic() + _PUBLISH_TIMEOUT
            pause = 0.05
            while True:
                try:
                    await asyncio.wait_for(_schedule.publish(self, subject, record.body, headers),
                                           max(0.001, deadline - time.monotonic()))
                    return
                except nats.js.errors.NoStreamResponseError:
                    # No stream listened on the subject (not stored): on a cluster, a stream just
                    # made or given its schedule subjects, or one electing its leader after a
                    # restart, is not heard everywhere at once. Sent again until the deadline.
                    if time.monotonic() + pause > deadline:
                        raise BrokerUnavailableError(
                            f"nats: no stream took scheduled message {record.message_id} on {record.topic!r} "
                            f"within {_PUBLISH_TIMEOUT}s (is JetStream up?); it was not scheduled") from None
                    await asyncio.sleep(pause)
                    pause = min(0.5, pause * 2)
        except (MessageTooLargeError, ConfigurationError, BrokerUnavailableError, asyncio.CancelledError):
            raise
        except TimeoutError as exc:
            raise PublishIndeterminateError(
                f"nats: no confirmation within {_PUBLISH_TIMEOUT}s for scheduled message {record.message_id} on "
                f"{record.topic!r}; it may or may not be scheduled") from exc
        except nats.js.errors.APIError as exc:
            raise PublishFailedError(
                f"nats: JetStream refused to schedule message {record.message_id} on {record.topic!r}: "
                f"{exc.description}") from exc
        except Exception as exc:
            raise map_error(exc, f"scheduling message {record.message_id} on {record.topic!r}") from exc

    async def cancel_scheduled(self, topic: str, message_id: str) -> bool:
        self.capabilities.require("scheduling")
        layout = self.layout(topic)
        try:
            return await _schedule.cancel(self, layout.stream, _schedule.schedule_subject(self.prefix, topic,
                                                                                          message_id))
        except nats.js.errors.NotFoundError:
            return False  # no stream: nothing was ever scheduled on the topic
        except Exception as exc:
            raise map_error(exc, f"cancelling scheduled message {message_id} on {topic!r}") from exc

    async def publish_records(
        self, records: Sequence[OutgoingRecord], dedup_ids: Sequence[str] | None, dedup_window: float | None = None
    ) -> None:
        """Publish with async acks and wait for all of them: one round trip for the batch, not
        one per message. Records no stream took (JetStream still starting after a restart, a
        stream deleted behind our back) were definitely not stored: they are sent again, after
        re-opening the stream, until the publish deadline."""
        if dedup_ids is not None and len(set(dedup_ids)) < len(dedup_ids):
            # A repeat inside one batch is a duplicate the stream would drop anyway; sent in the
            # same burst, a replicated stream (R3) answered neither copy until the publish timed out.
            first = {id_: i for i, id_ in reversed(list(enumerate(dedup_ids)))}
            keep = sorted(first.values())
            records, dedup_ids = [records[i] for i in keep], [dedup_ids[i] for i in keep]
        deadline = time.monotonic() + _PUBLISH_TIMEOUT
        pending = list(range(len(records)))
        pause = 0.05
        while True:
            refused = await self._publish_once([records[i] for i in pending],
                                               [dedup_ids[i] for i in pending] if dedup_ids is not None else None,
                                               deadline)
            if not refused:
                return
            pending = [pending[i] for i in refused]
            for topic in {records[i].topic for i in pending}:
                self._streams.pop(topic, None)
            if time.monotonic() + pause > deadline:
                raise BrokerUnavailableError(
                    f"nats: no stream took {len(pending)} of {len(records)} message(s) on {records[0].topic!r} "
                    f"within {_PUBLISH_TIMEOUT}s (is JetStream up?); they were not stored"
                )
            await asyncio.sleep(pause)
            pause = min(0.5, pause * 2)
            with contextlib.suppress(BrokerUnavailableError, BrokerTimeoutError, BrokerConnectionError):
                for topic in {records[i].topic for i in pending}:
                    await self.ensure_stream(self.layout(topic), dedup_window)

    async def _publish_once(
        self, records: Sequence[OutgoingRecord], dedup_ids: Sequence[str] | None, deadline: float
    ) -> list[int]:
        """Publish and wait for the acks; the indexes no stream took (not stored). The acks are
        read by :class:`~msgbroker_nats._acks.Acks` (one future for the batch); a batch of more
        than ``_MAX_PENDING`` messages goes in parts of that many, each waiting for its acks."""
        if len(records) == 1:
            return await self._publish_one(records[0], dedup_ids[0] if dedup_ids is not None else None, deadline)
        refused: list[int] = []
        for start in range(0, len(records), _MAX_PENDING):
            part = records[start:start + _MAX_PENDING]
            ids = dedup_ids[start:start + _MAX_PENDING] if dedup_ids is not None else None
            refused += [start + index for index in await self._publish_part(part, ids, deadline)]
        return refused

    async def _publish_part(
        self, records: Sequence[OutgoingRecord], dedup_ids: Sequence[str] | None, deadline: float
    ) -> list[int]:
        nc = self.nc
        acks = self._acks
        waiter: Waiter | None = None
        try:
            await acks.ready(nc)
            waiter = Waiter(len(records))
            publish, reply_to, headers_of, prefix = nc.publish, acks.reply_to, self._headers, self.prefix
            # One deadline for the whole batch; no per-message timer, so the loop below does not
            # yield to the event loop (unless nats-py's buffer is full) and one socket write
            # carries the batch.
            async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                for index, record in enumerate(records):
                    headers = headers_of(record, dedup_ids[index] if dedup_ids is not None else None)
                    await publish(f"{prefix}.{record.topic}.{record.partition}", record.body,
                                  reply=reply_to(waiter, index), headers=headers)
                await waiter.future
        except (MessageTooLargeError, asyncio.CancelledError):
            if waiter is not None:
                acks.forget(waiter)
            raise
        except TimeoutError as exc:
            if waiter is not None:
                acks.forget(waiter)
            raise PublishIndeterminateError(
                f"nats: no confirmation within {_PUBLISH_TIMEOUT}s for {len(records)} message(s) on "
                f"{records[0].topic!r}; they may or may not be stored"
            ) from exc
        except Exception as exc:
            if waiter is not None:
                acks.forget(waiter)
            raise map_error(exc, f"publishing to {records[0].topic!r}") from exc
        return [index for index, error in sorted(waiter.errors.items()) if _not_taken(records[index], error)]

    def _headers(self, record: OutgoingRecord, dedup_id: str | None) -> dict[str, str]:
        """A record's NATS headers, its size checked against the connection's ``max_payload``."""
        envelope = encode_envelope(record.message_id, record.key, record.headers)
        headers = {ENVELOPE_HEADER: envelope}
        size = len(record.body) + len(ENVELOPE_HEADER) + len(envelope) + 16
        if dedup_id is not None:
            headers[MSG_ID_HEADER] = dedup_id
            size += len(MSG_ID_HEADER) + len(dedup_id) + 4
        limit = self.nc.max_payload
        if size > limit:
            raise MessageTooLargeError(
                f"message {record.message_id} on {record.topic!r} is {size} bytes with its headers; "
                f"the nats server accepts at most {limit} (max_payload)"
            )
        return headers

    async def _publish_one(self, record: OutgoingRecord, dedup_id: str | None, deadline: float) -> list[int]:
        """``_publish_once`` of one record, the shape of an API server's ``publish()`` per request:
        no timer and no gather of its own (with hundreds of callers at once they cost as much as
        nats-py's publish). The ack's future is awaited directly; :meth:`_expire` fails it at the
        deadline."""
        acks = self._acks
        waiter: Waiter | None = None
        sent = False
        try:
            nc = self.nc
            await acks.ready(nc)
            headers = self._headers(record, dedup_id)
            waiter = Waiter(1)
            await nc.publish(f"{self.prefix}.{record.topic}.{record.partition}", record.body,
                             reply=acks.reply_to(waiter, 0), headers=headers)
            sent = True
            self._expire(waiter.future, deadline)
            await waiter.future
        except asyncio.CancelledError:
            if waiter is not None:
                waiter.future.cancel()
                acks.forget(waiter)
            raise
        except TimeoutError as exc:
            if waiter is not None:
                acks.forget(waiter)
            if not sent:
                raise map_error(exc, f"publishing to {record.topic!r}") from exc
            raise PublishIndeterminateError(
                f"nats: no confirmation within {_PUBLISH_TIMEOUT}s for message {record.message_id} on "
                f"{record.topic!r}; it may or may not be stored"
            ) from exc
        except MessageTooLargeError:
            raise
        except Exception as exc:
            if waiter is not None:
                acks.forget(waiter)
            if not sent:
                raise map_error(exc, f"publishing to {record.topic!r}") from exc
            raise PublishIndeterminateError(
                f"nats: message {record.message_id} on {record.topic!r} not confirmed: {exc!r}"
            ) from exc
        error = waiter.errors.get(0)
        return [0] if error is not None and _not_taken(record, error) else []

    def _expire(self, future: asyncio.Future[Any], deadline: float) -> None:
        """Fail ``future`` with TimeoutError if it is not done by ``deadline``: one task for all
        the publishes of the connection, in deadline order (every publish has the same timeout)."""
        self._expiring.append((deadline, future))
        if self._expirer is None or self._expirer.done():
            self._expirer = asyncio.create_task(self._expire_loop(), name="msgbroker-nats-publish-deadlines")

    async def _expire_loop(self) -> None:
        pending = self._expiring
        while pending:
            deadline, future = pending[0]
            if future.done():
                pending.popleft()
                continue
            now = time.monotonic()
            if now >= deadline:
                pending.popleft()
                future.set_exception(TimeoutError())
                continue
            await asyncio.sleep(min(deadline - now, 0.25))

    # -- consuming -------------------------------------------------------------------------------

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        consumer = NatsLaneConsumer(self, topic, group, member_id)
        self._consumers.add(consumer)
        return consumer

    def forget(self, consumer: LaneConsumer) -> None:
        """``consumer`` stopped: it is no longer told about reconnects."""
        if isinstance(consumer, NatsLaneConsumer):
            self._consumers.discard(consumer)

    async def pending_count(self, topic: str, group: str) -> int:
        return sum((await self.pending_by_partition(topic, group)).values())

    async def pending_by_partition(self, topic: str, group: str) -> dict[int, int]:
        """Per lane: the consumer's ``num_pending`` (not yet delivered) + ``num_ack_pending``
        (in flight, or nak'ed and waiting out a delay); a lane whose consumer does not exist yet
        will get every retained message of its subject."""
        layout = self.layout(topic)
        try:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)  # our own fire-and-forget acks land first
            try:
                info = await self.jsm.stream_info(layout.stream, subjects_filter=layout.subjects)
            except nats.js.errors.NotFoundError:
                return {}
            per_subject = info.state.subjects or {}
            lanes = await asyncio.gather(*(self._lane_pending(layout, group, p) for p in range(self.partition_count)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"counting pending messages of {group!r} on {topic!r}") from exc
        counts = {p: n if n is not None else per_subject.get(layout.subject(p), 0) for p, n in enumerate(lanes)}
        return {p: n for p, n in counts.items() if n}

    async def peek(self, topic: str, group: str, limit: int) -> list[Delivery]:
        """Up to ``limit`` messages the group has not settled, oldest first per partition, read
        with direct gets (nothing is delivered). An ordered lane is acked in order, so the
        unsettled messages are those after the consumer's ack floor. ``attempt``
        is 1 for a message delivered at least once (JetStream reports no per-message count
        outside a delivery), 0 for one never delivered."""
        layout = self.layout(topic)
        out: list[Delivery] = []
        try:
            try:
                await self.jsm.stream_info(layout.stream)
            except nats.js.errors.NotFoundError:
                return []
            for partition in range(self.partition_count):
                if len(out) >= limit:
                    break
                try:
                    info = await self.jsm.consumer_info(layout.stream, layout.consumer(group, partition))
                    floor, delivered = int(info.ack_floor.stream_seq or 0), int(info.delivered.stream_seq or 0)
                except nats.js.errors.NotFoundError:
                    floor = delivered = 0
                seq = floor + 1
                while len(out) < limit:
                    try:
                        raw = await self.jsm.get_msg(layout.stream, seq=seq, subject=layout.subject(partition),
                                                     next=True)
                    except nats.js.errors.NotFoundError:
                        break
                    number = int(raw.seq or seq)
                    header = raw.headers.get(ENVELOPE_HEADER) if raw.headers else None
                    envelope = decode_envelope(header, f"nats-{layout.stream}-{number}")
                    out.append(Delivery(partition, envelope.message_id, envelope.key, envelope.headers, raw.data or b"",
                                        attempt=1 if number <= delivered else 0, position=number))
                    seq = number + 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"reading the unsettled messages of {group!r} on {topic!r}") from exc
        return out

    async def ack_floor(self, layout: TopicLayout, group: str, partition: int) -> int:
        """The lane's ack floor: every stream sequence up to it is settled."""
        try:
            info = await self.jsm.consumer_info(layout.stream, layout.consumer(group, partition))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"reading the consumer of {layout.topic}[{partition}]") from exc
        return int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0

    async def _lane_pending(self, layout: TopicLayout, group: str, partition: int) -> int | None:
        try:
            info = await self.jsm.consumer_info(layout.stream, layout.consumer(group, partition))
        except nats.js.errors.NotFoundError:
            return None
        # In flight: held by the lane's owner, or nak'ed and waiting out a delay. (A consumer
        # rewound by nats-server 2.9.10, see _consumer._is_ghost, counts its message in flight in
        # num_pending too, one too many until it is settled.)
        in_flight = int(info.num_ack_pending or 0)
        return int(info.num_pending or 0) + in_flight

    # -- dead letters ----------------------------------------------------------------------------

    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        return [letter for _, letter in await self._scan_dead_letters(topic, group)]

    async def remove_dead_letters(self, topic: str, group: str, message_ids: Sequence[str]) -> int:
        wanted = set(message_ids)
        stream = self.layout(topic).dead_letters.stream
        found = [seq for seq, letter in await self._scan_dead_letters(topic, group) if letter.message_id in wanted]
        try:
            done = await asyncio.gather(*(self.jsm.delete_msg(stream, seq) for seq in found), return_exceptions=True)
        except asyncio.CancelledError:
            raise
        return sum(1 for ok in done if ok is True)

    async def remove_listed_dead_letters(self, topic: str, group: str, letters: Sequence[DeadLetter]) -> int:
        listed = {letter_key(letter) for letter in letters}
        stream = self.layout(topic).dead_letters.stream
        found = [seq for seq, letter in await self._scan_dead_letters(topic, group) if letter_key(letter) in listed]
        done = await asyncio.gather(*(self.jsm.delete_msg(stream, seq) for seq in found), return_exceptions=True)
        return sum(1 for ok in done if ok is True)

    async def _scan_dead_letters(self, topic: str, group: str) -> list[tuple[int, DeadLetter]]:
        """Read the ``<topic>.dlq`` stream (see _scan_dead_letters_once); a read that timed out is
        tried again twice — it changes nothing, and on a loaded cluster the ephemeral consumer's
        creation can outlast the request timeout."""
        for _ in range(2):
            try:
                return await self._scan_dead_letters_once(topic, group)
            except BrokerTimeoutError:
                log.info("nats: reading the dead letters of %r timed out; trying again", topic)
        return await self._scan_dead_letters_once(topic, group)

    async def _scan_dead_letters_once(self, topic: str, group: str) -> list[tuple[int, DeadLetter]]:
        """Read the ``<topic>.dlq`` stream through a short-lived ephemeral consumer (no acks)."""
        layout = self.layout(topic).dead_letters
        try:
            try:
                info = await self.jsm.stream_info(layout.stream)
            except nats.js.errors.NotFoundError:
                return []
            if not info.state.messages:
                return []
            config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                                    inactive_threshold=30.0, mem_storage=True)
            sub = await self.js.pull_subscribe(layout.subjects, stream=layout.stream, config=config)
            out: list[tuple[int, DeadLetter]] = []
            unavailable = 0
            try:
                while True:
                    try:
                        msgs = await sub.fetch(256, timeout=1.0)
                    except nats.errors.TimeoutError:
                        break
                    except nats.js.errors.ServiceUnavailableError:
                        # In a JetStream cluster the new consumer may not answer its first pull yet (503).
                        unavailable += 1
                        if unavailable > 30:
                            raise
                        await asyncio.sleep(0.1)
                        continue
                    for msg in msgs:
                        letter = self._dead_letter_of(layout, topic, msg)
                        if letter is not None and letter.group == group:
                            out.append((msg.metadata.sequence.stream, letter))
                    if not msgs or msgs[-1].metadata.num_pending == 0:
                        break
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                with contextlib.suppress(Exception):
                    await self.jsm.delete_consumer(layout.stream, _compat.pull_consumer_name(sub))
            return out
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"reading the dead letters of {topic!r}") from exc

    @staticmethod
    def _dead_letter_of(layout: TopicLayout, topic: str, msg: Any) -> DeadLetter | None:
        meta = msg.metadata
        raw = msg.headers.get(ENVELOPE_HEADER) if msg.headers else None
        envelope = decode_envelope(raw, f"nats-{meta.stream}-{meta.sequence.stream}")
        if dead_letter_group(envelope.headers) is None:
            return None
        return dead_letter_from_record(topic, layout.partition_of(msg.subject), envelope.message_id, envelope.key,
                                       envelope.headers, msg.data, dead_lettered_at=meta.timestamp)



def _not_taken(record: OutgoingRecord, error: Exception) -> bool:
    """What an error answer to ``record``'s publish means: True when no stream took it (not
    stored: sent again); a refusal raises PublishFailedError, anything else is indeterminate."""
    if isinstance(error, (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)):
        return True
    if isinstance(error, nats.js.errors.APIError):
        raise PublishFailedError(
            f"nats: JetStream refused message {record.message_id} on {record.topic!r}: {error.description}"
        ) from error
    raise PublishIndeterminateError(
        f"nats: message {record.message_id} on {record.topic!r} not confirmed: {error!r}"
    ) from error
