"""Best-effort removal of what a run left on the servers (every name of ours starts with a
bench prefix, so nothing of other users is touched)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

__all__ = ["cleanup"]


async def cleanup(provider: str, url: str) -> int:
    """Delete the run's streams/topics on ``provider``; returns how many were removed."""
    with contextlib.suppress(Exception):
        if provider == "redis":
            return await _redis(url)
        if provider == "nats":
            return await _nats(url)
        if provider == "kafka":
            return await _kafka(url)
    return 0


async def _redis(url: str) -> int:
    import redis.asyncio as aioredis

    client: Any = aioredis.Redis.from_url(url)
    removed = 0
    try:
        for pattern in ("msgbroker-bench:*", "bench-raw-*", "bench-fs-*", "bench-native-*"):
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += await client.delete(*batch)
                    batch = []
            if batch:
                removed += await client.delete(*batch)
    finally:
        await client.aclose()
    return removed


async def _nats(url: str) -> int:
    import nats

    nc = await nats.connect(url)
    removed = 0
    try:
        js = nc.jetstream()
        names: list[str] = []
        while True:  # the stream list comes in pages
            reply = await nc.request("$JS.API.STREAM.NAMES", json.dumps({"offset": len(names)}).encode(), timeout=5)
            page = json.loads(reply.data)
            batch = page.get("streams") or []
            names += batch
            if not batch or len(names) >= page.get("total", 0):
                break
        for name in names:
            if name.startswith(("MSGBENCH", "BENCHRAW", "BENCH_FS")):
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
                    removed += 1
    finally:
        await nc.close()
    return removed


async def _kafka(bootstrap: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if "bench-" in t]
        if topics:
            await admin.delete_topics(topics)
        return len(topics)
    finally:
        await admin.close()
