"""What differs per database: one :class:`DatabaseAdapter` per SQLAlchemy dialect, the built-in
PostgreSQL and SQLite ones, and the registry (``register_adapter`` and the
``msgbroker_outbox.adapters`` entry points)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar

from msgbroker import ConfigurationError
from sqlalchemy import Float, Table, literal_column, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable, Insert
from sqlalchemy.sql.elements import ColumnElement

ENTRY_POINT_GROUP = "msgbroker_outbox.adapters"
"""The entry-point group a distribution names its adapter in (``<dialect> = "module:AdapterClass"``)."""


class DatabaseAdapter:
    """What the outbox, the relay and the inbox need from one database beyond portable SQL.

    Subclass it, set :attr:`name` and implement :meth:`clock`, :meth:`insert_ignoring`,
    :meth:`upsert` and :meth:`lock_leases`; the other members have defaults that fit a database without commit
    notifications. Register an instance with :func:`register_adapter` (or an entry point of the
    ``msgbroker_outbox.adapters`` group), then check it with ``msgbroker_outbox.testing.OutboxSuite``.
    """

    name: ClassVar[str] = ""
    """The SQLAlchemy dialect name (``engine.dialect.name``) this adapter serves."""

    concurrent_writers: ClassVar[bool] = True
    """Whether two transactions can write at once (False for SQLite's single writer): the inbox
    case of the suite runs two claims of one message concurrently only when True."""

    notifies: ClassVar[bool] = False
    """Whether a commit that wrote outbox rows notifies the relays (:meth:`listen`)."""

    def clock(self) -> ColumnElement[float]:
        """The database's clock in epoch seconds (float), read anew by each statement: leases are
        compared on it, so relays on several machines share one time."""
        raise NotImplementedError

    def insert_ignoring(self, table: Table, keys: Sequence[str]) -> Insert:
        """An INSERT into ``table`` that does nothing for a row whose ``keys`` (its primary key)
        exist already; its values come with ``.values(...)`` or as executemany parameters. For one
        row its result's ``rowcount`` is 1 when inserted, 0 when it did nothing (the inbox's
        claim reads it)."""
        raise NotImplementedError

    def upsert(self, table: Table, keys: Sequence[str], values: Mapping[str, Any],
               update: Mapping[str, Any]) -> Executable:
        """INSERT ``values`` into ``table``, or, when a row with those ``keys`` (its primary key)
        exists, UPDATE it with ``update`` (values may be SQL expressions, e.g. on :meth:`clock`)."""
        raise NotImplementedError

    async def lock_leases(self, conn: AsyncConnection, leases: Table) -> None:
        """Serialise the relays' lease transactions (called first in each): until ``conn``'s
        transaction ends, no other relay's lease transaction on ``leases`` may run. Without it two
        relays can take one bucket."""
        raise NotImplementedError

    def create_statements(self, prefix: str) -> Sequence[str]:
        """SQL run by ``Outbox.create_tables`` after the tables (idempotent), e.g. a trigger."""
        return ()

    def drop_statements(self, prefix: str) -> Sequence[str]:
        """SQL run by ``Outbox.drop_tables`` after the tables."""
        return ()

    async def listen(self, conn: AsyncConnection, prefix: str, wake: Callable[[], None]) -> object:
        """Only when :attr:`notifies`: make ``conn`` (a connection of the relay's own) call
        ``wake()`` whenever a commit wrote rows into the outbox of ``prefix``; returns a handle
        that :meth:`is_listening` checks. An exception here costs latency only: the relay polls."""
        raise NotImplementedError

    def is_listening(self, handle: object) -> bool:
        """Whether the handle :meth:`listen` returned still listens (False: the relay listens again)."""
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class PostgreSQLAdapter(DatabaseAdapter):
    """PostgreSQL (asyncpg): ``clock_timestamp()``, ``INSERT … ON CONFLICT``, a transaction-level
    advisory lock per outbox for the lease transactions, and a statement trigger that runs
    ``pg_notify`` at commit, which the relays ``LISTEN`` for."""

    name = "postgresql"
    notifies = True

    def clock(self) -> ColumnElement[float]:
        return literal_column("EXTRACT(EPOCH FROM clock_timestamp())::float8", Float())

    def insert_ignoring(self, table: Table, keys: Sequence[str]) -> Insert:
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(keys))

    def upsert(self, table: Table, keys: Sequence[str], values: Mapping[str, Any],
               update: Mapping[str, Any]) -> Executable:
        return postgresql.insert(table).values(dict(values)).on_conflict_do_update(
            index_elements=list(keys), set_=dict(update))

    async def lock_leases(self, conn: AsyncConnection, leases: Table) -> None:
        # Without it two relays taking buckets in different orders deadlocked.
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": zlib.crc32(leases.name.encode())})

    @staticmethod
    def channel(prefix: str) -> str:
        """The channel a commit that wrote outbox rows notifies."""
        return f"{prefix}_outbox"

    def create_statements(self, prefix: str) -> Sequence[str]:
        # Sent at commit, once per transaction, however many rows.
        function, table = f"{prefix}_outbox_notify", f"{prefix}_outbox"
        return [
            f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_notify('{self.channel(prefix)}', ''); RETURN NULL; END $$",
            f"DROP TRIGGER IF EXISTS {function} ON {table}",
            f"CREATE TRIGGER {function} AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
        ]

    def drop_statements(self, prefix: str) -> Sequence[str]:
        return [f"DROP FUNCTION IF EXISTS {prefix}_outbox_notify()"]

    async def listen(self, conn: AsyncConnection, prefix: str, wake: Callable[[], None]) -> object:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.add_listener(self.channel(prefix), lambda *args: wake())
        return driver

    def is_listening(self, handle: object) -> bool:
        return not bool(getattr(handle, "is_closed", lambda: True)())


class SQLiteAdapter(DatabaseAdapter):
    """SQLite (aiosqlite): ``julianday('now')``, ``INSERT … ON CONFLICT``; one writer at a time
    for the whole file serialises the lease transactions (each writes first); no notifications."""

    name = "sqlite"
    concurrent_writers = False

    def clock(self) -> ColumnElement[float]:
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float())

    def insert_ignoring(self, table: Table, keys: Sequence[str]) -> Insert:
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(keys))

    def upsert(self, table: Table, keys: Sequence[str], values: Mapping[str, Any],
               update: Mapping[str, Any]) -> Executable:
        return sqlite.insert(table).values(dict(values)).on_conflict_do_update(
            index_elements=list(keys), set_=dict(update))

    async def lock_leases(self, conn: AsyncConnection, leases: Table) -> None:
        return None  # the first statement of every lease transaction writes: it waits for the writer lock


_BUILT_IN: dict[str, DatabaseAdapter] = {a.name: a for a in (PostgreSQLAdapter(), SQLiteAdapter())}
_registered: dict[str, DatabaseAdapter] = dict(_BUILT_IN)


def register_adapter(adapter: DatabaseAdapter, *, replace: bool = False) -> DatabaseAdapter:
    """Make ``adapter`` the one for engines of its dialect (``adapter.name``). A second adapter for
    a dialect is refused (a ``ConfigurationError`` naming both) unless ``replace=True``."""
    if not isinstance(adapter, DatabaseAdapter):
        raise ConfigurationError(f"register_adapter takes a DatabaseAdapter instance, got {adapter!r}")
    if not isinstance(adapter.name, str) or not adapter.name:
        raise ConfigurationError(f"{type(adapter).__name__}.name must be the SQLAlchemy dialect name, "
                                 f"got {adapter.name!r}")
    present = _registered.get(adapter.name)
    if present is not None and present is not adapter and not replace:
        raise ConfigurationError(f"the {adapter.name!r} dialect has an outbox adapter already ({present!r}), "
                                 f"not registering {adapter!r}: pass replace=True to replace it")
    _registered[adapter.name] = adapter
    return adapter


def _from_entry_points(dialect: str) -> DatabaseAdapter | None:
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name != dialect:
            continue
        loaded = point.load()
        adapter = loaded() if isinstance(loaded, type) else loaded
        if not isinstance(adapter, DatabaseAdapter) or adapter.name != dialect:
            raise ConfigurationError(f"the {ENTRY_POINT_GROUP} entry point {point.name} = {point.value} "
                                     f"must give a DatabaseAdapter for the {dialect!r} dialect, got {adapter!r}")
        return register_adapter(adapter)
    return None


def adapter_for(dialect: str) -> DatabaseAdapter:
    """The adapter of the SQLAlchemy dialect ``dialect``: registered, built in, or else loaded
    from the ``msgbroker_outbox.adapters`` entry points; a ``ConfigurationError`` names the
    dialect and the adapters there are otherwise."""
    adapter = _registered.get(dialect) or _from_entry_points(dialect)
    if adapter is None:
        known = sorted({*_registered, *(p.name for p in entry_points(group=ENTRY_POINT_GROUP))})
        raise ConfigurationError(
            f"the outbox has no database adapter for the {dialect!r} dialect (adapters: "
            f"{', '.join(repr(k) for k in known)}): register one with msgbroker_outbox.register_adapter() "
            f"or the {ENTRY_POINT_GROUP!r} entry point group (docs/outbox.md, 'Another database')")
    return adapter
