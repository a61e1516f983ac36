"""The tables, and what differs between PostgreSQL and SQLite: the upsert and the database's clock."""

from __future__ import annotations

import re
from typing import Any

from msgbroker import ConfigurationError
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    literal_column,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

DIALECTS = ("postgresql", "sqlite")

_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")

# A row id that autoincrements on both: BIGINT on PostgreSQL, SQLite's INTEGER PRIMARY KEY (rowid).
_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ConfigurationError(
            f"table prefix {prefix!r} must be 1-40 characters of a-z 0-9 _, not starting with a digit")
    return prefix


def check_dialect(name: str) -> str:
    if name not in DIALECTS:
        raise ConfigurationError(
            f"the outbox supports PostgreSQL (asyncpg) and SQLite (aiosqlite), not the {name!r} dialect")
    return name


def now(dialect: str) -> ColumnElement[float]:
    """The database's clock in epoch seconds: every relay compares leases with the same clock."""
    if check_dialect(dialect) == "postgresql":
        return literal_column("EXTRACT(EPOCH FROM clock_timestamp())::float8", Float())
    return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float())


def insert(dialect: str, table: Table) -> Any:
    """The dialect's INSERT, which has ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
    if check_dialect(dialect) == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def outbox_tables(metadata: MetaData, prefix: str) -> tuple[Table, Table, Table]:
    """(messages, leases, relays) of the outbox named ``<prefix>_outbox...``."""
    messages = Table(
        f"{prefix}_outbox", metadata,
        Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        Column("bucket", Integer, nullable=False),
        Column("topic", String(200), nullable=False),
        Column("partition_key", Text, nullable=False),
        Column("message_id", String(64), nullable=False),
        Column("headers", Text, nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("sent_at", Float, nullable=True),
    )
    Index(f"{prefix}_outbox_unsent", messages.c.id, messages.c.bucket,
          postgresql_where=messages.c.sent_at.is_(None), sqlite_where=messages.c.sent_at.is_(None))
    Index(f"{prefix}_outbox_sent", messages.c.sent_at,
          postgresql_where=messages.c.sent_at.is_not(None), sqlite_where=messages.c.sent_at.is_not(None))
    leases = Table(
        f"{prefix}_outbox_leases", metadata,
        Column("bucket", Integer, primary_key=True, autoincrement=False),
        Column("owner", String(100), nullable=True),
        Column("fence", BigInteger, nullable=False, default=0),
        Column("expires_at", Float, nullable=False, default=0.0),
    )
    relays = Table(
        f"{prefix}_outbox_relays", metadata,
        Column("relay_id", String(100), primary_key=True),
        Column("expires_at", Float, nullable=False),
    )
    return messages, leases, relays


def inbox_table(metadata: MetaData, prefix: str) -> Table:
    return Table(
        f"{prefix}_inbox", metadata,
        Column("consumer", String(200), nullable=False),
        Column("message_id", String(64), nullable=False),
        Column("handled_at", Float, nullable=False),
        PrimaryKeyConstraint("consumer", "message_id", name=f"{prefix}_inbox_pk"),
    )


def notify_channel(prefix: str) -> str:
    """The PostgreSQL channel a commit that wrote outbox rows notifies (relays LISTEN on it)."""
    return f"{prefix}_outbox"


def notify_ddl(prefix: str) -> list[str]:
    """PostgreSQL: a statement trigger that notifies the relays when outbox rows commit (the
    notification is sent at commit, once per transaction), so that they need not wait for their
    next poll."""
    function, table = f"{prefix}_outbox_notify", f"{prefix}_outbox"
    return [
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_notify('{notify_channel(prefix)}', ''); RETURN NULL; END $$",
        f"DROP TRIGGER IF EXISTS {function} ON {table}",
        f"CREATE TRIGGER {function} AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
    ]

