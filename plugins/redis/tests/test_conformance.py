"""The whole contract suite (msgbroker-conformance) against the real Redis server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from msgbroker_conformance import ConformanceHarness, ConformanceSuite, FencingCases

REPO = Path(__file__).resolve().parents[3]


class RedisHarness(ConformanceHarness):
    """The server started by ``scripts/brokers up redis``; a key prefix per test, 2 s claims."""

    url = os.environ.get("MSGBROKER_REDIS__URL") or None
    url_env = "MSGBROKER_REDIS__URL"
    timeout_multiplier = 1.0

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"redis": {"key_prefix": f"conf-{namespace}", "claim_timeout": 2}}

    async def restart_server(self) -> None:
        """Restart the server through the repository's broker script (SIGTERM: Redis writes its
        append-only file on the way down), returning once it answers again."""
        process = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "brokers"), "restart", "redis",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            tail = output.decode()[-2000:]
            raise RuntimeError(f"scripts/brokers restart redis failed ({process.returncode}): {tail}")


class TestRedisConformance(ConformanceSuite, FencingCases):
    harness = RedisHarness()
