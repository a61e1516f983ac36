"""The tables (what differs per database is in _adapter.py)."""

from __future__ import annotations

import re

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
)

_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")

# A row id that autoincrements on both: BIGINT on PostgreSQL, SQLite's INTEGER PRIMARY KEY (rowid).
_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ConfigurationError(
            f"table prefix {prefix!r} must be 1-40 characters of a-z 0-9 _, not starting with a digit")
    return prefix


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
