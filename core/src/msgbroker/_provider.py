"""The provider interface: what a broker must supply so the core engine can keep the contract of docs/semantics.md.

The engine (``_engine.py``) owns ordering, settling, attempts, dead-letter decisions and
assignment; a provider supplies transport primitives: append, read a lane, settle, and — where
the broker has no partition assignment of its own — membership and exclusive leases.
See docs/writing-a-provider.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from ._describe import GroupView, PartitionView
from ._errors import CapabilityNotSupported

if TYPE_CHECKING:
    from ._message import DeadLetter
    from ._settings import BrokerSettings, ProviderSettings

__all__ = [
    "AssignmentListener",
    "Capabilities",
    "Delivery",
    "Lane",
    "LaneConsumer",
    "OutgoingRecord",
    "Transport",
    "describe_from_interface",
    "failures_since",
]


def failures_since(recorded: int | None, retried_at: int, attempt: int) -> int | None:
    """A delivery's failed attempts from the attempt record a provider keeps: ``recorded`` is
    :attr:`Delivery.failures` as the engine set it at the last :meth:`LaneConsumer.retry`, which
    announced attempt ``retried_at``; every delivery counted after that one ended unsettled (its
    member died holding it), so each is one more failure. None (never retried): unknown, and
    the engine counts every earlier delivery as failed."""
    if recorded is None:
        return None
    return recorded + max(0, attempt - retried_at)


ReplySink = Callable[[str, Mapping[str, str], bytes], None]
"""Where a reply inbox hands a reply: ``(request_id, headers, body)``."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider can do. The conformance suite reads this declaration and skips exactly
    the cases whose capability is declared missing (naming it), and nothing else."""

    persistent: bool
    """Messages survive a restart of the broker server."""
    retains_before_group: bool = True
    """A new group also receives messages published before it was first subscribed."""
    competing_consumers: bool = True
    """Several members of one group share the partitions (load balancing)."""
    redelivery_on_crash: bool = True
    """A dead member's unsettled message is redelivered to a live one."""
    kill_member: bool = True
    """``Broker.abort()`` simulates a crash (no settle, no release) that others recover from."""
    delay: bool = True
    """``ctx.delay()`` is supported."""
    deduplication: Literal["none", "native", "store"] = "store"
    """How ``enable_deduplication`` is kept: by the broker, by a store on its server, or not."""
    pending_count_exact: bool = True
    """``pending_count`` is exact once the group is quiet."""
    partition_exclusive: bool = True
    """``subscribe_to_partition`` holds its partition exclusively within the group."""
    server_restart: bool = False
    """The test setup can restart the server (fault hooks); clients recover by themselves."""
    max_message_bytes: int = 1024 * 1024
    """The largest encoded message the provider accepts."""
    request_reply: bool = False
    """``Broker.request`` works: the provider implements ``Transport.open_replies`` and
    ``Transport.send_reply``."""
    scheduling: Literal["none", "native", "store"] = "none"
    """How ``publish(deliver_at=..., delay=...)`` is kept: by the broker's own message schedules
    (``native``), by a store of the provider's own on the server (``store``), or not (``none``:
    scheduling raises :class:`CapabilityNotSupported` with the reason). docs/semantics.md, rule 14."""
    schedule_precision: float = 1.0
    """Seconds after its time by which a due scheduled message is appended to its partition
    (never before its time). Meaningful only when ``scheduling`` is not ``none``."""
    reasons: Mapping[str, str] = field(default_factory=dict)
    """Why a capability is missing, keyed by its name."""

    def require(self, name: str) -> None:
        """Raise :class:`CapabilityNotSupported` when ``name`` is declared missing."""
        value = getattr(self, name)
        if value is False or value == "none":
            reason = self.reasons.get(name, "declared missing by the provider")
            raise CapabilityNotSupported(f"capability {name!r} is not supported: {reason}")


@dataclass(frozen=True, slots=True)
class Lane:
    """One ordered lane: a (topic, group, partition)."""

    topic: str
    group: str
    partition: int


@dataclass(slots=True)
class OutgoingRecord:
    """One encoded message on its way to the broker."""

    topic: str
    partition: int
    key: str
    message_id: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True, eq=False)
class Delivery:
    """One message read from a lane. ``attempt`` counts deliveries (this one included), as
    recorded by the broker so that it survives a crash; ``position`` is the provider's own
    handle (a stream id, an offset, a native message); ``not_before`` (epoch seconds) is a
    persisted delay the engine must wait out before handling."""

    partition: int
    message_id: str
    key: str
    headers: Mapping[str, str]
    body: bytes
    attempt: int
    position: Any = None
    not_before: float | None = None
    failures: int | None = None
    """How many earlier attempts failed (a handler error or a nak; a delay is not a failure),
    when the provider knows it across members; None: the engine counts every earlier delivery as
    failed. The engine sets it before :meth:`LaneConsumer.retry`, so a provider can persist it."""


class AssignmentListener(Protocol):
    """The engine's side of one subscription, as its :class:`LaneConsumer` sees it: the
    provider-driven assignment calls (``Transport.ASSIGNMENT == "native"``) and two facts a
    consumer may need to decide how to read."""

    @property
    def ordered(self) -> bool:
        """True for an ordered subscription (one message at a time per lane)."""

    @property
    def closing(self) -> bool:
        """True once the subscription began to close or abort: a rebalance callback that comes
        now must not wait for lanes to drain (they are being stopped by the engine itself)."""

    async def assigned(self, partitions: Sequence[int]) -> None:
        """The member now owns these partitions: the engine opens their lanes."""

    async def revoked(self, partitions: Sequence[int]) -> None:
        """The member must give these up: returns once their in-flight handling settled."""


class LaneConsumer(ABC):
    """A member's reader of one (topic, group): polls the lanes the engine owns and settles."""

    OPENS_AT_ONCE: ClassVar[int] = 1
    """How many ``open_lane`` calls (each for another partition) the engine may have in flight
    at once when the member takes several lanes. 1, the default: one after another. A provider
    whose lane opening takes round trips and is safe to run concurrently raises it: a member
    taking 64 lanes then reads its first message after a few round trips instead of 64 times as
    many."""

    @abstractmethod
    async def start(self, listener: AssignmentListener, partition: int | None) -> None:
        """Prepare (create the group where needed). For native assignment, start the broker's
        membership and report partitions through ``listener``; ``partition`` asks for that one only."""

    @abstractmethod
    async def open_lane(self, partition: int, lease: str | None) -> None:
        """The member now owns ``partition`` (``lease`` is its token under lease assignment).
        The next poll of the lane starts with its unsettled history, oldest first."""

    @abstractmethod
    async def close_lane(self, partition: int) -> None:
        """Stop reading ``partition``; what is unsettled stays for the next owner."""

    @abstractmethod
    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        """Up to ``max_per_lane`` next deliveries of each of ``partitions``, in lane order,
        waiting up to ``timeout`` seconds when there is none (returning early, empty, when
        ``wake`` is set, if the provider can). Never returns a delivery of a lane that was not
        opened, nor one already returned and not yet settled."""

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """Settle for good. May be buffered; :meth:`stop` with ``flush`` makes it durable."""

    @abstractmethod
    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        """Record that ``delivery`` will be delivered again as ``attempt`` (not before
        ``not_before``, epoch seconds), so a new owner after a crash knows both."""

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        """Store ``letter`` in ``<topic>.dlq`` and settle ``delivery`` — the letter first."""

    async def unread(self, deliveries: Sequence[Delivery]) -> None:  # noqa: B027 - optional
        """These deliveries were read ahead but never handed to a handler, and the lane is being
        handed over: the provider may take back their delivery count so that the next owner's
        ``delivery_attempt`` counts handlings. The default does nothing (a count one too high)."""

    @abstractmethod
    async def stop(self, flush: bool) -> None:
        """Leave. ``flush=False`` simulates a crash: nothing buffered is written."""


class Transport(ABC):
    """A provider: one connection to one broker server."""

    NAME: ClassVar[str]
    """The provider's name (``BrokerSettings.provider``)."""
    SCHEMES: ClassVar[tuple[str, ...]]
    """The URL schemes that select this provider."""
    CAPABILITIES: ClassVar[Capabilities]
    SETTINGS: ClassVar[type[ProviderSettings] | None] = None
    """The provider's own settings section (a :class:`ProviderSettings` model): ``BrokerSettings``
    validates its section named :attr:`NAME` against it; read it with
    ``settings.section(MySettings)``."""
    ASSIGNMENT: ClassVar[Literal["leases", "shared", "native"]] = "leases"
    """Who decides which member reads which lane: the engine over this provider's membership
    and lease primitives (``leases``), nobody because the broker serialises each lane itself
    (``shared``: every member polls every lane), or the broker (``native``)."""
    JOIN_WINDOW: ClassVar[float] = 0.025
    """Under ``leases``: seconds a subscribing member waits between announcing itself (its first
    heartbeat, sent while its :meth:`LaneConsumer.start` runs) and taking its lanes, so that
    members started together see each other first. A provider whose members all live in one
    process (the memory provider) lowers it."""
    REDELIVERY: ClassVar[Literal["local", "broker"]] = "local"
    """After :meth:`LaneConsumer.retry`, does the engine hand the message again itself
    (``local``) or does the broker deliver it again through ``poll`` (``broker``)?"""
    MAX_POLL_BLOCK: ClassVar[float] = 0.25
    """The longest one poll may block, in seconds (lanes freed meanwhile wait that long)."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings

    @classmethod
    def settings_from_url(cls, url: str) -> dict[str, Any]:
        """Settings overrides that a connection URL stands for (by default none)."""
        return {}

    @classmethod
    def capabilities_for_url(cls, url: str) -> Capabilities:
        """What a connection to ``url`` will be able to do, asked without connecting a broker
        (the conformance harness gates its cases on it): :attr:`CAPABILITIES`, unless the
        provider can tell cheaply that this server lacks something (NATS reads the server's
        version from the line it sends on connect)."""
        return cls.CAPABILITIES

    @property
    def capabilities(self) -> Capabilities:
        """What this connection can do: :attr:`CAPABILITIES`, narrowed by a provider once it is
        connected to a server that lacks something the provider declares (an older server
        version, with the reason). ``Broker.capabilities`` is this after the broker opened."""
        return self.CAPABILITIES

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection(s); raise :class:`BrokerConnectionError` when the server is unreachable."""

    @abstractmethod
    async def close(self) -> None:
        """Close cleanly (flushing whatever is buffered)."""

    async def abort(self) -> None:
        """Drop the connection(s) without flushing anything: a crash, for tests."""
        await self.close()

    @abstractmethod
    async def ping(self) -> bool:
        """True when the server answers; never raises."""

    @abstractmethod
    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        """Append ``records`` durably (confirmed by the server when this returns). With
        ``dedup_window`` (seconds), a record whose ``message_id`` was published within the
        window is dropped."""

    @abstractmethod
    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        """A reader of ``topic`` for ``group``, for the member ``member_id``."""

    @abstractmethod
    async def pending_count(self, topic: str, group: str) -> int:
        """Messages of ``topic`` the group has not settled: ready + in flight + waiting."""

    @abstractmethod
    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        """The dead letters of ``group`` on ``topic``, oldest first."""

    @abstractmethod
    async def remove_dead_letters(self, topic: str, group: str, message_ids: Sequence[str]) -> int:
        """Delete these dead letters; return how many were removed."""

    async def remove_listed_dead_letters(self, topic: str, group: str, letters: Sequence[DeadLetter]) -> int:
        """Delete exactly these letters, as :meth:`dead_letters` listed them — not a letter of the
        same message stored since (a replayed message that failed again before the replay removed
        what it published: removed by message id, that letter would be lost). Match letters with
        ``msgbroker.spi.letter_key`` (message id and ``dead_lettered_at``). The default removes
        by message id (:meth:`remove_dead_letters`), which has that race; the conformance suite
        checks the exact removal."""
        return await self.remove_dead_letters(topic, group, [letter.message_id for letter in letters])

    # -- optional operator views (the CLI uses them where the provider has them) -----------

    async def pending_by_partition(self, topic: str, group: str) -> Mapping[int, int]:
        """Optional: :meth:`pending_count` per partition (partitions with none may be left out)."""
        raise CapabilityNotSupported(f"the {self.NAME} provider does not count pending messages per partition")

    async def peek(self, topic: str, group: str, limit: int) -> list[Delivery]:
        """Optional: up to ``limit`` messages ``group`` has not settled, oldest first within each
        partition, without delivering or settling anything (``attempt`` = deliveries so far)."""
        raise CapabilityNotSupported(f"the {self.NAME} provider cannot read messages without delivering them")

    async def describe(self, topic: str, group: str) -> GroupView:
        """The read model of ``group`` on ``topic`` (the dashboard's, docs/dashboard.md): every
        partition's pending count, owner, head message and its attempt, the oldest unsettled
        message's age; the live members with their join time and partitions. The default builds
        it from the methods above (:func:`msgbroker.spi.describe_from_interface`: no owners or
        members); override it where the broker's own state tells more. Read-only: it joins,
        delivers and settles nothing."""
        return await describe_from_interface(self, topic, group)

    async def topics(self) -> Mapping[str, Sequence[str]]:
        """Optional: the topics the broker holds, each with the groups known on it (the
        dashboard lists them; without this it shows the groups it is told to watch)."""
        raise CapabilityNotSupported(f"the {self.NAME} provider cannot list its topics and groups")

    # -- membership and leases (ASSIGNMENT == "leases") ---------------------------------------

    def lease_ttl(self) -> float:
        """Seconds a silent member keeps its membership and leases (its claim timeout)."""
        return 30.0

    async def heartbeat(self, topic: str, group: str, member_id: str, ttl: float) -> list[str]:
        """Record that ``member_id`` is alive for ``ttl`` seconds; return the live members. A
        subscribing member's first heartbeat runs while its :meth:`LaneConsumer.start` does: it
        must not depend on it (a subscribe that fails then calls :meth:`leave`)."""
        raise CapabilityNotSupported(f"{self.NAME} has no lease-based membership")

    async def leave(self, topic: str, group: str, member_id: str) -> None:
        """Remove ``member_id`` from the live members at once."""
        raise CapabilityNotSupported(f"{self.NAME} has no lease-based membership")

    async def acquire_lease(self, lane: Lane, member_id: str, ttl: float) -> str | None:
        """Take ``lane`` exclusively for ``ttl`` seconds: a fencing token, or None when held."""
        raise CapabilityNotSupported(f"{self.NAME} has no lease-based membership")

    async def acquire_leases(self, lanes: Sequence[Lane], member_id: str, ttl: float) -> dict[Lane, str]:
        """:meth:`acquire_lease` for several lanes: the tokens of those taken (the others are
        held). The engine takes a member's new lanes with one call; override it when the broker
        can take them in one round trip (a thousand lanes one by one delay the first delivery)."""
        taken: dict[Lane, str] = {}
        for lane in lanes:
            try:
                token = await self.acquire_lease(lane, member_id, ttl)
            except Exception:
                if taken:
                    return taken  # keep what is held; the others at the next heartbeat
                raise
            if token is not None:
                taken[lane] = token
        return taken

    async def renew_leases(self, leases: Mapping[Lane, str], ttl: float) -> set[Lane]:
        """Extend the leases still held (same token); return those lanes. The engine calls it
        once per renewal interval, also while lanes it took are being opened (``open_lane`` in
        progress), never twice at once for one subscription."""
        raise CapabilityNotSupported(f"{self.NAME} has no lease-based membership")

    async def release_lease(self, lane: Lane, token: str) -> None:
        """Give ``lane`` up if ``token`` still holds it."""
        raise CapabilityNotSupported(f"{self.NAME} has no lease-based membership")

    # -- request/reply (capability ``request_reply``; docs/semantics.md, "Request and reply") ------

    async def open_replies(self, deliver: ReplySink) -> str:
        """Open this connection's reply inbox on the broker's own channel for it and return its
        address (opaque text, carried in the request's ``msgbroker-reply-to`` header). Every
        reply sent there is passed to ``deliver(request_id, headers, body)``, from this
        transport's event loop; a reply may arrive twice (a request handled twice) or for a
        request no longer awaited. Called once, before the first request; the inbox closes with
        the transport."""
        raise CapabilityNotSupported(f"capability 'request_reply' is not supported: "
                                     f"{self.CAPABILITIES.reasons.get('request_reply', 'not declared')}")

    async def send_reply(self, address: str, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        """Send one reply to an inbox :meth:`open_replies` made (on any connection of the same
        broker). At most once: a reply to an inbox that is gone is dropped without an error."""
        raise CapabilityNotSupported(f"capability 'request_reply' is not supported: "
                                     f"{self.CAPABILITIES.reasons.get('request_reply', 'not declared')}")

    # -- scheduled messages (capability ``scheduling``; docs/semantics.md, rule 14) ---------------

    async def schedule(self, record: OutgoingRecord, deliver_at: float) -> None:
        """Keep ``record`` durably (confirmed by the server when this returns) and append it to
        its partition — with its message id, key and headers, as :meth:`publish` would — once
        the clock passes ``deliver_at`` (epoch seconds), never before, and within the declared
        ``schedule_precision`` after when a member of the topic (or the broker) is running. A
        waiting record blocks nothing (its partition goes on). A record whose message id is
        already waiting on its topic replaces it. The move survives restarts of the server and of
        every client; a crash in the middle may append it twice (a duplicate, never a loss)."""
        raise CapabilityNotSupported(f"capability 'scheduling' is not supported: "
                                     f"{self.CAPABILITIES.reasons.get('scheduling', 'not declared')}")

    async def cancel_scheduled(self, topic: str, message_id: str) -> bool:
        """Withdraw the record :meth:`schedule` keeps for ``message_id`` on ``topic``: True when
        it was waiting and will never be appended, False when there is none (never scheduled,
        cancelled already, or appended already — then it is an ordinary message)."""
        raise CapabilityNotSupported(f"capability 'scheduling' is not supported: "
                                     f"{self.CAPABILITIES.reasons.get('scheduling', 'not declared')}")


# -- the read model's default (Transport.describe; the views are in _describe.py) -----------

PEEK_LIMIT = 1000
"""How many unsettled messages the default reads (``peek``) to find each partition's head."""


def published_at(delivery: Delivery) -> float | None:
    """Epoch seconds of a msgbroker message's ``created_at`` field (its JSON body), or None."""
    try:
        data = json.loads(delivery.body)
    except (ValueError, UnicodeDecodeError):
        return None
    created = data.get("created_at") if isinstance(data, dict) else None
    if not isinstance(created, str):
        return None
    try:
        return datetime.fromisoformat(created).timestamp()
    except ValueError:
        return None


def heads(deliveries: Sequence[Delivery]) -> dict[int, Delivery]:
    """The first (oldest) delivery of each partition in ``peek``'s answer."""
    first: dict[int, Delivery] = {}
    for delivery in deliveries:
        first.setdefault(delivery.partition, delivery)
    return first


async def describe_from_interface(
    transport: Transport,
    topic: str,
    group: str,
    *,
    first: Mapping[int, Delivery] | None = None,
    age_from: Callable[[Delivery], float | None] = published_at,
    knows_members: bool = False,
    pending: Mapping[int, int] | None = None,
) -> GroupView:
    """The read model from the interface every provider implements; what an optional method
    does not supply is left unknown and said in ``notes``.

    ``first``: each partition's oldest unsettled message, when the provider reads them better
    than one ``peek`` of :data:`PEEK_LIMIT` messages (which misses the heads of later partitions
    behind a long backlog); ``age_from``: when a head was published (epoch seconds; the default
    reads the message's ``created_at``); ``knows_members``: the caller fills in members and
    owners itself (no note that they are unknown; ``owners_known`` set); ``pending``: the
    pending count per partition, when the caller has it already (then neither ``pending_count``
    nor ``pending_by_partition`` is asked)."""
    count = transport.settings.partition_count
    notes: list[str] = []
    per: Mapping[int, int] | None = pending
    if per is not None:
        total = sum(per.values())
    else:
        total = await transport.pending_count(topic, group)
        try:
            per = await transport.pending_by_partition(topic, group)
        except CapabilityNotSupported:
            per = None
            notes.append(f"the {transport.NAME} provider does not count pending messages per partition")
    if first is None:
        try:
            first = heads(await transport.peek(topic, group, PEEK_LIMIT))
        except CapabilityNotSupported:
            first = {}
            notes.append(f"the {transport.NAME} provider cannot read unsettled messages (no heads, no ages)")
    now = time.time()
    partitions = []
    for p in range(count):
        delivery = first.get(p)
        created = None if delivery is None else age_from(delivery)
        partitions.append(PartitionView(
            partition=p,
            pending=None if per is None else int(per.get(p, 0)),
            head=None if delivery is None else delivery.message_id,
            attempt=None if delivery is None else delivery.attempt,
            oldest_age=None if created is None else max(0.0, now - created),
        ))
    letters = len(await transport.dead_letters(topic, group))
    if not knows_members:
        notes.append(f"the {transport.NAME} provider does not report members and owners")
    return GroupView(topic, group, total, tuple(partitions), letters, None, knows_members, tuple(notes))
