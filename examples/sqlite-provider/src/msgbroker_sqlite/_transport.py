"""A msgbroker provider whose "server" is one SQLite file.

Every connection (every Broker, so every member of a group) opens the file itself; SQLite's
locking serialises the writers, so several processes on one machine can share a broker. The
core engine keeps ordering, attempts and dead-letter decisions; this module only stores:
an append-only log per (topic, partition), a cursor and a pending list per (group, partition),
members with heartbeats, leases with fencing tokens, dedup ids and dead letters.

sqlite3 is blocking, so each connection lives on its own single worker thread and every call
hops there (``_Database.run``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from msgbroker.spi import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_ERROR,
    DEAD_LETTER_GROUP,
    BrokerClosedError,
    BrokerConnectionError,
    BrokerSettings,
    Capabilities,
    ConfigurationError,
    DeadLetter,
    Delivery,
    Duration,
    Lane,
    LaneConsumer,
    OutgoingRecord,
    ProviderSettings,
    Transport,
    dead_letter_from_record,
    dead_letter_record,
    failures_since,
    letter_key,
)

__all__ = ["SqliteSettings", "SqliteTransport"]

log = logging.getLogger("msgbroker.sqlite")

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (topic TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    topic TEXT, partition INTEGER, offset INTEGER, message_id TEXT, key TEXT, headers TEXT, body BLOB,
    PRIMARY KEY (topic, partition, offset));
CREATE TABLE IF NOT EXISTS cursors (
    topic TEXT, grp TEXT, partition INTEGER, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, grp, partition));
CREATE TABLE IF NOT EXISTS pending (
    topic TEXT, grp TEXT, partition INTEGER, offset INTEGER, attempts INTEGER NOT NULL, not_before REAL,
    failures INTEGER, retried_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, grp, partition, offset));
CREATE TABLE IF NOT EXISTS members (
    topic TEXT, grp TEXT, member TEXT, expires REAL, PRIMARY KEY (topic, grp, member));
CREATE TABLE IF NOT EXISTS leases (
    topic TEXT, grp TEXT, partition INTEGER, member TEXT, token TEXT, expires REAL,
    PRIMARY KEY (topic, grp, partition));
CREATE TABLE IF NOT EXISTS dedup (message_id TEXT PRIMARY KEY, expires REAL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, grp TEXT, message_id TEXT, partition INTEGER,
    key TEXT, error TEXT, attempts INTEGER, headers TEXT, payload BLOB, at REAL);
"""

POLL_INTERVAL = 0.01
"""How often an idle poll looks at the file again (there is no cross-connection notification)."""


class _Database:
    """One sqlite3 connection on its own thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msgbroker-sqlite")
        self._connection: sqlite3.Connection | None = None

    def _open(self) -> None:
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash, fast enough
        connection.executescript(SCHEMA)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(pending)")}
        if "failures" not in columns:  # a file from before the attempt record: add its columns
            connection.execute("ALTER TABLE pending ADD COLUMN failures INTEGER")
            connection.execute("ALTER TABLE pending ADD COLUMN retried_at INTEGER NOT NULL DEFAULT 0")
        self._connection = connection

    async def open(self) -> None:
        try:
            await self.run_raw(self._open)
        except sqlite3.Error as exc:
            raise BrokerConnectionError(f"cannot open the SQLite broker file {self.path!r}: {exc}") from exc

    async def run_raw(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        """Run ``fn`` in one transaction (``BEGIN IMMEDIATE`` for writers: no lost updates)."""

        def call() -> T:
            connection = self._connection
            if connection is None:
                raise BrokerClosedError(f"the SQLite broker connection to {self.path!r} is closed")
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = fn(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return result

        try:
            return await self.run_raw(call)
        except sqlite3.OperationalError as exc:
            raise BrokerConnectionError(f"SQLite broker {self.path!r}: {exc}") from exc

    async def close(self) -> None:
        def shut() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        try:
            await self.run_raw(shut)
        finally:
            self._executor.shutdown(wait=False)


class SqliteSettings(ProviderSettings):
    """The ``sqlite`` settings section: ``BrokerSettings(sqlite={"path": "broker.db"})``,
    ``MSGBROKER_SQLITE__PATH=broker.db``, or ``sqlite:///broker.db?claim_timeout=2``."""

    path: str = ""
    """The broker file (created when missing)."""
    claim_timeout: Duration = timedelta(seconds=8)
    """How long a member may stay silent before its partitions move to the others."""


class SqliteTransport(Transport):
    """``sqlite:///path/to/broker.db`` (settings: :class:`SqliteSettings`)."""

    NAME: ClassVar[str] = "sqlite"
    SCHEMES: ClassVar[tuple[str, ...]] = ("sqlite",)
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        deduplication="store",
        reasons={
            "server_restart": "there is no server process: the broker is a file",
            "request_reply": "the example keeps to the contract's core: a reply channel between processes "
                             "over one SQLite file would have to be polled (see docs/writing-a-provider.md)",
            "scheduling": "the example keeps to the contract's core: moving due messages needs a mover that some "
                          "process of the file runs under a lease (see the Redis provider's, docs/providers/redis.md)",
        },
    )
    SETTINGS = SqliteSettings
    ASSIGNMENT = "leases"  # the engine assigns lanes over our members/leases tables
    REDELIVERY = "local"  # after retry() the engine hands the message again itself
    MAX_POLL_BLOCK: ClassVar[float] = 0.25

    @classmethod
    def settings_from_url(cls, url: str) -> dict[str, Any]:
        parts = urlsplit(url)
        options: dict[str, Any] = dict(parse_qsl(parts.query))
        path = unquote(parts.netloc + parts.path)
        if path:
            options["path"] = path
        return {"sqlite": options} if options else {}

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__(settings)
        options = settings.section(SqliteSettings)
        if not options.path:
            raise ConfigurationError("the sqlite provider needs a file: sqlite:///path/to/broker.db")
        self._claim_timeout = options.claim_timeout.total_seconds()
        self.path = str(Path(options.path))
        self.partitions = settings.partition_count
        self._db: _Database | None = None

    @property
    def db(self) -> _Database:
        if self._db is None:
            raise BrokerClosedError("the SQLite broker connection is closed")
        return self._db

    # -- connection -------------------------------------------------------------------------------

    async def connect(self) -> None:
        db = _Database(self.path)
        await db.open()
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def ping(self) -> bool:
        if self._db is None:
            return False
        try:
            return await self._db.run(lambda c: c.execute("SELECT 1").fetchone() == (1,), write=False)
        except Exception:
            return False

    def lease_ttl(self) -> float:
        return self._claim_timeout

    # -- publishing ---------------------------------------------------------------------------------

    def _check_topic(self, c: sqlite3.Connection, topic: str) -> None:
        row = c.execute("SELECT partitions FROM topics WHERE topic = ?", (topic,)).fetchone()
        if row is None:
            c.execute("INSERT INTO topics VALUES (?, ?)", (topic, self.partitions))
        elif row[0] != self.partitions:
            raise ConfigurationError(
                f"topic {topic!r} exists with {row[0]} partitions; "
                f"this connection has partition_count={self.partitions}"
            )

    @staticmethod
    def _append(c: sqlite3.Connection, record: OutgoingRecord) -> None:
        (offset,) = c.execute(
            "SELECT COALESCE(MAX(offset) + 1, 0) FROM messages WHERE topic = ? AND partition = ?",
            (record.topic, record.partition),
        ).fetchone()
        c.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (record.topic, record.partition, offset, record.message_id, record.key,
                   json.dumps(record.headers), record.body))

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        def write(c: sqlite3.Connection) -> None:
            now = time.time()
            if dedup_window is not None:
                c.execute("DELETE FROM dedup WHERE expires <= ?", (now,))
            for record in records:
                self._check_topic(c, record.topic)
                if dedup_window is not None:
                    if c.execute("SELECT 1 FROM dedup WHERE message_id = ?", (record.message_id,)).fetchone():
                        continue
                    c.execute("INSERT INTO dedup VALUES (?, ?)", (record.message_id, now + dedup_window))
                self._append(c, record)

        await self.db.run(write)

    # -- consuming ----------------------------------------------------------------------------------

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _SqliteConsumer(self, topic, group, member_id)

    async def pending_count(self, topic: str, group: str) -> int:
        def count(c: sqlite3.Connection) -> int:
            group_exists = c.execute("SELECT 1 FROM cursors WHERE topic = ? AND grp = ? LIMIT 1", (topic, group))
            if group_exists.fetchone() is None:
                (total,) = c.execute("SELECT COUNT(*) FROM messages WHERE topic = ?", (topic,)).fetchone()
                return int(total)
            (unread,) = c.execute(
                "SELECT COUNT(*) FROM messages m JOIN cursors k ON k.topic = m.topic AND k.partition = m.partition "
                "WHERE m.topic = ? AND k.grp = ? AND m.offset >= k.next_offset", (topic, group)).fetchone()
            (held,) = c.execute("SELECT COUNT(*) FROM pending WHERE topic = ? AND grp = ?", (topic, group)).fetchone()
            return int(unread) + int(held)

        return await self.db.run(count, write=False)

    _LETTER_ROWS = ("SELECT id, message_id, partition, key, error, attempts, headers, payload, at FROM dead_letters "
                    "WHERE topic = ? AND grp = ? ORDER BY id")

    @staticmethod
    def _letter(topic: str, group: str, row: tuple[Any, ...]) -> DeadLetter:
        # ``headers`` holds the letter's <topic>.dlq record headers (msgbroker.wire); a row written
        # before held only the original's, with the letter's fields in their own columns.
        _, mid, partition, key, error, attempts, headers, payload, at = row
        return dead_letter_from_record(
            topic, partition, mid, key,
            {DEAD_LETTER_ERROR: error, DEAD_LETTER_ATTEMPTS: str(attempts), DEAD_LETTER_GROUP: group,
             **json.loads(headers)},
            bytes(payload), dead_lettered_at=datetime.fromtimestamp(at, UTC),
        )

    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        rows = await self.db.run(lambda c: c.execute(self._LETTER_ROWS, (topic, group)).fetchall(), write=False)
        return [self._letter(topic, group, row) for row in rows]

    async def remove_listed_dead_letters(self, topic: str, group: str, letters: Sequence[DeadLetter]) -> int:
        listed = {letter_key(letter) for letter in letters}

        def delete(c: sqlite3.Connection) -> int:
            rows = c.execute(self._LETTER_ROWS, (topic, group)).fetchall()
            doomed = [(row[0],) for row in rows if letter_key(self._letter(topic, group, row)) in listed]
            c.executemany("DELETE FROM dead_letters WHERE id = ?", doomed)
            return len(doomed)

        return await self.db.run(delete)

    async def remove_dead_letters(self, topic: str, group: str, message_ids: Sequence[str]) -> int:
        def delete(c: sqlite3.Connection) -> int:
            removed = 0
            for mid in message_ids:
                removed += c.execute("DELETE FROM dead_letters WHERE topic = ? AND grp = ? AND message_id = ?",
                                     (topic, group, mid)).rowcount
            return removed

        return await self.db.run(delete)

    # -- membership and leases (ASSIGNMENT == "leases") ---------------------------------------------

    async def heartbeat(self, topic: str, group: str, member_id: str, ttl: float) -> list[str]:
        def beat(c: sqlite3.Connection) -> list[str]:
            now = time.time()
            c.execute("INSERT OR REPLACE INTO members VALUES (?, ?, ?, ?)", (topic, group, member_id, now + ttl))
            c.execute("DELETE FROM members WHERE topic = ? AND grp = ? AND expires <= ?", (topic, group, now))
            rows = c.execute("SELECT member FROM members WHERE topic = ? AND grp = ? ORDER BY member", (topic, group))
            return [member for (member,) in rows]

        return await self.db.run(beat)

    async def leave(self, topic: str, group: str, member_id: str) -> None:
        await self.db.run(lambda c: c.execute("DELETE FROM members WHERE topic = ? AND grp = ? AND member = ?",
                                              (topic, group, member_id)))

    async def acquire_lease(self, lane: Lane, member_id: str, ttl: float) -> str | None:
        def acquire(c: sqlite3.Connection) -> str | None:
            now = time.time()
            row = c.execute("SELECT member, expires FROM leases WHERE topic = ? AND grp = ? AND partition = ?",
                            (lane.topic, lane.group, lane.partition)).fetchone()
            if row is not None and row[1] > now and row[0] != member_id:
                return None
            token = uuid.uuid4().hex  # a new token fences every settle of the previous holder
            c.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?)",
                      (lane.topic, lane.group, lane.partition, member_id, token, now + ttl))
            return token

        return await self.db.run(acquire)

    async def renew_leases(self, leases: Mapping[Lane, str], ttl: float) -> set[Lane]:
        def renew(c: sqlite3.Connection) -> set[Lane]:
            expires = time.time() + ttl
            return {lane for lane, token in leases.items() if c.execute(
                "UPDATE leases SET expires = ? WHERE topic = ? AND grp = ? AND partition = ? AND token = ?",
                (expires, lane.topic, lane.group, lane.partition, token)).rowcount}

        return await self.db.run(renew)

    async def release_lease(self, lane: Lane, token: str) -> None:
        await self.db.run(lambda c: c.execute(
            "DELETE FROM leases WHERE topic = ? AND grp = ? AND partition = ? AND token = ?",
            (lane.topic, lane.group, lane.partition, token)))


class _SqliteConsumer(LaneConsumer):
    """One member's reader of (topic, group). Every settle is fenced by the lane's lease token:
    a member that lost its lease cannot settle what the new owner now handles."""

    def __init__(self, transport: SqliteTransport, topic: str, group: str, member_id: str) -> None:
        self._transport = transport
        self._topic = topic
        self._group = group
        self._member = member_id
        self._tokens: dict[int, str | None] = {}
        self._history: dict[int, deque[int]] = {}
        self._stopped = False

    def _holds(self, c: sqlite3.Connection, partition: int) -> bool:
        if partition not in self._tokens:
            return False
        token = self._tokens[partition]
        if token is None:
            return True
        row = c.execute("SELECT token FROM leases WHERE topic = ? AND grp = ? AND partition = ?",
                        (self._topic, self._group, partition)).fetchone()
        return row is not None and row[0] == token

    async def start(self, listener: Any, partition: int | None) -> None:
        def create(c: sqlite3.Connection) -> None:
            self._transport._check_topic(c, self._topic)
            # The group exists from its first subscribe and reads from the oldest message.
            c.executemany("INSERT OR IGNORE INTO cursors VALUES (?, ?, ?, 0)",
                          [(self._topic, self._group, p) for p in range(self._transport.partitions)])

        await self._transport.db.run(create)

    async def open_lane(self, partition: int, lease: str | None) -> None:
        rows = await self._transport.db.run(lambda c: c.execute(
            "SELECT offset FROM pending WHERE topic = ? AND grp = ? AND partition = ? ORDER BY offset",
            (self._topic, self._group, partition)).fetchall(), write=False)
        self._tokens[partition] = lease
        self._history[partition] = deque(offset for (offset,) in rows)  # the unsettled past first

    async def close_lane(self, partition: int) -> None:
        self._tokens.pop(partition, None)
        self._history.pop(partition, None)

    def _read(self, c: sqlite3.Connection, partitions: Sequence[int], max_per_lane: int) -> list[Delivery]:
        out: list[Delivery] = []
        key = (self._topic, self._group)
        for partition in partitions:
            if not self._holds(c, partition):
                continue
            history = self._history.get(partition)
            if history is None:
                continue
            taken = 0
            while history and taken < max_per_lane:
                offset = history.popleft()
                row = c.execute("SELECT attempts, not_before, failures, retried_at FROM pending WHERE topic = ? "
                                "AND grp = ? AND partition = ? AND offset = ?", (*key, partition, offset)).fetchone()
                if row is None:
                    continue  # settled meanwhile
                attempt = row[0] + 1
                c.execute("UPDATE pending SET attempts = ? "
                          "WHERE topic = ? AND grp = ? AND partition = ? AND offset = ?",
                          (attempt, *key, partition, offset))
                delivery = self._delivery(c, partition, offset, attempt, row[1])
                delivery.failures = failures_since(row[2], row[3], attempt)
                out.append(delivery)
                taken += 1
            if history:
                continue
            (next_offset,) = c.execute("SELECT next_offset FROM cursors WHERE topic = ? AND grp = ? AND partition = ?",
                                       (*key, partition)).fetchone()
            rows = c.execute("SELECT offset FROM messages WHERE topic = ? AND partition = ? AND offset >= ? "
                             "ORDER BY offset LIMIT ?", (self._topic, partition, next_offset,
                                                         max_per_lane - taken)).fetchall()
            for (offset,) in rows:
                c.execute("INSERT INTO pending (topic, grp, partition, offset, attempts) VALUES (?, ?, ?, ?, 1)",
                          (*key, partition, offset))
                out.append(self._delivery(c, partition, offset, 1, None))
            if rows:
                c.execute("UPDATE cursors SET next_offset = ? WHERE topic = ? AND grp = ? AND partition = ?",
                          (rows[-1][0] + 1, *key, partition))
        return out

    def _delivery(self, c: sqlite3.Connection, partition: int, offset: int, attempt: int,
                  not_before: float | None) -> Delivery:
        message_id, key, headers, body = c.execute(
            "SELECT message_id, key, headers, body FROM messages WHERE topic = ? AND partition = ? AND offset = ?",
            (self._topic, partition, offset)).fetchone()
        return Delivery(partition, message_id, key, json.loads(headers), bytes(body), attempt, offset, not_before)

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while not self._stopped:
            out = await self._transport.db.run(lambda c: self._read(c, partitions, max_per_lane))
            remaining = deadline - time.monotonic()
            if out or remaining <= 0 or wake.is_set():
                return out
            try:  # nothing new: look again shortly, or return at once when the engine wakes us
                async with asyncio.timeout(min(POLL_INTERVAL, remaining)):
                    await wake.wait()
            except TimeoutError:
                continue
            return []
        return []

    async def ack(self, delivery: Delivery) -> None:
        def settle(c: sqlite3.Connection) -> None:
            if not self._holds(c, delivery.partition):
                log.warning("sqlite: ack of %s dropped: this member no longer holds %s[%d]",
                            delivery.message_id, self._topic, delivery.partition)
                return
            c.execute("DELETE FROM pending WHERE topic = ? AND grp = ? AND partition = ? AND offset = ?",
                      (self._topic, self._group, delivery.partition, delivery.position))

        await self._transport.db.run(settle)

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        def record(c: sqlite3.Connection) -> None:
            if self._holds(c, delivery.partition):
                c.execute("UPDATE pending SET attempts = ?, not_before = ?, failures = ?, retried_at = ? "
                          "WHERE topic = ? AND grp = ? AND partition = ? AND offset = ?",
                          (attempt, not_before, delivery.failures, attempt, self._topic, self._group,
                           delivery.partition, delivery.position))

        await self._transport.db.run(record)

    async def unread(self, deliveries: Sequence[Delivery]) -> None:
        """Read ahead (or announced by a retry) and never handed to a handler: take the count
        back, so that the next owner's attempt counts handlings."""
        def take_back(c: sqlite3.Connection) -> None:
            for delivery in deliveries:
                if self._holds(c, delivery.partition):
                    c.execute("UPDATE pending SET attempts = attempts - 1 WHERE topic = ? AND grp = ? AND "
                              "partition = ? AND offset = ? AND attempts = ? AND attempts > 0",
                              (self._topic, self._group, delivery.partition, delivery.position, delivery.attempt))

        await self._transport.db.run(take_back)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        def store(c: sqlite3.Connection) -> None:
            if not self._holds(c, delivery.partition):
                return
            # The letter's <topic>.dlq record, defined by msgbroker.wire: kept in the group's table
            # (its headers whole, its fields also in columns for SQL) and appended to <topic>.dlq.
            dlq = dead_letter_record(letter)
            c.execute("INSERT INTO dead_letters (topic, grp, message_id, partition, key, error, attempts, headers, "
                      "payload, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (self._topic, self._group, dlq.message_id, dlq.partition, dlq.key, letter.error,
                       letter.attempts, json.dumps(dlq.headers), dlq.body, letter.dead_lettered_at.timestamp()))
            self._transport._check_topic(c, dlq.topic)
            self._transport._append(c, dlq)
            c.execute("DELETE FROM pending WHERE topic = ? AND grp = ? AND partition = ? AND offset = ?",
                      (self._topic, self._group, delivery.partition, delivery.position))

        await self._transport.db.run(store)

    async def stop(self, flush: bool) -> None:
        # Nothing is buffered: every ack was written when it was made.
        self._stopped = True
        self._tokens.clear()
