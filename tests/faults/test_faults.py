"""Faults, load and bad input on every provider: worker *processes* against the real servers,
killed, paused and restarted, checked from the record of every publish confirmation and
every handling: lost = 0, order violations = 0, duplicates counted, pending 0 at the end.

Figures of every run are appended to ``.brokers/fault-results.jsonl`` (see docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgbroker
import pytest
from msgbroker.testing import eventually

from .model import FaultMessage, RecordTail, Verdict, check, read_records

ROOT = Path(__file__).resolve().parents[2]
BROKERS = ROOT / "scripts" / "brokers"
PARTITIONS = 16

# provider -> (environment variable with its address, URL template, settings for fast failover)
PROVIDERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "redis": ("MSGBROKER_REDIS__URL", "{}", {"redis": {"claim_timeout": 2}}),
    "nats": ("MSGBROKER_NATS__URL", "{}", {"nats": {"ack_wait": 2}}),
    "rabbitmq": ("MSGBROKER_RABBITMQ__URL", "{}", {}),
    "kafka": ("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS", "kafka://{}",
              {"kafka": {"session_timeout": 6, "heartbeat_interval": 1}}),
}


def provider_url(name: str) -> str:
    variable, template, _ = PROVIDERS[name]
    value = os.environ.get(variable)
    if not value:
        pytest.fail(f"{variable} is not set: run `scripts/brokers up {name}` and source .brokers/env "
                    "(scripts/test does both)")
    return template.format(value)


def settings_for(name: str) -> dict[str, Any]:
    return {"partition_count": PARTITIONS, "retry_delay": 0.05, "max_retry_attempts": 5, **PROVIDERS[name][2]}


def _installed(name: str) -> bool:
    try:
        msgbroker.registry.by_name(name)
    except msgbroker.ProviderNotFoundError:
        return False
    return True


def _providers() -> list[Any]:
    # A provider whose plugin is not in this repository yet cannot be tested; one that is
    # installed must pass (a missing server fails in provider_url, never skips).
    return [pytest.param(n, id=n) for n in PROVIDERS if _installed(n)]


class Pool:
    """Worker processes of one group, recording into one shared file."""

    def __init__(self, provider: str, topic: str, group: str, record: Path) -> None:
        self.provider, self.topic, self.group, self.record = provider, topic, group, record
        self.url = provider_url(provider)
        self.settings = json.dumps(settings_for(provider))
        self.procs: list[subprocess.Popen[str]] = []
        self.kills = 0

    def start(self, *extra: str) -> subprocess.Popen[str]:
        log = self.record.with_suffix(".log")
        with open(log, "a", encoding="utf-8") as stderr:  # a file, not a pipe: a chatty worker never blocks
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.worker", self.url, self.topic, self.group, str(self.record),
                 "--settings", self.settings, *extra],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.stdout.close()
        if line.strip() != "ready":
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"worker did not start: {line!r}; its log: {log.read_text()[-3000:]}")
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[str]) -> None:
        proc.kill()  # SIGKILL: no settle, no release, no flush
        proc.wait(10)
        self.procs.remove(proc)
        self.kills += 1

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


@pytest.fixture
def pool_factory(tmp_path: Path) -> Iterator[Any]:
    pools: list[Pool] = []

    def make(provider: str) -> Pool:
        pool = Pool(provider, f"faults-{uuid.uuid4().hex[:8]}", "workers", tmp_path / "handled.jsonl")
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.stop_all()


@pytest.fixture
async def producer(request: pytest.FixtureRequest) -> AsyncIterator[msgbroker.Broker]:
    provider = request.node.callspec.params["provider"]
    async with msgbroker.connect(provider_url(provider), **settings_for(provider)) as broker:
        yield broker


def messages(count: int, keys: int = 40, start: int = 0, pad: int = 0) -> list[FaultMessage]:
    return [FaultMessage(key=f"key-{i % keys}", seq=i // keys, pad="x" * pad) for i in range(start, start + count)]


async def publish(broker: msgbroker.Broker, topic: str, batch: list[FaultMessage], sent: list[FaultMessage]) -> None:
    """Publish, retrying a batch whose outcome was indeterminate (a duplicate, never a loss)."""
    for _attempt in range(60):
        try:
            await broker.publish_batch(topic, batch)
            sent.extend(batch)
            return
        except msgbroker.TransientError:
            await asyncio.sleep(0.5)
    raise AssertionError(f"could not publish after {_attempt + 1} attempts")


async def settle_and_check(broker: msgbroker.Broker, pool: Pool, sent: list[FaultMessage], scenario: str,
                           timeout: float = 120.0, started: float | None = None, **figures: Any) -> Verdict:
    wanted = {str(m.message_id) for m in sent}
    tail = RecordTail(pool.record)
    progress = {"at": time.monotonic()}

    def all_handled() -> bool:
        done = len(wanted & tail.read()) if len(wanted) > 50_000 else 0
        if done and time.monotonic() - progress["at"] > 15:  # progress on long runs (pytest -s shows it)
            progress["at"] = time.monotonic()
            print(f"{pool.provider} {scenario}: {done} of {len(wanted)} handled", flush=True)
        return wanted <= tail.read()

    try:
        await eventually(all_handled, timeout=timeout, interval=0.2, what=f"{scenario}: every message handled")
    except AssertionError:
        log = pool.record.with_suffix(".log")
        print(log.read_text()[-5000:] if log.exists() else "no worker log")
        raise

    async def quiet() -> bool:
        try:
            return await broker.pending_count(pool.topic, pool.group) == 0
        except msgbroker.MsgBrokerError:
            return False

    if started is not None:  # from the first publish to the last handling
        figures["seconds"] = round(time.monotonic() - started, 1)
    await eventually(quiet, timeout=60, interval=0.2, what=f"{scenario}: pending count back to 0")
    verdict = check(sent, read_records(pool.record))
    result = {"provider": pool.provider, "scenario": scenario, "kills": pool.kills, **figures,
              "published": verdict.published, "handled": verdict.handled, "lost": len(verdict.lost),
              "duplicates": verdict.duplicates, "redelivered": verdict.redelivered,
              "order_violations": len(verdict.order_violations), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    (ROOT / ".brokers").mkdir(exist_ok=True)
    with (ROOT / ".brokers" / "fault-results.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(result) + "\n")
    print(f"{pool.provider} {scenario}: {verdict.summary()}")
    assert not verdict.lost, f"lost {len(verdict.lost)}: {verdict.lost[:5]}"
    assert not verdict.order_violations, verdict.order_violations[:5]
    assert not verdict.unexpected
    return verdict


def brokers(*args: str) -> None:
    out = subprocess.run([str(BROKERS), *args], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"scripts/brokers {' '.join(args)} failed: {out.stderr[-2000:]}"


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.timeout(600)
async def test_kill_9_of_workers_mid_stream_loses_nothing(provider: str, pool_factory: Any,
                                                         producer: msgbroker.Broker) -> None:
    pool: Pool = pool_factory(provider)
    rounds = 20
    for _ in range(3):
        pool.start("--work", "0.002")
    sent: list[FaultMessage] = []
    rng = random.Random(7)
    per_round = 100
    for round_ in range(rounds):
        await publish(producer, pool.topic, messages(per_round, start=round_ * per_round), sent)
        await asyncio.sleep(rng.uniform(0.05, 0.3))
        pool.kill(rng.choice(pool.procs))
        pool.start("--work", "0.002")
    await settle_and_check(producer, pool, sent, "kill -9 of a worker, repeated", rounds=rounds, timeout=240)


@pytest.mark.parametrize("provider", _providers())
async def test_broker_restart_mid_stream_loses_nothing(provider: str, pool_factory: Any,
                                                       producer: msgbroker.Broker) -> None:
    pool: Pool = pool_factory(provider)
    for _ in range(2):
        pool.start()
    sent: list[FaultMessage] = []
    await publish(producer, pool.topic, messages(500), sent)
    brokers("restart", provider)
    await publish(producer, pool.topic, messages(500, start=500), sent)
    await settle_and_check(producer, pool, sent, "broker restart mid-stream", restarts=1, timeout=180)
    assert await producer.is_healthy()


@pytest.mark.parametrize("provider", _providers())
async def test_broker_paused_then_resumed_loses_nothing(provider: str, pool_factory: Any,
                                                        producer: msgbroker.Broker) -> None:
    pool: Pool = pool_factory(provider)
    for _ in range(2):
        pool.start()
    sent: list[FaultMessage] = []
    await publish(producer, pool.topic, messages(300), sent)
    brokers("pause", provider)
    try:
        await asyncio.sleep(8)  # longer than the clients' timeouts
        assert not await producer.is_healthy()
    finally:
        brokers("resume", provider)
    brokers("wait", provider)
    await publish(producer, pool.topic, messages(300, start=300), sent)
    await settle_and_check(producer, pool, sent, "broker paused (SIGSTOP) 8 s, resumed", pauses=1, timeout=180)


@pytest.mark.parametrize("provider", _providers())
async def test_a_hanging_handler_times_out_and_the_message_is_redelivered(provider: str, pool_factory: Any,
                                                                         producer: msgbroker.Broker) -> None:
    pool: Pool = pool_factory(provider)
    pool.start("--hang-seq", "3", "--handler-timeout", "1")
    pool.start("--hang-seq", "3", "--handler-timeout", "1")
    sent: list[FaultMessage] = []
    await publish(producer, pool.topic, messages(200, keys=10), sent)
    verdict = await settle_and_check(producer, pool, sent, "handler hangs, times out, redelivered")
    hung = [r for r in read_records(pool.record) if r["seq"] == 3]
    assert hung and all(int(str(r["attempt"])) >= 2 for r in hung)  # each hung once, handled on a redelivery
    assert verdict.redelivered >= 10


SOAK_MESSAGES = int(os.environ.get("MSGBROKER_SOAK_MESSAGES", "20000"))
SOAK_BOUND = max(600.0, SOAK_MESSAGES / 200)
"""Seconds the soak may take after its last publish: 600, or 5 ms a message for a bigger soak
(1M: 5,000 s; Kafka, committing each ack, handled ~1,000 msg/s on the loaded 2-core machine)."""


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.timeout(SOAK_BOUND * 2 + 300)
async def test_soak_through_four_worker_processes(provider: str, pool_factory: Any,
                                                  producer: msgbroker.Broker) -> None:
    total = SOAK_MESSAGES
    pool: Pool = pool_factory(provider)
    for _ in range(4):
        pool.start()
    sent: list[FaultMessage] = []
    started = time.monotonic()
    for start in range(0, total, 1000):
        await publish(producer, pool.topic, messages(min(1000, total - start), keys=1000, start=start), sent)
    published = time.monotonic() - started
    verdict = await settle_and_check(producer, pool, sent, f"soak {total} messages, 4 workers",
                                     timeout=SOAK_BOUND, started=started,
                                     publish_seconds=round(published, 1))
    assert verdict.handled == total


@pytest.mark.parametrize("provider", _providers())
async def test_poison_messages_are_dead_lettered_and_the_worker_goes_on(provider: str, pool_factory: Any,
                                                                       producer: msgbroker.Broker) -> None:
    pool: Pool = pool_factory(provider)
    pool.start()
    sent: list[FaultMessage] = []
    await publish(producer, pool.topic, messages(20, keys=4), sent)
    partition = msgbroker.partition_for("key-0", PARTITIONS)
    poison = [
        msgbroker.OutgoingRecord(pool.topic, partition, "key-0", "poison-bytes", {}, b"\xff\xfe\x00garbage"),
        msgbroker.OutgoingRecord(pool.topic, partition, "key-0", "poison-schema", {"x": "y"},
                                 b'{"key": 1, "seq": "a"}'),
        msgbroker.OutgoingRecord(pool.topic, partition, "key-0", "poison-big", {}, b"[" + b"1," * 200_000 + b"1]"),
    ]
    await producer.transport.publish(poison, None)
    await publish(producer, pool.topic, messages(20, keys=4, start=20), sent)
    await settle_and_check(producer, pool, sent, "poison messages among good ones", poison=len(poison))

    async def dead() -> bool:
        return len(await producer.dead_letters(pool.topic, pool.group)) == len(poison)

    await eventually(dead, timeout=30)
    letters = {d.message_id: d for d in await producer.dead_letters(pool.topic, pool.group)}
    assert set(letters) == {"poison-bytes", "poison-schema", "poison-big"}
    assert all("cannot decode" in d.error for d in letters.values())
    assert letters["poison-schema"].headers.get("x") == "y"
