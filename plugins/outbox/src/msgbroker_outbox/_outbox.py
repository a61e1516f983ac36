"""The outbox: messages written in the caller's own transaction, and the inbox beside it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from msgbroker import ConfigurationError, InvalidNameError, Message, SerializationError, partition_for
from sqlalchemy import MetaData, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ._adapter import DatabaseAdapter, adapter_for
from ._sql import check_prefix, inbox_table, outbox_tables

Executor = AsyncSession | AsyncConnection
"""Where a message is written: the caller's session or connection, inside its transaction."""

# docs/semantics.md, "Names": 1-200 characters of A-Z a-z 0-9 _ . -, not starting with . or -,
# without .., not ending with .
_NAME = re.compile(r"^(?![.-])(?!.*\.\.)[A-Za-z0-9_.-]{1,200}(?<!\.)$")


def async_url(url: str) -> str:
    """A database URL with the asyncio driver this package uses: ``postgresql://`` gets asyncpg,
    ``sqlite:///`` aiosqlite; a URL naming its driver already is left as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(f"database URL {url!r} has no scheme (postgresql://... or sqlite:///PATH)")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if scheme == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    return url


def _adapter(given: DatabaseAdapter | None, bind: Executor | AsyncEngine) -> DatabaseAdapter:
    """The adapter given to the Outbox or Inbox, else the registered one of ``bind``'s dialect."""
    dialect = bind.get_bind().dialect.name if isinstance(bind, AsyncSession) else bind.dialect.name
    if given is None:
        return adapter_for(dialect)
    if given.name != dialect:
        raise ConfigurationError(f"the outbox's adapter {given!r} is for the {given.name!r} dialect, "
                                 f"not for this {dialect!r} engine")
    return given


def _check_adapter(adapter: DatabaseAdapter | None) -> DatabaseAdapter | None:
    if adapter is not None and not isinstance(adapter, DatabaseAdapter):
        raise ConfigurationError(f"adapter must be a msgbroker_outbox.DatabaseAdapter, got {adapter!r}")
    return adapter


def _check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not _NAME.fullmatch(topic):
        raise InvalidNameError(f"invalid topic name {topic!r}: 1-200 characters of A-Z a-z 0-9 _ . -, "
                               "not starting with . or -, without .., not ending with .")
    return topic


def _check_headers(headers: Mapping[str, str] | None) -> str:
    if not headers:
        return "{}"
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise InvalidNameError(f"invalid header {name!r}: {value!r} (names and values are non-empty strings)")
    return json.dumps(dict(headers), ensure_ascii=False)


class Outbox:
    """The outbox tables ``<prefix>_outbox`` (the messages), ``<prefix>_outbox_leases`` (one row
    per bucket: which relay moves its messages) and ``<prefix>_outbox_relays`` (the relays alive).

    ``buckets`` (default 64): a message's partition key picks its bucket
    (``msgbroker.partition_for(key, buckets)``); one relay at a time moves a bucket's messages, in
    the order they were written, so several relays share the work and keep each key's order.
    Every writer and relay of one outbox must use the same ``buckets``.

    ``adapter``: the :class:`DatabaseAdapter` to use with every engine (its relays' too); by
    default the one registered for each engine's dialect (docs/outbox.md, "Another database").
    """

    def __init__(self, *, prefix: str = "msgbroker", buckets: int = 64,
                 adapter: DatabaseAdapter | None = None) -> None:
        if not isinstance(buckets, int) or not 1 <= buckets <= 4096:
            raise ConfigurationError(f"buckets must be an integer from 1 to 4096, got {buckets!r}")
        self.prefix = check_prefix(prefix)
        self.buckets = buckets
        self.adapter = _check_adapter(adapter)
        self.metadata = MetaData()
        self.messages, self.leases, self.relays = outbox_tables(self.metadata, self.prefix)

    def adapter_for(self, bind: Executor | AsyncEngine) -> DatabaseAdapter:
        """The adapter used with ``bind``: the one given, else the one of its dialect."""
        return _adapter(self.adapter, bind)

    async def create_tables(self, engine: AsyncEngine) -> None:
        """Create the tables (when missing), one lease row per bucket and the adapter's
        ``create_statements`` (on PostgreSQL, the trigger that notifies the relays of a commit).
        Idempotent; run it from one process (a deployment step, or your migration after
        ``outbox.metadata``'s tables)."""
        adapter = self.adapter_for(engine)
        async with engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)
            await conn.execute(
                adapter.insert_ignoring(self.leases, ["bucket"]),
                [{"bucket": b, "owner": None, "fence": 0, "expires_at": 0.0} for b in range(self.buckets)],
            )
            for statement in adapter.create_statements(self.prefix):
                await conn.execute(text(statement))

    async def drop_tables(self, engine: AsyncEngine) -> None:
        """Drop the outbox's tables (and the adapter's ``drop_statements``: on PostgreSQL, the
        trigger's function)."""
        adapter = self.adapter_for(engine)
        async with engine.begin() as conn:
            await conn.run_sync(self.metadata.drop_all)
            for statement in adapter.drop_statements(self.prefix):
                await conn.execute(text(statement))

    def _row(self, topic: str, message: Message, headers_json: str) -> dict[str, Any]:
        if not isinstance(message, Message):
            raise SerializationError(f"the outbox takes a msgbroker.Message, got {type(message).__name__}")
        key = message.partition_key
        if not isinstance(key, str):
            raise SerializationError(f"partition_key of {type(message).__name__} must be str, got {key!r}")
        try:
            bucket = partition_for(key, self.buckets)
        except UnicodeEncodeError as exc:
            raise SerializationError(f"partition_key {key!r} of {type(message).__name__} "
                                     "is not encodable as UTF-8") from exc
        return {
            "bucket": bucket, "topic": topic, "partition_key": key, "message_id": str(message.message_id),
            "headers": headers_json, "body": message.__pydantic_serializer__.to_json(message),
            "created_at": time.time(), "sent_at": None,
        }

    async def publish(self, executor: Executor, topic: str, message: Message, *,
                      headers: Mapping[str, str] | None = None) -> str:
        """Write ``message`` for ``topic`` in the transaction of ``executor`` (an
        ``AsyncSession`` or ``AsyncConnection``): it reaches the broker once that transaction
        commits, and never if it rolls back. Returns the message id."""
        row = self._row(_check_topic(topic), message, _check_headers(headers))
        self.adapter_for(executor)
        await executor.execute(self.messages.insert(), [row])
        return str(row["message_id"])

    async def publish_batch(self, executor: Executor, topic: str, messages: Sequence[Message], *,
                            headers: Mapping[str, str] | None = None) -> list[str]:
        """Several messages in one statement, in this order; returns their ids."""
        headers_json = _check_headers(headers)
        rows = [self._row(_check_topic(topic), m, headers_json) for m in messages]
        if rows:
            self.adapter_for(executor)
            await executor.execute(self.messages.insert(), rows)
        return [str(r["message_id"]) for r in rows]

    async def unsent(self, engine: AsyncEngine) -> int:
        """How many committed messages the relays have not moved yet."""
        async with engine.connect() as conn:
            count = await conn.scalar(
                select(func.count()).select_from(self.messages).where(self.messages.c.sent_at.is_(None)))
        return int(count or 0)


class Inbox:
    """The inbox table ``<prefix>_inbox``: the ids of the messages a consumer has handled, written
    in the same transaction as the handler's own writes. A message delivered again (at-least-once)
    finds its id there and changes nothing. ``adapter`` as for :class:`Outbox`."""

    def __init__(self, *, prefix: str = "msgbroker", adapter: DatabaseAdapter | None = None) -> None:
        self.prefix = check_prefix(prefix)
        self.adapter = _check_adapter(adapter)
        self.metadata = MetaData()
        self.table = inbox_table(self.metadata, self.prefix)

    async def create_tables(self, engine: AsyncEngine) -> None:
        _adapter(self.adapter, engine)
        async with engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)

    async def claim(self, executor: Executor, consumer: str, message: Message | str) -> bool:
        """Record that ``consumer`` (a name of yours, usually the group) handles ``message`` in the
        transaction of ``executor``. True the first time: go on and write. False when a committed
        transaction already did (a redelivery): write nothing. Two deliveries at once: the second
        waits for the first's transaction (PostgreSQL: the row lock; SQLite: the write lock) and
        gets False if it committed."""
        if not isinstance(consumer, str) or not 1 <= len(consumer) <= 200:
            raise ConfigurationError(f"inbox consumer name {consumer!r} must be a string of 1-200 characters")
        message_id = str(message.message_id) if isinstance(message, Message) else str(message)
        stmt = _adapter(self.adapter, executor).insert_ignoring(self.table, ["consumer", "message_id"]).values(
            consumer=consumer, message_id=message_id, handled_at=time.time())
        result = await executor.execute(stmt)
        return bool(getattr(result, "rowcount", 0) == 1)

    async def forget_before(self, engine: AsyncEngine, cutoff: float) -> int:
        """Delete the records of messages handled before ``cutoff`` (epoch seconds): keep them
        longer than a message can be delivered again. Returns how many."""
        async with engine.begin() as conn:
            result = await conn.execute(self.table.delete().where(self.table.c.handled_at < cutoff))
        return int(result.rowcount)
