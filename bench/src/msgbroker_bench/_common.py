"""What the run (``_run``), the profile (``_profile``) and the report (``_report``) share: the
providers and their settings, the counts of a run, the broker servers' environment. Imports
nothing of the package, so that the modules above it import one way."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "BATCH",
    "CALLERS",
    "COUNTS",
    "DRAIN_BACKLOG",
    "DRAIN_FETCH",
    "DRAIN_KEYS",
    "ENV_VARS",
    "GAP",
    "NATIVE_KAFKA_PAYLOADS",
    "PACED_PARTITIONS",
    "PARTITION_CURVE",
    "PAYLOADS",
    "PAYLOAD_CURVE",
    "PROVIDERS",
    "RATE",
    "WORKERS",
    "load_env",
    "ours_overrides",
    "reachable",
]

PROVIDERS = ("memory", "redis", "nats", "rabbitmq", "kafka")
ENV_VARS = {
    "redis": "MSGBROKER_REDIS__URL",
    "nats": "MSGBROKER_NATS__URL",
    "rabbitmq": "MSGBROKER_RABBITMQ__URL",
    "kafka": "MSGBROKER_KAFKA__BOOTSTRAP_SERVERS",
}
PAYLOADS = (100, 1024, 16384)
BATCH = 500
"""Messages per publish_batch in the publish cells."""
WORKERS = (1, 2, 4)
PARTITION_CURVE = (1, 4, 16, 64, 256)
PAYLOAD_CURVE = (1024, 16384)
"""Payloads of the payload curve beyond 100 B (its 100 B point is the "consume 1 worker" cell)."""

# Messages per repetition (full run). Chosen so one repetition takes roughly 0.2–1.5 s on
# this machine for the slowest variant of the cell; 16 KiB cells use a quarter.
COUNTS: dict[str, dict[str, int]] = {
    "memory": {"single": 5_000, "batch": 20_000, "e2e": 5_000, "curve": 3_000, "rate": 2_000,
               "concurrent": 10_000, "paced": 500},
    "redis": {"single": 600, "batch": 4_000, "e2e": 2_000, "curve": 1_200, "rate": 1_000,
              "concurrent": 3_000, "paced": 500},
    "nats": {"single": 500, "batch": 3_000, "e2e": 1_500, "curve": 1_000, "rate": 1_000,
             "concurrent": 2_000, "paced": 500},
    "rabbitmq": {"single": 200, "batch": 1_000, "e2e": 800, "curve": 500, "rate": 500,
                 "concurrent": 800, "paced": 500},
    "kafka": {"single": 300, "batch": 4_000, "e2e": 2_000, "curve": 1_200, "rate": 1_000,
              "concurrent": 3_000, "paced": 1_000},
}
"""``concurrent``: messages of a concurrent-callers publish cell; ``paced``: of a paced latency cell."""
DRAIN_BACKLOG = 20_000
"""Messages of the drain cell's backlog (100 B each, 64 partitions), on every provider."""
DRAIN_KEYS = 1_000
"""Distinct keys of the drain cell's backlog."""
DRAIN_FETCH = 500
"""Messages per fetch of the raw loops in the drain cell (XREADGROUP COUNT, JetStream fetch,
AMQP prefetch, getmany max_records)."""
CALLERS = (16, 256)
"""Tasks publishing at once in the concurrent publish cells (each awaits one publish() at a time)."""
GAP = 0.005
"""Seconds the paced latency cell sleeps after each publish()."""
PACED_PARTITIONS: dict[str, tuple[int, ...]] = {p: (64, 1024) for p in ("memory", "redis", "nats", "rabbitmq", "kafka")}
"""Partition counts of the paced latency cell (64 where not listed): the issue's bar holds at both."""
RATE = {"memory": 2000.0, "redis": 1000.0, "nats": 1000.0, "rabbitmq": 500.0, "kafka": 1000.0}
"""Offered rate (msg/s) of the open-loop latency cell."""
NATIVE_KAFKA_PAYLOADS = (1024,)
"""kafka-producer-perf-test starts a JVM per repetition (seconds): only the 1 KiB batch cell has it."""


def load_env(root: Path) -> None:
    """Read ``.brokers/env`` (written by ``scripts/brokers up``) under the environment's own values."""
    env_file = root / ".brokers" / "env"
    if not env_file.exists():
        return
    for line in env_file.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            os.environ.setdefault(key.strip(), value.strip())


def reachable(url: str, default_port: int) -> bool:
    """Whether a TCP connection to the server of ``url`` (or ``host:port[,…]``) opens within 1 s."""
    target = url if "://" in url else f"tcp://{url.split(',')[0]}"
    parts = urlsplit(target)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1.0):
            return True
    except OSError:
        return False


def ours_overrides(provider: str) -> dict[str, Any]:
    """Settings that put ours on the same footing as the raw baseline (documented in the doc)."""
    if provider == "redis":
        return {"redis": {"key_prefix": "msgbroker-bench"}}
    if provider == "nats":
        return {"nats": {"stream_prefix": "MSGBENCH"}}
    if provider == "rabbitmq":
        return {"rabbitmq": {"exchange_prefix": "msgbroker-bench"}}  # the default prefetch (32)
    if provider == "kafka":
        return {"kafka": {"client_id": "msgbroker-bench"}}
    return {}
