"""The outbox suite's own quality: each deliberately broken database adapter is failed by the
case that guards what it breaks, for that reason (the unbroken adapters pass the same cases in
test_outbox.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from msgbroker_outbox import DatabaseAdapter, PostgreSQLAdapter, SQLiteAdapter
from msgbroker_outbox.testing import OutboxSuite
from sqlalchemy import Float, Table, literal_column
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Insert
from sqlalchemy.sql.elements import ColumnElement


class HourAheadPostgreSQL(PostgreSQLAdapter):
    """A clock an hour ahead (a timestamp read in local time as UTC, say)."""

    def clock(self) -> ColumnElement[float]:
        return literal_column("(EXTRACT(EPOCH FROM clock_timestamp())::float8 + 3600.0)", Float())


class MillisecondSQLite(SQLiteAdapter):
    """A clock in milliseconds."""

    def clock(self) -> ColumnElement[float]:
        return literal_column("((julianday('now') - 2440587.5) * 86400000.0)", Float())


class UnlockedPostgreSQL(PostgreSQLAdapter):
    """Lease transactions not serialised: two relays can take one bucket at once."""

    async def lock_leases(self, conn: AsyncConnection, leases: Table) -> None:
        return None


def _updating(statement: Any, keys: Any) -> Insert:
    """An INSERT whose 'do nothing' on conflict updates the row instead (so reports a row)."""
    others = [c.name for c in statement.table.columns if c.name not in keys]
    return statement.on_conflict_do_update(index_elements=list(keys),  # type: ignore[no-any-return]
                                           set_={name: statement.excluded[name] for name in others})


class UpdatingUpsertSQLite(SQLiteAdapter):
    def insert_ignoring(self, table: Table, keys: Sequence[str]) -> Insert:
        return _updating(sqlite.insert(table), keys)


class UpdatingUpsertPostgreSQL(PostgreSQLAdapter):
    def insert_ignoring(self, table: Table, keys: Sequence[str]) -> Insert:
        return _updating(postgresql.insert(table), keys)


CLOCK = "test_the_database_clock_is_close_to_this_machines_and_runs_in_seconds"
INBOX = "test_the_inbox_applies_each_message_once_under_redelivery"
LEASES = "test_two_relays_never_own_one_bucket"

BROKEN: list[tuple[Callable[[], DatabaseAdapter], str, str, str]] = [
    # (the adapter, its database, the case that must fail it, what its failure must say)
    (HourAheadPostgreSQL, "postgres", CLOCK, "+3600"),
    (MillisecondSQLite, "sqlite", CLOCK, "is it epoch seconds"),
    (UpdatingUpsertSQLite, "sqlite", INBOX, "two claims of one message gave [True, True]"),
    (UpdatingUpsertPostgreSQL, "postgres", INBOX, "two claims of one message gave [True, True]"),
    (UnlockedPostgreSQL, "postgres", LEASES, "two relays held one bucket"),
]


@pytest.mark.parametrize(("adapter", "database", "case", "says"),
                         [pytest.param(*b, id=f"{b[0].__name__}-{b[2][5:30]}") for b in BROKEN])
def test_the_case_guarding_it_fails_a_broken_adapter(adapter: Callable[[], DatabaseAdapter], database: str,
                                                     case: str, says: str, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    url = str(request.getfixturevalue("postgres_url")) if database == "postgres" else \
        f"sqlite:///{tmp_path / 'outbox.db'}"
    suite = type("BrokenAdapterSuite", (OutboxSuite,), {"database_url": url, "adapter": adapter()})()
    with pytest.raises(AssertionError) as failure:
        getattr(suite, case)()
    assert says in str(failure.value), f"{case} failed {adapter.__name__} for another reason: {failure.value}"
