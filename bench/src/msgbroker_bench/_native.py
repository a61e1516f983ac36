"""The brokers' own load tools, where this machine has them: the ceiling of each publish cell."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._cells import PublishVariant
from ._driver import Driver, Unsupported

__all__ = ["NativeVariant", "native_driver"]


class NativeRedis(Driver):
    """``redis-benchmark`` (ships with redis-server): XADD MAXLEN ~ 100000 from one connection,
    no pipeline (single) or ``-P 500`` (batch); its own rps figure."""

    kind = "native"

    def __init__(self, url: str, mode: str) -> None:
        tool = shutil.which("redis-benchmark")
        if tool is None:
            raise Unsupported("redis-benchmark is not on this machine")
        parts = urlsplit(url)
        self.tool = tool
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.pipeline = 1 if mode == "single" else 500
        self.label = "redis-benchmark"
        self.config = f"-c 1 -P {self.pipeline} XADD <stream> MAXLEN ~ 100000 * d <payload>"
        self.key = f"bench-native-{uuid.uuid4().hex[:8]}"

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        raise Unsupported("use run_tool")

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        raise Unsupported("use run_tool")

    async def _redis(self, *args: str) -> None:
        cli = shutil.which("redis-cli")
        if cli:
            proc = await asyncio.create_subprocess_exec(cli, "-h", self.host, "-p", str(self.port), *args,
                                                        stdout=asyncio.subprocess.DEVNULL)
            await proc.wait()

    async def drop(self, topic: str) -> None:
        await self._redis("DEL", self.key)

    async def run_tool(self, messages: int, data: str) -> float:
        """Run the tool; returns its messages per second."""
        proc = await asyncio.create_subprocess_exec(
            self.tool, "-h", self.host, "-p", str(self.port), "-c", "1", "-n", str(messages),
            "-P", str(self.pipeline), "--csv", "XADD", self.key, "MAXLEN", "~", "100000", "*", "d", data,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"redis-benchmark exited {proc.returncode}: {err.decode()[-200:]}")
        rows = list(csv.DictReader(io.StringIO(out.decode())))
        return float(rows[-1]["rps"])


class NativeKafka(Driver):
    """Kafka's ``ProducerPerformance`` (kafka-producer-perf-test) with the producer settings of
    ours (acks=all, idempotence, linger 2 ms), into a topic with 64 partitions; its own rate.
    Needs the kafka-tools jar, which scripts/bench fetches into .cache/bench/lib."""

    kind = "native"

    def __init__(self, bootstrap: str, root: Path) -> None:
        tools = sorted((root / ".cache" / "bench" / "lib").glob("kafka-tools-*.jar"))
        kafka_lib = root / ".cache" / "kafka" / "lib"
        java = shutil.which("java")
        if not tools or not kafka_lib.is_dir() or java is None:
            raise Unsupported("kafka-producer-perf-test needs the kafka-tools jar (scripts/bench fetches it with "
                              "mvn into .cache/bench/lib) and Kafka's class path from scripts/brokers")
        self.java = java
        self.classpath = f"{tools[-1]}:{kafka_lib}/*"
        self.bootstrap = bootstrap
        self.label = "kafka-producer-perf-test"
        self.config = ("ProducerPerformance --throughput -1, acks=all, enable.idempotence=true, linger.ms=2, "
                       "64 partitions")
        self.topic_name = f"bench-native-{uuid.uuid4().hex[:8]}"

    async def prepare(self, topic: str, partitions: int) -> None:
        from ._raw import RawKafka

        raw = RawKafka(self.bootstrap)
        raw.prefix = self.topic_name
        await raw.prepare("t", partitions)

    async def drop(self, topic: str) -> None:
        from ._raw import RawKafka

        raw = RawKafka(self.bootstrap)
        raw.prefix = self.topic_name
        await raw.drop("t")

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        raise Unsupported("use run_tool")

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        raise Unsupported("use run_tool")

    async def run_tool(self, messages: int, data: str) -> float:
        proc = await asyncio.create_subprocess_exec(
            self.java, "-Xmx256m", "-cp", self.classpath, "org.apache.kafka.tools.ProducerPerformance",
            "--topic", f"{self.topic_name}.t", "--num-records", str(messages), "--record-size", str(len(data)),
            "--throughput", "-1", "--producer-props", f"bootstrap.servers={self.bootstrap}", "acks=all",
            "enable.idempotence=true", "linger.ms=2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        match = re.search(rb"records sent, ([0-9.]+) records/sec", out)
        if proc.returncode != 0 or match is None:
            raise RuntimeError(f"ProducerPerformance exited {proc.returncode}: {(out + err).decode()[-200:]}")
        return float(match.group(1))


class NativeVariant(PublishVariant):
    """A publish cell run by a native tool: its own timing, no client CPU of ours."""

    async def setup(self) -> None:
        await self.driver.prepare(self.topic, 64)

    async def rep(self, run: int) -> dict[str, Any]:
        from ._model import payload

        rate = await self.driver.run_tool(self.messages, payload(self.size))  # type: ignore[attr-defined]
        return {"messages": self.messages, "seconds": self.messages / rate}

    async def teardown(self) -> None:
        await self.driver.drop(self.topic)


def native_driver(provider: str, url: str, mode: str, root: Path | None = None) -> Driver:
    """The native tool of ``provider`` for ``mode`` (single or batch), or :class:`Unsupported`."""
    if provider == "redis":
        return NativeRedis(url, mode)
    if provider == "kafka":
        if mode == "single":
            raise Unsupported("kafka-producer-perf-test has no one-record-at-a-time mode")
        return NativeKafka(url, root or Path.cwd())
    reasons = {
        "memory": "no native tool for an in-process broker",
        "nats": "the nats CLI (nats bench) is not on this machine (Go binary, not in Debian 12)",
        "rabbitmq": "RabbitMQ PerfTest is not installed here (a Java tool from Maven Central)",
    }
    raise Unsupported(reasons.get(provider, "no native tool"))
