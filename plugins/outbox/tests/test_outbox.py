"""The outbox, the relays and the inbox on the real PostgreSQL and on SQLite, through the suite a
third-party database adapter runs (msgbroker_outbox.testing), with the in-memory broker; then
what is PostgreSQL's own (a commit wakes the relay) and the adapter registry."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import msgbroker
import pytest
from msgbroker import ConfigurationError
from msgbroker_outbox import (
    ENTRY_POINT_GROUP,
    DatabaseAdapter,
    Inbox,
    Outbox,
    PostgreSQLAdapter,
    Relay,
    SQLiteAdapter,
    adapter_for,
    async_url,
    register_adapter,
)
from msgbroker_outbox import _adapter as registry
from msgbroker_outbox.testing import Handlings, OutboxSuite, SuiteMessage, check_order, eventually, memory_url
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine


class TestPostgreSQLOutbox(OutboxSuite):
    @pytest.fixture(autouse=True)
    def _database(self, postgres_url: str) -> None:
        self.database_url = postgres_url  # type: ignore[misc]


class TestSQLiteOutbox(OutboxSuite):
    @pytest.fixture(autouse=True)
    def _database_file(self, tmp_path: Path) -> None:
        self.database_url = f"sqlite:///{tmp_path / 'outbox.db'}"  # type: ignore[misc]


async def test_on_postgresql_a_commit_wakes_the_relay_at_once(postgres_url: str, prefix: str) -> None:
    """The outbox table's trigger notifies at commit and the relay LISTENs, so a commit ends its
    wait (``Relay.notified`` counts them) — also after the LISTEN connection was lost (PostgreSQL
    ends it here; the relay makes it again at its next heartbeat)."""
    engine = create_async_engine(async_url(postgres_url))
    outbox = Outbox(prefix=prefix, buckets=4)
    await outbox.create_tables(engine)
    handled = Handlings()
    try:
        async with msgbroker.connect(memory_url(), partition_count=4) as broker:
            await broker.subscribe("holds", "g", handled)
            async with Relay(outbox, engine, broker, lease_ttl=1.5, poll_interval=30) as relay:
                await eventually(lambda: relay._listening is not None, "the relay listens", 30)
                for seq in range(3):
                    before = relay.notified
                    async with engine.begin() as conn:
                        await outbox.publish(conn, "holds", SuiteMessage(key="a", seq=seq))
                    await eventually(lambda b=before: relay.notified > b, "the commit notified", 5)
                    await eventually(lambda s=seq: len(handled.records) == s + 1, "relayed", 5)
                    if seq == 1:  # the server ends the LISTEN connection
                        lost = relay._listening
                        async with engine.connect() as conn:
                            await conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"))
                        await eventually(lambda lost=lost: relay._listening not in (None, lost), "listening again", 30)
    finally:
        await outbox.drop_tables(engine)
        await engine.dispose()


# -- the adapter registry


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = dict(registry._registered)
    try:
        yield
    finally:
        registry._registered.clear()
        registry._registered.update(saved)


class DuckAdapter(SQLiteAdapter):
    """SQLite's, registered under another dialect name (no such engine exists here)."""

    name = "duckish"


def test_the_built_in_adapters_serve_postgresql_and_sqlite() -> None:
    assert isinstance(adapter_for("postgresql"), PostgreSQLAdapter)
    assert isinstance(adapter_for("sqlite"), SQLiteAdapter)
    assert adapter_for("postgresql").notifies and not adapter_for("sqlite").notifies


async def test_an_unknown_dialect_is_refused_naming_it_and_the_adapters(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"no database adapter for the 'mysql' dialect "
                                                 r"\(adapters: 'postgresql', 'sqlite'\)"):
        adapter_for("mysql")
    engine = create_async_engine(async_url(f"sqlite:///{tmp_path / 'x.db'}"))
    try:
        with pytest.raises(ConfigurationError, match=r"adapter <DuckAdapter 'duckish'> is for the 'duckish' "
                                                     r"dialect, not for this 'sqlite' engine"):
            await Outbox(adapter=DuckAdapter()).create_tables(engine)
    finally:
        await engine.dispose()


def test_register_adapter_adds_a_dialect_and_refuses_a_second_one(clean_registry: None) -> None:
    duck = register_adapter(DuckAdapter())
    assert adapter_for("duckish") is duck
    with pytest.raises(ConfigurationError, match=r"'duckish' dialect has an outbox adapter already"):
        register_adapter(DuckAdapter())
    other = register_adapter(DuckAdapter(), replace=True)
    assert adapter_for("duckish") is other and adapter_for("duckish") is not duck
    with pytest.raises(ConfigurationError, match="takes a DatabaseAdapter instance"):
        register_adapter(DuckAdapter)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"\.name must be the SQLAlchemy dialect name, got ''"):
        register_adapter(DatabaseAdapter())
    with pytest.raises(ConfigurationError, match=r"adapter must be a msgbroker_outbox.DatabaseAdapter"):
        Inbox(adapter="sqlite")  # type: ignore[arg-type]


def test_an_entry_point_of_the_group_gives_the_adapter_of_its_dialect(
        clean_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "duckish_outbox.py").write_text(
        "from msgbroker_outbox import SQLiteAdapter\n\n\nclass Adapter(SQLiteAdapter):\n    name = 'duckish'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [EntryPoint("duckish", "duckish_outbox:Adapter", ENTRY_POINT_GROUP),
              EntryPoint("wrongish", "duckish_outbox:Adapter", ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: [p for p in points if p.group == group])
    adapter = adapter_for("duckish")  # loaded when asked for, then registered
    assert type(adapter).__name__ == "Adapter" and adapter_for("duckish") is adapter
    with pytest.raises(ConfigurationError, match=r"entry point wrongish = duckish_outbox:Adapter must give a "
                                                 r"DatabaseAdapter for the 'wrongish' dialect"):
        adapter_for("wrongish")
    with pytest.raises(ConfigurationError, match=r"'mysql' dialect \(adapters: 'duckish', 'postgresql', 'sqlite', "
                                                 r"'wrongish'\)"):
        adapter_for("mysql")


def test_the_suites_checker_finds_a_loss_and_a_reordering() -> None:
    a0, a1, b0 = SuiteMessage(key="a", seq=0), SuiteMessage(key="a", seq=1), SuiteMessage(key="b", seq=0)

    def record(m: SuiteMessage) -> dict[str, object]:
        return {"id": str(m.message_id), "key": m.key, "seq": m.seq, "attempt": 1}

    assert check_order([a0, a1, b0], [record(a0), record(b0), record(a0), record(a1)]).ok  # a duplicate is legal
    reordered = check_order([a0, a1, b0], [record(a1), record(a0), record(b0)])
    assert not reordered.ok and reordered.order_violations[0] == "key a: first handling of seq 1, expected 0"
    lost = check_order([a0, a1, b0], [record(a0), record(a1)])
    assert lost.lost == [str(b0.message_id)] and "lost=1" in lost.summary()
