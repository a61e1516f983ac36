"""Fixtures of the outbox's tests: the real PostgreSQL of ``scripts/brokers up postgres`` and a
SQLite file, each with tables of a prefix of the test's own (dropped afterwards)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from msgbroker_outbox import Inbox, Outbox, async_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:  # the fault suite's checker: tests.faults.model
    sys.path.insert(0, str(ROOT))

HOW = "run `scripts/brokers up postgres redis` and load its settings (`set -a; . .brokers/env; set +a`)"


def setting(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(f"{name} is not set: {HOW}", pytrace=False)
    return value


def postgres_url() -> str:
    return setting("MSGBROKER_TEST_POSTGRES_URL")


def database_url(kind: str, tmp_path: Path) -> str:
    """The plain URL (``postgresql://`` or ``sqlite:///``) of a database of this test."""
    if kind == "postgres":
        return postgres_url()
    return f"sqlite:///{tmp_path / 'outbox.db'}"


@pytest.fixture(name="postgres_url")
def postgres_url_fixture() -> str:
    return postgres_url()


@pytest.fixture
def redis_url() -> str:
    return setting("MSGBROKER_REDIS__URL")


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["postgres", "sqlite"])
def db_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(db_kind: str, tmp_path: Path) -> str:
    return database_url(db_kind, tmp_path)


@pytest.fixture
async def engine(db_url: str, prefix: str) -> AsyncIterator[AsyncEngine]:
    made = create_async_engine(async_url(db_url))
    try:
        yield made
    finally:
        await Outbox(prefix=prefix).drop_tables(made)
        async with made.begin() as conn:
            await conn.run_sync(Inbox(prefix=prefix).metadata.drop_all)
        await made.dispose()


@pytest.fixture
async def outbox(engine: AsyncEngine, prefix: str) -> Outbox:
    made = Outbox(prefix=prefix, buckets=16)
    await made.create_tables(engine)
    return made


@pytest.fixture
async def inbox(engine: AsyncEngine, prefix: str) -> Inbox:
    made = Inbox(prefix=prefix)
    await made.create_tables(engine)
    return made
