"""Fixtures for the NATS provider's own tests: the real nats-server from ``scripts/brokers up
nats``, a stream prefix per test (its streams deleted afterwards), and a raw nats-py client to
look underneath."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgbroker
import pytest
from msgbroker_nats import _compat
from nats.aio.client import Client

HOW = "run `scripts/brokers up nats` and load its settings (`set -a; . .brokers/env; set +a`)"


@pytest.fixture
def nats_url() -> str:
    url = os.environ.get("MSGBROKER_NATS__URL", "").strip()
    if not url:
        pytest.fail(f"MSGBROKER_NATS__URL is not set: {HOW}", pytrace=False)
    return url


@pytest.fixture
def prefix() -> str:
    """A stream prefix of this test alone."""
    return f"TNATS-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topic() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


async def _stream_names(nc: Client) -> list[str]:
    """Every stream's name (the server lists 256 per page)."""
    jsm = nc.jsm()
    names: list[str] = []
    while True:
        page = await jsm.streams_info(offset=len(names))
        if not page:
            return names
        names += [info.config.name for info in page]


async def _delete_streams(nc: Client, prefix: str) -> None:
    """Delete every stream of ``prefix`` (topic streams and the pins bucket)."""
    jsm = nc.jsm()
    with contextlib.suppress(Exception):
        for name in await _stream_names(nc):
            if name.startswith(f"{prefix}_") or name in (f"KV_{prefix}_pins", f"KV_{prefix}_attempts"):
                with contextlib.suppress(Exception):
                    await jsm.delete_stream(name)


@pytest.fixture
async def raw(nats_url: str, prefix: str) -> AsyncIterator[Client]:
    """A nats-py client (with the provider's fixes of ``_compat.Client``: a server restart must not
    leave it an unclosed socket); the test's streams are deleted afterwards."""
    nc = _compat.Client()
    await nc.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.25)
    yield nc
    await _delete_streams(nc, prefix)
    await nc.close()


@pytest.fixture
def connect(nats_url: str, prefix: str) -> Any:
    """``connect(**overrides)``: an unopened broker on the test's prefix (ack_wait 2 s)."""

    def make(**overrides: Any) -> msgbroker.Broker:
        nats_overrides = {"stream_prefix": prefix, "ack_wait": 2, **overrides.pop("nats", {})}
        settings: dict[str, Any] = {"partition_count": 4, "retry_delay": 0, **overrides}
        return msgbroker.connect(nats_url, nats=nats_overrides, **settings)

    return make


@pytest.fixture
def delete_streams() -> Any:
    """``await delete_streams(nc, prefix)``: remove the streams of another prefix."""
    return _delete_streams
