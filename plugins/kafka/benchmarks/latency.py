"""End-to-end latency on Kafka, publish -> handler, msgbroker beside the raw aiokafka client.

    set -a; . .brokers/env; set +a
    .venv/bin/python plugins/kafka/benchmarks/latency.py [--messages 1000] [--rounds 2] [--partitions 64]

Per round, interleaved (ours, raw, ours, raw ...): one subscriber (one worker, ordered, the
provider's default settings), ``--messages`` small messages published one at a time with
``publish()`` 5 ms apart over 1,000 keys; the latency is the handler's clock minus the
publisher's (one process). The raw side has the same shape and guarantees: an idempotent
``acks=all`` producer's ``send_and_wait``, a consumer in a group with ``getmany`` and one commit
per fetched batch. Also the client CPU per message (the process's CPU over the run / messages,
publisher and subscriber together). Every run has its own topic. Report ratios measured in one
run: the machine's other load moves absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid

import msgbroker
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from msgbroker import Message, MessageContext

GAP = 0.005


class Seat(Message):
    key: str
    sent: float = 0.0

    @property
    def partition_key(self) -> str:
        return self.key


def _summary(took: list[float], cpu: float) -> tuple[float, float, float, float]:
    """(p50 ms, p99 ms, max ms, CPU µs per message)."""
    took.sort()
    return took[len(took) // 2] * 1e3, took[int(len(took) * 0.99)] * 1e3, took[-1] * 1e3, cpu / len(took) * 1e6


async def ours(servers: str, partitions: int, messages: int) -> tuple[float, float, float, float]:
    topic = f"lat-{uuid.uuid4().hex[:8]}"
    took: list[float] = []
    async with msgbroker.connect(f"kafka://{servers}", partition_count=partitions) as broker:
        done = asyncio.Event()

        async def handle(ctx: MessageContext[Seat]) -> None:
            took.append(time.perf_counter() - ctx.message.sent)
            if len(took) == messages:
                done.set()

        await broker.subscribe(topic, "g", handle)
        await broker.publish(topic, Seat(key="warm-up", sent=time.perf_counter()))
        await _until(lambda: len(took) >= 1)
        took.clear()
        cpu = time.process_time()
        for i in range(messages):
            await broker.publish(topic, Seat(key=f"k{i % 1000}", sent=time.perf_counter()))
            await asyncio.sleep(GAP)
        await asyncio.wait_for(done.wait(), 60)
        cpu = time.process_time() - cpu
    await _delete(servers, topic)
    return _summary(took, cpu)


async def raw(servers: str, partitions: int, messages: int) -> tuple[float, float, float, float]:
    topic = f"lat-raw-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", enable_idempotence=True)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=servers, group_id="g", enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await producer.start()
    await consumer.start()
    took: list[float] = []
    done = asyncio.Event()

    async def consume() -> None:
        while not done.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=500)
            for records in batch.values():
                for record in records:
                    took.append(time.perf_counter() - json.loads(record.value)["sent"])
            if batch:
                await consumer.commit()
            if len(took) >= messages + 1:
                done.set()

    reader = asyncio.create_task(consume())
    try:
        await producer.send_and_wait(topic, json.dumps({"sent": time.perf_counter()}).encode(), key=b"warm-up")
        await _until(lambda: len(took) >= 1)
        took.clear()
        cpu = time.process_time()
        for i in range(messages):
            value = json.dumps({"key": f"k{i % 1000}", "sent": time.perf_counter()}).encode()
            await producer.send_and_wait(topic, value, key=f"k{i % 1000}".encode())
            await asyncio.sleep(GAP)
        await _until(lambda: len(took) >= messages, 60)
        cpu = time.process_time() - cpu
    finally:
        done.set()
        await asyncio.gather(reader, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
    await _delete(servers, topic)
    return _summary(took[:messages], cpu)


async def _until(condition: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark's messages did not arrive")
        await asyncio.sleep(0.01)


async def _delete(servers: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    except Exception as exc:  # a leftover topic is not a failed measurement
        print(f"(could not delete {topic}: {exc!r})")
    finally:
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=64)
    args = parser.parse_args()
    servers = os.environ.get("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    rows: dict[str, list[tuple[float, float, float, float]]] = {"msgbroker": [], "raw aiokafka": []}
    for round_ in range(args.rounds):
        for name, run in (("msgbroker", ours), ("raw aiokafka", raw)):
            result = await run(servers, args.partitions, args.messages)
            rows[name].append(result)
            print(f"round {round_ + 1}, {name}: p50 {result[0]:.2f} ms, p99 {result[1]:.2f} ms, "
                  f"max {result[2]:.1f} ms, {result[3]:.0f} µs CPU/msg", flush=True)
    print(f"\n{args.partitions} partitions, {args.messages} messages, one publish every {GAP * 1e3:g} ms "
          "(medians over the rounds)")
    print("| client | p50 ms | p99 ms | max ms | CPU µs/msg |")
    print("|---|---:|---:|---:|---:|")
    for name, results in rows.items():
        med = [statistics.median(r[i] for r in results) for i in range(4)]
        print(f"| {name} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.1f} | {med[3]:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
