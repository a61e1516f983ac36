"""Fixtures for the Redis provider's own tests: the real server from ``scripts/brokers up redis``,
a key prefix per test (removed afterwards), and a raw redis-py client to look underneath."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgbroker
import pytest
import redis.asyncio as aioredis

HOW = "run `scripts/brokers up redis` and load its settings (`set -a; . .brokers/env; set +a`)"


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("MSGBROKER_REDIS__URL", "").strip()
    if not url:
        pytest.fail(f"MSGBROKER_REDIS__URL is not set: {HOW}", pytrace=False)
    return url


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone."""
    return f"test-redis-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topic() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def raw(redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client; every key under the test's prefix is deleted afterwards."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=20)
    yield client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def connect(redis_url: str, prefix: str) -> Any:
    """``connect(**overrides)``: an unopened broker on the test's prefix (claim_timeout 2 s)."""

    def make(**overrides: Any) -> msgbroker.Broker:
        redis_overrides = {"key_prefix": prefix, "claim_timeout": 2, **overrides.pop("redis", {})}
        settings: dict[str, Any] = {"partition_count": 4, "retry_delay": 0, **overrides}
        return msgbroker.connect(redis_url, redis=redis_overrides, **settings)

    return make
