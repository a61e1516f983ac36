"""Cost by partition count: publish, drain and idle at 64, 256 and 1,024 partitions (issue #26,
deliverable 3).

One process, one broker connection, the provider's default settings (``--set`` to change one).
For each partition count, a new topic each repetition, the counts interleaved (64 256 1024 64
256 1024 ...):

* **publish**: the backlog (``--messages`` of 100 B over 1,000 keys) with ``publish_batch`` of
  500, nobody subscribed yet; wall time and this process's CPU per message;
* **drain**: one ordered subscriber in a group of its own, from ``subscribe`` to the last
  message handled (joining the group and opening every lane is timed: it is part of what a
  partition costs); wall time and CPU per message, when the first message came, and the wall
  time per message from the first message to the last (*steady*: without the start-up);
* **drain again**: after the idle phase the subscriber closes, a second backlog like the first
  is published, and the group subscribes again to drain it: the topic, the group and whatever
  the provider keeps beside them exist by then (what a worker restarting in a running system
  pays);
* **idle**: the first subscriber stays subscribed with nothing to read for ``--idle`` seconds; this
  process's CPU and the broker server's (``--broker-pid``, or the pid file ``scripts/brokers``
  writes) as a percentage of one core, and the server's resident memory after the drain.

Ratios are each count's median over the 64-partition median. Every handled message is checked
against its key's order; a run that loses a message or breaks an order fails, naming it. Bounded:
a drain gives up after ``--limit`` seconds.

    set -a; . .brokers/env; set +a
    bench/.venv/bin/python bench/partition_scaling.py --url "$MSGBROKER_REDIS__URL" --broker redis
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgbroker
from msgbroker import MessageContext

from msgbroker_bench import BrokerCpu, Seat, broker_pid

KEYS = 1000
BATCH = 500


async def publish(broker: msgbroker.Broker, topic: str, seqs: range) -> None:
    """The backlog ``seqs`` in batches of :data:`BATCH` (each key's numbers rising)."""
    keys = [f"seat-{i}" for i in range(KEYS)]
    data = "x" * 40
    for start in range(seqs.start, seqs.stop, BATCH):
        await broker.publish_batch(topic, [Seat(key=keys[i % KEYS], seq=i, data=data)
                                           for i in range(start, min(start + BATCH, seqs.stop))])


async def drain(broker: msgbroker.Broker, topic: str, group: str, partitions: int, seqs: range,
                limit: float) -> tuple[msgbroker.Subscription, dict[str, float | None]]:
    """Subscribe ``group`` and wait until it handled the backlog ``seqs``, checking each key's
    order; returns the subscription (still open) and the drain's figures."""
    messages = len(seqs)
    last: dict[str, int] = {}
    seen: set[int] = set()
    done = asyncio.Event()
    first: list[float] = []
    problems: list[str] = []

    async def handle(ctx: MessageContext[Seat]) -> None:
        seat = ctx.message
        if not first:
            first.append(time.perf_counter())
        if seat.seq <= last.get(seat.key, -1) and seat.seq not in seen:
            problems.append(f"{seat.key}: seq {seat.seq} after {last[seat.key]}")
        last[seat.key] = max(seat.seq, last.get(seat.key, -1))
        if seat.seq in seqs:
            seen.add(seat.seq)
        if len(seen) == messages:
            done.set()

    wall, cpu = time.perf_counter(), time.process_time()
    subscription = await broker.subscribe(topic, group, handle, message_type=Seat)
    try:
        await asyncio.wait_for(done.wait(), limit)
    except TimeoutError:
        await subscription.close()
        raise SystemExit(f"{partitions} partitions, group {group}: {len(seen)} of {messages} messages handled "
                         f"within {limit:.0f}s") from None
    drained = time.perf_counter()
    if problems:
        await subscription.close()
        raise SystemExit(f"{partitions} partitions, group {group}: order broken: {problems[:3]}")
    return subscription, {
        "drain_us": (drained - wall) / messages * 1e6,
        "drain_cpu_us": (time.process_time() - cpu) / messages * 1e6,
        "first_ms": (first[0] - wall) * 1e3,
        "steady_us": (drained - first[0]) / max(1, messages - 1) * 1e6,
    }


async def one_run(url: str, partitions: int, messages: int, idle: float, limit: float,
                  settings: dict[str, Any], server: BrokerCpu) -> dict[str, float | None]:
    topic = f"scale-{partitions}-{uuid.uuid4().hex[:8]}"
    result: dict[str, float | None] = {}
    async with msgbroker.connect(url, partition_count=partitions, **settings) as broker:
        try:
            # publish the backlog (each key's messages in rising seq)
            wall, cpu = time.perf_counter(), time.process_time()
            await publish(broker, topic, range(messages))
            result["publish_us"] = (time.perf_counter() - wall) / messages * 1e6
            result["publish_cpu_us"] = (time.process_time() - cpu) / messages * 1e6
            _progress(f"{partitions} partitions: published {messages:,} in {time.perf_counter() - wall:.1f}s")

            # drain it with one ordered subscriber
            subscription, drained = await drain(broker, topic, "scale", partitions, range(messages), limit)
            result.update(drained)
            _progress(f"{partitions} partitions: drained by group scale, first message after "
                      f"{drained['first_ms']:.0f} ms")
            try:
                # idle: subscribed, nothing to read
                await asyncio.sleep(1.0)  # the last acks and commits settle first
                cpu, server_cpu, wall = time.process_time(), server.seconds(), time.perf_counter()
                await asyncio.sleep(idle)
                span = time.perf_counter() - wall
                result["idle_cpu_pct"] = (time.process_time() - cpu) / span * 100
                after = server.seconds()
                result["idle_broker_cpu_pct"] = (
                    None if server_cpu is None or after is None else (after - server_cpu) / span * 100)
                result["broker_rss_mb"] = (
                    None if server.process is None else server.process.memory_info().rss / 2**20)
            finally:
                await subscription.close()
            # a second backlog for the same group, subscribed again: a member (re)joining a group
            # whose topic and what the provider keeps beside it exist
            await publish(broker, topic, range(messages, 2 * messages))
            subscription, drained = await drain(broker, topic, "scale", partitions, range(messages, 2 * messages),
                                                limit)
            await subscription.close()
            _progress(f"{partitions} partitions: the second backlog drained by the group subscribed again")
            result.update({f"again_{name}": value for name, value in drained.items()})
        finally:
            delete = getattr(broker.transport, "delete_topic", None)
            if delete is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(delete(topic, ["scale"]), 60)
            elif url.startswith("nats"):
                await _delete_nats_streams(broker, topic)
    if url.startswith("kafka://"):  # its provider deletes no topic: 1,024-partition leftovers fill the heap
        await _delete_kafka_topics(url, topic)
    return result


async def _delete_nats_streams(broker: msgbroker.Broker, topic: str) -> None:
    """Delete the topic's stream and its dead letters' (the NATS provider deletes no topic)."""
    transport: Any = broker.transport
    layout = transport.layout(topic)
    for name in (layout.stream, layout.dead_letters.stream):
        with contextlib.suppress(Exception):
            await transport.js.delete_stream(name)


async def _delete_kafka_topics(url: str, topic: str) -> None:
    """Delete ``topic`` and the provider's companions of it (``<topic>.starts`` and the like)."""
    from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

    admin = AIOKafkaAdminClient(bootstrap_servers=url.removeprefix("kafka://").split("?")[0])
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t == topic or t.startswith(f"{topic}.")]
        if names:
            await admin.delete_topics(names)
    except Exception as exc:  # best effort: say what is left
        _progress(f"could not delete the Kafka topics of {topic}: {exc}")
    finally:
        await admin.close()


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _fmt(values: list[float | None], digits: int = 0) -> str:
    """The median, with min–max in brackets when there was more than one run."""
    known = [v for v in values if v is not None]
    if not known:
        return "—"
    med = f"{statistics.median(known):,.{digits}f}"
    if len(known) == 1:
        return med
    return f"{med} ({min(known):,.{digits}f}–{max(known):,.{digits}f})"


def report(results: dict[int, list[dict[str, float | None]]]) -> str:
    counts = sorted(results)
    base = counts[0]

    def median(p: int, phase: str) -> float | None:
        known = [r[phase] for r in results[p] if r.get(phase) is not None]
        return statistics.median(known) if known else None  # type: ignore[type-var]

    def ratio(p: int, phase: str) -> str:
        a, b = median(p, phase), median(base, phase)
        return "—" if a is None or not b else f"{a / b:.2f}"

    lines = [
        f"| partitions | publish µs/msg | publish CPU µs/msg | drain µs/msg | drain CPU µs/msg | drain ÷ {base} "
        f"| drain CPU ÷ {base} | first message ms | steady µs/msg | steady ÷ {base} |",
        "|---:|---:|---:|---|---|---:|---:|---:|---|---:|",
    ]
    again = [
        f"| partitions | subscribed again: drain µs/msg | drain ÷ {base} | drain CPU µs/msg | drain CPU ÷ {base} "
        "| first message ms | idle CPU % client | idle CPU % server | server RSS MiB |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p in counts:
        rows = results[p]

        def col(phase: str, digits: int = 1, rows: list[dict[str, float | None]] = rows) -> str:
            return _fmt([r.get(phase) for r in rows], digits)

        lines.append(
            f"| {p:,} | {col('publish_us')} | {col('publish_cpu_us')} | {col('drain_us')} | {col('drain_cpu_us')} "
            f"| {ratio(p, 'drain_us')} | {ratio(p, 'drain_cpu_us')} | {col('first_ms', 0)} "
            f"| {col('steady_us')} | {ratio(p, 'steady_us')} |"
        )
        again.append(
            f"| {p:,} | {col('again_drain_us')} | {ratio(p, 'again_drain_us')} | {col('again_drain_cpu_us')} "
            f"| {ratio(p, 'again_drain_cpu_us')} | {col('again_first_ms', 0)} "
            f"| {col('idle_cpu_pct', 2)} | {col('idle_broker_cpu_pct', 2)} | {col('broker_rss_mb', 0)} |"
        )
    lines += ["", *again]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--partitions", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds an idle subscriber is measured")
    parser.add_argument("--limit", type=float, default=300.0, help="give up a drain after this many seconds")
    parser.add_argument("--broker", help="the scripts/brokers server name, to read its pid (redis, nats, ...)")
    parser.add_argument("--broker-pid", type=int, help="the broker server's pid (instead of --broker)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a provider setting, e.g. redis.claim_timeout=8")
    args = parser.parse_args()
    settings: dict[str, dict[str, object]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        settings.setdefault(section, {})[name] = value
    root = Path(__file__).resolve().parent.parent
    server = BrokerCpu(args.broker_pid or (broker_pid(root, args.broker) if args.broker else None))

    def interrupted(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # asyncio.run then cancels the run: its topic is still deleted

    signal.signal(signal.SIGTERM, interrupted)
    results: dict[int, list[dict[str, float | None]]] = {p: [] for p in args.partitions}
    for run in range(1, args.runs + 1):
        for partitions in args.partitions:
            result = asyncio.run(one_run(args.url, partitions, args.messages, args.idle, args.limit,
                                         dict(settings), server))
            results[partitions].append(result)
            print(json.dumps({"run": run, "partitions": partitions,
                              **{k: None if v is None else round(v, 2) for k, v in result.items()}}), flush=True)
    print(report(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
