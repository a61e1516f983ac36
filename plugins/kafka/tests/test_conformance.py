"""The shared contract suite (msgbroker-conformance) against the Kafka started by
``scripts/brokers up kafka`` (``MSGBROKER_KAFKA__BOOTSTRAP_SERVERS`` from ``.brokers/env``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, ClassVar

from msgbroker_conformance import ConformanceHarness, ConformanceSuite, FencingCases

_SERVERS = os.environ.get("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS", "").strip()
_REPO = Path(__file__).resolve().parents[3]


class KafkaHarness(ConformanceHarness):
    """Kafka with fast failover: the broker's smallest session timeout (6 s), 1 s heartbeats."""

    url: ClassVar[str | None] = f"kafka://{_SERVERS}" if _SERVERS else None
    url_env: ClassVar[str | None] = "MSGBROKER_KAFKA__BOOTSTRAP_SERVERS"
    timeout_multiplier: ClassVar[float] = 1.5

    def overrides(self, namespace: str) -> dict[str, Any]:
        # topics are unique per case already; the client id makes a case's members findable
        return {"kafka": {"session_timeout": 6, "heartbeat_interval": 1, "client_id": f"conf-{namespace}"}}

    async def restart_server(self) -> None:
        """``scripts/brokers restart kafka``: stop and start on the same port, keeping data."""
        process = await asyncio.create_subprocess_exec(
            str(_REPO / "scripts" / "brokers"), "restart", "kafka",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 180)
        if process.returncode != 0:
            raise AssertionError(f"scripts/brokers restart kafka failed: {output.decode(errors='replace')[-2000:]}")


class TestKafkaConformance(ConformanceSuite, FencingCases):
    harness = KafkaHarness()
