"""``msgbroker dashboard`` on every real provider (the browser tests use Redis): its JSON API
shows a group's pending count per partition as the provider counts it, and its members and
owners where the provider tells them (``Transport.describe``). The servers come from
``scripts/brokers up``; a missing one fails, never skips."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import msgbroker
import pytest
from msgbroker import Message

PROVIDERS = {
    "nats": ("MSGBROKER_NATS__URL", ""),
    "rabbitmq": ("MSGBROKER_RABBITMQ__URL", ""),
    "kafka": ("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS", "kafka://"),
}


class Job(Message):
    key: str = ""

    @property
    def partition_key(self) -> str:
        return self.key


def server_url(provider: str) -> str:
    variable, prefix = PROVIDERS[provider]
    value = os.environ.get(variable)
    if not value:
        pytest.fail(f"{variable} is not set: run `scripts/brokers up` and `set -a; . .brokers/env; set +a`")
    return prefix + value


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_the_dashboard_shows_a_group_on_every_provider(provider: str) -> None:
    url, topic, group = server_url(provider), f"dash-{uuid.uuid4().hex[:8]}", "dash-workers"

    async def prepare() -> int:
        async with msgbroker.connect(url, partition_count=4) as broker:
            sub = await broker.subscribe(topic, group, _hold, message_type=Job)
            await sub.close()  # the group exists (its queues, consumers); nothing handled
            await broker.publish_batch(topic, [Job(key=f"k{i}") for i in range(6)])
            for _ in range(150):  # 30 s at most: Kafka's counts follow its offsets
                count = await broker.pending_count(topic, group)
                if count == 6:
                    break
                await asyncio.sleep(0.2)
            return count

    assert asyncio.run(prepare()) == 6
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "msgbroker.cli", "dashboard", "--url", url, "-p", "4", "--port", "0",
         "--interval", "0.3", "--watch", f"{topic}:{group}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert dashboard.stdout is not None
        line = dashboard.stdout.readline()
        assert line.startswith("dashboard: http://"), line
        state = _until_viewed(line.split()[1], 30.0)
        [shown] = state["groups"]
        assert shown["error"] is None and state["health"]["healthy"] is True
        view = shown["view"]
        assert view["pending"] == 6 and [p["partition"] for p in view["partitions"]] == [0, 1, 2, 3]
        counted = [p["pending"] for p in view["partitions"]]
        assert all(n is None for n in counted) or sum(counted) == 6, counted
        assert view["members"] is not None and view["members"] == [], f"the group has no live member: {view}"
    finally:
        dashboard.terminate()
        try:
            dashboard.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # never leave it running for the tests after this one
            dashboard.kill()
            dashboard.communicate(timeout=10)
            raise


async def _hold(ctx: Any) -> None:
    await asyncio.sleep(3600)


def _until_viewed(base: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(base + "api/state", timeout=10) as response:
            state = json.loads(response.read())
        if state["groups"] and state["groups"][0]["view"] is not None:
            return state
        time.sleep(0.2)
    raise AssertionError(f"the dashboard showed no view of the group within {timeout:g}s: {state}")
