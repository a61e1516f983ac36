"""The drain cell: a backlog published before the clock, then handled by 1, 2 or 4 workers.

Each worker is a separate process (``python -m msgbroker_bench._drain``, one JSON line per
command on its stdin, one per answer on its stdout) with its own connection, started, connected
and idle before the clock. The clock starts when the parent tells every worker to go: each
subscribes (joins the group, or starts its loop on the shared queue) and handles what it gets;
the clock stops at the last message handled (acked) by any worker. Subscribing happens inside
the timed section on purpose: a subscribed consumer reads ahead (msgbroker buffers up to
``batch_size`` per lane, aiokafka's fetcher and RabbitMQ's prefetch fill the client) even while
its handler waits, so a worker subscribed before the clock would drain part of the backlog
untimed. The client CPU is the sum of the worker processes' CPU time from go to stop.

The memory provider's broker lives in one process: its workers are tasks of the harness's
process (the same worker code, called directly), and its CPU is that process's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import sys
import time
import uuid
import zlib
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

from ._cells import Variant
from ._common import BATCH, DRAIN_FETCH, DRAIN_KEYS
from ._driver import Driver
from ._model import KEYS, decode_raw, partition_table, payload

__all__ = ["DrainVariant", "Tally", "drain_seqs", "index_of", "union_count"]

STEP = 20
"""Milliseconds between a worker's progress lines (its count, when it changed)."""


def drain_seqs(n: int, batch: int = BATCH) -> list[range]:
    """The sequence numbers of a backlog of ``n`` messages over ``DRAIN_KEYS`` keys, as contiguous
    ranges of at most ``batch`` (one ``publish_batch`` each). Message *i* gets sequence number
    ``(i // DRAIN_KEYS) * KEYS + i % DRAIN_KEYS``: ``key_of`` maps it to one of the first
    ``DRAIN_KEYS`` keys, and each key's (and so each partition's) numbers rise in publish order."""
    out: list[range] = []
    for base in range(0, n, DRAIN_KEYS):
        block = min(DRAIN_KEYS, n - base)
        start = base // DRAIN_KEYS * KEYS
        out.extend(range(start + j, start + min(block, j + batch)) for j in range(0, block, batch))
    return out


def index_of(seq: int) -> int:
    """The backlog position of sequence number ``seq`` (the inverse of :func:`drain_seqs`)."""
    return seq // KEYS * DRAIN_KEYS + seq % KEYS


class Tally:
    """One worker's count of a backlog: distinct messages, duplicates, strays (another run's),
    per-partition order violations as this worker saw them (ordered workers hold their partitions
    exclusively, but a message redelivered to it after a hand-over, at least once, may follow
    later ones it handled before), and the ``perf_counter_ns`` of the first and the last message handled (Linux's
    monotonic clock, the same in every process of the machine)."""

    def __init__(self, partitions: int = 64) -> None:
        self.parts = partition_table(partitions)
        self.partitions = partitions
        self.arm(-1, 0)

    def arm(self, run: int, target: int) -> None:
        self.run = run
        self.target = target
        self.seen = bytearray(target)
        self.last = array("q", [-1]) * self.partitions
        self.count = self.dups = self.stray = self.order_violations = 0
        self.first_ns = self.last_ns = 0

    def record(self, run: int, seq: int) -> None:
        """One message handled; call it after the message's ack (batch loops: :meth:`stamp`
        after the batch's ack)."""
        index = seq // KEYS * DRAIN_KEYS + seq % KEYS
        if run != self.run or index >= self.target:
            self.stray += 1
            return
        if self.seen[index]:
            self.dups += 1
            return
        self.seen[index] = 1
        part = self.parts[seq % KEYS]
        if seq < self.last[part]:
            self.order_violations += 1
        self.last[part] = seq
        self.count += 1
        self.last_ns = time.perf_counter_ns()
        if not self.first_ns:
            self.first_ns = self.last_ns

    def stamp(self) -> None:
        """A batch's ack is done: its messages count as handled now."""
        if self.count:
            self.last_ns = time.perf_counter_ns()

    def report(self) -> dict[str, Any]:
        return {
            "count": self.count, "dups": self.dups, "stray": self.stray,
            "order_violations": self.order_violations, "first_ns": self.first_ns, "last_ns": self.last_ns,
            "seen": base64.b64encode(zlib.compress(bytes(self.seen))).decode(),
        }


def union_count(reports: list[dict[str, Any]], target: int) -> int:
    """Distinct messages of the backlog handled by any of the workers of ``reports``."""
    union = bytearray(target)
    for report in reports:
        seen = zlib.decompress(base64.b64decode(report["seen"]))
        for i, flag in enumerate(seen[:target]):
            if flag:
                union[i] = 1
    return sum(union)


# -- the workers -----------------------------------------------------------------------------


class Worker:
    """One worker's client: :meth:`open` connects (before the clock), :meth:`start` subscribes
    and handles, :meth:`stop` stops handling (the client stays connected for the next run)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.tally = Tally(int(spec.get("partitions", 64)))
        self.running = False
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self.running = True
        self.task = asyncio.create_task(self.loop())

    async def loop(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Let the loop finish the batch in hand (its acks), then end it."""
        self.running = False
        if self.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.task), 3.0)
            except BaseException:
                self.task.cancel()
                with contextlib.suppress(BaseException):
                    await self.task
            self.task = None

    async def close(self) -> None:
        await self.stop()


class OursWorker(Worker):
    """msgbroker: ``subscribe(topic, group, handler, ordered=True)``; the handler acks, in order."""

    async def open(self) -> None:
        import msgbroker

        spec = self.spec
        self.broker = await msgbroker.connect(spec["url"], partition_count=spec["partitions"], **spec["overrides"])
        self.sub: Any = None

    async def start(self) -> None:
        from ._model import BenchMessage

        record = self.tally.record

        async def handle(ctx: Any) -> None:
            message = ctx.message
            await ctx.ack()
            record(message.run, message.seq)

        self.sub = await self.broker.subscribe(
            self.spec["topic"], self.spec["group"], handle, message_type=BenchMessage, ordered=True)

    async def stop(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sub.close(), 30)
            self.sub = None

    async def close(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await self.broker.close()


class RawRedisWorker(Worker):
    """redis-py: ``XREADGROUP COUNT 500 BLOCK 100`` + one ``XACK`` of the batch's ids."""

    async def open(self) -> None:
        import redis.asyncio as aioredis

        self.client: Any = aioredis.Redis.from_url(self.spec["url"])
        await self.client.ping()

    async def loop(self) -> None:
        client, tally = self.client, self.tally
        stream, group, name = self.spec["stream"], self.spec["group"], self.spec["name"]
        streams = {stream: ">"}
        while self.running:
            reply = await client.xreadgroup(group, name, streams, count=DRAIN_FETCH, block=100)
            if not reply:
                continue
            entries = reply[0][1]
            for _id, fields in entries:
                item = decode_raw(fields[b"d"])
                tally.record(item["run"], item["seq"])
            await client.xack(stream, group, *(entry_id for entry_id, _ in entries))
            tally.stamp()

    async def close(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await self.client.aclose()


class RawNatsWorker(Worker):
    """nats-py: the durable pull consumer's ``fetch(500)`` + ``msg.ack()`` each."""

    async def open(self) -> None:
        import nats

        self.nc = await nats.connect(self.spec["url"])
        self.psub: Any = None

    async def loop(self) -> None:
        if self.psub is None:
            self.psub = await self.nc.jetstream().pull_subscribe_bind(self.spec["durable"], stream=self.spec["stream"])
        psub, record = self.psub, self.tally.record
        while self.running:
            try:
                msgs = await psub.fetch(DRAIN_FETCH, timeout=0.1)
            except TimeoutError:
                continue
            for msg in msgs:
                item = decode_raw(msg.data)
                await msg.ack()
                record(item["run"], item["seq"])

    async def close(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await self.nc.close()


class RawRabbitWorker(Worker):
    """aio-pika: ``basic.consume`` on the quorum queue, prefetch 500, ``message.ack()`` each."""

    async def open(self) -> None:
        import aio_pika

        self.conn = await aio_pika.connect(self.spec["url"])
        channel = await self.conn.channel()
        await channel.set_qos(prefetch_count=DRAIN_FETCH)
        self.queue = await channel.get_queue(self.spec["queue"], ensure=False)
        self.tag: Any = None

    async def start(self) -> None:
        record = self.tally.record

        async def on_message(message: Any) -> None:
            item = decode_raw(message.body)
            await message.ack()
            record(item["run"], item["seq"])

        self.tag = await self.queue.consume(on_message)

    async def stop(self) -> None:
        if self.tag is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.queue.cancel(self.tag), 10)
            self.tag = None

    async def close(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await self.conn.close()


class RawKafkaWorker(Worker):
    """aiokafka: ``getmany(max_records=500)`` + one ``commit()`` per batch (the consumer is
    started before the clock; it subscribes, i.e. joins the group, at go)."""

    async def open(self) -> None:
        from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped]

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.spec["bootstrap"], group_id=self.spec["group"], enable_auto_commit=False,
            auto_offset_reset="earliest")
        await self.consumer.start()

    async def start(self) -> None:
        self.consumer.subscribe([self.spec["topic"]])
        await super().start()

    async def loop(self) -> None:
        consumer, tally = self.consumer, self.tally
        while self.running:
            batches = await consumer.getmany(timeout_ms=100, max_records=DRAIN_FETCH)
            if not batches:
                continue
            for records in batches.values():
                for rec in records:
                    item = decode_raw(rec.value)
                    tally.record(item["run"], item["seq"])
            await consumer.commit()
            tally.stamp()

    async def stop(self) -> None:
        await super().stop()
        with contextlib.suppress(Exception):
            self.consumer.unsubscribe()

    async def close(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await self.consumer.stop()


class RawMemoryWorker(Worker):
    """asyncio.Queue: ``await queue.get()`` + ``json.loads`` (in the harness's process only)."""

    async def open(self) -> None:
        self.queue: asyncio.Queue[bytes] = self.spec["queue"]

    async def loop(self) -> None:
        queue, record = self.queue, self.tally.record
        while True:
            item = decode_raw(await queue.get())
            record(item["run"], item["seq"])

    async def stop(self) -> None:
        self.running = False
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
            self.task = None


def make_worker(spec: dict[str, Any]) -> Worker:
    """The worker of ``spec["kind"]`` (``ours``, or ``raw`` with ``spec["provider"]``)."""
    if spec["kind"] == "ours":
        return OursWorker(spec)
    workers: dict[str, type[Worker]] = {
        "redis": RawRedisWorker, "nats": RawNatsWorker, "rabbitmq": RawRabbitWorker, "kafka": RawKafkaWorker,
        "memory": RawMemoryWorker,
    }
    return workers[spec["provider"]](spec)


# -- the worker process ----------------------------------------------------------------------


async def serve(spec_line: str, read: Callable[[], Awaitable[bytes]], write: Callable[[dict[str, Any]], None]) -> None:
    """The worker process's loop: ``spec_line`` says what to run; then one command per line
    (``arm``, ``go``, ``stop``, ``quit``). While running, a ``count`` line every ``STEP`` ms when
    the count changed."""
    worker = make_worker(json.loads(spec_line))
    await worker.open()
    write({"op": "ready"})
    cpu0 = 0.0
    running = False
    sent = -1  # the count of the last progress line since go

    async def progress() -> None:
        nonlocal sent
        while True:
            await asyncio.sleep(STEP / 1000)
            count = worker.tally.count
            if running and count != sent:
                write({"op": "count", "count": count})
                sent = count

    reporter = asyncio.create_task(progress())
    try:
        while line := await read():
            command = json.loads(line)
            op = command["op"]
            if op == "arm":
                worker.tally.arm(command["run"], command["n"])
                write({"op": "armed"})
            elif op == "go":
                cpu0 = time.process_time()
                sent = -1
                running = True
                await worker.start()
            elif op == "stop":
                running = False
                await worker.stop()
                write({"op": "report", "cpu": time.process_time() - cpu0, **worker.tally.report()})
            elif op == "quit":
                break
    finally:
        reporter.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.close(), 30)
    write({"op": "bye"})


async def _worker_main() -> None:
    for name in ("aiokafka", "aio_pika", "aiormq", "nats", "msgbroker"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout

    def write(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    spec_line = await reader.readline()
    await serve(spec_line.decode(), reader.readline, write)


# -- the harness's side ----------------------------------------------------------------------


class Handle:
    """The harness's view of one worker."""

    @property
    def count(self) -> int:
        """Messages the worker handled so far (a process's: as of its last progress line)."""
        raise NotImplementedError

    async def arm(self, run: int, n: int) -> None:
        raise NotImplementedError

    async def go(self) -> None:
        raise NotImplementedError

    async def stop(self) -> dict[str, Any]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class LocalHandle(Handle):
    """A worker run as a task of this process (the memory provider)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.worker = make_worker(spec)

    async def open(self) -> None:
        await self.worker.open()

    @property
    def count(self) -> int:
        return self.worker.tally.count

    async def arm(self, run: int, n: int) -> None:
        self.worker.tally.arm(run, n)

    async def go(self) -> None:
        await self.worker.start()

    async def stop(self) -> dict[str, Any]:
        await self.worker.stop()
        return {"cpu": None, **self.worker.tally.report()}

    async def close(self) -> None:
        await self.worker.close()


class ProcessHandle(Handle):
    """A worker process: ``python -m msgbroker_bench._drain``, spec and commands on its stdin."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.errors = bytearray()
        self.tasks: list[asyncio.Task[None]] = []
        self.counted = 0

    @property
    def count(self) -> int:
        return self.counted

    async def open(self, timeout: float = 60.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "msgbroker_bench._drain",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=1 << 20)
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._errors())]
        self._send(self.spec)
        await self._expect("ready", timeout)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = json.loads(line)
            if message["op"] == "count":
                self.counted = message["count"]
            else:
                await self.replies.put(message)
        await self.replies.put({"op": "exited"})

    async def _errors(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            self.errors += chunk
            del self.errors[:-4000]

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def _expect(self, op: str, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(self.replies.get(), timeout)
        if reply["op"] != op:
            tail = self.errors.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"drain worker: {reply['op']} instead of {op}: {' | '.join(tail)}")
        return reply

    async def arm(self, run: int, n: int) -> None:
        self.counted = 0
        self._send({"op": "arm", "run": run, "n": n})
        await self._expect("armed", 30)

    async def go(self) -> None:
        self._send({"op": "go"})
        assert self.proc is not None and self.proc.stdin is not None
        await self.proc.stdin.drain()

    async def stop(self) -> dict[str, Any]:
        self._send({"op": "stop"})
        return await self._expect("report", 60)

    async def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self._send({"op": "quit"})
            await self._expect("bye", 40)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 5)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class DrainVariant(Variant):
    """Publish a backlog of ``messages`` (untimed), then time ``workers`` workers handling it.
    ``ours``: ordered msgbroker subscribers; ``raw``: the client's unordered loop on the same
    group or queue. ``processes``: one process per worker (else tasks of this process)."""

    def __init__(self, name: str, driver: Driver, *, messages: int, workers: int, processes: bool,
                 timeout: float, warm: int = 200) -> None:
        self.name = name
        self.driver = driver
        self.messages = messages
        self.workers = workers
        self.processes = processes
        self.timeout = timeout
        self.warm = warm
        self.topic = f"bench-drain-{uuid.uuid4().hex[:8]}"
        self.group = f"bench-dg-{uuid.uuid4().hex[:8]}"
        self.handles: list[LocalHandle | ProcessHandle] = []

    async def setup(self) -> None:
        await self.driver.open()
        await self.driver.prepare(self.topic, 64)
        specs = await self._specs()
        make = ProcessHandle if self.processes else LocalHandle
        self.handles = [make(spec) for spec in specs]
        results = await asyncio.gather(*(h.open() for h in self.handles), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        # warm-up (not measured): the group's first join, the code paths; a failure fails the variant
        warm = await self._drain(0, self.warm)
        if warm["status"] != "ok":
            raise RuntimeError(f"warm-up: {warm['status']}")

    async def _specs(self) -> list[dict[str, Any]]:
        """What each worker runs; creates the raw loops' consumer group where the client needs it."""
        d: Any = self.driver
        base = {"partitions": 64, "provider": getattr(d, "provider", None) or _provider_of(d)}
        if d.kind == "ours":
            d.used.setdefault(self.topic, set()).add(self.group)
            spec = {**base, "kind": "ours", "url": d.url, "overrides": d.overrides, "topic": self.topic,
                    "group": self.group}
            return [dict(spec) for _ in range(self.workers)]
        provider = base["provider"]
        if provider == "redis":
            from redis import exceptions as rex

            stream = d._stream(self.topic)
            with contextlib.suppress(rex.ResponseError):
                await d.client.xgroup_create(stream, self.group, id="0", mkstream=True)
            extra: dict[str, Any] = {"url": d.url, "stream": stream, "group": self.group}
        elif provider == "nats":
            from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

            stream, subject = d._names(self.topic)
            await d.js.add_consumer(stream, ConsumerConfig(
                durable_name=self.group, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                max_ack_pending=-1, filter_subject=subject))
            extra = {"url": d.url, "stream": stream, "durable": self.group}
        elif provider == "rabbitmq":
            extra = {"url": d.url, "queue": d._queue(self.topic)}
        elif provider == "kafka":
            extra = {"bootstrap": d.bootstrap, "topic": d._topic(self.topic), "group": self.group}
        else:
            extra = {"queue": d._queue(self.topic)}
        return [{**base, "kind": "raw", **extra, "name": f"w{i}"} for i in range(self.workers)]

    async def rep(self, run: int) -> dict[str, Any]:
        return await self._drain(run, self.messages)

    async def _drain(self, run: int, n: int) -> dict[str, Any]:
        started = time.monotonic()
        for handle in self.handles:
            await handle.arm(run, n)
        data = payload(100)
        for seqs in drain_seqs(n, BATCH):
            await self.driver.publish_batch(self.topic, seqs, run, data, 0)
        deadline = started + self.timeout
        cpu0 = time.process_time()
        t0 = time.perf_counter_ns()
        status = "ok"
        await asyncio.gather(*(h.go() for h in self.handles))
        while sum(h.count for h in self.handles) < n:
            if time.monotonic() > deadline:
                before = sum(h.count for h in self.handles)
                await asyncio.sleep(1.0)
                what = "too slow" if sum(h.count for h in self.handles) > before else "lost"
                status = f"{what}: {before} of {n} handled within {self.timeout:.0f}s"
                break
            await asyncio.sleep(0.005)
        reports = list(await asyncio.gather(*(h.stop() for h in self.handles)))
        cpu = time.process_time() - cpu0
        handled = union_count(reports, n)
        if status == "ok" and handled < n:
            status = f"lost: {handled} of {n} handled (workers counted {sum(r['count'] for r in reports)})"
        last = max((r["last_ns"] for r in reports), default=0)
        firsts = [r["first_ns"] for r in reports if r["first_ns"]]
        return {
            "messages": handled,
            "seconds": (last - t0) / 1e9 if last > t0 else math.nan,
            "cpu": sum(r["cpu"] for r in reports) if self.processes else cpu,
            "first_ms": (min(firsts) - t0) / 1e6 if firsts else math.nan,
            # a worker's own repeats, and messages more than one worker handled
            "dups": sum(r["dups"] for r in reports) + sum(r["count"] for r in reports) - handled,
            "order_violations": sum(r["order_violations"] for r in reports),
            # the harness's broker CPU spans the whole repetition, the untimed publish included:
            # over the drain's seconds it would mislead, so the drain rows leave it out
            "broker_cpu_pct": "",
            "status": status,
        }

    async def teardown(self) -> None:
        await asyncio.gather(*(h.close() for h in self.handles), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.driver.drop(self.topic)
        await self.driver.close()


def _provider_of(driver: Driver) -> str:
    from ._raw import RawKafka, RawMemory, RawNats, RawRabbit, RawRedis

    kinds: dict[type[Driver], str] = {RawRedis: "redis", RawNats: "nats", RawRabbit: "rabbitmq",
                                      RawKafka: "kafka", RawMemory: "memory"}
    return kinds[type(driver)]


if __name__ == "__main__":
    asyncio.run(_worker_main())
