"""The whole contract suite (msgbroker-conformance) against the real nats-server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from msgbroker_conformance import ConformanceHarness, ConformanceSuite

REPO = Path(__file__).resolve().parents[3]


class NatsHarness(ConformanceHarness):
    """The server started by ``scripts/brokers up nats``; a stream prefix per test, 2 s ack_wait."""

    url = os.environ.get("MSGBROKER_NATS__URL") or None
    url_env = "MSGBROKER_NATS__URL"
    timeout_multiplier = 1.0

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"nats": {"stream_prefix": f"CONF-{namespace}", "ack_wait": 2}}

    async def restart_server(self) -> None:
        """Restart nats-server through the repository's broker script (streams and consumers are
        file-backed and survive), returning once it answers again."""
        process = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "brokers"), "restart", "nats",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"scripts/brokers restart nats failed ({process.returncode}): {output.decode()[-2000:]}")


class TestNatsConformance(ConformanceSuite):
    harness = NatsHarness()
