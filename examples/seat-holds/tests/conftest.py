"""The example's modules live in the folder above (it is not a distribution): importable here.

The service reads its configuration when it is imported, so it is set here first: tables and
topics of a prefix of this run's own, holds of 3 s, the PostgreSQL of ``scripts/brokers up
postgres``. The broker is the Redis of ``scripts/brokers up redis`` (``MSGBROKER_URL``, set by the
``seat_env`` fixture)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1]
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

HOW = "run `scripts/brokers up redis postgres` and load its settings (`set -a; . .brokers/env; set +a`)"
os.environ.setdefault("SEAT_HOLDS_PREFIX", f"seats{uuid.uuid4().hex[:8]}")
os.environ.setdefault("SEAT_HOLDS_HOLD_SECONDS", "3")
if os.environ.get("MSGBROKER_TEST_POSTGRES_URL"):
    os.environ.setdefault("SEAT_HOLDS_DATABASE", os.environ["MSGBROKER_TEST_POSTGRES_URL"])


def setting(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(f"{name} is not set: {HOW}", pytrace=False)
    return value


@pytest.fixture
def redis_url() -> str:
    return setting("MSGBROKER_REDIS__URL")


@pytest.fixture
def seat_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The service's broker (Redis) and database (PostgreSQL); the tables are dropped after the
    session's last test."""
    setting("MSGBROKER_TEST_POSTGRES_URL")
    monkeypatch.setenv("MSGBROKER_URL", redis_url)
    yield redis_url


@pytest.fixture(scope="session", autouse=True)
def _drop_tables() -> Iterator[None]:
    yield
    if not os.environ.get("MSGBROKER_TEST_POSTGRES_URL") or "seat_holds" not in sys.modules:
        return
    import asyncio

    from sqlalchemy import text

    seat_holds = sys.modules["seat_holds"]

    async def drop() -> None:
        async with seat_holds.engine.begin() as conn:
            names = [r[0] for r in await conn.execute(
                text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p"), {"p": f"{seat_holds.PREFIX}%"})]
            for name in names:
                await conn.execute(text(f'DROP TABLE IF EXISTS "{name}" CASCADE'))
            await conn.execute(text(f"DROP FUNCTION IF EXISTS {seat_holds.PREFIX}_outbox_notify() CASCADE"))
        await seat_holds.engine.dispose()

    asyncio.run(drop())
