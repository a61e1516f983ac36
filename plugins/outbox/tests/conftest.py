"""Fixtures of the outbox's tests: the real PostgreSQL of ``scripts/brokers up postgres`` and
Redis, and a table prefix of the test's own. (test_outbox.py runs the suite, which makes and
drops its own tables.)"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

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


@pytest.fixture(name="postgres_url")
def postgres_url_fixture() -> str:
    return postgres_url()


@pytest.fixture
def redis_url() -> str:
    return setting("MSGBROKER_REDIS__URL")


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
