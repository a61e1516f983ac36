"""Shared fixtures of the Kafka provider's tests: the real Kafka of ``scripts/brokers up kafka``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgbroker
import pytest
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parents[3]
HOW = (
    "MSGBROKER_KAFKA__BOOTSTRAP_SERVERS is not set: run `scripts/brokers up kafka` and load its settings "
    "(`set -a; . .brokers/env; set +a`), or point it at your own Kafka"
)
FAST = {"session_timeout": 6, "heartbeat_interval": 1, "commit_interval": 0.05}
"""The broker's smallest session timeout (group.min.session.timeout.ms = 6 s), for fast failover."""


def _own_server() -> str | None:
    """The bootstrap servers under test when they are the Kafka ``scripts/brokers up kafka`` runs
    (loopback, the port it recorded); None for a Kafka of someone else's."""
    value = os.environ.get("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS", "").strip()
    try:
        port = (REPO / ".brokers" / "kafka" / "port").read_text().strip()
    except OSError:
        return None
    return value if value in (f"127.0.0.1:{port}", f"localhost:{port}") else None


@contextlib.asynccontextmanager
async def _admin(servers: str) -> AsyncIterator[Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def _topics(servers: str) -> set[str]:
    async with _admin(servers) as admin:
        return set(await admin.list_topics())


async def _delete_topics_since(servers: str, before: set[str]) -> None:
    """Delete every topic not in ``before`` (Kafka's own ``__…`` topics aside)."""
    async with _admin(servers) as admin:
        made = sorted(name for name in set(await admin.list_topics()) - before if not name.startswith("__"))
        for start in range(0, len(made), 200):
            await admin.delete_topics(made[start:start + 200], timeout_ms=60000)


@pytest.fixture(scope="session", autouse=True)
def _delete_the_topics_of_the_session() -> Iterator[None]:
    """Delete the topics made while these tests ran, on the Kafka of ``scripts/brokers`` only.

    That Kafka stays up between runs of the test command and keeps its data when restarted;
    each run leaves a few thousand partitions behind (each topic has a ``.starts`` companion,
    dead-letter topics have theirs), and with about 12,000 the broker (heap 512 MiB) died of
    OutOfMemoryError in the middle of a run. A Kafka of someone else's is left alone."""
    servers = _own_server()
    before: set[str] | None = None
    if servers is not None:
        with contextlib.suppress(Exception):
            before = asyncio.run(_topics(servers))
    yield
    if servers is None or before is None:
        return
    try:
        asyncio.run(_delete_topics_since(servers, before))
    except Exception as exc:  # the tests' verdict stands; the topics stay
        print(f"kafka tests: deleting the topics of this run failed: {exc!r}")


@pytest.fixture
def bootstrap_servers() -> str:
    """The Kafka under test; a missing server is a failure, never a skip."""
    value = os.environ.get("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS", "").strip()
    if not value:
        pytest.fail(HOW, pytrace=False)
    return value


@pytest.fixture
def names() -> Callable[[str], str]:
    """Unique topic and group names (Kafka keeps them; deleted at the end of the session)."""
    run = uuid.uuid4().hex[:8]
    return lambda stem: f"kt-{stem}-{run}"


@pytest.fixture
async def connect(bootstrap_servers: str) -> AsyncIterator[Callable[..., Any]]:
    """Open brokers on the test Kafka (fast failover settings); all closed at the end."""
    opened: list[msgbroker.Broker] = []

    async def open_broker(**settings: Any) -> msgbroker.Broker:
        kafka = {**FAST, **settings.pop("kafka", {})}
        broker = msgbroker.connect(f"kafka://{bootstrap_servers}", kafka=kafka, **settings)
        await broker.open()
        opened.append(broker)
        return broker

    yield open_broker
    for broker in reversed(opened):
        await broker.close()
