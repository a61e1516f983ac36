"""Transactional outbox and inbox for msgbroker (docs/outbox.md).

* :class:`Outbox`: ``await outbox.publish(session, topic, message)`` writes the message in your
  own SQLAlchemy transaction; it reaches the broker only if that transaction commits.
* :class:`Relay`: moves committed messages to the broker at least once, in order per partition
  key, with several relays at once (one lease per key bucket); :func:`run_relay_in` runs one in a
  ``msgbroker.Service`` (``msgbroker run``), ``python -m msgbroker_outbox relay`` on its own.
* :class:`Inbox`: ``await inbox.claim(session, consumer, message)`` in the handler's transaction:
  a message delivered again changes nothing.

PostgreSQL (asyncpg) and SQLite (aiosqlite), through SQLAlchemy 2's asyncio API; another
database through a :class:`DatabaseAdapter` (:func:`register_adapter`, or the
``msgbroker_outbox.adapters`` entry points), checked with ``msgbroker_outbox.testing.OutboxSuite``.
"""

from __future__ import annotations

from ._adapter import (
    ENTRY_POINT_GROUP,
    DatabaseAdapter,
    PostgreSQLAdapter,
    SQLiteAdapter,
    adapter_for,
    register_adapter,
)
from ._outbox import Executor, Inbox, Outbox, async_url
from ._relay import Relay, run_relay_in

__all__ = [
    "ENTRY_POINT_GROUP",
    "DatabaseAdapter",
    "Executor",
    "Inbox",
    "Outbox",
    "PostgreSQLAdapter",
    "Relay",
    "SQLiteAdapter",
    "adapter_for",
    "async_url",
    "register_adapter",
    "run_relay_in",
]
