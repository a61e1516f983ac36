"""The whole contract suite (msgbroker-conformance) against the real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import nats
import pytest
from msgbroker_conformance import ConformanceHarness, ConformanceSuite, FencingCases

REPO = Path(__file__).resolve().parents[3]


class NatsHarness(ConformanceHarness):
    """The server started by ``scripts/brokers up nats``; a stream prefix per test, 2 s ack_wait."""

    url = os.environ.get("MSGBROKER_NATS__URL") or None
    url_env = "MSGBROKER_NATS__URL"
    timeout_multiplier = 1.0
    prefixes: ClassVar[list[str]] = []
    """The stream prefixes this process's cases used (their streams are deleted afterwards)."""

    def overrides(self, namespace: str) -> dict[str, Any]:
        prefix = f"CONF-{namespace}"
        self.prefixes.append(prefix)
        return {"nats": {"stream_prefix": prefix, "ack_wait": 2}}

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


class TestNatsConformance(ConformanceSuite, FencingCases):
    harness = NatsHarness()


async def _stream_names(nc: Any) -> list[str]:
    """Every stream's name (the server lists 256 per page)."""
    jsm = nc.jsm()
    names: list[str] = []
    while True:
        page = await jsm.streams_info(offset=len(names))
        if not page:
            return names
        names += [info.config.name for info in page]


async def _delete_streams(url: str, prefixes: list[str]) -> None:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=1)
    try:
        jsm = nc.jsm()
        for name in await _stream_names(nc):
            if any(name.startswith(f"{p}_") or name in (f"KV_{p}_pins", f"KV_{p}_attempts") for p in prefixes):
                with contextlib.suppress(Exception):
                    await jsm.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture(scope="module", autouse=True)
def _remove_the_suites_streams() -> Iterator[None]:
    """Keep the shared server lean (its restart time grows with the streams it restores)."""
    yield
    if NatsHarness.url and NatsHarness.prefixes:
        with contextlib.suppress(Exception):
            asyncio.run(_delete_streams(NatsHarness.url, list(NatsHarness.prefixes)))
        NatsHarness.prefixes.clear()
