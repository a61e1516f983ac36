"""Drain a NATS backlog: one ordered msgbroker subscriber vs nats-py's fastest unordered loop.

The workload of issue #16: 20,000 messages of 100 B over 1,000 keys, published through msgbroker to
a 64-partition topic, then drained by

* ``ours``: ``broker.subscribe(topic, group, handler)`` — ordered, one worker, the default
  ``batch_size``, the handler acks (and checks per-key order);
* ``raw``: nats-py ``pull_subscribe`` on the topic's stream (every partition), ``fetch(500)``,
  ``json.loads`` and ``ack()`` of each message — no order at all.

Both drain the same backlog (each repetition publishes one topic; each side reads it with its own
consumer). Each side of each repetition runs in its own process, interleaved (ours raw ours raw
…), so that the two share the machine's load alike; ``--before PATH`` adds a third side, the same
``ours`` with ``msgbroker_nats`` imported from PATH (e.g. a ``git archive`` of an earlier commit's
``plugins/nats/src``). Rates are timed from the first message handled to the last; CPU is the
client process's ``time.process_time()`` over the same window (the server's is not in it).
``--workers N`` runs each side as N processes draining the same backlog together (one group; for
the raw loop one shared durable consumer): the rate is from the first message any of them handled
to the last, the CPU the sum of theirs over their own windows. The workers start one after
another, so the first ones begin alone and the group rebalances as the others join (for msgbroker
each moved lane costs a hand-over): the window includes that.

    set -a; . .brokers/env; set +a
    .venv/bin/python plugins/nats/benchmarks/drain.py [--reps 3] [--count 20000] [--before PATH] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import msgbroker
import nats
from msgbroker import Message, MessageContext

PARTITIONS, KEYS = 64, 1000
PREFIX = "DRAINBENCH"
DATA = ("0123456789abcdef" * 7)[:100]


class Item(Message):
    key: str
    seq: int
    data: str

    @property
    def partition_key(self) -> str:
        return self.key


class Window:
    """From the first message handled to the last: wall time and this process's CPU."""

    def __init__(self, count: int) -> None:
        self.count, self.seen = count, 0
        self.t0 = self.c0 = self.t1 = self.c1 = 0.0
        self.done = asyncio.Event()
        self.s0 = time.perf_counter()

    def hit(self, n: int = 1) -> None:
        if self.seen == 0:
            self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.seen += n
        if self.seen >= self.count and not self.done.is_set():
            self.t1, self.c1 = time.perf_counter(), time.process_time()
            self.done.set()

    def row(self) -> dict[str, float]:
        return {"rate": self.count / (self.t1 - self.t0), "cpu_us": (self.c1 - self.c0) / self.count * 1e6,
                "rate_from_start": self.count / (self.t1 - self.s0)}


def _settings(url: str) -> dict[str, Any]:
    return {"partition_count": PARTITIONS, "nats": {"url": url, "stream_prefix": PREFIX}}


async def publish(url: str, topic: str, count: int) -> None:
    async with msgbroker.connect(url, **_settings(url)) as broker:
        for start in range(0, count, 500):
            batch = [Item(key=f"key-{i % KEYS:04d}", seq=i, data=DATA) for i in range(start, min(count, start + 500))]
            await broker.publish_batch(topic, batch)


class Shared:
    """A worker of several: its progress in a file the parent reads, until the parent stops it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.count = 0
        self.first = self.last = self.cpu_first = self.cpu_last = 0.0

    def hit(self, n: int = 1) -> None:
        now, cpu = time.time(), time.process_time()
        if not self.count:
            self.first, self.cpu_first = now, cpu
        self.count += n
        self.last, self.cpu_last = now, cpu

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as file:
            json.dump({"count": self.count, "first": self.first, "last": self.last,
                       "cpu": self.cpu_last - self.cpu_first}, file)
        os.replace(tmp, self.path)

    async def report(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.write()


async def ours(
    url: str, topic: str, count: int, group: str | None = None, shared: Shared | None = None
) -> dict[str, float]:
    window = Window(count)
    last: dict[str, int] = {}
    disorder = 0

    async def handle(ctx: MessageContext[Item]) -> None:
        nonlocal disorder
        message = ctx.message
        if last.get(message.key, -1) > message.seq:
            disorder += 1
        last[message.key] = message.seq
        await ctx.ack()
        if shared is not None:
            shared.hit()
        else:
            window.hit()

    async with msgbroker.connect(url, **_settings(url)) as broker:
        window.s0 = time.perf_counter()
        await broker.subscribe(topic, group or f"g-{uuid.uuid4().hex[:8]}", handle, message_type=Item)
        if shared is not None:
            await shared.report()  # until the parent stops this process
        await asyncio.wait_for(window.done.wait(), 600)
    if disorder:
        raise SystemExit(f"ours: {disorder} messages out of order")
    return window.row()


async def raw(
    url: str, topic: str, count: int, group: str | None = None, shared: Shared | None = None
) -> dict[str, float]:
    window = Window(count)
    nc = await nats.connect(url)
    reporter = asyncio.ensure_future(shared.report()) if shared is not None else None
    try:
        js = nc.jetstream()
        stream = f"{PREFIX}_{topic}"
        window.s0 = time.perf_counter()
        sub = await js.pull_subscribe(f"{PREFIX}.{topic}.*", durable=group, stream=stream)
        while not window.done.is_set():
            try:
                msgs = await sub.fetch(500, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                json.loads(msg.data)
                await msg.ack()
            if shared is not None:
                shared.hit(len(msgs))
            else:
                window.hit(len(msgs))
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    finally:
        if reporter is not None:
            reporter.cancel()
        await nc.close()
    return window.row()


async def _delete_streams(url: str) -> None:
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        for info in await jsm.streams_info():
            name = info.config.name or ""
            if name.startswith(f"{PREFIX}_") or name in (f"KV_{PREFIX}_pins", f"KV_{PREFIX}_attempts"):
                await jsm.delete_stream(name)
    finally:
        await nc.close()


def _side(args: argparse.Namespace, url: str) -> None:
    """One side of one repetition, in this process: print its row as JSON (or, one worker of
    several, report progress to ``--progress`` until stopped)."""
    side = {"ours": ours, "raw": raw}[args.side]
    if args.progress:
        asyncio.run(side(url, args.topic, args.count, args.group, Shared(args.progress)))
        return
    row = asyncio.run(side(url, args.topic, args.count))
    import msgbroker_nats

    print("ROW " + json.dumps({**row, "module": msgbroker_nats.__file__}), flush=True)


def _workers(args: argparse.Namespace, side: str, topic: str, env: dict[str, str]) -> dict[str, Any]:
    """``args.workers`` processes of one side on one group, stopped once together they handled
    the backlog; the rate from the first message any handled to the last, the CPU summed."""
    import tempfile

    group = f"g-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"w{i}.json") for i in range(args.workers)]
        procs = [subprocess.Popen([sys.executable, __file__, "--side", side, "--topic", topic, "--count",
                                   str(args.count), "--group", group, "--progress", path], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for path in paths]
        try:
            deadline = time.monotonic() + 600
            while True:
                time.sleep(0.2)
                reports = []
                for path in paths:
                    try:
                        with open(path, encoding="utf-8") as file:
                            reports.append(json.load(file))
                    except (OSError, ValueError):
                        reports.append({"count": 0, "first": 0.0, "last": 0.0, "cpu": 0.0})
                if sum(r["count"] for r in reports) >= args.count or time.monotonic() > deadline:
                    break
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    handled = sum(r["count"] for r in reports)
    if handled < args.count:
        raise SystemExit(f"{side}: {handled} of {args.count} handled by {args.workers} workers in 600 s")
    start = min(r["first"] for r in reports if r["count"])
    end = max(r["last"] for r in reports)
    import msgbroker_nats

    return {"rate": handled / (end - start), "cpu_us": sum(r["cpu"] for r in reports) / handled * 1e6,
            "rate_from_start": float("nan"), "module": msgbroker_nats.__file__
            if "PYTHONPATH" not in env else env["PYTHONPATH"] + "/src/"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--before", help="also run 'ours' with msgbroker_nats from this source folder")
    parser.add_argument("--workers", type=int, default=1, help="processes per side (default 1)")
    parser.add_argument("--side", choices=("ours", "raw"), help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--progress", help=argparse.SUPPRESS)
    args = parser.parse_args()
    url = os.environ.get("MSGBROKER_NATS__URL", "nats://127.0.0.1:4222")
    if args.side:
        _side(args, url)
        return 0
    sides: dict[str, tuple[str, dict[str, str]]] = {}
    if args.before:
        sides["before"] = ("ours", {"PYTHONPATH": os.path.abspath(args.before)})
    sides["ours"] = ("ours", {})
    sides["raw"] = ("raw", {})
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    run = uuid.uuid4().hex[:6]
    try:
        for rep in range(args.reps):
            topic = f"drain-{run}-{rep}"
            asyncio.run(publish(url, topic, args.count))
            for name, (side, extra) in sides.items():
                if args.workers > 1:
                    row = _workers(args, side, topic, {**os.environ, **extra})
                else:
                    out = subprocess.run([sys.executable, __file__, "--side", side, "--topic", topic,
                                          "--count", str(args.count)], env={**os.environ, **extra},
                                         capture_output=True, text=True, check=True).stdout
                    row = json.loads(next(line for line in out.splitlines() if line.startswith("ROW "))[4:])
                rows[name].append(row)
                where = row["module"].split("/src/")[0]
                print(f"rep {rep + 1} {name:6s}: {row['rate']:9,.0f} msg/s {row['cpu_us']:6.1f} µs CPU/msg "
                      f"(from subscribe {row['rate_from_start']:9,.0f} msg/s) [{where}]", flush=True)
    finally:
        asyncio.run(_delete_streams(url))
    print("medians (min-max), first message to last:")
    for name, got in rows.items():
        rates, cpus = [r["rate"] for r in got], [r["cpu_us"] for r in got]
        print(f"  {name:6s}: {statistics.median(rates):9,.0f} msg/s ({min(rates):,.0f}-{max(rates):,.0f}), "
              f"CPU {statistics.median(cpus):.1f} µs/msg ({min(cpus):.1f}-{max(cpus):.1f})")
    for name in sides:
        if name != "raw":
            ratios = [o["rate"] / r["rate"] for o, r in zip(rows[name], rows["raw"], strict=True)]
            print(f"  {name} / raw per rep: " + ", ".join(f"{x:.2f}" for x in ratios)
                  + f"; median {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
