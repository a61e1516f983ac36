"""The whole contract suite (msgbroker-conformance) against the real RabbitMQ server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from msgbroker_conformance import ConformanceHarness, ConformanceSuite

REPO = Path(__file__).resolve().parents[3]


class RabbitMQHarness(ConformanceHarness):
    """The server started by ``scripts/brokers up rabbitmq``; an exchange prefix per test, 4 s claims."""

    url = os.environ.get("MSGBROKER_RABBITMQ__URL") or None
    url_env = "MSGBROKER_RABBITMQ__URL"
    timeout_multiplier = 1.0

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"rabbitmq": {"exchange_prefix": f"conf-{namespace}", "claim_timeout": 4, "queue_expires": 300}}

    async def restart_server(self) -> None:
        """Restart the server through the repository's broker script (durable queues and
        persistent messages survive), returning once it answers again."""
        process = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "brokers"), "restart", "rabbitmq",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(
                f"scripts/brokers restart rabbitmq failed ({process.returncode}): {output.decode()[-2000:]}"
            )


class TestRabbitMQConformance(ConformanceSuite):
    harness = RabbitMQHarness()
