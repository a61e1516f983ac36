"""Shared fixtures of the Kafka provider's tests: the real Kafka of ``scripts/brokers up kafka``."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgbroker
import pytest

REPO = Path(__file__).resolve().parents[3]
HOW = (
    "MSGBROKER_KAFKA__BOOTSTRAP_SERVERS is not set: run `scripts/brokers up kafka` and load its settings "
    "(`set -a; . .brokers/env; set +a`), or point it at your own Kafka"
)
FAST = {"session_timeout": 6, "heartbeat_interval": 1, "commit_interval": 0.05}
"""The broker's smallest session timeout (group.min.session.timeout.ms = 6 s), for fast failover."""


@pytest.fixture
def bootstrap_servers() -> str:
    """The Kafka under test; a missing server is a failure, never a skip."""
    value = os.environ.get("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS", "").strip()
    if not value:
        pytest.fail(HOW, pytrace=False)
    return value


@pytest.fixture
def names() -> Callable[[str], str]:
    """Unique topic and group names (Kafka keeps them; nothing to clean between tests)."""
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
