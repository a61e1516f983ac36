"""The in-memory provider: a real broker inside the process, and the reference for docs/semantics.md.

Logs per (topic, partition), consumer groups with a read cursor and a pending list per lane,
membership with heartbeats, exclusive leases with fencing tokens, dedup, dead letters.
``memory://NAME`` connections in one process share one broker; ``memory://`` is private.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

from ._describe import GroupView, MemberView
from ._errors import BrokerClosedError, ConfigurationError
from ._hookspecs import hookimpl
from ._message import DeadLetter
from ._provider import (
    AssignmentListener,
    Capabilities,
    Delivery,
    Lane,
    LaneConsumer,
    OutgoingRecord,
    ReplySink,
    Transport,
    describe_from_interface,
    failures_since,
)
from .wire import dead_letter_from_record, dead_letter_record, letter_key

__all__ = ["MemoryTransport"]

log = logging.getLogger("msgbroker.memory")


_Entry = tuple[str, str, dict[str, str] | None, bytes]
"""One record of a partition's log: message id, key, headers (None: none), body; its offset is
its index in the log. A tuple, not an object of a class: a log keeps every record, and the
garbage collector stops tracking a tuple of strings and bytes (one with headers stays tracked),
so a long log is not walked again at every full collection."""


@dataclass(slots=True)
class _Pending:
    count: int
    """Deliveries so far (a retry records the announced next attempt as delivered)."""
    not_before: float | None = None
    failures: int | None = None
    """Failed attempts at the last retry (None: never retried)."""
    retried_at: int = 0
    """The attempt that retry announced: a delivery counted after it is one no handler settled."""



@dataclass(slots=True)
class _GroupLane:
    next_offset: int = 0
    pending: dict[int, _Pending | int] = field(default_factory=dict)
    """Unsettled offsets: their deliveries so far as a bare count until they need more than
    that (a retry, a redelivery), then a :class:`_Pending` (one object less a message read)."""

    def record(self, offset: int) -> _Pending | None:
        """The offset's pending record as an object (made from a bare count), or None."""
        pending = self.pending.get(offset)
        if type(pending) is int:
            pending = self.pending[offset] = _Pending(pending)
        return pending  # type: ignore[return-value]


@dataclass(slots=True)
class _Scheduled:
    """A record waiting for its time (``Transport.schedule``)."""

    due: float
    """Epoch seconds."""
    seq: int
    """Order of scheduling: records due at the same time are appended in it."""
    record: OutgoingRecord
    partitions: int


@dataclass(slots=True)
class _Lease:
    member: str
    token: str
    expires: float


class _MemoryServer:
    """The broker state one or more connections share."""

    def __init__(self) -> None:
        self.logs: dict[str, list[list[_Entry]]] = {}
        self.groups: dict[tuple[str, str], list[_GroupLane]] = {}
        self.members: dict[tuple[str, str], dict[str, float]] = {}
        self.joined: dict[tuple[str, str], dict[str, float]] = {}
        """When each live member first heartbeated (epoch seconds), for ``describe``."""
        self.leases: dict[Lane, _Lease] = {}
        self.dedup: dict[str, float] = {}
        self.dead: dict[tuple[str, str], list[DeadLetter]] = {}
        self.lease_epoch = 0
        """Bumped whenever a lease is taken or released: consumers cache their fencing checks
        until it moves (renewing only extends a lease and moves nothing)."""
        self.inboxes: dict[str, tuple[asyncio.AbstractEventLoop, ReplySink]] = {}
        """Reply inboxes (``open_replies``): address → the requester's loop and sink."""
        self.scheduled: dict[tuple[str, str], _Scheduled] = {}
        """Scheduled records by (topic, message id), appended by :meth:`move_due` when due."""
        self._scheduled_seq = 0
        self.readers: dict[str, dict[object, set[int]]] = {}
        """Per topic, each open consumer's set of the partitions appended to since it last read
        them: a poll looks at those (and the lanes it has history for), not at every lane."""
        self._changed: asyncio.Event | None = None
        self._changed_loop: asyncio.AbstractEventLoop | None = None
        self.woken: asyncio.Event | None = None
        """The event :meth:`notify` set last, until a consumer that waited on it runs again."""

    @property
    def changed(self) -> asyncio.Event:
        # A named broker outlives event loops (one asyncio.run per CLI command, one loop per
        # test) and an Event belongs to the loop that first waited on it.
        loop = asyncio.get_running_loop()
        if self._changed is None or self._changed_loop is not loop:
            self._changed = asyncio.Event()
            self._changed_loop = loop
        return self._changed

    def notify(self) -> bool:
        """Wake the consumers waiting for news; True when this woke any on the running loop."""
        changed, loop = self._changed, self._changed_loop
        if changed is None:
            return False
        self._changed = None
        if loop is None or loop is _running_loop():
            changed.set()
            self.woken = changed
            return True
        # published from another thread's loop (msgbroker.cli.main in an async test)
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            loop.call_soon_threadsafe(changed.set)
        return False

    def log_of(self, topic: str, partitions: int) -> list[list[_Entry]]:
        log_ = self.logs.get(topic)
        if log_ is None:
            log_ = self.logs[topic] = [[] for _ in range(partitions)]
        elif len(log_) != partitions:
            raise ConfigurationError(
                f"topic {topic!r} exists with {len(log_)} partitions; this connection has partition_count={partitions}"
            )
        return log_

    def group_of(self, topic: str, group: str, partitions: int) -> list[_GroupLane]:
        self.log_of(topic, partitions)
        lanes = self.groups.get((topic, group))
        if lanes is None:
            lanes = self.groups[(topic, group)] = [_GroupLane() for _ in range(partitions)]
        return lanes

    def holds(self, lane: Lane, token: str | None) -> bool:
        lease = self.leases.get(lane)
        return token is None or (lease is not None and lease.token == token)

    def append(self, record: OutgoingRecord, partitions: int) -> None:
        self.append_all([record], partitions, None)

    def schedule(self, record: OutgoingRecord, partitions: int, due: float) -> None:
        """Keep ``record`` until ``due`` (epoch seconds); an id waiting on the topic is replaced."""
        self.log_of(record.topic, partitions)  # a partition count that does not match fails now
        self._scheduled_seq += 1
        self.scheduled[(record.topic, record.message_id)] = _Scheduled(due, self._scheduled_seq, record, partitions)

    def move_due(self) -> float | None:
        """Append every scheduled record whose time has come (earliest first) and wake the
        consumers; return when the next one is due (epoch seconds), or None when none waits."""
        if not self.scheduled:
            return None
        now = time.time()
        due = sorted((s.due, s.seq, k) for k, s in self.scheduled.items() if s.due <= now)
        for _, _, k in due:
            waiting = self.scheduled.pop(k)
            self.append(waiting.record, waiting.partitions)
        if due:
            self.notify()
        return min((s.due for s in self.scheduled.values()), default=None)

    def append_all(self, records: Sequence[OutgoingRecord], partitions: int, dedup_window: float | None) -> None:
        """Append in order; with ``dedup_window`` (seconds) drop ids published within it."""
        dedup = self.dedup
        now = time.monotonic()
        if dedup_window is not None and dedup:
            for mid in [m for m, exp in dedup.items() if exp <= now]:
                del dedup[mid]
        topic: str | None = None
        log_: list[list[_Entry]] = []
        touched: set[int] = set()
        for record in records:
            if dedup_window is not None:
                if record.message_id in dedup:
                    continue
                dedup[record.message_id] = now + dedup_window
            if record.topic != topic:
                if topic is not None:
                    self._appended(topic, touched)
                    touched = set()
                topic = record.topic
                log_ = self.log_of(topic, partitions)
            partition = record.partition
            headers = record.headers
            log_[partition].append((record.message_id, record.key, dict(headers) if headers else None, record.body))
            touched.add(partition)
        if topic is not None:
            self._appended(topic, touched)

    def _appended(self, topic: str, partitions: set[int]) -> None:
        readers = self.readers.get(topic)
        if readers:
            # a copy first (one C call): a named broker can be published to from another
            # thread's loop while a consumer registers
            for unread in list(readers.values()):
                unread |= partitions


_SERVERS: dict[str, _MemoryServer] = {}


def _delivery(entry: _Entry, partition: int, offset: int, count: int, not_before: float | None) -> Delivery:
    message_id, key, headers, body = entry
    return Delivery(partition, message_id, key, {} if headers is None else headers, body, count, offset, not_before)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

ONE_PROCESS_HINT = (
    "for several processes on one machine use sqlite:///PATH (pip install 'msgbroker[sqlite]'), "
    "for real traffic a server (redis://, nats://, amqp://, kafka://)"
)
"""Where to go instead of ``memory://`` when more than one process is involved."""
_WARNED: set[str] = set()


def _warn_if_one_of_several_processes(name: str) -> None:
    """Log a warning when this process was started by another one through ``multiprocessing``
    (a worker pool, ``uvicorn --workers``): each process has its own memory broker, so the
    workers never see what the others publish (and forked ones each handle the copy they started
    with). Processes started any other way (two shells, a bare ``os.fork``, a supervisor's
    ``subprocess``) cannot be told from a lone one."""
    from multiprocessing import parent_process

    parent = parent_process()
    if parent is not None and name not in _WARNED:
        _WARNED.add(name)
        log.warning(
            "memory://%s is an in-process broker and this process (pid %d) was started by pid %s: every process "
            "has a broker of its own (a forked one starts with a copy), so no message goes from one process to "
            "another; %s",
            name, os.getpid(), parent.pid, ONE_PROCESS_HINT,
        )


def forget(name: str) -> bool:
    """Drop the named broker (``msgbroker.testing.forget_memory_broker``)."""
    return _SERVERS.pop(name, None) is not None


class MemoryTransport(Transport):
    """``memory://`` — the embedded default."""

    NAME: ClassVar[str] = "memory"
    SCHEMES: ClassVar[tuple[str, ...]] = ("memory",)
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        persistent=False,
        deduplication="store",
        request_reply=True,
        scheduling="store",
        schedule_precision=0.1,
        reasons={"persistent": "state lives in the process", "server_restart": "there is no server"},
    )
    ASSIGNMENT = "leases"
    JOIN_WINDOW = 0.001  # members are tasks of one process: their heartbeats come within a few loop turns
    REDELIVERY = "local"
    MAX_POLL_BLOCK: ClassVar[float] = 1.0

    @classmethod
    def settings_from_url(cls, url: str) -> dict[str, Any]:
        parts = urlsplit(url)
        name = (parts.netloc + parts.path).strip("/")
        return {"memory": {"name": name}}

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self._server: _MemoryServer | None = None
        self._partitions = settings.partition_count
        self._inboxes: list[str] = []

    def lease_ttl(self) -> float:
        return float(self.settings.memory.claim_timeout.total_seconds())

    @property
    def server(self) -> _MemoryServer:
        if self._server is None:
            raise BrokerClosedError("the memory broker connection is closed")
        return self._server

    async def connect(self) -> None:
        name = self.settings.memory.name
        if name:
            self._server = _SERVERS.setdefault(name, _MemoryServer())
        else:
            self._server = _MemoryServer()
        _warn_if_one_of_several_processes(name)

    async def close(self) -> None:
        if self._server is not None:
            for address in self._inboxes:
                self._server.inboxes.pop(address, None)
        self._inboxes.clear()
        self._server = None

    async def ping(self) -> bool:
        return self._server is not None

    async def open_replies(self, deliver: ReplySink) -> str:
        address = f"inbox-{uuid.uuid4().hex}"
        self.server.inboxes[address] = (asyncio.get_running_loop(), deliver)
        self._inboxes.append(address)
        return address

    async def send_reply(self, address: str, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        inbox = self.server.inboxes.get(address)
        if inbox is None:
            return  # the requester is gone: the reply is dropped
        loop, deliver = inbox
        if loop is asyncio.get_running_loop():
            deliver(request_id, dict(headers), body)
            return
        with contextlib.suppress(RuntimeError):  # the requester's loop has closed
            loop.call_soon_threadsafe(deliver, request_id, dict(headers), body)

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        server = self.server
        server.move_due()  # a due scheduled message goes first: it was published earlier
        server.append_all(records, self._partitions, dedup_window)
        # Let consumers run, as they would while a network round trip is awaited, when one
        # waited for this or was woken and has not run yet. Otherwise a publisher's loop costs
        # no turn of the event loop per message, as a bare queue's put does not.
        if server.notify() or server.woken is not None:
            await asyncio.sleep(0)

    async def schedule(self, record: OutgoingRecord, deliver_at: float) -> None:
        """Kept in the broker's memory; appended by the first poll, publish or count after its
        time (a polling member wakes for it: precision about a millisecond)."""
        server = self.server
        server.schedule(record, self._partitions, deliver_at)
        server.notify()  # pollers wake to shorten their wait to the new time
        await asyncio.sleep(0)

    async def cancel_scheduled(self, topic: str, message_id: str) -> bool:
        server = self.server
        server.move_due()  # one due already is appended, not cancelled
        return server.scheduled.pop((topic, message_id), None) is not None

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _MemoryConsumer(self, topic, group, member_id)

    async def pending_count(self, topic: str, group: str) -> int:
        server = self.server
        server.move_due()
        log_ = server.logs.get(topic)
        if log_ is None:
            return 0
        lanes = server.groups.get((topic, group))
        if lanes is None:
            return sum(len(p) for p in log_)
        return sum(len(part) - lane.next_offset + len(lane.pending) for part, lane in zip(log_, lanes, strict=True))

    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        return list(self.server.dead.get((topic, group), ()))

    async def remove_dead_letters(self, topic: str, group: str, message_ids: Sequence[str]) -> int:
        letters = self.server.dead.get((topic, group), [])
        wanted = set(message_ids)
        kept = [letter for letter in letters if letter.message_id not in wanted]
        self.server.dead[(topic, group)] = kept
        return len(letters) - len(kept)

    async def remove_listed_dead_letters(self, topic: str, group: str, letters: Sequence[DeadLetter]) -> int:
        stored = self.server.dead.get((topic, group), [])
        listed = {letter_key(letter) for letter in letters}
        kept = [letter for letter in stored if letter_key(letter) not in listed]
        self.server.dead[(topic, group)] = kept
        return len(stored) - len(kept)

    async def pending_by_partition(self, topic: str, group: str) -> dict[int, int]:
        server = self.server
        server.move_due()
        log_ = server.logs.get(topic)
        if log_ is None:
            return {}
        lanes = server.groups.get((topic, group))
        if lanes is None:
            return {p: len(part) for p, part in enumerate(log_) if part}
        counts = {p: len(part) - lane.next_offset + len(lane.pending)
                  for p, (part, lane) in enumerate(zip(log_, lanes, strict=True))}
        return {p: n for p, n in counts.items() if n}

    async def peek(self, topic: str, group: str, limit: int) -> list[Delivery]:
        server = self.server
        log_ = server.logs.get(topic)
        lanes = server.groups.get((topic, group))
        out: list[Delivery] = []
        for partition, entries in enumerate(log_ or ()):
            lane = lanes[partition] if lanes is not None else _GroupLane()
            for offset in [*sorted(lane.pending), *range(lane.next_offset, len(entries))]:
                if len(out) >= limit:
                    return out
                pending = lane.pending.get(offset)
                if pending is None or isinstance(pending, int):
                    count, not_before = pending or 0, None
                else:
                    count, not_before = pending.count, pending.not_before
                out.append(_delivery(entries[offset], partition, offset, count, not_before))
        return out

    # -- the read model (Transport.describe) ------------------------------------------------

    async def describe(self, topic: str, group: str) -> GroupView:
        """The default view plus what the server holds: members, join times, lease holders."""
        view = await describe_from_interface(self, topic, group, knows_members=True)
        server, now = self.server, time.monotonic()
        live = sorted(m for m, expires in server.members.get((topic, group), {}).items() if expires > now)
        owners: dict[int, str] = {}
        for p in range(self.settings.partition_count):
            lease = server.leases.get(Lane(topic, group, p))
            if lease is not None and lease.expires > now:
                owners[p] = lease.member
        joined = server.joined.get((topic, group), {})
        log_ = server.logs.get(topic)
        members = tuple(
            MemberView(m, datetime.fromtimestamp(joined[m], UTC) if m in joined else None,
                       tuple(sorted(p for p, owner in owners.items() if owner == m)))
            for m in live
        )
        partitions = tuple(replace(part, owner=owners.get(part.partition),
                                   published=len(log_[part.partition]) if log_ is not None else 0)
                           for part in view.partitions)
        return replace(view, partitions=partitions, members=members)

    async def topics(self) -> dict[str, list[str]]:
        server = self.server
        found: dict[str, set[str]] = {t: set() for t in server.logs if not t.endswith(".dlq")}
        for known in (server.groups, server.members, server.dead):
            for topic, group in known:
                if not topic.endswith(".dlq"):
                    found.setdefault(topic, set()).add(group)
        return {topic: sorted(groups) for topic, groups in sorted(found.items())}

    # -- membership and leases -------------------------------------------------------------

    async def heartbeat(self, topic: str, group: str, member_id: str, ttl: float) -> list[str]:
        now = time.monotonic()
        members = self.server.members.setdefault((topic, group), {})
        joined = self.server.joined.setdefault((topic, group), {})
        if member_id not in members:
            joined[member_id] = time.time()
        members[member_id] = now + ttl
        for member in [m for m, exp in members.items() if exp <= now]:
            del members[member]
            joined.pop(member, None)
        return sorted(members)

    async def leave(self, topic: str, group: str, member_id: str) -> None:
        self.server.members.get((topic, group), {}).pop(member_id, None)
        self.server.joined.get((topic, group), {}).pop(member_id, None)

    async def acquire_lease(self, lane: Lane, member_id: str, ttl: float) -> str | None:
        now = time.monotonic()
        lease = self.server.leases.get(lane)
        if lease is not None and lease.expires > now and lease.member != member_id:
            return None
        token = uuid.uuid4().hex
        self.server.leases[lane] = _Lease(member_id, token, now + ttl)
        self.server.lease_epoch += 1
        return token

    async def renew_leases(self, leases: Mapping[Lane, str], ttl: float) -> set[Lane]:
        now = time.monotonic()
        kept: set[Lane] = set()
        for lane, token in leases.items():
            lease = self.server.leases.get(lane)
            if lease is not None and lease.token == token:
                lease.expires = now + ttl
                kept.add(lane)
        return kept

    async def release_lease(self, lane: Lane, token: str) -> None:
        lease = self.server.leases.get(lane)
        if lease is not None and lease.token == token:
            del self.server.leases[lane]
            self.server.lease_epoch += 1


class _MemoryConsumer(LaneConsumer):
    def __init__(self, transport: MemoryTransport, topic: str, group: str, member_id: str) -> None:
        self._transport = transport
        self._topic = topic
        self._group = group
        self._member = member_id
        self._tokens: dict[int, str | None] = {}
        self._history: dict[int, deque[int]] = {}
        self._stopped = False
        self._group_lanes: list[_GroupLane] | None = None
        self._lane_ids = [Lane(topic, group, p) for p in range(transport._partitions)]
        # _fenced's answers, valid while the server, its lease epoch and our tokens stay put
        self._fence: dict[int, bool] = {}
        self._fence_key: tuple[_MemoryServer, int] | None = None
        # The open lanes that may have something to read: appended to since this consumer last
        # read them to the end (the server adds to it), or with unsettled history left.
        self._unread: set[int] = set()
        self._asked_for: Sequence[int] | None = None
        self._asked_set: frozenset[int] | set[int] = frozenset()

    def _lanes(self) -> list[_GroupLane]:
        if self._group_lanes is None:
            server = self._transport.server
            self._group_lanes = server.group_of(self._topic, self._group, self._transport._partitions)
            server.readers.setdefault(self._topic, {})[self] = self._unread
        return self._group_lanes

    async def start(self, listener: AssignmentListener, partition: int | None) -> None:
        self._lanes()  # the group exists from its first subscribe, reading from the oldest entry

    async def open_lane(self, partition: int, lease: str | None) -> None:
        lane = self._lanes()[partition]
        self._tokens[partition] = lease
        self._fence.clear()
        self._history[partition] = deque(sorted(lane.pending))
        self._unread.add(partition)

    async def close_lane(self, partition: int) -> None:
        self._tokens.pop(partition, None)
        self._history.pop(partition, None)
        self._fence.clear()

    def _fenced(self, partition: int) -> bool:
        server = self._transport.server
        if self._fence_key is None or self._fence_key[0] is not server or self._fence_key[1] != server.lease_epoch:
            self._fence.clear()
            self._fence_key = (server, server.lease_epoch)
        fenced = self._fence.get(partition)
        if fenced is None:
            fenced = self._fence[partition] = self._check_fenced(server, partition)
        return fenced

    def _check_fenced(self, server: _MemoryServer, partition: int) -> bool:
        if partition not in self._tokens:
            return True
        token = self._tokens[partition]
        if token is None:
            return False
        lease = server.leases.get(self._lane_ids[partition])
        return lease is None or lease.token != token

    def _asked(self, partitions: Sequence[int]) -> frozenset[int] | set[int]:
        """``partitions`` as a set; the engine asks with the same tuple while its lanes that
        want deliveries stay the same, so that one is made once."""
        if partitions is self._asked_for:
            return self._asked_set
        asked = partitions if isinstance(partitions, set | frozenset) else frozenset(partitions)
        if type(partitions) is tuple:
            self._asked_for, self._asked_set = partitions, asked
        return asked

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            if self._stopped:
                return []
            server = self._transport.server
            changed = server.changed
            next_due = server.move_due()
            logs = server.log_of(self._topic, self._transport._partitions)
            lanes = self._lanes()
            out: list[Delivery] = []
            unread = self._unread
            # Only the lanes asked for that may have something: a poll costs with the lanes that
            # have work, not with the lanes held (a lane not asked for now stays in unread).
            asked = self._asked(partitions)
            if len(unread) <= len(asked):
                # a copy first (one C call): another thread's publish may add to it meanwhile
                maybe = [p for p in tuple(unread) if p in asked]
            else:
                maybe = [p for p in asked if p in unread]
            for partition in maybe:
                history = self._history.get(partition)
                if history is None:
                    unread.discard(partition)  # not open here: open_lane adds it again
                    continue
                if self._fenced(partition):
                    continue
                lane, entries = lanes[partition], logs[partition]
                taken = 0
                while history and taken < max_per_lane:
                    offset = history.popleft()
                    pending = lane.record(offset)
                    if pending is None:
                        continue
                    pending.count += 1
                    delivery = _delivery(entries[offset], partition, offset, pending.count, pending.not_before)
                    delivery.failures = failures_since(pending.failures, pending.retried_at, pending.count)
                    out.append(delivery)
                    taken += 1
                start = lane.next_offset
                if not history and taken < max_per_lane:
                    stop = min(len(entries), start + max_per_lane - taken)
                    if start < stop:
                        offsets = range(start, stop)
                        lane.pending.update(dict.fromkeys(offsets, 1))
                        out += [Delivery(partition, message_id, key, {} if headers is None else headers, body, 1,
                                         offset, None)
                                for offset, (message_id, key, headers, body)
                                in zip(offsets, entries[start:stop], strict=True)]
                        lane.next_offset = start = stop
                if not history and start >= len(entries):
                    unread.discard(partition)  # read to the end: the next append adds it again
            remaining = deadline - time.monotonic()
            if out or remaining <= 0 or wake.is_set():
                return out
            if next_due is not None:  # wake when the next scheduled message is due
                remaining = min(remaining, max(0.001, next_due - time.time()))
            waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(wake.wait())]
            try:
                done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the poll itself is cancelled (a closing consumer)
                for waiter in waiters:
                    waiter.cancel()
                if server.woken is changed:
                    server.woken = None  # the woken consumer runs: publishers need not yield for it
            if wake.is_set() or (not done and next_due is None):
                return []

    async def ack(self, delivery: Delivery) -> None:
        if self._fenced(delivery.partition):
            log.warning("memory: ack of %s dropped: this member no longer holds %s[%d]",
                        delivery.message_id, self._topic, delivery.partition)
            return
        (self._group_lanes or self._lanes())[delivery.partition].pending.pop(delivery.position, None)

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        if self._fenced(delivery.partition):
            return
        pending = self._lanes()[delivery.partition].record(delivery.position)
        if pending is not None:
            pending.count = attempt
            pending.not_before = not_before
            pending.failures = delivery.failures
            pending.retried_at = attempt

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        if self._fenced(delivery.partition):
            return
        server = self._transport.server
        record = dead_letter_record(letter)  # the group's list keeps what <topic>.dlq carries, read back
        stored = dead_letter_from_record(self._topic, record.partition, record.message_id, record.key,
                                         record.headers, record.body)
        server.dead.setdefault((self._topic, self._group), []).append(stored)
        server.append(record, self._transport._partitions)
        self._lanes()[delivery.partition].pending.pop(delivery.position, None)
        server.notify()

    async def unread(self, deliveries: Sequence[Delivery]) -> None:
        lanes = self._lanes()
        for delivery in deliveries:
            if self._fenced(delivery.partition):
                continue
            pending = lanes[delivery.partition].record(delivery.position)
            if pending is not None and pending.count > 0:
                pending.count -= 1

    async def stop(self, flush: bool) -> None:
        self._stopped = True
        self._tokens.clear()
        self._fence.clear()
        server = self._transport._server
        if server is not None:
            readers = server.readers.get(self._topic)
            if readers is not None:
                readers.pop(self, None)
                if not readers:
                    del server.readers[self._topic]


@hookimpl
def msgbroker_providers() -> list[type[Transport]]:
    return [MemoryTransport]
